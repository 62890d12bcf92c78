//! `umdev-vgpu-sched-bench`: how one engine shares itself between vGPUs (a
//! parent's instances), each figure beside a baseline measured in the same run.
//!
//! Each figure is measured twice:
//! - **in process**: every vGPU is a real one (`umdev_vgpu::new_function`) on
//!   its own memfd guest RAM, driven in process (`umdev_vgpu::inprocess`:
//!   page tables and a ring in guest memory, doorbells as register writes),
//!   all on one [`Scheduler`]; no sockets, so what is measured is the engine
//!   and its scheduling, not the transport;
//! - **through the parent**: `umdev-vgpu-parent` started here, its instances
//!   made on its control socket, each driven over vfio-user from a thread of
//!   this process as a VMM and guest driver would (`umdev_vgpu::remote`:
//!   memfd guest RAM by DMA_MAP, doorbells as REGION_WRITEs), the engine time
//!   read from the parent (`list`'s `engine_seconds`).
//!
//! - **Shares under saturation**: two vGPUs each keep two submissions of
//!   FILLs queued at all times for a while; the figure is each one's part of
//!   the engine time the scheduler accounted (weights 1:1, then 1:3), against
//!   the weights' part.
//! - **Latency next to a flood**: a light vGPU submits one STORE_DWORD and
//!   waits for its fence, again and again: the median submission-to-fence
//!   time while a neighbour floods the engine, against the same alone.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use umdev::benchmark::Device;
use umdev_vgpu::encode as cmd;
use umdev_vgpu::inprocess::*;
use umdev_vgpu::parent::control::{ask_patiently, ControlError, InstanceInfo, Request, Response};
use umdev_vgpu::regs::PAGE_SIZE;
use umdev_vgpu::remote;
use umdev_vgpu::sched::{EngineShare, Scheduler};
use umdev_vgpu::VgpuConfig;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Short runs (a smoke test, not figures).
    #[arg(long)]
    quick: bool,
    /// Seconds each saturation measurement runs (0.01 to 3600).
    #[arg(long, default_value_t = 3.0, value_parser = seconds)]
    seconds: f64,
    /// Light submissions timed per latency measurement.
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    samples: u32,
    /// The parent binary [default: umdev-vgpu-parent next to this program].
    #[arg(long)]
    parent_bin: Option<PathBuf>,
    /// Only the in-process figures.
    #[arg(long)]
    no_parent: bool,
}

/// `--seconds`: a number of seconds a measurement can run for.
fn seconds(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds from 0.01 to 3600"
        )),
    }
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

/// Submission-to-fence times of a one-command submission, with or without a
/// flooding neighbour on the same engine.
fn light_latency(samples: usize, with_flood: bool) -> Vec<Duration> {
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
    times
}

// ------------------------------------------------------ through the parent --

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("the parent's control socket: {0}")]
    Control(#[from] ControlError),
    #[error("the parent: {0}")]
    Refused(String),
    #[error("a vGPU instance: {0}")]
    Driver(#[from] remote::DriverError),
    #[error("a flood thread panicked")]
    Panicked,
}

type Result<T> = std::result::Result<T, BenchError>;

/// The type every instance here is made of.
const INSTANCE_TYPE: &str = "vgpu-16m";
/// Guest RAM each instance's driver gives it.
const GUEST_MIB: usize = 8;
/// A flood's FILLs write the GPU addresses `[FLOOD_VA, + FLOOD_PAGES
/// pages)`, every page of them mapped to one page of guest RAM (engine time,
/// not memory traffic).
const FLOOD_VA: u64 = 0x4000_0000;
const FLOOD_PAGES: u64 = 1024;
/// A light submission's STORE_DWORD writes this GPU address.
const LIGHT_VA: u64 = 0x1000_0000;

/// `umdev-vgpu-parent` started for the run on a directory of its own (killed,
/// and the directory removed, when dropped).
struct ParentProcess(Device);

impl ParentProcess {
    fn start(bin: &Path) -> Result<ParentProcess> {
        let dir =
            std::env::temp_dir().join(format!("umdev-vgpu-sched-bench-{}", std::process::id()));
        let args = ["--state-dir".into(), dir.clone().into_os_string()];
        // Errors only unless RUST_LOG says otherwise: its warning that these
        // drivers never asked about migration is noise here.
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into());
        Device::spawn(bin, &args, dir, "control.sock", |cmd| {
            cmd.env("RUST_LOG", log);
        })
        .map(ParentProcess)
        .map_err(BenchError::Setup)
    }

    fn ask(&self, request: Request) -> Result<Response> {
        match ask_patiently(&self.0.socket, &request)? {
            Response::Error { error } => Err(BenchError::Refused(error)),
            r => Ok(r),
        }
    }

    fn create(&self, weight: u32) -> Result<InstanceInfo> {
        let request = Request::Create {
            type_name: INSTANCE_TYPE.into(),
            uuid: None,
            weight: Some(weight),
            persist: false,
        };
        match self.ask(request)? {
            Response::Instance { instance } => Ok(instance),
            r => Err(BenchError::Refused(format!("create answered {r:?}"))),
        }
    }

    /// Removes every one of `instances` (the first error, after trying all).
    fn remove(&self, instances: &[InstanceInfo]) -> Result<()> {
        let mut first = Ok(());
        for i in instances {
            let removed = self.ask(Request::Remove {
                uuid: i.uuid.clone(),
                force: true,
            });
            if let (Err(e), Ok(())) = (removed, &first) {
                first = Err(e);
            }
        }
        first
    }

    /// `weights.len()` new instances with those weights, given to `measure`,
    /// then removed, whatever `measure` or a later create said.
    fn with_instances<T>(
        &self,
        weights: &[u32],
        measure: impl FnOnce(&[InstanceInfo]) -> Result<T>,
    ) -> Result<T> {
        let mut instances = Vec::new();
        let mut made = Ok(());
        for &w in weights {
            match self.create(w) {
                Ok(i) => instances.push(i),
                Err(e) => {
                    made = Err(e);
                    break;
                }
            }
        }
        let measured = made.and_then(|()| measure(&instances));
        let removed = self.remove(&instances);
        let value = measured?;
        removed?;
        Ok(value)
    }

    /// Engine seconds the parent has accounted to each of `instances`.
    fn engine_seconds(&self, instances: &[InstanceInfo]) -> Result<Vec<f64>> {
        let Response::List { instances: now } = self.ask(Request::List {})? else {
            return Err(BenchError::Refused("list answered something else".into()));
        };
        instances
            .iter()
            .map(|i| {
                now.iter()
                    .find(|n| n.uuid == i.uuid)
                    .map(|n| n.engine_seconds)
                    .ok_or_else(|| BenchError::Refused(format!("instance {} is gone", i.uuid)))
            })
            .collect()
    }

    /// As [`shares`], two instances of the parent flooded over vfio-user.
    fn shares(&self, weights: [u32; 2], run: Duration) -> Result<[f64; 2]> {
        let used = self.with_instances(&weights, |instances| {
            let gpus = [
                flood_gpu(&instances[0].socket)?,
                flood_gpu(&instances[1].socket)?,
            ];
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                let floods: Vec<_> = gpus
                    .into_iter()
                    .map(|gpu| s.spawn(|| remote_flood(gpu, &stop)))
                    .collect();
                // The floods stop on every way out of here, before the scope
                // joins them.
                let _stop = StopOnDrop(&stop);
                std::thread::sleep(run / 5);
                let before = self.engine_seconds(instances)?;
                std::thread::sleep(run);
                let after = self.engine_seconds(instances)?;
                drop(_stop);
                for f in floods {
                    f.join().map_err(|_| BenchError::Panicked)??;
                }
                Ok(after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| a - b)
                    .collect::<Vec<f64>>())
            })
        })?;
        let total: f64 = used.iter().sum();
        if total <= 0.0 {
            return Err(BenchError::Refused("no engine time accounted".into()));
        }
        Ok([used[0] / total, used[1] / total])
    }

    /// As [`light_latency`], a light instance of the parent beside a
    /// flooding one.
    fn light_latency(&self, samples: usize, with_flood: bool) -> Result<Vec<Duration>> {
        let weights: &[u32] = if with_flood { &[1, 1] } else { &[1] };
        self.with_instances(weights, |instances| self.light_beside(instances, samples))
    }

    /// Light submissions on `instances[0]`, a flood on `instances[1]` if
    /// there is one.
    fn light_beside(&self, instances: &[InstanceInfo], samples: usize) -> Result<Vec<Duration>> {
        let mut light = remote::Gpu::new(Path::new(&instances[0].socket), GUEST_MIB)?;
        light.map_new(LIGHT_VA, 1, true);
        let flood = instances.get(1).map(|i| flood_gpu(&i.socket)).transpose()?;
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let flooding = flood.map(|gpu| s.spawn(|| remote_flood(gpu, &stop)));
            let _stop = StopOnDrop(&stop);
            if flooding.is_some() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let mut times = Vec::with_capacity(samples);
            for i in 0..samples {
                let start = Instant::now();
                let seq = light.submit(&cmd::store_dword(LIGHT_VA, i as u32))?;
                light.wait(seq, remote::Wait::Spin)?;
                times.push(start.elapsed());
                std::thread::sleep(Duration::from_micros(500));
            }
            drop(_stop);
            if let Some(f) = flooding {
                f.join().map_err(|_| BenchError::Panicked)??;
            }
            Ok(times)
        })
    }
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A driver on the instance at `socket`, with the flood's range mapped.
fn flood_gpu(socket: &str) -> Result<remote::Gpu> {
    let mut gpu = remote::Gpu::new(Path::new(socket), GUEST_MIB)?;
    let page = gpu.pages(1);
    for p in 0..FLOOD_PAGES {
        gpu.map(FLOOD_VA + p * PAGE_SIZE, page, true);
    }
    Ok(gpu)
}

/// Keeps two heavy submissions (8 FILLs of 4 MiB each) queued on `gpu`
/// until `stop`, looking at its fences every 200 us (a CPU left to the
/// parent).
fn remote_flood(mut gpu: remote::Gpu, stop: &AtomicBool) -> Result<()> {
    let fill = cmd::fill(FLOOD_VA, (FLOOD_PAGES * PAGE_SIZE) as u32, 0x5a5a_5a5a);
    let heavy = fill.repeat(8);
    let wait = remote::Wait::Sleep(Duration::from_micros(200));
    let mut last = gpu.submit(&heavy)?;
    while !stop.load(Ordering::Relaxed) {
        let next = gpu.submit(&heavy)?;
        gpu.wait(last, wait)?;
        last = next;
    }
    Ok(gpu.wait(last, wait)?)
}

/// The figures, with `shares` and `latency` measuring them one way.
fn figures(
    how: &str,
    run: Duration,
    samples: usize,
    shares: &mut dyn FnMut([u32; 2], Duration) -> Result<[f64; 2]>,
    latency: &mut dyn FnMut(usize, bool) -> Result<Vec<Duration>>,
) -> Result<()> {
    for weights in [[1, 1], [1, 3]] {
        let got = shares(weights, run)?;
        let want = f64::from(weights[0]) / f64::from(weights[0] + weights[1]);
        println!(
            "{how}engine shares, weights {}:{}: {:.1}% / {:.1}%; weights' part {:.1}% / {:.1}%; ratio {:.3}",
            weights[0],
            weights[1],
            100.0 * got[0],
            100.0 * got[1],
            100.0 * want,
            100.0 * (1.0 - want),
            got[0] / want
        );
    }
    // The median and the 90th percentile, in microseconds.
    let at = |mut times: Vec<Duration>| {
        times.sort();
        let us = |i: usize| times[i.min(times.len() - 1)].as_secs_f64() * 1e6;
        (us(times.len() / 2), us(times.len() * 9 / 10))
    };
    let alone = at(latency(samples, false)?);
    let flooded = at(latency(samples, true)?);
    println!(
        "{how}light submission-to-fence latency next to a flood: {:.1} us (p90 {:.1}); alone {:.1} us (p90 {:.1}); ratio {:.2}",
        flooded.0,
        flooded.1,
        alone.0,
        alone.1,
        flooded.0 / alone.0
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (run, samples) = if args.quick {
        (Duration::from_millis(300), 40)
    } else {
        (Duration::from_secs_f64(args.seconds), args.samples as usize)
    };
    println!(
        "umdev-vgpu-sched-bench: {} CPUs; {:.1} s per saturation run, {samples} latency samples",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        run.as_secs_f64()
    );
    let in_process = figures(
        "",
        run,
        samples,
        &mut |w, run| Ok(shares(w, run)),
        &mut |n, flood| Ok(light_latency(n, flood)),
    );
    let result = in_process.and_then(|()| {
        if args.no_parent {
            return Ok(());
        }
        let bin = match &args.parent_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .map_err(|e| BenchError::Setup(format!("this program's path: {e}")))?
                .with_file_name("umdev-vgpu-parent"),
        };
        let parent = ParentProcess::start(&bin)?;
        figures(
            "through the parent: ",
            run,
            samples,
            &mut |w, run| parent.shares(w, run),
            &mut |n, flood| parent.light_latency(n, flood),
        )
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("umdev-vgpu-sched-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
