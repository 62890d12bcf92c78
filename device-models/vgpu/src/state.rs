//! The vGPU's state for migration (`umdev::state` layout), section `VGPU`
//! version 1:
//!
//! | field | encoding |
//! |---|---|
//! | irq_status, irq_enable, global_error | u32 each |
//! | VRAM size in MiB | u32 (must match the destination's `--vram-mib`) |
//! | per context (4): pt_root, ring_base, fault_addr, inv_start | u64 each |
//! | per context: ring_size, head, tail, status, fence_seqno, inv_pages, control, msix_vector | u32 each |
//! | scanout: fb_addr | u64 |
//! | scanout: width, height, stride, format, enable | u32 each |
//! | GGTT entries that are not zero | count, then index u32 and raw entry u64 each |
//! | GGTT low halves waiting for their high half | count, then index u32 and u32 each |
//! | VRAM pages that are not zero | count, then page index u32 and 4096 bytes each |
//!
//! Not saved, because it is derived from guest memory and never trusted from a
//! blob: the GGTT's translations (each raw entry is validated again as if the
//! guest had just written it) and the shadow page tables with their write
//! tracking (rebuilt at each context's next sync point). The engine finishes
//! the work it was given before the state is taken, so no submission is
//! half-run in the blob.

use std::sync::atomic::Ordering;

use umdev::state::{SectionReader, SectionWriter, StateError, StateReader, StateWriter};

use super::regs::*;
use super::{lock, Context, Registers, Scanout, Shared};

const VERSION: u32 = 1;
const VRAM_PAGE: usize = PAGE_SIZE as usize;

pub(crate) fn save(shared: &Shared) -> Vec<u8> {
    let mut w = StateWriter::new();
    w.section(b"VGPU", VERSION, |s| {
        let regs = lock(&shared.regs);
        s.u32(regs.irq_status);
        s.u32(regs.irq_enable);
        s.u32(regs.global_error);
        s.u32(regs.vram_mib);
        for c in &regs.ctx {
            save_context(s, c);
        }
        let sc = &regs.scanout;
        s.u64(sc.fb_addr);
        for v in [sc.width, sc.height, sc.stride, sc.format, sc.enable] {
            s.u32(v);
        }
        drop(regs);
        let ggtt = lock(&shared.ggtt);
        let used: Vec<(usize, u64)> = ggtt
            .raw
            .iter()
            .enumerate()
            .filter(|(_, &e)| e != 0)
            .map(|(i, &e)| (i, e))
            .collect();
        s.u64(used.len() as u64);
        for (i, e) in used {
            s.u32(i as u32);
            s.u64(e);
        }
        s.u64(ggtt.pending_low.len() as u64);
        for (&i, &low) in &ggtt.pending_low {
            s.u32(i as u32);
            s.u32(low);
        }
        drop(ggtt);
        let pages = shared.vram.size() as usize / VRAM_PAGE;
        let mut page = vec![0u8; VRAM_PAGE];
        let mut used = Vec::new();
        for p in 0..pages {
            if shared.vram.read((p * VRAM_PAGE) as u64, &mut page).is_ok()
                && page.iter().any(|&b| b != 0)
            {
                used.push(p);
            }
        }
        s.u64(used.len() as u64);
        for p in used {
            let _ = shared.vram.read((p * VRAM_PAGE) as u64, &mut page);
            s.u32(p as u32);
            s.bytes(&page);
        }
    });
    w.finish()
}

fn save_context(s: &mut SectionWriter, c: &Context) {
    for v in [c.pt_root, c.ring_base, c.fault_addr, c.inv_start] {
        s.u64(v);
    }
    for v in [
        c.ring_size,
        c.head,
        c.tail,
        c.status,
        c.fence_seqno,
        c.inv_pages,
        c.control,
        c.msix_vector,
    ] {
        s.u32(v);
    }
}

fn read_context(s: &mut SectionReader<'_>) -> Result<Context, StateError> {
    let (pt_root, ring_base, fault_addr, inv_start) = (s.u64()?, s.u64()?, s.u64()?, s.u64()?);
    let mut v = [0u32; 8];
    for x in &mut v {
        *x = s.u32()?;
    }
    let [ring_size, head, tail, status, fence_seqno, inv_pages, control, msix_vector] = v;
    if msix_vector >= u32::from(MSIX_VECTORS) || control & !CTX_CONTROL_ENABLE != 0 {
        return Err(StateError::Invalid("vGPU context registers out of range"));
    }
    Ok(Context {
        pt_root,
        ring_base,
        ring_size,
        head,
        tail,
        // Busy is the engine's, which starts idle here.
        status: status & !CTX_STATUS_BUSY,
        fault_addr,
        fence_seqno,
        inv_start,
        inv_pages,
        control,
        msix_vector,
        attached_root: None,
    })
}

/// What a blob holds, read and checked before anything changes.
struct Parsed {
    regs: Registers,
    ggtt: Vec<(usize, u64)>,
    pending_low: Vec<(usize, u32)>,
    vram: Vec<(usize, Vec<u8>)>,
}

fn parse(shared: &Shared, blob: &[u8]) -> Result<Parsed, StateError> {
    let mut r = StateReader::new(blob)?;
    let (_, mut s) = r.section(b"VGPU", VERSION)?;
    let (irq_status, irq_enable, global_error) = (s.u32()?, s.u32()?, s.u32()?);
    let vram_mib = s.u32()?;
    if u64::from(vram_mib) << 20 != shared.vram.size() {
        return Err(StateError::Invalid("vGPU with another VRAM size"));
    }
    let layout = lock(&shared.regs).layout;
    let ggtt_entries = layout.ggtt_entries as u64;
    let mut ctx = [Context::default(); CONTEXTS];
    for (i, c) in ctx.iter_mut().enumerate() {
        *c = read_context(&mut s)?;
        if i >= layout.contexts && c.control != 0 {
            return Err(StateError::Invalid(
                "a context this vGPU does not have is enabled",
            ));
        }
    }
    let fb_addr = s.u64()?;
    let mut v = [0u32; 5];
    for x in &mut v {
        *x = s.u32()?;
    }
    let [width, height, stride, format, enable] = v;
    let n = s.count(12)?;
    let mut ggtt = Vec::with_capacity(n);
    for _ in 0..n {
        let (i, e) = (s.u32()? as usize, s.u64()?);
        if i as u64 >= ggtt_entries {
            return Err(StateError::Invalid("GGTT index out of range"));
        }
        ggtt.push((i, e));
    }
    let n = s.count(8)?;
    let mut pending_low = Vec::with_capacity(n);
    for _ in 0..n {
        let (i, low) = (s.u32()? as usize, s.u32()?);
        if i as u64 >= ggtt_entries {
            return Err(StateError::Invalid("GGTT index out of range"));
        }
        pending_low.push((i, low));
    }
    let pages = shared.vram.size() as usize / VRAM_PAGE;
    let n = s.count(12 + VRAM_PAGE)?;
    let mut vram = Vec::with_capacity(n);
    for _ in 0..n {
        let p = s.u32()? as usize;
        let bytes = s.bytes()?;
        if p >= pages || bytes.len() != VRAM_PAGE {
            return Err(StateError::Invalid("VRAM page out of range"));
        }
        vram.push((p, bytes.to_vec()));
    }
    s.finish()?;
    r.finish()?;
    Ok(Parsed {
        regs: Registers {
            irq_status,
            irq_enable,
            global_error,
            busy: 0,
            ctx,
            scanout: Scanout {
                fb_addr,
                width,
                height,
                stride,
                format,
                enable,
            },
            generation: 0,
            vram_mib,
            layout,
        },
        ggtt,
        pending_low,
        vram,
    })
}

/// Takes a blob into a vGPU; returns the contexts with work rung and not yet
/// run, for the engine. Nothing changes if the blob is refused.
pub(crate) fn restore(shared: &Shared, blob: &[u8]) -> Result<Vec<usize>, StateError> {
    let parsed = parse(shared, blob)?;
    // From power-on: a new generation drops anything the engine still has.
    shared.reset();
    for (p, bytes) in &parsed.vram {
        let _ = shared.vram.write((p * VRAM_PAGE) as u64, bytes);
    }
    {
        let mut regs = lock(&shared.regs);
        let generation = regs.generation;
        *regs = Registers {
            generation,
            ..parsed.regs
        };
        shared.live_generation.store(generation, Ordering::Release);
    }
    // Each entry validated as a guest write would be: a translation is never
    // taken from the blob.
    for &(i, raw) in &parsed.ggtt {
        shared.ggtt_write(i, None, raw);
    }
    lock(&shared.ggtt)
        .pending_low
        .extend(parsed.pending_low.iter().copied());
    let regs = lock(&shared.regs);
    Ok((0..CONTEXTS)
        .filter(|&n| {
            let c = &regs.ctx[n];
            c.control & CTX_CONTROL_ENABLE != 0
                && c.status & CTX_STATUS_FAULTED == 0
                && c.head != c.tail
        })
        .collect())
}
