#!/usr/bin/env bash
# Disk figures for docs/benchmarks.md and docs/image.md: for each image
# directory, N times `capsem run -- true` (boot, one command, teardown; wall
# clock on the host), then in one guest: a cold read of every file under
# /usr (the read-only root), a cold sequential read of its largest file,
# and a 256 MiB sequential write (fsync) and cold read in /root (the
# writable layer); then the same write and read on the host's disk.
#
# usage: images/bench-disk.sh [-n N] IMAGE_DIR...
#   CAPSEM_BIN_DIR  where capsem is (default target/release)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=3
if [ "${1:-}" = -n ]; then
    N=$2
    shift 2
fi
BIN=${CAPSEM_BIN_DIR:-$REPO/target/release}/capsem
[ -x "$BIN" ] || {
    echo "bench-disk.sh: $BIN is missing (cargo build --release)" >&2
    exit 1
}
HOME_DIR=$(mktemp -d /tmp/capsem-bench.XXXXXX)
trap 'rm -rf "$HOME_DIR"' EXIT
# shellcheck source=images/bench-lib.sh
. "$REPO/images/bench-lib.sh"

# In the guest; prints `name bytes milliseconds` lines.
GUEST='
t0() { date +%s%N; }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
drop
b=$(find /usr -type f -print0 | du -cb --files0-from=- | tail -1 | cut -f1)
drop
s=$(t0); find /usr -type f -print0 | xargs -0 cat > /dev/null; e=$(t0)
echo "root-all-files $b $(( (e - s) / 1000000 ))"
big=$(find /usr -type f -printf "%s %p\n" | sort -n | tail -1 | cut -d" " -f2)
b=$(stat -c %s "$big")
drop
s=$(t0); cat "$big" > /dev/null; e=$(t0)
echo "root-largest-file $b $(( (e - s) / 1000000 ))"
s=$(t0); dd if=/dev/zero of=/root/w bs=1M count=256 conv=fsync 2>/dev/null; e=$(t0)
echo "rw-write-fsync $((256 << 20)) $(( (e - s) / 1000000 ))"
drop
s=$(t0); cat /root/w > /dev/null; e=$(t0)
echo "rw-read $((256 << 20)) $(( (e - s) / 1000000 ))"
'
for img in "$@"; do
    echo "== $img ($(du -k --apparent-size "$img/rootfs.erofs" | cut -f1) KiB rootfs," \
        "$(du -k "$img/rootfs.erofs" | cut -f1) KiB allocated)"
    runs=()
    for _ in $(seq "$N"); do
        s=$(ms)
        CAPSEM_IMAGE_DIR=$img "$BIN" --home "$HOME_DIR" --vmm qemu run -- true
        runs+=($(($(ms) - s)))
    done
    echo "run-true-ms ${runs[*]}"
    CAPSEM_IMAGE_DIR=$img "$BIN" --home "$HOME_DIR" --vmm qemu run -- sh -c "$GUEST" |
        while read -r name bytes m; do
            echo "$name $bytes bytes $m ms $(rate "$bytes" "$m") MB/s"
        done
done

echo "== host ($(df --output=source "$HOME_DIR" | tail -1))"
host_dd "$HOME_DIR" host-write-fsync host-read-direct
