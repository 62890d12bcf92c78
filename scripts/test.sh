#!/usr/bin/env bash
# The project's test command: formatting, lints, unit and integration tests over
# real sockets, and the end-to-end tests that boot a Linux guest under QEMU.
# Installs what it needs on first use (a private QEMU and guest kernel, cached).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

echo "== e2e set-up (cached)"
scripts/setup-e2e.sh --quiet
scripts/setup-kbuild.sh --quiet
scripts/setup-vnc-viewer.sh --quiet
echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd tests/guest-driver && cargo fmt -- --check)
(cd device-models/vgpu/guest/demo && cargo fmt -- --check)
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd device-models/vgpu/guest/demo &&
    cargo clippy --all-targets --target-dir "$REPO/target/guest-demo" -- -D warnings)
echo "== build"
cargo build --workspace
echo "== tests"
(cd tests/guest-driver && cargo test --quiet --target-dir "$REPO/target/guest-driver")
(cd device-models/vgpu/guest/demo && cargo test --quiet --target-dir "$REPO/target/guest-demo")
UMDEV_E2E=1 cargo test --workspace
echo "== fuzz: every target for ${UMDEV_FUZZ_SECONDS:-10}s (libFuzzer on stable, fixed seed)"
FUZZ_SEED=1 fuzz/run.sh "${UMDEV_FUZZ_SECONDS:-10}"
