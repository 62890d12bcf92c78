//! Soak under a running vGPU workload: many clients in turn against the real
//! `umdev-vgpu` (seccomp on, as shipped). Each negotiates, maps guest RAM as
//! eight memfd DMA regions, builds page tables, two contexts and their rings,
//! and runs submissions (FILL, COPY, BLIT, STORE_DWORD, FENCE) into workload
//! target pages, while regions (the one holding the tables and rings included)
//! are unmapped under the running engine and mapped again, page-table entries
//! are rewritten, and valid and malformed vfio-user messages are interleaved,
//! some of them while a submission runs. It leaves at a random point: cleanly,
//! mid-header, mid-payload, right after a doorbell, or with a truncated header
//! the server ends the session on.
//!
//! Checked: every submission that completed without a fault wrote exactly what
//! it asked for and nothing else (all of guest RAM compared with a model); one
//! that faulted wrote nothing outside its destinations and its fence, and
//! nothing at all unless the fault is DMA_ERROR (the audit is all-or-nothing);
//! a submission whose memory stayed mapped did not fault. At the end the server
//! answers, its open fds are exactly those after the first client, its resident
//! memory is within a tolerance of that level, and every guest page that was
//! never a target, a table, a ring or a fence still holds its guard pattern.
//!
//! Fixed seed, bounded in count and time: `UMDEV_SOAK_SEED`,
//! `UMDEV_SOAK_CLIENTS` and `UMDEV_SOAK_SECS` change them for a longer run.

mod driver;
use umdev_testkit::soak as soak_support;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use driver::regs::*;
use driver::*;
use soak_support::{settled, Departures, Rng, Run, Tally};
use umdev::vfio_user::client::ClientError;
use umdev::vfio_user::wire::*;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const RAM_MIB: usize = 4;
const RAM: usize = RAM_MIB << 20;
/// Guest RAM is mapped as `REGIONS` DMA regions, each from the same offset of
/// one memfd, so a guest address always means the same memfd byte.
const REGIONS: usize = 8;
const REGION: u64 = (RAM / REGIONS) as u64;
/// Region 0, pages 1..=SYSTEM_PAGES: each client's page tables, rings and
/// fence pages (zeroed by the "guest" when a client starts).
const SYSTEM_PAGES: u64 = 48;
const SYSTEM: std::ops::Range<usize> = PAGE as usize..(PAGE * (1 + SYSTEM_PAGES)) as usize;
/// Pages the workload may write (chosen once, in regions 1..), and the
/// read-only source pages (a fixed pattern, never written).
const TARGETS: usize = 24;
const SOURCES: usize = 6;
/// Per context: `WORK_PAGES` writable VA pages at WORK_VA mapping targets,
/// the sources read-only at SRC_VA.
const WORK_VA: u64 = 0x10_0000_0000;
const WORK_PAGES: u64 = 8;
const SRC_VA: u64 = 0x20_0000_0000;
const CONTEXTS_USED: usize = 2;
/// fd-less guest memory (outside RAM), mapped and unmapped by message.
const MESSAGE_GPA: u64 = 0x8000_0000;
const GUARD: u8 = 0xa5;
const DEFAULT_SEED: u64 = 0x5eed_0000_6a0d;

fn source_byte(i: usize) -> u8 {
    (i as u8).wrapping_mul(37).wrapping_add(11)
}

#[derive(Default, Debug)]
struct Stats {
    clients: u64,
    wire: Tally,
    submissions: u64,
    /// Completed and compared byte for byte with the model.
    exact: u64,
    /// Faulted: (audit faults, nothing written; DMA_ERROR, partial).
    faulted_audit: u64,
    faulted_dma: u64,
    /// Regions unmapped while a submission was running.
    races: u64,
    maps: u64,
    unmaps: u64,
    pte_rewrites: u64,
    resets: u64,
    /// Clients that left with a submission in flight.
    left_running: u64,
    left: Departures,
}

/// One client's view of a context.
struct Context {
    ctx: Ctx,
    /// WORK_VA page i → index into `targets`, None where not present.
    work: [Option<usize>; WORK_PAGES as usize],
    /// SRC_VA page j → index into `sources`.
    src: [usize; SOURCES],
}

/// What the test knows of guest RAM and the workload.
struct World {
    /// Expected content of guest RAM (offsets from RAM_GPA).
    known: Vec<u8>,
    /// A second mapping of the guest RAM memfd, to compare against.
    view: *const u8,
    targets: [u64; TARGETS],
    sources: [u64; SOURCES],
    /// Pages ever given to the guest's tables, rings, fences, or targets.
    used: Vec<bool>,
    /// Byte ranges a submission in flight when its client left may write.
    pending: Vec<(usize, usize)>,
    last_pending: Vec<(usize, usize)>,
}

impl World {
    fn ram(&self) -> &[u8] {
        // SAFETY: a live shared mapping of RAM bytes, unmapped only at exit;
        // compared only while the device has finished with it.
        unsafe { std::slice::from_raw_parts(self.view, RAM) }
    }

    /// The guest's own writes (tables, rings) are in SYSTEM: take them as known.
    fn refresh_system(&mut self) {
        let ram = self.ram().as_ptr();
        // SAFETY: SYSTEM is inside the mapping; `known` is separate memory.
        let src = unsafe { std::slice::from_raw_parts(ram.add(SYSTEM.start), SYSTEM.len()) };
        self.known[SYSTEM].copy_from_slice(src);
    }

    /// RAM must equal `known` except in `allowed`; those ranges are then
    /// taken from RAM.
    fn check_except(&mut self, allowed: &[(usize, usize)], what: &str) {
        let mut ranges = allowed.to_vec();
        ranges.sort();
        let mut at = 0;
        for &(start, len) in ranges.iter().chain([(RAM, 0)].iter()) {
            if start > at {
                self.compare(at, start, what);
            }
            at = at.max(start + len);
        }
        for &(start, len) in allowed {
            let (ram, known) = (self.view, &mut self.known);
            // SAFETY: inside the mapping (ranges come from the model's translation).
            let src = unsafe { std::slice::from_raw_parts(ram.add(start), len) };
            known[start..start + len].copy_from_slice(src);
        }
    }

    fn compare(&self, from: usize, to: usize, what: &str) {
        let ram = &self.ram()[from..to];
        if ram != &self.known[from..to] {
            let i = from
                + (0..to - from)
                    .find(|&i| ram[i] != self.known[from + i])
                    .unwrap();
            panic!(
                "{what}: guest byte {:#x} is {:#04x}, expected {:#04x} (page {} a target: {}; in the last client's pending writes: {})",
                RAM_GPA + i as u64,
                self.ram()[i],
                self.known[i],
                i / PAGE as usize,
                self.targets.contains(&(RAM_GPA + (i as u64 & !(PAGE - 1)))),
                self.last_pending.iter().any(|&(s, l)| (s..s + l).contains(&i)),
            );
        }
    }
}

/// A workload command, kept for the model.
#[derive(Clone, Debug)]
enum Op {
    Store {
        va: u64,
        value: u32,
    },
    Fill {
        va: u64,
        bytes: u32,
        pattern: u32,
    },
    Copy {
        src: u64,
        dst: u64,
        bytes: u32,
    },
    Blit {
        src: u64,
        sp: u32,
        dst: u64,
        dp: u32,
        w: u32,
        h: u32,
    },
}

impl Op {
    fn encode(&self) -> Vec<u32> {
        match *self {
            Op::Store { va, value } => cmd::store_dword(va, value),
            Op::Fill { va, bytes, pattern } => cmd::fill(va, bytes, pattern),
            Op::Copy { src, dst, bytes } => cmd::copy(src, dst, bytes),
            Op::Blit {
                src,
                sp,
                dst,
                dp,
                w,
                h,
            } => cmd::blit(src, sp, dst, dp, w, h),
        }
    }

    /// Destination byte ranges as (va, len).
    fn writes(&self) -> Vec<(u64, u64)> {
        match *self {
            Op::Store { va, .. } => vec![(va, 4)],
            Op::Fill { va, bytes, .. } => vec![(va, bytes as u64)],
            Op::Copy { dst, bytes, .. } => vec![(dst, bytes as u64)],
            Op::Blit { dst, dp, w, h, .. } => (0..h as u64)
                .map(|r| (dst + r * dp as u64, w as u64))
                .collect(),
        }
    }
}

/// Translation as the test set the tables: Some((RAM offset, writable)).
fn translate(c: &Context, w: &World, va: u64) -> Option<(usize, bool)> {
    let page = va & !(PAGE - 1);
    let off = (va - page) as usize;
    let gpa_writable = if (WORK_VA..WORK_VA + WORK_PAGES * PAGE).contains(&page) {
        c.work[((page - WORK_VA) / PAGE) as usize].map(|t| (w.targets[t], true))
    } else if (SRC_VA..SRC_VA + SOURCES as u64 * PAGE).contains(&page) {
        Some((w.sources[c.src[((page - SRC_VA) / PAGE) as usize]], false))
    } else if page == FENCE_VA {
        Some((c.ctx.fence_gpa, true))
    } else {
        None
    };
    gpa_writable.map(|(gpa, wr)| ((gpa - RAM_GPA) as usize + off, wr))
}

/// RAM byte ranges of [va, va+len), if all present (and writable for `write`).
fn ranges(c: &Context, w: &World, va: u64, len: u64, write: bool) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    let mut at = va;
    while at < va + len {
        let chunk = (PAGE - at % PAGE).min(va + len - at);
        let (off, wr) = translate(c, w, at)?;
        if write && !wr {
            return None;
        }
        out.push((off, chunk as usize));
        at += chunk;
    }
    Some(out)
}

fn read_va(c: &Context, w: &World, mem: &[u8], va: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (off, n) in ranges(c, w, va, len, false)? {
        out.extend_from_slice(&mem[off..off + n]);
    }
    Some(out)
}

fn write_va(c: &Context, w: &World, mem: &mut [u8], va: u64, data: &[u8]) -> Option<()> {
    let mut i = 0;
    for (off, n) in ranges(c, w, va, data.len() as u64, true)? {
        mem[off..off + n].copy_from_slice(&data[i..i + n]);
        i += n;
    }
    Some(())
}

/// Applies `ops` to `mem` as the device must; None if one of them must fault.
fn model(c: &Context, w: &World, mem: &mut [u8], ops: &[Op]) -> Option<()> {
    for op in ops {
        match *op {
            Op::Store { va, value } => write_va(c, w, mem, va, &value.to_le_bytes())?,
            Op::Fill { va, bytes, pattern } => {
                write_va(c, w, mem, va, &pattern_bytes(pattern, bytes as usize))?
            }
            Op::Copy { src, dst, bytes } => {
                let data = read_va(c, w, mem, src, bytes as u64)?;
                write_va(c, w, mem, dst, &data)?
            }
            Op::Blit {
                src,
                sp,
                dst,
                dp,
                w: width,
                h,
            } => {
                // The whole blit is audited before any row runs.
                for r in 0..h as u64 {
                    ranges(c, w, src + r * sp as u64, width as u64, false)?;
                    ranges(c, w, dst + r * dp as u64, width as u64, true)?;
                }
                for r in 0..h as u64 {
                    let row = read_va(c, w, mem, src + r * sp as u64, width as u64)?;
                    write_va(c, w, mem, dst + r * dp as u64, &row)?;
                }
            }
        }
    }
    Some(())
}

/// Random workload commands: mostly inside what is mapped, sometimes not.
fn workload(rng: &mut Rng) -> Vec<Op> {
    let work_end = WORK_VA + WORK_PAGES * PAGE;
    let src_len = SOURCES as u64 * PAGE;
    (0..1 + rng.below(6))
        .map(|_| match rng.below(30) {
            0..=6 => Op::Store {
                va: WORK_VA + rng.below(WORK_PAGES * PAGE / 4) * 4,
                value: rng.next() as u32,
            },
            7..=13 => {
                let va = WORK_VA + rng.below(WORK_PAGES * PAGE / 4) * 4;
                let most = (work_end - va).min(3 * PAGE);
                let bytes = 4 * (1 + rng.below(most / 4)) as u32;
                Op::Fill {
                    va,
                    bytes,
                    pattern: rng.next() as u32,
                }
            }
            14..=20 => {
                let bytes = 1 + rng.below(2 * PAGE) as u32;
                let src = SRC_VA + rng.below(src_len - bytes as u64 + 1);
                let dst = WORK_VA + rng.below(WORK_PAGES * PAGE - bytes as u64 + 1);
                Op::Copy { src, dst, bytes }
            }
            21..=28 => {
                let w = 1 + rng.below(300) as u32;
                let h = 1 + rng.below(12) as u32;
                let sp = w + rng.below(600) as u32;
                let dp = w + rng.below(600) as u32;
                let src_span = (h as u64 - 1) * sp as u64 + w as u64;
                let dst_span = (h as u64 - 1) * dp as u64 + w as u64;
                let src = SRC_VA + rng.below(src_len - src_span + 1);
                let dst = WORK_VA + rng.below(WORK_PAGES * PAGE - dst_span + 1);
                Op::Blit {
                    src,
                    sp,
                    dst,
                    dp,
                    w,
                    h,
                }
            }
            // A write the tables do not allow (read-only source, unmapped VA):
            // the audit faults and nothing of the submission runs.
            _ => Op::Store {
                va: if rng.chance(50) {
                    SRC_VA
                } else {
                    WORK_VA + WORK_PAGES * PAGE
                } + rng.below(PAGE / 4) * 4,
                value: rng.next() as u32,
            },
        })
        .collect()
}

/// One client's session.
struct Session {
    raw: UnixStream,
    mapped: [bool; REGIONS],
    contexts: Vec<Context>,
    _eventfds: Vec<EventFd>,
    /// Resources of the attacks (`soak_support::resources`), kept until we go.
    kept: soak_support::resources::Kept,
}

type Step = Result<(), ClientError>;

fn map_region(gpu: &mut Vgpu, s: &mut Session, stats: &mut Stats, k: usize) -> Step {
    stats.maps += 1;
    let fd = gpu.ram.mem.fd();
    let gpa = RAM_GPA + k as u64 * REGION;
    if stats
        .wire
        .req(
            gpu.client
                .dma_map(gpa, REGION, Some(fd), k as u64 * REGION, RW),
        )?
        .is_some()
    {
        s.mapped[k] = true;
    }
    Ok(())
}

fn unmap_region(gpu: &mut Vgpu, s: &mut Session, stats: &mut Stats, k: usize) -> Step {
    stats.unmaps += 1;
    let gpa = RAM_GPA + k as u64 * REGION;
    if stats
        .wire
        .req(gpu.client.dma_unmap(gpa, REGION, 0))?
        .is_some()
    {
        s.mapped[k] = false;
    }
    Ok(())
}

/// Points the context's WORK and SRC pages at the chosen targets and sources.
fn map_context(gpu: &mut Vgpu, w: &World, c: &Context) {
    for (i, t) in c.work.iter().enumerate() {
        let va = WORK_VA + i as u64 * PAGE;
        match t {
            Some(t) => c.ctx.pt.map(gpu, va, Target::Ram(w.targets[*t]), true),
            None => c.ctx.pt.unmap(gpu, va),
        }
    }
    for (j, &s) in c.src.iter().enumerate() {
        c.ctx.pt.map(
            gpu,
            SRC_VA + j as u64 * PAGE,
            Target::Ram(w.sources[s]),
            false,
        );
    }
}

fn shuffled(rng: &mut Rng, n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// The guest driver's probe: tables, rings and fences from a zeroed area.
fn setup(gpu: &mut Vgpu, w: &World, rng: &mut Rng) -> Vec<Context> {
    gpu.ram.fill(RAM_GPA + SYSTEM.start as u64, SYSTEM.len(), 0);
    gpu.alloc = PageAllocator::new(RAM_GPA + SYSTEM.start as u64, RAM_GPA + SYSTEM.end as u64);
    let mut out = Vec::new();
    for n in 0..CONTEXTS_USED {
        let ctx = gpu.context(n);
        let t = shuffled(rng, TARGETS);
        let s = shuffled(rng, SOURCES);
        let mut c = Context {
            ctx,
            work: [None; WORK_PAGES as usize],
            src: [0; SOURCES],
        };
        for (slot, &t) in c.work.iter_mut().zip(&t) {
            *slot = Some(t);
        }
        c.src.copy_from_slice(&s);
        map_context(gpu, w, &c);
        out.push(c);
    }
    assert!(gpu.alloc.pages(0) <= RAM_GPA + SYSTEM.end as u64);
    out
}

/// Emits a workload and its fence on context `n`; the caller rings the
/// doorbell. Returns (ops, fence seqno, the ranges it may write).
fn emit(
    gpu: &mut Vgpu,
    w: &mut World,
    c: &mut Context,
    ops: &[Op],
    irq: bool,
) -> (u32, Vec<(usize, usize)>) {
    c.ctx.seq = c.ctx.seq.wrapping_add(1);
    for op in ops {
        c.ctx.ring.emit(gpu, &op.encode());
    }
    c.ctx.ring.emit(gpu, &cmd::fence(FENCE_VA, c.ctx.seq, irq));
    let mut allowed = vec![((c.ctx.fence_gpa - RAM_GPA) as usize, 4)];
    for op in ops {
        for (va, len) in op.writes() {
            if let Some(r) = ranges(c, w, va, len, true) {
                allowed.extend(r);
            }
        }
    }
    w.refresh_system();
    (c.ctx.seq, allowed)
}

/// A random message while a submission may be running: valid and harmless
/// to guest memory, or malformed.
fn chatter(
    gpu: &mut Vgpu,
    rng: &mut Rng,
    stats: &mut Stats,
    kept: &mut soak_support::resources::Kept,
) -> Step {
    let c = &mut gpu.client;
    match rng.below(7) {
        0 => {
            if let Some(id) = stats.wire.req(c.read_u32(BAR0, REG_ID))? {
                assert!(id == ID_VALUE, "ID {id:#x}");
            }
        }
        1 => {
            stats
                .wire
                .req(c.region_read(CONFIG, rng.below(64) * 4, 4))?;
        }
        2 => {
            stats
                .wire
                .req(c.read_u32(BAR0, ctx_reg(rng.below(4) as usize, CTX_STATUS)))?;
        }
        3 => {
            // GGTT: only the display reads it, and the scanout is off.
            let i = rng.below(GGTT_ENTRIES);
            let e = pte(
                Target::Ram(RAM_GPA + rng.below(RAM as u64 / PAGE) * PAGE),
                rng.chance(50),
            );
            stats.wire.req(c.write_u64(BAR0, GGTT_OFFSET + 8 * i, e))?;
            stats.wire.req(c.read_u64(BAR0, GGTT_OFFSET + 8 * i))?;
        }
        4 => {
            stats.wire.req(c.region_info(rng.below(10) as u32))?;
        }
        5 => {
            // Resources that fight back, away from the workload's memory and
            // interrupts: memory shrunk under its mapping, refused fds, a
            // saturated eventfd on the ERR/REQ indices.
            soak_support::resources::attack(c, rng, &mut stats.wire, ATTACK_GPA, &[3, 4], kept)?;
        }
        _ => soak_support::malformed(c, rng, &mut stats.wire, RAM_GPA)?,
    }
    Ok(())
}

/// Guest addresses the workload never uses, for the resource attacks.
const ATTACK_GPA: u64 = 0x2_0000_0000;

/// Waits for context `n` to finish and checks what the workload wrote.
#[allow(clippy::too_many_arguments)]
fn finish(
    gpu: &mut Vgpu,
    w: &mut World,
    s: &mut Session,
    stats: &mut Stats,
    n: usize,
    ops: &[Op],
    seq: u32,
    allowed: &[(usize, usize)],
    must_complete: bool,
) {
    let result = gpu.wait_idle(n, TIMEOUT);
    let c = &s.contexts[n];
    match result {
        Ok(()) => {
            let done = gpu.ctx_read(n, CTX_FENCE_SEQNO);
            assert_eq!(
                done, seq,
                "context {n} idle without a fault but fence {seq} not retired"
            );
            let mut want = w.known.clone();
            model(c, w, &mut want, ops).unwrap_or_else(|| {
                panic!("context {n} ran without a fault a submission that must fault: {ops:?}")
            });
            let fence = (c.ctx.fence_gpa - RAM_GPA) as usize;
            want[fence..fence + 4].copy_from_slice(&seq.to_le_bytes());
            w.known = want;
            w.compare(
                0,
                RAM,
                &format!("after submission {seq} of context {n} ({ops:?})"),
            );
            stats.exact += 1;
        }
        Err(f) => {
            assert!(
                !must_complete,
                "context {n}: {f} with all of its memory mapped: {ops:?}"
            );
            let what = format!("after {f} of context {n} ({ops:?})");
            if f.reason == FAULT_DMA_ERROR {
                stats.faulted_dma += 1;
                w.check_except(allowed, &what);
            } else {
                // The audit is all-or-nothing.
                stats.faulted_audit += 1;
                w.compare(0, RAM, &what);
            }
            s.contexts[n].ctx.clear_fault(gpu);
        }
    }
}

/// One submission, with messages (and maybe an unmap) while it runs. Ok(false)
/// when the client left with it in flight.
fn submit(
    gpu: &mut Vgpu,
    w: &mut World,
    s: &mut Session,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Result<bool, ClientError> {
    let n = rng.below(CONTEXTS_USED as u64) as usize;
    let ops = workload(rng);
    let (seq, allowed) = emit(gpu, w, &mut s.contexts[n], &ops, rng.chance(20));
    stats.submissions += 1;
    let mut want = w.known.clone();
    let must = s.mapped.iter().all(|&m| m) && model(&s.contexts[n], w, &mut want, &ops).is_some();
    if rng.chance(4) {
        // Ring the doorbell with a message that wants no reply, and leave.
        let tail = s.contexts[n].ctx.ring.tail;
        soak_support::post_region_write(
            &mut s.raw,
            BAR0,
            ctx_reg(n, CTX_RING_TAIL),
            &tail.to_le_bytes(),
        );
        w.pending = allowed;
        stats.left.abrupt += 1;
        stats.left_running += 1;
        return Ok(false);
    }
    s.contexts[n].ctx.ring.doorbell(gpu);
    let mut raced = false;
    for _ in 0..rng.below(4) {
        if !raced && rng.chance(25) {
            // Memory goes away under the engine: a region the workload or
            // its tables and ring live in.
            raced = true;
            stats.races += 1;
            let k = rng.below(REGIONS as u64) as usize;
            if s.mapped[k] {
                unmap_region(gpu, s, stats, k)?;
            }
        } else {
            chatter(gpu, rng, stats, &mut s.kept)?;
        }
    }
    if rng.chance(3) {
        // Gone with the submission maybe still running.
        w.pending = allowed;
        stats.left_running += 1;
        return Ok(false);
    }
    finish(gpu, w, s, stats, n, &ops, seq, &allowed, must && !raced);
    Ok(true)
}

/// One random action between submissions. Ok(false): the client left.
fn action(
    gpu: &mut Vgpu,
    w: &mut World,
    s: &mut Session,
    rng: &mut Rng,
    stats: &mut Stats,
) -> Result<bool, ClientError> {
    match rng.below(20) {
        0..=7 => return submit(gpu, w, s, rng, stats),
        8 => {
            let k = rng.below(REGIONS as u64) as usize;
            if s.mapped[k] {
                unmap_region(gpu, s, stats, k)?;
            } else {
                map_region(gpu, s, stats, k)?;
            }
        }
        9 | 10 => {
            // Everything back (most of the time the workload runs whole).
            for k in 0..REGIONS {
                if !s.mapped[k] {
                    map_region(gpu, s, stats, k)?;
                }
            }
        }
        11 => {
            // A map overlapping a mapped region (with another memfd offset)
            // must be refused: it would alias guest memory.
            if let Some(k) = (0..REGIONS).find(|&k| s.mapped[k]) {
                let gpa = RAM_GPA + k as u64 * REGION + rng.below(REGION / PAGE) * PAGE;
                let size = PAGE * (1 + rng.below((RAM_GPA + (k as u64 + 1) * REGION - gpa) / PAGE));
                let fd = gpu.ram.mem.fd();
                let r = stats
                    .wire
                    .req(gpu.client.dma_map(gpa, size, Some(fd), 0, RW))?;
                assert!(
                    r.is_none(),
                    "an overlapping DMA_MAP at {gpa:#x}+{size:#x} was accepted"
                );
                stats.wire.malformed += 1;
            }
        }
        12 => {
            // fd-less memory outside RAM, mapped and unmapped by message.
            stats.maps += 1;
            stats
                .wire
                .req(gpu.client.dma_map(MESSAGE_GPA, 0x1_0000, None, 0, RW))?;
            if rng.chance(50) {
                stats.unmaps += 1;
                stats
                    .wire
                    .req(gpu.client.dma_unmap(MESSAGE_GPA, 0x1_0000, 0))?;
            }
        }
        13 => {
            // The guest retargets or unmaps a page of its tables.
            stats.pte_rewrites += 1;
            let n = rng.below(CONTEXTS_USED as u64) as usize;
            let i = rng.below(WORK_PAGES) as usize;
            let c = &mut s.contexts[n];
            c.work[i] = if rng.chance(20) {
                None
            } else {
                let free: Vec<usize> = (0..TARGETS)
                    .filter(|t| !c.work.contains(&Some(*t)))
                    .collect();
                Some(free[rng.below(free.len() as u64) as usize])
            };
            let va = WORK_VA + i as u64 * PAGE;
            match c.work[i] {
                Some(t) => c.ctx.pt.map(gpu, va, Target::Ram(w.targets[t]), true),
                None => c.ctx.pt.unmap(gpu, va),
            }
        }
        14 => {
            // Interrupts re-wired to new eventfds: closed when the client goes.
            let e = EventFd::new(EFD_NONBLOCK).unwrap();
            let v = rng.below(MSIX_VECTORS as u64) as u32;
            stats.wire.req(
                gpu.client
                    .set_irq_eventfds(PCI_MSIX_IRQ_INDEX, v, &[e.as_raw_fd()]),
            )?;
            s._eventfds.push(e);
        }
        15 => {
            // DEVICE_RESET; the driver sets the device up again over the same
            // memory and tables.
            stats.resets += 1;
            stats.wire.req(gpu.client.reset())?;
            gpu.drain_irqs();
            gpu.init();
            for c in &mut s.contexts {
                let ring = c.ctx.ring.clone();
                gpu.program_context(c.ctx.n, c.ctx.pt.root, ring.base, ring.size);
                c.ctx.ring.resync(gpu);
                c.ctx.seq = 0;
            }
        }
        _ => chatter(gpu, rng, stats, &mut s.kept)?,
    }
    Ok(true)
}

/// Connects a client; Some(session) when it negotiated.
fn connect(gpu: &mut Vgpu, rng: &mut Rng, stats: &mut Stats) -> Option<UnixStream> {
    let (raw, mut c) = soak_support::connect(&gpu.backend.socket, Duration::from_secs(20));
    // Else a malformed VERSION first: the server ends the session.
    let negotiated = soak_support::negotiate_or_junk(&mut c, rng, 92, &mut stats.wire);
    gpu.client = c;
    negotiated.then_some(raw)
}

fn leave(raw: &mut UnixStream, rng: &mut Rng, stats: &mut Stats) {
    let d = &mut stats.left;
    match rng.below(4) {
        0 => soak_support::leave_mid_header(raw, rng, d),
        1 => soak_support::leave_mid_payload(raw, rng, d),
        2 => soak_support::leave_by_server(raw, rng, d),
        _ => d.clean += 1,
    }
}

#[test]
fn many_hostile_clients_under_a_running_vgpu_workload() {
    let run = Run::from_env(DEFAULT_SEED, 400, 8);
    let seed = run.seed;
    let mut rng = Rng(seed);
    let mut gpu = Vgpu::start_with(Options {
        ram_mib: RAM_MIB,
        ..Default::default()
    });
    let pid = gpu.backend.child.id();
    // The driver's own first connection goes; the soak's clients follow.
    let _ = gpu.client.stream().shutdown(std::net::Shutdown::Both);

    // Guest RAM: guard bytes everywhere, the sources' pattern, chosen targets.
    // SAFETY: a second shared mapping of the guest RAM memfd, read only,
    // for comparisons; never unmapped (the test process ends).
    let view = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ,
            libc::MAP_SHARED,
            gpu.ram.mem.fd(),
            0,
        )
    };
    assert_ne!(view, libc::MAP_FAILED);
    gpu.ram.fill(RAM_GPA, RAM, GUARD);
    let mut pages = shuffled(&mut rng, RAM / PAGE as usize);
    pages.retain(|&p| p as u64 >= REGION / PAGE);
    let mut w = World {
        known: Vec::new(),
        view: view as *const u8,
        targets: std::array::from_fn(|i| RAM_GPA + pages[i] as u64 * PAGE),
        sources: std::array::from_fn(|i| RAM_GPA + pages[TARGETS + i] as u64 * PAGE),
        used: vec![false; RAM / PAGE as usize],
        pending: Vec::new(),
        last_pending: Vec::new(),
    };
    for (i, &src) in w.sources.iter().enumerate() {
        let data: Vec<u8> = (0..PAGE as usize)
            .map(|b| source_byte(i * PAGE as usize + b))
            .collect();
        gpu.ram.write(src, &data);
    }
    for &t in &w.targets {
        w.used[((t - RAM_GPA) / PAGE) as usize] = true;
    }
    for p in SYSTEM.step_by(PAGE as usize) {
        w.used[p / PAGE as usize] = true;
    }
    w.known = w.ram().to_vec();

    let mut stats = Stats::default();
    let mut baseline = None;
    let started = Instant::now();
    while run.another(stats.clients, started) {
        stats.clients += 1;
        let Some(raw) = connect(&mut gpu, &mut rng, &mut stats) else {
            let _ = gpu.client.stream().shutdown(std::net::Shutdown::Both);
            assert!(gpu.backend.alive(), "backend died\n{}", gpu.backend.log());
            continue;
        };
        // The server has finished with the last client: what it had running
        // may have written its destinations, nothing else.
        let pending = std::mem::take(&mut w.pending);
        w.check_except(&pending, "after the previous client left");
        w.last_pending = pending;
        let mut s = Session {
            raw,
            mapped: [false; REGIONS],
            contexts: Vec::new(),
            _eventfds: Vec::new(),
            kept: Vec::new(),
        };
        let mut alive: Step =
            (0..REGIONS).try_for_each(|k| map_region(&mut gpu, &mut s, &mut stats, k));
        if alive.is_ok() {
            gpu.init();
            s.contexts = setup(&mut gpu, &w, &mut rng);
            w.refresh_system();
        }
        let steps = 3 + rng.below(40);
        let mut running = true;
        for _ in 0..steps {
            if alive.is_err() || !running {
                break;
            }
            match action(&mut gpu, &mut w, &mut s, &mut rng, &mut stats) {
                Ok(r) => running = r,
                Err(e) => alive = Err(e),
            }
        }
        if let Err(e) = alive {
            panic!(
                "client {} lost its connection: {e}\n{}",
                stats.clients,
                gpu.backend.log()
            );
        }
        if running {
            // Nothing runs: the guest's last table writes are known.
            w.refresh_system();
            leave(&mut s.raw, &mut rng, &mut stats);
        }
        let _ = s.raw.shutdown(std::net::Shutdown::Both);
        drop(s);
        if baseline.is_none() {
            // Wait for the server to take the next client, then measure.
            baseline = Some(settled(pid));
        }
        assert!(gpu.backend.alive(), "backend died\n{}", gpu.backend.log());
    }
    let (fds0, rss0) = baseline.unwrap();

    // The server still answers, and a last client's workload runs right.
    let raw = loop {
        if let Some(raw) = connect(&mut gpu, &mut rng, &mut stats) {
            break raw;
        }
    };
    let pending = std::mem::take(&mut w.pending);
    w.check_except(&pending, "after the last client left");
    let mut s = Session {
        raw,
        mapped: [false; REGIONS],
        contexts: Vec::new(),
        _eventfds: Vec::new(),
        kept: Vec::new(),
    };
    for k in 0..REGIONS {
        map_region(&mut gpu, &mut s, &mut stats, k).unwrap();
    }
    gpu.init();
    assert_eq!(gpu.read_reg(REG_ID), ID_VALUE);
    s.contexts = setup(&mut gpu, &w, &mut rng);
    w.refresh_system();
    let ops = [Op::Fill {
        va: WORK_VA,
        bytes: 64,
        pattern: 0x600d_f00d,
    }];
    let (seq, allowed) = emit(&mut gpu, &mut w, &mut s.contexts[0], &ops, false);
    s.contexts[0].ctx.ring.doorbell(&mut gpu);
    finish(
        &mut gpu, &mut w, &mut s, &mut stats, 0, &ops, seq, &allowed, true,
    );
    let _ = s.raw.shutdown(std::net::Shutdown::Both);
    drop(s);
    let end = settled(pid);
    let (fds1, rss1) = end;

    // Guard bytes: pages never used by anyone hold the guard, sources their pattern.
    let ram = w.ram();
    let mut guarded = 0;
    for p in 0..RAM / PAGE as usize {
        let gpa = RAM_GPA + (p as u64) * PAGE;
        let page = &ram[p * PAGE as usize..(p + 1) * PAGE as usize];
        if let Some(i) = w.sources.iter().position(|&s| s == gpa) {
            let want: Vec<u8> = (0..PAGE as usize)
                .map(|b| source_byte(i * PAGE as usize + b))
                .collect();
            assert_eq!(page, &want[..], "source page {gpa:#x} changed");
        } else if !w.used[p] {
            assert!(
                page.iter().all(|&b| b == GUARD),
                "guard page {gpa:#x} changed"
            );
            guarded += 1;
        }
    }
    let touched = w
        .targets
        .iter()
        .filter(|&&t| {
            ram[(t - RAM_GPA) as usize..][..PAGE as usize]
                .iter()
                .any(|&b| b != GUARD)
        })
        .count();
    let elapsed = started.elapsed();
    eprintln!(
        "vgpu soak: seed {seed:#x}, {elapsed:.1?}: {stats:?}\n\
         vgpu soak: after client 1: {fds0} fds, VmRSS {rss0} KiB; at the end: {fds1} fds, \
         VmRSS {rss1} KiB; {guarded} guard pages intact, {touched}/{TARGETS} target pages written"
    );
    soak_support::assert_as_found((fds0, rss0), end);
    assert!(stats.exact > 0 && stats.faulted_audit > 0, "{stats:?}");
    assert!(
        !gpu.backend.log().contains("panicked"),
        "{}",
        gpu.backend.log()
    );
}
