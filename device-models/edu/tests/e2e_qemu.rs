//! End-to-end tests: a Linux guest under QEMU (TCG) drives the edu device from
//! userspace (tests/guest-driver), once with QEMU's built-in `-device edu` as
//! the reference and once with `umdev-edu` behind `vfio-user-pci`; the
//! `PASS`/`FAIL` lines of the runs must be identical.
//!
//! Needs the private QEMU, guest kernel and busybox from `scripts/setup-e2e.sh`.
//! Without them every test prints "skipped: run scripts/setup-e2e.sh" and
//! passes, unless `UMDEV_E2E=1`, which turns a missing set-up into a failure.
//!
//! Environment:
//!   `UMDEV_E2E=1`               fail (not skip) when the set-up is missing
//!   `UMDEV_CACHE`               setup-e2e.sh's cache (default ~/.cache/umdev)
//!   `UMDEV_QEMU`, `UMDEV_KERNEL` other QEMU / guest kernel (as run-guest.sh)
//!   `UMDEV_E2E_BACKEND`         umdev-edu binary to use (default: target/<profile>/umdev-edu,
//!                               built with `cargo build -p umdev-edu` first)
//!   `UMDEV_E2E_BACKEND_ARGS`    extra arguments for it, split at whitespace
//!   `UMDEV_E2E_RUST_LOG`        its RUST_LOG (default debug)
//!   `UMDEV_E2E_TIMEOUT`         seconds one guest may run (default 120)
//!
//! Output of each test goes to `target/e2e/tests/<test>/`; on failure the guest
//! serial log, QEMU's log and the backend's log are printed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::Duration;

use common::e2e::{
    check_results, env, note, run_guest, signal, socket_path, test_dir, workspace_binary, Backend,
    Diag, Env, Guest, GuestOpts, Qmp,
};
use umdev_testkit as common;

/// The umdev-edu binary (`UMDEV_E2E_BACKEND`, or built) and its extra
/// arguments (`UMDEV_E2E_BACKEND_ARGS`).
fn edu_backend(env: &Env) -> &'static (PathBuf, Vec<String>) {
    static BACKEND: OnceLock<Result<(PathBuf, Vec<String>), String>> = OnceLock::new();
    let r = BACKEND.get_or_init(|| {
        let bin = match std::env::var_os("UMDEV_E2E_BACKEND") {
            Some(b) => PathBuf::from(b),
            None => workspace_binary(env, "umdev-edu", "umdev-edu")?,
        };
        if !bin.is_file() {
            return Err(format!(
                "no backend binary at {} (set UMDEV_E2E_BACKEND)",
                bin.display()
            ));
        }
        let args: Vec<String> = std::env::var("UMDEV_E2E_BACKEND_ARGS")
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        note(&format!("backend: {} {}", bin.display(), args.join(" ")));
        Ok((bin, args))
    });
    match r {
        Ok(b) => b,
        Err(e) => panic!("e2e set-up failed: {e}"),
    }
}

/// umdev-edu on `socket`, logging to `log`.
fn start_edu(env: &Env, socket: &Path, log: &Path, diag: &Diag) -> Backend {
    let (bin, args) = edu_backend(env);
    Backend::start(bin, args, socket, log, diag)
}

/// The results of QEMU's built-in edu: what umdev-edu must reproduce.
fn reference(env: &'static Env) -> &'static str {
    static REFERENCE: OnceLock<Result<String, String>> = OnceLock::new();
    let r = REFERENCE.get_or_init(|| {
        let diag = Diag::default();
        let dir = test_dir(env, "reference");
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_guest(
                env,
                &dir,
                "builtin-edu",
                &GuestOpts {
                    builtin_edu: true,
                    ..GuestOpts::default()
                },
                &diag,
            )
        }));
        match run {
            Ok(results) => Ok(results),
            Err(_) => {
                // Print the logs (Diag prints only while panicking).
                let logs: Vec<String> = diag
                    .files
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .map(|(label, p)| {
                        format!(
                            "===== {label} =====\n{}",
                            fs::read_to_string(p).unwrap_or_default()
                        )
                    })
                    .collect();
                Err(format!(
                    "the reference run (QEMU's built-in edu) failed; see {}\n{}",
                    dir.display(),
                    logs.join("\n")
                ))
            }
        }
    });
    match r {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

/// Asserts that two result listings are identical, showing the differing lines.
fn assert_same_results(reference: &str, got: &str, what: &str) {
    if reference == got {
        return;
    }
    let key = |l: &str| {
        let mut it = l.split_whitespace();
        let kind = it.next().unwrap_or("").to_owned();
        let name = it.next().unwrap_or("").to_owned();
        if kind == "DONE" {
            ("DONE".to_owned(), String::new())
        } else {
            (name, kind)
        }
    };
    let index = |s: &str| -> BTreeMap<String, String> {
        s.lines().map(|l| (key(l).0, l.to_owned())).collect()
    };
    let (a, b) = (index(reference), index(got));
    let mut diff = Vec::new();
    for (name, line) in &a {
        match b.get(name) {
            Some(other) if other == line => {}
            Some(other) => diff.push(format!("  builtin: {line}\n  umdev:   {other}")),
            None => diff.push(format!("  builtin: {line}\n  umdev:   (missing)")),
        }
    }
    for (name, line) in &b {
        if !a.contains_key(name) {
            diff.push(format!("  builtin: (missing)\n  umdev:   {line}"));
        }
    }
    if diff.is_empty() {
        diff.push("  (same lines, different order)".into());
    }
    panic!(
        "{what}: results differ from QEMU's built-in edu:\n{}",
        diff.join("\n")
    );
}

fn assert_interleaving_ran(results: &str, name: &str) {
    assert!(
        results.lines().any(|l| l.starts_with("PASS irq_then_dma ")),
        "{name}: the irq-then-DMA test did not run:\n{results}"
    );
}

/// umdev-edu over vfio-user against the reference.
fn compare_with_builtin(test: &str, memfd: bool) {
    let Some(env) = env(test) else { return };
    let reference = reference(env);
    assert_interleaving_ran(reference, "reference");
    let diag = Diag::default();
    let dir = test_dir(env, test);
    let backend = start_edu(env, &socket_path(test), &dir.join("backend.log"), &diag);
    let results = run_guest(
        env,
        &dir,
        "umdev-edu",
        &GuestOpts {
            memfd,
            backend: Some(&backend),
            ..GuestOpts::default()
        },
        &diag,
    );
    assert_interleaving_ran(&results, test);
    assert_same_results(reference, &results, test);
    drop(backend);
    drop(diag);
}

// ------------------------------------------------------------------ tests --

/// Guest RAM shared with the backend (a memfd): DMA through the mapping.
#[test]
fn edu_builtin_vs_umdev_memfd() {
    compare_with_builtin("edu_builtin_vs_umdev_memfd", true);
}

/// Guest RAM without an fd: every DMA through DMA_READ/DMA_WRITE messages.
#[test]
fn edu_umdev_plain_memory() {
    compare_with_builtin("edu_umdev_plain_memory", false);
}

/// The backend is SIGKILLed while the guest is using the device: QEMU keeps
/// running and the device reads all-ones; a new backend on the same socket
/// path then serves a new QEMU.
///
/// The kill lands between two device accesses of the guest (see
/// `wait_device_gone` in the guest driver); for a kill while QEMU waits for a
/// reply see `backend_killed_mid_request`.
#[test]
fn backend_killed_mid_run() {
    backend_killed("backend_killed_mid_run", false);
}

/// The backend dies while a request of QEMU's is unread in its socket: QEMU's
/// read fails with ECONNRESET, and QEMU 11.1.3 aborts in vfio_user_recv
/// (`util/error.c:62: error_setv: Assertion '*errp == NULL' failed`, from
/// error_setg_errno on an Error that the failed read already set). Not a
/// umdev bug and not avoidable by a server that is killed; kept as a
/// reproduction: `cargo test -p umdev-edu --test e2e_qemu -- --ignored`.
#[test]
#[ignore = "QEMU 11.1.3 aborts when a vfio-user server dies with a request unread"]
fn backend_killed_mid_request() {
    backend_killed("backend_killed_mid_request", true);
}

/// Kills the backend under a running guest (`mid_request`: stop it first and
/// let the guest's next read wait on it), checks that the guest sees all-ones
/// and finishes, then serves a new guest from a new backend on the same path.
fn backend_killed(test: &str, mid_request: bool) {
    let Some(env) = env(test) else { return };
    let reference = reference(env);
    let diag = Diag::default();
    let dir = test_dir(env, test);
    let socket = socket_path(test);

    let mut first = start_edu(env, &socket, &dir.join("backend-killed.log"), &diag);
    let append = if mid_request {
        // Check the device continuously.
        "UMDEV_TESTS=device_gone_all_ones UMDEV_GONE_PAUSE_MS=0"
    } else {
        "UMDEV_TESTS=device_gone_all_ones"
    };
    let mut guest = Guest::start(
        env,
        &dir,
        "killed",
        &GuestOpts {
            memfd: true,
            append,
            backend: Some(&first),
            ..GuestOpts::default()
        },
        &diag,
    );
    // By default the guest has exercised the device and now checks it every
    // 500 ms, without accessing it in between.
    guest.wait_for_line("kill the backend now", Duration::from_secs(env.timeout));
    if mid_request {
        signal(&first.child, libc::SIGSTOP);
        sleep(Duration::from_millis(300));
    }
    let killed_at = guest.started.elapsed();
    first.sigkill();
    let (status, messages, results, elapsed) = guest.wait();
    note(&format!(
        "{test}: killed the backend at {:.1}s; guest done at {:.1}s",
        killed_at.as_secs_f64(),
        elapsed.as_secs_f64()
    ));
    let qemu_log = fs::read_to_string(dir.join("killed.qemu.log")).unwrap_or_default();
    assert!(
        !qemu_log.contains("Assertion"),
        "QEMU aborted after the backend was killed:\n{messages}"
    );
    check_results("killed", &results, &messages);
    assert!(
        results
            .lines()
            .any(|l| l.starts_with("PASS device_gone_all_ones ")),
        "the guest did not see the device go away:\n{results}"
    );
    assert!(
        status.success(),
        "run-guest.sh failed after the kill ({status}):\n{messages}"
    );
    drop(first);

    // A new backend on the same path; a new QEMU boots against it.
    let second = start_edu(env, &socket, &dir.join("backend-new.log"), &diag);
    let results = run_guest(
        env,
        &dir,
        "new-backend",
        &GuestOpts {
            memfd: true,
            backend: Some(&second),
            ..GuestOpts::default()
        },
        &diag,
    );
    assert_same_results(reference, &results, "new backend after the kill");
    drop(second);
    drop(diag);
}

/// What QEMU 11.1 does to a guest using a umdev device when the VM is
/// live-migrated (docs/migration.md): QEMU's vfio-user-pci asks the server
/// nothing about migration, puts nothing of the device (not even its config
/// space) in the stream, and `migrate` completes. The guest on the
/// destination keeps its driver's view but meets an unconfigured device.
/// The source backend warned when the guest enabled the device.
#[test]
fn live_migration_under_qemu_carries_no_device_state() {
    let test = "live_migration_under_qemu_carries_no_device_state";
    let Some(env) = env(test) else { return };
    let diag = Diag::default();
    let dir = test_dir(env, test);
    let (src_sock, dst_sock) = (socket_path(test), socket_path(&format!("{test}-dst")));
    let (src_qmp, dst_qmp) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let migration = dir.join("migration.sock");
    let _ = fs::remove_file(&migration);
    let src_be = start_edu(env, &src_sock, &dir.join("backend-src.log"), &diag);
    let dst_be = start_edu(env, &dst_sock, &dir.join("backend-dst.log"), &diag);
    // Both sides run the guest driver's `migrated` watch (the destination's
    // resumes where the source's stopped).
    let side = |backend, qmp, qemu_args| GuestOpts {
        memfd: true,
        append: "UMDEV_TESTS=migrated",
        backend: Some(backend),
        qmp: Some(qmp),
        qemu_args,
        ..GuestOpts::default()
    };
    let mut src = Guest::start(env, &dir, "source", &side(&src_be, &src_qmp, vec![]), &diag);
    src.wait_for_line("migrate the VM now", Duration::from_secs(env.timeout));
    let incoming = vec!["-incoming".into(), format!("unix:{}", migration.display())];
    let dst = Guest::start(
        env,
        &dir,
        "destination",
        &side(&dst_be, &dst_qmp, incoming),
        &diag,
    );
    let mut qmp = Qmp::connect(&src_qmp).expect("source QMP");
    // Nothing blocks the migration: no blocker, no device section.
    let before = qmp.execute("query-migrate", serde_json::json!({})).unwrap();
    assert!(
        before.get("blocked-reasons").is_none(),
        "QEMU now blocks the migration: {before}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(env.timeout);
    // The destination QEMU binds its incoming socket a moment before it listens.
    umdev::cli::wait_listening(&migration, None, Duration::from_secs(env.timeout))
        .unwrap_or_else(|e| panic!("the destination QEMU: {e}"));
    qmp.execute(
        "migrate",
        serde_json::json!({"uri": format!("unix:{}", migration.display())}),
    )
    .expect("migrate");
    let status = loop {
        let q = qmp.execute("query-migrate", serde_json::json!({})).unwrap();
        let s = q["status"].as_str().unwrap_or("").to_string();
        if s == "completed" || s == "failed" {
            break q;
        }
        assert!(std::time::Instant::now() < deadline, "migration still {s}");
        sleep(Duration::from_millis(100));
    };
    note(&format!("{test}: {status}"));
    assert_eq!(status["status"], "completed", "{status}");
    let (dst_status, messages, results, _) = dst.wait();
    qmp.quit().expect("quit the source");
    drop(src);
    check_results("destination", &results, &messages);
    assert!(dst_status.success(), "{messages}");
    let seen = results
        .lines()
        .find_map(|l| l.strip_prefix("PASS migrated "))
        .unwrap_or_else(|| panic!("no migrated result:\n{results}"));
    note(&format!("{test}: the guest saw {seen}"));
    let (before, after) = seen.split_once("; after: ").expect("before and after");
    // Before: the device works and the driver has it enabled.
    assert!(
        before.contains("id=0x010000ed") && before.contains("liveness=0xa5a5fffe"),
        "{before}"
    );
    // After: config space is the reset one (no decoding, no BAR address),
    // so the guest's mapping of BAR0 reaches nothing and reads zeros (QEMU's
    // unassigned memory): neither the ID nor the registers' values.
    assert!(after.contains("id=0x00000000"), "{after}");
    assert!(after.contains("command=0x0000"), "{after}");
    assert!(after.contains("bar0=0x00000000"), "{after}");
    assert!(!after.contains("factorial=0x00000078"), "{after}");
    let src_log = fs::read_to_string(dir.join("backend-src.log")).unwrap_or_default();
    assert!(
        src_log.contains("has not asked about migration"),
        "no warning on the source"
    );
    let dst_log = fs::read_to_string(dir.join("backend-dst.log")).unwrap_or_default();
    assert!(!dst_log.contains("migration: device state restored"));
    drop((src_be, dst_be, diag));
}
