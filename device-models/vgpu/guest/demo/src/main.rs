//! `umdev-vgpu-demo`: a guest program that uses the vGPU through its Linux
//! driver (umdev_vgpu.ko) as an application uses a GPU: dumb buffers bound
//! into its own GPU address space (page tables the kernel writes in guest
//! RAM, which the host write-tracks and shadows), a command buffer submitted
//! with a fence, the result checked through the buffer's mapping, and the
//! picture shown with KMS (SETCRTC, then a page flip).
//!
//! ```text
//! umdev-vgpu-demo picture [--flip] [--hold-secs N] [--churn N] [--scene a|b]
//! umdev-vgpu-demo fault
//! umdev-vgpu-demo hostile [--rounds N] [--seed S]
//! umdev-vgpu-demo info
//! ```
//! Options anywhere: `--dev PATH` (default /dev/dri/card0). Prints `PASS name
//! detail` / `FAIL name detail` lines (the e2e harness reads them from the
//! console); exits 1 after any FAIL, 2 on a usage error.

mod drm;

use std::process::ExitCode;
use std::time::Duration;

use drm::{Buffer, Drm, WaitResult};
use umdev_vgpu_abi::encode as cmd;
use umdev_vgpu_abi::picture::{self, DrawTargets};

/// Where the demo binds its buffers (any 4 KiB-aligned addresses below 2^47).
const FB_VA: u64 = 0x1000_0000;
const FB2_VA: u64 = 0x1100_0000;
const IMAGE_VA: u64 = 0x2000_0000;
const SCRATCH_VA: u64 = 0x3000_0000;
const BATCH_VA: u64 = 0x4000_0000;
/// Churn bindings: one per 2 MiB (a leaf table each) from here.
const CHURN_VA: u64 = 0x5000_0000;
/// Nothing is ever bound here.
const UNBOUND_VA: u64 = 0x7000_0000;

const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

struct Opts {
    mode: String,
    dev: String,
    flip: bool,
    hold_secs: u64,
    churn: u32,
    rounds: u32,
    seed: u64,
    /// What `picture` draws (`umdev_vgpu_abi::picture::scene`).
    scene: &'static [picture::Op],
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        mode: String::new(),
        dev: "/dev/dri/card0".into(),
        flip: false,
        hold_secs: 0,
        churn: 0,
        rounds: 100,
        seed: 1,
        scene: picture::SCENE,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .cloned()
        };
        let number = |s: String, name: &str| s.parse::<u64>().map_err(|_| format!("{name}: {s:?}"));
        match a.as_str() {
            "--flip" => o.flip = true,
            "--dev" => o.dev = value("--dev")?,
            "--hold-secs" => o.hold_secs = number(value(a)?, a)?,
            "--churn" => o.churn = number(value(a)?, a)? as u32,
            "--rounds" => o.rounds = number(value(a)?, a)? as u32,
            "--seed" => o.seed = number(value(a)?, a)?,
            "--scene" => {
                let name = value(a)?;
                o.scene = picture::scene(&name).ok_or(format!("--scene {name:?} (a or b)"))?;
            }
            m if !m.starts_with('-') && o.mode.is_empty() => o.mode = m.to_owned(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.mode.is_empty() {
        return Err("no mode (picture, fault, hostile, info)".into());
    }
    Ok(o)
}

/// Collects PASS/FAIL lines; the process fails if any FAIL was printed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn pass(&mut self, name: &str, detail: impl std::fmt::Display) {
        println!("PASS {name} {detail}");
    }
    fn fail(&mut self, name: &str, detail: impl std::fmt::Display) {
        println!("FAIL {name} {detail}");
        self.failed = true;
    }
    fn check<T, E: std::fmt::Display>(&mut self, name: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.fail(name, e);
                None
            }
        }
    }
}

/// Writes `commands` and BATCH_END into `batch` (bound at BATCH_VA), submits
/// it and waits for its fence.
fn run_batch(drm: &Drm, batch: &mut Buffer, commands: &[u32]) -> Result<WaitResult, String> {
    let mut words = commands.to_vec();
    words.extend(cmd::batch_end());
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    if bytes.len() > batch.size {
        return Err(format!(
            "{} bytes of commands, batch of {}",
            bytes.len(),
            batch.size
        ));
    }
    batch.write(0, &bytes);
    let seq = drm.submit(BATCH_VA).map_err(|e| format!("submit: {e}"))?;
    drm.wait(seq, FENCE_TIMEOUT)
        .map_err(|e| format!("wait for fence {seq}: {e}"))
}

/// The buffers of the picture: framebuffer(s), image, scratch line, batch.
struct Scene {
    fbs: Vec<Buffer>,
    image: Buffer,
    scratch: Buffer,
    batch: Buffer,
}

fn scene(drm: &Drm, fbs: usize) -> Result<Scene, String> {
    fn e(what: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let mut out = Vec::new();
    for (i, va) in [FB_VA, FB2_VA].into_iter().take(fbs).enumerate() {
        // 384 pixels of 4 bytes: the picture's stride (320 pixels + padding).
        let fb = drm
            .dumb(picture::STRIDE / 4, picture::HEIGHT)
            .map_err(e("framebuffer"))?;
        if fb.pitch != picture::STRIDE {
            return Err(format!(
                "framebuffer {i} pitch {} (want {})",
                fb.pitch,
                picture::STRIDE
            ));
        }
        drm.bind(&fb, va, true).map_err(e("bind framebuffer"))?;
        out.push(fb);
    }
    let mut image = drm
        .dumb(picture::IMAGE_WIDTH, picture::IMAGE_HEIGHT)
        .map_err(e("image"))?;
    image.write(0, &picture::image_bytes());
    drm.bind(&image, IMAGE_VA, false).map_err(e("bind image"))?;
    let scratch = drm.dumb(1024, 4).map_err(e("scratch"))?;
    drm.bind(&scratch, SCRATCH_VA, true)
        .map_err(e("bind scratch"))?;
    let batch = drm.dumb(1024, 16).map_err(e("batch"))?;
    drm.bind(&batch, BATCH_VA, false).map_err(e("bind batch"))?;
    Ok(Scene {
        fbs: out,
        image,
        scratch,
        batch,
    })
}

/// Draws `ops` (an e2e test picture) into framebuffer `i` through the
/// engine and checks it through the mapping.
fn draw(drm: &Drm, s: &mut Scene, ops: &[picture::Op], i: usize, fb_va: u64) -> Result<(), String> {
    let targets = DrawTargets {
        fb_va,
        image_va: IMAGE_VA,
        scratch_va: SCRATCH_VA,
    };
    let commands = picture::commands(ops, targets);
    match run_batch(drm, &mut s.batch, &commands)? {
        WaitResult::Done => {}
        WaitResult::Fault { reason, addr } => {
            return Err(format!("fault {reason} at {addr:#x}"));
        }
    }
    let want = picture::render_ops(ops);
    let got = &s.fbs[i].bytes()[..picture::FB_BYTES];
    match got.iter().zip(&want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(at) => Err(format!(
            "byte {at} of the framebuffer is {:#04x}, want {:#04x}",
            got[at], want[at]
        )),
    }
}

/// Binds, fills through the engine, checks and unbinds a buffer `n` times at
/// addresses that each need a leaf table of their own.
fn churn(drm: &Drm, batch: &mut Buffer, n: u32) -> Result<(), String> {
    let buf = drm
        .dumb(1024, 4)
        .map_err(|e| format!("churn buffer: {e}"))?;
    for i in 0..n {
        let va = CHURN_VA + u64::from(i % 64) * (2 << 20);
        drm.bind(&buf, va, true)
            .map_err(|e| format!("bind {va:#x}: {e}"))?;
        let pattern = 0x0101_0101u32.wrapping_mul(i + 1);
        match run_batch(drm, batch, &cmd::fill(va, buf.size as u32, pattern))? {
            WaitResult::Done => {}
            WaitResult::Fault { reason, addr } => {
                return Err(format!("round {i}: fault {reason} at {addr:#x}"));
            }
        }
        let want = pattern.to_le_bytes();
        if let Some(at) = buf.bytes().chunks_exact(4).position(|w| w != want) {
            return Err(format!("round {i}: word {at} not {pattern:#x}"));
        }
        drm.unbind(va).map_err(|e| format!("unbind {va:#x}: {e}"))?;
    }
    Ok(())
}

fn picture_mode(drm: &Drm, o: &Opts, r: &mut Report) {
    let Some(info) = r.check("demo_context", drm.info()) else {
        return;
    };
    r.pass("demo_context", format!("context={}", info.context));
    let Some(mut s) = r.check("demo_buffers", scene(drm, if o.flip { 2 } else { 1 })) else {
        return;
    };
    if o.churn > 0 {
        match churn(drm, &mut s.batch, o.churn) {
            Ok(()) => r.pass("demo_churn", o.churn),
            Err(e) => return r.fail("demo_churn", e),
        }
    }
    match draw(drm, &mut s, o.scene, 0, FB_VA) {
        Ok(()) => r.pass(
            "demo_picture",
            format!("{}x{}", picture::WIDTH, picture::HEIGHT),
        ),
        Err(e) => return r.fail("demo_picture", e),
    }
    if o.flip {
        let (w, h) = (picture::WIDTH, picture::HEIGHT);
        let shown = (|| -> Result<(), String> {
            drm.set_master(Duration::from_secs(5))
                .map_err(|e| format!("DRM master: {e}"))?;
            let (crtc, connector) = drm.first_output().map_err(|e| format!("resources: {e}"))?;
            let fb = drm
                .add_fb(&s.fbs[0], w, h)
                .map_err(|e| format!("addfb: {e}"))?;
            drm.set_crtc(crtc, connector, fb, w as u16, h as u16)
                .map_err(|e| format!("setcrtc: {e}"))?;
            // The second frame drawn while the first is on screen, then flipped.
            draw(drm, &mut s, o.scene, 1, FB2_VA)?;
            let fb2 = drm
                .add_fb(&s.fbs[1], w, h)
                .map_err(|e| format!("addfb: {e}"))?;
            drm.page_flip(crtc, fb2, FENCE_TIMEOUT)
                .map_err(|e| format!("page flip: {e}"))
        })();
        match shown {
            Ok(()) => r.pass("demo_flip", format!("{w}x{h}")),
            Err(e) => return r.fail("demo_flip", e),
        }
    }
    if let Ok(i) = drm.info() {
        println!(
            "INFO demo: context {} tables {} bindings {} fences {}/{}",
            i.context, i.tables, i.bindings, i.completed, i.submitted
        );
    }
    if o.hold_secs > 0 {
        println!("INFO demo: holding the picture");
        std::thread::sleep(Duration::from_secs(o.hold_secs));
    }
    drop(s.image);
    drop(s.scratch);
}

fn fault_mode(drm: &Drm, r: &mut Report) {
    let Some(mut s) = r.check("demo_fault", scene(drm, 0)) else {
        return;
    };
    match run_batch(drm, &mut s.batch, &cmd::fill(UNBOUND_VA, 4096, 1)) {
        Ok(WaitResult::Fault { reason: 1, addr }) if addr == UNBOUND_VA => {
            r.pass("demo_fault", format!("reason=1 addr={addr:#x}"))
        }
        other => {
            return r.fail(
                "demo_fault",
                format!("{other:?}, want NOT_PRESENT at {UNBOUND_VA:#x}"),
            )
        }
    }
    match run_batch(drm, &mut s.batch, &cmd::fill(SCRATCH_VA, 4096, 0x7777_7777)) {
        Ok(WaitResult::Done) if s.scratch.bytes()[..4096].iter().all(|&b| b == 0x77) => {
            r.pass("demo_fault_recovered", "fill after the fault")
        }
        other => r.fail("demo_fault_recovered", format!("{other:?}")),
    }
}

/// Garbage in the file's own page tables (POKE_PTE, module parameter
/// hostile_test=1), at every level: random values, addresses past guest RAM
/// (it is below 256 MiB in the e2e guest; nothing here points into it, so the
/// guest's own memory is never the target), the VRAM bit in upper levels,
/// not-present entries. Each poke is followed by a FILL through the poked
/// address and, every other round, one through an untouched page of a fresh
/// binding (garbage in an upper level spoils everything under it, so the
/// buffer then moves out from under that entry). Every submission ends,
/// faulted or done; the clean ones are done.
fn hostile_mode(drm: &Drm, o: &Opts, r: &mut Report) {
    let Some(mut s) = r.check("demo_hostile", scene(drm, 0)) else {
        return;
    };
    let Some(buf) = r.check("demo_hostile", drm.dumb(1024, 512)) else {
        return;
    };
    let pages = buf.size as u64 / 4096;
    let mut x = o.seed.max(1);
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Under a root entry of its own: the batch buffer (under entry 0) stays
    // reachable whatever is poked here.
    let mut base = 1u64 << 39;
    if let Err(e) = drm.bind(&buf, base, true) {
        return r.fail("demo_hostile", format!("bind: {e}"));
    }
    let (mut faults, mut done, mut clean) = (0u32, 0u32, 0u32);
    let mut reasons = std::collections::BTreeMap::<u32, u32>::new();
    for round in 0..o.rounds {
        let level = 1 + (rand() % 4) as u32;
        let value = match rand() % 5 {
            0 => rand(),
            1 => (1 << 50) | 1,
            2 => (rand() & !0xfff & ((1 << 52) - 1)) | 0b111,
            3 => 0,
            // Past the guest's RAM, below 1 GiB.
            _ => ((256 + rand() % 768) << 20) | 1,
        };
        let va = base + (rand() % pages) * 4096;
        if let Err(e) = drm.poke_pte(va, level, value) {
            return r.fail(
                "demo_hostile",
                format!("POKE_PTE: {e} (load with hostile_test=1)"),
            );
        }
        match run_batch(drm, &mut s.batch, &cmd::fill(va, 4096, round)) {
            Ok(WaitResult::Done) => done += 1,
            Ok(WaitResult::Fault { reason, .. }) => {
                faults += 1;
                *reasons.entry(reason).or_default() += 1;
            }
            Err(e) => return r.fail("demo_hostile", format!("round {round}: {e}")),
        }
        if level > 1 {
            // The garbage stays in the entry poked (the kernel's own view of
            // its tables does not change): move past what that entry covers.
            let span = 1u64 << (12 + 9 * (level - 1));
            let _ = drm.unbind(base);
            base = (base / span + 1) * span;
            if let Err(e) = drm.bind(&buf, base, true) {
                return r.fail("demo_hostile", format!("bind {base:#x}: {e}"));
            }
        }
        if round % 2 == 1 {
            // A page nobody poked: it must work.
            let good = if level == 1 {
                base + ((va - base) / 4096 + 1) % pages * 4096
            } else {
                base
            };
            match run_batch(drm, &mut s.batch, &cmd::fill(good, 4096, !round)) {
                Ok(WaitResult::Done) => clean += 1,
                Ok(WaitResult::Fault { reason, addr }) => {
                    return r.fail(
                        "demo_hostile",
                        format!("round {round}: clean page {addr:#x} faulted ({reason})"),
                    );
                }
                Err(e) => return r.fail("demo_hostile", format!("round {round}: {e}")),
            }
        }
    }
    let reasons: Vec<String> = reasons.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    r.pass(
        "demo_hostile",
        format!(
            "faults={faults} done={done} clean={clean} reasons={} rounds={}",
            reasons.join(","),
            o.rounds
        ),
    );
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("umdev-vgpu-demo: {e}");
            return ExitCode::from(2);
        }
    };
    let mut r = Report::default();
    let drm = match Drm::open(&o.dev) {
        Ok(d) => d,
        Err(e) => {
            r.fail("demo_open", format!("{}: {e}", o.dev));
            return ExitCode::FAILURE;
        }
    };
    // The first opener is the DRM master; only the one that sets modes keeps it.
    if !o.flip {
        drm.drop_master();
    }
    match o.mode.as_str() {
        "picture" => picture_mode(&drm, &o, &mut r),
        "fault" => fault_mode(&drm, &mut r),
        "hostile" => hostile_mode(&drm, &o, &mut r),
        "info" => match drm.info() {
            Ok(i) => println!("INFO demo: {i:?}"),
            Err(e) => r.fail("demo_info", e),
        },
        other => {
            eprintln!("umdev-vgpu-demo: unknown mode {other:?}");
            return ExitCode::from(2);
        }
    }
    if r.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
