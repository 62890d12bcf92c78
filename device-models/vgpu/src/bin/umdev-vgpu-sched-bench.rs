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
use umdev_vgpu::encode as cmd;
use umdev_vgpu::inprocess::*;
use umdev_vgpu::parent::control::{ask_patiently, InstanceInfo, Request, Response};
use umdev_vgpu::remote;
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
    /// The parent binary [default: umdev-vgpu-parent next to this program].
    #[arg(long)]
    parent_bin: Option<PathBuf>,
    /// Only the in-process figures.
    #[arg(long)]
    no_parent: bool,
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

/// The type every instance here is made of.
const INSTANCE_TYPE: &str = "vgpu-16m";
/// Guest RAM each instance's driver gives it.
const GUEST_MIB: usize = 8;
/// A flood's FILLs write `[FLOOD_VA, + FLOOD_PAGES pages)`, every page of it
/// mapped to one page of guest RAM (engine time, not memory traffic).
const FLOOD_VA: u64 = 0x4000_0000;
const FLOOD_PAGES: u64 = 1024;
/// A light submission's STORE_DWORD writes here.
const LIGHT_VA: u64 = 0x1000_0000;

/// `umdev-vgpu-parent` started for the run on a directory of its own: killed,
/// and the directory removed, when dropped.
struct ParentProcess {
    child: std::process::Child,
    dir: PathBuf,
}

/// Sets its flag when dropped: the flood threads stop on every way out.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl ParentProcess {
    fn start(bin: &Path) -> Result<ParentProcess, String> {
        use std::process::{Command, Stdio};
        let dir =
            std::env::temp_dir().join(format!("umdev-vgpu-sched-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Errors only unless RUST_LOG says otherwise: its warning that
        // these drivers never asked about migration is noise here.
        let child = Command::new(bin)
            .arg("--state-dir")
            .arg(&dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut parent = ParentProcess { child, dir };
        let control = parent.control();
        umdev::cli::wait_listening(&control, Some(&mut parent.child), Duration::from_secs(10))
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(parent)
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn ask(&self, request: Request) -> Result<Response, String> {
        match ask_patiently(&self.control(), &request)? {
            Response::Error { error } => Err(format!("the parent: {error}")),
            r => Ok(r),
        }
    }

    fn create(&self, weight: u32) -> Result<InstanceInfo, String> {
        let request = Request::Create {
            type_name: INSTANCE_TYPE.into(),
            uuid: None,
            weight: Some(weight),
            persist: false,
        };
        match self.ask(request)? {
            Response::Instance { instance } => Ok(instance),
            r => Err(format!("the parent answered create with {r:?}")),
        }
    }

    fn remove(&self, instances: &[InstanceInfo]) -> Result<(), String> {
        for i in instances {
            self.ask(Request::Remove {
                uuid: i.uuid.clone(),
                force: true,
            })?;
        }
        Ok(())
    }

    /// Engine seconds the parent has accounted to each of `instances`.
    fn engine_seconds(&self, instances: &[InstanceInfo]) -> Result<Vec<f64>, String> {
        let Response::List { instances: now } = self.ask(Request::List {})? else {
            return Err("the parent answered list with something else".into());
        };
        instances
            .iter()
            .map(|i| {
                now.iter()
                    .find(|n| n.uuid == i.uuid)
                    .map(|n| n.engine_seconds)
                    .ok_or_else(|| format!("instance {} is gone", i.uuid))
            })
            .collect()
    }

    /// As [`shares`], two instances of the parent flooded over vfio-user.
    fn shares(&self, weights: [u32; 2], run: Duration) -> Result<[f64; 2], String> {
        let instances = [self.create(weights[0])?, self.create(weights[1])?];
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let mut threads = Vec::new();
        for i in &instances {
            let gpu = remote_gpu(&i.socket)?;
            let stop = stop.0.clone();
            threads.push(std::thread::spawn(move || remote_flood(gpu, &stop)));
        }
        std::thread::sleep(run / 5);
        let before = self.engine_seconds(&instances)?;
        std::thread::sleep(run);
        let after = self.engine_seconds(&instances)?;
        drop(stop);
        for t in threads {
            t.join().map_err(|_| "a flood thread panicked")??;
        }
        self.remove(&instances)?;
        let used: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let total: f64 = used.iter().sum();
        if total <= 0.0 {
            return Err("the parent accounted no engine time".into());
        }
        Ok([used[0] / total, used[1] / total])
    }

    /// As [`light_latency`], a light instance of the parent beside a
    /// flooding one.
    fn light_latency(&self, samples: usize, with_flood: bool) -> Result<Vec<Duration>, String> {
        let light_instance = self.create(1)?;
        let mut instances = vec![light_instance.clone()];
        let mut light = remote_gpu(&light_instance.socket)?;
        light.map_new(LIGHT_VA, 1, true);
        let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
        let flooder = if with_flood {
            let flood_instance = self.create(1)?;
            let gpu = remote_gpu(&flood_instance.socket)?;
            instances.push(flood_instance);
            let stop = stop.0.clone();
            let t = std::thread::spawn(move || remote_flood(gpu, &stop));
            std::thread::sleep(Duration::from_millis(50));
            Some(t)
        } else {
            None
        };
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples {
            let start = Instant::now();
            let seq = light
                .submit(&cmd::store_dword(LIGHT_VA, i as u32))
                .map_err(|e| e.to_string())?;
            light
                .wait(seq, remote::Wait::Spin)
                .map_err(|e| e.to_string())?;
            times.push(start.elapsed());
            std::thread::sleep(Duration::from_micros(500));
        }
        drop(stop);
        if let Some(t) = flooder {
            t.join().map_err(|_| "the flood thread panicked")??;
        }
        drop(light);
        self.remove(&instances)?;
        Ok(times)
    }
}

impl Drop for ParentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A driver on the instance at `socket`, with the flood's range mapped.
fn remote_gpu(socket: &str) -> Result<remote::Gpu, String> {
    let mut gpu =
        remote::Gpu::new(Path::new(socket), GUEST_MIB).map_err(|e| format!("{socket}: {e}"))?;
    let page = gpu.pages(1);
    for p in 0..FLOOD_PAGES {
        gpu.map(FLOOD_VA + p * 4096, page, true);
    }
    Ok(gpu)
}

/// Keeps two heavy submissions (8 FILLs of 4 MiB each) queued on `gpu`
/// until `stop`, looking at its fences every 200 us (a CPU left to the
/// parent).
fn remote_flood(mut gpu: remote::Gpu, stop: &AtomicBool) -> Result<(), String> {
    let fill = cmd::fill(FLOOD_VA, (FLOOD_PAGES * 4096) as u32, 0x5a5a_5a5a);
    let heavy = fill.repeat(8);
    let wait = remote::Wait::Sleep(Duration::from_micros(200));
    let mut run = || -> Result<(), remote::DriverError> {
        let mut last = gpu.submit(&heavy)?;
        while !stop.load(Ordering::Relaxed) {
            let next = gpu.submit(&heavy)?;
            gpu.wait(last, wait)?;
            last = next;
        }
        gpu.wait(last, wait)
    };
    run().map_err(|e| format!("flood: {e}"))
}

/// The figures, with `shares` and `latency` measuring them one way.
fn figures(
    how: &str,
    run: Duration,
    samples: usize,
    shares: &mut dyn FnMut([u32; 2], Duration) -> Result<[f64; 2], String>,
    latency: &mut dyn FnMut(usize, bool) -> Result<Vec<Duration>, String>,
) -> Result<(), String> {
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
        (Duration::from_secs_f64(args.seconds), args.samples)
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
                .map_err(|e| e.to_string())?
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
