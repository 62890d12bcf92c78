//! End-to-end tests of a virtio-gpu display under QEMU 11.1 (TCG): the Debian
//! guest kernel loads virtio_gpu (modules in the initramfs, see
//! scripts/setup-e2e.sh) and the guest driver (`UMDEV_MODE=fb`,
//! tests/guest-driver/src/fb.rs) draws the picture of
//! `umdev_test_patterns` on `/dev/fb0`. QEMU's own
//! `screendump` (QMP, PNG; `-display none`) must then equal that picture
//! pixel for pixel:
//!
//! - `virtio_gpu_builtin_screendump`: QEMU's built-in `-device virtio-gpu-pci`,
//!   the reference run (it checks the guest side and the harness);
//! - `vhost_user_gpu_umdev`: `umdev-virtio-gpu` over vhost-user
//!   (`-device vhost-user-gpu-pci`, guest RAM in a shared memfd); its own
//!   `--scanout-png` picture must match too. `UMDEV_E2E_VIRTIO_GPU_BACKEND`
//!   runs another vhost-user-gpu backend instead (`--socket-path PATH` and
//!   `UMDEV_E2E_VIRTIO_GPU_ARGS`; no scanout PNG check), e.g. QEMU's own
//!   contrib/vhost-user-gpu, to check the harness and QEMU's side.
//!
//! Set-up, skipping and environment as device-models/edu/tests/e2e_qemu.rs (umdev_testkit::e2e;
//! `UMDEV_E2E=1` turns a missing set-up into a failure). Output goes to
//! `target/e2e/tests/<test>/`: serial and QEMU logs, the backend's log, the
//! screendump and scanout PNGs, and on a mismatch `expected.png`.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::e2e::{
    check_results, env, note, socket_path, test_dir, workspace_binary, Backend, Diag, Env, Guest,
    GuestOpts, Qmp,
};
use umdev_testkit as common;

use umdev_test_patterns as fb_pattern;

/// Kernel command line of the fb mode.
const FB_APPEND: &str = "UMDEV_MODE=fb";
/// How long a picture may take to arrive after the guest's marker (the
/// fbdev damage worker runs asynchronously, TCG is slow on a busy machine).
const SETTLE: Duration = Duration::from_secs(15);

// ----------------------------------------------------------------- pictures --

/// An RGB picture, 8 bits per channel, rows top to bottom.
struct Picture {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Picture {
    fn expected(width: u32, height: u32) -> Picture {
        let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&fb_pattern::rgb(x, y));
            }
        }
        Picture { width, height, rgb }
    }

    /// Decodes an 8-bit RGB or RGBA (alpha dropped) PNG.
    fn load(path: &Path) -> Result<Picture, String> {
        let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut decoder = png::Decoder::new(file);
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder
            .read_info()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader
            .next_frame(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let px = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => return Err(format!("{}: colour type {other:?}", path.display())),
        };
        let (width, height) = (info.width, info.height);
        let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
        for row in buf.chunks(info.line_size).take(height as usize) {
            for p in row.chunks_exact(px).take(width as usize) {
                rgb.extend_from_slice(&p[..3]);
            }
        }
        Ok(Picture { width, height, rgb })
    }

    fn save(&self, path: &Path) {
        let file = fs::File::create(path).expect("create PNG");
        let mut enc = png::Encoder::new(std::io::BufWriter::new(file), self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("PNG header");
        w.write_image_data(&self.rgb).expect("PNG data");
    }

    /// None when equal to `want`, else what differs.
    fn diff(&self, want: &Picture) -> Option<String> {
        if (self.width, self.height) != (want.width, want.height) {
            return Some(format!(
                "{}x{}, want {}x{}",
                self.width, self.height, want.width, want.height
            ));
        }
        let mut count = 0usize;
        let mut first = Vec::new();
        for (i, (g, w)) in self
            .rgb
            .chunks_exact(3)
            .zip(want.rgb.chunks_exact(3))
            .enumerate()
        {
            if g != w {
                count += 1;
                if first.len() < 8 {
                    let (x, y) = (i as u32 % self.width, i as u32 / self.width);
                    first.push(format!("({x},{y}) {g:02x?} want {w:02x?}"));
                }
            }
        }
        (count > 0).then(|| {
            format!(
                "{count} of {} pixels differ; first: {}",
                self.width * self.height,
                first.join(", ")
            )
        })
    }
}

/// Polls `load` until the picture equals the fb pattern or [`SETTLE`]
/// passes; the picture's size, or what was wrong (the expected picture is
/// then saved as `<dir>/<name>.expected.png`).
fn wait_for_pattern(
    dir: &Path,
    name: &str,
    mut load: impl FnMut() -> Result<Picture, String>,
) -> Result<(u32, u32), String> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let problem = match load() {
            Ok(got) => match got.diff(&Picture::expected(got.width, got.height)) {
                None => return Ok((got.width, got.height)),
                Some(d) => {
                    if Instant::now() >= deadline {
                        Picture::expected(got.width, got.height)
                            .save(&dir.join(format!("{name}.expected.png")));
                    }
                    d
                }
            },
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{name}: not the fb pattern after {SETTLE:?}: {problem}"
            ));
        }
        sleep(Duration::from_millis(250));
    }
}

// -------------------------------------------------------------------- runs --

/// Starts the guest in fb mode with a QMP socket, waits for its marker and
/// checks QEMU's screendump; then `also` (more checks while the picture is
/// held), ends QEMU over QMP and checks the guest's results. The picture's
/// size.
fn run_fb_guest(
    env: &Env,
    dir: &Path,
    name: &str,
    opts: GuestOpts,
    diag: &Diag,
    also: impl FnOnce((u32, u32)),
) -> (u32, u32) {
    let qmp_path = socket_path(&format!("{name}-qmp"));
    let _ = fs::remove_file(&qmp_path);
    let opts = GuestOpts {
        qmp: Some(&qmp_path),
        append: FB_APPEND,
        ..opts
    };
    let mut guest = Guest::start(env, dir, name, &opts, diag);
    guest.wait_for_line(fb_pattern::MARKER, Duration::from_secs(env.timeout));
    let marker_at = guest.started.elapsed();
    let mut qmp = Qmp::connect(&qmp_path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let shot = dir.join(format!("{name}.screendump.png"));
    let size = wait_for_pattern(dir, &format!("{name}.screendump"), || {
        qmp.screendump_png(&shot)?;
        Picture::load(&shot)
    })
    .unwrap_or_else(|e| panic!("QEMU's screendump ({}): {e}", shot.display()));
    note(&format!(
        "{}: {name}: marker at {:.1}s, screendump {}x{} matches",
        dir.file_name().unwrap_or_default().to_string_lossy(),
        marker_at.as_secs_f64(),
        size.0,
        size.1
    ));
    also(size);
    qmp.quit()
        .unwrap_or_else(|e| panic!("{name}: QMP quit: {e}"));
    let _ = fs::remove_file(&qmp_path);
    let (status, messages, results, _) = guest.wait();
    check_results(name, &results, &messages);
    let want = format!("PASS fb_pattern_written {}x{}", size.0, size.1);
    assert!(
        results.lines().any(|l| l == want),
        "{name}: no {want:?} in the guest's results:\n{results}"
    );
    assert!(
        status.success(),
        "{name}: run-guest.sh failed ({status}):\n{messages}"
    );
    size
}

// ------------------------------------------------------------------- tests --

/// QEMU's built-in virtio-gpu: the reference run.
#[test]
fn virtio_gpu_builtin_screendump() {
    let test = "virtio_gpu_builtin_screendump";
    let Some(env) = env(test) else { return };
    let diag = Diag::default();
    let dir = test_dir(env, test);
    run_fb_guest(
        env,
        &dir,
        "builtin",
        GuestOpts {
            builtin_virtio_gpu: true,
            ..GuestOpts::default()
        },
        &diag,
        |_| {},
    );
    drop(diag);
}

/// umdev-virtio-gpu over vhost-user: QEMU's screendump and umdev's own
/// scanout PNG both show the guest's picture.
#[test]
fn vhost_user_gpu_umdev() {
    let test = "vhost_user_gpu_umdev";
    let Some(env) = env(test) else { return };
    let diag = Diag::default();
    let dir = test_dir(env, test);
    // Another backend (QEMU's contrib vhost-user-gpu, say) checks the
    // harness and QEMU's side; it has no scanout PNG.
    let other = std::env::var_os("UMDEV_E2E_VIRTIO_GPU_BACKEND").map(PathBuf::from);
    let bin = match &other {
        Some(b) => b.clone(),
        None => workspace_binary(env, "umdev-virtio-gpu", "umdev-virtio-gpu")
            .unwrap_or_else(|e| panic!("e2e set-up failed: {e}")),
    };
    let socket = socket_path(test);
    let scanout: PathBuf = dir.join("umdev.scanout.png");
    let mut args = Vec::new();
    if other.is_none() {
        args.push("--scanout-png".to_owned());
        args.push(scanout.to_str().expect("UTF-8 path").to_owned());
    }
    if let Ok(extra) = std::env::var("UMDEV_E2E_VIRTIO_GPU_ARGS") {
        args.extend(extra.split_whitespace().map(str::to_owned));
    }
    let backend = Backend::start(&bin, &args, &socket, &dir.join("backend.log"), &diag);
    let sock = socket.to_str().expect("UTF-8 socket path");
    assert!(!sock.contains(','), "socket path with a comma: {sock}");
    run_fb_guest(
        env,
        &dir,
        "umdev",
        GuestOpts {
            memfd: true,
            qemu_args: vec![
                "-chardev".into(),
                format!("socket,id=gpu,path={sock}"),
                "-device".into(),
                "vhost-user-gpu-pci,chardev=gpu".into(),
            ],
            ..GuestOpts::default()
        },
        &diag,
        |size| {
            if other.is_some() {
                note(&format!("{test}: {} has no scanout PNG", bin.display()));
                return;
            }
            let got = wait_for_pattern(&dir, "umdev.scanout", || Picture::load(&scanout))
                .unwrap_or_else(|e| panic!("umdev's scanout PNG ({}): {e}", scanout.display()));
            assert_eq!(got, size, "umdev's scanout and QEMU's screendump sizes");
        },
    );
    drop(backend);
    drop(diag);
}

#[test]
fn pattern_round_trips_through_png() {
    let dir = common::TempDir::new();
    let want = Picture::expected(64, 48);
    let path = dir.path().join("p.png");
    want.save(&path);
    let got = Picture::load(&path).expect("decode");
    assert!(got.diff(&want).is_none());
    let mut other = Picture::expected(64, 48);
    other.rgb[3 * (64 * 5 + 7)] ^= 1;
    let d = other.diff(&want).expect("a difference");
    assert!(
        d.starts_with("1 of 3072 pixels differ; first: (7,5)"),
        "{d}"
    );
}
