//! The live view of the real `umdev-vgpu`: `--vnc` (it draws the test
//! picture and a viewer, our `umdev::vnc::client`, sees it pixel for pixel,
//! then the next change as an incremental update, and the mode change as
//! DesktopSize) and `--metrics` (every family present, the counters move,
//! hostile HTTP clients get errors).

mod driver;

use std::time::{Duration, Instant};

use driver::regs::*;
use driver::*;
use umdev::vnc::client::VncClient;
use umdev::vnc::rfb::{ENCODING_DESKTOP_SIZE, ENCODING_ZRLE};
use umdev::vnc::Listen;
use umdev_vgpu::encode as cmd;
use umdev_vgpu::picture;

/// The picture's visible pixels (the stride's padding left out).
fn visible(fb: &[u8], width: u32, height: u32, stride: u32) -> Vec<u8> {
    (0..height as usize)
        .flat_map(|y| {
            let at = y * stride as usize;
            fb[at..at + 4 * width as usize].to_vec()
        })
        .collect()
}

/// Asks for updates until the viewer shows `want`.
fn until_shown(c: &mut VncClient, want: &[u8], size: (u32, u32)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        c.request(true).unwrap();
        c.read_update().unwrap();
        if (c.frame.width, c.frame.height) == size && c.frame.pixels == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the viewer never showed the picture"
        );
    }
}

#[test]
fn a_viewer_sees_the_scanout_pixel_for_pixel() {
    let dir = TempDir::new();
    let socket = dir.path().join("vnc.sock");
    let mut gpu = Vgpu::start_with(Options {
        extra_args: vec!["--vnc".into(), format!("unix:{}", socket.display())],
        ..Options::default()
    });
    let mut ctx = gpu.context_with_ring(0, 1 << 18);
    prepare_picture(&mut gpu, &ctx);
    let seqs = draw(&mut ctx, &mut gpu, picture::SCENE);
    gpu.wait_fence(0, *seqs.last().unwrap(), TIMEOUT).unwrap();
    // The scanout shows the framebuffer (GGTT entries 0.. map VRAM 0..).
    let fb_pages = (picture::FB_BYTES as u64).div_ceil(PAGE);
    for i in 0..fb_pages {
        gpu.ggtt_write(i, ggtt_entry(Target::Vram(i * PAGE), false));
    }
    gpu.scanout_write(SCANOUT_FB_ADDR, 0);
    gpu.scanout_write(SCANOUT_FB_WIDTH, picture::WIDTH);
    gpu.scanout_write(SCANOUT_FB_HEIGHT, picture::HEIGHT);
    gpu.scanout_write(SCANOUT_FB_STRIDE, picture::STRIDE);
    gpu.scanout_write(SCANOUT_FB_FORMAT, FB_FORMAT_XRGB8888);
    gpu.scanout_write(SCANOUT_FB_ENABLE, 1);

    let mut c = VncClient::connect(&Listen::Unix(socket.clone()), None).unwrap();
    assert_eq!(c.name, "umdev-vgpu");
    c.set_encodings(&[ENCODING_ZRLE, ENCODING_DESKTOP_SIZE])
        .unwrap();
    let want = visible(
        &picture::render(),
        picture::WIDTH,
        picture::HEIGHT,
        picture::STRIDE,
    );
    until_shown(&mut c, &want, (picture::WIDTH, picture::HEIGHT));

    // The GPU fills a rectangle: the viewer gets the tiles it touched.
    let op = picture::Op::Rect {
        x: 10,
        y: 10,
        w: 20,
        h: 20,
        color: 0x00ff_8000,
    };
    let seq = draw(&mut ctx, &mut gpu, &[op]);
    gpu.wait_fence(0, seq[0], TIMEOUT).unwrap();
    let mut ops = picture::SCENE.to_vec();
    ops.push(op);
    let want = visible(
        &picture::render_ops(&ops),
        picture::WIDTH,
        picture::HEIGHT,
        picture::STRIDE,
    );
    until_shown(&mut c, &want, (picture::WIDTH, picture::HEIGHT));

    // The guest changes the mode: DesktopSize, then the smaller picture.
    gpu.scanout_write(SCANOUT_FB_WIDTH, 64);
    gpu.scanout_write(SCANOUT_FB_HEIGHT, 32);
    let want = visible(&picture::render_ops(&ops), 64, 32, picture::STRIDE);
    until_shown(&mut c, &want, (64, 32));
    assert!(gpu.backend.alive());
}

use umdev_testkit::metrics::{has_family, http as http_get, sample as find, VGPU_FAMILIES};

/// The value of the sample `series` (name and labels) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    find(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn metrics_have_every_family_and_move_with_the_workload() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = TempDir::new();
    let socket = dir.path().join("vnc.sock");
    let mut gpu = Vgpu::start_with(Options {
        extra_args: vec![
            "--metrics".into(),
            format!("127.0.0.1:{port}"),
            "--vnc".into(),
            format!("unix:{}", socket.display()),
        ],
        ..Options::default()
    });
    let (status, before) = http_get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    for &family in VGPU_FAMILIES {
        assert!(has_family(&before, family), "no {family}:\n{before}");
    }
    // A workload: a picture, a remap the shadow follows, a fault, a viewer.
    let mut ctx = gpu.context_with_ring(0, 1 << 18);
    prepare_picture(&mut gpu, &ctx);
    let seqs = draw(&mut ctx, &mut gpu, &picture::SCENE[..4]);
    gpu.wait_fence(0, *seqs.last().unwrap(), TIMEOUT).unwrap();
    let page = ctx.pt.map_new(&mut gpu, 0x3000_0000, 1, true);
    ctx.pt
        .map(&mut gpu, 0x3000_0000, Target::Ram(page + PAGE), true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(0x3000_0000, 1)]);
    ctx.run_fault(&mut gpu, &[cmd::store_dword(0x7000_0000, 1)]);
    let mut c = VncClient::connect(&Listen::Unix(socket.clone()), None).unwrap();
    c.request(false).unwrap();
    c.read_update().unwrap();
    let (_, after) = http_get(port, b"GET /metrics HTTP/1.0\r\n\r\n");
    for series in [
        "umdev_region_writes_total{region=\"bar0\"}",
        "umdev_region_reads_total{region=\"bar0\"}",
        "umdev_dma_read_bytes_total{path=\"fd\"}",
        "umdev_dma_written_bytes_total{path=\"fd\"}",
        "umdev_pagetrack_syncs_total{source=\"scan\"}",
        "umdev_pagetrack_pages_compared_total",
        "umdev_pagetrack_track_writes_total",
        "umdev_vgpu_submissions_total",
        "umdev_vgpu_audits_total",
        "umdev_vgpu_fences_total",
        "umdev_vgpu_faults_total{reason=\"not_present\"}",
        "umdev_vgpu_shadow_updates_total",
        "umdev_vgpu_engine_busy_seconds_total",
        "umdev_vnc_viewers_total{display=\"umdev-vgpu\"}",
        "umdev_vnc_sent_bytes_total{display=\"umdev-vgpu\"}",
    ] {
        let b = if before.lines().any(|l| l.starts_with(series)) {
            sample(&before, series)
        } else {
            0.0
        };
        let a = sample(&after, series);
        assert!(a > b, "{series}: {b} -> {a}");
    }
    // Set-up happened before the first scrape: counted, not moving.
    for series in [
        "umdev_region_writes_total{region=\"config\"}",
        "umdev_dma_maps_total",
        "umdev_dma_regions",
    ] {
        assert!(sample(&after, series) > 0.0, "{series}");
    }
    // Hostile clients: an error each, and the endpoint still answers.
    for bad in [
        &b"POST /metrics HTTP/1.1\r\n\r\n"[..],
        b"GET /metrics\r\n\r\n",
        &[b'A'; 20000][..],
        b"\x00\x01\x02",
    ] {
        let (status, _) = http_get(port, bad);
        // A head over the limit may be cut off by a reset instead.
        let reset = status.is_empty() && bad.len() > 8192;
        assert!(status.starts_with("HTTP/1.1 400") || reset, "{status:?}");
    }
    assert_eq!(
        http_get(port, b"GET / HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    // One that sends nothing is dropped after the request timeout.
    let idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (status, _) = http_get(port, b"GET /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(idle);
    assert!(gpu.backend.alive());
}
