//! The VNC server over real sockets with our viewer (`umdev::vnc::client`):
//! handshake, Raw and ZRLE in several pixel formats, incremental updates of
//! only the changed tiles, DesktopSize, several viewers, authentication, and
//! hostile viewers that cannot stall the device or the other viewers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use umdev::vnc::client::VncClient;
use umdev::vnc::rfb::*;
use umdev::vnc::{Frame, FrameSource, Listen, VncConfig, VncError, VncPassword, VncServer};

/// A scanout the test draws on.
#[derive(Default)]
struct Screen {
    frame: Mutex<Option<Frame>>,
    captures: AtomicU64,
}

impl FrameSource for Screen {
    fn capture(&self) -> Option<Frame> {
        self.captures.fetch_add(1, Ordering::Relaxed);
        self.frame.lock().unwrap().clone()
    }
}

fn picture(w: u32, h: u32, seed: u8) -> Frame {
    let mut pixels = Vec::with_capacity((4 * w * h) as usize);
    for y in 0..h {
        for x in 0..w {
            pixels.extend([
                (x as u8).wrapping_mul(3) ^ seed,
                (y as u8).wrapping_add(seed),
                ((x + y) as u8) ^ 0x5a,
                0,
            ]);
        }
    }
    Frame {
        width: w,
        height: h,
        pixels,
    }
}

/// A server's configuration: `listen`, VNC auth with `password` if any.
fn config(listen: Listen, password: Option<&str>) -> VncConfig {
    VncConfig {
        listen,
        password: password.and_then(VncPassword::from_file_contents),
        fps: 60,
        name: "umdev test".into(),
    }
}

fn server(screen: &Arc<Screen>, password: Option<&str>) -> (VncServer, Listen) {
    let config = config(Listen::Tcp("127.0.0.1:0".parse().unwrap()), password);
    let s = VncServer::start(config, screen.clone()).unwrap();
    let at = Listen::Tcp(s.local_addr().unwrap());
    (s, at)
}

fn screen_with(frame: Frame) -> Arc<Screen> {
    let s = Arc::new(Screen::default());
    *s.frame.lock().unwrap() = Some(frame);
    s
}

/// Requests updates until the viewer's frame equals `want`.
fn until_equal(c: &mut VncClient, want: &Frame, incremental: bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.request(incremental).unwrap();
        c.read_update().unwrap();
        if &c.frame == want {
            return;
        }
        assert!(Instant::now() < deadline, "the viewer never got the frame");
    }
}

#[test]
fn raw_and_zrle_in_several_pixel_formats() {
    let f = picture(200, 130, 1);
    let screen = screen_with(f.clone());
    let (_s, at) = server(&screen, None);
    for encodings in [&[ENCODING_RAW][..], &[ENCODING_ZRLE, ENCODING_RAW]] {
        let mut c = VncClient::connect(&at, None).unwrap();
        assert_eq!((c.frame.width, c.frame.height), (200, 130));
        assert_eq!(c.name, "umdev test");
        c.set_encodings(encodings).unwrap();
        c.request(false).unwrap();
        let u = c.read_update().unwrap();
        assert_eq!(u.encodings, vec![encodings[0]]);
        assert_eq!(c.frame, f, "{encodings:?}");
    }
    // Big-endian RGB565 and 8-bit BGR233: the colours come back quantized.
    let formats = [
        PixelFormat {
            big_endian: true,
            ..PixelFormat::RGB565
        },
        PixelFormat {
            bits_per_pixel: 8,
            depth: 8,
            red_max: 7,
            green_max: 7,
            blue_max: 3,
            red_shift: 0,
            green_shift: 3,
            blue_shift: 6,
            ..PixelFormat::XRGB8888
        },
        PixelFormat {
            big_endian: true,
            red_shift: 24,
            green_shift: 16,
            blue_shift: 8,
            ..PixelFormat::XRGB8888
        },
    ];
    for pf in formats {
        for enc in [ENCODING_RAW, ENCODING_ZRLE] {
            let mut c = VncClient::connect(&at, None).unwrap();
            c.set_pixel_format(pf).unwrap();
            c.set_encodings(&[enc]).unwrap();
            c.request(false).unwrap();
            c.read_update().unwrap();
            let step = |max: u16| 255 / u32::from(max) + 1;
            for (got, want) in c.frame.pixels.chunks(4).zip(f.pixels.chunks(4)) {
                for (i, max) in [(0, pf.blue_max), (1, pf.green_max), (2, pf.red_max)] {
                    let d = u32::from(got[i].abs_diff(want[i]));
                    assert!(d <= step(max), "{pf:?} {enc}: {got:?} vs {want:?}");
                }
            }
        }
    }
}

#[test]
fn incremental_updates_carry_only_changed_tiles_and_new_sizes() {
    let f = picture(320, 200, 2);
    let screen = screen_with(f.clone());
    let (_s, at) = server(&screen, None);
    let mut c = VncClient::connect(&at, None).unwrap();
    c.set_encodings(&[ENCODING_ZRLE, ENCODING_DESKTOP_SIZE])
        .unwrap();
    until_equal(&mut c, &f, false);
    // One pixel changes: the next update is that tile alone.
    let mut g = f.clone();
    let at_px = 4 * (150 * 320 + 100);
    g.pixels[at_px..at_px + 4].copy_from_slice(&[1, 2, 3, 0]);
    *screen.frame.lock().unwrap() = Some(g.clone());
    c.request(true).unwrap();
    let u = c.read_update().unwrap();
    assert_eq!(u.rects, 1, "one 64x64 tile");
    assert_eq!(c.frame, g);
    // The mode changes: DesktopSize, then the whole new picture.
    let h = picture(160, 100, 3);
    *screen.frame.lock().unwrap() = Some(h.clone());
    c.request(true).unwrap();
    let u = c.read_update().unwrap();
    assert!(u.resized);
    assert_eq!(c.frame, h);
}

#[test]
fn several_viewers_at_once_and_one_that_never_reads() {
    let screen = screen_with(picture(640, 480, 4));
    let (s, at) = server(&screen, None);
    // A viewer that asks for whole frames and never reads them.
    let mut stuck = VncClient::connect(&at, None).unwrap();
    for _ in 0..64 {
        stuck.request(false).unwrap();
    }
    let mut viewers: Vec<VncClient> = (0..3)
        .map(|_| VncClient::connect(&at, None).unwrap())
        .collect();
    for round in 0..5u8 {
        let f = picture(640, 480, 10 + round);
        *screen.frame.lock().unwrap() = Some(f.clone());
        s.notify();
        for v in &mut viewers {
            until_equal(v, &f, true);
        }
    }
    assert!(screen.captures.load(Ordering::Relaxed) >= 5);
    assert!(s.stats().viewers.load(Ordering::SeqCst) >= 4);
    drop(stuck);
}

#[test]
fn vnc_authentication() {
    let f = picture(64, 64, 5);
    let screen = screen_with(f.clone());
    let (_s, at) = server(&screen, Some("sesame12"));
    let mut c = VncClient::connect(&at, Some("sesame12")).unwrap();
    until_equal(&mut c, &f, false);
    let e = VncClient::connect(&at, Some("wrong")).err().unwrap();
    assert!(e.to_string().contains("authentication failed"), "{e}");
    // No password for a non-loopback address: refused at start.
    let open = config(Listen::Tcp("0.0.0.0:0".parse().unwrap()), None);
    assert!(matches!(
        VncServer::start(open, screen.clone()),
        Err(VncError::NeedsPassword(_))
    ));
    assert!("nonsense".parse::<Listen>().is_err());
}

#[test]
fn unix_socket_and_scanout_off() {
    let dir = std::env::temp_dir().join(format!("umdev-vnc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vnc.sock");
    let screen = Arc::new(Screen::default());
    let s = VncServer::start(config(Listen::Unix(path.clone()), None), screen.clone()).unwrap();
    let mut c = VncClient::connect(&Listen::Unix(path.clone()), None).unwrap();
    // No scanout yet: a black 640x480 screen.
    assert_eq!((c.frame.width, c.frame.height), (640, 480));
    c.request(false).unwrap();
    c.read_update().unwrap();
    assert!(c.frame.pixels.iter().all(|&b| b == 0));
    drop(s);
    assert!(!path.exists(), "the socket file goes with the server");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raw bytes from a "viewer": the server must drop it, and keep serving.
fn hostile(at: &Listen, bytes: &[u8]) {
    let Listen::Tcp(addr) = at else {
        unreachable!()
    };
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    // The server answers what it can, then closes: read to the end.
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
fn hostile_viewers_are_dropped_and_the_others_keep_their_frames() {
    let f = picture(128, 64, 6);
    let screen = screen_with(f.clone());
    let (s, at) = server(&screen, None);
    let mut good = VncClient::connect(&at, None).unwrap();
    until_equal(&mut good, &f, false);
    let handshake = b"RFB 003.008\n\x01\x01";
    let mut huge_encodings = handshake.to_vec();
    huge_encodings.extend([2, 0, 0xff, 0xff]);
    huge_encodings.extend(std::iter::repeat_n(0u8, 4 * 0xffff));
    huge_encodings.extend([7u8]); // then an unknown message
    let mut colour_map = handshake.to_vec();
    colour_map.extend([0, 0, 0, 0, 8, 8, 0, 0, 0, 7, 0, 7, 0, 3, 0, 3, 6, 0, 0, 0]);
    let mut cut = handshake.to_vec();
    cut.extend([6, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]);
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"RFB 003.008\n\x02",
        b"RFB 003.008\n\x01\x01\xff",
        &huge_encodings,
        &colour_map,
        &cut,
        &[0u8; 3],
    ] {
        hostile(&at, bytes);
    }
    // Each is counted as its thread ends, just after its socket closes.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.stats().viewers_dropped.load(Ordering::Relaxed) < 7 {
        assert!(Instant::now() < deadline, "{:?}", s.stats());
        std::thread::sleep(Duration::from_millis(10));
    }
    let g = picture(128, 64, 7);
    *screen.frame.lock().unwrap() = Some(g.clone());
    until_equal(&mut good, &g, true);
}
