#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, the
# fuzz targets (scripts/fuzz.sh: built, then 10 s each from their seeds, two
# at a time; $CAPSEM_FUZZ_SECONDS for longer, or `scripts/fuzz.sh 600` alone),
# unit tests, the front door (scripts/shell.sh driven through a pipe), and
# the end-to-end tests on the no-VM backend and in real VMs, then what a
# test killed for hanging left behind (scripts/leftovers.sh: a failure).
# CAPSEM_SKIP_VM_TESTS=1 leaves out everything that needs the guest image
# (a nextest filter over the `*_qemu` test binaries, which nextest then
# reports as skipped); CI runs them.
# Extra arguments go to `cargo nextest run`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
# The test tools, each only when missing.
export PATH="$HOME/.cargo/bin:$PATH"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked --quiet cargo-nextest
    echo "installed cargo-nextest (cargo)"
fi

vm=1
[ "${CAPSEM_SKIP_VM_TESTS:-0}" != 1 ] || vm=0

# Each step's header says how long the run has taken so far, so a slow CI
# run tells which step grew.
phase() { echo "== $1 (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }

phase "fmt"
cargo fmt --all -- --check
phase "clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
phase "fuzz"
scripts/fuzz.sh "${CAPSEM_FUZZ_SECONDS:-10}"
phase "build"
cargo build --workspace --quiet
if [ $vm = 1 ]; then
    phase "guest image"
    images/build.sh
fi

# The README's first command, as a user would run it but with cargo's dev
# profile (CAPSEM_PROFILE=dev: the build above, which the tests use; its
# release build would cost a cold run about 5 more minutes) and with the
# shell's input from a pipe (its EOF ends the shell like Ctrl-D), in a
# throw-away home.
# (Not anchored: bash may put a bracketed-paste escape before the output; the
# echoed command line has `$((6 * 7))`, never 42.)
phase "front door (scripts/shell.sh)"
front_home=$(mktemp -d "${TMPDIR:-/tmp}/capsem-front.XXXXXX")
trap 'rm -rf "$front_home" "${homes_before:-}"' EXIT
front_args=()
[ $vm = 1 ] || front_args=(--vmm none)
out=$(printf 'echo "front door $((6 * 7))"\nexit 3\n' |
    CAPSEM_HOME=$front_home CAPSEM_PROFILE=dev scripts/shell.sh "${front_args[@]}" 2>"$front_home/stderr") && rc=0 || rc=$?
if [ $rc != 3 ] || ! grep -q 'front door 42' <<<"$out"; then
    echo "scripts/shell.sh: expected 'front door 42' and exit 3, got exit $rc:" >&2
    printf '%s\n' "$out" >&2
    cat "$front_home/stderr" >&2
    exit 1
fi
[ -z "$(ls -A "$front_home/vms" 2>/dev/null)" ] || {
    echo "scripts/shell.sh left a VM directory behind: $(ls "$front_home/vms")" >&2
    exit 1
}
echo "scripts/shell.sh: prompt reached, 'front door 42', exit 3, nothing left"

if [ $vm = 1 ]; then
    # The disk figures' script (docs/benchmarks.md), once, so it keeps working.
    phase "disk benchmark (images/bench-disk.sh -n 1)"
    # (The debug build: the guest's disk work does not run through it.)
    CAPSEM_BIN_DIR=target/debug images/bench-disk.sh -n 1 "${CAPSEM_IMAGE_DIR:-${CAPSEM_HOME:-$HOME/.capsem}/images/default}"
fi

phase "tests"
filter=()
[ $vm = 1 ] || filter=(-E 'not binary(/_qemu$/)')
# A test that hangs is killed by nextest before its cleanup runs: after the
# run, whatever the killed tests left is stopped and removed, and counts as
# a failure (scripts/leftovers.sh).
homes_before=$(mktemp "${TMPDIR:-/tmp}/capsem-homes.XXXXXX")
scripts/leftovers.sh snapshot "$homes_before"
tests_rc=0
cargo nextest run --workspace --no-fail-fast "${filter[@]}" "$@" || tests_rc=$?
if ! scripts/leftovers.sh check "$homes_before"; then
    echo "the tests left homes or processes behind (above)" >&2
    [ $tests_rc != 0 ] || tests_rc=1
fi
[ $tests_rc = 0 ] || exit $tests_rc
phase "done"
