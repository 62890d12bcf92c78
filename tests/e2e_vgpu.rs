//! End-to-end test of the umdev vGPU: a Linux guest under QEMU 11.1 (TCG) drives
//! `umdev-vgpu` through `vfio-user-pci` from userspace (tests/guest-driver,
//! src/vgpu.rs): page tables in its locked pages, a ring, a PTE rewrite with TLB
//! invalidation, a leaf pointing outside guest RAM, then a picture drawn with
//! FILL/BLIT/COPY into VRAM and scanned out through the GGTT. The backend's
//! `--scanout-png` picture must equal `umdev_vgpu::picture::render()` pixel for
//! pixel (the same recipe the guest drew from).
//!
//! Set-up, skipping and environment as tests/e2e_qemu.rs (`UMDEV_E2E=1` turns a
//! missing set-up into a failure; `UMDEV_CACHE`, `UMDEV_QEMU`, `UMDEV_KERNEL`,
//! `UMDEV_E2E_TIMEOUT`, `UMDEV_E2E_RUST_LOG`), plus `UMDEV_E2E_VGPU_ARGS`: extra
//! arguments for umdev-vgpu. Output goes to `target/e2e/tests/<test>/` (guest
//! serial log, QEMU log, backend log, the scanout PNG, and on a mismatch the
//! expected PNG); the logs are printed on failure.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use umdev_vgpu::{picture, scanout};

fn note(msg: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {msg}");
}

fn required() -> bool {
    std::env::var("UMDEV_E2E").is_ok_and(|v| v == "1")
}

/// Runs `cmd` to completion; its stdout, or a panic with its output.
fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Env {
    repo: PathBuf,
    qemu: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    backend: PathBuf,
    out: PathBuf,
    timeout: u64,
}

/// The e2e set-up (as tests/e2e_qemu.rs finds it), or None to skip.
fn env(test: &str) -> Option<Env> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let cache = std::env::var_os("UMDEV_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/umdev")))
        .expect("HOME or UMDEV_CACHE");
    let overrides =
        std::env::var_os("UMDEV_QEMU").is_some() && std::env::var_os("UMDEV_KERNEL").is_some();
    if !cache.join("setup.stamp").exists() && !overrides {
        assert!(
            !required(),
            "UMDEV_E2E=1 but the e2e set-up is missing: run scripts/setup-e2e.sh"
        );
        note(&format!(
            "{test}: skipped: run scripts/setup-e2e.sh (UMDEV_E2E=1 makes this a failure)"
        ));
        return None;
    }
    if !overrides {
        run_checked(
            Command::new(repo.join("scripts/setup-e2e.sh")).arg("--quiet"),
            "scripts/setup-e2e.sh --quiet",
        );
    }
    // Both are no-ops when e2e_qemu (or an earlier run) built them already.
    let out = run_checked(
        Command::new(repo.join("scripts/build-initramfs.sh")).arg("--quiet"),
        "scripts/build-initramfs.sh --quiet",
    );
    let initramfs = PathBuf::from(out.lines().last().unwrap_or("").trim());
    assert!(
        initramfs.is_file(),
        "build-initramfs.sh printed {initramfs:?}"
    );
    let exe = std::env::current_exe().expect("current_exe");
    let bin_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build.current_dir(&repo).args([
        "build",
        "--quiet",
        "-p",
        "umdev-vgpu",
        "--bin",
        "umdev-vgpu",
    ]);
    if bin_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    run_checked(&mut build, "cargo build -p umdev-vgpu --bin umdev-vgpu");
    let out = bin_dir
        .parent()
        .unwrap_or(&bin_dir)
        .join("e2e/tests")
        .join(test);
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).expect("create the test's output directory");
    Some(Env {
        qemu: std::env::var_os("UMDEV_QEMU")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("bin/qemu-system-x86_64")),
        kernel: std::env::var_os("UMDEV_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("guest/vmlinuz")),
        repo,
        initramfs,
        backend: bin_dir.join("umdev-vgpu"),
        out,
        timeout: std::env::var("UMDEV_E2E_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(120),
    })
}

/// Log files printed if the test fails.
struct Logs(Vec<(&'static str, PathBuf)>);

impl Drop for Logs {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (label, path) in &self.0 {
            let text = fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(200);
            eprintln!(
                "===== {label} ({}) =====\n{}",
                path.display(),
                lines[from..].join("\n")
            );
        }
    }
}

/// umdev-vgpu, stopped with SIGTERM on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let pid = libc::pid_t::try_from(self.0.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The differing pixels of two RGB pictures of the same size: count and the
/// first few as text.
fn pixel_diff(got: &[u8], want: &[u8], width: u32) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut first = Vec::new();
    for (i, (g, w)) in got.chunks_exact(3).zip(want.chunks_exact(3)).enumerate() {
        if g != w {
            count += 1;
            if first.len() < 10 {
                let (x, y) = (i as u32 % width, i as u32 / width);
                first.push(format!("({x},{y}): got {g:02x?} want {w:02x?}"));
            }
        }
    }
    (count, first)
}

#[test]
fn vgpu_picture_under_qemu() {
    let test = "vgpu_picture_under_qemu";
    let Some(env) = env(test) else { return };
    let socket = std::env::temp_dir().join(format!("umdev-e2e-{}-vgpu.sock", std::process::id()));
    let _ = fs::remove_file(&socket);
    let png = env.out.join("scanout.png");
    let backend_log = env.out.join("backend.log");
    let serial = env.out.join("guest.log");
    let results = env.out.join("guest.results");
    let _logs = Logs(vec![
        ("guest serial log", serial.clone()),
        ("QEMU log", env.out.join("guest.qemu.log")),
        ("backend log", backend_log.clone()),
    ]);

    // The backend, with its default seccomp filter.
    let log = fs::File::create(&backend_log).expect("create backend log");
    let mut child = Command::new(&env.backend)
        .arg("--socket-path")
        .arg(&socket)
        .arg("--scanout-png")
        .arg(&png)
        .args(
            std::env::var("UMDEV_E2E_VGPU_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .env(
            "RUST_LOG",
            std::env::var("UMDEV_E2E_RUST_LOG").unwrap_or_else(|_| "debug".into()),
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log fd"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", env.backend.display()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::symlink_metadata(&socket).is_err() {
        if let Some(status) = child.try_wait().expect("wait backend") {
            panic!("umdev-vgpu exited at start-up ({status})");
        }
        assert!(Instant::now() < deadline, "umdev-vgpu made no socket");
        sleep(Duration::from_millis(20));
    }
    let backend = Backend(child);

    let path = socket.to_str().expect("UTF-8 socket path");
    let device =
        format!(r#"{{"driver":"vfio-user-pci","socket":{{"path":"{path}","type":"unix"}}}}"#);
    let started = Instant::now();
    let out = Command::new(env.repo.join("scripts/run-guest.sh"))
        .args(["--quiet", "--no-build", "--memfd", "--timeout"])
        .arg(env.timeout.to_string())
        .arg("--log")
        .arg(&serial)
        .arg("--results")
        .arg(&results)
        .args(["--append", "UMDEV_DEV=1234:5547"])
        .args(["--", "-device", &device])
        .env("UMDEV_QEMU", &env.qemu)
        .env("UMDEV_KERNEL", &env.kernel)
        .env("UMDEV_INITRAMFS", &env.initramfs)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/run-guest.sh");
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    note(&format!(
        "{test}: guest done in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    drop(backend);
    let _ = fs::remove_file(&socket);

    let results = fs::read_to_string(&results).unwrap_or_default();
    let fails: Vec<&str> = results.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert!(fails.is_empty(), "the guest failed:\n{}", fails.join("\n"));
    assert!(
        results.lines().any(|l| l.starts_with("DONE ")),
        "the guest did not finish:\n{messages}"
    );
    assert!(
        out.status.success(),
        "run-guest.sh: {}:\n{messages}",
        out.status
    );
    for name in [
        "vgpu_context",
        "vgpu_store_fence",
        "vgpu_pte_remap",
        "vgpu_bad_target",
        "vgpu_after_fault",
        "vgpu_scanout",
        "vgpu_picture",
    ] {
        let pass = format!("PASS {name} ");
        assert!(
            results.lines().any(|l| l.starts_with(&pass)),
            "no PASS {name} from the guest:\n{results}"
        );
    }

    // The scanout picture, pixel for pixel.
    let bytes = fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    let got = scanout::decode_png(&bytes).expect("decode the scanout PNG");
    let fb = picture::render();
    let want = picture::to_rgb(&fb);
    assert_eq!(
        (got.width, got.height),
        (picture::WIDTH, picture::HEIGHT),
        "scanout size"
    );
    let (count, first) = pixel_diff(&got.rgb, &want, picture::WIDTH);
    if count != 0 {
        let expected = env.out.join("expected.png");
        let _ = scanout::write_png(
            &expected,
            picture::WIDTH,
            picture::HEIGHT,
            picture::STRIDE as usize,
            &fb,
        );
        panic!(
            "{count} pixels of {} differ from {}:\n{}",
            png.display(),
            expected.display(),
            first.join("\n")
        );
    }
    note(&format!(
        "{test}: scanout {}x{} matches the expected picture",
        got.width, got.height
    ));
}
