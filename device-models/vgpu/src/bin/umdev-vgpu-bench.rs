//! `umdev-vgpu-bench`: what the vGPU's mediation costs, each figure beside a
//! baseline measured in the same run.
//!
//! It starts `umdev-vgpu` (the real binary, seccomp on) on a private socket and
//! plays VMM and guest driver over vfio-user with umdev's client: memfd guest
//! RAM shared by DMA_MAP, page tables and a ring written straight into that
//! memory, doorbells as REGION_WRITEs, fences polled in guest memory.
//!
//! - **PTE updates at a sync point**: K leaf entries rewritten in guest memory,
//!   then one doorbell (a sync point: the scan source compares every tracked
//!   table page and the shadow re-validates each changed entry) with a FENCE.
//!   Updates/s = K / (time - time of the same submission with no entry
//!   changed); the ratio is that time over the empty submission's.
//! - **BLIT / COPY throughput**: one BLIT (4 KiB lines) or COPY of N bytes from
//!   guest RAM to guest RAM, doorbell to fence, against `memcpy` of the same
//!   bytes between the same pages in this process, timed in pairs (the ratio
//!   is the median of the pairs' ratios). Then 4 of them in one submission
//!   (the ring kept full), and the engine's own rate: the 3 more commands of
//!   that submission against 3 more memcpys, without the doorbell, sync point
//!   and wake-up every submission pays.
//! - **Submission-to-fence latency**: a FENCE alone, from the doorbell's
//!   REGION_WRITE to the sequence number in memory, median of repetitions,
//!   against a plain trapped register write (a REGION_WRITE round trip).
//!
//! - **Migration downtime**: a second `umdev-vgpu`, and the device moved
//!   between the two over vfio-user migration v2 (`umdev::vfio_user::Migration`:
//!   PRE_COPY with guest RAM copied, then STOP_COPY, the dirtied pages, the
//!   destination RUNNING), back and forth; the downtime is STOP_COPY to the
//!   destination running. Against the downtime of the device with no VRAM in
//!   use, for K MiB of VRAM drawn before the pre-copy (unchanged at the stop)
//!   and K MiB redrawn after it (all carried by the stop-copy).
//!
//! Each figure is the median over `--reps` repetitions. Ratios, not absolute
//! numbers, are what carries from one machine to another.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use umdev::benchmark::{machine, median, us, Device};
use umdev::memory::MappedMemfd;

use clap::Parser;
use umdev::vfio_user::wire::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, PCI_CONFIG_REGION_INDEX};
use umdev::vfio_user::{Client, Migration};
use umdev_vgpu::encode as cmd;
use umdev_vgpu::regs::*;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The device binary [default: umdev-vgpu next to this program].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Extra argument for the server (repeat for several).
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Small sizes and few repetitions (a smoke test, not figures).
    #[arg(long)]
    quick: bool,
    /// Repetitions of each measurement (the median is printed).
    #[arg(long)]
    reps: Option<usize>,
    /// Leave out the migration downtime figures (the slowest part).
    #[arg(long)]
    no_migration: bool,
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("vfio-user: {0}")]
    Client(#[from] umdev::vfio_user::client::ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("context fault: status {status:#x} address {addr:#x}")]
    Fault { status: u32, addr: u64 },
    #[error("fence {0} not retired within 30 s")]
    Timeout(u32),
}

type Result<T> = std::result::Result<T, BenchError>;

const RAM_GPA: u64 = 0x4000_0000;
const PAGE: u64 = PAGE_SIZE;
const BAR0: u32 = MMIO_BAR as u32;
const CTX: usize = 0;
const RING_SIZE: u32 = 64 << 10;
const FENCE_VA: u64 = 0x7f00_0000_0000;
const SRC_VA: u64 = 0x1_0000_0000;
const DST_VA: u64 = 0x2_0000_0000;
const PTE_VA: u64 = 0x3_0000_0000;
const VRAM_VA: u64 = 0x5_0000_0000;

// ---------------------------------------------------------------- memory --

/// Guest RAM: a memfd mapped here and given to the device by DMA_MAP.
struct Ram(MappedMemfd);

impl Ram {
    fn new(size: usize) -> Result<Ram> {
        Ok(Ram(MappedMemfd::populated("umdev-vgpu-bench", size)?))
    }

    /// Pointer to `len` bytes at guest-physical `gpa`, aligned to `align`.
    fn at(&self, gpa: u64, len: usize, align: usize) -> *mut u8 {
        let off = gpa
            .checked_sub(RAM_GPA)
            .map(|o| o as usize)
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= self.0.len()))
            .filter(|o| o % align == 0);
        let Some(off) = off else {
            panic!("guest access {gpa:#x}+{len} outside RAM or misaligned")
        };
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.0.as_ptr().add(off) }
    }

    fn write_u32(&self, gpa: u64, v: u32) {
        // SAFETY: in bounds and aligned (checked by `at`); the device may read
        // concurrently, hence volatile.
        unsafe { std::ptr::write_volatile(self.at(gpa, 4, 4).cast::<u32>(), v) }
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: as above; the device writes it behind our back.
        unsafe { std::ptr::read_volatile(self.at(gpa, 4, 4).cast::<u32>()) }
    }

    /// One 8-byte store, as a guest writes a page-table entry.
    fn write_u64(&self, gpa: u64, v: u64) {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.at(gpa, 8, 8).cast::<u64>(), v) }
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.at(gpa, 8, 8).cast::<u64>()) }
    }

    /// memcpy between two guest ranges (the baseline for BLIT/COPY).
    fn memcpy(&self, src: u64, dst: u64, len: usize) {
        let (s, d) = (self.at(src, len, 1), self.at(dst, len, 1));
        assert!(src + len as u64 <= dst || dst + len as u64 <= src);
        // SAFETY: both ranges are in the mapping and do not overlap (checked).
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) }
    }

    /// The VMM's guest RAM copy for a migration from `from` to `to`.
    fn copier<'a>(from: &'a Ram, to: &'a Ram) -> impl FnMut(u64, u64) + 'a {
        |gpa, len| to.copy_from(from, gpa, len as usize)
    }

    /// What the VMM does to migrate guest RAM: copies `[gpa, gpa+len)` from
    /// `from`.
    fn copy_from(&self, from: &Ram, gpa: u64, len: usize) {
        let (s, d) = (from.at(gpa, len, 1), self.at(gpa, len, 1));
        // SAFETY: both ranges are in bounds of their own mappings (checked
        // by `at`), which are distinct memfds.
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) }
    }

    fn fill(&self, gpa: u64, len: usize, byte: u8) {
        // SAFETY: in bounds (checked by `at`).
        unsafe { std::ptr::write_bytes(self.at(gpa, len, 1), byte, len) }
    }
}

// ---------------------------------------------------------------- device --

fn start_server(bin: &Path, extra: &[String], name: &str) -> Result<Device> {
    let dir = std::env::temp_dir().join(format!("umdev-vgpu-bench-{}-{name}", std::process::id()));
    Device::start(bin, extra, dir, "vgpu.sock", |_| {}).map_err(BenchError::Setup)
}

/// Driver state: the client, guest RAM, page tables, the ring.
struct Gpu {
    client: Client,
    ram: Ram,
    next_page: u64,
    root: u64,
    ring: u64,
    tail: u32,
    fence_gpa: u64,
    seq: u32,
}

impl Gpu {
    fn new(socket: &Path, ram_mib: usize) -> Result<Gpu> {
        // Device::start returned once the server listens.
        let mut client = Client::connect(socket)?;
        // A VMM that migrates asks first (and the device must offer it).
        if client.migration_flags()? & umdev::migration::fsm::MIGRATION_STOP_COPY == 0 {
            return Err(BenchError::Setup("the device cannot migrate".into()));
        }
        let ram = Ram::new(ram_mib << 20)?;
        client.dma_map(
            RAM_GPA,
            ram.0.len() as u64,
            Some(ram.0.fd()),
            0,
            DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        )?;
        // Memory decoding and bus mastering on (one 2-byte access, as QEMU).
        client.region_write(PCI_CONFIG_REGION_INDEX, 4, &6u16.to_le_bytes())?;
        let mut gpu = Gpu {
            client,
            ram,
            next_page: RAM_GPA + PAGE,
            root: 0,
            ring: 0,
            tail: 0,
            fence_gpa: 0,
            seq: 0,
        };
        gpu.root = gpu.pages(1);
        gpu.ring = gpu.pages(u64::from(RING_SIZE) / PAGE);
        gpu.fence_gpa = gpu.pages(1);
        gpu.map(FENCE_VA, gpu.fence_gpa, true);
        let c = |r| ctx_reg(CTX, r);
        gpu.client.write_u64(BAR0, c(CTX_PT_ROOT), gpu.root)?;
        gpu.client.write_u64(BAR0, c(CTX_RING_BASE), gpu.ring)?;
        gpu.client.write_u32(BAR0, c(CTX_RING_SIZE), RING_SIZE)?;
        gpu.client
            .write_u32(BAR0, c(CTX_CONTROL), CTX_CONTROL_ENABLE)?;
        Ok(gpu)
    }

    /// `n` zeroed pages of guest RAM.
    fn pages(&mut self, n: u64) -> u64 {
        let gpa = self.next_page;
        self.next_page += n * PAGE;
        self.ram.fill(gpa, (n * PAGE) as usize, 0);
        gpa
    }

    /// Guest-physical address of the leaf entry for `va`, tables made as needed.
    fn leaf_slot(&mut self, va: u64) -> u64 {
        let mut table = self.root;
        for level in (2..=PT_LEVELS).rev() {
            let slot = table + 8 * pt_index(va, level) as u64;
            let e = self.ram.read_u64(slot);
            table = if e & PTE_PRESENT != 0 {
                e & PTE_ADDR_MASK
            } else {
                let t = self.pages(1);
                self.ram.write_u64(slot, t | PTE_PRESENT);
                t
            };
        }
        table + 8 * pt_index(va, 1) as u64
    }

    fn map(&mut self, va: u64, gpa: u64, writable: bool) {
        let slot = self.leaf_slot(va);
        let w = if writable { PTE_WRITABLE } else { 0 };
        self.ram.write_u64(slot, gpa | PTE_PRESENT | w);
    }

    /// Maps `n` fresh pages at `va`; their first gpa (contiguous).
    fn map_new(&mut self, va: u64, n: u64, writable: bool) -> u64 {
        let gpa = self.pages(n);
        for i in 0..n {
            self.map(va + i * PAGE, gpa + i * PAGE, writable);
        }
        gpa
    }

    /// Maps `va` to VRAM offset `offset`, writable.
    fn map_vram(&mut self, va: u64, offset: u64) {
        let slot = self.leaf_slot(va);
        self.ram
            .write_u64(slot, offset | PTE_PRESENT | PTE_WRITABLE | PTE_VRAM);
    }

    /// Takes over the driver's view of a device migrated here from `from`.
    fn adopt(&mut self, from: &Gpu) {
        self.next_page = from.next_page;
        self.root = from.root;
        self.ring = from.ring;
        self.tail = from.tail;
        self.fence_gpa = from.fence_gpa;
        self.seq = from.seq;
    }

    fn emit(&mut self, dwords: &[u32]) {
        for &d in dwords {
            self.ram.write_u32(self.ring + u64::from(self.tail), d);
            self.tail = (self.tail + 4) % RING_SIZE;
        }
    }

    /// `cmds` + FENCE, doorbell, spin until the fence is in memory. The time
    /// from the doorbell to the fence.
    fn run(&mut self, cmds: &[u32]) -> Result<Duration> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.emit(cmds);
        self.emit(&cmd::fence(FENCE_VA, seq, false));
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let start = Instant::now();
        self.client
            .write_u32(BAR0, ctx_reg(CTX, CTX_RING_TAIL), self.tail)?;
        // A fault is looked for every 5 ms only: a register read is a socket
        // round trip that takes the server's CPU from the engine being timed
        // (on 2 cores, reading every few microseconds cost COPY ~10%).
        let mut next_check = start + Duration::from_millis(5);
        let mut spins = 0u64;
        while self.ram.read_u32(self.fence_gpa) != seq {
            spins += 1;
            if spins.is_multiple_of(256) && Instant::now() >= next_check {
                next_check += Duration::from_millis(5);
                let status = self.client.read_u32(BAR0, ctx_reg(CTX, CTX_STATUS))?;
                if status & CTX_STATUS_FAULTED != 0 {
                    let addr = self.client.read_u64(BAR0, ctx_reg(CTX, CTX_FAULT_ADDR))?;
                    return Err(BenchError::Fault { status, addr });
                }
                if start.elapsed() > Duration::from_secs(30) {
                    return Err(BenchError::Timeout(seq));
                }
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        Ok(start.elapsed())
    }
}

fn bench(args: &Args) -> Result<()> {
    let reps = args.reps.unwrap_or(if args.quick { 3 } else { 15 }).max(1);
    let ptes: u64 = if args.quick { 512 } else { 4096 };
    let copy_bytes: u64 = if args.quick { 1 << 20 } else { 16 << 20 };
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("umdev-vgpu"))
            .ok_or_else(|| BenchError::Setup("no directory for umdev-vgpu".into()))?,
    };
    if cfg!(debug_assertions) {
        println!("note: a debug build; figures from it say little (cargo build --release)");
    }
    println!("machine: {}", machine());
    println!("server: {} {}", bin.display(), args.server_arg.join(" "));
    println!(
        "reps: {reps} (median), PTEs per sync: {ptes}, copy size: {} KiB",
        copy_bytes >> 10
    );
    let server = start_server(&bin, &args.server_arg, "src")?;
    let socket = &server.socket;
    let ram_mib = ((2 * copy_bytes as usize) >> 20) + 16;
    let mut gpu = Gpu::new(socket, ram_mib)?;

    // --- Set-up: source and destination for copies, the PTEs to rewrite.
    let pages = copy_bytes / PAGE;
    let src = gpu.map_new(SRC_VA, pages, false);
    let dst = gpu.map_new(DST_VA, pages, true);
    for i in 0..copy_bytes / 4 {
        gpu.ram
            .write_u32(src + 4 * i, (i as u32).wrapping_mul(2654435761));
    }
    let (x, y) = (gpu.pages(1), gpu.pages(1));
    let slots: Vec<u64> = (0..ptes)
        .map(|i| {
            let va = PTE_VA + i * PAGE;
            gpu.map(va, x, false);
            gpu.leaf_slot(va)
        })
        .collect();
    // Warm up: the first submission shadows every table.
    gpu.run(&[])?;

    // --- Submission-to-fence latency, and a register write round trip.
    let mut fence = Vec::new();
    let mut reg = Vec::new();
    let rounds = if args.quick { 20 } else { 200 };
    for _ in 0..reps {
        for _ in 0..rounds {
            fence.push(gpu.run(&[])?);
            let t = Instant::now();
            gpu.client
                .write_u32(BAR0, ctx_reg(CTX, CTX_MSIX_VECTOR), 0)?;
            reg.push(t.elapsed());
        }
    }
    let (fence, reg) = (median(fence), median(reg));
    println!(
        "submission-to-fence latency: {:.1} us; trapped register write {:.1} us; ratio {:.2}",
        us(fence),
        us(reg),
        us(fence) / us(reg)
    );

    // --- Shadowed PTE updates at a sync point.
    let mut empty = Vec::new();
    let mut full = Vec::new();
    for r in 0..reps {
        empty.push(gpu.run(&[])?);
        let target = if r.is_multiple_of(2) { y } else { x };
        for &slot in &slots {
            gpu.ram.write_u64(slot, target | PTE_PRESENT);
        }
        full.push(gpu.run(&[])?);
    }
    // The last rewrite took effect: a COPY from the last PTE's page reads it.
    let probe = gpu.map_new(0x4_0000_0000, 1, true);
    let last_target = if (reps - 1).is_multiple_of(2) { y } else { x };
    gpu.ram.write_u32(last_target, 0x5eed_0001);
    gpu.run(&cmd::copy(PTE_VA + (ptes - 1) * PAGE, 0x4_0000_0000, 4))?;
    if gpu.ram.read_u32(probe) != 0x5eed_0001 {
        return Err(BenchError::Setup(
            "the rewritten PTEs did not take effect".into(),
        ));
    }
    let (empty, full) = (median(empty), median(full));
    let per = full.saturating_sub(empty);
    let rate = ptes as f64 / per.as_secs_f64().max(1e-9);
    println!(
        "shadowed PTE updates at a sync point: {:.2} M/s ({:.0} ns each; {ptes} per sync: {:.1} us, empty sync {:.1} us, ratio {:.2})",
        rate / 1e6,
        1e9 / rate,
        us(full),
        us(empty),
        us(full) / us(empty)
    );

    // --- BLIT and COPY throughput against memcpy, each timed next to a
    // memcpy of the same bytes (the ratio is taken per pair, so a machine
    // whose speed drifts during the run moves both sides).
    let line = 4096u64;
    let lines = copy_bytes / line;
    let blit = cmd::blit(
        SRC_VA,
        line as u32,
        DST_VA,
        line as u32,
        line as u32,
        lines as u32,
    );
    let copy = cmd::copy(SRC_VA, DST_VA, copy_bytes as u32);
    let memcpy = |gpu: &Gpu, times: usize| {
        let t = Instant::now();
        for _ in 0..times {
            gpu.ram.memcpy(src, dst, copy_bytes as usize);
        }
        t.elapsed()
    };
    // One command per submission (each pays a doorbell, a sync point and an
    // audit), then QUEUED commands in one submission, as a driver that keeps
    // the ring full. The difference between the two is the engine's rate:
    // QUEUED - 1 more commands without the fixed cost of a submission.
    const QUEUED: usize = 4;
    for (name, one) in [
        (format!("BLIT {lines} lines x {line} B"), &blit),
        (format!("COPY {} KiB", copy_bytes >> 10), &copy),
    ] {
        let queued = one.repeat(QUEUED);
        let (mut single, mut full, mut rate) = (Vec::new(), Vec::new(), Vec::new());
        let (mut t_one, mut t_cpu) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let e1 = gpu.run(one)?;
            let c1 = memcpy(&gpu, 1);
            let eq = gpu.run(&queued)?;
            let cq = memcpy(&gpu, QUEUED);
            let ratio = |c: Duration, e: Duration| c.as_secs_f64() / e.as_secs_f64().max(1e-9);
            single.push(ratio(c1, e1));
            full.push(ratio(cq, eq));
            // (A pair where the longer side was not longer says nothing.)
            if eq > e1 && cq > c1 {
                rate.push(ratio(cq - c1, eq - e1));
            }
            t_one.push(e1);
            t_cpu.push(c1);
        }
        // The copies arrived.
        for i in [0, copy_bytes / 8, copy_bytes / 4 - 1] {
            if gpu.ram.read_u32(dst + 4 * i) != (i as u32).wrapping_mul(2654435761) {
                return Err(BenchError::Setup(format!("copy wrong at dword {i}")));
            }
        }
        let gbps = |d: Duration| copy_bytes as f64 / d.as_secs_f64().max(1e-9) / 1e9;
        println!(
            "{name}: {:.2} GB/s doorbell to fence; memcpy {:.2} GB/s; ratio {}; {QUEUED} per submission: ratio {}; the engine's rate (the {} more in it): ratio {}",
            gbps(median(t_one)),
            gbps(median(t_cpu)),
            spread(single),
            spread(full),
            QUEUED - 1,
            spread(rate),
        );
    }

    if args.no_migration {
        return Ok(());
    }
    // --- Migration downtime.
    let dst_server = start_server(&bin, &args.server_arg, "dst")?;
    let dst_socket = &dst_server.socket;
    let mut other = Gpu::new(dst_socket, ram_mib)?;
    let vram_bytes: u64 = if args.quick { 1 << 20 } else { 16 << 20 };
    let mut idle = Vec::new();
    let mut kept = Vec::new();
    let mut redrawn = Vec::new();
    let mut stop_copy_bytes = 0;
    let mut pattern = 0x0101_0101u32;
    // First `reps` migrations with no VRAM in use, then VRAM drawn, then
    // unchanged and redrawn in turn.
    for rep in 0..3 * reps {
        let case = if rep < reps { 0 } else { 1 + (rep - reps) % 2 };
        if rep == reps {
            // VRAM in use from here on (VRAM_VA mapped once per device).
            for g in [&mut gpu, &mut other] {
                for i in 0..vram_bytes / PAGE {
                    g.map_vram(VRAM_VA + i * PAGE, i * PAGE);
                }
            }
            gpu.run(&cmd::fill(VRAM_VA, vram_bytes as u32, pattern))?;
        }
        let (src, dst) = (&mut gpu, &mut other);
        let memory = [(RAM_GPA, src.ram.0.len() as u64)];
        let m = Migration::begin(
            &mut src.client,
            &mut dst.client,
            &memory,
            &mut Ram::copier(&src.ram, &dst.ram),
        )?;
        if case == 2 {
            pattern = pattern.wrapping_add(0x0101_0101);
            src.run(&cmd::fill(VRAM_VA, vram_bytes as u32, pattern))?;
            // The ring and the fence the guest wrote meanwhile (the VMM's own
            // dirty tracking would find them).
            let (ring, size) = (src.ring, u64::from(RING_SIZE));
            dst.ram.copy_from(&src.ram, ring, size as usize);
        }
        let report = m.finish(
            &mut src.client,
            &mut dst.client,
            &mut Ram::copier(&src.ram, &dst.ram),
        )?;
        dst.adopt(src);
        match case {
            0 => idle.push(report.downtime),
            1 => kept.push(report.downtime),
            _ => {
                redrawn.push(report.downtime);
                stop_copy_bytes = report.stop_copy_bytes;
            }
        }
        std::mem::swap(&mut gpu, &mut other);
        // The device runs where it went: a submission completes there.
        gpu.run(&[])?;
    }
    let (idle, kept, redrawn) = (median(idle), median(kept), median(redrawn));
    println!(
        "migration downtime: idle {:.2} ms; {} MiB VRAM unchanged since pre-copy {:.2} ms, ratio {:.2}; redrawn {:.2} ms, ratio {:.2} ({} KiB stop-copy)",
        us(idle) / 1e3,
        vram_bytes >> 20,
        us(kept) / 1e3,
        us(kept) / us(idle),
        us(redrawn) / 1e3,
        us(redrawn) / us(idle),
        stop_copy_bytes >> 10
    );
    Ok(())
}

/// The median of per-pair ratios, with their range.
fn spread(mut ratios: Vec<f64>) -> String {
    if ratios.is_empty() {
        return "(no pair)".into();
    }
    ratios.sort_by(f64::total_cmp);
    format!(
        "{:.3} ({:.3}-{:.3})",
        ratios[ratios.len() / 2],
        ratios[0],
        ratios[ratios.len() - 1]
    )
}

fn main() -> ExitCode {
    let args = Args::parse();
    match bench(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("umdev-vgpu-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
