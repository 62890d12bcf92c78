//! umdev vGPU: a mediated GPU whose guest page tables are write-tracked and
//! shadowed, doing in a userspace backend what KVMGT does in the kernel.
//! `SPEC.md` beside this crate is the hardware specification.
//!
//! Three locks, never nested: `regs` (what MMIO reads and writes, held briefly),
//! `shadow` (shadow page tables, held by the engine while it audits and by the
//! page-track notifier while it applies guest writes) and the GGTT. A trapped MMIO
//! access touches only `regs` and the GGTT and never waits for engine work: the
//! doorbell and TLB invalidation post a job to the engine thread.

pub mod command;
pub mod inprocess;
mod metrics;
pub mod parent;
pub mod remote;
pub use umdev_vgpu_abi::{encode, pagetable, picture, regs};
pub mod scanout;
pub mod sched;
pub mod shadow;
mod state;
#[cfg(test)]
mod test_fixture;
pub mod vram;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Instant;

use tracing::{debug, info, warn};
use umdev::memory::GuestMemory;
use umdev::pagetrack::{Gfn, NotifierRegistration, PageTrackNotifier, Policy, SourceKind};
use umdev::pci::{
    BarDef, BarIndex, BarMapping, DeviceContext, MsixLayout, PciDevice, PciDeviceDescription,
    PciError, PciFunction, PciIds,
};

use command::{audit_segment, AuditContext, Cursor, Extent, Fault, Step};
use regs::*;
use sched::{EngineShare, Progress, Scheduler, Task};
use shadow::{ShadowPageTables, Target, TargetCheck, Translation};
use vram::Vram;

/// How to build a vGPU.
#[derive(Debug)]
pub struct VgpuConfig {
    pub ids: PciIds,
    pub vram_mib: u32,
    /// Where the picture goes after every FENCE and on SIGUSR1.
    pub scanout_png: Option<PathBuf>,
    pub page_track: SourceKind,
    pub policy: Policy,
    /// Hardware contexts the device has (1 to 4; CAPS says how many).
    pub contexts: usize,
    /// GGTT entries (a power of two, 1024 to 131072; GGTT_SIZE says how
    /// many): the display's aperture is this many 4 KiB pages.
    pub ggtt_entries: u32,
    /// The engine its submissions run on, shared with other vGPUs (a parent's
    /// scheduler); `None`: an engine of its own.
    pub engine: Option<EngineShare>,
}

impl Default for VgpuConfig {
    fn default() -> Self {
        VgpuConfig {
            ids: PciIds {
                vendor_id: VENDOR_ID,
                device_id: DEVICE_ID,
                subsystem_vendor_id: SUBSYSTEM_VENDOR_ID,
                subsystem_id: SUBSYSTEM_ID,
                revision: REVISION,
                class_code: CLASS_CODE,
                interrupt_pin: 1,
            },
            vram_mib: DEFAULT_VRAM_MIB,
            scanout_png: None,
            page_track: SourceKind::Scan,
            policy: Policy::default(),
            contexts: CONTEXTS,
            ggtt_entries: GGTT_ENTRIES as u32,
            engine: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    #[error(transparent)]
    Vram(#[from] vram::VramError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error("VRAM size must be a power of two from 1 to 4096 MiB")]
    VramSize,
    #[error("a vGPU has 1 to {CONTEXTS} contexts, not {0}")]
    Contexts(usize),
    #[error("GGTT entries must be a power of two from 1024 to {GGTT_ENTRIES}, not {0}")]
    GgttEntries(u32),
}

/// The PCI description of a vGPU with `config`.
pub fn description(config: &VgpuConfig) -> PciDeviceDescription {
    PciDeviceDescription {
        ids: config.ids,
        bars: [
            Some(BarDef::memory64(MMIO_BAR_SIZE, false)),
            None,
            Some(BarDef::memory64(u64::from(config.vram_mib) << 20, true)),
            None,
            None,
            None,
        ],
        msi_vectors: 0,
        msix: Some(MsixLayout {
            vectors: MSIX_VECTORS,
            bar: MMIO_BAR,
            table_offset: MSIX_TABLE_OFFSET,
            pba_offset: MSIX_PBA_OFFSET,
        }),
        pcie: true,
        power_management: true,
        page_track_source: config.page_track,
        page_track_policy: config.policy,
    }
}

/// A handle to a running vGPU beside its PCI function (for the binary's signals).
#[derive(Clone)]
pub struct VgpuHandle {
    shared: Weak<Shared>,
}

impl umdev::vnc::FrameSource for VgpuHandle {
    /// The scanout's visible pixels (for `--vnc`), read through the GGTT.
    fn capture(&self) -> Option<umdev::vnc::Frame> {
        let shared = self.shared.upgrade()?;
        let mut pixels = Vec::new();
        let sc = shared.capture_scanout(&mut pixels)?;
        Some(umdev::vnc::Frame {
            width: sc.width,
            height: sc.height,
            pixels,
        })
    }
}

impl VgpuHandle {
    /// Writes the current picture to the configured PNG path.
    pub fn dump_scanout(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.write_scanout();
        }
    }
}

/// Builds the PCI function carrying a vGPU.
pub fn new_function(
    memory: GuestMemory,
    config: VgpuConfig,
) -> Result<(PciFunction, VgpuHandle), VgpuError> {
    if !config.vram_mib.is_power_of_two() || config.vram_mib > 4096 {
        return Err(VgpuError::VramSize);
    }
    if !(1..=CONTEXTS).contains(&config.contexts) {
        return Err(VgpuError::Contexts(config.contexts));
    }
    let entries = config.ggtt_entries;
    if !entries.is_power_of_two() || !(1024..=GGTT_ENTRIES as u32).contains(&entries) {
        return Err(VgpuError::GgttEntries(entries));
    }
    let vram = Vram::new(u64::from(config.vram_mib) << 20)?;
    let mut handle = None;
    let description = description(&config);
    let engine = config
        .engine
        .unwrap_or_else(|| Scheduler::start().share("vgpu", 1));
    let layout = Layout {
        contexts: config.contexts,
        ggtt_entries: entries as usize,
    };
    let function = PciFunction::new(description, memory, |ctx| {
        let vgpu = Vgpu::new(ctx, vram, config.scanout_png.clone(), layout, engine);
        handle = Some(VgpuHandle {
            shared: Arc::downgrade(&vgpu.shared),
        });
        Box::new(vgpu)
    })?;
    let handle = handle.ok_or(VgpuError::VramSize)?;
    Ok((function, handle))
}

#[derive(Clone, Copy, Default)]
struct Context {
    pt_root: u64,
    ring_base: u64,
    ring_size: u32,
    head: u32,
    tail: u32,
    status: u32,
    fault_addr: u64,
    fence_seqno: u32,
    inv_start: u64,
    inv_pages: u32,
    control: u32,
    msix_vector: u32,
    /// Root table the shadow holds a reference on for this context, and the
    /// shadow epoch it was taken in.
    attached_root: Option<(Gfn, u64)>,
}

#[derive(Clone, Copy, Default)]
struct Scanout {
    fb_addr: u64,
    width: u32,
    height: u32,
    stride: u32,
    format: u32,
    enable: u32,
}

/// What a vGPU has of the hardware the spec allows (its type's slice).
#[derive(Clone, Copy, Debug)]
struct Layout {
    contexts: usize,
    ggtt_entries: usize,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            contexts: CONTEXTS,
            ggtt_entries: GGTT_ENTRIES as usize,
        }
    }
}

#[derive(Default)]
struct Registers {
    irq_status: u32,
    irq_enable: u32,
    global_error: u32,
    busy: u32,
    ctx: [Context; CONTEXTS],
    scanout: Scanout,
    /// Bumped by reset: work queued before it is dropped.
    generation: u64,
    /// VRAM size, for CAPS (kept across reset).
    vram_mib: u32,
    /// Contexts and GGTT size, for CAPS and GGTT_SIZE (kept across reset).
    layout: Layout,
}

struct Ggtt {
    raw: Vec<u64>,
    /// Validated translations, `None` where the entry maps nothing.
    shadow: Vec<Option<Translation>>,
    /// Low halves written and waiting for their high half (GVT-g's merge).
    pending_low: std::collections::HashMap<usize, u32>,
}

/// Engine work one vGPU posts to its [`EngineShare`].
enum Job {
    Submit(usize, u64),
    /// Context, its range (`None`: the whole context), generation.
    Invalidate(usize, Option<InvRange>, u64),
    /// Answered once every job before it has run (quiescing for a snapshot).
    Barrier(Sender<()>),
}

/// A [`Job`] as the engine runs it: a submission goes on across slices.
struct EngineTask {
    shared: Arc<Shared>,
    job: Job,
    run: Option<SubmissionRun>,
}

impl Task for EngineTask {
    fn run(&mut self, should_yield: &dyn Fn() -> bool) -> Progress {
        let shared = &*self.shared;
        match &self.job {
            Job::Submit(n, generation) => {
                let start = Instant::now();
                if self.run.is_none() {
                    self.run = SubmissionRun::begin(shared, *n, *generation);
                }
                let progress = match &mut self.run {
                    Some(run) => run.run(shared, should_yield),
                    None => Progress::Done,
                };
                shared.stats.busy(start.elapsed());
                progress
            }
            Job::Barrier(done) => {
                let _ = done.send(());
                Progress::Done
            }
            Job::Invalidate(n, range, generation) => {
                // A missing root only matters to a submission, which reports it.
                if lock(&shared.regs).generation == *generation {
                    match range {
                        None => {
                            let _ = sync_context(shared, *n);
                        }
                        Some(r) => sync_context_range(shared, *n, *r),
                    }
                }
                Progress::Done
            }
        }
    }

    /// A doorbell or whole invalidation already queued for the same context
    /// and generation covers this one.
    fn coalesce_key(&self) -> Option<u64> {
        match self.job {
            Job::Submit(n, g) => Some(g << 8 | n as u64),
            Job::Invalidate(n, None, g) => Some(g << 8 | 0x10 | n as u64),
            _ => None,
        }
    }

    /// Range invalidations past the queue limit: the next submission syncs.
    fn optional(&self) -> bool {
        matches!(self.job, Job::Invalidate(_, Some(_), _))
    }
}

struct Shared {
    regs: Mutex<Registers>,
    shadow: Mutex<ShadowPageTables>,
    ggtt: Mutex<Ggtt>,
    ctx: DeviceContext,
    vram: Vram,
    check: TargetCheck,
    scanout_png: Option<PathBuf>,
    /// The last captured picture's bytes, reused by the next (at most 64 MiB).
    scanout_buffer: Mutex<Vec<u8>>,
    /// `Registers::generation`, readable without the lock (engine writes
    /// check it under the region table's lock).
    live_generation: AtomicU64,
    stats: metrics::VgpuStats,
}

/// Why an engine access to a validated target failed (the context sees
/// DMA_ERROR either way).
#[derive(Debug, thiserror::Error)]
enum TargetError {
    #[error(transparent)]
    Memory(#[from] umdev::memory::MemoryError),
    #[error(transparent)]
    Vram(#[from] vram::VramError),
    #[error("the device was reset after the submission was taken")]
    Reset,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Guest page-table writes go to the shadow. The tracker holds the device's
/// shared state while `Vgpu::registration` lives.
impl PageTrackNotifier for Shared {
    fn track_write(&self, gpa: u64, new: &[u8]) {
        let applied = lock(&self.shadow).on_write_bytes(gpa, new);
        self.stats
            .shadow_updates
            .fetch_add(applied as u64, Ordering::Relaxed);
    }
    fn track_remove_region(&self, gfn: Gfn, nr_pages: u64) {
        lock(&self.shadow).on_remove_region(gfn, nr_pages);
    }
}

pub struct Vgpu {
    shared: Arc<Shared>,
    /// Dropped first: queued work goes, running work finishes.
    engine: Option<EngineShare>,
    /// The shadow's page-track notifier; dropped after the engine stops, it
    /// unregisters (waiting for a delivery under way) and the tracker lets go
    /// of `shared`.
    _registration: NotifierRegistration,
}

impl Vgpu {
    fn new(
        ctx: DeviceContext,
        vram: Vram,
        scanout_png: Option<PathBuf>,
        layout: Layout,
        engine: EngineShare,
    ) -> Self {
        let check = TargetCheck {
            memory: ctx.memory.clone(),
            vram_size: vram.size(),
        };
        let shared = Arc::new(Shared {
            regs: Mutex::new(Registers {
                vram_mib: (vram.size() >> 20) as u32,
                layout,
                ..Registers::default()
            }),
            shadow: Mutex::new(ShadowPageTables::new(
                ctx.page_tracker.clone(),
                check.clone(),
            )),
            ggtt: Mutex::new(Ggtt {
                raw: vec![0; layout.ggtt_entries],
                shadow: vec![None; layout.ggtt_entries],
                pending_low: Default::default(),
            }),
            ctx,
            vram,
            check,
            scanout_png,
            scanout_buffer: Mutex::new(Vec::new()),
            live_generation: AtomicU64::new(0),
            stats: metrics::VgpuStats::default(),
        });
        let registration = shared.ctx.page_tracker.register(shared.clone());
        Vgpu {
            shared,
            engine: Some(engine),
            _registration: registration,
        }
    }

    fn post(&self, job: Job) {
        if let Some(engine) = &self.engine {
            engine.post(Box::new(EngineTask {
                shared: self.shared.clone(),
                job,
                run: None,
            }));
        }
    }
}

impl Drop for Vgpu {
    fn drop(&mut self) {
        // The engine lets go of this vGPU before the page tracker does.
        self.engine = None;
    }
}

/// Reads or writes one half of a 64-bit register.
fn reg64_write(field: &mut u64, offset_in_reg: u64, data: &[u8]) {
    let mut bytes = field.to_le_bytes();
    let at = offset_in_reg as usize;
    bytes[at..at + data.len()].copy_from_slice(data);
    *field = u64::from_le_bytes(bytes);
}

fn value_of(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b[..data.len()].copy_from_slice(data);
    u64::from_le_bytes(b)
}

impl Shared {
    /// Raises context `n`'s interrupt (or the global error one for `None`).
    fn raise(&self, regs: &mut Registers, n: Option<usize>) {
        let (bit, vector) = match n {
            Some(n) => (1u32 << n, regs.ctx[n].msix_vector),
            None => (IRQ_GLOBAL_ERROR, 0),
        };
        regs.irq_status |= bit;
        if regs.irq_enable & bit == 0 {
            return;
        }
        if self.ctx.irq.msix_enabled() {
            self.ctx.irq.notify(vector);
        } else {
            self.ctx.irq.set_intx(true);
        }
    }

    fn update_intx(&self, regs: &Registers) {
        if !self.ctx.irq.msix_enabled() {
            self.ctx
                .irq
                .set_intx(regs.irq_status & regs.irq_enable != 0);
        }
    }

    fn global_error(&self, regs: &mut Registers, code: u32) {
        regs.global_error = code;
        self.raise(regs, None);
    }

    /// Writes past this vGPU's GGTT size are ignored.
    fn ggtt_write(&self, index: usize, half: Option<bool>, value: u64) {
        let mut ggtt = lock(&self.ggtt);
        if index >= ggtt.raw.len() {
            return;
        }
        let raw = match half {
            None => value,
            Some(false) => {
                // A low half waits for its high half.
                ggtt.pending_low.insert(index, value as u32);
                return;
            }
            Some(true) => {
                let low = ggtt
                    .pending_low
                    .remove(&index)
                    .unwrap_or(ggtt.raw[index] as u32);
                u64::from(low) | (value << 32)
            }
        };
        ggtt.pending_low.remove(&index);
        ggtt.raw[index] = raw;
        let valid = raw & PTE_PRESENT != 0;
        let translation = if valid {
            self.check.leaf(raw).ok()
        } else {
            None
        };
        ggtt.shadow[index] = translation;
        drop(ggtt);
        if valid && translation.is_none() {
            warn!(
                index,
                raw = format_args!("{raw:#x}"),
                "GGTT entry maps nothing valid"
            );
            let mut regs = lock(&self.regs);
            self.global_error(&mut regs, GLOBAL_ERROR_BAD_GGTT_ENTRY);
        }
    }

    /// Entries past this vGPU's GGTT size read as 0.
    fn ggtt_read(&self, index: usize) -> u64 {
        lock(&self.ggtt).raw.get(index).copied().unwrap_or(0)
    }

    fn read_target(&self, target: Target, buf: &mut [u8]) -> Result<(), TargetError> {
        match target {
            Target::Ram(gpa) => Ok(self.ctx.memory.read(gpa, buf)?),
            Target::Vram(off) => Ok(self.vram.read(off, buf)?),
        }
    }

    /// Copies `len` bytes target to target without a buffer, when both are
    /// host-mapped (VRAM always, guest RAM when fd-mapped in one region);
    /// `false` when one is not, and nothing was done. Overlap is allowed
    /// (memmove), as through the buffer.
    fn copy_direct(
        &self,
        from: Target,
        to: Target,
        len: usize,
        generation: u64,
    ) -> Result<bool, TargetError> {
        use umdev::memory::DmaDirection::{FromGuest, ToGuest};
        let live = || self.live_generation.load(Ordering::Acquire) == generation;
        let memory = &self.ctx.memory;
        Ok(match (from, to) {
            (Target::Ram(s), Target::Ram(d)) => memory.copy_mapped(s, d, len, &live)?,
            (Target::Ram(s), Target::Vram(d)) => {
                let d = self.vram.slice(d, len)?;
                memory
                    .with_mapped(s, len, FromGuest, &live, |s| s.copy_to_volatile_slice(d))?
                    .is_some()
            }
            (Target::Vram(s), Target::Ram(d)) => {
                let s = self.vram.slice(s, len)?;
                memory
                    .with_mapped(d, len, ToGuest, &live, |d| s.copy_to_volatile_slice(d))?
                    .is_some()
            }
            (Target::Vram(s), Target::Vram(d)) => {
                if !live() {
                    return Err(TargetError::Reset);
                }
                self.vram
                    .slice(s, len)?
                    .copy_to_volatile_slice(self.vram.slice(d, len)?);
                true
            }
        })
    }

    /// A write of the engine for a submission of register generation
    /// `generation`: none lands once the device has been reset (the VMM
    /// leaving included) after the submission was taken.
    fn write_target(
        &self,
        target: Target,
        data: &[u8],
        generation: u64,
    ) -> Result<(), TargetError> {
        let live = || self.live_generation.load(Ordering::Acquire) == generation;
        match target {
            Target::Ram(gpa) => Ok(self.ctx.memory.write_while(gpa, data, live)?),
            Target::Vram(off) if live() => Ok(self.vram.write(off, data)?),
            Target::Vram(_) => Err(TargetError::Reset),
        }
    }

    /// The framebuffer's visible pixels as XRGB8888 bytes (4 x width per
    /// line, the stride's gap left out), read through the GGTT into `fb`,
    /// which is reused from frame to frame. `None` if the scanout is off or
    /// its geometry is invalid (`scanout::check_geometry`).
    fn capture_scanout(&self, fb: &mut Vec<u8>) -> Option<Scanout> {
        let sc = lock(&self.regs).scanout;
        if sc.enable == 0 || sc.format != FB_FORMAT_XRGB8888 {
            return None;
        }
        let aperture = lock(&self.ggtt).raw.len() as u64 * PAGE_SIZE;
        let len =
            scanout::check_geometry(aperture, sc.fb_addr, sc.width, sc.height, sc.stride).ok()?;
        fb.clear();
        fb.resize(len, 0);
        let line = 4 * sc.width as usize;
        let ggtt = lock(&self.ggtt);
        for (y, dst_line) in fb.chunks_exact_mut(line).enumerate() {
            let mut off = 0usize;
            while off < line {
                let addr = sc.fb_addr + (y * sc.stride as usize + off) as u64;
                let piece = ((PAGE_SIZE - addr % PAGE_SIZE) as usize).min(line - off);
                let dst = &mut dst_line[off..off + piece];
                let t = ggtt
                    .shadow
                    .get((addr / PAGE_SIZE) as usize)
                    .copied()
                    .flatten();
                let ok = t.is_some_and(|t| match t.target.offset(addr % PAGE_SIZE) {
                    Target::Ram(gpa) => self.ctx.memory.peek(gpa, dst).is_ok(),
                    Target::Vram(o) => self.vram.read(o, dst).is_ok(),
                });
                if !ok {
                    dst.fill(0);
                }
                off += piece;
            }
        }
        Some(sc)
    }

    fn write_scanout(&self) {
        let Some(path) = &self.scanout_png else {
            return;
        };
        let mut fb = lock(&self.scanout_buffer);
        match self.capture_scanout(&mut fb) {
            Some(sc) => {
                let line = 4 * sc.width as usize;
                if let Err(e) = scanout::write_png(path, sc.width, sc.height, line, &fb) {
                    warn!("scanout PNG: {e}");
                } else {
                    self.stats.scanout_pictures.fetch_add(1, Ordering::Relaxed);
                    debug!(path = %path.display(), "scanout written");
                }
            }
            None => {
                let mut regs = lock(&self.regs);
                if regs.scanout.enable != 0 {
                    self.global_error(&mut regs, GLOBAL_ERROR_BAD_SCANOUT);
                }
            }
        }
    }

    fn reset(&self) {
        let mut regs = lock(&self.regs);
        let generation = regs.generation + 1;
        let vram_mib = regs.vram_mib;
        *regs = Registers {
            generation,
            vram_mib,
            ..Registers::default()
        };
        self.live_generation.store(generation, Ordering::Release);
        drop(regs);
        let mut ggtt = lock(&self.ggtt);
        ggtt.raw.iter_mut().for_each(|e| *e = 0);
        ggtt.shadow.iter_mut().for_each(|e| *e = None);
        ggtt.pending_low.clear();
        drop(ggtt);
        lock(&self.shadow).reset();
        self.vram.clear();
    }
}

impl Vgpu {
    /// Waits until the engine has run every job posted before this call.
    fn finish_engine_work(&self) {
        let (tx, rx) = channel();
        self.post(Job::Barrier(tx));
        // No engine (it could not start), or it is gone: nothing runs.
        let _ = rx.recv();
    }
}

impl PciDevice for Vgpu {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        if bar != MMIO_BAR {
            data.fill(0);
            return;
        }
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            data.fill(0xff);
            return;
        }
        let value: u64 = if offset >= GGTT_OFFSET {
            let rel = offset - GGTT_OFFSET;
            let entry = self.shared.ggtt_read((rel / 8) as usize);
            entry >> (8 * (rel % 8))
        } else {
            let regs = lock(&self.shared.regs);
            read_register(&regs, offset)
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) {
        if bar != MMIO_BAR
            || !(data.len() == 4 || data.len() == 8)
            || !offset.is_multiple_of(data.len() as u64)
        {
            debug!(
                bar,
                offset,
                len = data.len(),
                "vgpu: unsupported access ignored"
            );
            return;
        }
        let value = value_of(data);
        if offset >= GGTT_OFFSET {
            let rel = offset - GGTT_OFFSET;
            let index = (rel / 8) as usize;
            let half = (data.len() == 4).then_some(rel % 8 == 4);
            self.shared.ggtt_write(index, half, value);
            return;
        }
        if offset == REG_RESET {
            if value & 1 != 0 {
                info!("vgpu: reset by register");
                self.shared.reset();
            }
            return;
        }
        let mut regs = lock(&self.shared.regs);
        let generation = regs.generation;
        let job = write_register(&self.shared, &mut regs, offset, data, value);
        drop(regs);
        match job {
            Some(JobKind::Submit(n)) => self.post(Job::Submit(n, generation)),
            Some(JobKind::Invalidate(n, range)) => self.post(Job::Invalidate(n, range, generation)),
            None => {}
        }
    }

    fn reset(&mut self) {
        self.shared.reset();
    }

    /// Lets the engine finish what it was given, then saves (`state`).
    fn save(&self) -> Result<Vec<u8>, umdev::state::StateError> {
        self.finish_engine_work();
        Ok(state::save(&self.shared))
    }

    fn migratable(&self) -> bool {
        true
    }

    fn metrics(&self) -> Option<Arc<dyn umdev::metrics::MetricsSource>> {
        Some(Arc::new(metrics::VgpuMetrics(Arc::downgrade(&self.shared))))
    }

    /// The engine finishes the submissions it was given (their fences and
    /// interrupts land now); no new ones come while the device is stopped.
    fn quiesce(&mut self) {
        self.finish_engine_work();
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), umdev::state::StateError> {
        let pending = state::restore(&self.shared, blob)?;
        let generation = lock(&self.shared.regs).generation;
        for n in pending {
            self.post(Job::Submit(n, generation));
        }
        Ok(())
    }

    fn bar_mapping(&self, bar: BarIndex) -> Option<BarMapping> {
        (bar == VRAM_BAR).then(|| BarMapping {
            file: self.shared.vram.file(),
            file_offset: 0,
            areas: vec![(0, self.shared.vram.size())],
        })
    }
}

enum JobKind {
    Submit(usize),
    Invalidate(usize, Option<InvRange>),
}

/// A range TLB invalidation: INV_START and INV_PAGES as written.
#[derive(Clone, Copy, Debug)]
struct InvRange {
    start: u64,
    pages: u32,
}

fn read_register(regs: &Registers, offset: u64) -> u64 {
    match offset {
        REG_ID => u64::from(ID_VALUE),
        REG_CAPS => {
            (regs.layout.contexts as u64)
                | (u64::from(regs.layout.ggtt_entries.trailing_zeros()) << 8)
                | (u64::from(regs.vram_mib) << 16)
        }
        REG_STATUS => u64::from(regs.busy),
        REG_IRQ_STATUS => u64::from(regs.irq_status),
        REG_IRQ_ENABLE => u64::from(regs.irq_enable),
        REG_GLOBAL_ERROR => u64::from(regs.global_error),
        REG_GGTT_SIZE => regs.layout.ggtt_entries as u64,
        o if (CTX_BASE..CTX_BASE + regs.layout.contexts as u64 * CTX_STRIDE).contains(&o) => {
            let c = &regs.ctx[((o - CTX_BASE) / CTX_STRIDE) as usize];
            let r = (o - CTX_BASE) % CTX_STRIDE;
            let (base, v) = match r & !7 {
                CTX_PT_ROOT => (CTX_PT_ROOT, c.pt_root),
                CTX_RING_BASE => (CTX_RING_BASE, c.ring_base),
                CTX_FAULT_ADDR => (CTX_FAULT_ADDR, c.fault_addr),
                CTX_INV_START => (CTX_INV_START, c.inv_start),
                _ => {
                    return u64::from(match r {
                        CTX_RING_SIZE => c.ring_size,
                        CTX_RING_HEAD => c.head,
                        CTX_RING_TAIL => c.tail,
                        CTX_STATUS => c.status,
                        CTX_FENCE_SEQNO => c.fence_seqno,
                        CTX_INV_PAGES => c.inv_pages,
                        CTX_CONTROL => c.control,
                        CTX_MSIX_VECTOR => c.msix_vector,
                        _ => 0,
                    })
                }
            };
            v >> (8 * (r - base))
        }
        o if (SCANOUT_BASE..SCANOUT_BASE + 0x100).contains(&o) => {
            let s = &regs.scanout;
            match o - SCANOUT_BASE {
                SCANOUT_FB_ADDR => s.fb_addr,
                0x04 => s.fb_addr >> 32,
                SCANOUT_FB_WIDTH => u64::from(s.width),
                SCANOUT_FB_HEIGHT => u64::from(s.height),
                SCANOUT_FB_STRIDE => u64::from(s.stride),
                SCANOUT_FB_FORMAT => u64::from(s.format),
                SCANOUT_FB_ENABLE => u64::from(s.enable),
                _ => 0,
            }
        }
        _ => 0,
    }
}

fn write_register(
    shared: &Shared,
    regs: &mut Registers,
    offset: u64,
    data: &[u8],
    value: u64,
) -> Option<JobKind> {
    let v32 = value as u32;
    match offset {
        REG_IRQ_STATUS => {
            regs.irq_status &= !v32;
            if v32 & IRQ_GLOBAL_ERROR != 0 {
                regs.global_error = 0;
            }
            shared.update_intx(regs);
        }
        REG_IRQ_ENABLE => {
            regs.irq_enable = v32 & (IRQ_GLOBAL_ERROR | ((1 << regs.layout.contexts) - 1));
            shared.update_intx(regs);
        }
        o if (CTX_BASE..CTX_BASE + regs.layout.contexts as u64 * CTX_STRIDE).contains(&o) => {
            let n = ((o - CTX_BASE) / CTX_STRIDE) as usize;
            let r = (o - CTX_BASE) % CTX_STRIDE;
            let c = &mut regs.ctx[n];
            match r & !7 {
                CTX_PT_ROOT => reg64_write(&mut c.pt_root, r - CTX_PT_ROOT, data),
                CTX_RING_BASE => reg64_write(&mut c.ring_base, r - CTX_RING_BASE, data),
                CTX_INV_START => reg64_write(&mut c.inv_start, r - CTX_INV_START, data),
                _ => match r {
                    CTX_RING_SIZE => c.ring_size = v32,
                    CTX_RING_TAIL => {
                        c.tail = v32;
                        if c.control & CTX_CONTROL_ENABLE != 0 && c.status & CTX_STATUS_FAULTED == 0
                        {
                            return Some(JobKind::Submit(n));
                        }
                    }
                    CTX_TLB_INVALIDATE if v32 == TLB_INVALIDATE_ALL => {
                        return Some(JobKind::Invalidate(n, None));
                    }
                    CTX_TLB_INVALIDATE if v32 == TLB_INVALIDATE_RANGE => {
                        let range = InvRange {
                            start: c.inv_start,
                            pages: c.inv_pages,
                        };
                        return Some(JobKind::Invalidate(n, Some(range)));
                    }
                    CTX_INV_PAGES => c.inv_pages = v32,
                    CTX_CONTROL => {
                        c.control = v32 & CTX_CONTROL_ENABLE;
                        if c.control != 0 {
                            c.status |= CTX_STATUS_ENABLED;
                        } else {
                            c.status &= !CTX_STATUS_ENABLED;
                        }
                        if v32 & CTX_CONTROL_CLEAR_FAULT != 0 {
                            c.status &= !(CTX_STATUS_FAULTED | 0xff00);
                            c.fault_addr = 0;
                            c.head = c.tail;
                        }
                    }
                    CTX_MSIX_VECTOR => c.msix_vector = v32 % u32::from(MSIX_VECTORS),
                    _ => {}
                },
            }
        }
        o if (SCANOUT_BASE..SCANOUT_BASE + 0x100).contains(&o) => {
            let s = &mut regs.scanout;
            match o - SCANOUT_BASE {
                SCANOUT_FB_ADDR => reg64_write(&mut s.fb_addr, 0, data),
                0x04 => reg64_write(&mut s.fb_addr, 4, data),
                SCANOUT_FB_WIDTH => s.width = v32,
                SCANOUT_FB_HEIGHT => s.height = v32,
                SCANOUT_FB_STRIDE => s.stride = v32,
                SCANOUT_FB_FORMAT => s.format = v32,
                SCANOUT_FB_ENABLE => {
                    s.enable = v32 & 1;
                    let valid = s.format == FB_FORMAT_XRGB8888
                        && scanout::check_geometry(
                            regs.layout.ggtt_entries as u64 * PAGE_SIZE,
                            s.fb_addr,
                            s.width,
                            s.height,
                            s.stride,
                        )
                        .is_ok();
                    if s.enable != 0 && !valid {
                        shared.global_error(regs, GLOBAL_ERROR_BAD_SCANOUT);
                    }
                }
                _ => {}
            }
        }
        _ => {}
    }
    None
}

// ---- the engine --------------------------------------------------------------

/// A sync point: the guest's page tables as they are now, and the context's root.
fn sync_context(shared: &Shared, n: usize) -> Result<Gfn, u8> {
    shared.ctx.page_tracker.sync();
    context_root(shared, n)
}

/// A range TLB invalidation (SPEC.md): only the tables that translate
/// `[INV_START, INV_START + INV_PAGES pages)` are brought up to date, level by
/// level from the root (a table a synced entry now links is found at the next
/// level); an edit elsewhere waits for a whole invalidation or a submission.
fn sync_context_range(shared: &Shared, n: usize, range: InvRange) {
    let Ok(root) = context_root(shared, n) else {
        return;
    };
    let start = range.start & !(PAGE_SIZE - 1);
    let end = start
        .saturating_add(u64::from(range.pages).saturating_mul(PAGE_SIZE))
        .min(VA_LIMIT);
    if start >= end {
        return;
    }
    for level in (1..=PT_LEVELS).rev() {
        let gfns = lock(&shared.shadow).tables_covering(root, level, start, end);
        if gfns.is_empty() {
            break;
        }
        shared.ctx.page_tracker.sync_gfns(&gfns);
    }
}

/// The context's root table, attached afresh if PT_ROOT changed or the
/// shadow was dropped since.
fn context_root(shared: &Shared, n: usize) -> Result<Gfn, u8> {
    let (root_gpa, attached) = {
        let regs = lock(&shared.regs);
        (regs.ctx[n].pt_root, regs.ctx[n].attached_root)
    };
    let wanted = root_gpa / PAGE_SIZE;
    let mut shadow = lock(&shared.shadow);
    shadow.regions_changed(shared.ctx.memory.regions_generation());
    let epoch = shadow.epoch();
    // A reference from an older epoch died with the tables it pointed at.
    let live = attached.filter(|&(_, e)| e == epoch).map(|(g, _)| g);
    if live == Some(wanted) && root_gpa != 0 {
        return Ok(wanted);
    }
    let new = shadow.attach_root(root_gpa);
    if let Some(old) = live {
        shadow.detach_root(old);
    }
    let epoch = shadow.epoch();
    drop(shadow);
    let mut regs = lock(&shared.regs);
    regs.ctx[n].attached_root = new.ok().map(|g| (g, epoch));
    new
}

fn fault(shared: &Shared, n: usize, generation: u64, f: Fault) {
    let mut regs = lock(&shared.regs);
    if regs.generation != generation {
        return;
    }
    let c = &mut regs.ctx[n];
    c.status =
        (c.status & !(0xff00 | CTX_STATUS_BUSY)) | CTX_STATUS_FAULTED | u32::from(f.reason) << 8;
    c.fault_addr = f.addr;
    regs.busy &= !(1 << n);
    shared.stats.fault(f.reason);
    info!(
        context = n,
        reason = f.reason,
        addr = format_args!("{:#x}", f.addr),
        "vgpu: context fault"
    );
    shared.raise(&mut regs, Some(n));
}

/// The most bytes the engine moves between two points where another vGPU
/// may take it: a FILL or COPY goes on in pieces of this size (about 5 us
/// of copying).
const STEP_BYTES: u64 = 64 << 10;

/// One context's submission on the engine: HEAD to the TAIL rung, segment by
/// segment (each audited whole, then run step by step), stoppable between
/// steps (commands) when its slice is over.
struct SubmissionRun {
    n: usize,
    generation: u64,
    ring_base: u64,
    ring_size: u32,
    tail: u32,
    rings: Vec<(u64, u64)>,
    cursor: Cursor,
    /// The audited segment being run, the next step of it and the bytes of
    /// that step already done.
    plan: Vec<Step>,
    next: usize,
    step_done: u64,
    /// More segments after this plan (a TLB_INVALIDATE split the submission).
    more: bool,
    buf: StepBuffers,
}

/// What the steps of a submission reuse from one piece to the next.
#[derive(Default)]
struct StepBuffers {
    /// The bounce buffer for COPY/BLIT lines that cannot copy directly.
    bounce: Vec<u8>,
    /// A FILL pattern repeated over [`STEP_BYTES`], and the pattern it holds:
    /// built once per pattern, not per 64 KiB piece.
    fill: Vec<u8>,
    fill_pattern: Option<u32>,
}

impl SubmissionRun {
    /// Takes context `n`'s work (HEAD..TAIL) if it has any and may run;
    /// `None` when it has none or faulted at once (ring or bus mastering).
    fn begin(shared: &Shared, n: usize, generation: u64) -> Option<SubmissionRun> {
        let (ring_base, ring_size, head, tail, rings) = {
            let mut regs = lock(&shared.regs);
            if regs.generation != generation {
                return None;
            }
            let c = regs.ctx[n];
            if c.control & CTX_CONTROL_ENABLE == 0
                || c.status & CTX_STATUS_FAULTED != 0
                || c.head == c.tail
            {
                return None;
            }
            regs.ctx[n].status |= CTX_STATUS_BUSY;
            regs.busy |= 1 << n;
            shared.stats.submissions.fetch_add(1, Ordering::Relaxed);
            let rings: Vec<(u64, u64)> = regs
                .ctx
                .iter()
                .filter(|c| c.control & CTX_CONTROL_ENABLE != 0 && c.ring_size != 0)
                .map(|c| (c.ring_base, u64::from(c.ring_size)))
                .collect();
            (c.ring_base, c.ring_size, c.head, c.tail, rings)
        };
        let bad_ring = !ring_size.is_power_of_two()
            || !(RING_SIZE_MIN..=RING_SIZE_MAX).contains(&ring_size)
            || !ring_base.is_multiple_of(PAGE_SIZE)
            || tail >= ring_size
            || !tail.is_multiple_of(4)
            || !shared
                .ctx
                .memory
                .is_host_mapped(ring_base, u64::from(ring_size));
        let early = if bad_ring {
            Some(FAULT_BAD_RING)
        } else if !shared.ctx.memory.bus_master() {
            Some(FAULT_DMA_ERROR)
        } else {
            None
        };
        if let Some(reason) = early {
            let f = Fault {
                reason,
                addr: ring_base,
            };
            fault(shared, n, generation, f);
            return None;
        }
        Some(SubmissionRun {
            n,
            generation,
            ring_base,
            ring_size,
            tail,
            rings,
            cursor: Cursor::new(head, tail),
            plan: Vec::new(),
            next: 0,
            step_done: 0,
            more: true,
            buf: StepBuffers::default(),
        })
    }

    /// Audits the next segment at a sync point.
    fn audit_next(&mut self, shared: &Shared) -> Result<(), Fault> {
        let root = sync_context(shared, self.n).map_err(|reason| Fault {
            reason,
            addr: lock(&shared.regs).ctx[self.n].pt_root,
        })?;
        let shadow = lock(&shared.shadow);
        let actx = AuditContext {
            shadow: &shadow,
            root,
            memory: &shared.ctx.memory,
            vram: &shared.vram,
            ring_base: self.ring_base,
            ring_size: self.ring_size,
            rings: &self.rings,
        };
        let (plan, more) = audit_segment(&actx, &mut self.cursor)?;
        drop(shadow);
        shared
            .stats
            .segments_audited
            .fetch_add(1, Ordering::Relaxed);
        self.plan = plan;
        self.next = 0;
        self.step_done = 0;
        self.more = more;
        Ok(())
    }

    /// Runs until the submission (and any rung while it ran) is done, a fault,
    /// or `should_yield()` at a step boundary.
    fn run(&mut self, shared: &Shared, should_yield: &dyn Fn() -> bool) -> Progress {
        loop {
            if self.next == self.plan.len() && self.more {
                if let Err(f) = self.audit_next(shared) {
                    fault(shared, self.n, self.generation, f);
                    return Progress::Done;
                }
            }
            while self.next < self.plan.len() {
                if (self.next > 0 || self.step_done > 0) && should_yield() {
                    return Progress::Preempted;
                }
                let step = &self.plan[self.next];
                match execute_step(
                    shared,
                    self.n,
                    self.generation,
                    step,
                    &mut self.step_done,
                    &mut self.buf,
                ) {
                    Ok(true) => {
                        self.next += 1;
                        self.step_done = 0;
                    }
                    Ok(false) => {}
                    Err(f) => {
                        fault(shared, self.n, self.generation, f);
                        return Progress::Done;
                    }
                }
            }
            if self.more {
                continue;
            }
            let mut regs = lock(&shared.regs);
            if regs.generation != self.generation {
                return Progress::Done;
            }
            let n = self.n;
            regs.ctx[n].head = self.tail;
            regs.ctx[n].status &= !CTX_STATUS_BUSY;
            regs.busy &= !(1 << n);
            // More work may have been rung while this ran.
            let again = regs.ctx[n].tail != self.tail;
            drop(regs);
            if !again {
                return Progress::Done;
            }
            match SubmissionRun::begin(shared, n, self.generation) {
                Some(next) => *self = next,
                None => return Progress::Done,
            }
            if should_yield() {
                return Progress::Preempted;
            }
        }
    }
}

/// Runs (more of) one audited step: a FILL or COPY goes on from `*done`
/// bytes for at most [`STEP_BYTES`] (a point where another vGPU may take the
/// engine); `true` once the step is finished. Guest memory may still go away
/// under it (DMA_UNMAP): such an access fails cleanly and faults the
/// context.
fn execute_step(
    shared: &Shared,
    n: usize,
    generation: u64,
    step: &Step,
    done: &mut u64,
    buf: &mut StepBuffers,
) -> Result<bool, Fault> {
    let dma = |va: u64| Fault {
        reason: FAULT_DMA_ERROR,
        addr: va,
    };
    match step {
        Step::Store { dst, value, va } => {
            shared
                .write_target(*dst, &value.to_le_bytes(), generation)
                .map_err(|_| dma(*va))?;
        }
        Step::Fill { dst, pattern, va } => {
            let total: u64 = dst.iter().map(|e| e.len).sum();
            let this = (total - *done).min(STEP_BYTES);
            // The pattern over a whole piece; pieces start 4-byte aligned.
            if buf.fill_pattern != Some(*pattern) {
                buf.fill = pattern.to_le_bytes().repeat(STEP_BYTES as usize / 4);
                buf.fill_pattern = Some(*pattern);
            }
            let chunk = &buf.fill;
            let mut at = ExtentCursor::new(dst);
            at.advance(*done);
            let mut moved = 0u64;
            while let Some(target) = at.target() {
                if moved == this {
                    break;
                }
                let n = (at.left() as u64).min(this - moved) as usize;
                shared
                    .write_target(target, &chunk[..n], generation)
                    .map_err(|_| dma(*va))?;
                at.advance(n as u64);
                moved += n as u64;
            }
            *done += moved;
            return Ok(*done >= total);
        }
        Step::Copy { src, dst, va } => {
            let finished = copy_extents(shared, generation, src, dst, done, &mut buf.bounce)
                .map_err(|_| dma(*va))?;
            return Ok(finished);
        }
        Step::Fence {
            dst,
            seqno,
            irq,
            va,
        } => {
            // The picture first: once the guest sees the fence, the PNG of
            // everything before it is in place.
            shared.write_scanout();
            shared
                .write_target(*dst, &seqno.to_le_bytes(), generation)
                .map_err(|_| dma(*va))?;
            let mut regs = lock(&shared.regs);
            if regs.generation != generation {
                return Ok(true);
            }
            regs.ctx[n].fence_seqno = *seqno;
            shared.stats.fences.fetch_add(1, Ordering::Relaxed);
            if *irq {
                shared.raise(&mut regs, Some(n));
            }
        }
    }
    Ok(true)
}

/// Copies the bytes of `src` extents to `dst` extents (same total) in pieces,
/// through `buf` (grown to one piece on first use).
fn copy_extents(
    shared: &Shared,
    generation: u64,
    src: &[Extent],
    dst: &[Extent],
    done: &mut u64,
    buf: &mut Vec<u8>,
) -> Result<bool, TargetError> {
    const PIECE: u64 = 64 << 10;
    let (mut s, mut d) = (ExtentCursor::new(src), ExtentCursor::new(dst));
    s.advance(*done);
    d.advance(*done);
    let mut moved = 0u64;
    while let (Some(from), Some(to)) = (s.target(), d.target()) {
        if moved >= STEP_BYTES {
            break;
        }
        // Mapping to mapping when both sides allow it, over runs of
        // contiguous extents, in pieces of at most 1 MiB (a DMA_UNMAP waits
        // for the piece under way); through the buffer otherwise (memory
        // reached by message, a range across DMA regions).
        let piece = STEP_BYTES - moved;
        let n = s.run(piece).min(d.run(piece)) as usize;
        let n = if shared.copy_direct(from, to, n, generation)? {
            n
        } else {
            let n = n.min(s.left()).min(d.left()).min(PIECE as usize);
            if buf.len() < n {
                buf.resize(PIECE as usize, 0);
            }
            shared.read_target(from, &mut buf[..n])?;
            shared.write_target(to, &buf[..n], generation)?;
            n
        };
        s.advance(n as u64);
        d.advance(n as u64);
        moved += n as u64;
    }
    *done += moved;
    Ok(s.target().is_none() || d.target().is_none())
}

/// A position in a list of extents.
struct ExtentCursor<'a> {
    extents: &'a [Extent],
    i: usize,
    off: u64,
}

impl<'a> ExtentCursor<'a> {
    fn new(extents: &'a [Extent]) -> Self {
        ExtentCursor {
            extents,
            i: 0,
            off: 0,
        }
    }

    fn target(&self) -> Option<Target> {
        self.extents.get(self.i).map(|e| e.target.offset(self.off))
    }

    /// Bytes left in the current extent.
    fn left(&self) -> usize {
        self.extents
            .get(self.i)
            .map_or(0, |e| (e.len - self.off) as usize)
    }

    /// Bytes from here on that are contiguous in their target (the next
    /// extents continuing where the current ends), at most `limit`.
    fn run(&self, limit: u64) -> u64 {
        let Some(first) = self.extents.get(self.i) else {
            return 0;
        };
        let mut len = first.len - self.off;
        let mut end = first.target.offset(first.len);
        for e in &self.extents[self.i + 1..] {
            if len >= limit || e.target != end {
                break;
            }
            len += e.len;
            end = e.target.offset(e.len);
        }
        len.min(limit)
    }

    fn advance(&mut self, mut n: u64) {
        while let Some(e) = self.extents.get(self.i) {
            let here = e.len - self.off;
            if n < here {
                self.off += n;
                return;
            }
            n -= here;
            self.i += 1;
            self.off = 0;
        }
    }
}
