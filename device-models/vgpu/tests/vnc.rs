//! `umdev-vgpu --vnc`: the real binary draws the test picture and a viewer
//! (our `umdev::vnc::client`) sees it pixel for pixel, then sees the next
//! change as an incremental update, and the mode change as DesktopSize.

mod driver;

use std::time::{Duration, Instant};

use driver::regs::*;
use driver::*;
use umdev::vnc::client::VncClient;
use umdev::vnc::rfb::{ENCODING_DESKTOP_SIZE, ENCODING_ZRLE};
use umdev::vnc::Listen;
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
