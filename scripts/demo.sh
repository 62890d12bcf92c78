#!/usr/bin/env bash
# The main job: set up (first time only), start umdev-edu, boot a Linux guest under
# QEMU with the device attached through vfio-user-pci, and print what the guest saw.
#
# Usage: scripts/demo.sh [--plain-memory]
#   --plain-memory   guest RAM without an fd: the device reaches it only through
#                    DMA_READ/DMA_WRITE messages (default: shared memfd RAM)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"

MEMFD=--memfd
[ "${1:-}" = "--plain-memory" ] && MEMFD=

echo "== set-up (cached after the first run)"
scripts/setup-e2e.sh --quiet
echo "== building umdev"
cargo build --workspace --quiet

OUT=$REPO/target/e2e
mkdir -p "$OUT"
SOCK=$(mktemp -d)/edu.sock
RUST_LOG=${RUST_LOG:-info} target/debug/umdev-edu --socket-path "$SOCK" 2>"$OUT/demo-backend.log" &
BACKEND=$!
trap 'kill $BACKEND 2>/dev/null; wait $BACKEND 2>/dev/null; rm -rf "$(dirname "$SOCK")"' EXIT
for _ in $(seq 100); do [ -S "$SOCK" ] && break; sleep 0.05; done
[ -S "$SOCK" ] || { echo "umdev-edu did not start:"; cat "$OUT/demo-backend.log"; exit 1; }

echo "== umdev-edu serving $SOCK; booting the guest (TCG)"
echo "   qemu-system-x86_64 ... ${MEMFD:+-object memory-backend-memfd,id=mem,size=256M,share=on -machine q35,memory-backend=mem} \\"
echo "     -device '{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$SOCK\",\"type\":\"unix\"}}'"
status=0
scripts/run-guest.sh $MEMFD --quiet --log "$OUT/demo.log" -- \
    -device "{\"driver\":\"vfio-user-pci\",\"socket\":{\"path\":\"$SOCK\",\"type\":\"unix\"}}" || status=$?
echo "== what the guest saw (serial console: $OUT/demo.log)"
grep -E '^(PASS|FAIL|DONE|INFO)' "$OUT/demo.log" | tr -d '\r' || true
echo "== backend log: $OUT/demo-backend.log"
exit $status
