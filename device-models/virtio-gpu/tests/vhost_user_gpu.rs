//! `umdev-virtio-gpu` over a real vhost-user socket: negotiation, 2D commands,
//! the display channel, the dirty log, reconnect, driver reset, hostile input.

mod frontend;

use frontend::{req, resp_type, Backend, Gpu, Options, BACKING_BASE, OK_NODATA};
use vhost::vhost_user::VhostUserFrontend;
use vm_memory::{Bytes, GuestAddress};

const B8G8R8X8: u32 = 2;
const R8G8B8A8: u32 = 67;

/// The test picture: a function of (x, y) only, bytes B, G, R, X.
fn pixel(x: u32, y: u32) -> [u8; 4] {
    [((x * 3) ^ y) as u8, (y * 5) as u8, ((x + y) * 7) as u8, 0]
}

fn picture(w: u32, h: u32) -> Vec<u8> {
    (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| pixel(x, y)))
        .collect()
}

/// Writes the picture into guest memory at BACKING_BASE and returns backing
/// entries that scatter it over pages in reverse order (so gathering is tested).
fn scattered_backing(gpu: &Gpu, w: u32, h: u32) -> Vec<(u64, u32)> {
    let bytes = picture(w, h);
    let pages = bytes.len().div_ceil(4096);
    let mut entries = Vec::new();
    for i in 0..pages {
        let addr = BACKING_BASE + ((pages - 1 - i) as u64) * 8192;
        let chunk = &bytes[i * 4096..((i + 1) * 4096).min(bytes.len())];
        gpu.mem.write_slice(chunk, GuestAddress(addr)).unwrap();
        entries.push((addr, chunk.len() as u32));
    }
    entries
}

fn err(gpu: &mut Gpu, request: &[u8]) -> u32 {
    let t = resp_type(&gpu.control(request, 24));
    assert_ne!(t, OK_NODATA, "request {:x?} should fail", &request[..4]);
    t
}

/// Draws the test picture on scanout 0 through resource `id`.
fn draw(gpu: &mut Gpu, id: u32, w: u32, h: u32) {
    gpu.ok(&req::create_2d(id, B8G8R8X8, w, h));
    let entries = scattered_backing(gpu, w, h);
    gpu.ok(&req::attach(id, &entries));
    gpu.ok(&req::transfer(id, [0, 0, w, h], 0));
    gpu.ok(&req::set_scanout(0, id, [0, 0, w, h]));
    gpu.ok(&req::flush(id, [0, 0, w, h]));
}

fn decode_png(path: &std::path::Path) -> (u32, u32, Vec<u8>) {
    let pic = umdev::scanout::decode_png(&std::fs::read(path).unwrap()).unwrap();
    (pic.width, pic.height, pic.rgb)
}

fn rgb_of(bgrx: &[u8]) -> Vec<u8> {
    bgrx.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

#[test]
fn display_info_edid_and_config() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    // Config space: num_scanouts at offset 8.
    let (_, cfg) = gpu
        .frontend
        .get_config(
            0,
            16,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0; 16],
        )
        .unwrap();
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), 1);

    let r = gpu.display_info();
    // The display's mode (640x480), not the backend's default.
    assert_eq!(
        &r[24 + 8..24 + 20],
        &[128, 2, 0, 0, 224, 1, 0, 0, 1, 0, 0, 0]
    );
    let r = gpu.control(&req::cmd(0x010a, &[0, 0]), 24 + 8 + 1024);
    assert_eq!(resp_type(&r), 0x1104);
    assert_eq!(r[32 + 8], 0x42, "EDID forwarded from the display");
    assert_eq!(err(&mut gpu, &req::cmd(0x010a, &[1, 0])), 0x1205);
}

#[test]
fn default_mode_and_own_edid_without_a_display() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &["--mode", "800x600"]);
    let mut gpu = Gpu::connect(
        &backend.socket,
        Options {
            display_mode: None,
            event_idx: false,
            ..Options::default()
        },
    );
    let r = gpu.control(&req::cmd(0x0100, &[]), 408);
    assert_eq!(u32::from_le_bytes(r[32..36].try_into().unwrap()), 800);
    assert_eq!(u32::from_le_bytes(r[36..40].try_into().unwrap()), 600);
    let r = gpu.control(&req::cmd(0x010a, &[0, 0]), 24 + 8 + 1024);
    assert_eq!(u32::from_le_bytes(r[24..28].try_into().unwrap()), 128);
    let edid = &r[32..160];
    assert_eq!(edid.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
    // Drawing works without a display too; the PNG is still written.
    draw(&mut gpu, 1, 40, 30);
    let (w, h, rgb) = decode_png(&backend.png);
    assert_eq!((w, h), (40, 30));
    assert_eq!(rgb, rgb_of(&picture(40, 30)));
}

#[test]
fn picture_reaches_display_and_png_pixel_for_pixel() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    let (w, h) = (200, 150);
    draw(&mut gpu, 7, w, h);
    let display = gpu.display.as_ref().unwrap();
    display.wait_for("the picture", |s| {
        s.width == w && s.height == h && s.picture == picture(w, h)
    });
    let (pw, ph, rgb) = decode_png(&backend.png);
    assert_eq!((pw, ph), (w, h));
    assert_eq!(rgb, rgb_of(&picture(w, h)));

    // A partial update: change a rectangle in guest memory, transfer and flush
    // only it; the display composes it at the right place.
    let entries = scattered_backing(&gpu, w, h);
    let (x0, y0, rw, rh) = (10u32, 20u32, 30u32, 5u32);
    let stride = w * 4;
    let mut expected = picture(w, h);
    for y in y0..y0 + rh {
        for x in x0..x0 + rw {
            let off = (y * stride + x * 4) as usize;
            // Find the guest address of this byte in the scattered backing.
            let (page, within) = (off / 4096, off % 4096);
            let addr = entries[page].0 + within as u64;
            let px = [0x11, 0x22, 0x33, 0];
            gpu.mem.write_slice(&px, GuestAddress(addr)).unwrap();
            expected[off..off + 4].copy_from_slice(&px);
        }
    }
    let offset = u64::from(y0 * stride + x0 * 4);
    gpu.ok(&req::transfer(7, [x0, y0, rw, rh], offset));
    gpu.ok(&req::flush(7, [x0, y0, rw, rh]));
    let display = gpu.display.as_ref().unwrap();
    display.wait_for("the partial update", |s| s.picture == expected);
    assert_eq!(decode_png(&backend.png).2, rgb_of(&expected));
}

#[test]
fn formats_are_converted_and_fences_echoed() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    // One R8G8B8A8 pixel row: bytes R, G, B, A.
    gpu.ok(&req::create_2d(3, R8G8B8A8, 2, 1));
    gpu.mem
        .write_slice(&[1, 2, 3, 4, 5, 6, 7, 8], GuestAddress(BACKING_BASE))
        .unwrap();
    gpu.ok(&req::attach(3, &[(BACKING_BASE, 8)]));
    gpu.ok(&req::transfer(3, [0, 0, 2, 1], 0));
    gpu.ok(&req::set_scanout(0, 3, [0, 0, 2, 1]));
    let r = gpu.control(
        &req::with_hdr(0x0104, req::FLAG_FENCE, 0xfeed, &[0, 0, 2, 1, 3, 0]),
        24,
    );
    assert_eq!(resp_type(&r), OK_NODATA);
    assert_eq!(
        u32::from_le_bytes(r[4..8].try_into().unwrap()),
        req::FLAG_FENCE
    );
    assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 0xfeed);
    let display = gpu.display.as_ref().unwrap();
    display.wait_for("converted pixels", |s| {
        s.picture.get(..8) == Some(&[3, 2, 1, 0, 7, 6, 5, 0][..])
    });
}

#[test]
fn hostile_commands_get_error_responses_and_the_backend_lives() {
    let mut backend = Backend::start(umdev_testkit::TempDir::new(), &["--max-hostmem-mib", "4"]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    const INVALID_RESOURCE: u32 = 0x1203;
    const INVALID_PARAMETER: u32 = 0x1205;
    const OUT_OF_MEMORY: u32 = 0x1201;
    const UNSPEC: u32 = 0x1200;
    // Resources never created.
    assert_eq!(
        err(&mut gpu, &req::transfer(99, [0, 0, 1, 1], 0)),
        INVALID_RESOURCE
    );
    assert_eq!(
        err(&mut gpu, &req::flush(99, [0, 0, 1, 1])),
        INVALID_RESOURCE
    );
    assert_eq!(
        err(&mut gpu, &req::attach(99, &[(BACKING_BASE, 4096)])),
        INVALID_RESOURCE
    );
    assert_eq!(err(&mut gpu, &req::unref(99)), INVALID_RESOURCE);
    assert_eq!(
        err(&mut gpu, &req::set_scanout(0, 99, [0, 0, 1, 1])),
        INVALID_RESOURCE
    );
    assert_eq!(
        err(&mut gpu, &req::create_2d(0, B8G8R8X8, 1, 1)),
        INVALID_RESOURCE
    );
    // Sizes and formats.
    assert_eq!(
        err(&mut gpu, &req::create_2d(1, 999, 8, 8)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::create_2d(1, B8G8R8X8, 0, 8)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::create_2d(1, B8G8R8X8, u32::MAX, u32::MAX)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::create_2d(1, B8G8R8X8, 4096, 4096)),
        OUT_OF_MEMORY
    );
    gpu.ok(&req::create_2d(1, B8G8R8X8, 16, 16));
    assert_eq!(
        err(&mut gpu, &req::create_2d(1, B8G8R8X8, 16, 16)),
        INVALID_RESOURCE
    );
    // Backing outside guest memory, overflowing, or too many entries.
    let outside = frontend::MEM_SIZE - 100;
    assert_eq!(
        err(&mut gpu, &req::attach(1, &[(outside, 4096)])),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::attach(1, &[(u64::MAX - 10, 4096)])),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::cmd(0x0106, &[1, 100_000])),
        INVALID_PARAMETER
    );
    // A transfer without backing, then past the backing, then past the resource.
    assert_eq!(
        err(&mut gpu, &req::transfer(1, [0, 0, 16, 16], 0)),
        INVALID_PARAMETER
    );
    gpu.ok(&req::attach(1, &[(BACKING_BASE, 512)]));
    assert_eq!(
        err(&mut gpu, &req::attach(1, &[(BACKING_BASE, 512)])),
        UNSPEC
    );
    assert_eq!(
        err(&mut gpu, &req::transfer(1, [0, 0, 16, 16], 0)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::transfer(1, [8, 0, 9, 1], 0)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::transfer(1, [0, 0, 1, 1], u64::MAX - 2)),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::flush(1, [0, 0, 17, 1])),
        INVALID_PARAMETER
    );
    assert_eq!(
        err(&mut gpu, &req::set_scanout(0, 1, [0, 0, 0, 0])),
        INVALID_PARAMETER
    );
    assert_eq!(err(&mut gpu, &req::set_scanout(5, 1, [0, 0, 1, 1])), 0x1202);
    // Unknown, unsupported, short and empty requests.
    assert_eq!(err(&mut gpu, &req::cmd(0x7777, &[])), UNSPEC);
    assert_eq!(err(&mut gpu, &req::cmd(0x0200, &[])), UNSPEC);
    assert_eq!(err(&mut gpu, &req::cmd(0x0101, &[1, 2])), UNSPEC);
    assert_eq!(resp_type(&gpu.control(&[1, 2, 3], 24)), UNSPEC);
    // A response buffer too small for GET_DISPLAY_INFO: cut, not overrun.
    let r = gpu.control(&req::cmd(0x0100, &[]), 30);
    assert_eq!(r.len(), 30);
    // A chain pointing outside guest memory: consumed with length 0.
    assert_eq!(
        gpu.submit_raw(0, &[(frontend::MEM_SIZE + 0x1000, 24, 0), (0x20000, 24, 2)]),
        0
    );
    // A cursor on a resource of the wrong size, on a missing scanout: ignored.
    gpu.cursor(&req::cursor(false, 0, 1, 1, 1, (0, 0)));
    gpu.cursor(&req::cursor(true, 9, 1, 1, 0, (0, 0)));
    // Still alive and working.
    gpu.ok(&req::detach(1));
    gpu.ok(&req::unref(1));
    draw(&mut gpu, 2, 8, 8);
    assert!(backend.alive(), "backend died:\n{}", backend.log_text());
}

#[test]
fn cursor_updates_and_moves() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    gpu.ok(&req::create_2d(9, B8G8R8X8, 64, 64));
    let entries = scattered_backing(&gpu, 64, 64);
    gpu.ok(&req::attach(9, &entries));
    gpu.ok(&req::transfer(9, [0, 0, 64, 64], 0));
    gpu.cursor(&req::cursor(false, 0, 100, 50, 9, (3, 4)));
    gpu.cursor(&req::cursor(true, 0, 120, 60, 0, (0, 0)));
    gpu.cursor(&req::cursor(false, 0, 0, 0, 0, (0, 0)));
    let display = gpu.display.as_ref().unwrap();
    display.wait_for("cursor messages", |s| {
        s.cursor_updates.len() == 1 && s.cursor_moves.len() == 2
    });
    let s = display.state.lock().unwrap();
    let (scanout, x, y, hx, hy, image) = &s.cursor_updates[0];
    assert_eq!((*scanout, *x, *y, *hx, *hy), (0, 100, 50, 3, 4));
    let expected: Vec<u8> = picture(64, 64)
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2], 0xff])
        .collect();
    assert_eq!(image, &expected);
    assert_eq!(s.cursor_moves[0], (0, 120, 60, true));
    assert_eq!(s.cursor_moves[1], (0, 0, 0, false), "hidden");
}

#[test]
fn dirty_log_marks_backend_writes_only_while_logging() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    let log = gpu.start_logging();
    log.clear();
    gpu.display_info();
    let dirty = log.dirty_pages();
    // The response buffer (scratch area) and the control queue's used ring.
    let response_page = frontend::SCRATCH / 4096;
    let used_ring_page = (0x1000 + 0x2000) / 4096;
    assert!(dirty.contains(&response_page), "{dirty:?}");
    assert!(dirty.contains(&used_ring_page), "{dirty:?}");
    // Nothing the backend only read (the request, the backing).
    gpu.ok(&req::create_2d(1, B8G8R8X8, 32, 32));
    let entries = scattered_backing(&gpu, 32, 32);
    gpu.ok(&req::attach(1, &entries));
    gpu.ok(&req::transfer(1, [0, 0, 32, 32], 0));
    let backing_pages: Vec<u64> = entries.iter().map(|e| e.0 / 4096).collect();
    assert!(
        log.dirty_pages().iter().all(|p| !backing_pages.contains(p)),
        "backing pages were only read"
    );

    // Logging off (migration over): no page is marked any more.
    gpu.set_logging(false);
    log.clear();
    gpu.control(&req::cmd(0x0100, &[]), 408);
    gpu.ok(&req::flush(1, [0, 0, 32, 32]));
    assert_eq!(log.dirty_pages(), Vec::<u64>::new(), "logging is off");

    // And on again.
    gpu.set_logging(true);
    gpu.control(&req::cmd(0x0100, &[]), 408);
    assert!(log.dirty_pages().contains(&response_page));
}

#[test]
fn reconnect_serves_a_fresh_device() {
    let mut backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    {
        let mut gpu = Gpu::connect(&backend.socket, Options::default());
        draw(&mut gpu, 1, 16, 16);
        // Leave mid-session, with the resource alive.
    }
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    // Resource 1 does not exist for the new front-end: it can be created again.
    draw(&mut gpu, 1, 24, 24);
    let display = gpu.display.as_ref().unwrap();
    display.wait_for("the new picture", |s| s.picture == picture(24, 24));
    assert!(backend.alive());
    assert!(backend
        .log_text()
        .contains("device reset for the next front-end"));
}

#[test]
fn driver_reset_is_noticed_by_ring_restart() {
    let backend = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let mut gpu = Gpu::connect(&backend.socket, Options::default());
    draw(&mut gpu, 1, 16, 16);
    gpu.cursor(&req::cursor(true, 0, 1, 1, 0, (0, 0)));
    // Stop and restart where the rings were (a VM stop/cont): state kept.
    assert_eq!(err(&mut gpu, &req::create_2d(1, B8G8R8X8, 16, 16)), 0x1203);
    gpu.restart_rings();
    // Rings from 0 on fresh memory: a new driver; its resource 1 is new.
    gpu.ok(&req::create_2d(1, B8G8R8X8, 8, 8));
    gpu.cursor(&req::cursor(true, 0, 2, 2, 0, (0, 0)));
    // The cursor queue restarting too must not reset the device again.
    assert_eq!(err(&mut gpu, &req::create_2d(1, B8G8R8X8, 8, 8)), 0x1203);
    assert!(backend.log_text().contains("the driver reset the device"));
}
