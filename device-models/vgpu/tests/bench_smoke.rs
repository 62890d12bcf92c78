//! `umdev-vgpu-bench --quick` against the real `umdev-vgpu`, and
//! `umdev-vgpu-sched-bench --quick` (in process and through the real
//! `umdev-vgpu-parent`): each must complete and print every figure. No
//! timing is checked (the figures belong in docs/performance.md, not in
//! assertions).

use std::process::Command;

#[test]
fn quick_run_prints_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_umdev-vgpu-bench"))
        .arg("--quick")
        .arg("--server-bin")
        .arg(env!("CARGO_BIN_EXE_umdev-vgpu"))
        .output()
        .expect("run umdev-vgpu-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "umdev-vgpu-bench failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for figure in [
        "submission-to-fence latency:",
        "shadowed PTE updates at a sync point:",
        "BLIT ",
        "COPY ",
        "migration downtime:",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_else(|| panic!("no {figure:?} line:\n{stdout}"));
        assert!(line.contains("ratio "), "no ratio in {line:?}");
    }
}

#[test]
fn scheduler_bench_quick_run_prints_every_figure() {
    let out = Command::new(env!("CARGO_BIN_EXE_umdev-vgpu-sched-bench"))
        .arg("--quick")
        .arg("--parent-bin")
        .arg(env!("CARGO_BIN_EXE_umdev-vgpu-parent"))
        .output()
        .expect("run umdev-vgpu-sched-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "umdev-vgpu-sched-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "engine shares, weights 1:1:",
        "engine shares, weights 1:3:",
        "light submission-to-fence latency next to a flood:",
        "through the parent: engine shares, weights 1:1:",
        "through the parent: engine shares, weights 1:3:",
        "through the parent: light submission-to-fence latency next to a flood:",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(figure))
            .unwrap_or_else(|| panic!("no {figure:?} line:\n{stdout}"));
        assert!(line.contains("ratio "), "no ratio in {line:?}");
    }
}
