//! A hostile or broken vhost-user front-end against the real
//! `umdev-virtio-gpu` over its socket: guest memory taken away under the
//! device (descriptors, resource backing, the rings, the dirty log), memory
//! tables whose fds cannot be trusted, call and kick fds that would block, a
//! display socket nobody reads. After each attack the backend is alive,
//! serves a fresh front-end correctly, keeps its fds and RSS bounded, and
//! ends on SIGTERM within 1 s.

mod frontend;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use umdev_testkit::soak::{open_fds, rss_kib, terminate};

use frontend::{connect_bare, req, resp_type, Backend, Gpu, Options, BACKING_BASE};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const B8G8R8X8: u32 = 2;
const MIB: u64 = 1 << 20;
/// What the backend logs when guest memory goes away under it.
const MEMORY_LOST: &str = "the front-end took guest memory away (SIGBUS)";

/// What each open fd of `pid` is.
fn fd_list(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        Some(format!(
            "{}: {}",
            e.file_name().to_string_lossy(),
            link.display()
        ))
    })
    .collect()
}

/// Waits until the backend's log holds `what` at least `times` times.
fn wait_log(be: &Backend, what: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = be.log_text();
        if log.matches(what).count() >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the backend did not log {what:?} {times} times:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A started backend and its fd count once a first front-end came and went
/// (so that lazily made state is counted).
fn start() -> (Backend, usize) {
    let be = Backend::start(umdev_testkit::TempDir::new(), &[]);
    drop(Gpu::connect(&be.socket, Options::default()));
    wait_log(&be, "device reset for the next front-end", 1);
    std::thread::sleep(Duration::from_millis(50));
    let fds = open_fds(be.process.child.id());
    (be, fds)
}

/// What must hold after every attack: the backend runs; a fresh front-end
/// gets GET_DISPLAY_INFO answered from its display and a picture drawn onto
/// it; fds and RSS stay bounded; SIGTERM ends the process within 1 s.
fn still_sound(mut be: Backend, fds_before: usize) {
    assert!(be.alive(), "backend died:\n{}", be.log_text());
    let pid = be.process.child.id();
    {
        let mut gpu = Gpu::connect(&be.socket, Options::default());
        let r = gpu.display_info();
        assert_eq!(
            &r[24 + 8..24 + 20],
            &[128, 2, 0, 0, 224, 1, 0, 0, 1, 0, 0, 0],
            "640x480 from the display"
        );
        gpu.ok(&req::create_2d(1, B8G8R8X8, 8, 8));
        let pixels: Vec<u8> = (0..=255).collect();
        gpu.mem
            .write_slice(&pixels, GuestAddress(BACKING_BASE))
            .unwrap();
        gpu.ok(&req::attach(1, &[(BACKING_BASE, 256)]));
        gpu.ok(&req::transfer(1, [0, 0, 8, 8], 0));
        gpu.ok(&req::set_scanout(0, 1, [0, 0, 8, 8]));
        let expected: Vec<u8> = pixels
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2], 0])
            .collect();
        let display = gpu.display.as_ref().unwrap();
        display.wait_for("the picture", |s| s.picture == expected);
    }
    // The front-end's departure is processed: fds back to what they were.
    let deadline = Instant::now() + Duration::from_secs(5);
    let fds = loop {
        let n = open_fds(pid);
        if n <= fds_before {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "{n} fds, {fds_before} before: {:?}",
            fd_list(pid)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let rss = rss_kib(pid);
    assert!(rss < 96 * 1024, "RSS {rss} KiB over 96 MiB");
    let took = terminate(&mut be.process.child);
    eprintln!("fds {fds} (before {fds_before}), RSS {rss} KiB, SIGTERM took {took:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
}

fn unsealable() -> Options {
    Options {
        unsealable_memory: true,
        event_idx: false,
        ..Options::default()
    }
}

/// Guest memory shrunk under the device (a memfd it could not seal): the
/// request that meets the missing pages is dropped, logged, and the device
/// stops touching that memory; the next front-end is served.
#[test]
fn guest_memory_taken_away_under_the_device() {
    let (be, fds) = start();

    // Resource backing in the part that goes away.
    {
        let mut gpu = Gpu::connect(&be.socket, unsealable());
        gpu.ok(&req::create_2d(1, B8G8R8X8, 64, 64));
        gpu.mem
            .write_slice(&[0x5a; 64 * 64 * 4], GuestAddress(BACKING_BASE))
            .unwrap();
        gpu.ok(&req::attach(1, &[(BACKING_BASE, 64 * 64 * 4)]));
        // Rings and requests stay (below 1 MiB); the backing goes.
        gpu.mem_file.set_len(BACKING_BASE).unwrap();
        let used = gpu.used_idx(0);
        gpu.control_nowait(&req::transfer(1, [0, 0, 64, 64], 0), 24);
        wait_log(&be, MEMORY_LOST, 1);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            gpu.used_idx(0),
            used,
            "the request is dropped, not answered"
        );
        // The device does not touch that memory again.
        gpu.control_nowait(&req::cmd(0x0100, &[]), 408);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(gpu.used_idx(0), used);
    }

    // Descriptors pointing into the part that goes away.
    {
        let mut gpu = Gpu::connect(&be.socket, unsealable());
        // SET_MEM_TABLE taken (a file short already then is refused there).
        gpu.frontend.get_features().unwrap();
        gpu.mem_file.set_len(MIB).unwrap();
        gpu.submit_raw_nowait(0, &[(2 * MIB, 24, 0), (3 * MIB, 408, 2)]);
        wait_log(&be, MEMORY_LOST, 2);
    }

    // All of it, rings included.
    {
        let gpu = Gpu::connect(&be.socket, unsealable());
        gpu.frontend.get_features().unwrap();
        gpu.mem_file.set_len(0).unwrap();
        gpu.kick(0);
        wait_log(&be, MEMORY_LOST, 3);
    }

    // A memfd that allows sealing cannot be shrunk at all: the backend
    // sealed it at SET_MEM_TABLE.
    {
        let mut gpu = Gpu::connect(&be.socket, Options::default());
        gpu.frontend.get_features().unwrap();
        let e = gpu.mem_file.set_len(MIB).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
        gpu.display_info();
    }
    still_sound(be, fds);
}

/// The dirty log shrunk under the device while logging: the backend logs
/// it and goes on serving (the migration is the front-end's to lose).
#[test]
fn dirty_log_taken_away() {
    let (be, fds) = start();
    {
        let mut gpu = Gpu::connect(&be.socket, Options::default());
        let log = gpu.start_logging();
        log.file.set_len(0).unwrap();
        // The response write marks the log: SIGBUS there.
        gpu.display_info();
        wait_log(&be, "took the dirty log away", 1);
        gpu.display_info();
    }
    still_sound(be, fds);
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two new fds into `p`, which the OwnedFds take.
    unsafe {
        assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    }
}

fn set_nonblocking(fd: &impl AsRawFd, on: bool) {
    // SAFETY: fcntl with integer arguments on an fd of this test.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags), 0);
    }
}

/// Writes to `fd` until its buffer is full, then makes it blocking again:
/// a write from the backend would now block.
fn fill(fd: &impl AsRawFd) {
    set_nonblocking(fd, true);
    let chunk = [0u8; 4096];
    loop {
        // SAFETY: writes from a live buffer to an fd of this test.
        let n = unsafe { libc::write(fd.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
    }
    set_nonblocking(fd, false);
}

/// An fd dressed as the `EventFd` the vhost crate's front-end takes.
fn as_eventfd(fd: OwnedFd) -> EventFd {
    // SAFETY: the EventFd takes sole ownership of the fd.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

/// Call fds that would block the backend's signal (a full pipe, a full
/// socket, an eventfd whose counter is at its maximum) and a kick fd that is
/// a pipe: requests still complete and nothing blocks.
#[test]
fn call_and_kick_fds_that_would_block() {
    let (be, fds) = start();
    {
        // No EVENT_IDX: every pass signals.
        let mut gpu = Gpu::connect(
            &be.socket,
            Options {
                event_idx: false,
                ..Options::default()
            },
        );
        // A full pipe as the control queue's call fd.
        let (pipe_r, pipe_w) = pipe();
        fill(&pipe_w);
        let call0 = as_eventfd(pipe_w);
        gpu.frontend.set_vring_call(0, &call0).unwrap();
        // An eventfd whose counter is at u64::MAX - 1 (blocking) as the cursor
        // queue's.
        let call1 = EventFd::new(0).unwrap();
        call1.write(u64::MAX - 1).unwrap();
        gpu.frontend.set_vring_call(1, &call1).unwrap();
        gpu.frontend.get_features().unwrap(); // both taken
        let start = Instant::now();
        for _ in 0..20 {
            gpu.display_info();
            gpu.cursor(&req::cursor(true, 0, 1, 1, 0, (0, 0)));
        }
        eprintln!("40 requests in {:?}", start.elapsed());
        assert_eq!(call1.read().unwrap(), u64::MAX - 1, "signals coalesced");
        drop(pipe_r);

        // A full socket as the control queue's call fd.
        let (sock_ours, sock_theirs) = UnixStream::pair().unwrap();
        fill(&sock_theirs);
        let call0 = as_eventfd(OwnedFd::from(sock_theirs));
        gpu.frontend.set_vring_call(0, &call0).unwrap();
        for _ in 0..10 {
            gpu.display_info();
        }
        drop(sock_ours);
        wait_log(&be, "not an eventfd: refused", 1);

        // A pipe with 1 byte in it as the cursor queue's kick fd: refused
        // (the crate would wait for 7 more bytes forever), so the queue
        // stops; the control queue goes on.
        let (kick_r, kick_w) = pipe();
        // SAFETY: writes 1 byte from a live buffer to our pipe.
        let n = unsafe { libc::write(kick_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        assert_eq!(n, 1);
        let kick1 = as_eventfd(kick_r);
        gpu.frontend.set_vring_kick(1, &kick1).unwrap();
        gpu.frontend.get_features().unwrap();
        gpu.display_info();
        wait_log(&be, "kick fd is pipe", 1);
        drop(kick_w);
    }
    still_sound(be, fds);
}

/// A front-end without a display mode of its own whose display socket
/// nobody reads (the returned end), SET_SOCKET taken.
fn unread_display(be: &Backend) -> (Gpu, UnixStream) {
    let gpu = Gpu::connect(
        &be.socket,
        Options {
            display_mode: None,
            ..Options::default()
        },
    );
    let (unread, theirs) = UnixStream::pair().unwrap();
    gpu.set_gpu_socket(&theirs);
    drop(theirs);
    gpu.frontend.get_features().unwrap();
    (gpu, unread)
}

/// The display socket handed over and never read: the request that talks to
/// the display waits at most its deadline (1 s), the channel is closed, and
/// the device goes on with its own modes.
#[test]
fn display_socket_never_read() {
    let (be, fds) = start();
    // Never answered: GET_DISPLAY_INFO asks the display first.
    {
        let (mut gpu, _unread) = unread_display(&be);
        let start = Instant::now();
        let r = gpu.control(&req::cmd(0x0100, &[]), 408);
        let took = start.elapsed();
        assert_eq!(resp_type(&r), 0x1101);
        assert_eq!(
            u32::from_le_bytes(r[32..36].try_into().unwrap()),
            1024,
            "the device's own mode"
        );
        eprintln!("GET_DISPLAY_INFO with an unanswered display took {took:?}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        // The channel is closed now: no more waiting (a request that waited
        // would take the whole 1 s deadline; under load one may take a while,
        // never that).
        for r in [
            req::create_2d(1, B8G8R8X8, 512, 512),
            req::set_scanout(0, 1, [0, 0, 512, 512]),
        ] {
            let start = Instant::now();
            gpu.ok(&r);
            assert!(
                start.elapsed() < Duration::from_millis(900),
                "{:?}",
                start.elapsed()
            );
        }
        wait_log(&be, "display channel:", 1);
    }
    // Never read: a 1 MiB picture does not fit in the socket buffer.
    {
        let (mut gpu, _unread) = unread_display(&be);
        gpu.ok(&req::create_2d(1, B8G8R8X8, 512, 512));
        let start = Instant::now();
        gpu.ok(&req::set_scanout(0, 1, [0, 0, 512, 512]));
        let took = start.elapsed();
        eprintln!("SET_SCANOUT to an unread display took {took:?}");
        assert!(took < Duration::from_millis(2500), "{took:?}");
        // Closed after that: no flush waits for the display (each would take
        // the 1 s deadline).
        for _ in 0..10 {
            let start = Instant::now();
            gpu.ok(&req::flush(1, [0, 0, 512, 512]));
            assert!(
                start.elapsed() < Duration::from_millis(900),
                "{:?}",
                start.elapsed()
            );
        }
        wait_log(&be, "display channel:", 2);
    }
    still_sound(be, fds);
}

/// SIGTERM while a vring thread waits on a display nobody reads: the
/// process still ends within 1 s.
#[test]
fn sigterm_while_the_display_blocks() {
    let mut be = Backend::start(umdev_testkit::TempDir::new(), &[]);
    let (mut gpu, _unread) = unread_display(&be);
    gpu.ok(&req::create_2d(1, B8G8R8X8, 512, 512));
    gpu.control_nowait(&req::set_scanout(0, 1, [0, 0, 512, 512]), 24);
    std::thread::sleep(Duration::from_millis(200));
    let took = terminate(&mut be.process.child);
    eprintln!("SIGTERM with a vring thread blocked on the display took {took:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
    let status = be.process.child.try_wait().unwrap().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!be.socket.exists(), "socket file left behind");
    assert!(be.log_text().contains("did not stop within"));
}

fn region(fd: &impl AsRawFd, size: u64, offset: u64) -> VhostUserMemoryRegionInfo {
    VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: 0x7000_0000_0000,
        mmap_offset: offset,
        mmap_handle: fd.as_raw_fd(),
    }
}

/// SET_MEM_TABLE with fds whose memory cannot be trusted: each is refused
/// (an error reply, and the crate ends the connection), nothing is touched,
/// and the next front-end is served.
#[test]
fn memory_tables_with_untrusted_fds_are_refused() {
    let (be, fds) = start();
    let (pipe_r, _pipe_w) = pipe();
    let (sock, _peer) = UnixStream::pair().unwrap();
    let dev_zero = File::options()
        .read(true)
        .write(true)
        .open("/dev/zero")
        .unwrap();
    let short = umdev::memory::memfd_with("short", MIB, 0).unwrap();
    let cases: [(&str, VhostUserMemoryRegionInfo); 5] = [
        ("a pipe", region(&pipe_r, 16 * MIB, 0)),
        ("a socket", region(&sock, 16 * MIB, 0)),
        ("/dev/zero", region(&dev_zero, 16 * MIB, 0)),
        (
            "a file shorter than the region",
            region(&short, 16 * MIB, 0),
        ),
        (
            "an offset past the end of the file",
            region(&short, MIB, MIB),
        ),
    ];
    for (what, r) in cases {
        let f = connect_bare(&be.socket);
        f.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let result = f.set_mem_table(&[r]);
        eprintln!("SET_MEM_TABLE with {what}: {result:?}");
        assert!(result.is_err(), "{what} was accepted");
        drop(f);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The ones the crate mapped were refused by the glue.
    wait_log(&be, "memory table refused", 3);
    let log = be.log_text();
    assert!(log.contains("not a regular file or memfd"), "{log}");
    assert!(log.contains("the region needs"), "{log}");
    still_sound(be, fds);
}
