#!/usr/bin/env bash
# A CAPSEM_QEMU_BIN for boot experiments (docs/benchmarks.md): runs Debian's
# QEMU with capsem-process's arguments, changed by the environment:
#   CAPSEM_TWEAK_APPEND  words added to the kernel command line (-append)
#   CAPSEM_TWEAK_SMP     the -smp value instead of capsem's
#   CAPSEM_TWEAK_CPU     the -cpu model instead of capsem's
#   CAPSEM_TWEAK_MACHINE options added to -M's (e.g. acpi=off)
# e.g. CAPSEM_QEMU_BIN=$PWD/scripts/qemu-tweak.sh CAPSEM_TWEAK_SMP=1 \
#        target/release/capsem-bench --vmm qemu run
set -euo pipefail
args=()
prev=
for a in "$@"; do
    case $prev in
    -append) a="$a ${CAPSEM_TWEAK_APPEND:-}" ;;
    -smp) a=${CAPSEM_TWEAK_SMP:-$a} ;;
    -cpu) a=${CAPSEM_TWEAK_CPU:-$a} ;;
    -M) a="$a${CAPSEM_TWEAK_MACHINE:+,$CAPSEM_TWEAK_MACHINE}" ;;
    esac
    args+=("$a")
    prev=$a
done
exec /usr/bin/qemu-system-x86_64 "${args[@]}"
