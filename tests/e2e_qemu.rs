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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// At most this many guests run at once (the CI machines have 2 cores).
const MAX_GUESTS: usize = 2;

// ------------------------------------------------------------------ set-up --

struct Env {
    repo: PathBuf,
    /// target/e2e/tests
    out: PathBuf,
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    backend: PathBuf,
    backend_args: Vec<String>,
    timeout: u64,
}

/// Writes straight to the process's stderr, past the test harness's capture,
/// so skips and timings show in `cargo test` output.
fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {msg}");
}

fn required() -> bool {
    std::env::var("UMDEV_E2E").is_ok_and(|v| v == "1")
}

/// The set-up, or None when the tests are to be skipped. Panics when the
/// set-up is present but unusable, or missing while `UMDEV_E2E=1`.
fn env(test: &str) -> Option<&'static Env> {
    static ENV: OnceLock<Result<Option<Env>, String>> = OnceLock::new();
    match ENV.get_or_init(make_env) {
        Ok(Some(env)) => Some(env),
        Ok(None) => {
            note(&format!(
                "{test}: skipped: run scripts/setup-e2e.sh (no e2e set-up found; \
                 UMDEV_E2E=1 makes this a failure)"
            ));
            None
        }
        Err(e) => panic!("e2e set-up failed: {e}"),
    }
}

fn make_env() -> Result<Option<Env>, String> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cache = match std::env::var_os("UMDEV_CACHE") {
        Some(c) => PathBuf::from(c),
        None => {
            PathBuf::from(std::env::var_os("HOME").ok_or("HOME is not set")?).join(".cache/umdev")
        }
    };
    let stamp = cache.join("setup.stamp");
    let have_overrides =
        std::env::var_os("UMDEV_QEMU").is_some() && std::env::var_os("UMDEV_KERNEL").is_some();
    if !stamp.exists() && !have_overrides {
        if required() {
            return Err(format!(
                "UMDEV_E2E=1 but {} is missing: run scripts/setup-e2e.sh",
                stamp.display()
            ));
        }
        return Ok(None);
    }
    let started = Instant::now();
    if !have_overrides {
        // Fast when the cache is complete; checks that QEMU still starts.
        run_checked(
            Command::new(repo.join("scripts/setup-e2e.sh")).arg("--quiet"),
            "scripts/setup-e2e.sh --quiet",
        )?;
    }
    let qemu = std::env::var_os("UMDEV_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("bin/qemu-system-x86_64"));
    let kernel = std::env::var_os("UMDEV_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join("guest/vmlinuz"));

    // Built once here: parallel run-guest.sh runs would race building it.
    let out = run_checked(
        Command::new(repo.join("scripts/build-initramfs.sh")).arg("--quiet"),
        "scripts/build-initramfs.sh --quiet",
    )?;
    let initramfs = PathBuf::from(out.lines().last().unwrap_or("").trim());
    if !initramfs.is_file() {
        return Err(format!(
            "build-initramfs.sh printed {initramfs:?}, not a file"
        ));
    }

    // target/<profile>, from target/<profile>/deps/e2e_qemu-<hash>.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory from current_exe")?
        .to_path_buf();
    let backend = match std::env::var_os("UMDEV_E2E_BACKEND") {
        Some(b) => PathBuf::from(b),
        None => {
            // The umdev-edu binary is another package's: cargo test does not
            // build it for this test, so build it (a no-op when up to date).
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.current_dir(&repo).args([
                "build",
                "--quiet",
                "-p",
                "umdev-edu",
                "--bin",
                "umdev-edu",
            ]);
            if bin_dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            run_checked(&mut cmd, "cargo build -p umdev-edu --bin umdev-edu")?;
            bin_dir.join("umdev-edu")
        }
    };
    if !backend.is_file() {
        return Err(format!(
            "no backend binary at {} (set UMDEV_E2E_BACKEND)",
            backend.display()
        ));
    }
    let backend_args: Vec<String> = std::env::var("UMDEV_E2E_BACKEND_ARGS")
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    let timeout = std::env::var("UMDEV_E2E_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let out = bin_dir.parent().unwrap_or(&bin_dir).join("e2e/tests");
    note(&format!(
        "set-up ready in {:.1}s: {} {}",
        started.elapsed().as_secs_f64(),
        backend.display(),
        backend_args.join(" ")
    ));
    Ok(Some(Env {
        repo,
        out,
        qemu,
        kernel,
        initramfs,
        backend,
        backend_args,
        timeout,
    }))
}

/// Runs `cmd` to completion; its stdout, or an error with its output.
fn run_checked(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ------------------------------------------------------------ diagnostics --

/// Log files of one test, printed if the test panics.
#[derive(Default)]
struct Diag {
    files: Mutex<Vec<(String, PathBuf)>>,
}

impl Diag {
    fn add(&self, label: impl Into<String>, path: &Path) {
        self.files
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((label.into(), path.to_path_buf()));
    }
}

impl Drop for Diag {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        const MAX_LINES: usize = 300;
        let files = self.files.get_mut().unwrap_or_else(|p| p.into_inner());
        for (label, path) in files.iter() {
            eprintln!("===== {label}: {} =====", path.display());
            match fs::read(path) {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes).replace('\r', "");
                    let lines: Vec<&str> = text.lines().collect();
                    if lines.len() > MAX_LINES {
                        eprintln!("[... first {} lines left out ...]", lines.len() - MAX_LINES);
                    }
                    for l in &lines[lines.len().saturating_sub(MAX_LINES)..] {
                        eprintln!("{l}");
                    }
                }
                Err(e) => eprintln!("[cannot read: {e}]"),
            }
        }
        if !files.is_empty() {
            eprintln!("===== end of logs =====");
        }
    }
}

/// A fresh output directory for `test`.
fn test_dir(env: &Env, test: &str) -> PathBuf {
    let dir = env.out.join(test);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

// ------------------------------------------------------------------ slots --

struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

static SLOTS: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};

/// Permission to run one guest; at most [`MAX_GUESTS`] exist at once.
struct Slot;

impl Slot {
    fn acquire() -> Slot {
        let mut used = SLOTS.used.lock().unwrap_or_else(|p| p.into_inner());
        while *used >= MAX_GUESTS {
            used = SLOTS.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += 1;
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.used.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        SLOTS.freed.notify_one();
    }
}

// ---------------------------------------------------------------- backend --

struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Backend {
    /// Starts the backend on `socket`, logging to `log`, and waits until it
    /// listens.
    fn start(env: &Env, socket: &Path, log: &Path, diag: &Diag) -> Backend {
        diag.add("backend log", log);
        let _ = fs::remove_file(socket);
        let file = fs::File::create(log).expect("create backend log");
        let rust_log = std::env::var("UMDEV_E2E_RUST_LOG").unwrap_or_else(|_| "debug".into());
        let mut child = Command::new(&env.backend)
            .arg("--socket-path")
            .arg(socket)
            .args(&env.backend_args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log fd"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", env.backend.display()));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait backend") {
                panic!("the backend exited at start-up ({status})");
            }
            if fs::symlink_metadata(socket).is_ok() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the backend did not create {} within 20 s",
                socket.display()
            );
            sleep(Duration::from_millis(20));
        }
        Backend {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// `-device` argument of a vfio-user-pci device connected to it.
    fn device_arg(&self) -> String {
        let path = self.socket.to_str().expect("socket path is UTF-8");
        assert!(!path.contains(['"', '\\']), "unusable socket path {path}");
        format!(r#"{{"driver":"vfio-user-pci","socket":{{"path":"{path}","type":"unix"}}}}"#)
    }

    fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it does not exit within 5 s.
    fn stop(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        signal(&self.child, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            sleep(Duration::from_millis(20));
        }
        self.sigkill();
        None
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
        let _ = fs::remove_file(&self.socket);
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn socket_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("umdev-e2e-{}-{test}.sock", std::process::id()))
}

// ------------------------------------------------------------------ guest --

#[derive(Default)]
struct GuestOpts<'a> {
    /// Add QEMU's built-in edu device.
    builtin_edu: bool,
    /// Guest RAM in a shared memfd.
    memfd: bool,
    /// Kernel command-line additions (UMDEV_TESTS=... etc.).
    append: &'a str,
    /// The backend to attach over vfio-user.
    backend: Option<&'a Backend>,
}

/// A guest started by scripts/run-guest.sh.
struct Guest {
    child: Option<Child>,
    serial: PathBuf,
    results: PathBuf,
    started: Instant,
    _slot: Slot,
}

impl Guest {
    fn start(env: &Env, dir: &Path, name: &str, opts: &GuestOpts, diag: &Diag) -> Guest {
        let slot = Slot::acquire();
        let serial = dir.join(format!("{name}.log"));
        let qemu_log = dir.join(format!("{name}.qemu.log"));
        let results = dir.join(format!("{name}.results"));
        for f in [&serial, &qemu_log, &results] {
            let _ = fs::remove_file(f);
        }
        diag.add(format!("{name}: guest serial log"), &serial);
        diag.add(format!("{name}: QEMU log"), &qemu_log);
        let mut cmd = Command::new(env.repo.join("scripts/run-guest.sh"));
        cmd.args(["--quiet", "--no-build", "--timeout"])
            .arg(env.timeout.to_string())
            .arg("--log")
            .arg(&serial)
            .arg("--results")
            .arg(&results)
            .env("UMDEV_QEMU", &env.qemu)
            .env("UMDEV_KERNEL", &env.kernel)
            .env("UMDEV_INITRAMFS", &env.initramfs)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if opts.builtin_edu {
            cmd.arg("--edu");
        }
        if opts.memfd {
            cmd.arg("--memfd");
        }
        if !opts.append.is_empty() {
            cmd.args(["--append", opts.append]);
        }
        if let Some(b) = opts.backend {
            cmd.args(["--", "-device", &b.device_arg()]);
        }
        let child = cmd.spawn().expect("start scripts/run-guest.sh");
        Guest {
            child: Some(child),
            serial,
            results,
            started: Instant::now(),
            _slot: slot,
        }
    }

    fn serial_text(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Waits until the serial log has a line containing `marker`.
    fn wait_for_line(&mut self, marker: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.serial_text().lines().any(|l| l.contains(marker)) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let out = self.finish_output(status);
                panic!("the guest ended before printing {marker:?}:\n{out}");
            }
            assert!(
                Instant::now() < deadline,
                "no {marker:?} on the guest console within {timeout:?}"
            );
            sleep(Duration::from_millis(20));
        }
    }

    fn finish_output(&mut self, status: ExitStatus) -> String {
        let child = self.child.take().expect("guest still running");
        let out = child.wait_with_output().expect("wait run-guest.sh");
        format!(
            "run-guest.sh: {status}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits for run-guest.sh (which enforces the timeout); its exit status,
    /// its messages, and the guest's PASS/FAIL/DONE lines.
    fn wait(mut self) -> (ExitStatus, String, String, Duration) {
        let child = self.child.take().expect("guest still running");
        let out = child.wait_with_output().expect("wait run-guest.sh");
        let elapsed = self.started.elapsed();
        let messages = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let results = fs::read_to_string(&self.results).unwrap_or_default();
        (out.status, messages, results, elapsed)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // run-guest.sh stops QEMU on SIGTERM.
            signal(&child, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a guest to the end; asserts DONE and no FAIL; returns its results.
fn run_guest(env: &Env, dir: &Path, name: &str, opts: &GuestOpts, diag: &Diag) -> String {
    let guest = Guest::start(env, dir, name, opts, diag);
    let (status, messages, results, elapsed) = guest.wait();
    note(&format!(
        "{}: {name}: {:.1}s",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        elapsed.as_secs_f64()
    ));
    check_results(name, &results, &messages);
    assert!(
        status.success(),
        "{name}: run-guest.sh failed ({status}):\n{messages}"
    );
    results
}

fn check_results(name: &str, results: &str, messages: &str) {
    let done = results.lines().find(|l| l.starts_with("DONE "));
    assert!(
        done.is_some(),
        "{name}: the guest printed no DONE line:\n{messages}"
    );
    let fails: Vec<&str> = results.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(
        fails.is_empty(),
        "{name}: the guest reported failures:\n{}\n{messages}",
        fails.join("\n")
    );
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
    let backend = Backend::start(env, &socket_path(test), &dir.join("backend.log"), &diag);
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
/// reproduction: `cargo test --test e2e_qemu -- --ignored`.
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

    let mut first = Backend::start(env, &socket, &dir.join("backend-killed.log"), &diag);
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
    let second = Backend::start(env, &socket, &dir.join("backend-new.log"), &diag);
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
