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
//!   (behind one doorbell), and the engine's own rate: the 3 more commands of
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

use clap::Parser;
use umdev::vfio_user::Migration;
use umdev_vgpu::encode as cmd;
use umdev_vgpu::regs::*;
use umdev_vgpu::remote::{DriverError, Gpu, Ram, RAM_GPA};

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
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("vfio-user: {0}")]
    Client(#[from] umdev::vfio_user::client::ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, BenchError>;

const PAGE: u64 = PAGE_SIZE;
const BAR0: u32 = MMIO_BAR as u32;
const CTX: usize = 0;
const SRC_VA: u64 = 0x1_0000_0000;
const DST_VA: u64 = 0x2_0000_0000;
const PTE_VA: u64 = 0x3_0000_0000;
const VRAM_VA: u64 = 0x5_0000_0000;

fn start_server(bin: &Path, extra: &[String], name: &str) -> Result<Device> {
    let dir = std::env::temp_dir().join(format!("umdev-vgpu-bench-{}-{name}", std::process::id()));
    Device::start(bin, extra, dir, "vgpu.sock", |_| {}).map_err(BenchError::Setup)
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
    let mut gpu = Gpu::migratable(socket, ram_mib)?;

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
    // audit), then QUEUED commands behind one doorbell. The difference
    // between the two is the engine's rate: QUEUED - 1 more commands without
    // the fixed cost of a submission.
    const QUEUED: usize = 4;
    for (name, one) in [
        (format!("BLIT {lines} lines x {line} B"), &blit),
        (format!("COPY {} KiB", copy_bytes >> 10), &copy),
    ] {
        // The engine's copy arrives (checked on a cleared destination, before
        // the memcpys below write the same bytes there).
        gpu.ram.fill(dst, copy_bytes as usize, 0);
        gpu.run(one)?;
        for i in [0, copy_bytes / 8, copy_bytes / 4 - 1] {
            if gpu.ram.read_u32(dst + 4 * i) != (i as u32).wrapping_mul(2654435761) {
                return Err(BenchError::Setup(format!("{name}: wrong at dword {i}")));
            }
        }
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
    let mut other = Gpu::migratable(dst_socket, ram_mib)?;
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
            let (ring, size) = src.ring();
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
