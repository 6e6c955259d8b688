#!/usr/bin/env bash
# Builds every cargo-fuzz target in fuzz/ and runs each for SECONDS (default
# 60), two at a time, from its checked-in seeds (fuzz/corpus/<target>/; what
# the run finds goes to a scratch corpus, not into the repository). Prints
# one line per target (runs, coverage); fails if any target crashed, with
# the crashing input kept under fuzz/artifacts/<target>/.
# usage: scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
case $secs in '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a number, got '$secs'" >&2; exit 2 ;; esac
jobs_at_once=${CAPSEM_FUZZ_JOBS:-2}
export PATH="$HOME/.cargo/bin:$PATH"

# The tools, each only when missing.
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked --quiet cargo-fuzz
    echo "installed cargo-fuzz (cargo)"
fi

cd fuzz
if ! build_log=$(cargo +nightly fuzz build 2>&1); then
    printf '%s\n' "$build_log" >&2
    echo "fuzz.sh: cargo fuzz build failed" >&2
    exit 1
fi
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bins=target/$triple/release
mapfile -t targets < <(cargo +nightly fuzz list)
[ ${#targets[@]} -gt 0 ] || { echo "fuzz.sh: no fuzz targets" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/capsem-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# One target: libFuzzer with a scratch corpus first (new inputs go there)
# and the seeds second; its exit status in $work/<target>.rc.
run_one() {
    local t=$1
    mkdir -p "$work/$t.corpus" "artifacts/$t"
    set +e
    "$bins/$t" "$work/$t.corpus" "corpus/$t" \
        -max_total_time="$secs" -max_len=70000 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$work/$t.log" 2>&1
    echo $? >"$work/$t.rc"
}

running=0
for t in "${targets[@]}"; do
    if [ "$running" -ge "$jobs_at_once" ]; then
        wait -n || true
        running=$((running - 1))
    fi
    run_one "$t" &
    running=$((running + 1))
done
wait

failed=0
for t in "${targets[@]}"; do
    rc=$(cat "$work/$t.rc")
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log" | tail -n1)
    cov=$(grep -o 'cov: [0-9]*' "$work/$t.log" | tail -n1 | cut -d' ' -f2)
    if [ "$rc" = 0 ]; then
        echo "fuzz $t: ok, ${runs:-?} runs in ${secs}s, coverage ${cov:-?}"
    else
        failed=1
        crash=$(ls -t "artifacts/$t/" 2>/dev/null | head -n1)
        echo "fuzz $t: FAILED (exit $rc) after ${runs:-?} runs; input: fuzz/artifacts/$t/${crash:-?}"
        grep -m1 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$work/$t.log" | sed 's/^/    /' || true
    fi
done
exit $failed
