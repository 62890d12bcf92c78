//! contrib/systemd's units pass `systemd-analyze verify` (the parent and an
//! instance of the template), with their binaries pointed at the ones built
//! here (skipped, with a note, where systemd-analyze is missing), and their
//! commands do what the units say when run as systemd would run them.

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

/// The units' commands as systemd would run them (no systemd needed): the
/// parent's ExecStart under a NOTIFY_SOCKET, then the template's
/// ExecStartPre/ExecStart for an instance (made, persistent), the same again
/// over a definition left behind (replaced, not an error), its ExecStop
/// (removed with its definition), and ExecStop once the parent is gone (its
/// failure ignored by the `-` prefix).
#[test]
fn unit_commands_make_and_remove_an_instance() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let dir = umdev_testkit::TempDir::new();
    let state = dir.path().join("run");
    let config = dir.path().join("instances.json");
    let uuid = "0b8f2a54-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
    // The unit's paths, pointed here.
    let local = |line: &str| {
        line.replace(
            "/usr/local/bin/umdev-vgpu-parent",
            env!("CARGO_BIN_EXE_umdev-vgpu-parent"),
        )
        .replace("/usr/local/bin/umdevctl", env!("CARGO_BIN_EXE_umdevctl"))
        .replace("/run/umdev-vgpu", state.to_str().unwrap())
        .replace(
            "/var/lib/umdev-vgpu/instances.json",
            config.to_str().unwrap(),
        )
    };
    let unit = |name: &str| std::fs::read_to_string(src.join(name)).unwrap();
    let values = |text: &str, key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect()
    };
    let template = unit("umdev-vgpu@.service");
    let env: Vec<(String, String)> = values(&template, "Environment")
        .iter()
        .flat_map(|l| l.split_whitespace())
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // One Exec line: (failure ignored, argv), %i and ${VAR} expanded.
    let exec = |line: &str| -> (bool, Vec<String>) {
        let (ignore, line) = match line.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut line = local(line).replace("%i", uuid);
        for (k, v) in &env {
            line = line.replace(&format!("${{{k}}}"), v);
        }
        (ignore, line.split_whitespace().map(str::to_owned).collect())
    };
    let run = |key: &str| {
        for line in values(&template, key) {
            let (ignore, argv) = exec(&line);
            let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
            assert!(
                ignore || out.status.success(),
                "{key} {argv:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };

    let notify = dir.path().join("notify");
    let ready = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    ready
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let parent_unit = unit("umdev-vgpu-parent.service");
    let (_, argv) = exec(&values(&parent_unit, "ExecStart")[0]);
    let mut parent = KillOnDrop(
        Command::new(&argv[0])
            .args(&argv[1..])
            .env("NOTIFY_SOCKET", &notify)
            .stderr(std::fs::File::create(dir.path().join("parent.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 32];
    let n = ready.recv(&mut buf).expect("the parent's READY=1");
    assert_eq!(&buf[..n], b"READY=1");

    let socket = state.join(format!("{uuid}.sock"));
    let defined = || {
        std::fs::read_to_string(&config)
            .unwrap_or_default()
            .contains(uuid)
    };
    for _ in 0..2 {
        run("ExecStartPre");
        run("ExecStart");
        assert!(socket.exists() && defined());
    }
    run("ExecStop");
    assert!(!socket.exists() && !defined());
    parent.0.kill().unwrap();
    parent.0.wait().unwrap();
    run("ExecStop");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
