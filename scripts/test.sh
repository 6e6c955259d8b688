#!/usr/bin/env bash
# The whole test suite: installs what it needs, then formatting, lints, unit
# tests, end-to-end tests on the no-VM backend and in real VMs.
# CAPSEM_SKIP_VM_TESTS=1 skips the real-VM tests for a quick local run; CI
# runs them.
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

echo "== fmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== build"
cargo build --workspace --quiet
if [ "${CAPSEM_SKIP_VM_TESTS:-0}" != 1 ]; then
    echo "== guest image"
    images/build.sh
fi
echo "== tests"
cargo nextest run --workspace --no-fail-fast "$@"
