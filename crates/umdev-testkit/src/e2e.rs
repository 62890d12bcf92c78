//! The real-QEMU end-to-end harness shared by the e2e tests (tests/e2e_*.rs):
//! the set-up (scripts/setup-e2e.sh, the initramfs), guests started through
//! scripts/run-guest.sh (at most [`MAX_GUESTS`] at once), device backends on
//! sockets, log files printed on failure, a QMP client.
//!
//! Without the set-up every test skips ([`env`] returns None) unless
//! `UMDEV_E2E=1`, which turns a missing set-up into a failure. Environment:
//! `UMDEV_CACHE`, `UMDEV_QEMU`, `UMDEV_KERNEL` (as run-guest.sh),
//! `UMDEV_E2E_RUST_LOG` (backends' RUST_LOG, default debug),
//! `UMDEV_E2E_TIMEOUT` (seconds one guest may run, default 120).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// At most this many guests run at once (the CI machines have 2 cores).
pub const MAX_GUESTS: usize = 2;

// ------------------------------------------------------------------ set-up --

pub struct Env {
    pub repo: PathBuf,
    /// target/e2e/tests
    pub out: PathBuf,
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// target/<profile>, where the workspace's binaries are built
    pub bin_dir: PathBuf,
    /// Seconds one guest may run.
    pub timeout: u64,
}

/// Writes straight to the process's stderr, past the test harness's capture,
/// so skips and timings show in `cargo test` output.
pub fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {msg}");
}

pub fn required() -> bool {
    std::env::var("UMDEV_E2E").is_ok_and(|v| v == "1")
}

/// The set-up, or None when the tests are to be skipped. Panics when the
/// set-up is present but unusable, or missing while `UMDEV_E2E=1`.
pub fn env(test: &str) -> Option<&'static Env> {
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
    // This crate lives in crates/umdev-testkit of the repository.
    let repo = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
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

    // target/<profile>, from target/<profile>/deps/<test>-<hash>.
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target directory from current_exe")?
        .to_path_buf();
    let timeout = std::env::var("UMDEV_E2E_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let out = bin_dir.parent().unwrap_or(&bin_dir).join("e2e/tests");
    note(&format!(
        "set-up ready in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Some(Env {
        repo,
        out,
        qemu,
        kernel,
        initramfs,
        bin_dir,
        timeout,
    }))
}

/// `cargo build -p <package> --bin <bin>` (a no-op when up to date; `cargo
/// test` does not build other packages' binaries) in this test's profile;
/// the binary's path.
pub fn workspace_binary(env: &Env, package: &str, bin: &str) -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&env.repo)
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if env.bin_dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    run_checked(&mut cmd, &format!("cargo build -p {package} --bin {bin}"))?;
    let path = env.bin_dir.join(bin);
    if !path.is_file() {
        return Err(format!("no binary at {}", path.display()));
    }
    Ok(path)
}

/// Runs `cmd` to completion; its stdout, or an error with its output.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<String, String> {
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
pub struct Diag {
    pub files: Mutex<Vec<(String, PathBuf)>>,
}

impl Diag {
    pub fn add(&self, label: impl Into<String>, path: &Path) {
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
pub fn test_dir(env: &Env, test: &str) -> PathBuf {
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
pub struct Slot;

impl Slot {
    pub fn acquire() -> Slot {
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

pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
}

impl Backend {
    /// Starts `bin --socket-path <socket> <args>`, logging to `log`, and
    /// waits until it listens.
    pub fn start(bin: &Path, args: &[String], socket: &Path, log: &Path, diag: &Diag) -> Backend {
        diag.add("backend log", log);
        let _ = fs::remove_file(socket);
        let file = fs::File::create(log).expect("create backend log");
        let rust_log = std::env::var("UMDEV_E2E_RUST_LOG").unwrap_or_else(|_| "debug".into());
        let mut child = Command::new(bin)
            .arg("--socket-path")
            .arg(socket)
            .args(args)
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("dup log fd"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        // The file exists from bind(2) on; a client (QEMU's chardev in
        // particular) is refused until listen(2).
        if let Err(e) =
            umdev::cli::wait_listening(socket, Some(&mut child), Duration::from_secs(20))
        {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the backend {}: {e}", bin.display());
        }
        Backend {
            child,
            socket: socket.to_path_buf(),
        }
    }

    /// `-device` argument of a vfio-user-pci device connected to it.
    pub fn device_arg(&self) -> String {
        let path = self.socket.to_str().expect("socket path is UTF-8");
        assert!(!path.contains(['"', '\\']), "unusable socket path {path}");
        format!(r#"{{"driver":"vfio-user-pci","socket":{{"path":"{path}","type":"unix"}}}}"#)
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL if it does not exit within 5 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
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

/// Whether a UNIX socket listens at `path` (None when /proc/net/unix cannot
/// be read); see [`umdev::cli::wait_listening`] to wait for it.
pub use umdev::cli::socket_listening as listening;

pub fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    unsafe {
        libc::kill(pid, sig);
    }
}

pub fn socket_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("umdev-e2e-{}-{test}.sock", std::process::id()))
}

// ------------------------------------------------------------------ guest --

#[derive(Default)]
pub struct GuestOpts<'a> {
    /// Add QEMU's built-in edu device.
    pub builtin_edu: bool,
    /// Add QEMU's built-in virtio-gpu (`-device virtio-gpu-pci`).
    pub builtin_virtio_gpu: bool,
    /// Guest RAM in a shared memfd.
    pub memfd: bool,
    /// Kernel command-line additions (UMDEV_TESTS=... etc.).
    pub append: &'a str,
    /// The backend to attach over vfio-user.
    pub backend: Option<&'a Backend>,
    /// A QMP monitor on this UNIX socket.
    pub qmp: Option<&'a Path>,
    /// More QEMU arguments.
    pub qemu_args: Vec<String>,
}

/// A guest started by scripts/run-guest.sh.
pub struct Guest {
    child: Option<Child>,
    pub serial: PathBuf,
    pub results: PathBuf,
    pub started: Instant,
    _slot: Slot,
}

impl Guest {
    pub fn start(env: &Env, dir: &Path, name: &str, opts: &GuestOpts, diag: &Diag) -> Guest {
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
        if opts.builtin_virtio_gpu {
            cmd.arg("--virtio-gpu");
        }
        if opts.memfd {
            cmd.arg("--memfd");
        }
        if let Some(qmp) = opts.qmp {
            cmd.arg("--qmp").arg(qmp);
        }
        if !opts.append.is_empty() {
            cmd.args(["--append", opts.append]);
        }
        cmd.arg("--");
        if let Some(b) = opts.backend {
            cmd.args(["-device", &b.device_arg()]);
        }
        cmd.args(&opts.qemu_args);
        let child = cmd.spawn().expect("start scripts/run-guest.sh");
        Guest {
            child: Some(child),
            serial,
            results,
            started: Instant::now(),
            _slot: slot,
        }
    }

    pub fn serial_text(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Waits until the serial log has a line containing `marker`.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) {
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

    /// Waits as [`wait`](Self::wait) and requires that the guest `name`
    /// passed: a DONE line, no FAIL ([`check_results`]), a clean exit. Its
    /// results.
    pub fn passed(self, name: &str) -> String {
        let (status, messages, results, _) = self.wait();
        check_results(name, &results, &messages);
        assert!(status.success(), "{name}: {messages}");
        results
    }

    /// Waits for run-guest.sh (which enforces the timeout); its exit status,
    /// its messages, and the guest's PASS/FAIL/DONE lines.
    pub fn wait(mut self) -> (ExitStatus, String, String, Duration) {
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
pub fn run_guest(env: &Env, dir: &Path, name: &str, opts: &GuestOpts, diag: &Diag) -> String {
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

pub fn check_results(name: &str, results: &str, messages: &str) {
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

// -------------------------------------------------------------------- QMP --

/// A QMP connection (`-qmp unix:PATH,server=on,wait=off`), capabilities
/// negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects once QEMU listens there (waiting up to 10 s while it starts)
    /// and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Qmp, String> {
        umdev::cli::wait_listening(path, None, Duration::from_secs(10))
            .map_err(|e| format!("QMP: {e}"))?;
        let stream = UnixStream::connect(path)
            .map_err(|e| format!("connect to QMP at {}: {e}", path.display()))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let writer = stream.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("no QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        if n == 0 {
            return Err("QMP: QEMU closed the connection".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: bad JSON {line:?}: {e}"))
    }

    /// Runs `command`; its `return` value, or its error. Events in between
    /// are skipped.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let mut reply = self.read()?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get_mut("return") {
                return Ok(r.take());
            }
            return Err(format!("QMP {command}: {reply}"));
        }
    }

    /// `screendump` of the primary console as PNG into `file`.
    pub fn screendump_png(&mut self, file: &Path) -> Result<(), String> {
        let path = file.to_str().ok_or("screendump path is not UTF-8")?;
        self.execute(
            "screendump",
            serde_json::json!({"filename": path, "format": "png"}),
        )
        .map(|_| ())
    }

    /// Ends QEMU (`quit`); the connection closes.
    pub fn quit(mut self) -> Result<(), String> {
        match self.execute("quit", serde_json::json!({})) {
            Ok(_) => Ok(()),
            // QEMU may close the socket before its reply arrives, or be gone
            // already (the caller then checks how QEMU ended).
            Err(e) if e.contains("closed") || e.contains("Broken pipe") || e.contains("reset") => {
                note(&format!("QMP quit: QEMU already gone ({e})"));
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
