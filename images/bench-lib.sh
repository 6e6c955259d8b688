# Shared by images/bench-disk.sh and images/bench-share.sh (sourced, not run).

# Milliseconds since the epoch.
ms() { echo $(($(date +%s%N) / 1000000)); }
rate() { # bytes ms -> MB/s
    awk -v b="$1" -v m="$2" 'BEGIN { if (m == 0) m = 1; printf "%.1f", b / 1e6 / (m / 1000) }'
}
# The host's side of the comparison: a 256 MiB write with fsync and a
# direct (uncached) read of it in DIR, one `LABEL bytes bytes ms ms MB/s`
# line each under the given labels.
host_dd() { # DIR WRITE_LABEL READ_LABEL
    local s m bytes=$((256 << 20))
    s=$(ms)
    dd if=/dev/zero of="$1/w" bs=1M count=256 conv=fsync 2>/dev/null
    m=$(($(ms) - s))
    echo "$2 $bytes bytes $m ms $(rate $bytes "$m") MB/s"
    s=$(ms)
    dd if="$1/w" of=/dev/null bs=1M iflag=direct 2>/dev/null
    m=$(($(ms) - s))
    echo "$3 $bytes bytes $m ms $(rate $bytes "$m") MB/s"
}
