//! What the soak tests share (the edu soak, `device-models/vgpu/tests/soak.rs`
//! against `umdev-vgpu`) and the hostile-VMM tests: the random source, the backend's fd
//! and resident-memory measurement, the run's size from the environment, the
//! malformed vfio-user messages and the ways a client leaves mid-message.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use umdev::vfio_user::client::ClientError;
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;

/// splitmix64: small, fixed, good enough to pick actions.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // an endless stream, not an iterator
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A positive integer from the environment (`UMDEV_SOAK_*`), else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A soak run's size: its seed, how many clients at most, and how long it
/// may take, from `UMDEV_SOAK_SEED`, `UMDEV_SOAK_CLIENTS` and
/// `UMDEV_SOAK_SECS`, else the test's defaults.
pub struct Run {
    pub seed: u64,
    pub max_clients: u64,
    pub budget: Duration,
}

impl Run {
    /// The run's size from the environment; also quiets the backend's log
    /// (`RUST_LOG` warn unless set): logging every message at debug level
    /// would dominate the run.
    pub fn from_env(seed: u64, clients: u64, secs: u64) -> Run {
        std::env::set_var(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        );
        Run {
            seed: env_u64("UMDEV_SOAK_SEED", seed),
            max_clients: env_u64("UMDEV_SOAK_CLIENTS", clients),
            budget: Duration::from_secs(env_u64("UMDEV_SOAK_SECS", secs)),
        }
    }

    /// Whether another client comes, `clients` having come since `started`:
    /// at least 20, then while within the budget, never more than the maximum.
    pub fn another(&self, clients: u64, started: Instant) -> bool {
        clients < self.max_clients && (clients < 20 || started.elapsed() < self.budget)
    }
}

/// A soak client at `socket`: its raw stream (reads time out after
/// `timeout`) and a [`Client`] on a clone of it.
pub fn connect(socket: &std::path::Path, timeout: Duration) -> (UnixStream, Client) {
    let raw = UnixStream::connect(socket).expect("connect");
    raw.set_read_timeout(Some(timeout)).unwrap();
    let c = Client::from_stream(raw.try_clone().unwrap()).unwrap();
    (raw, c)
}

/// A client's first message: in `percent` of cases VERSION negotiation
/// (true if it succeeded), else a VERSION of up to 40 random bytes, which
/// the server must refuse (false).
pub fn negotiate_or_junk(c: &mut Client, rng: &mut Rng, percent: u64, tally: &mut Tally) -> bool {
    tally.messages += 1;
    if rng.chance(percent) {
        c.negotiate(&umdev::vfio_user::caps::Capabilities::new(
            16,
            1 << 20,
            64,
            true,
        ))
        .is_ok()
    } else {
        tally.malformed += 1;
        let n = rng.below(40) as usize;
        let junk = rng.bytes(n);
        let _ = c.request_raw(Command::Version as u16, &junk);
        false
    }
}

/// Asserts that the backend's (fds, RSS KiB) at the end are as after the
/// first client: the same fds, resident memory within 4 MiB.
pub fn assert_as_found(first: (usize, u64), end: (usize, u64)) {
    let ((fds0, rss0), (fds1, rss1)) = (first, end);
    assert_eq!(fds1, fds0, "fds leaked");
    assert!(
        rss1 <= rss0 + 4096,
        "resident memory grew from {rss0} KiB to {rss1} KiB"
    );
}

/// Messages sent, how many were malformed, and how many got an error reply.
#[derive(Default, Debug, Clone, Copy)]
pub struct Tally {
    pub messages: u64,
    pub malformed: u64,
    pub error_replies: u64,
}

/// Whether a client error means the connection is gone (no errno: not a reply).
pub fn gone(e: &ClientError) -> bool {
    e.errno().is_none()
}

impl Tally {
    /// Counts a request: an error reply is counted and becomes `None`, a lost
    /// connection is returned.
    pub fn req<T>(&mut self, r: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
        self.messages += 1;
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if gone(&e) => Err(e),
            Err(_) => {
                self.error_replies += 1;
                Ok(None)
            }
        }
    }
}

/// Sends one malformed message the server must refuse with an error reply
/// and nothing else (none of them can act on memory or the device): random
/// payloads of commands that cannot, short payloads of those that can, a
/// REGION_WRITE whose count disagrees with its data, out-of-range regions and
/// offsets, SET_IRQS past the vectors, DMA_MAP with bad flags (at `map_at` +
/// up to 4 MiB, zero-sized or not), an oversized REGION_READ. Err only if the
/// connection is gone.
pub fn malformed(
    c: &mut Client,
    rng: &mut Rng,
    tally: &mut Tally,
    map_at: u64,
) -> Result<(), ClientError> {
    tally.malformed += 1;
    let r = match rng.below(8) {
        // Random bytes as the payload of a command that cannot act on memory
        // or the device's registers (unknown, server-only, info queries).
        0 | 1 => {
            const HARMLESS: [u16; 12] = [0, 1, 4, 5, 6, 7, 11, 12, 14, 16, 17, 18];
            let command = if rng.chance(20) {
                19 + rng.below(1000) as u16
            } else {
                HARMLESS[rng.below(HARMLESS.len() as u64) as usize]
            };
            let len = rng.below(64) as usize;
            let payload = rng.bytes(len);
            c.request_raw(command, &payload).map(|_| ())
        }
        // Short payloads of the commands that do act.
        2 => {
            let command = [2u16, 3, 8, 9, 10, 15][rng.below(6) as usize];
            let len = rng.below(8) as usize;
            c.request_raw(command, &rng.bytes(len)).map(|_| ())
        }
        // REGION_WRITE whose count disagrees with its data.
        3 => {
            let p = access_payload(0, 0x98, 8, &[0xff; 4]);
            c.request_raw(Command::RegionWrite as u16, &p).map(|_| ())
        }
        // Out-of-range accesses.
        4 => c
            .region_read(rng.below(12) as u32 + 1, rng.next() >> 8, 4)
            .map(|_| ()),
        // SET_IRQS with ranges past the vectors.
        5 => c
            .set_irqs(
                rng.below(6) as u32,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                1 + rng.below(4) as u32,
                rng.next() as u32 | 1,
                &[],
                &[],
            )
            .map(|_| ()),
        // DMA_MAP with bad flags, zero-sized or not.
        6 => c
            .dma_map(
                map_at + rng.below(0x40_0000),
                rng.below(2) * 0x1000,
                None,
                0,
                0xf0,
            )
            .map(|_| ()),
        // An oversized REGION_READ.
        _ => c.region_read(0, 0, (2 << 20) + 1).map(|_| ()),
    };
    tally.messages += 1;
    match r {
        Ok(()) => Ok(()),
        Err(e) if gone(&e) => Err(e),
        Err(_) => {
            tally.error_replies += 1;
            Ok(())
        }
    }
}

/// How a client left.
#[derive(Default, Debug, Clone, Copy)]
pub struct Departures {
    pub clean: u64,
    pub mid_header: u64,
    pub mid_payload: u64,
    /// With device work just started (the model's own way).
    pub abrupt: u64,
    pub by_server: u64,
}

/// Leaves mid-header: 1-15 random bytes of a header, then nothing.
pub fn leave_mid_header(raw: &mut UnixStream, rng: &mut Rng, d: &mut Departures) {
    let n = 1 + rng.below(15) as usize;
    let _ = raw.write_all(&rng.bytes(n));
    d.mid_header += 1;
}

/// Leaves mid-payload: a REGION_WRITE header announcing more than is sent.
pub fn leave_mid_payload(raw: &mut UnixStream, rng: &mut Rng, d: &mut Departures) {
    let header = Header {
        msg_id: 0xbeef,
        command: Command::RegionWrite as u16,
        size: (HEADER_SIZE + 64 + rng.below(1 << 20) as usize) as u32,
        flags: FLAGS_TYPE_COMMAND,
        error: 0,
    };
    let _ = raw.write_all(header.as_bytes());
    let n = rng.below(64) as usize;
    let _ = raw.write_all(&rng.bytes(n));
    d.mid_payload += 1;
}

/// A header whose size is smaller than a header (truncated): the server ends
/// the session; waits until it has.
pub fn leave_by_server(raw: &mut UnixStream, rng: &mut Rng, d: &mut Departures) {
    let header = Header {
        msg_id: 1,
        command: 4,
        size: rng.below(HEADER_SIZE as u64) as u32,
        flags: 0,
        error: 0,
    };
    let _ = raw.write_all(header.as_bytes());
    let _ = raw.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(raw, &mut sink);
    d.by_server += 1;
}

/// Writes a REGION_WRITE of `data` at `offset` of `region` without asking for
/// a reply (a doorbell or DMA start just before leaving).
pub fn post_region_write(raw: &mut UnixStream, region: u32, offset: u64, data: &[u8]) {
    let header = Header {
        msg_id: 0xbef0,
        command: Command::RegionWrite as u16,
        size: (HEADER_SIZE + 16 + data.len()) as u32,
        flags: FLAGS_TYPE_COMMAND | FLAGS_NO_REPLY,
        error: 0,
    };
    let _ = raw.write_all(header.as_bytes());
    let _ = raw.write_all(&access_payload(region, offset, data.len() as u32, data));
}

/// A REGION_READ or REGION_WRITE payload: the access (`count` bytes at
/// `offset` of `region`), then `data` (which a malformed one makes disagree
/// with `count`).
pub fn access_payload(region: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    let access = RegionAccess {
        offset,
        region,
        count,
    };
    let mut p = access.as_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Waits until the backend has finished with the last client (its fd count no
/// longer changes), then returns (fds, RSS KiB).
pub fn settled(pid: u32) -> (usize, u64) {
    let mut last = open_fds(pid);
    let mut stable = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stable < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        let now = open_fds(pid);
        stable = if now == last { stable + 1 } else { 0 };
        last = now;
    }
    (last, rss_kib(pid))
}

/// Sends SIGTERM to `pid` and waits for it to end: how long that took. Fails
/// the test after 5 s (the promise is 1 s; the caller asserts that).
pub fn terminate(child: &mut std::process::Child) -> Duration {
    let start = Instant::now();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the backend did not end within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Resources that misbehave after the backend accepted them, as a hostile VMM
/// hands them over (docs/robustness.md, "Resources that fight back").
pub mod resources {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    use umdev::memory::MappedMemfd;

    /// A pipe (read end, write end), its buffer filled to the brim so that a
    /// blocking write would never return.
    pub fn full_pipe() -> (OwnedFd, OwnedFd) {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two new fds into `p`, which the OwnedFds take;
        // the writes are non-blocking and from a live buffer.
        unsafe {
            assert_eq!(
                libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK),
                0
            );
            let chunk = [0u8; 4096];
            while libc::write(p[1], chunk.as_ptr().cast(), chunk.len()) > 0 {}
            let flags = libc::fcntl(p[1], libc::F_GETFL);
            libc::fcntl(p[1], libc::F_SETFL, flags & !libc::O_NONBLOCK);
            (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
        }
    }

    /// A connected socket pair whose first end's send buffer is full.
    pub fn full_socket() -> (
        std::os::unix::net::UnixStream,
        std::os::unix::net::UnixStream,
    ) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let chunk = [0u8; 4096];
        while std::io::Write::write(&mut &a, &chunk).is_ok() {}
        a.set_nonblocking(false).unwrap();
        (a, b)
    }

    /// An eventfd whose counter is at its maximum: one more increment blocks
    /// (or fails, non-blocking).
    pub fn saturated_eventfd() -> OwnedFd {
        // SAFETY: eventfd2 with integer arguments; the OwnedFd takes the fd;
        // the write is 8 bytes from a live u64 and does not block (count 0).
        unsafe {
            let fd = OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC));
            let max: u64 = u64::MAX - 1;
            assert_eq!(
                libc::write(fd.as_raw_fd(), (&max as *const u64).cast(), 8),
                8
            );
            fd
        }
    }

    /// Guest RAM nobody can seal, so the VMM can shrink it under the backend.
    pub fn unsealable_ram(len: usize) -> MappedMemfd {
        MappedMemfd::unsealable("hostile-ram", len).expect("memfd")
    }

    /// Shrinks the file behind `ram` to `len` bytes (pages past it are gone:
    /// the backend's next touch of them is SIGBUS).
    pub fn shrink(ram: &MappedMemfd, len: u64) -> std::io::Result<()> {
        ram.file().set_len(len)
    }

    /// A character device (size unknowable, mapping it maps device memory).
    pub fn char_device() -> std::fs::File {
        std::fs::File::open("/dev/zero").expect("/dev/zero")
    }

    /// A hugetlb memfd of `len` bytes, if this kernel makes one (it needs no
    /// reserved pages to exist; touching it without them is SIGBUS).
    pub fn hugetlb_memfd(len: u64) -> Option<std::fs::File> {
        umdev::memory::memfd_with("hostile-huge", len, libc::MFD_HUGETLB).ok()
    }

    /// Free 2 MiB huge pages on this host.
    pub fn free_huge_pages() -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("HugePages_Free:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn raw<T: AsRawFd>(fd: &T) -> RawFd {
        fd.as_raw_fd()
    }

    /// What a client keeps alive until it leaves (memfds, eventfds, pipes).
    pub type Kept = Vec<Box<dyn std::any::Any>>;

    /// One resource attack at guest address `gpa` (a free 64 KiB range):
    /// memory shared and then shrunk to nothing (returned: the caller makes
    /// the device touch it), or fds that must be refused at DMA_MAP or
    /// SET_IRQS, or a saturated interrupt eventfd on one of `irq_indices`.
    pub fn attack(
        c: &mut super::Client,
        rng: &mut super::Rng,
        tally: &mut super::Tally,
        gpa: u64,
        irq_indices: &[u32],
        kept: &mut Kept,
    ) -> Result<Option<u64>, super::ClientError> {
        use super::*;
        const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        const LEN: u64 = 0x1_0000;
        let trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        let irq = irq_indices[rng.below(irq_indices.len() as u64) as usize];
        tally.malformed += 1;
        match rng.below(6) {
            0 => {
                let ram = unsealable_ram(LEN as usize);
                let mapped = tally.req(c.dma_map(gpa, LEN, Some(ram.fd()), 0, RW))?;
                shrink(&ram, rng.below(2) * 0x1000).unwrap();
                kept.push(Box::new(ram));
                return Ok(mapped.map(|_| gpa));
            }
            1 => {
                let (r, w) = full_pipe();
                tally.req(c.dma_map(gpa, LEN, Some(raw(&r)), 0, RW))?;
                tally.req(c.set_irqs(irq, trigger, 0, 1, &[raw(&w)], &[]))?;
                kept.push(Box::new((r, w)));
            }
            2 => {
                let (a, b) = full_socket();
                tally.req(c.dma_map(gpa, LEN, Some(raw(&a)), 0, RW))?;
                tally.req(c.set_irqs(irq, trigger, 0, 1, &[raw(&a)], &[]))?;
                kept.push(Box::new((a, b)));
            }
            3 => {
                let dev = char_device();
                tally.req(c.dma_map(gpa, LEN, Some(raw(&dev)), rng.next() & !0xfff, RW))?;
            }
            4 => {
                let short = unsealable_ram(0x1000);
                tally.req(c.dma_map(gpa, LEN, Some(short.fd()), 0, RW))?;
            }
            _ => {
                let full = saturated_eventfd();
                tally.req(c.set_irqs(irq, trigger, 0, 1, &[raw(&full)], &[]))?;
                kept.push(Box::new(full));
            }
        }
        Ok(None)
    }
}
