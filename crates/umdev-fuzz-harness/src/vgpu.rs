//! The vGPU's page-table shadowing and command auditing, driven by guest memory
//! the input chose (`device-models/vgpu`: `shadow::ShadowPageTables`,
//! `command::audit_segment`).
//!
//! The set-up is the device's own minus the PCI function: guest RAM of two
//! fd-mapped regions (memfds, 8 pages each, at [`RAM_BASE`]), a message-only
//! region (no fd: what a plain `-m` guest shares), a small VRAM, a scan
//! [`PageTracker`] whose notifier feeds the shadow exactly as the device's does,
//! and a context whose root, ring and commands the input sets. The input is a
//! sequence of operations (an opcode byte, then operands; a truncated operation
//! ends the input): guest writes of page-table entries and of raw bytes, sync
//! points, a root, remaps of a RAM region under the tables (QEMU does that during
//! boot), a RAM region unmapped for a while (the guest may write it meanwhile)
//! and mapped back, shadow resets, a table budget, a ring with commands, and
//! audits. Sync points do what the device's do (`sync_context` in its lib.rs).
//!
//! Checked, against a reference walk of the guest's tables *as they are in
//! memory* written here independently of the device code:
//!
//! - `translate` after a sync point gives exactly what the guest's tables say
//!   (target, writability, fault reason) — while a table budget is in force, only
//!   that whatever it does translate is what the tables say;
//! - every step of an audited plan names memory the guest's tables map for it at
//!   that moment, inside guest memory or VRAM, writable where the step writes,
//!   never the ring; extents add up to the bytes the command moves;
//! - no panic, no hang, bounded memory.
//!
//! Targets: `vgpu_page_tables` ([`run_page_tables`]: entries, sync points,
//! remaps and translations) and `vgpu_audit` ([`run_audit`]: the same plus a ring,
//! commands and audits).

use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard};

use umdev::memory::{DmaRegion, GuestMemory};
use umdev::pagetrack::{Gfn, NotifierRegistration, PageTracker, Policy, SourceKind};
use umdev_vgpu::command::{audit_segment, AuditContext, Cursor, Extent, Step};
use umdev_vgpu::regs::*;
use umdev_vgpu::shadow::{ShadowNotifier, ShadowPageTables, Target, TargetCheck, Translation};
use umdev_vgpu::vram::Vram;

/// Guest-physical base of guest RAM: two fd-mapped regions of
/// [`RAM_REGION_PAGES`] pages each, back to back.
pub const RAM_BASE: u64 = 0x10_0000;
pub const RAM_REGION_PAGES: u64 = 8;
pub const RAM_REGIONS: u64 = 2;
pub const RAM_PAGES: u64 = RAM_REGION_PAGES * RAM_REGIONS;
pub const RAM_END: u64 = RAM_BASE + RAM_PAGES * PAGE_SIZE;
/// A region without an fd (reachable only by DMA messages; no transport here).
pub const MSG_BASE: u64 = 0x20_0000;
pub const MSG_PAGES: u64 = 2;
pub const VRAM_PAGES: u64 = 16;
pub const VRAM_SIZE: u64 = VRAM_PAGES * PAGE_SIZE;
/// Most audit segments (TLB_INVALIDATE boundaries) one submission runs here; the
/// device runs them all, bounded by its command budget.
pub const MAX_SEGMENTS: usize = 256;
/// Pages of one plan step compared with the reference walk.
const MAX_CHECKED_PAGES: u64 = 1024;

// Operations.
pub const OP_PTE_LINK: u8 = 0;
pub const OP_PTE_RAW: u8 = 1;
pub const OP_BYTES: u8 = 2;
pub const OP_SYNC: u8 = 3;
pub const OP_ROOT: u8 = 4;
pub const OP_CHECK: u8 = 5;
pub const OP_CHECK_VA: u8 = 6;
pub const OP_REMAP: u8 = 7;
pub const OP_RESET: u8 = 8;
pub const OP_MAX_TABLES: u8 = 9;
/// Operations of the page-table target; the audit target has these and the next.
pub const PAGE_TABLE_OPS: u8 = 10;
pub const OP_RING: u8 = 10;
pub const OP_COMMANDS: u8 = 11;
pub const OP_AUDIT: u8 = 12;
pub const AUDIT_OPS: u8 = 13;

/// Guest-physical address named by a page selector: RAM pages, then the message
/// region's, then addresses nothing maps.
pub fn page_gpa(sel: u8) -> u64 {
    let sel = u64::from(sel) % (RAM_PAGES + MSG_PAGES + 4);
    if sel < RAM_PAGES {
        RAM_BASE + sel * PAGE_SIZE
    } else if sel < RAM_PAGES + MSG_PAGES {
        MSG_BASE + (sel - RAM_PAGES) * PAGE_SIZE
    } else {
        [0, RAM_END, RAM_BASE - PAGE_SIZE, PTE_ADDR_MASK][(sel - RAM_PAGES - MSG_PAGES) as usize]
    }
}

/// A page-table entry pointing at the page named by `sel`: with the VRAM bit
/// in `flags`, VRAM page `sel % 17` (the 17th is past the end); otherwise
/// [`page_gpa`]. `flags` fills the low byte (present, writable, VRAM, ignored bits).
pub fn link_entry(sel: u8, flags: u8) -> u64 {
    let addr = if u64::from(flags) & PTE_VRAM != 0 {
        u64::from(sel) % (VRAM_PAGES + 1) * PAGE_SIZE
    } else {
        page_gpa(sel)
    };
    addr | u64::from(flags)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A context's ring as the guest programmed it.
#[derive(Clone, Copy, Debug)]
struct Ring {
    base: u64,
    size: u32,
    head: u32,
    tail: u32,
}

/// Guest memory, VRAM, tracker, shadow and one context.
pub struct Env {
    memory: GuestMemory,
    /// The memfd behind each RAM region (the guest's view of its RAM).
    ram: Vec<File>,
    /// Whether each RAM region is mapped for the device now (the guest's RAM
    /// stays, and the guest may write it, while it is not).
    ram_mapped: Vec<bool>,
    vram: Vram,
    tracker: PageTracker,
    shadow: Arc<Mutex<ShadowPageTables>>,
    /// The shadow's notifier, registered while the environment lives.
    _registration: NotifierRegistration,
    root_gpa: u64,
    /// Root the shadow holds a reference on, and the epoch it was taken in.
    attached: Option<(Gfn, u64)>,
    /// Whether a table budget was set: translations may then fail where the
    /// guest's tables would succeed.
    budget_limited: bool,
    ring: Option<Ring>,
    /// Steps audited so far (for the harness's own tests).
    pub steps: usize,
    /// Translations compared with the reference walk.
    pub checks: usize,
    /// Faults the audits ended in (reason, address).
    pub faults: Vec<(u8, u64)>,
}

fn map_ram(memory: &GuestMemory, index: u64, file: &File) {
    let fd: OwnedFd = file.try_clone().expect("dup memfd").into();
    let region = DmaRegion::mapped(
        RAM_BASE + index * RAM_REGION_PAGES * PAGE_SIZE,
        RAM_REGION_PAGES * PAGE_SIZE,
        fd,
        0,
        true,
        true,
    )
    .expect("map RAM region");
    memory
        .with_regions(|r| r.insert(region))
        .expect("insert RAM region");
}

impl Env {
    pub fn new() -> Self {
        let memory = GuestMemory::new(16);
        let mut ram = Vec::new();
        for i in 0..RAM_REGIONS {
            let file =
                umdev::memory::memfd("fuzz-vgpu-ram", RAM_REGION_PAGES * PAGE_SIZE).expect("memfd");
            map_ram(&memory, i, &file);
            ram.push(file);
        }
        let msg = DmaRegion::message(MSG_BASE, MSG_PAGES * PAGE_SIZE, true, true).expect("region");
        memory
            .with_regions(|r| r.insert(msg))
            .expect("insert message region");
        memory.set_bus_master(true);
        let vram = Vram::new(VRAM_SIZE).expect("VRAM");
        let tracker = PageTracker::with_source(memory.clone(), SourceKind::Scan, Policy::Strict);
        let check = TargetCheck {
            memory: memory.clone(),
            vram_size: vram.size(),
        };
        let shadow = Arc::new(Mutex::new(ShadowPageTables::new(tracker.clone(), check)));
        let registration = tracker.register(Arc::new(ShadowNotifier(shadow.clone())));
        Env {
            memory,
            ram,
            ram_mapped: vec![true; RAM_REGIONS as usize],
            vram,
            tracker,
            shadow,
            _registration: registration,
            root_gpa: 0,
            attached: None,
            budget_limited: false,
            ring: None,
            steps: 0,
            checks: 0,
            faults: Vec::new(),
        }
    }

    /// A guest write of `bytes` at `gpa` (RAM only; elsewhere nothing happens,
    /// as nothing the guest can write is there).
    fn guest_write(&self, gpa: u64, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            let at = gpa + done as u64;
            if !(RAM_BASE..RAM_END).contains(&at) {
                return;
            }
            let region_size = RAM_REGION_PAGES * PAGE_SIZE;
            let index = (at - RAM_BASE) / region_size;
            let off = (at - RAM_BASE) % region_size;
            let n = ((region_size - off) as usize).min(bytes.len() - done);
            let _ = self.ram[index as usize].write_at(&bytes[done..done + n], off);
            done += n;
        }
    }

    /// Takes RAM region `index` away from the device, as DMA_UNMAP does
    /// (tracking there goes with it).
    fn unmap(&mut self, index: u64) {
        if !self.ram_mapped[index as usize] {
            return;
        }
        let gpa = RAM_BASE + index * RAM_REGION_PAGES * PAGE_SIZE;
        let size = RAM_REGION_PAGES * PAGE_SIZE;
        let removed = self
            .memory
            .with_regions(|r| r.remove_range(gpa, size))
            .expect("unmap RAM region");
        self.tracker.remove_region(gpa, size);
        drop(removed);
        self.ram_mapped[index as usize] = false;
    }

    /// Unmaps RAM region `index` and maps a new memfd with the same contents at
    /// the same place (QEMU re-maps guest RAM during boot). With `toggle`, only
    /// one half: an unmapped region comes back, a mapped one goes, so sync
    /// points and audits also see memory missing and coming back.
    fn remap(&mut self, index: u64, toggle: bool) {
        let i = index as usize;
        if toggle && self.ram_mapped[i] {
            self.unmap(index);
            return;
        }
        self.unmap(index);
        let size = RAM_REGION_PAGES * PAGE_SIZE;
        let mut contents = vec![0u8; size as usize];
        self.ram[i]
            .read_exact_at(&mut contents, 0)
            .expect("read memfd");
        let file = umdev::memory::memfd("fuzz-vgpu-ram", size).expect("memfd");
        file.write_all_at(&contents, 0).expect("write memfd");
        map_ram(&self.memory, index, &file);
        self.ram[i] = file;
        self.ram_mapped[i] = true;
    }

    /// The device's sync point: the tracker's sync, then the context's root
    /// attached (again, if its epoch passed or the register changed).
    fn sync_context(&mut self) -> Result<Gfn, u8> {
        self.tracker.sync();
        let wanted = self.root_gpa / PAGE_SIZE;
        let mut shadow = lock(&self.shadow);
        shadow.regions_changed(self.memory.regions_generation());
        let epoch = shadow.epoch();
        let live = self.attached.filter(|&(_, e)| e == epoch).map(|(g, _)| g);
        if live == Some(wanted) && self.root_gpa != 0 {
            return Ok(wanted);
        }
        let new = shadow.attach_root(self.root_gpa);
        if let Some(old) = live {
            shadow.detach_root(old);
        }
        self.attached = new.ok().map(|g| (g, shadow.epoch()));
        new
    }

    /// Compares the shadow's translation of `va` with the reference walk.
    fn check(&mut self, va: u64, write: bool) {
        let Ok(root) = self.sync_context() else {
            return;
        };
        let got = lock(&self.shadow).translate(root, va, write);
        let want = reference_walk(&self.memory, root, va, write);
        self.checks += 1;
        if self.budget_limited {
            if let Ok(t) = got {
                assert_eq!(
                    Ok(t),
                    want,
                    "va {va:#x} write {write}: translated past a budget"
                );
            }
        } else {
            assert_eq!(
                got, want,
                "va {va:#x} write {write}: shadow and tables disagree"
            );
        }
    }

    /// Runs the submission between the ring's head and tail as the engine does:
    /// sync point, audit up to a TLB_INVALIDATE, again; checks every plan.
    fn audit(&mut self) {
        let Some(ring) = self.ring else {
            return;
        };
        // The engine's ring checks, before it audits anything.
        let bad_ring = !ring.size.is_power_of_two()
            || !(RING_SIZE_MIN..=RING_SIZE_MAX).contains(&ring.size)
            || !ring.base.is_multiple_of(PAGE_SIZE)
            || ring.tail >= ring.size
            || !ring.tail.is_multiple_of(4)
            || !self.memory.is_host_mapped(ring.base, u64::from(ring.size));
        if bad_ring || ring.head == ring.tail {
            return;
        }
        let rings = [(ring.base, u64::from(ring.size))];
        let mut cursor = Cursor::new(ring.head, ring.tail);
        for _ in 0..MAX_SEGMENTS {
            let root = match self.sync_context() {
                Ok(r) => r,
                Err(reason) => {
                    self.faults.push((reason, self.root_gpa));
                    break;
                }
            };
            let audited = {
                let shadow = lock(&self.shadow);
                let ctx = AuditContext {
                    shadow: &shadow,
                    root,
                    memory: &self.memory,
                    vram: &self.vram,
                    ring_base: ring.base,
                    ring_size: ring.size,
                    rings: &rings,
                };
                audit_segment(&ctx, &mut cursor)
            };
            let (plan, more) = match audited {
                Ok(p) => p,
                Err(f) => {
                    self.faults.push((f.reason, f.addr));
                    break;
                }
            };
            assert!(
                cursor.batches.len() <= MAX_BATCH_DEPTH,
                "batch nesting {} past the limit",
                cursor.batches.len()
            );
            assert!(cursor.bytes <= MAX_BYTES_PER_SUBMISSION);
            assert!(cursor.commands <= MAX_COMMANDS_PER_SUBMISSION);
            for step in &plan {
                self.check_step(root, step, &rings);
            }
            if !more {
                // The device moves HEAD to TAIL.
                if let Some(r) = &mut self.ring {
                    r.head = r.tail;
                }
                break;
            }
        }
    }

    /// One audited step against the guest's tables as they are now.
    fn check_step(&mut self, root: Gfn, step: &Step, rings: &[(u64, u64)]) {
        self.steps += 1;
        match step {
            Step::Store { dst, va, .. } | Step::Fence { dst, va, .. } => {
                let one = [Extent {
                    target: *dst,
                    len: 4,
                }];
                self.check_extents(root, *va, &one, true, rings);
            }
            Step::Fill { dst, va, .. } => {
                self.check_extents(root, *va, dst, true, rings);
            }
            Step::Copy { src, dst, va } => {
                let total = |e: &[Extent]| e.iter().map(|x| x.len).sum::<u64>();
                assert_eq!(total(src), total(dst), "copy: source and destination sizes");
                for e in src {
                    assert!(self.inside(e), "copy source outside memory: {e:?}");
                }
                self.check_extents(root, *va, dst, true, rings);
            }
        }
    }

    fn inside(&self, e: &Extent) -> bool {
        match e.target {
            Target::Ram(gpa) => self.memory.covers(gpa, e.len),
            Target::Vram(off) => off.checked_add(e.len).is_some_and(|end| end <= VRAM_SIZE),
        }
    }

    /// `extents` must be what the guest's tables map at `[va, va+len)`, page by
    /// page, writable if `write`, and (for writes) away from every ring.
    fn check_extents(
        &mut self,
        root: Gfn,
        va: u64,
        extents: &[Extent],
        write: bool,
        rings: &[(u64, u64)],
    ) {
        let mut cur = va;
        let mut pages = 0;
        for e in extents {
            assert!(e.len > 0, "empty extent at {va:#x}");
            assert!(self.inside(e), "extent outside memory: {e:?} (va {va:#x})");
            if let (true, Target::Ram(gpa)) = (write, e.target) {
                for &(base, size) in rings {
                    assert!(
                        gpa + e.len <= base || base + size <= gpa,
                        "write to the ring: {e:?} (va {va:#x})"
                    );
                }
            }
            let mut done = 0;
            while done < e.len && pages < MAX_CHECKED_PAGES {
                let want = reference_walk(&self.memory, root, cur, write);
                assert_eq!(
                    want.map(|t| t.target),
                    Ok(e.target.offset(done)),
                    "va {cur:#x}: the plan's target is not what the tables map"
                );
                self.checks += 1;
                let piece = (PAGE_SIZE - cur % PAGE_SIZE).min(e.len - done);
                done += piece;
                cur += piece;
                pages += 1;
            }
            if pages >= MAX_CHECKED_PAGES {
                return;
            }
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// The guest's translation of `va` from the tables in memory, written from
/// SPEC.md without the device's code: 4 levels of 512 entries; an entry without
/// PRESENT is a not-present fault; a non-leaf entry must name a table in
/// fd-mapped RAM (not VRAM), else a bad-table fault; a leaf must name a whole
/// page of VRAM (VRAM bit) or of guest memory, else a bad-target fault; a write
/// through a leaf without WRITABLE is a read-only fault.
pub fn reference_walk(
    memory: &GuestMemory,
    root: Gfn,
    va: u64,
    write: bool,
) -> Result<Translation, u8> {
    if va >= VA_LIMIT {
        return Err(FAULT_NOT_PRESENT);
    }
    let mut table = root * PAGE_SIZE;
    for level in (1..=PT_LEVELS).rev() {
        let index = (va >> (12 + 9 * (u64::from(level) - 1))) & 0x1ff;
        let mut raw = [0u8; 8];
        memory
            .peek(table + index * 8, &mut raw)
            .map_err(|_| FAULT_BAD_TABLE)?;
        let raw = u64::from_le_bytes(raw);
        if raw & PTE_PRESENT == 0 {
            return Err(FAULT_NOT_PRESENT);
        }
        let addr = raw & PTE_ADDR_MASK;
        let vram = raw & PTE_VRAM != 0;
        if level > 1 {
            if vram || !memory.is_host_mapped(addr, PAGE_SIZE) {
                return Err(FAULT_BAD_TABLE);
            }
            table = addr;
            continue;
        }
        let target = if vram {
            if addr + PAGE_SIZE > VRAM_SIZE {
                return Err(FAULT_BAD_TARGET);
            }
            Target::Vram(addr + va % PAGE_SIZE)
        } else {
            if !memory.covers(addr, PAGE_SIZE) {
                return Err(FAULT_BAD_TARGET);
            }
            Target::Ram(addr + va % PAGE_SIZE)
        };
        let writable = raw & PTE_WRITABLE != 0;
        if write && !writable {
            return Err(FAULT_READ_ONLY);
        }
        return Ok(Translation { target, writable });
    }
    Err(FAULT_BAD_TABLE)
}

/// Reads operands off the front of the input.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }
}

/// Ring sizes a RING operation chooses from (the last two are refused).
const RING_SIZES: [u32; 4] = [4096, 8192, 6000, 2 << 20];

/// Runs one operation; `None` when the input ran out.
fn step(env: &mut Env, input: &mut Input<'_>, ops: u8) -> Option<()> {
    match input.u8()? % ops {
        OP_PTE_LINK => {
            let (page, slot, sel, flags) = (input.u8()?, input.u16()?, input.u8()?, input.u8()?);
            let gpa = page_gpa(page) + u64::from(slot) % 512 * 8;
            env.guest_write(gpa, &link_entry(sel, flags).to_le_bytes());
        }
        OP_PTE_RAW => {
            let (page, slot, raw) = (input.u8()?, input.u16()?, input.u64()?);
            let gpa = page_gpa(page) + u64::from(slot) % 512 * 8;
            env.guest_write(gpa, &raw.to_le_bytes());
        }
        OP_BYTES => {
            let (page, off, len) = (input.u8()?, input.u16()?, input.u8()?);
            let data: Vec<u8> = (0..len).map_while(|_| input.u8()).collect();
            env.guest_write(page_gpa(page) + u64::from(off) % PAGE_SIZE, &data);
        }
        OP_SYNC => {
            let _ = env.sync_context();
        }
        OP_ROOT => env.root_gpa = page_gpa(input.u8()?),
        OP_CHECK => {
            let mut va = 0;
            for level in (1..=PT_LEVELS).rev() {
                va |= (u64::from(input.u16()?) % 512) << (12 + 9 * (u64::from(level) - 1));
            }
            va |= u64::from(input.u16()?) % PAGE_SIZE;
            let write = input.u8()? & 1 != 0;
            env.check(va, write);
        }
        OP_CHECK_VA => {
            let (va, write) = (input.u64()?, input.u8()? & 1 != 0);
            env.check(va, write);
        }
        OP_REMAP => {
            let arg = input.u8()?;
            env.remap(u64::from(arg & 0x7f) % RAM_REGIONS, arg & 0x80 != 0);
        }
        OP_RESET => {
            lock(&env.shadow).reset();
        }
        OP_MAX_TABLES => {
            lock(&env.shadow).set_max_tables(usize::from(input.u8()? % 16));
            env.budget_limited = true;
        }
        OP_RING => {
            let (page, size, head) = (input.u8()?, input.u8()?, input.u16()?);
            let size = RING_SIZES[usize::from(size) % RING_SIZES.len()];
            // HEAD is where the device stopped: a TAIL it once accepted.
            let head = u32::from(head) * 4 % size.max(4096);
            env.ring = Some(Ring {
                base: page_gpa(page),
                size,
                head,
                tail: head,
            });
        }
        OP_COMMANDS => {
            let count = input.u8()? % 32;
            let Some(mut ring) = env.ring else {
                return Some(());
            };
            for _ in 0..count {
                let dword = input.u32()?;
                env.guest_write(ring.base + u64::from(ring.tail), &dword.to_le_bytes());
                ring.tail = (ring.tail + 4) % ring.size.max(4);
                if let Some(r) = &mut env.ring {
                    r.tail = ring.tail;
                }
            }
        }
        OP_AUDIT => env.audit(),
        _ => {}
    }
    Some(())
}

fn run(data: &[u8], ops: u8) -> Env {
    let mut env = Env::new();
    let mut input = Input(data);
    while step(&mut env, &mut input, ops).is_some() {}
    env
}

/// Target `vgpu_page_tables`: page-table entries, sync points, remaps, resets and
/// translations compared with the reference walk.
pub fn run_page_tables(data: &[u8]) -> Env {
    run(data, PAGE_TABLE_OPS)
}

/// Target `vgpu_audit`: as [`run_page_tables`], plus a ring, commands in it and
/// audits whose plans are checked step by step.
pub fn run_audit(data: &[u8]) -> Env {
    run(data, AUDIT_OPS)
}

/// Builds inputs (seeds, tests).
#[derive(Default)]
pub struct Ops(pub Vec<u8>);

impl Ops {
    pub fn link(mut self, page: u8, slot: u16, sel: u8, flags: u8) -> Self {
        self.0.push(OP_PTE_LINK);
        self.0.push(page);
        self.0.extend(slot.to_le_bytes());
        self.0.extend([sel, flags]);
        self
    }
    pub fn raw(mut self, page: u8, slot: u16, raw: u64) -> Self {
        self.0.push(OP_PTE_RAW);
        self.0.push(page);
        self.0.extend(slot.to_le_bytes());
        self.0.extend(raw.to_le_bytes());
        self
    }
    pub fn bytes(mut self, page: u8, off: u16, data: &[u8]) -> Self {
        self.0.push(OP_BYTES);
        self.0.push(page);
        self.0.extend(off.to_le_bytes());
        self.0.push(data.len() as u8);
        self.0.extend(data);
        self
    }
    pub fn op(mut self, op: u8) -> Self {
        self.0.push(op);
        self
    }
    pub fn with(mut self, op: u8, arg: u8) -> Self {
        self.0.extend([op, arg]);
        self
    }
    pub fn check(mut self, idx: [u16; 4], off: u16, write: bool) -> Self {
        self.0.push(OP_CHECK);
        for i in idx {
            self.0.extend(i.to_le_bytes());
        }
        self.0.extend(off.to_le_bytes());
        self.0.push(u8::from(write));
        self
    }
    pub fn check_va(mut self, va: u64, write: bool) -> Self {
        self.0.push(OP_CHECK_VA);
        self.0.extend(va.to_le_bytes());
        self.0.push(u8::from(write));
        self
    }
    pub fn ring(mut self, page: u8, size_sel: u8, head_dwords: u16) -> Self {
        self.0.extend([OP_RING, page, size_sel]);
        self.0.extend(head_dwords.to_le_bytes());
        self
    }
    pub fn commands(mut self, dwords: &[u32]) -> Self {
        for chunk in dwords.chunks(31) {
            self.0.extend([OP_COMMANDS, chunk.len() as u8]);
            for d in chunk {
                self.0.extend(d.to_le_bytes());
            }
        }
        self
    }
}

/// Command dwords (SPEC.md encoding): the device crate's own encoders.
pub use umdev_vgpu::encode as cmd;
