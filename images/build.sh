#!/usr/bin/env bash
# Builds the default capsem guest image without Docker:
#   vmlinuz            Debian's kernel for virtual machines, linux-image-*-cloud-amd64
#                      (apt-get download, not installed): the generic flavour's
#                      kernel with its hardware drivers left out, ext4 and crc32c
#                      built in; it boots faster and keeps less of the guest's
#                      memory (docs/benchmarks.md)
#   vmlinux            the same kernel's uncompressed ELF, cut out of vmlinuz: QEMU's
#                      microvm boots it through PVH, skipping the decompression
#                      (XZ, LZ4) that costs seconds under TCG, its zero tail (.bss) left to
#                      QEMU's zero-fill (docs/benchmarks.md)
#   initramfs.cpio.gz  /init = capsem-init, capsem-agent, and the modules that
#                      reach the disks (virtio, vsock, virtio_blk, erofs, overlay, ext4)
#   rootfs.erofs       the read-only root: Debian 12 from images/packages.txt,
#                      installed by mmdebstrap (docs/image.md)
#   manifest.json      every package with its version, sha256 of every artifact
#
# usage: images/build.sh [OUT_DIR]
#   OUT_DIR  default $CAPSEM_IMAGE_DIR, else ${CAPSEM_HOME:-~/.capsem}/images/default
#   CAPSEM_CACHE  where downloaded .debs are kept (default ~/.cache/capsem)
#   CAPSEM_DEBIAN_MIRROR  default http://deb.debian.org/debian (and -security)
#   CAPSEM_KERNEL_META  the kernel's Debian meta-package, default
#                 linux-image-cloud-amd64 (linux-image-amd64: the generic flavour)
#
# Rerunning with the same inputs (kernel, the apt index the host last
# fetched, packages.txt, agent/init binaries, this script) prints "image up
# to date" and changes nothing. The root filesystem has its own stamp: a new
# agent rebuilds only the initramfs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${CAPSEM_IMAGE_DIR:-${CAPSEM_HOME:-$HOME/.capsem}/images/default}}
CACHE=${CAPSEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capsem}/debs
TARGET=x86_64-unknown-linux-gnu
# Modules the guest needs; their dependencies are added in load order.
# virtio_pci for -M q35/pc, virtio_mmio for -M microvm, then vsock over virtio.
# virtio_blk, erofs, overlay and ext4 for the disks (a module built into the
# kernel, as ext4 is in the cloud flavour, is skipped). libcrc32c (for erofs
# and ext4) asks the crypto API for crc32c, which finds no modprobe in the
# initramfs: crc32c_generic is named, and libcrc32c follows it (NEEDS below).
# virtio_balloon: free page reporting hands the pages the guest frees back
# to the host (an idle VM's resident memory; docs/benchmarks.md).
# Those load at every boot (/etc/capsem/modules). Two groups load only when
# the kernel command line asks for them, since each module costs boot time
# under TCG (docs/benchmarks.md): virtiofs for shares (modules.share), and
# dummy and nftables for the redirected network, with nft_limit, nft_log and
# nfnetlink_log for the log of dropped packets the agent reads (modules.net).
BOOT_MODULES=(virtio_pci virtio_mmio vmw_vsock_virtio_transport crc32c_generic virtio_blk erofs
    overlay ext4 virtio_balloon)
SHARE_MODULES=(virtiofs)
NET_MODULES=(dummy nf_tables nft_chain_nat nft_redir nft_ct nft_limit nft_log nfnetlink_log)
ROOT_MODULES=("${BOOT_MODULES[@]}" "${SHARE_MODULES[@]}" "${NET_MODULES[@]}")
PACKAGES_FILE=$REPO/images/packages.txt
MIRROR=${CAPSEM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm

say() { echo "build.sh: $*" >&2; }
die() {
    echo "build.sh: error: $*" >&2
    exit 1
}
sha() { sha256sum "$1" | cut -d' ' -f1; }
# The version apt would install now (the exact package the repos serve).
candidate() {
    apt-cache policy "$1" | sed -n 's/^  Candidate: //p'
}

for bin in apt-get apt-cache dpkg-deb dpkg-query cpio gzip xz lz4 readelf od cargo sha256sum mmdebstrap mkfs.erofs; do
    command -v "$bin" >/dev/null || die "$bin is missing (run scripts/install-deps.sh)"
done

# --- inputs -----------------------------------------------------------------
KMETA=${CAPSEM_KERNEL_META:-linux-image-cloud-amd64}
KPKG=$(apt-cache depends "$KMETA" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot resolve $KMETA to a kernel package (apt-get update?)"
KVER=$(candidate "$KPKG")
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate for $KPKG"
mapfile -t PACKAGES < <(sed 's/#.*//; s/[[:space:]]//g; /^$/d' "$PACKAGES_FILE")
[ ${#PACKAGES[@]} -gt 0 ] || die "no packages in $PACKAGES_FILE"

mkdir -p "$CACHE"
# Every scratch directory this run made; removed on any exit.
SCRATCH=()
cleanup() { [ ${#SCRATCH[@]} -eq 0 ] || rm -rf "${SCRATCH[@]}"; }
trap cleanup EXIT
fetch() { # package version -> path of the .deb in the cache
    local deb part
    deb="$CACHE/${1}_${2//:/%3a}_amd64.deb"
    if [ ! -f "$deb" ]; then
        say "downloading $1 $2"
        # Into a scratch directory beside the cache, then one rename: an
        # interrupted download never leaves a .deb that a later run trusts.
        # (fetch runs in a command substitution, whose subshell does not run
        # the EXIT trap: it removes its scratch directory itself.)
        part=$(mktemp -d "$CACHE/.download.XXXXXX")
        # As root, apt's _apt sandbox user cannot write the cache; download as root.
        if ! (cd "$part" && apt-get download -qq -o APT::Sandbox::User=root "$1=$2" >/dev/null); then
            rm -rf "$part"
            die "apt-get download $1=$2 failed"
        fi
        if [ ! -f "$part/$(basename "$deb")" ]; then
            rm -rf "$part"
            die "downloaded $1 but $(basename "$deb") is not there"
        fi
        mv -f "$part/$(basename "$deb")" "$deb"
        rm -rf "$part"
    fi
    echo "$deb"
}
KDEB=$(fetch "$KPKG" "$KVER")
say "building capsem-agent and capsem-init (static, release)"
(cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --target "$TARGET" -p capsem-agent --bins) ||
    die "cargo build of capsem-agent failed"
BIN_DIR=$REPO/target/$TARGET/release
for b in capsem-agent capsem-init; do
    [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b was not built"
    ldd "$BIN_DIR/$b" 2>&1 | grep -qE 'not a dynamic executable|statically linked' ||
        die "$b is not statically linked"
done

# The root filesystem is a function of the package list and the archive's
# state; the host's apt index (its InRelease files) stands for the latter:
# `apt-get update` that brings new versions makes a new root filesystem.
ROOTFS_STAMP=$(
    echo "packages $(sha "$PACKAGES_FILE")"
    echo "suite $SUITE mirror $MIRROR"
    for f in /var/lib/apt/lists/*_dists_"$SUITE"*_InRelease; do
        [ -f "$f" ] && echo "$(basename "$f") $(sha "$f")"
    done
    echo "mmdebstrap $(mmdebstrap --version)"
    echo "erofs-utils $(dpkg-query -W -f='${Version}' erofs-utils 2>/dev/null)"
    echo "rootfs.sh $(sha "$REPO/images/rootfs.sh")"
)
ROOTFS_STAMP=$(printf '%s\n' "$ROOTFS_STAMP" | sha256sum | cut -d' ' -f1)
STAMP_INPUT=$(
    echo "kernel $KPKG $KVER $(sha "$KDEB")"
    echo "rootfs $ROOTFS_STAMP"
    echo "capsem-agent $(sha "$BIN_DIR/capsem-agent")"
    echo "capsem-init $(sha "$BIN_DIR/capsem-init")"
    echo "build.sh $(sha "${BASH_SOURCE[0]}")"
    echo "modules ${ROOT_MODULES[*]}"
)
STAMP=$(printf '%s\n' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/vmlinux" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/rootfs.erofs" ] &&
    [ -f "$OUT/manifest.json" ]; then
    say "image up to date: $OUT"
    exit 0
fi

# The bzImage's compressed payload -> its uncompressed ELF. The setup
# header says where the payload is (setup_sects at 0x1f1, payload_offset
# and payload_length at 0x248/0x24c, from the protected-mode code that
# follows the setup sectors); its magic says how it is compressed. The result
# must be an ELF with a Xen PHYS32_ENTRY note (type 0x12): that is what QEMU's
# microvm enters through PVH (CONFIG_PVH).
extract_vmlinux() { # bzImage out
    local u8 off len magic notes
    [ "$(od -An -c -j 514 -N 4 "$1" | tr -d ' ')" = HdrS ] || die "$1 is not a bzImage"
    u8=$(od -An -t u1 -j $((0x1f1)) -N 1 "$1" | tr -d ' ')
    [ "$u8" -ne 0 ] || u8=4
    off=$(($((u8 + 1)) * 512 + $(od -An -t u4 -j $((0x248)) -N 4 "$1" | tr -d ' ')))
    len=$(od -An -t u4 -j $((0x24c)) -N 4 "$1" | tr -d ' ')
    magic=$(od -An -t x1 -j "$off" -N 6 "$1" | tr -d ' ')
    payload() { dd if="$1" bs=1M iflag=skip_bytes,count_bytes skip="$off" count="$len" status=none; }
    # The kernel's build appends the uncompressed size after the stream:
    # single-stream decoders stop before it.
    case $magic in
    fd377a585a00) payload "$1" | xz -dc --single-stream >"$2" ;;
    1f8b*) payload "$1" | gzip -dcq >"$2" || [ $? -eq 2 ] ;; # 2: trailing bytes, a warning
    28b52ffd*) payload "$1" | zstd -qdc >"$2" ;;
    # lz4's legacy frames have no end mark: it reads the size as a frame
    # and fails after writing everything; the size check below decides.
    02214c18*) payload "$1" | lz4 -dcq >"$2" || true ;;
    *) die "$1: unknown kernel payload compression (magic $magic)" ;;
    esac || die "cannot decompress the kernel in $1"
    [ "$(stat -c %s "$2")" = "$(payload "$1" | tail -c 4 | od -An -t u4 | tr -d ' ')" ] ||
        die "the kernel in $1 decompressed to a size other than its trailer's"
    [ "$(od -An -c -N 4 "$2" | tr -d ' ')" = 177ELF ] || die "the kernel in $1 is not an ELF"
    notes=$(readelf -n "$2") || die "readelf cannot read the kernel from $1"
    grep -qE '^[[:space:]]+Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*\(0x00000012\)' <<<"$notes" ||
        die "the kernel in $1 has no PVH entry note (Xen PHYS32_ENTRY): it needs CONFIG_PVH"
}

# QEMU copies each segment's file part into guest RAM from a mapping of the
# file that it keeps for a reset, so every page of it that it read counts
# in each VM's resident memory. Debian's last segment carries .bss, .brk
# and .init.scratch in the file as 22 MiB of zeros: the segment's file size
# is cut back to where .bss starts when everything after that is zero, its
# size in memory stays, and QEMU zero-fills the rest (docs/benchmarks.md).
trim_vmlinux() { # vmlinux
    local bss phoff phent idx=0 off fsz new i bytes=""
    bss=$(readelf -SW "$1" | sed 's/^ *\[ *[0-9]*\]//' | awk '$1 == ".bss" && $2 == "NOBITS" {print $4}')
    [ -n "$bss" ] || { say "vmlinux: no .bss section, left as it is"; return 0; }
    bss=$((0x$bss))
    read -r phoff phent < <(readelf -hW "$1" |
        awk -F: '/Start of program headers/ {o = $2 + 0} /Size of program headers/ {n = $2 + 0} END {print o, n}')
    while read -r off fsz; do
        if [ "$off" != - ] && [ $((off)) -le $bss ] && [ $bss -lt $((off + fsz)) ]; then
            new=$((bss - off))
            if ! dd if="$1" bs=1M iflag=skip_bytes,count_bytes skip=$bss count=$((off + fsz - bss)) status=none |
                cmp -s -n $((off + fsz - bss)) - /dev/zero; then
                say "vmlinux: data after .bss in its segment, left as it is"
                return 0
            fi
            for i in 0 1 2 3 4 5 6 7; do
                bytes+=$(printf '\\%03o' $(((new >> (8 * i)) & 255)))
            done
            # shellcheck disable=SC2059 # the octal escapes are the format
            printf "$bytes" | dd of="$1" bs=1 seek=$((phoff + idx * phent + 32)) conv=notrunc status=none
            [ "$(readelf -lW "$1" | awk -v o="$(printf '0x%06x' $((off)))" '$1 == "LOAD" && $2 == o {print $5}')" = "$(printf '0x%06x' $new)" ] ||
                die "vmlinux: the segment at $off was not cut back"
            say "vmlinux: $(((off + fsz - bss) / 1048576)) MiB of zeros after .bss left to QEMU's zero-fill"
            return 0
        fi
        idx=$((idx + 1))
    done < <(readelf -lW "$1" | awk '/^ *[A-Z_]+ +0x/ {if ($1 == "LOAD") print $2, $5; else print "-", "-"}')
    say "vmlinux: .bss is in no segment's file part, left as it is"
}

# --- build --------------------------------------------------------------------
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/capsem-image.XXXXXX")
SCRATCH+=("$WORK")
TREE=$WORK/tree
KX=$WORK/kernel

say "unpacking $KPKG $KVER"
mkdir -p "$KX"
dpkg-deb --fsys-tarfile "$KDEB" | tar -x -C "$KX" --wildcards './boot/vmlinuz-*' './lib/modules/*'
KREL=$(basename "$(ls -d "$KX"/lib/modules/*)")
MODDIR=$KX/lib/modules/$KREL

# Only what reaches the disks: capsem-init mounts rootfs.erofs and the VM's
# writable disk as an overlay and switches into it (docs/image.md).
mkdir -p "$TREE"/usr/{bin,lib} "$TREE"/{etc/capsem,root,tmp,proc,sys,dev,run}
ln -s usr/lib "$TREE/lib"
chmod 0700 "$TREE/root"
chmod 1777 "$TREE/tmp"

install -m 0755 "$BIN_DIR/capsem-init" "$TREE/init"
install -m 0755 "$BIN_DIR/capsem-agent" "$TREE/usr/bin/capsem-agent"

# Kernel modules: resolve dependencies from each .ko's modinfo "depends=",
# emit in load order, decompress (the init loads them with finit_module, flags 0),
# drop their signatures (below).
declare -A MODPATH=() SEEN=() AFTER=()
while IFS= read -r -d '' ko; do
    name=$(basename "$ko")
    name=${name%%.ko*}
    MODPATH[${name//-/_}]=$ko
done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
BUILTIN=$(sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$MODDIR/modules.builtin")
# What a module's depends= does not say but its init needs registered first:
# libcrc32c asks the crypto API for crc32c (there is no modprobe to find it).
declare -A NEEDS=([libcrc32c]=crc32c_generic)
ORDER=()
add_module() {
    local m=$1 deps d
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    if grep -qx "$m" <<<"$BUILTIN"; then return 0; fi
    [ -n "${MODPATH[$m]:-}" ] || die "module $m not found in $KPKG"
    deps=$(decompress "${MODPATH[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    deps="${deps//,/ } ${NEEDS[$m]:-}"
    AFTER[$m]=
    for d in $deps; do
        d=${d//-/_}
        add_module "$d"
        grep -qx "$d" <<<"$BUILTIN" || AFTER[$m]+=" $d"
    done
    ORDER+=("$m")
}
module_rel() { # module name -> its path in the initramfs
    local rel=${MODPATH[$1]#"$KX"}
    echo "${rel%.ko*}.ko"
}
decompress() {
    case $1 in
    *.ko) cat "$1" ;;
    *.ko.xz) xz -dc "$1" ;;
    *.ko.zst) zstd -qdc "$1" ;;
    *.ko.gz) gzip -dc "$1" ;;
    *) die "unknown module compression: $1" ;;
    esac
}
# Debian signs its modules; the kernel checks a signature it finds (RSA and
# SHA-256 over the whole module: 0.15 s of 0.43 s for the 19 modules under
# TCG) but does not require one (no MODULE_SIG_FORCE, no lockdown without
# Secure Boot). The initramfs is this script's output, whose integrity the
# manifest's hashes carry, so the trailer is cut off: the structure before
# the magic ends with the signature's length (big-endian, last 4 of its 12
# bytes) after the signer's and key id's lengths (bytes 3 and 4).
strip_signature() { # module file, rewritten in place
    local size b len
    size=$(stat -c %s "$1")
    [ "$size" -gt 40 ] && [ "$(tail -c 28 "$1")" = "~Module signature appended~" ] || return 0
    read -r -a b < <(od -An -t u1 -j $((size - 40)) -N 12 "$1")
    len=$((size - 40 - ((b[8] << 24) | (b[9] << 16) | (b[10] << 8) | b[11]) - b[3] - b[4]))
    [ "$len" -gt 0 ] || die "$1: bad module signature trailer"
    truncate -s "$len" "$1"
}
# One list per group: the modules (and dependencies) no earlier group has,
# each line a module and then the modules it must follow (capsem-init loads
# the others side by side).
write_list() { # list file under $TREE, then the group's modules
    local list=$TREE/$1 start=${#ORDER[@]} m d rel line
    shift
    for m in "$@"; do add_module "$m"; done
    echo "# load order: a module, then those it follows; written by images/build.sh" >"$list"
    for m in "${ORDER[@]:start}"; do
        rel=$(module_rel "$m")
        mkdir -p "$TREE/$(dirname "$rel")"
        decompress "${MODPATH[$m]}" >"$TREE/$rel"
        strip_signature "$TREE/$rel"
        line=$rel
        for d in ${AFTER[$m]}; do line+=" $(module_rel "$d")"; done
        echo "$line" >>"$list"
    done
}
write_list etc/capsem/modules "${BOOT_MODULES[@]}"
write_list etc/capsem/modules.share "${SHARE_MODULES[@]}"
write_list etc/capsem/modules.net "${NET_MODULES[@]}"

say "packing initramfs (${#ORDER[@]} modules: ${ORDER[*]})"
(cd "$TREE" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -n -6 >"$WORK/initramfs.cpio.gz"
cp "$KX/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
extract_vmlinux "$WORK/vmlinuz" "$WORK/vmlinux"
trim_vmlinux "$WORK/vmlinux"

# --- root filesystem -------------------------------------------------------------
# Rebuilt only when its own inputs changed; otherwise the one in $OUT stays.
ROOTFS_PART=$OUT/.rootfs.erofs.part
if [ -f "$OUT/.rootfs.stamp" ] && [ "$(cat "$OUT/.rootfs.stamp")" = "$ROOTFS_STAMP" ] &&
    [ -f "$OUT/rootfs.erofs" ] && [ -f "$OUT/rootfs.packages" ]; then
    say "root filesystem up to date"
    REBUILD_ROOTFS=0
    cp "$OUT/rootfs.packages" "$WORK/rootfs.packages"
    ROOTFS_IMG=$OUT/rootfs.erofs
else
    REBUILD_ROOTFS=1
    rm -f "$ROOTFS_PART"
    SCRATCH+=("$ROOTFS_PART")
    ROOTFS_DEBS=$CACHE/rootfs ROOTFS_PACKAGES=$(
        IFS=,
        echo "${PACKAGES[*]}"
    ) MIRROR=$MIRROR SUITE=$SUITE "$REPO/images/rootfs.sh" "$ROOTFS_PART" "$WORK/rootfs.packages"
    ROOTFS_IMG=$ROOTFS_PART
fi
for p in "${PACKAGES[@]}"; do
    grep -q "^$p " "$WORK/rootfs.packages" || die "package $p is not in the root filesystem"
done

# --- manifest -------------------------------------------------------------------
artifact() { # path -> JSON object
    printf '{"sha256": "%s", "size": %s}' "$(sha "$1")" "$(stat -c %s "$1")"
}
{
    echo '{'
    echo '  "format": 2,'
    printf '  "kernel": {"package": "%s", "version": "%s", "release": "%s"},\n' "$KPKG" "$KVER" "$KREL"
    printf '  "rootfs": {"suite": "%s", "mirror": "%s", "requested": [%s]},\n' "$SUITE" "$MIRROR" \
        "$(printf '"%s", ' "${PACKAGES[@]}" | sed 's/, $//')"
    echo '  "packages": ['
    printf '    {"name": "%s", "version": "%s", "in": "vmlinuz, vmlinux, initramfs", "deb_sha256": "%s"}' \
        "$KPKG" "$KVER" "$(sha "$KDEB")"
    while read -r name version arch debsha; do
        printf ',\n    {"name": "%s", "version": "%s", "arch": "%s", "in": "rootfs.erofs", "deb_sha256": "%s"}' \
            "$name" "$version" "$arch" "$debsha"
    done <"$WORK/rootfs.packages"
    printf '\n  ],\n'
    printf '  "modules": [%s],\n' "$(printf '"%s", ' "${ORDER[@]}" | sed 's/, $//')"
    echo '  "artifacts": {'
    printf '    "vmlinuz": %s,\n' "$(artifact "$WORK/vmlinuz")"
    printf '    "vmlinux": %s,\n' "$(artifact "$WORK/vmlinux")"
    printf '    "initramfs.cpio.gz": %s,\n' "$(artifact "$WORK/initramfs.cpio.gz")"
    printf '    "rootfs.erofs": %s\n' "$(artifact "$ROOTFS_IMG")"
    echo '  },'
    echo '  "contents": {'
    printf '    "/init": {"sha256": "%s"},\n' "$(sha "$TREE/init")"
    printf '    "/usr/bin/capsem-agent": {"sha256": "%s"}\n' "$(sha "$TREE/usr/bin/capsem-agent")"
    echo '  },'
    printf '  "stamp": "%s"\n' "$STAMP"
    echo '}'
} >"$WORK/manifest.json"

# Replace the artifacts, stamps last, so an interrupted build is rebuilt.
# Each is copied to a temporary name in $OUT (WORK may be another file
# system) and renamed into place, so no file under $OUT is ever half-written.
rm -f "$OUT/.stamp"
if [ $REBUILD_ROOTFS = 1 ]; then
    rm -f "$OUT/.rootfs.stamp"
    mv -f "$ROOTFS_PART" "$OUT/rootfs.erofs"
    cp "$WORK/rootfs.packages" "$OUT/.rootfs.packages.part"
    mv -f "$OUT/.rootfs.packages.part" "$OUT/rootfs.packages"
    echo "$ROOTFS_STAMP" >"$OUT/.rootfs.stamp.part"
    mv -f "$OUT/.rootfs.stamp.part" "$OUT/.rootfs.stamp"
fi
echo "$STAMP" >"$WORK/.stamp"
for f in vmlinuz vmlinux initramfs.cpio.gz manifest.json .stamp; do
    cp "$WORK/$f" "$OUT/.$f.part"
    mv -f "$OUT/.$f.part" "$OUT/$f"
done
say "image ready: $OUT ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs," \
    "$(du -h --apparent-size "$OUT/rootfs.erofs" | cut -f1) rootfs.erofs, kernel $KREL)"
