//! contrib/systemd's units pass `systemd-analyze verify` (the parent and an
//! instance of the template), with their binaries pointed at the ones built
//! here. Skipped, with a note, where systemd-analyze is missing.

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_units_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd_units_verify: skipped (no systemd-analyze)");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let dir = umdev_testkit::TempDir::new();
    for unit in ["umdev-vgpu-parent.service", "umdev-vgpu@.service"] {
        let text = std::fs::read_to_string(src.join(unit)).unwrap();
        let text = text
            .replace(
                "/usr/local/bin/umdev-vgpu-parent",
                env!("CARGO_BIN_EXE_umdev-vgpu-parent"),
            )
            .replace("/usr/local/bin/umdevctl", env!("CARGO_BIN_EXE_umdevctl"));
        std::fs::write(dir.path().join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("umdev-vgpu-parent.service"))
        .arg(
            dir.path()
                .join("umdev-vgpu@0b8f2a54-1c3d-4e5f-8a9b-0c1d2e3f4a5b.service"),
        )
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Anything it says about our units is a finding (not about other units).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("umdev-vgpu"))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify:\n{}",
        ours.join("\n")
    );
}
