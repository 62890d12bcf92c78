#!/usr/bin/env bash
# Runs the libFuzzer targets on stable Rust (cargo-fuzz with --sanitizer none).
#
#   fuzz/run.sh [SECONDS [TARGET...]]   fuzz each target for SECONDS (default 60)
#
# New inputs go to fuzz/target/work-corpus/<target> (not committed); the
# committed seeds in fuzz/corpus/<target> and the crash regressions in
# fuzz/regressions/<target> are read too. A crash, hang (-timeout) or OOM
# (-rss_limit_mb) leaves its input in fuzz/artifacts/<target>/ and fails the run:
# copy it to fuzz/regressions/<target>/ once fixed, and `cargo test --test
# fuzz_corpus` replays it from then on. Installs cargo-fuzz if it is missing.
# FUZZ_SEED=N fixes libFuzzer's seed (CI does, so a run can be repeated).
set -euo pipefail
FUZZ=$(cd "$(dirname "$0")" && pwd)
cd "$FUZZ"
SECONDS_EACH=${1:-60}
shift || true
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(vfio_user_session vfio_user_messages pci_config vgpu_page_tables vgpu_audit virtio_gpu device_state migration_stream vnc_viewer metrics_request vgpu_control)
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cargo fuzz build --sanitizer none -O --debug-assertions
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
for t in "${TARGETS[@]}"; do
    work="$FUZZ/target/work-corpus/$t"
    mkdir -p "$work" "$FUZZ/artifacts/$t" "$FUZZ/regressions/$t"
    echo "== $t: ${SECONDS_EACH}s"
    log="$FUZZ/target/$t.log"
    status=0
    "$FUZZ/target/$TRIPLE/release/$t" "$work" "$FUZZ/corpus/$t" "$FUZZ/regressions/$t" \
        -artifact_prefix="$FUZZ/artifacts/$t/" -max_total_time="$SECONDS_EACH" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 ${FUZZ_SEED:+-seed="$FUZZ_SEED"} \
        >"$log" 2>&1 || status=$?
    grep -E '^(stat::|Done|==[0-9]+==|SUMMARY)|INITED|DONE|panicked' "$log" || true
    if [ "$status" -ne 0 ] || [ -n "$(ls -A "$FUZZ/artifacts/$t")" ]; then
        tail -40 "$log" >&2
        echo "!! $t failed (status $status); inputs in fuzz/artifacts/$t" >&2
        exit 1
    fi
done
