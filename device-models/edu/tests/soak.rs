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

use umdev_testkit as common;
use umdev_testkit::soak as soak_support;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{Backend, MemfdRam};
use soak_support::{settled, Departures, Rng, Run, Tally};
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
/// Where resource attacks map memory that the client then shrinks to nothing.
const ATTACK_GPA: u64 = 0x900_0000;
const GUARD: u8 = 0xa5;
const DEFAULT_SEED: u64 = 0x5eed_0000_0de5;

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(31).wrapping_add(7)
}

#[derive(Default, Debug)]
struct Stats {
    clients: u64,
    wire: Tally,
    dma_started: u64,
    dma_checked: u64,
    maps: u64,
    unmaps: u64,
    /// Memory shrunk under the device and then touched by its DMA.
    attacks: u64,
    left: Departures,
}

/// What one client knows about the device and its memory.
struct Session {
    c: Client,
    raw: UnixStream,
    mapped: [bool; REGIONS],
    /// The device's DMA buffer, when known.
    buffer: Option<Vec<u8>>,
    _eventfds: Vec<EventFd>,
    /// Resources of the attacks (`soak_support::resources`), kept until we go.
    kept: soak_support::resources::Kept,
}

/// Ends a client: Err means the connection is gone (the server ended it).
type Step = Result<(), ClientError>;

fn enable(s: &mut Session, stats: &mut Stats) -> Step {
    stats
        .wire
        .req(s.c.region_write(CONFIG, 0x04, &0x0006u16.to_le_bytes()))?;
    Ok(())
}

/// Waits (bounded) for the edu DMA engine to go idle; false if it did not.
fn dma_idle(s: &mut Session, stats: &mut Stats) -> Result<bool, ClientError> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let cmd = stats
            .wire
            .req(s.c.read_u64(BAR0, reg::DMA_CMD))?
            .unwrap_or(0);
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
        stats.wire.req(s.c.write_u64(BAR0, r, v))?;
    }
    stats.dma_started += 1;
    stats.wire.req(s.c.write_u64(BAR0, reg::DMA_CMD, cmd))?;
    Ok(())
}

/// One random valid action, or a malformed message that must be refused.
fn action(s: &mut Session, rng: &mut Rng, stats: &mut Stats, ram: &MemfdRam) -> Step {
    match rng.below(17) {
        // Registers.
        0 => {
            let id = stats.wire.req(s.c.read_u32(BAR0, reg::ID))?;
            if let Some(id) = id {
                assert!(id == ID_VALUE || id == u32::MAX, "ID {id:#x}");
            }
        }
        1 => {
            let v = rng.next() as u32;
            stats.wire.req(s.c.write_u32(BAR0, reg::LIVENESS, v))?;
            if let Some(back) = stats.wire.req(s.c.read_u32(BAR0, reg::LIVENESS))? {
                assert!(back == !v || back == u32::MAX, "liveness");
            }
        }
        2 => {
            stats
                .wire
                .req(s.c.write_u32(BAR0, reg::FACTORIAL, rng.below(12) as u32))?;
            stats
                .wire
                .req(s.c.write_u32(BAR0, reg::IRQ_RAISE, 1 << rng.below(8)))?;
            stats
                .wire
                .req(s.c.write_u32(BAR0, reg::IRQ_ACK, u32::MAX))?;
        }
        3 => {
            let off = rng.below(64) * 4;
            stats.wire.req(s.c.region_read(CONFIG, off, 4))?;
        }
        // Memory: map or unmap a region with its fd, or fd-less memory.
        4 | 5 => {
            let k = rng.below(REGIONS as u64) as usize;
            let gpa = BASE + k as u64 * REGION;
            if s.mapped[k] {
                stats.unmaps += 1;
                if stats.wire.req(s.c.dma_unmap(gpa, REGION, 0))?.is_some() {
                    s.mapped[k] = false;
                }
            } else {
                stats.maps += 1;
                let at = k as u64 * REGION;
                if stats
                    .wire
                    .req(s.c.dma_map(gpa, REGION, Some(ram.fd()), at, RW))?
                    .is_some()
                {
                    s.mapped[k] = true;
                }
            }
        }
        6 => {
            stats.maps += 1;
            stats
                .wire
                .req(s.c.dma_map(MESSAGE_GPA, 0x1_0000, None, 0, RW))?;
        }
        7 => {
            stats.unmaps += 1;
            if stats
                .wire
                .req(s.c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL))?
                .is_some()
            {
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
                if stats.wire.req(s.c.dma_unmap(region, REGION, 0))?.is_some() {
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
            stats.wire.req(s.c.set_irq_eventfds(
                index,
                0,
                &[std::os::fd::AsRawFd::as_raw_fd(&e)],
            ))?;
            s._eventfds.push(e);
        }
        12 => {
            stats.wire.req(s.c.reset())?;
            s.buffer = Some(vec![0; DMA_BUF_SIZE]);
            enable(s, stats)?;
        }
        // Resources that fight back: memory shrunk under the device (which
        // then DMAs from it), fds that are not what they claim.
        16 => {
            let attack = soak_support::resources::attack(
                &mut s.c,
                rng,
                &mut stats.wire,
                ATTACK_GPA,
                &[0, 1],
                &mut s.kept,
            )?;
            if let Some(gpa) = attack {
                stats.attacks += 1;
                if dma_idle(s, stats)? {
                    let count = 1 + rng.below(DMA_BUF_SIZE as u64);
                    program_dma(s, stats, gpa, DMA_BUF_ADDR, count, DMA_CMD_RUN)?;
                    // Loaded from what is left of the memory, or failed.
                    s.buffer = None;
                    dma_idle(s, stats)?;
                    stats.wire.req(s.c.dma_unmap(gpa, 0x1_0000, 0))?;
                }
            }
        }
        _ => soak_support::malformed(&mut s.c, rng, &mut stats.wire, BASE)?,
    }
    Ok(())
}

/// How a client leaves.
fn leave(s: Session, rng: &mut Rng, stats: &mut Stats) {
    let mut raw = s.raw;
    let d = &mut stats.left;
    match rng.below(5) {
        0 => soak_support::leave_mid_header(&mut raw, rng, d),
        1 => soak_support::leave_mid_payload(&mut raw, rng, d),
        2 => {
            // A DMA started, memory unmapped, and gone without waiting.
            let cmd = DMA_CMD_RUN | DMA_CMD_TO_RAM;
            soak_support::post_region_write(&mut raw, BAR0, reg::DMA_CMD, &cmd.to_le_bytes());
            d.abrupt += 1;
        }
        3 => soak_support::leave_by_server(&mut raw, rng, d),
        _ => d.clean += 1,
    }
    drop(s.c);
    drop(raw);
}

#[test]
fn many_hostile_clients_leave_the_backend_as_they_found_it() {
    let run = Run::from_env(DEFAULT_SEED, 1500, 20);
    let seed = run.seed;
    let mut rng = Rng(seed);
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
    while run.another(stats.clients, started) {
        stats.clients += 1;
        let (raw, mut c) = soak_support::connect(&be.socket, Duration::from_secs(10));
        // Most clients negotiate; some start with junk or a bad VERSION.
        let negotiated = soak_support::negotiate_or_junk(&mut c, &mut rng, 90, &mut stats.wire);
        let mut s = Session {
            c,
            raw,
            mapped: [false; REGIONS],
            buffer: Some(vec![0; DMA_BUF_SIZE]),
            _eventfds: Vec::new(),
            kept: Vec::new(),
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
    let end = settled(pid);
    let (fds1, rss1) = end;
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
    soak_support::assert_as_found((fds0, rss0), end);
    assert!(stats.dma_checked > 0, "no DMA was checked: {stats:?}");
    assert!(touched_slots > 0);
    assert!(!be.log().contains("panicked"), "{}", be.log());
}
