//! Driver for the umdev vGPU (`umdev-vgpu`, device-models/vgpu/SPEC.md), run
//! when the device found is `1234:5547` (`UMDEV_DEV=1234:5547`).
//!
//! Like a real driver, from userspace: memory decoding and bus mastering on,
//! BAR0 (registers, GGTT) and BAR2 (VRAM) mapped through sysfs, 4-level page
//! tables built in mlock'd pages of guest RAM (physical addresses from
//! `/proc/self/pagemap`), a command ring in another such page, completion by
//! polling FENCE_SEQNO (no interrupt handler: IRQ_ENABLE stays 0).
//!
//! Tests, in order (the picture last, so its FENCE writes the scanout PNG the
//! harness compares with `picture::render()`):
//!   `vgpu_*` set-up checks; `vgpu_store_fence`; `vgpu_pte_remap` (a leaf
//!   rewritten in guest memory, then a range TLB_INVALIDATE, then a plain
//!   doorbell: each time the copy follows the new page); `vgpu_bad_target`
//!   (a leaf pointing outside guest RAM: BAD_TARGET fault, registers, interrupt
//!   status) and `vgpu_after_fault` (the context works again); `vgpu_scanout`
//!   (GGTT and scanout registers); `vgpu_picture` (the scene drawn with FILL,
//!   BLIT and COPY from a batch buffer, read back through BAR2).

use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use super::{
    compare, dma_pages, fnv1a, info, wait_until, Bar, DmaPage, PciConfig, Report, Volatile, ID_REG,
    PAGE,
};

// SPEC.md's register map, formats, command encoders and the test picture
// (what to draw and what it must look like, checked on the host against the
// scanout PNG): the device's own, from its ABI crate.
use umdev_vgpu_abi::encode as cmd;
use umdev_vgpu_abi::{picture, regs};

use regs::*;

/// PCI vendor:device of the vGPU.
pub const IDS: (u16, u16) = (VENDOR_ID, DEVICE_ID);

/// The context used.
const CTX: usize = 0;
const TIMEOUT: Duration = Duration::from_secs(20);

// GPU virtual addresses (the page tables map them).
const FB_VA: u64 = 0x1_0000_0000;
const IMAGE_VA: u64 = 0x1_0040_0000;
const SCRATCH_VA: u64 = 0x1_0080_0000;
const BATCH_VA: u64 = 0x2_0000_0000;
const REMAP_VA: u64 = 0x3_0000_0000;
const DST_VA: u64 = 0x3_0000_1000;
const HOSTILE_VA: u64 = 0x3_0000_2000;
const FENCE_VA: u64 = 0x7f00_0000_0000;
/// Far above the guest's RAM (and below 2^52): no memory there.
const OUTSIDE_RAM: u64 = 0x80_0000_0000;

// ------------------------------------------------------------ page access --

// --------------------------------------------------------------- commands --

/// The commands that draw `ops` (framebuffer at [`FB_VA`], staged image at
/// [`IMAGE_VA`], one scratch line at [`SCRATCH_VA`]).
fn draw_commands(ops: &[picture::Op]) -> Vec<u32> {
    picture::commands(
        ops,
        picture::DrawTargets {
            fb_va: FB_VA,
            image_va: IMAGE_VA,
            scratch_va: SCRATCH_VA,
        },
    )
}

// ------------------------------------------------------------------ device --

#[derive(Clone, Copy)]
enum Target {
    Ram(u64),
    Vram(u64),
}

fn pte(target: Target, writable: bool) -> u64 {
    match target {
        Target::Ram(a) => cmd::pte(a, false, writable),
        Target::Vram(a) => cmd::pte(a, true, writable),
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Fault {
    reason: u32,
    addr: u64,
    head: u32,
}

struct Gpu<'a> {
    bar: &'a Bar,
    /// Locked pages not yet used.
    pool: Vec<DmaPage>,
    /// Page-table pages; [0] is the root.
    tables: Vec<DmaPage>,
    ring: DmaPage,
    /// Where the next command goes (byte offset in the ring).
    tail: u32,
    fence_page: DmaPage,
    seq: u32,
}

impl<'a> Gpu<'a> {
    fn new(bar: &'a Bar, mut pool: Vec<DmaPage>) -> Result<Self, String> {
        let mut take = || -> Result<DmaPage, String> {
            let p = pool.pop().ok_or("out of locked pages")?;
            p.fill(|_| 0);
            Ok(p)
        };
        let root = take()?;
        let ring = take()?;
        let fence_page = take()?;
        let mut gpu = Gpu {
            bar,
            pool,
            tables: vec![root],
            ring,
            tail: 0,
            fence_page,
            seq: 0,
        };
        gpu.map(FENCE_VA, Target::Ram(gpu.fence_page.phys), true)?;
        Ok(gpu)
    }

    fn page(&mut self) -> Result<DmaPage, String> {
        let p = self.pool.pop().ok_or("out of locked pages")?;
        p.fill(|_| 0);
        Ok(p)
    }

    fn ctx_r32(&self, reg: u64) -> u32 {
        self.bar.load::<u32>(ctx_reg(CTX, reg) as usize)
    }
    fn ctx_w32(&self, reg: u64, v: u32) {
        self.bar.store::<u32>(ctx_reg(CTX, reg) as usize, v)
    }
    fn ctx_r64(&self, reg: u64) -> u64 {
        self.bar.load::<u64>(ctx_reg(CTX, reg) as usize)
    }
    fn ctx_w64(&self, reg: u64, v: u64) {
        self.bar.store::<u64>(ctx_reg(CTX, reg) as usize, v)
    }

    /// Table page and byte offset of the leaf entry for `va`, creating the
    /// tables above it.
    fn leaf_slot(&mut self, va: u64) -> Result<(usize, usize), String> {
        let mut t = 0usize;
        for level in (2..=PT_LEVELS).rev() {
            let off = 8 * pt_index(va, level);
            let e = self.tables[t].load::<u64>(off);
            t = if e & PTE_PRESENT != 0 {
                let phys = e & PTE_ADDR_MASK;
                self.tables
                    .iter()
                    .position(|p| p.phys == phys)
                    .ok_or_else(|| format!("table entry {e:#x} is not one of ours"))?
            } else {
                let p = self.page()?;
                self.tables[t].store::<u64>(off, p.phys | PTE_PRESENT);
                self.tables.push(p);
                self.tables.len() - 1
            };
        }
        Ok((t, 8 * pt_index(va, 1)))
    }

    fn set_leaf(&mut self, va: u64, raw: u64) -> Result<(), String> {
        let (t, off) = self.leaf_slot(va)?;
        self.tables[t].store::<u64>(off, raw);
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn map(&mut self, va: u64, target: Target, writable: bool) -> Result<(), String> {
        self.set_leaf(va, pte(target, writable))
    }

    /// Allocates `n` pages and maps them at `va` (not contiguous in guest
    /// physical memory, contiguous for the GPU).
    fn map_new(&mut self, va: u64, n: usize, writable: bool) -> Result<Vec<DmaPage>, String> {
        let mut pages = Vec::with_capacity(n);
        for i in 0..n {
            let p = self.page()?;
            self.map(va + (i * PAGE) as u64, Target::Ram(p.phys), writable)?;
            pages.push(p);
        }
        Ok(pages)
    }

    /// PT_ROOT, the ring, enable.
    fn program_context(&self) -> u32 {
        self.ctx_w64(CTX_PT_ROOT, self.tables[0].phys);
        self.ctx_w64(CTX_RING_BASE, self.ring.phys);
        self.ctx_w32(CTX_RING_SIZE, PAGE as u32);
        self.ctx_w32(CTX_CONTROL, CTX_CONTROL_ENABLE);
        self.ctx_r32(CTX_STATUS)
    }

    fn fault(&self) -> Option<Fault> {
        let s = self.ctx_r32(CTX_STATUS);
        (s & CTX_STATUS_FAULTED != 0).then(|| Fault {
            reason: (s >> 8) & 0xff,
            addr: self.ctx_r64(CTX_FAULT_ADDR),
            head: self.ctx_r32(CTX_RING_HEAD),
        })
    }

    /// Writes `dwords` at the tail (waiting while the ring is full).
    fn emit(&mut self, dwords: &[u32]) -> Result<(), String> {
        let size = PAGE as u32;
        let need = 4 * dwords.len() as u32;
        if need >= size {
            return Err(format!("{} dwords do not fit the ring", dwords.len()));
        }
        wait_until("room in the ring", TIMEOUT, || {
            let head = self.ctx_r32(CTX_RING_HEAD);
            let used = self.tail.wrapping_sub(head) & (size - 1);
            (used + need <= size - 4 || self.fault().is_some()).then_some(0)
        })?;
        if let Some(f) = self.fault() {
            return Err(format!("ring full and context faulted: {f:?}"));
        }
        for &d in dwords {
            self.ring.store::<u32>(self.tail as usize, d);
            self.tail = (self.tail + 4) & (size - 1);
        }
        Ok(())
    }

    fn doorbell(&self) {
        fence(Ordering::SeqCst);
        self.ctx_w32(CTX_RING_TAIL, self.tail);
    }

    /// Submits `cmds` and a FENCE, then waits for the fence (or reports the fault).
    fn run(&mut self, cmds: &[u32]) -> Result<(), String> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.emit(cmds)?;
        self.emit(&cmd::fence(FENCE_VA, seq, false))?;
        self.doorbell();
        wait_until(&format!("fence {seq}"), TIMEOUT, || {
            let done = self.ctx_r32(CTX_FENCE_SEQNO);
            ((done.wrapping_sub(seq) as i32) >= 0 || self.fault().is_some()).then_some(0)
        })?;
        if let Some(f) = self.fault() {
            return Err(format!("fault {f:?} instead of fence {seq}"));
        }
        fence(Ordering::SeqCst);
        let mem = self.fence_page.load::<u32>(0);
        if mem != seq {
            return Err(format!("fence {seq} retired but memory holds {mem}"));
        }
        Ok(())
    }

    /// Submits `cmds` (no fence) and waits for the fault they must cause.
    fn run_fault(&mut self, cmds: &[u32]) -> Result<Fault, String> {
        self.emit(cmds)?;
        self.doorbell();
        wait_until("a fault", TIMEOUT, || self.fault().map(|_| 0))?;
        self.fault().ok_or_else(|| "fault vanished".into())
    }

    /// CTX_CONTROL bit 1: clear the fault, HEAD = TAIL.
    fn clear_fault(&mut self) {
        self.ctx_w32(CTX_CONTROL, CTX_CONTROL_ENABLE | CTX_CONTROL_CLEAR_FAULT);
        self.tail = self.ctx_r32(CTX_RING_TAIL);
    }
}

fn page_bytes(p: &DmaPage) -> Vec<u8> {
    p.bytes(0, PAGE)
}

fn fill_page(p: &DmaPage, seed: u32) {
    for i in 0..PAGE / 4 {
        p.store::<u32>(
            4 * i,
            seed.wrapping_mul(0x0101_0101) ^ (i as u32).wrapping_mul(2654435761),
        );
    }
    fence(Ordering::SeqCst);
}

// ------------------------------------------------------------------- tests --

/// Runs the vGPU tests on the device at `dev` (sysfs directory).
pub fn run_tests(rep: &mut Report, dev: &Path) -> Result<(), String> {
    let cfg = PciConfig::open(dev)?;
    rep.run("vgpu_config_ids", || {
        let (vid, did, rev, class) = cfg.ids()?;
        if (vid, did, class) != (VENDOR_ID, DEVICE_ID, CLASS_CODE) {
            return Err(format!("{vid:04x}:{did:04x} class={class:#08x}"));
        }
        Ok(format!(
            "{vid:04x}:{did:04x} rev={rev:#04x} class={class:#08x}"
        ))
    });

    std::fs::write(dev.join("enable"), "1").map_err(|e| format!("write enable: {e}"))?;
    let cmd_reg = cfg.read16(0x04)?;
    cfg.write16(0x04, cmd_reg | 0x0006)?;
    let after = cfg.read16(0x04)?;
    rep.run("vgpu_enable", || {
        if after & 0x0006 != 0x0006 {
            return Err(format!("command register {after:#06x}"));
        }
        Ok("mem+bm=0x0006".into())
    });

    let bar = Bar::map(dev, 0)?;
    ID_REG.store(bar.base.cast::<u32>(), Ordering::Relaxed);
    let vram = Bar::map(dev, 2)?;
    info(&format!(
        "vgpu: BAR0 {:#x} bytes, BAR2 (VRAM) {:#x} bytes",
        bar.len, vram.len
    ));
    rep.run("vgpu_id", || {
        let id = bar.load::<u32>(REG_ID as usize);
        let caps = bar.load::<u32>(REG_CAPS as usize);
        let ggtt = bar.load::<u32>(REG_GGTT_SIZE as usize);
        let want_caps = CONTEXTS as u32 | 17 << 8 | ((vram.len >> 20) as u32) << 16;
        if id != ID_VALUE || caps != want_caps || u64::from(ggtt) != GGTT_ENTRIES {
            return Err(format!(
                "id={id:#010x} caps={caps:#010x} (want {want_caps:#010x}) ggtt={ggtt}"
            ));
        }
        Ok(format!("id={id:#010x} caps={caps:#010x} ggtt={ggtt}"))
    });
    // No interrupt handler here: leave interrupts disabled, clear any status.
    bar.store::<u32>(REG_IRQ_ENABLE as usize, 0);
    bar.store::<u32>(REG_IRQ_STATUS as usize, 0x10f);

    let pages = dma_pages(96, u64::MAX)?;
    let mut gpu = Gpu::new(&bar, pages)?;
    let status = gpu.program_context();
    rep.run("vgpu_context", || {
        let head = gpu.ctx_r32(CTX_RING_HEAD);
        if status & CTX_STATUS_ENABLED == 0 || head != 0 {
            return Err(format!("status={status:#x} head={head:#x}"));
        }
        Ok(format!("status={status:#x} head={head:#x}"))
    });

    // Pages for the remap test: A and B (the two targets of REMAP_VA), and the
    // destination of the copies.
    let (a, b) = (gpu.page()?, gpu.page()?);
    fill_page(&a, 0xa);
    fill_page(&b, 0xb);
    let dst = gpu.map_new(DST_VA, 1, true)?.remove(0);

    rep.run("vgpu_store_fence", || {
        gpu.run(&cmd::store_dword(DST_VA + 8, 0xc0ff_ee00))?;
        let v = dst.load::<u32>(8);
        if v != 0xc0ff_ee00 {
            return Err(format!("stored {v:#x}"));
        }
        Ok(format!("value={v:#x} seq={}", gpu.seq))
    });

    rep.run("vgpu_pte_remap", || {
        let copy = cmd::copy(REMAP_VA, DST_VA, PAGE as u32);
        let mut sums = Vec::new();
        let check = |gpu: &mut Gpu, want: &DmaPage, what: &str| -> Result<u32, String> {
            dst.fill(|_| 0);
            gpu.run(&copy)?;
            let got = page_bytes(&dst);
            compare(what, &got, &page_bytes(want))?;
            Ok(fnv1a(&got))
        };
        gpu.map(REMAP_VA, Target::Ram(a.phys), false)?;
        sums.push(check(&mut gpu, &a, "first mapping (A)")?);
        // Rewrite the leaf in guest memory, then a range invalidation.
        gpu.map(REMAP_VA, Target::Ram(b.phys), false)?;
        gpu.ctx_w64(CTX_INV_START, REMAP_VA);
        gpu.ctx_w32(CTX_INV_PAGES, 1);
        gpu.ctx_w32(CTX_TLB_INVALIDATE, TLB_INVALIDATE_RANGE);
        sums.push(check(&mut gpu, &b, "after rewrite + range invalidate (B)")?);
        // Back to A; the doorbell alone is a sync point.
        gpu.map(REMAP_VA, Target::Ram(a.phys), false)?;
        sums.push(check(&mut gpu, &a, "after rewrite + doorbell (A)")?);
        // And a whole-context invalidation.
        gpu.map(REMAP_VA, Target::Ram(b.phys), false)?;
        gpu.ctx_w32(CTX_TLB_INVALIDATE, TLB_INVALIDATE_ALL);
        sums.push(check(&mut gpu, &b, "after rewrite + full invalidate (B)")?);
        let s: Vec<String> = sums.iter().map(|s| format!("{s:08x}")).collect();
        Ok(format!("fnv={}", s.join(",")))
    });

    rep.run("vgpu_bad_target", || {
        // A leaf pointing far outside guest RAM.
        gpu.set_leaf(HOSTILE_VA, OUTSIDE_RAM | PTE_PRESENT | PTE_WRITABLE)?;
        let start = gpu.tail;
        let f = gpu.run_fault(&cmd::copy(HOSTILE_VA, DST_VA, 64))?;
        let irq = bar.load::<u32>(REG_IRQ_STATUS as usize);
        let status = gpu.ctx_r32(CTX_STATUS);
        let summary = format!(
            "reason={} addr={:#x} head_at_start={} irq_status={irq:#x} status={status:#x}",
            f.reason,
            f.addr,
            f.head == start
        );
        if f.reason != u32::from(FAULT_BAD_TARGET)
            || f.addr != HOSTILE_VA
            || f.head != start
            || irq & 1 == 0
            || status & CTX_STATUS_BUSY != 0
        {
            return Err(summary);
        }
        // Clear the fault and the interrupt status; unmap the bad page.
        gpu.clear_fault();
        bar.store::<u32>(REG_IRQ_STATUS as usize, 1);
        gpu.set_leaf(HOSTILE_VA, 0)?;
        let after = (
            gpu.ctx_r32(CTX_STATUS),
            bar.load::<u32>(REG_IRQ_STATUS as usize),
        );
        if after.0 & CTX_STATUS_FAULTED != 0 || after.1 != 0 {
            return Err(format!(
                "{summary}; after clearing: status={:#x} irq_status={:#x}",
                after.0, after.1
            ));
        }
        Ok(summary)
    });

    rep.run("vgpu_after_fault", || {
        gpu.run(&cmd::store_dword(DST_VA + 16, 0x600d_600d))?;
        let v = dst.load::<u32>(16);
        if v != 0x600d_600d {
            return Err(format!("stored {v:#x}"));
        }
        Ok(format!("value={v:#x}"))
    });

    // --- The picture: framebuffer in VRAM, scanned out through the GGTT.
    let fb_pages = picture::FB_BYTES.div_ceil(PAGE);
    rep.run("vgpu_scanout", || {
        for i in 0..fb_pages {
            let entry = pte(Target::Vram((i * PAGE) as u64), true);
            bar.store::<u64>((GGTT_OFFSET + 8 * i as u64) as usize, entry);
        }
        let last = bar.load::<u64>((GGTT_OFFSET + 8 * (fb_pages as u64 - 1)) as usize);
        let sc = |r: u64| (SCANOUT_BASE + r) as usize;
        bar.store::<u64>(sc(SCANOUT_FB_ADDR), 0);
        bar.store::<u32>(sc(SCANOUT_FB_WIDTH), picture::WIDTH);
        bar.store::<u32>(sc(SCANOUT_FB_HEIGHT), picture::HEIGHT);
        bar.store::<u32>(sc(SCANOUT_FB_STRIDE), picture::STRIDE);
        bar.store::<u32>(sc(SCANOUT_FB_FORMAT), FB_FORMAT_XRGB8888);
        bar.store::<u32>(sc(SCANOUT_FB_ENABLE), 1);
        let err = bar.load::<u32>(REG_GLOBAL_ERROR as usize);
        let regs: Vec<u32> = [
            SCANOUT_FB_WIDTH,
            SCANOUT_FB_HEIGHT,
            SCANOUT_FB_STRIDE,
            SCANOUT_FB_FORMAT,
            SCANOUT_FB_ENABLE,
        ]
        .iter()
        .map(|&r| bar.load::<u32>(sc(r)))
        .collect();
        let summary =
            format!("ggtt_entries={fb_pages} last={last:#x} regs={regs:?} global_error={err}");
        let want = [
            picture::WIDTH,
            picture::HEIGHT,
            picture::STRIDE,
            FB_FORMAT_XRGB8888,
            1,
        ];
        if err != 0
            || regs != want
            || last != pte(Target::Vram(((fb_pages - 1) * PAGE) as u64), true)
        {
            return Err(summary);
        }
        Ok(summary)
    });

    rep.run("vgpu_picture", || {
        // The framebuffer for the GPU: VRAM pages at FB_VA.
        for i in 0..fb_pages {
            let off = (i * PAGE) as u64;
            gpu.map(FB_VA + off, Target::Vram(off), true)?;
        }
        // The gradient image, staged in guest RAM (mapped read-only).
        let image = picture::image_bytes();
        let image_pages = gpu.map_new(IMAGE_VA, image.len().div_ceil(PAGE), false)?;
        for (chunk, page) in image.chunks(PAGE).zip(&image_pages) {
            for (i, d) in chunk.chunks_exact(4).enumerate() {
                page.store::<u32>(4 * i, u32::from_le_bytes([d[0], d[1], d[2], d[3]]));
            }
        }
        gpu.map_new(SCRATCH_VA, 1, true)?;
        // Every drawing command in a batch buffer spanning several pages.
        let mut batch = draw_commands(picture::SCENE);
        batch.extend(cmd::batch_end());
        let batch_pages = gpu.map_new(BATCH_VA, (4 * batch.len()).div_ceil(PAGE), false)?;
        for (i, d) in batch.iter().enumerate() {
            batch_pages[4 * i / PAGE].store::<u32>((4 * i) % PAGE, *d);
        }
        fence(Ordering::SeqCst);
        gpu.run(&cmd::batch_start(BATCH_VA))?;
        // What the GPU drew, read back through BAR2.
        let want = picture::render();
        let got: Vec<u8> = (0..picture::FB_BYTES / 4)
            .flat_map(|i| vram.load::<u32>(4 * i).to_le_bytes())
            .collect();
        compare("framebuffer", &got, &want)?;
        Ok(format!(
            "{}x{} commands={} batch_pages={} fnv={:08x}",
            picture::WIDTH,
            picture::HEIGHT,
            batch.len(),
            batch_pages.len(),
            fnv1a(&got)
        ))
    });
    // `UMDEV_HOLD_MS=N`: keep the picture on screen N ms (a host-side VNC
    // viewer looks at it), then halve the mode and keep that N ms too.
    if let Some(ms) = std::env::var("UMDEV_HOLD_MS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        let sc = |r: u64| (SCANOUT_BASE + r) as usize;
        info(&format!("vgpu: holding the picture for {ms} ms"));
        std::thread::sleep(Duration::from_millis(ms));
        bar.store::<u32>(sc(SCANOUT_FB_WIDTH), picture::WIDTH / 2);
        bar.store::<u32>(sc(SCANOUT_FB_HEIGHT), picture::HEIGHT / 2);
        info(&format!(
            "vgpu: mode {}x{}, holding for {ms} ms",
            picture::WIDTH / 2,
            picture::HEIGHT / 2
        ));
        std::thread::sleep(Duration::from_millis(ms));
    }
    let err = bar.load::<u32>(REG_GLOBAL_ERROR as usize);
    if err != 0 {
        rep.result("vgpu_global_error", Err(format!("{err}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_commands_are_well_formed() {
        let dwords = draw_commands(picture::SCENE);
        let mut at = 0;
        let mut n = 0;
        while at < dwords.len() {
            let h = dwords[at];
            let len = command_len((h >> 24) as u8).expect("known opcode");
            assert_eq!(h & 0xffff, len as u32);
            at += len;
            n += 1;
        }
        assert_eq!(at, dwords.len());
        assert!(n > picture::SCENE.len());
    }

    #[test]
    fn ptes_carry_the_spec_bits() {
        assert_eq!(pte(Target::Ram(0x1234_5000), true), 0x1234_5003);
        assert_eq!(pte(Target::Vram(0x2000), false), 0x2005);
    }
}
