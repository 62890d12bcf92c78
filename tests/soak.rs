//! Soak: many clients in turn against the real `umdev-edu` (seccomp on, as
//! shipped), each sending a random mix of valid and malformed messages and
//! leaving at a random point, mid-message included, while memfd DMA regions are
//! mapped and unmapped under a running edu DMA workload.
//!
//! At the end the server still answers, its open fds are exactly what they were
//! after the first client, its resident memory is within a small tolerance of
//! that level, and no byte of guest memory outside what the workload asked the
//! device to write has changed (guard bytes), while every DMA that ran with its
//! memory mapped wrote exactly the data the device held.
//!
//! Fixed seed and bounded in count and time: `UMDEV_SOAK_SEED`,
//! `UMDEV_SOAK_CLIENTS` and `UMDEV_SOAK_SECS` change them for a longer local run.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Backend, MemfdRam};
use umdev::vfio_user::client::ClientError;
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_BUF_SIZE, DMA_CMD_RUN, DMA_CMD_TO_RAM, ID_VALUE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// Guest RAM: `REGIONS` regions of 1 MiB at `BASE`, each mapped (when mapped)
/// from the same offset of one memfd, so a guest address always means the same
/// memfd byte.
const BASE: u64 = 0x100_0000;
const REGION: u64 = 0x10_0000;
const REGIONS: usize = 4;
/// In each region: where the DMA writes go (slot + 0..256) and where the
/// device buffer is loaded from (never written).
const SLOT: u64 = 0x4_0000;
const SLOT_SPREAD: u64 = 256;
const SOURCE: u64 = 0x8_0000;
/// Guest memory reached only by DMA messages (no fd): the client answers
/// the server's requests with an error.
const MESSAGE_GPA: u64 = 0x800_0000;
const GUARD: u8 = 0xa5;
const DEFAULT_SEED: u64 = 0x5eed_0000_0de5;

/// splitmix64: small, fixed, good enough to pick actions.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7)
}

#[derive(Default, Debug)]
struct Stats {
    clients: u64,
    messages: u64,
    malformed: u64,
    error_replies: u64,
    dma_started: u64,
    dma_checked: u64,
    maps: u64,
    unmaps: u64,
    ended_clean: u64,
    ended_mid_header: u64,
    ended_mid_payload: u64,
    ended_abrupt: u64,
    ended_by_server: u64,
}

/// What one client knows about the device and its memory.
struct Session {
    c: Client,
    raw: UnixStream,
    mapped: [bool; REGIONS],
    /// The device's DMA buffer, when known.
    buffer: Option<Vec<u8>>,
    _eventfds: Vec<EventFd>,
}

/// Ends a client: Err means the connection is gone (the server ended it).
type Step = Result<(), ClientError>;

fn gone(e: &ClientError) -> bool {
    e.errno().is_none()
}

/// Runs a request; an error reply is counted, a lost connection returned.
fn req<T>(stats: &mut Stats, r: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    stats.messages += 1;
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if gone(&e) => Err(e),
        Err(_) => {
            stats.error_replies += 1;
            Ok(None)
        }
    }
}

fn enable(s: &mut Session, stats: &mut Stats) -> Step {
    req(
        stats,
        s.c.region_write(CONFIG, 0x04, &0x0006u16.to_le_bytes()),
    )?;
    Ok(())
}

/// Waits (bounded) for the edu DMA engine to go idle; false if it did not.
fn dma_idle(s: &mut Session, stats: &mut Stats) -> Result<bool, ClientError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let cmd = req(stats, s.c.read_u64(BAR0, reg::DMA_CMD))?.unwrap_or(0);
        if cmd & DMA_CMD_RUN == 0 {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn program_dma(
    s: &mut Session,
    stats: &mut Stats,
    src: u64,
    dst: u64,
    count: u64,
    cmd: u64,
) -> Step {
    for (r, v) in [
        (reg::DMA_SRC, src),
        (reg::DMA_DST, dst),
        (reg::DMA_COUNT, count),
    ] {
        req(stats, s.c.write_u64(BAR0, r, v))?;
    }
    stats.dma_started += 1;
    req(stats, s.c.write_u64(BAR0, reg::DMA_CMD, cmd))?;
    Ok(())
}

/// One random valid action, or a malformed message that must be refused.
fn action(s: &mut Session, rng: &mut Rng, stats: &mut Stats, ram: &MemfdRam) -> Step {
    match rng.below(16) {
        // Registers.
        0 => {
            let id = req(stats, s.c.read_u32(BAR0, reg::ID))?;
            if let Some(id) = id {
                assert!(id == ID_VALUE || id == u32::MAX, "ID {id:#x}");
            }
        }
        1 => {
            let v = rng.next() as u32;
            req(stats, s.c.write_u32(BAR0, reg::LIVENESS, v))?;
            if let Some(back) = req(stats, s.c.read_u32(BAR0, reg::LIVENESS))? {
                assert!(back == !v || back == u32::MAX, "liveness");
            }
        }
        2 => {
            req(
                stats,
                s.c.write_u32(BAR0, reg::FACTORIAL, rng.below(12) as u32),
            )?;
            req(
                stats,
                s.c.write_u32(BAR0, reg::IRQ_RAISE, 1 << rng.below(8)),
            )?;
            req(stats, s.c.write_u32(BAR0, reg::IRQ_ACK, u32::MAX))?;
        }
        3 => {
            let off = rng.below(64) * 4;
            req(stats, s.c.region_read(CONFIG, off, 4))?;
        }
        // Memory: map or unmap a region with its fd, or fd-less memory.
        4 | 5 => {
            let k = rng.below(REGIONS as u64) as usize;
            let gpa = BASE + k as u64 * REGION;
            if s.mapped[k] {
                stats.unmaps += 1;
                if req(stats, s.c.dma_unmap(gpa, REGION, 0))?.is_some() {
                    s.mapped[k] = false;
                }
            } else {
                stats.maps += 1;
                let at = k as u64 * REGION;
                if req(stats, s.c.dma_map(gpa, REGION, Some(ram.fd()), at, RW))?.is_some() {
                    s.mapped[k] = true;
                }
            }
        }
        6 => {
            stats.maps += 1;
            req(stats, s.c.dma_map(MESSAGE_GPA, 0x1_0000, None, 0, RW))?;
        }
        7 => {
            stats.unmaps += 1;
            if req(stats, s.c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL))?.is_some() {
                s.mapped = [false; REGIONS];
            }
        }
        // The DMA workload: load the device buffer from a source area, write
        // part of it to a slot, and check what landed when nothing raced it.
        8..=10 => {
            if !dma_idle(s, stats)? {
                return Ok(());
            }
            let k = rng.below(REGIONS as u64) as usize;
            let region = BASE + k as u64 * REGION;
            if rng.chance(30) {
                let was_mapped = s.mapped[k];
                program_dma(
                    s,
                    stats,
                    region + SOURCE,
                    DMA_BUF_ADDR,
                    DMA_BUF_SIZE as u64,
                    DMA_CMD_RUN,
                )?;
                if dma_idle(s, stats)? && was_mapped {
                    s.buffer = Some((0..DMA_BUF_SIZE).map(pattern).collect());
                }
                return Ok(());
            }
            let to_message = rng.chance(10);
            let dst = if to_message {
                MESSAGE_GPA + rng.below(0x1000)
            } else {
                region + SLOT + rng.below(SLOT_SPREAD)
            };
            let count = 1 + rng.below(DMA_BUF_SIZE as u64);
            let offset = rng.below(DMA_BUF_SIZE as u64 - count + 1);
            let cmd = DMA_CMD_RUN | DMA_CMD_TO_RAM;
            let mapped = s.mapped[k];
            // Sometimes the region goes away while the DMA may be running.
            let race = !to_message && mapped && rng.chance(25);
            program_dma(s, stats, DMA_BUF_ADDR + offset, dst, count, cmd)?;
            if race {
                stats.unmaps += 1;
                if req(stats, s.c.dma_unmap(region, REGION, 0))?.is_some() {
                    s.mapped[k] = false;
                }
                return Ok(());
            }
            if dma_idle(s, stats)? && mapped && !to_message {
                if let Some(buffer) = &s.buffer {
                    let at = (dst - BASE) as usize;
                    let want = &buffer[offset as usize..(offset + count) as usize];
                    assert_eq!(
                        &ram.bytes()[at..at + count as usize],
                        want,
                        "DMA of {count} bytes to {dst:#x} wrote other data"
                    );
                    stats.dma_checked += 1;
                }
            }
        }
        11 => {
            // Interrupts with eventfds: the backend must close them when we go.
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            let index = rng.below(2) as u32;
            req(
                stats,
                s.c.set_irqs(
                    index,
                    IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    0,
                    1,
                    &[std::os::fd::AsRawFd::as_raw_fd(&e)],
                    &[],
                ),
            )?;
            s._eventfds.push(e);
        }
        12 => {
            req(stats, s.c.reset())?;
            s.buffer = Some(vec![0; DMA_BUF_SIZE]);
            enable(s, stats)?;
        }
        _ => malformed(s, rng, stats)?,
    }
    Ok(())
}

/// A message the server must refuse with an error reply (and nothing else).
fn malformed(s: &mut Session, rng: &mut Rng, stats: &mut Stats) -> Step {
    stats.malformed += 1;
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
            s.c.request_raw(command, &payload).map(|_| ())
        }
        // Short payloads of the commands that do act.
        2 => {
            let command = [2u16, 3, 8, 9, 10, 15][rng.below(6) as usize];
            let len = rng.below(8) as usize;
            s.c.request_raw(command, &rng.bytes(len)).map(|_| ())
        }
        // REGION_WRITE whose count disagrees with its data.
        3 => {
            let access = RegionAccess {
                offset: 0x98,
                region: BAR0,
                count: 8,
            };
            let mut p = access.as_bytes().to_vec();
            p.extend_from_slice(&[0xff; 4]);
            s.c.request_raw(Command::RegionWrite as u16, &p).map(|_| ())
        }
        // Out-of-range accesses.
        4 => {
            s.c.region_read(rng.below(12) as u32 + 1, rng.next() >> 8, 4)
                .map(|_| ())
        }
        // SET_IRQS with ranges past the vectors.
        5 => {
            s.c.set_irqs(
                rng.below(6) as u32,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                1 + rng.below(4) as u32,
                rng.next() as u32 | 1,
                &[],
                &[],
            )
            .map(|_| ())
        }
        // DMA_MAP with bad flags, overlapping, or zero-sized.
        6 => {
            s.c.dma_map(
                BASE + rng.below(0x40_0000),
                rng.below(2) * 0x1000,
                None,
                0,
                0xf0,
            )
            .map(|_| ())
        }
        // An oversized REGION_READ.
        _ => s.c.region_read(BAR0, 0, (2 << 20) + 1).map(|_| ()),
    };
    stats.messages += 1;
    match r {
        Ok(()) => Ok(()),
        Err(e) if gone(&e) => Err(e),
        Err(_) => {
            stats.error_replies += 1;
            Ok(())
        }
    }
}

/// How a client leaves.
fn leave(s: Session, rng: &mut Rng, stats: &mut Stats) {
    let mut raw = s.raw;
    match rng.below(5) {
        0 => {
            // Mid-header.
            let n = 1 + rng.below(15) as usize;
            let _ = raw.write_all(&rng.bytes(n));
            stats.ended_mid_header += 1;
        }
        1 => {
            // Mid-payload: a header announcing more than is sent.
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
            stats.ended_mid_payload += 1;
        }
        2 => {
            // A DMA started, memory unmapped, and gone without waiting.
            let header = Header {
                msg_id: 0xbef0,
                command: Command::RegionWrite as u16,
                size: (HEADER_SIZE + 16 + 8) as u32,
                flags: FLAGS_TYPE_COMMAND | FLAGS_NO_REPLY,
                error: 0,
            };
            let access = RegionAccess {
                offset: reg::DMA_CMD,
                region: BAR0,
                count: 8,
            };
            let _ = raw.write_all(header.as_bytes());
            let _ = raw.write_all(access.as_bytes());
            let _ = raw.write_all(&(DMA_CMD_RUN | DMA_CMD_TO_RAM).to_le_bytes());
            stats.ended_abrupt += 1;
        }
        3 => {
            // A header smaller than a header: the server ends the session.
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
            let _ = std::io::Read::read_to_end(&mut raw, &mut sink);
            stats.ended_by_server += 1;
        }
        _ => stats.ended_clean += 1,
    }
    drop(s.c);
    drop(raw);
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
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
fn settled(pid: u32) -> (usize, u64) {
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

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn many_hostile_clients_leave_the_backend_as_they_found_it() {
    let seed = env_u64("UMDEV_SOAK_SEED", DEFAULT_SEED);
    let max_clients = env_u64("UMDEV_SOAK_CLIENTS", 1500);
    let budget = Duration::from_secs(env_u64("UMDEV_SOAK_SECS", 20));
    let mut rng = Rng(seed);
    // Logging every message at debug level would dominate the run.
    std::env::set_var(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    let mut be = Backend::edu();
    let pid = be.child.id();
    let mut ram = MemfdRam::new(REGIONS * REGION as usize);
    ram.bytes_mut().fill(GUARD);
    for k in 0..REGIONS {
        let at = k * REGION as usize + SOURCE as usize;
        for i in 0..DMA_BUF_SIZE {
            ram.bytes_mut()[at + i] = pattern(i);
        }
    }
    let mut stats = Stats::default();
    let mut baseline = None;
    let started = Instant::now();
    while stats.clients < max_clients && (stats.clients < 20 || started.elapsed() < budget) {
        stats.clients += 1;
        let raw = UnixStream::connect(&be.socket).expect("connect");
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client::from_stream(raw.try_clone().unwrap()).unwrap();
        // Most clients negotiate; some start with junk or a bad VERSION.
        let negotiated = if rng.chance(90) {
            stats.messages += 1;
            c.negotiate(&umdev::vfio_user::caps::Capabilities::new(
                16,
                1 << 20,
                64,
                true,
            ))
            .is_ok()
        } else {
            stats.messages += 1;
            stats.malformed += 1;
            let n = rng.below(40) as usize;
            let junk = rng.bytes(n);
            let _ = c.request_raw(Command::Version as u16, &junk);
            false
        };
        let mut s = Session {
            c,
            raw,
            mapped: [false; REGIONS],
            buffer: Some(vec![0; DMA_BUF_SIZE]),
            _eventfds: Vec::new(),
        };
        let steps = if negotiated { 5 + rng.below(60) } else { 0 };
        let mut alive = !negotiated || enable(&mut s, &mut stats).is_ok();
        for _ in 0..steps {
            if !alive {
                break;
            }
            alive = action(&mut s, &mut rng, &mut stats, &ram).is_ok();
        }
        if !alive && negotiated {
            panic!(
                "client {} lost its connection to the backend\n{}",
                stats.clients,
                be.log()
            );
        }
        leave(s, &mut rng, &mut stats);
        if baseline.is_none() {
            baseline = Some(settled(pid));
        }
        assert!(be.alive(), "backend died\n{}", be.log());
    }
    let (fds0, rss0) = baseline.unwrap();
    // The server still answers.
    let mut c = be.connect();
    c.region_write(CONFIG, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    drop(c);
    let (fds1, rss1) = settled(pid);
    // Guard bytes: only the slots were ever DMA targets, sources never.
    let bytes = ram.bytes();
    let mut touched_slots = 0;
    for k in 0..REGIONS {
        let region = k * REGION as usize;
        let slot = region + SLOT as usize..region + (SLOT + SLOT_SPREAD) as usize + DMA_BUF_SIZE;
        let source = region + SOURCE as usize..region + SOURCE as usize + DMA_BUF_SIZE;
        for (i, &byte) in bytes
            .iter()
            .enumerate()
            .take(region + REGION as usize)
            .skip(region)
        {
            if slot.contains(&i) {
                continue;
            }
            let want = if source.contains(&i) {
                pattern(i - source.start)
            } else {
                GUARD
            };
            assert_eq!(byte, want, "guest byte {:#x} changed", BASE + i as u64);
        }
        if bytes[slot].iter().any(|&b| b != GUARD) {
            touched_slots += 1;
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "soak: seed {seed:#x}, {elapsed:.1?}: {stats:?}\n\
         soak: after client 1: {fds0} fds, VmRSS {rss0} KiB; at the end: {fds1} fds, \
         VmRSS {rss1} KiB; {touched_slots}/{REGIONS} DMA slots written"
    );
    assert_eq!(fds1, fds0, "fds leaked");
    assert!(
        rss1 <= rss0 + 4096,
        "resident memory grew from {rss0} KiB to {rss1} KiB"
    );
    assert!(stats.dma_checked > 0, "no DMA was checked: {stats:?}");
    assert!(touched_slots > 0);
    assert!(!be.log().contains("panicked"), "{}", be.log());
}
