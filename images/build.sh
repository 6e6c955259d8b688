#!/usr/bin/env bash
# Builds the default capsem guest image without Docker:
#   vmlinuz            Debian's linux-image-*-amd64 kernel (apt-get download, not installed)
#   initramfs.cpio.gz  /init = capsem-init, capsem-agent, busybox, bash, vsock modules
#   manifest.json      package names and versions, sha256 of every artifact
#
# usage: images/build.sh [OUT_DIR]
#   OUT_DIR  default $CAPSEM_IMAGE_DIR, else ${CAPSEM_HOME:-~/.capsem}/images/default
#   CAPSEM_CACHE  where downloaded .debs are kept (default ~/.cache/capsem)
#
# Rerunning with the same inputs (package versions, host bash, agent/init
# binaries, this script) prints "image up to date" and changes nothing.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${CAPSEM_IMAGE_DIR:-${CAPSEM_HOME:-$HOME/.capsem}/images/default}}
CACHE=${CAPSEM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/capsem}/debs
TARGET=x86_64-unknown-linux-gnu
# Modules the guest needs; their dependencies are added in load order.
# virtio_pci for -M q35/pc, virtio_mmio for -M microvm, then vsock over virtio.
ROOT_MODULES=(virtio_pci virtio_mmio vmw_vsock_virtio_transport)

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

for bin in apt-get apt-cache dpkg-deb dpkg-query cpio gzip cargo sha256sum; do
    command -v "$bin" >/dev/null || die "$bin is missing (run scripts/install-deps.sh)"
done

# --- inputs -----------------------------------------------------------------
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1)
[ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 to a kernel package (apt-get update?)"
KVER=$(candidate "$KPKG")
BBVER=$(candidate busybox-static)
[ -n "$KVER" ] && [ "$KVER" != "(none)" ] || die "no candidate for $KPKG"
[ -n "$BBVER" ] && [ "$BBVER" != "(none)" ] || die "no candidate for busybox-static"

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
BBDEB=$(fetch busybox-static "$BBVER")

# bash and its shared libraries come from the host (Debian 12 as well): the
# same files dpkg installed, recorded with their package versions.
BASH_BIN=$(readlink -f /bin/bash)
mapfile -t BASH_LIBS < <(ldd "$BASH_BIN" | awk '/=>/ { print $3 } /^\t\/lib/ { print $1 }' | sort -u)
[ ${#BASH_LIBS[@]} -gt 0 ] || die "cannot list bash's libraries"
# dpkg may have registered a file under /bin or /lib rather than /usr (usrmerge).
owner() {
    local p
    for p in "$1" "${1#/usr}" "/usr$1"; do
        dpkg-query -S "$p" 2>/dev/null | head -n1 | cut -d: -f1 && return 0
    done
    die "no package owns $1"
}
HOST_PKGS=$(for f in "$BASH_BIN" "${BASH_LIBS[@]}"; do owner "$f"; done | sort -u |
    while read -r p; do dpkg-query -W -f='${Package} ${Version}\n' "$p"; done)

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

STAMP_INPUT=$(
    echo "kernel $KPKG $KVER $(sha "$KDEB")"
    echo "busybox-static $BBVER $(sha "$BBDEB")"
    echo "$HOST_PKGS"
    for f in "$BASH_BIN" "${BASH_LIBS[@]}"; do echo "$f $(sha "$f")"; done
    echo "capsem-agent $(sha "$BIN_DIR/capsem-agent")"
    echo "capsem-init $(sha "$BIN_DIR/capsem-init")"
    echo "build.sh $(sha "${BASH_SOURCE[0]}")"
    echo "modules ${ROOT_MODULES[*]}"
)
STAMP=$(printf '%s\n' "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$STAMP" ] &&
    [ -f "$OUT/vmlinuz" ] && [ -f "$OUT/initramfs.cpio.gz" ] && [ -f "$OUT/manifest.json" ]; then
    say "image up to date: $OUT"
    exit 0
fi

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

# Usr-merged layout, as Debian 12.
mkdir -p "$TREE"/usr/{bin,sbin,lib,lib64} "$TREE"/{etc/capsem,root,tmp,proc,sys,dev,run}
for d in bin sbin lib lib64; do ln -s "usr/$d" "$TREE/$d"; done
chmod 0700 "$TREE/root"
chmod 1777 "$TREE/tmp"

install -m 0755 "$BIN_DIR/capsem-init" "$TREE/init"
install -m 0755 "$BIN_DIR/capsem-agent" "$TREE/usr/bin/capsem-agent"

# busybox and one symlink per applet (never over a real file such as bash).
dpkg-deb --fsys-tarfile "$BBDEB" | tar -x -O ./bin/busybox >"$TREE/usr/bin/busybox"
chmod 0755 "$TREE/usr/bin/busybox"
"$TREE/usr/bin/busybox" --list-full | while read -r applet; do
    [ -e "$TREE/$applet" ] || [ -L "$TREE/$applet" ] || ln -s /usr/bin/busybox "$TREE/$applet"
done

# bash, its libraries (dereferenced), and sh -> bash as on most systems' users expect.
install -m 0755 "$BASH_BIN" "$TREE/usr/bin/bash"
for lib in "${BASH_LIBS[@]}"; do
    mkdir -p "$TREE/$(dirname "$lib")"
    cp -L "$lib" "$TREE/$lib"
done
ln -sf bash "$TREE/usr/bin/sh"

# Kernel modules: resolve dependencies from each .ko's modinfo "depends=",
# emit in load order, decompress (the init loads them with finit_module, flags 0).
declare -A MODPATH=() SEEN=()
while IFS= read -r -d '' ko; do
    name=$(basename "$ko")
    name=${name%%.ko*}
    MODPATH[${name//-/_}]=$ko
done < <(find "$MODDIR/kernel" -name '*.ko*' -print0)
BUILTIN=$(sed 's#.*/##; s#\.ko.*##; s#-#_#g' "$MODDIR/modules.builtin")
ORDER=()
add_module() {
    local m=$1 deps d
    [ -z "${SEEN[$m]:-}" ] || return 0
    SEEN[$m]=1
    if grep -qx "$m" <<<"$BUILTIN"; then return 0; fi
    [ -n "${MODPATH[$m]:-}" ] || die "module $m not found in $KPKG"
    deps=$(decompress "${MODPATH[$m]}" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1)
    for d in ${deps//,/ }; do add_module "${d//-/_}"; done
    ORDER+=("$m")
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
for m in "${ROOT_MODULES[@]}"; do add_module "$m"; done
: >"$TREE/etc/capsem/modules"
echo "# load order (dependencies first), written by images/build.sh" >>"$TREE/etc/capsem/modules"
for m in "${ORDER[@]}"; do
    rel=${MODPATH[$m]#"$KX"}
    rel=${rel%.ko*}.ko
    mkdir -p "$TREE/$(dirname "$rel")"
    decompress "${MODPATH[$m]}" >"$TREE/$rel"
    echo "$rel" >>"$TREE/etc/capsem/modules"
done

cat >"$TREE/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/bin/bash
PASSWD
cat >"$TREE/etc/group" <<'GROUP'
root:x:0:
tty:x:5:
GROUP
# bash -i reads ~/.bashrc: a prompt that says who and where, like a distro's.
cat >"$TREE/root/.bashrc" <<'BASHRC'
PS1='\u@\h:\w\$ '
BASHRC
echo "passwd: files" >"$TREE/etc/nsswitch.conf"
echo "group: files" >>"$TREE/etc/nsswitch.conf"

say "packing initramfs (${#ORDER[@]} modules: ${ORDER[*]})"
(cd "$TREE" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) | gzip -n -6 >"$WORK/initramfs.cpio.gz"
cp "$KX/boot/vmlinuz-$KREL" "$WORK/vmlinuz"

# --- manifest -------------------------------------------------------------------
artifact() { # name -> JSON object
    printf '{"sha256": "%s", "size": %s}' "$(sha "$WORK/$1")" "$(stat -c %s "$WORK/$1")"
}
{
    echo '{'
    echo '  "format": 1,'
    printf '  "kernel": {"package": "%s", "version": "%s", "release": "%s"},\n' "$KPKG" "$KVER" "$KREL"
    echo '  "packages": ['
    printf '    {"name": "%s", "version": "%s", "from": "apt-get download"},\n' "$KPKG" "$KVER"
    printf '    {"name": "busybox-static", "version": "%s", "from": "apt-get download"}' "$BBVER"
    while read -r p v; do printf ',\n    {"name": "%s", "version": "%s", "from": "host"}' "$p" "$v"; done <<<"$HOST_PKGS"
    printf '\n  ],\n'
    printf '  "modules": [%s],\n' "$(printf '"%s", ' "${ORDER[@]}" | sed 's/, $//')"
    echo '  "artifacts": {'
    printf '    "vmlinuz": %s,\n' "$(artifact vmlinuz)"
    printf '    "initramfs.cpio.gz": %s\n' "$(artifact initramfs.cpio.gz)"
    echo '  },'
    echo '  "contents": {'
    printf '    "/init": {"sha256": "%s"},\n' "$(sha "$TREE/init")"
    printf '    "/usr/bin/capsem-agent": {"sha256": "%s"},\n' "$(sha "$TREE/usr/bin/capsem-agent")"
    printf '    "/usr/bin/busybox": {"sha256": "%s"},\n' "$(sha "$TREE/usr/bin/busybox")"
    printf '    "/usr/bin/bash": {"sha256": "%s"}\n' "$(sha "$TREE/usr/bin/bash")"
    echo '  },'
    printf '  "stamp": "%s"\n' "$STAMP"
    echo '}'
} >"$WORK/manifest.json"

# Replace the artifacts, stamp last, so an interrupted build is rebuilt.
# Each is copied to a temporary name in $OUT (WORK may be another file
# system) and renamed into place, so no file under $OUT is ever half-written.
rm -f "$OUT/.stamp"
echo "$STAMP" >"$WORK/.stamp"
for f in vmlinuz initramfs.cpio.gz manifest.json .stamp; do
    cp "$WORK/$f" "$OUT/.$f.part"
    mv -f "$OUT/.$f.part" "$OUT/$f"
done
say "image ready: $OUT ($(du -h "$OUT/initramfs.cpio.gz" | cut -f1) initramfs, kernel $KREL)"
