#!/usr/bin/env bash
# What the end-to-end tests left behind. Each test's home is a
# /tmp/capsem-t* directory (tests/src/fixture.rs) that the test removes when
# it ends, pass or fail; a test that nextest killed for hanging never gets
# to, and its persistent VM (capsem-process, QEMU, vhost-device-vsock,
# virtiofsd, an agent) would go on running.
#
#   leftovers.sh snapshot FILE   records the homes there are now
#   leftovers.sh check FILE      for every home made since and still there:
#                                kills each process that names it, removes
#                                it, says so; exits 1 if there was any
set -euo pipefail

homes() { find /tmp -maxdepth 1 -name 'capsem-t*' -type d 2>/dev/null | sort; }

# Process $1's command line, if it names home $2 (capsem-process
# --vm-dir, the agent's --transport, QEMU's and the devices' sockets all do).
names_home() {
    local line
    line=$(tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null) || return 1
    case $line in *"$2/"*) echo "$line" ;; *) return 1 ;; esac
}

# The pids whose command line names home $1.
naming() {
    local f pid
    for f in /proc/[0-9]*/cmdline; do
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        [ "$pid" != $$ ] || continue
        if names_home "$pid" "$1" >/dev/null; then
            echo "$pid"
        fi
    done
}

case "${1:-}" in
snapshot)
    homes >"$2"
    ;;
check)
    found=0
    while read -r home; do
        [ -n "$home" ] || continue
        found=1
        pids=$(naming "$home" | tr "\n" " ")
        echo "leftovers: $home was not removed by its test; processes: ${pids:-none}" >&2
        for pid in $pids; do
            # Still the same process (its pid not reused since the listing)?
            line=$(names_home "$pid" "$home") || continue
            echo "leftovers:   $pid ${line:0:160}" >&2
            kill -KILL "$pid" 2>/dev/null || true
        done
        # Killed processes go once their parent (or init) reaps them.
        for _ in $(seq 100); do
            [ -n "$(naming "$home")" ] || break
            sleep 0.1
        done
        rm -rf "$home"
    done < <(comm -13 "$2" <(homes))
    exit $found
    ;;
*)
    echo "usage: $0 snapshot FILE | check FILE" >&2
    exit 2
    ;;
esac
