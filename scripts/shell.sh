#!/usr/bin/env bash
# The main job on a fresh Debian machine: install what is missing, build
# capsem and the guest image, then open `capsem shell` in a temporary VM.
# Extra arguments go to `capsem shell`'s global flags (for example --vmm none).
# $CAPSEM_PROFILE picks cargo's profile (default release); the test suite
# runs this with `dev`, reusing the build its tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${CAPSEM_PROFILE:-release}
case $profile in
release) dir=release ;;
dev) dir=debug ;;
*) echo "shell.sh: CAPSEM_PROFILE must be release or dev, got '$profile'" >&2; exit 2 ;;
esac
scripts/install-deps.sh >&2
cargo build --workspace --profile "$profile" --quiet
images/build.sh >&2
exec "target/$dir/capsem" "$@" shell
