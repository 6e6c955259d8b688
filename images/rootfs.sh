#!/usr/bin/env bash
# Builds the guest's read-only root filesystem: Debian from images/packages.txt
# installed by mmdebstrap into a scratch directory, a few capsem settings
# (hostname, root's prompt), then packed with mkfs.erofs (docs/image.md).
# Called by images/build.sh, which decides when it is needed.
#
# usage: images/rootfs.sh IMAGE PACKAGES_OUT
#   IMAGE         the erofs image to write (written in place: the caller
#                 passes a temporary name and renames it)
#   PACKAGES_OUT  one line per installed package: name version arch sha256-of-.deb
# environment (set by build.sh):
#   ROOTFS_DEBS   the .deb cache; filled by rename, reused on the next build
#   ROOTFS_PACKAGES  comma-separated packages to include
#   MIRROR SUITE  the Debian archive and suite
set -euo pipefail

IMAGE=$1
PKG_OUT=$2
: "${ROOTFS_DEBS:?}" "${ROOTFS_PACKAGES:?}" "${MIRROR:?}" "${SUITE:?}"
SECURITY=${CAPSEM_DEBIAN_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}

say() { echo "rootfs.sh: $*" >&2; }
die() {
    echo "rootfs.sh: error: $*" >&2
    exit 1
}
# mmdebstrap --mode=root: the files get their packages' owners, which erofs
# keeps; the other modes would record the build user's subordinate ids.
[ "$(id -u)" -eq 0 ] || die "building the root filesystem needs root (mmdebstrap --mode=root)"

mkdir -p "$ROOTFS_DEBS"
CACHE_PARENT=$(dirname "$ROOTFS_DEBS")
# The tree, and the .debs mmdebstrap used, land in scratch directories; the
# .debs beside the cache so that each enters it by one rename.
TREE=$(mktemp -d "${TMPDIR:-/tmp}/capsem-rootfs.XXXXXX")
SYNC=$(mktemp -d "$CACHE_PARENT/.rootfs-sync.XXXXXX")
trap 'rm -rf "$TREE" "$SYNC"' EXIT

say "mmdebstrap $SUITE: $ROOTFS_PACKAGES"
# --skip=download/empty and essential/unlink keep the .debs in the chroot's
# archive directory, filled from the cache first and copied out after
# (mmdebstrap's documented cache idiom). Documentation other than copyright
# files is left out: it is a third of the size and nobody reads it here.
mmdebstrap --quiet --variant=apt --mode=root --format=directory \
    --include="$ROOTFS_PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --skip=download/empty --skip=essential/unlink \
    --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
    --setup-hook="sync-in '$ROOTFS_DEBS' /var/cache/apt/archives/" \
    --customize-hook="sync-out /var/cache/apt/archives '$SYNC'" \
    "$SUITE" "$TREE/root" \
    "deb $MIRROR $SUITE main" \
    "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY $SUITE-security main" >&2 ||
    die "mmdebstrap failed"
R=$TREE/root

# Into the cache, one rename each (a .deb already there is the same file:
# apt checked its hash against the index before using it).
for deb in "$SYNC"/*.deb; do
    [ -f "$deb" ] || continue
    mv -f "$deb" "$ROOTFS_DEBS/$(basename "$deb")"
done

# What capsem's shell prompt and tests expect (the same as the old
# initramfs root): hostname capsem, root's prompt `\u@\h:\w\$ `. capsem-init
# sets the running hostname from the kernel command line.
echo capsem >"$R/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tcapsem\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"
cat >"$R/root/.bashrc" <<'BASHRC'
# bash -i reads ~/.bashrc: a prompt that says who and where, like a distro's.
PS1='\u@\h:\w\$ '
BASHRC
# Mount points capsem-init uses after the switch (Debian has them; made sure).
mkdir -p "$R"/{proc,sys,dev,run,tmp,root}
chmod 1777 "$R/tmp"
chmod 0700 "$R/root"

# Every package with its version, and the sha256 of the .deb it came from.
dpkg-query --admindir="$R/var/lib/dpkg" -W -f='${Package} ${Version} ${Architecture}\n' |
    LC_ALL=C sort | while read -r name version arch; do
    deb="$ROOTFS_DEBS/${name}_${version//:/%3a}_${arch}.deb"
    if [ -f "$deb" ]; then
        echo "$name $version $arch $(sha256sum "$deb" | cut -d' ' -f1)"
    else
        echo "$name $version $arch -"
    fi
done >"$PKG_OUT"

say "mkfs.erofs ($(du -sh "$R" | cut -f1) tree)"
# lz4hc: see docs/image.md for the measurements behind the choice.
mkfs.erofs --quiet -zlz4hc "$IMAGE" "$R" >&2 || die "mkfs.erofs failed"
