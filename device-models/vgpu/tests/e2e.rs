//! End-to-end test of the umdev vGPU: a Linux guest under QEMU 11.1 (TCG) drives
//! `umdev-vgpu` through `vfio-user-pci` from userspace (tests/guest-driver,
//! src/vgpu.rs): page tables in its locked pages, a ring, a PTE rewrite with TLB
//! invalidation, a leaf pointing outside guest RAM, then a picture drawn with
//! FILL/BLIT/COPY into VRAM and scanned out through the GGTT. The backend's
//! `--scanout-png` picture must equal `umdev_vgpu::picture::render()` pixel for
//! pixel (the same recipe the guest drew from).
//!
//! Set-up, skipping and environment: the shared harness (tests/common/e2e.rs;
//! `UMDEV_E2E=1` turns a missing set-up into a failure), plus
//! `UMDEV_E2E_VGPU_ARGS`: extra arguments for umdev-vgpu. Output goes to
//! `target/e2e/tests/<test>/` (guest serial log, QEMU log, backend log, the
//! scanout PNG, and on a mismatch the expected PNG); the logs are printed on
//! failure.

use umdev_testkit as common;

use std::fs;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::e2e::{self, Backend, Diag, GuestOpts};
use common::metrics::{self, VGPU_FAMILIES};
use umdev_test_patterns as fb_pattern;
use umdev_vgpu::{picture, regs, scanout};

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

/// `umdev-vgpu` (default seccomp filter) with `args` and `UMDEV_E2E_VGPU_ARGS`,
/// logging to the test's `backend.log`.
fn start_vgpu(env: &e2e::Env, test: &str, args: &[String], diag: &Diag) -> Backend {
    let bin =
        e2e::workspace_binary(env, "umdev-vgpu", "umdev-vgpu").unwrap_or_else(|e| panic!("{e}"));
    let mut args = args.to_vec();
    args.extend(
        std::env::var("UMDEV_E2E_VGPU_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned),
    );
    let log = e2e::test_dir(env, test).join("backend.log");
    Backend::start(&bin, &args, &e2e::socket_path(test), &log, diag)
}

/// A guest with shared RAM whose driver looks for the vGPU (`append` more).
fn vgpu_guest<'a>(backend: &'a Backend, append: &'a str) -> GuestOpts<'a> {
    GuestOpts {
        memfd: true,
        append,
        backend: Some(backend),
        ..GuestOpts::default()
    }
}

#[test]
fn vgpu_picture_under_qemu() {
    let test = "vgpu_picture_under_qemu";
    let Some(env) = e2e::env(test) else { return };
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let png = dir.join("scanout.png");
    let args = vec!["--scanout-png".to_string(), png.display().to_string()];
    let backend = start_vgpu(env, test, &args, &diag);
    let results = e2e::run_guest(
        env,
        &dir,
        "vgpu",
        &vgpu_guest(&backend, "UMDEV_DEV=1234:5547"),
        &diag,
    );
    drop(backend);
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
        let expected = dir.join("expected.png");
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
    e2e::note(&format!(
        "{test}: scanout {}x{} matches the expected picture",
        got.width, got.height
    ));
    drop(diag);
}

#[test]
fn pixel_diff_finds_each_differing_pixel() {
    let want = vec![0u8; 3 * 4];
    let mut got = want.clone();
    got[3 * 3 + 2] = 1;
    let (count, first) = pixel_diff(&got, &want, 2);
    assert_eq!(count, 1);
    assert!(first[0].starts_with("(1,1)"), "{first:?}");
    assert_eq!(pixel_diff(&want, &want, 2).0, 0);
}

/// The series the e2e scrapes follow (and `scripts/plot-metrics.py` draws).
const PLOTTED: &[&str] = &[
    "umdev_region_writes_total{region=\"bar0\"}",
    "umdev_region_reads_total{region=\"bar0\"}",
    "umdev_vgpu_submissions_total",
    "umdev_vgpu_fences_total",
    "umdev_pagetrack_track_writes_total",
    "umdev_vgpu_shadow_updates_total",
    "umdev_dma_written_bytes_total{path=\"fd\"}",
    "umdev_vnc_sent_bytes_total{display=\"umdev-vgpu\"}",
];

/// Milliseconds since the start, and one value per [`PLOTTED`] series.
type Samples = Vec<(u128, Vec<f64>)>;

/// Scrapes a `--metrics` endpoint every 200 ms on a thread, as Prometheus
/// would during a run.
struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(Samples, String)>,
}

impl Scraper {
    fn start(port: u16) -> Scraper {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let (mut samples, mut last) = (Vec::new(), String::new());
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let text = metrics::scrape(port);
                if !text.is_empty() {
                    let values = PLOTTED
                        .iter()
                        .map(|s| metrics::sample(&text, s).unwrap_or(0.0))
                        .collect();
                    samples.push((start.elapsed().as_millis(), values));
                    last = text;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            (samples, last)
        });
        Scraper { stop, thread }
    }

    /// The samples (ms since start, one value per [`PLOTTED`] series) and the
    /// last scrape's text.
    fn stop(self) -> (Samples, String) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (samples, last) = self.thread.join().expect("scraper");
        assert!(samples.len() >= 2, "the metrics endpoint never answered");
        (samples, last)
    }
}

/// vncdotool's `vncdo` (scripts/setup-vnc-viewer.sh installs it).
fn vncdo() -> std::path::PathBuf {
    let cache = std::env::var_os("UMDEV_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/umdev")
        });
    cache.join("vncdotool/bin/vncdo")
}

/// What vncdotool (`vncdo capture`) sees of the VNC server on loopback
/// `port`, kept as `shot`.
fn vncdo_capture(
    vncdo: &std::path::Path,
    port: u16,
    shot: &std::path::Path,
) -> scanout::RgbPicture {
    let _ = fs::remove_file(shot);
    let out = std::process::Command::new(vncdo)
        .arg("-s")
        .arg(format!("127.0.0.1::{port}"))
        .arg("capture")
        .arg(shot)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vncdo");
    assert!(
        out.status.success(),
        "vncdo: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    scanout::decode_png(&fs::read(shot).unwrap()).expect("decode vncdo's PNG")
}

/// Without vncdotool a test leaves out its viewer check, unless the run
/// requires everything (CI).
fn vncdo_missing(vncdo: &std::path::Path) {
    assert!(
        !e2e::required(),
        "{} missing: run scripts/setup-vnc-viewer.sh",
        vncdo.display()
    );
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The visible `width` x `height` pixels of the test picture, as RGB.
fn expected_rgb(width: u32, height: u32) -> Vec<u8> {
    let fb = picture::render();
    (0..height as usize)
        .flat_map(|y| {
            let at = y * picture::STRIDE as usize;
            fb[at..at + 4 * width as usize]
                .chunks_exact(4)
                .flat_map(|p| [p[2], p[1], p[0]])
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A standard VNC client (vncdotool) watches the vGPU while a Linux guest
/// drives it under QEMU: two viewers at once, each capturing the picture and
/// then, on the same connection, the halved mode the guest switches to (a
/// DesktopSize update); every capture equals the picture pixel for pixel.
#[test]
fn vgpu_picture_seen_by_a_standard_vnc_viewer() {
    let test = "vgpu_picture_seen_by_a_standard_vnc_viewer";
    let Some(env) = e2e::env(test) else { return };
    let vncdo = vncdo();
    if !vncdo.exists() {
        assert!(
            !e2e::required(),
            "{} missing: run scripts/setup-vnc-viewer.sh",
            vncdo.display()
        );
        e2e::note(&format!("{test}: skipped (no vncdotool)"));
        return;
    }
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let (port, metrics_port) = (free_port(), free_port());
    let args = [
        "--vnc".into(),
        format!("127.0.0.1:{port}"),
        "--metrics".into(),
        format!("127.0.0.1:{metrics_port}"),
    ];
    let backend = start_vgpu(env, test, &args, &diag);
    let scraper = Scraper::start(metrics_port);
    let mut guest = e2e::Guest::start(
        env,
        &dir,
        "vgpu-vnc",
        &vgpu_guest(&backend, "UMDEV_DEV=1234:5547 UMDEV_HOLD_MS=6000"),
        &diag,
    );
    guest.wait_for_line(
        "holding the picture",
        std::time::Duration::from_secs(env.timeout),
    );
    let viewers: Vec<_> = (0..2)
        .map(|i| {
            let (first, second) = (
                dir.join(format!("vnc{i}-a.png")),
                dir.join(format!("vnc{i}-b.png")),
            );
            let _ = (fs::remove_file(&first), fs::remove_file(&second));
            let child = std::process::Command::new(&vncdo)
                .arg("-s")
                .arg(format!("127.0.0.1::{port}"))
                .arg("capture")
                .arg(&first)
                .args(["pause", "7", "capture"])
                .arg(&second)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start vncdo");
            (child, first, second)
        })
        .collect();
    guest.passed("vgpu-vnc");
    // The metrics, scraped all along: every family, and the counters moved.
    let (samples, last) = scraper.stop();
    drop(backend);
    for &family in VGPU_FAMILIES {
        assert!(
            metrics::has_family(&last, family),
            "no {family} in the last scrape"
        );
    }
    let tsv = dir.join("metrics.tsv");
    let mut table = format!("ms\t{}\n", PLOTTED.join("\t"));
    for (ms, values) in &samples {
        let row: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        table.push_str(&format!("{ms}\t{}\n", row.join("\t")));
    }
    fs::write(&tsv, table).unwrap();
    let (first, last_row) = (&samples[0].1, &samples[samples.len() - 1].1);
    for (i, series) in PLOTTED.iter().enumerate() {
        assert!(
            last_row[i] > first[i],
            "{series} did not move: {}",
            tsv.display()
        );
    }
    e2e::note(&format!(
        "{test}: {} metrics scrapes, every family present, counters moving ({})",
        samples.len(),
        tsv.display()
    ));
    for (out, first, second) in viewers {
        let out = out.wait_with_output().expect("run vncdo");
        assert!(
            out.status.success(),
            "vncdo: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        for (png, (w, h)) in [
            (&first, (picture::WIDTH, picture::HEIGHT)),
            (&second, (picture::WIDTH / 2, picture::HEIGHT / 2)),
        ] {
            let bytes = fs::read(png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
            let got = scanout::decode_png(&bytes).expect("decode the viewer's PNG");
            assert_eq!((got.width, got.height), (w, h), "{}", png.display());
            let (count, first) = pixel_diff(&got.rgb, &expected_rgb(w, h), w);
            assert_eq!(count, 0, "{}:\n{}", png.display(), first.join("\n"));
        }
    }
    e2e::note(&format!(
        "{test}: two vncdotool viewers saw the picture and the mode change"
    ));
    drop(diag);
}

/// The e2e set-up, when the guest's initramfs can carry the vGPU's kernel
/// driver (scripts/setup-kbuild.sh has been run; a failure if not and
/// `UMDEV_E2E=1`: the guest then reports the module missing).
fn kmod_env(test: &str) -> Option<&'static e2e::Env> {
    let env = e2e::env(test)?;
    let cache = std::env::var_os("UMDEV_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/umdev")
        });
    if !cache.join("kbuild-root/.umdev-kbuild").exists() && !e2e::required() {
        e2e::note(&format!(
            "{test}: skipped: run scripts/setup-kbuild.sh (no kbuild root; \
             UMDEV_E2E=1 makes this a failure)"
        ));
        return None;
    }
    Some(env)
}

/// A kernel-module test under way: `umdev-vgpu --scanout-png <dir>/scanout.png`
/// (plus `extra`) and a guest with `append` whose console has said `ready`.
struct KmodRun {
    png: std::path::PathBuf,
    backend: Backend,
    guest: e2e::Guest,
}

fn kmod_run(
    env: &'static e2e::Env,
    test: &str,
    extra: &[String],
    append: &str,
    ready: &str,
    diag: &Diag,
) -> KmodRun {
    let dir = e2e::test_dir(env, test);
    let png = dir.join("scanout.png");
    let _ = fs::remove_file(&png);
    let mut args = vec!["--scanout-png".to_string(), png.display().to_string()];
    args.extend_from_slice(extra);
    let backend = start_vgpu(env, test, &args, diag);
    let mut guest = e2e::Guest::start(env, &dir, "vgpu", &vgpu_guest(&backend, append), diag);
    guest.wait_for_line(ready, Duration::from_secs(env.timeout));
    KmodRun {
        png,
        backend,
        guest,
    }
}

/// Whether a scanout is the e2e test picture (320x240) pixel for pixel.
fn is_test_picture(got: &scanout::RgbPicture) -> Result<(), String> {
    is_scene(got, picture::SCENE)
}

/// Whether `got` is what `ops` draw, pixel for pixel.
fn is_scene(got: &scanout::RgbPicture, ops: &[picture::Op]) -> Result<(), String> {
    let (w, h) = (picture::WIDTH, picture::HEIGHT);
    if (got.width, got.height) != (w, h) {
        return Err(format!(
            "scanout {}x{}, want {w}x{h}",
            got.width, got.height
        ));
    }
    match pixel_diff(&got.rgb, &picture::to_rgb(&picture::render_ops(ops)), w) {
        (0, _) => Ok(()),
        (count, first) => Err(format!("{count} pixels differ: {}", first.join(", "))),
    }
}

/// The vGPU's Linux driver (device-models/vgpu/guest/linux, built for the
/// guest kernel by scripts/setup-kbuild.sh + scripts/build-guest-module.sh and
/// put in the initramfs): with `UMDEV_VGPU_KMOD=1` the guest's init loads it,
/// it binds to 1234:5547, reads the ID and CAPS registers through BAR0 and
/// logs them, and unloads cleanly; the userspace driver then still finds a
/// working device.
#[test]
fn vgpu_kernel_module_binds() {
    let test = "vgpu_kernel_module_binds";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let backend = start_vgpu(env, test, &[], &diag);
    let guest = e2e::Guest::start(
        env,
        &dir,
        "vgpu",
        &vgpu_guest(
            &backend,
            "UMDEV_DEV=1234:5547 UMDEV_TESTS=vgpu_context UMDEV_VGPU_KMOD=1",
        ),
        &diag,
    );
    let serial = guest.serial.clone();
    let (status, messages, results, elapsed) = guest.wait();
    drop(backend);
    e2e::note(&format!("{test}: vgpu: {:.1}s", elapsed.as_secs_f64()));
    e2e::check_results("vgpu", &results, &messages);
    assert!(
        status.success(),
        "run-guest.sh failed ({status}):\n{messages}"
    );
    assert!(
        results.lines().any(|l| l.starts_with("PASS vgpu_context ")),
        "no PASS vgpu_context after the module was unloaded:\n{results}"
    );

    let log = fs::read(&serial).unwrap_or_else(|e| panic!("{}: {e}", serial.display()));
    let log = String::from_utf8_lossy(&log).replace('\r', "");
    let kmod: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("INFO kmod: "))
        .collect();
    // dev_info: "umdev_vgpu 0000:01:00.0: 1234:5547 id=0x55470001 vram=64 MiB contexts=4"
    let bound = format!(
        "1234:5547 id=0x{:08x} vram={} MiB contexts={}",
        regs::ID_VALUE,
        regs::DEFAULT_VRAM_MIB,
        regs::CONTEXTS
    );
    assert!(
        kmod.iter()
            .any(|l| l.contains("umdev_vgpu ") && l.ends_with(&bound)),
        "no {bound:?} from umdev_vgpu.ko on the guest console:\n{}",
        kmod.join("\n")
    );
    assert!(
        kmod.iter()
            .any(|l| l.contains("umdev_vgpu ") && l.ends_with(": removed")),
        "umdev_vgpu.ko did not log its removal:\n{}",
        kmod.join("\n")
    );
    assert!(
        kmod.contains(&"INFO kmod: unloaded"),
        "umdev_vgpu.ko was not unloaded:\n{}",
        kmod.join("\n")
    );
}

/// The vGPU's Linux driver as a display: with `UMDEV_VGPU_KMOD=keep` the
/// module stays bound and registers a DRM device with fbdev emulation; the
/// guest driver's fb mode draws the test picture (`umdev-test-patterns`) on
/// its `/dev/fb0`; the kernel copies it into VRAM, which the module has mapped
/// for scanout 0 through the GGTT. The backend's scanout PNG (SIGUSR1) must
/// equal the picture pixel for pixel at the module's preferred 1024x768.
#[test]
fn vgpu_kernel_module_scanout() {
    let test = "vgpu_kernel_module_scanout";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let KmodRun {
        png,
        backend,
        guest,
    } = kmod_run(
        env,
        test,
        &[],
        "UMDEV_VGPU_KMOD=keep UMDEV_MODE=fb UMDEV_FB_HOLD_SECS=60",
        fb_pattern::MARKER,
        &diag,
    );
    let serial = guest.serial_text();
    let size = serial
        .lines()
        .find_map(|l| l.strip_prefix("PASS fb_pattern_written "))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.split_once('x'))
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
    assert_eq!(size, Some((1024, 768)), "fb size on the guest console");
    let (width, height) = (1024u32, 768u32);
    let mut want = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            want.extend_from_slice(&fb_pattern::rgb(x, y));
        }
    }

    // The picture is in VRAM once the kernel's damage worker ran.
    let last = capture_until(&backend.child, &png, Duration::from_secs(15), |got| {
        if (got.width, got.height) != (width, height) {
            return Err(format!(
                "scanout {}x{}, want {width}x{height}",
                got.width, got.height
            ));
        }
        match pixel_diff(&got.rgb, &want, width) {
            (0, _) => Ok(()),
            (count, first) => Err(format!("{count} pixels differ: {}", first.join(", "))),
        }
    })
    .err();
    drop(guest);
    drop(backend);
    if let Some(what) = last {
        let expected = dir.join("expected.png");
        let mut xrgb = Vec::with_capacity(want.len() / 3 * 4);
        for p in want.chunks_exact(3) {
            xrgb.extend_from_slice(&[p[2], p[1], p[0], 0]);
        }
        let _ = scanout::write_png(&expected, width, height, width as usize * 4, &xrgb);
        panic!(
            "the scanout is not the picture drawn on /dev/fb0 ({what}); expected: {}",
            expected.display()
        );
    }
    e2e::note(&format!(
        "{test}: scanout {width}x{height} matches the picture drawn through umdev_vgpu.ko"
    ));
}

/// Asks `process` (a backend with `--scanout-png png`, or a parent with
/// `--scanout-dir`) for scanout PNGs (SIGUSR1) until `check` accepts one or
/// `timeout` passes: the accepted picture, or the last complaint. Pictures
/// the guest draws reach VRAM a little later (the kernel's damage worker), so
/// one capture is not enough.
fn capture_until(
    process: &std::process::Child,
    png: &std::path::Path,
    timeout: Duration,
    mut check: impl FnMut(&scanout::RgbPicture) -> Result<(), String>,
) -> Result<scanout::RgbPicture, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let before = fs::metadata(png).and_then(|m| m.modified()).ok();
        e2e::signal(process, libc::SIGUSR1);
        let wait_file = Instant::now() + Duration::from_secs(5);
        while fs::metadata(png).and_then(|m| m.modified()).ok() == before
            && Instant::now() < wait_file
        {
            sleep(Duration::from_millis(50));
        }
        let complaint = match fs::read(png)
            .map_err(|e| e.to_string())
            .and_then(|b| scanout::decode_png(&b).map_err(|e| e.to_string()))
        {
            Err(e) => format!("{}: {e}", png.display()),
            Ok(got) => match check(&got) {
                Ok(()) => return Ok(got),
                Err(e) => e,
            },
        };
        if Instant::now() >= deadline {
            return Err(complaint);
        }
        sleep(Duration::from_millis(300));
    }
}

/// The marker the guest's init prints on the console (scripts/build-initramfs.sh,
/// `UMDEV_CONSOLE=1`): at character row 3, column 2 (from 0), full blocks where
/// this says `#`, in bright green (VGA palette colour 10).
const CONSOLE_MARKER: &str = "# ## ###";
const CONSOLE_MARKER_AT: (u32, u32) = (2, 3);
const CONSOLE_GREEN: [u8; 3] = [0x55, 0xff, 0x55];
const CONSOLE_BLACK: [u8; 3] = [0, 0, 0];

/// Where the console marker is wrong in `got`, for a `cols` x `rows` console
/// on it: each marker cell must be solid green or solid black, and the first
/// text line (row 0) must have lit pixels.
fn console_marker_errors(got: &scanout::RgbPicture, cols: u32, rows: u32) -> Vec<String> {
    let (cw, ch) = (got.width / cols, got.height / rows);
    let pixel = |x: u32, y: u32| {
        let at = 3 * (y as usize * got.width as usize + x as usize);
        [got.rgb[at], got.rgb[at + 1], got.rgb[at + 2]]
    };
    let mut errors = Vec::new();
    let (col0, row) = CONSOLE_MARKER_AT;
    for (i, c) in CONSOLE_MARKER.chars().enumerate() {
        let want = if c == '#' {
            CONSOLE_GREEN
        } else {
            CONSOLE_BLACK
        };
        let col = col0 + i as u32;
        let wrong = (0..ch)
            .flat_map(|dy| (0..cw).map(move |dx| (dx, dy)))
            .map(|(dx, dy)| (col * cw + dx, row * ch + dy))
            .find(|&(x, y)| pixel(x, y) != want);
        if let Some((x, y)) = wrong {
            errors.push(format!(
                "cell ({col},{row}) at ({x},{y}) is {:02x?}, want {want:02x?}",
                pixel(x, y)
            ));
        }
    }
    let lit = (0..ch)
        .flat_map(|y| (0..got.width).map(move |x| (x, y)))
        .filter(|&(x, y)| pixel(x, y) != CONSOLE_BLACK)
        .count();
    if lit == 0 {
        errors.push("the first console line has no text".into());
    }
    errors
}

/// The Linux console on the vGPU: with `UMDEV_VGPU_KMOD=keep UMDEV_CONSOLE=1`
/// the module's fbdev emulation carries fbcon, and init prints a known screen
/// on tty1. The backend's scanout PNG shows it at the mode the driver set
/// (1024x768): the first line has text and the marker's cells are exactly the
/// console's bright green and black. A standard VNC viewer (vncdotool) sees
/// the same screen pixel for pixel; its capture is kept as `console-vnc.png`
/// (docs/images/vgpu-console-vncdo.png comes from it).
#[test]
fn vgpu_kernel_module_console() {
    let test = "vgpu_kernel_module_console";
    let Some(env) = kmod_env(test) else { return };
    let vncdo = vncdo();
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let port = free_port();
    let KmodRun {
        png,
        backend,
        guest,
    } = kmod_run(
        env,
        test,
        &["--vnc".into(), format!("127.0.0.1:{port}")],
        "UMDEV_VGPU_KMOD=keep UMDEV_CONSOLE=1 UMDEV_CONSOLE_HOLD_SECS=60",
        "console_marker",
        &diag,
    );
    let serial = guest.serial_text();
    let line = serial
        .lines()
        .find(|l| l.contains("console_marker"))
        .unwrap_or_default()
        .to_owned();
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(line.starts_with("PASS console_marker "), "{line}");
    let (rows, cols): (u32, u32) = (
        field("rows=").parse().expect("rows"),
        field("cols=").parse().expect("cols"),
    );
    assert_eq!(field("fb="), "1024x768", "{line}");

    let got = capture_until(&backend.child, &png, Duration::from_secs(15), |got| {
        if (got.width, got.height) != (1024, 768) {
            return Err(format!(
                "scanout {}x{}, want 1024x768",
                got.width, got.height
            ));
        }
        match console_marker_errors(got, cols, rows) {
            e if e.is_empty() => Ok(()),
            e => Err(e.join("; ")),
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "the console marker is not on the scanout ({e}); see {}",
            png.display()
        )
    });
    e2e::note(&format!(
        "{test}: fbcon {cols}x{rows} on the scanout at 1024x768, marker pixels exact"
    ));

    if vncdo.exists() {
        let shot = dir.join("console-vnc.png");
        let seen = vncdo_capture(&vncdo, port, &shot);
        assert_eq!((seen.width, seen.height), (got.width, got.height));
        let (count, first) = pixel_diff(&seen.rgb, &got.rgb, got.width);
        assert_eq!(count, 0, "vncdo's capture differs:\n{}", first.join("\n"));
        e2e::note(&format!(
            "{test}: vncdotool sees the console ({})",
            shot.display()
        ));
    } else {
        vncdo_missing(&vncdo);
    }
    drop(guest);
    drop(backend);
}

/// The vGPU's Linux driver as a GPU: `umdev-vgpu-demo picture --flip`
/// (device-models/vgpu/guest/demo) takes a hardware context through
/// umdev_vgpu.ko, binds dumb buffers into its GPU address space (page tables
/// the kernel writes in guest RAM), draws the test picture with FILL/BLIT/COPY
/// in a batch buffer, waits for the fence (an MSI-X interrupt signalling a
/// dma_fence), checks the bytes, shows the picture at 320x240 with SETCRTC,
/// draws it again into a second buffer and page-flips to it. The backend's
/// scanout must be the picture pixel for pixel.
#[test]
fn vgpu_kernel_module_demo_picture() {
    let test = "vgpu_kernel_module_demo_picture";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let KmodRun {
        png,
        backend,
        guest,
    } = kmod_run(
        env,
        test,
        &[],
        "UMDEV_VGPU_KMOD=keep UMDEV_DEMO=picture+--flip+--hold-secs+30",
        "holding the picture",
        &diag,
    );
    let (w, h) = (picture::WIDTH, picture::HEIGHT);
    let shown = capture_until(
        &backend.child,
        &png,
        Duration::from_secs(15),
        is_test_picture,
    );
    let serial = guest.serial_text();
    drop(guest);
    drop(backend);
    let passes: Vec<&str> = serial
        .lines()
        .filter(|l| l.starts_with("PASS demo_"))
        .collect();
    assert!(
        !serial.lines().any(|l| l.starts_with("FAIL ")),
        "the demo failed:\n{serial}"
    );
    if let Err(e) = shown {
        panic!(
            "the scanout is not the demo's picture ({e}); {}",
            png.display()
        );
    }
    for name in ["demo_context", "demo_picture", "demo_flip"] {
        assert!(
            passes
                .iter()
                .any(|l| l.starts_with(&format!("PASS {name} "))),
            "no PASS {name}:\n{serial}"
        );
    }
    e2e::note(&format!(
        "{test}: the demo drew {w}x{h} through umdev_vgpu.ko, flipped, scanout exact"
    ));
}

/// The value of `family` (a counter without labels) in the backend's
/// "counters at exit" log line, 0 when it is not there (zero counters are
/// left out).
fn counter_at_exit(log: &str, family: &str) -> u64 {
    log.lines()
        .rev()
        .find_map(|l| l.split_once("counters at exit: ").map(|(_, c)| c))
        .and_then(|c| {
            c.split(", ")
                .find_map(|s| s.strip_prefix(&format!("{family} ")))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Two applications and a faulting one at the same time, each on its own
/// hardware context of umdev_vgpu.ko: two `picture --churn 40` demos (the
/// kernel binds, fills and unbinds 40 buffers in each one's page tables while
/// both run; one of them also shows its picture) and a `fault` demo whose
/// batch writes an unbound address. The faulting one gets NOT_PRESENT at that
/// address and recovers; the others' pictures are right (checked in the guest)
/// and the one on screen is the backend's scanout pixel for pixel. The
/// backend's counters at exit show the kernel's page-table writes were seen
/// (track_write) and applied to the shadows.
#[test]
fn vgpu_kernel_module_two_contexts() {
    let test = "vgpu_kernel_module_two_contexts";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let KmodRun {
        png,
        backend,
        guest,
    } = kmod_run(
        env,
        test,
        &[],
        "UMDEV_VGPU_KMOD=keep \
         UMDEV_DEMO=picture+--flip+--churn+40+--hold-secs+8,picture+--churn+40,fault",
        "holding the picture",
        &diag,
    );
    let shown = capture_until(
        &backend.child,
        &png,
        Duration::from_secs(15),
        is_test_picture,
    );
    let results = guest.passed("vgpu");
    drop(backend);
    if let Err(e) = shown {
        panic!("the scanout is not the picture ({e}); {}", png.display());
    }
    let count = |name: &str| results.lines().filter(|l| l.starts_with(name)).count();
    assert_eq!(count("PASS demo_churn 40"), 2, "{results}");
    assert_eq!(count("PASS demo_picture "), 2, "{results}");
    assert_eq!(count("PASS demo_flip "), 1, "{results}");
    assert_eq!(
        count("PASS demo_fault reason=1 addr=0x70000000"),
        1,
        "{results}"
    );
    assert_eq!(count("PASS demo_fault_recovered "), 1, "{results}");
    let contexts: std::collections::BTreeSet<&str> = results
        .lines()
        .filter_map(|l| l.strip_prefix("PASS demo_context context="))
        .collect();
    assert_eq!(
        contexts.len(),
        2,
        "two contexts for the picture demos: {results}"
    );

    let log = fs::read_to_string(dir.join("backend.log")).unwrap_or_default();
    let writes = counter_at_exit(&log, "umdev_pagetrack_track_writes_total");
    let shadowed = counter_at_exit(&log, "umdev_vgpu_shadow_updates_total");
    let faults = log.contains("umdev_vgpu_faults_total{reason=\"not_present\"} 1");
    assert!(
        writes > 0 && shadowed > 0 && faults,
        "track_write {writes}, shadow updates {shadowed}, a not_present fault {faults}: \
         {}",
        log.lines()
            .rev()
            .find(|l| l.contains("counters at exit"))
            .unwrap_or("no counters line")
    );
    e2e::note(&format!(
        "{test}: 3 demos on 3 contexts, the fault isolated, scanout exact; \
         {writes} track_write, {shadowed} shadow updates"
    ));
}

/// A hostile guest application: with hostile_test=1 the `hostile` demo writes
/// garbage into its own page tables (every level: random values, addresses
/// past guest RAM, the VRAM bit in upper levels) through POKE_PTE and submits
/// work through them, 200 times, and every other round through a page it did
/// not poke. Every submission ends, the clean ones done, the others BAD_TABLE,
/// BAD_TARGET or NOT_PRESENT; the backend stays up, and the Linux console on
/// the vGPU still draws: its marker is intact on the scanout after the demo.
#[test]
fn vgpu_kernel_module_hostile() {
    let test = "vgpu_kernel_module_hostile";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let KmodRun {
        png,
        mut backend,
        guest,
    } = kmod_run(
        env,
        test,
        &[],
        "UMDEV_VGPU_KMOD=keep UMDEV_VGPU_KMOD_ARGS=hostile_test=1 UMDEV_CONSOLE=1 \
         UMDEV_CONSOLE_HOLD_SECS=30 UMDEV_DEMO=hostile+--rounds+200",
        "after the demos",
        &diag,
    );
    let serial = guest.serial_text();
    let hostile = serial
        .lines()
        .find(|l| l.starts_with("PASS demo_hostile ") || l.starts_with("FAIL demo_hostile"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        hostile.starts_with("PASS demo_hostile faults="),
        "{hostile}\n{serial}"
    );
    // Every other round a clean page, all done; leaves past guest RAM are
    // BAD_TARGET (4), garbage tables BAD_TABLE (3).
    assert!(hostile.contains(" clean=100 "), "{hostile}");
    let reasons = hostile
        .split_whitespace()
        .find_map(|w| w.strip_prefix("reasons="))
        .unwrap_or_default();
    for r in ["3:", "4:"] {
        assert!(reasons.split(',').any(|x| x.starts_with(r)), "{hostile}");
    }
    let marker = serial
        .lines()
        .find(|l| l.starts_with("PASS console_marker "))
        .unwrap_or_default()
        .to_owned();
    let field = |name: &str| -> u32 {
        marker
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {marker:?}"))
    };
    let (rows, cols) = (field("rows="), field("cols="));
    let console = capture_until(&backend.child, &png, Duration::from_secs(15), |got| {
        match console_marker_errors(got, cols, rows) {
            e if e.is_empty() => Ok(()),
            e => Err(e.join("; ")),
        }
    });
    assert!(
        backend.child.try_wait().ok().flatten().is_none(),
        "the backend died"
    );
    drop(guest);
    drop(backend);
    if let Err(e) = console {
        panic!(
            "the console is not intact after the hostile demo ({e}); {}",
            png.display()
        );
    }
    e2e::note(&format!("{test}: {hostile}; backend up, console intact"));
}

/// One parent, two VMs: `umdev-vgpu-parent` with two `vgpu-64m` instances made
/// by `umdevctl`, each attached to its own QEMU 11.1 guest at the same time.
/// VM A runs the userspace driver's whole vGPU set (page tables, a remap, a
/// leaf pointing outside guest RAM and the fault it gets, the picture checked
/// through BAR2) on the shared engine while VM B's kernel driver floods the
/// engine with a hostile workload (umdev_vgpu.ko with hostile_test=1: 300
/// rounds of garbage page tables, each with a submission, and a churning
/// picture demo) and shows a picture of its own (`SCENE_B`, page-flipped):
/// each instance's scanout, written by the parent (`--scanout-dir`), is its
/// own guest's picture pixel for pixel, and so is what vncdotool sees on B's
/// instance's own VNC server (`--vnc`); A passes, B's faults stay B's. Then B
/// is killed mid-run while A runs the set again: A passes, the parent stays
/// up and lists both instances.
#[test]
fn vgpu_parent_serves_two_guests() {
    let test = "vgpu_parent_serves_two_guests";
    let Some(env) = kmod_env(test) else { return };
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    // Short: UNIX socket paths are limited to 108 bytes.
    let state = std::env::temp_dir().join(format!("umdev-e2e-{}-parent", std::process::id()));
    let _ = fs::remove_dir_all(&state);
    let bin = |name: &str| {
        e2e::workspace_binary(env, "umdev-vgpu", name).unwrap_or_else(|e| panic!("{e}"))
    };
    let log = dir.join("parent.log");
    diag.add("parent.log", &log);
    let scanouts = dir.join("scanout");
    let mut parent = std::process::Command::new(bin("umdev-vgpu-parent"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--scanout-dir")
        .arg(&scanouts)
        .args(["--vnc", "127.0.0.1:0"])
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .expect("start umdev-vgpu-parent");
    let control = state.join("control.sock");
    if let Err(e) = umdev::cli::wait_listening(&control, Some(&mut parent), Duration::from_secs(10))
    {
        panic!("the parent: {e}");
    }
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(bin("umdevctl"))
            .arg("--control")
            .arg(&control)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "umdevctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let sockets: Vec<String> = (0..2)
        .map(|i| {
            ctl(&[
                "create",
                "--type",
                "vgpu-64m",
                "--weight",
                &(i + 1).to_string(),
            ])
        })
        .collect();
    let device = |socket: &str| {
        format!(r#"{{"driver":"vfio-user-pci","socket":{{"path":"{socket}","type":"unix"}}}}"#)
    };
    let guest = |name: &str, socket: &str, append: &'static str| {
        e2e::Guest::start(
            env,
            &dir,
            name,
            &GuestOpts {
                memfd: true,
                append,
                qemu_args: vec!["-device".into(), device(socket)],
                ..GuestOpts::default()
            },
            &diag,
        )
    };
    let expect_pass = |name: &str, results: &str| {
        for t in ["vgpu_bad_target", "vgpu_after_fault", "vgpu_picture"] {
            assert!(
                results
                    .lines()
                    .any(|l| l.starts_with(&format!("PASS {t} "))),
                "{name}: no PASS {t}:\n{results}"
            );
        }
    };
    // Instance <uuid> (socket <state>/<uuid>.sock) shows <scanouts>/<uuid>.png.
    let png = |socket: &str| {
        let uuid = std::path::Path::new(socket).file_stem().unwrap();
        scanouts.join(uuid).with_extension("png")
    };
    let mut hostile = guest(
        "vm-b",
        &sockets[1],
        "UMDEV_VGPU_KMOD=keep UMDEV_VGPU_KMOD_ARGS=hostile_test=1 \
         UMDEV_DEMO=hostile+--rounds+300,picture+--churn+100,picture+--flip+--scene+b+--hold-secs+30",
    );
    let calm = guest("vm-a", &sockets[0], "UMDEV_DEV=1234:5547");
    // VM B's picture on its scanout while its flood goes on.
    hostile.wait_for_line("holding the picture", Duration::from_secs(env.timeout));
    let b_png = png(&sockets[1]);
    if let Err(e) = capture_until(&parent, &b_png, Duration::from_secs(15), |got| {
        is_scene(got, picture::SCENE_B)
    }) {
        panic!(
            "VM B's scanout is not its picture ({e}); {}",
            b_png.display()
        );
    }
    // Kept for people (the second part of the test draws over both).
    let _ = fs::copy(&b_png, dir.join("vm-b-scanout.png"));
    // A standard viewer on VM B's instance sees the same.
    let vncdo = vncdo();
    if vncdo.exists() {
        let list: serde_json::Value = serde_json::from_str(&ctl(&["list", "--json"])).unwrap();
        let at = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["socket"] == sockets[1].as_str())
            .and_then(|i| i["vnc"].as_str())
            .unwrap_or_else(|| panic!("no VNC address for VM B's instance in {list}"))
            .to_owned();
        let port: u16 = at.rsplit(':').next().unwrap().parse().unwrap();
        let shot = dir.join("vm-b-vnc.png");
        if let Err(e) = is_scene(&vncdo_capture(&vncdo, port, &shot), picture::SCENE_B) {
            panic!(
                "vncdotool on VM B's instance ({at}): {e}; {}",
                shot.display()
            );
        }
    } else {
        vncdo_missing(&vncdo);
    }
    expect_pass("vm-a", &calm.passed("vm-a"));
    // VM A's picture, as its last FENCE left it (the device is reset now).
    let a_png = png(&sockets[0]);
    let shown = fs::read(&a_png)
        .map_err(|e| e.to_string())
        .and_then(|b| scanout::decode_png(&b).map_err(|e| e.to_string()))
        .and_then(|got| is_scene(&got, picture::SCENE));
    if let Err(e) = shown {
        panic!(
            "VM A's scanout is not its picture ({e}); {}",
            a_png.display()
        );
    }
    let results = hostile.passed("vm-b");
    for name in ["demo_picture", "demo_flip", "demo_churn"] {
        assert!(
            results
                .lines()
                .any(|l| l.starts_with(&format!("PASS {name} "))),
            "vm-b: no PASS {name}:\n{results}"
        );
    }
    let line = results
        .lines()
        .find(|l| l.starts_with("PASS demo_hostile "))
        .unwrap_or_else(|| panic!("vm-b: no PASS demo_hostile:\n{results}"))
        .to_owned();
    e2e::note(&format!(
        "{test}: VM A's vGPU set passed and each scanout (and VM B's VNC view) showed its \
         own guest's picture exactly, beside VM B's hostile flood ({line})"
    ));

    // One VM killed while the other works.
    let mut doomed = guest(
        "vm-b2",
        &sockets[1],
        "UMDEV_DEV=1234:5547 UMDEV_HOLD_MS=60000",
    );
    doomed.wait_for_line("vgpu_context", Duration::from_secs(env.timeout));
    let survivor = guest("vm-a2", &sockets[0], "UMDEV_DEV=1234:5547");
    sleep(Duration::from_millis(500));
    drop(doomed);
    expect_pass("vm-a2", &survivor.passed("vm-a2"));
    assert!(parent.try_wait().unwrap().is_none(), "the parent died");
    let list = ctl(&["list"]);
    assert_eq!(list.lines().count(), 2, "{list}");
    e2e::signal(&parent, libc::SIGTERM);
    let _ = parent.wait();
    let _ = fs::remove_dir_all(&state);
    e2e::note(&format!(
        "{test}: one guest killed, the other passed again; parent up"
    ));
}
