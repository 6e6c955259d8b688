#!/usr/bin/env bash
# Share figures for docs/benchmarks.md: in one guest with a `rw` share at
# /work, a 256 MiB sequential write (fsync) and cold read on the share and
# on the VM's own disk (/root); then `find | wc -l` and `git status` over a
# tree of 20,000 files on the share and on a copy of it in the VM's disk;
# then the same write, read, find and git status on the host's disk.
#
# usage: images/bench-share.sh IMAGE_DIR
#   CAPSEM_BIN_DIR  where capsem is (default target/release)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMG=${1:?usage: images/bench-share.sh IMAGE_DIR}
BIN=${CAPSEM_BIN_DIR:-$REPO/target/release}/capsem
[ -x "$BIN" ] || {
    echo "bench-share.sh: $BIN is missing (cargo build --release)" >&2
    exit 1
}
WORK=$(mktemp -d /tmp/capsem-bshare.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/home" "$WORK/share/tree"
# shellcheck source=images/bench-lib.sh
. "$REPO/images/bench-lib.sh"

# 20,000 small files in 200 directories, committed to git.
(
    cd "$WORK/share/tree"
    for d in $(seq 200); do
        mkdir "d$d"
        for f in $(seq 100); do echo "$d $f" >"d$d/f$f"; done
    done
    git init -q . && git add -A && git -c user.name=b -c user.email=b@b commit -qm t
)

# In the guest; prints `name bytes milliseconds` lines (bytes 0: a count).
GUEST='
t0() { date +%s%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
for at in /work /root; do
    s=$(t0); dd if=/dev/zero of=$at/w bs=1M count=256 conv=fsync 2>/dev/null; e=$(t0)
    echo "write-fsync-$at $((256 << 20)) $(ms $s $e)"
    drop
    s=$(t0); cat $at/w > /dev/null; e=$(t0)
    echo "read-$at $((256 << 20)) $(ms $s $e)"
    rm $at/w
done
cp -a /work/tree /root/tree
git config --global --add safe.directory "*"
for at in /work/tree /root/tree; do
    # The copy'"'"'s index no longer matches its files'"'"' inodes and times: one
    # untimed status refreshes it, so both trees are measured the same way.
    (cd $at && git status --porcelain > /dev/null)
    drop
    s=$(t0); n=$(find $at | wc -l); e=$(t0)
    echo "find-wc-$at $n $(ms $s $e)"
    drop
    s=$(t0); (cd $at && git status --porcelain > /dev/null); e=$(t0)
    echo "git-status-$at 0 $(ms $s $e)"
done
'
echo "== guest ($IMG, rw share on $(df --output=source "$WORK" | tail -1))"
CAPSEM_IMAGE_DIR=$IMG "$BIN" --home "$WORK/home" --vmm qemu run -v "$WORK/share:/work" \
    -- sh -c "$GUEST" |
    while read -r name bytes m; do
        case $name in
        write* | read*) echo "$name $bytes bytes $m ms $(rate "$bytes" "$m") MB/s" ;;
        *) echo "$name $bytes entries $m ms" ;;
        esac
    done

echo "== host"
host_dd "$WORK" write-fsync-host read-direct-host
s=$(ms)
n=$(find "$WORK/share/tree" | wc -l)
echo "find-wc-host $n entries $(($(ms) - s)) ms"
s=$(ms)
(cd "$WORK/share/tree" && git status --porcelain >/dev/null)
echo "git-status-host 0 entries $(($(ms) - s)) ms"
