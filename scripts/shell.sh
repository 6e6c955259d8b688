#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is missing, build
# capsem and the guest image, then open `capsem shell` in a temporary VM.
# Extra arguments go to `capsem shell`'s global flags (for example --vmm none).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >&2
cargo build --workspace --release --quiet
images/build.sh >&2
exec target/release/capsem "$@" shell
