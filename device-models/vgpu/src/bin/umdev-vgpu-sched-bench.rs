//! `umdev-vgpu-sched-bench`: how one engine shares itself between vGPUs (a
//! parent's instances), each figure beside a baseline measured in the same run.
//!
//! Every vGPU is a real one (`umdev_vgpu::new_function`) on its own memfd
//! guest RAM, driven in process (`umdev_vgpu::inprocess`: page tables and a
//! ring in guest memory, doorbells as register writes), all on one
//! [`Scheduler`]; no sockets, so what is measured is the engine and its
//! scheduling, not the transport.
//!
//! - **Shares under saturation**: two vGPUs each keep two submissions of
//!   FILLs queued at all times for a while; the figure is each one's part of
//!   the engine time the scheduler accounted (weights 1:1, then 1:3), against
//!   the weights' part.
//! - **Latency next to a flood**: a light vGPU submits one STORE_DWORD and
//!   waits for its fence, again and again: the median submission-to-fence
//!   time while a neighbour floods the engine, against the same alone.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use umdev_vgpu::encode as cmd;
use umdev_vgpu::inprocess::*;
use umdev_vgpu::sched::{EngineShare, Scheduler};
use umdev_vgpu::VgpuConfig;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Short runs (a smoke test, not figures).
    #[arg(long)]
    quick: bool,
    /// Seconds each saturation measurement runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Light submissions timed per latency measurement.
    #[arg(long, default_value_t = 400)]
    samples: usize,
}

/// A vGPU on `share`, its RAM mapped as `standard_mappings(big)` says.
fn vgpu(name: &str, share: EngineShare, big: bool) -> (Gpu, Ram) {
    let ram = Ram::new(name);
    let config = VgpuConfig {
        vram_mib: 1,
        engine: Some(share),
        ..VgpuConfig::default()
    };
    let mut gpu = Gpu::with_config(&ram, config);
    standard_mappings(&mut gpu, &ram, big);
    (gpu, ram)
}

/// Keeps two heavy submissions (8 FILLs of 4 MiB each) queued on `gpu` until
/// `stop`.
fn flood(mut gpu: Gpu, ram: Ram, stop: Arc<AtomicBool>) {
    let fill = cmd::fill(BIG_VA, 4 << 20, 0x5a5a_5a5a);
    let heavy: Vec<Vec<u32>> = (0..8).map(|_| fill.clone()).collect();
    let mut last = gpu.submit(&ram, &heavy);
    while !stop.load(Ordering::Relaxed) {
        let next = gpu.submit(&ram, &heavy);
        gpu.wait_fence(last, Duration::from_secs(30));
        last = next;
    }
    gpu.wait_fence(last, Duration::from_secs(30));
}

/// Engine time of two saturating vGPUs with `weights`: each one's part.
fn shares(weights: [u32; 2], run: Duration) -> [f64; 2] {
    let engine = Scheduler::start();
    let stop = Arc::new(AtomicBool::new(false));
    let shares: Vec<EngineShare> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| engine.share(&format!("v{i}"), w))
        .collect();
    let mut threads = Vec::new();
    for (i, share) in shares.into_iter().enumerate() {
        let (gpu, ram) = vgpu(&format!("sched-bench-{i}"), share, true);
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || flood(gpu, ram, stop)));
    }
    // Both busy before the window opens.
    std::thread::sleep(run / 5);
    let busy = |e: &Scheduler| -> Vec<Duration> { e.shares().iter().map(|s| s.2.busy).collect() };
    let before = busy(&engine);
    std::thread::sleep(run);
    let after = busy(&engine);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let used: Vec<f64> = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (*a - *b).as_secs_f64())
        .collect();
    let total: f64 = used.iter().sum();
    [used[0] / total, used[1] / total]
}

/// Median submission-to-fence time of a one-command submission, with or
/// without a flooding neighbour on the same engine.
fn light_latency(samples: usize, with_flood: bool) -> Duration {
    let engine = Scheduler::start();
    let (mut light, light_ram) = vgpu("sched-bench-light", engine.share("light", 1), false);
    let stop = Arc::new(AtomicBool::new(false));
    let flooder = with_flood.then(|| {
        let (gpu, ram) = vgpu("sched-bench-flood", engine.share("flood", 1), true);
        let stop = stop.clone();
        let t = std::thread::spawn(move || flood(gpu, ram, stop));
        std::thread::sleep(Duration::from_millis(50));
        t
    });
    let mut times = Vec::with_capacity(samples);
    for i in 0..samples {
        let start = Instant::now();
        let seq = light.submit(&light_ram, &[cmd::store_dword(A_VA, i as u32)]);
        // The fence lands in guest memory: spin there, not on a register.
        while (light_ram.u32_at(FENCE_PAGE).wrapping_sub(seq) as i32) < 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "fence {seq}");
            std::hint::spin_loop();
        }
        times.push(start.elapsed());
        // Light: a submission now and then, not back to back.
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = flooder {
        let _ = t.join();
    }
    times.sort();
    times[times.len() / 2]
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (run, samples) = if args.quick {
        (Duration::from_millis(300), 40)
    } else {
        (Duration::from_secs_f64(args.seconds), args.samples)
    };
    println!(
        "umdev-vgpu-sched-bench: {} CPUs; {:.1} s per saturation run, {samples} latency samples",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        run.as_secs_f64()
    );
    for weights in [[1, 1], [1, 3]] {
        let got = shares(weights, run);
        let want = f64::from(weights[0]) / f64::from(weights[0] + weights[1]);
        println!(
            "engine shares, weights {}:{}: {:.1}% / {:.1}%; weights' part {:.1}% / {:.1}%; ratio {:.3}",
            weights[0],
            weights[1],
            100.0 * got[0],
            100.0 * got[1],
            100.0 * want,
            100.0 * (1.0 - want),
            got[0] / want
        );
    }
    let alone = light_latency(samples, false);
    let flooded = light_latency(samples, true);
    println!(
        "light submission-to-fence latency next to a flood: {:.1} us; alone {:.1} us; ratio {:.2}",
        flooded.as_secs_f64() * 1e6,
        alone.as_secs_f64() * 1e6,
        flooded.as_secs_f64() / alone.as_secs_f64()
    );
    ExitCode::SUCCESS
}
