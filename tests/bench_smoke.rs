//! `umdev-bench --quick` against the real `umdev-edu`: it must complete and print
//! every figure. No timing is checked (CI machines are noisy; the figures belong
//! in docs/performance.md, not in assertions).

use umdev_testkit as common;

use std::process::Command;

use common::workspace_bin;

/// The first CPU this process may run on, from /proc/self/status.
fn allowed_cpu() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))?;
    let first = list.trim().split([',', '-']).next()?;
    first.parse().ok()
}

/// Runs the benchmark, which must succeed; its stdout and stderr.
fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().expect("run umdev-bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "umdev-bench failed: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

#[test]
fn quick_run_against_edu_prints_every_figure() {
    let bench = workspace_bin("umdev-bench");
    let edu = workspace_bin("umdev-edu");
    let mut cmd = Command::new(&bench);
    cmd.arg("--quick").arg("--server-bin").arg(&edu);
    // Exercise the pinning of client, server and floor echo.
    if let Some(cpu) = allowed_cpu() {
        cmd.arg("--pin").arg(cpu.to_string());
    }
    let (stdout, stderr) = run_ok(&mut cmd);
    let figures = [
        "REGION_READ 4 B config space",
        "REGION_READ 8 B config space",
        "REGION_READ 4 B BAR0",
        "REGION_READ 8 B BAR0",
        "REGION_WRITE 4 B config space",
        "REGION_WRITE 8 B config space",
        "REGION_WRITE 4 B BAR0",
        "REGION_WRITE 8 B BAR0",
        "posted REGION_WRITE 4 B BAR0",
        "posted REGION_WRITE_MULTI",
        "DMA_MAP+DMA_UNMAP, 1 regions mapped",
        "DMA_MAP+DMA_UNMAP, 1000 regions mapped",
        "DMA_MAP+DMA_UNMAP, 10000 regions mapped",
        "DMA_READ (edu RAM to device) 4 KiB",
        "DMA_READ (edu RAM to device) 1 MiB",
        "DMA_WRITE (edu device to RAM) 4 KiB",
        "DMA_WRITE (edu device to RAM) 1 MiB",
    ];
    for name in figures {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no line for {name:?}\n{stdout}\n{stderr}"));
        // A figure line has a rate for the server, one for the floor, a ratio.
        assert!(
            line.contains("/s") && !line.contains("failed"),
            "figure {name:?} not measured: {line}\n{stderr}"
        );
    }
    assert!(stdout.contains("map+unmap at 10000 regions:"), "{stdout}");
    assert!(!stdout.contains("figures failed"), "{stdout}\n{stderr}");
}

#[test]
fn floor_echo_with_idle_threads_runs() {
    let bench = workspace_bin("umdev-bench");
    let edu = workspace_bin("umdev-edu");
    let (stdout, stderr) = run_ok(
        Command::new(&bench)
            .args(["--quick", "--no-dma-engine", "--regions", "1"])
            .args(["--only", "REGION_READ 4 B config space @0x0"])
            .args(["--floor-echo-threads", "2"])
            .arg("--server-bin")
            .arg(&edu),
    );
    assert!(
        stdout.contains("echo process with 2 idle threads"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("REGION_READ 4 B config space @0x0 "))
        .unwrap_or_else(|| panic!("no figure\n{stdout}\n{stderr}"));
    assert!(line.contains("/s"), "{line}\n{stderr}");
}
