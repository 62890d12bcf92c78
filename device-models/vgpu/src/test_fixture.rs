//! A mock device context for the crate's unit tests: the device's set-up minus
//! the PCI function. Guest RAM is one memfd ([`MappedMemfd`]) mapped as one DMA
//! region at [`RAM_GPA`]; a scan [`PageTracker`] feeds a [`ShadowPageTables`]
//! through a notifier exactly as the device's does; VRAM is 1 MiB. Helpers build
//! 4-level page tables in that RAM (writing it as the guest's CPU would, through
//! the mapping), write ring commands and run `audit_segment` over a ring.
//!
//! [`Gpu`] is one context ready for command tests: a root with a fixed set of
//! mappings (see the `*_VA` constants), a ring of one page, attached.

use std::cell::Cell;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use umdev::memory::{DmaRegion, GuestMemory, MappedMemfd};
use umdev::pagetrack::{Gfn, NotifierRegistration, PageTracker, Policy, SourceKind};

use crate::command::{audit_segment, AuditContext, Cursor, Fault, Step};
use crate::encode::pte;
use crate::regs::*;
use crate::shadow::{ShadowNotifier, ShadowPageTables, TargetCheck, Translation};
use crate::vram::Vram;

/// Guest-physical base of guest RAM.
pub const RAM_GPA: u64 = 0x10_0000;
pub const RAM_PAGES: u64 = 64;
pub const RAM_SIZE: u64 = RAM_PAGES * PAGE_SIZE;
/// First guest-physical address after guest RAM (nothing is mapped there).
pub const RAM_END: u64 = RAM_GPA + RAM_SIZE;
pub const VRAM_SIZE: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Maps `file` as a DMA region of `size` bytes at `gpa` in `memory`.
fn map_region(memory: &GuestMemory, gpa: u64, size: u64, file: &MappedMemfd) {
    let fd = OwnedFd::from(file.file().try_clone().expect("dup memfd"));
    let region = DmaRegion::mapped(gpa, size, fd, 0, true, true).expect("map region");
    memory
        .with_regions(|r| r.insert(region))
        .expect("insert region");
}

pub struct Fixture {
    /// The guest's view of its RAM.
    pub ram: MappedMemfd,
    pub memory: GuestMemory,
    pub tracker: PageTracker,
    pub vram: Vram,
    shadow: Arc<Mutex<ShadowPageTables>>,
    /// The shadow's notifier, registered while the fixture lives.
    _registration: NotifierRegistration,
    /// Next page [`alloc_pages`](Self::alloc_pages) hands out (page 0 of RAM is
    /// never handed out).
    next_page: Cell<u64>,
}

impl Fixture {
    pub fn new() -> Fixture {
        let memory = GuestMemory::new(16);
        let ram = MappedMemfd::new("vgpu-test-ram", RAM_SIZE as usize).expect("memfd");
        map_region(&memory, RAM_GPA, RAM_SIZE, &ram);
        memory.set_bus_master(true);
        let vram = Vram::new(VRAM_SIZE).expect("VRAM");
        let tracker = PageTracker::with_source(memory.clone(), SourceKind::Scan, Policy::Strict);
        let check = TargetCheck {
            memory: memory.clone(),
            vram_size: vram.size(),
        };
        let mut shadow = ShadowPageTables::new(tracker.clone(), check);
        // The regions as they are now are the ones the shadow validates against.
        shadow.regions_changed(memory.regions_generation());
        let shadow = Arc::new(Mutex::new(shadow));
        let registration = tracker.register(Arc::new(ShadowNotifier(shadow.clone())));
        Fixture {
            ram,
            memory,
            tracker,
            vram,
            shadow,
            _registration: registration,
            next_page: Cell::new(1),
        }
    }

    /// The shadow. Not to be held across [`sync`](Self::sync) or anything
    /// else that reaches the notifier.
    pub fn shadow(&self) -> MutexGuard<'_, ShadowPageTables> {
        lock(&self.shadow)
    }

    /// `pages` fresh (zeroed) contiguous pages of guest RAM.
    pub fn alloc_pages(&self, pages: u64) -> u64 {
        let first = self.next_page.get();
        assert!(first + pages <= RAM_PAGES, "test RAM exhausted");
        self.next_page.set(first + pages);
        RAM_GPA + first * PAGE_SIZE
    }

    pub fn alloc_page(&self) -> u64 {
        self.alloc_pages(1)
    }

    /// Where `[gpa, gpa+len)` of guest RAM is in this process (checked to lie
    /// in RAM and to be aligned to `align`).
    fn host(&self, gpa: u64, len: u64, align: u64) -> *mut u8 {
        assert!(
            gpa >= RAM_GPA && gpa.checked_add(len).is_some_and(|e| e <= RAM_END),
            "{gpa:#x}+{len:#x} is not test RAM"
        );
        assert!(gpa.is_multiple_of(align), "{gpa:#x} is misaligned");
        self.ram.as_ptr().wrapping_add((gpa - RAM_GPA) as usize)
    }

    /// A guest CPU's 8-byte store.
    pub fn write_u64(&self, gpa: u64, value: u64) {
        let p = self.host(gpa, 8, 8).cast::<u64>();
        // SAFETY: `host` checked that the 8 bytes lie in `self.ram`'s mapping,
        // which lives as long as `self`, and are 8-byte aligned (the mapping is
        // page aligned). Volatile: the device reads the same pages through its
        // own mapping.
        unsafe { p.write_volatile(value.to_le()) }
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        let p = self.host(gpa, 8, 8).cast::<u64>();
        // SAFETY: as in `write_u64`: 8 aligned bytes inside our live mapping.
        u64::from_le(unsafe { p.read_volatile() })
    }

    /// A guest CPU's 4-byte store.
    pub fn write_u32(&self, gpa: u64, value: u32) {
        let p = self.host(gpa, 4, 4).cast::<u32>();
        // SAFETY: `host` checked that the 4 bytes lie in our live mapping and
        // are 4-byte aligned.
        unsafe { p.write_volatile(value.to_le()) }
    }

    pub fn write_dwords(&self, gpa: u64, dwords: &[u32]) {
        for (i, d) in dwords.iter().enumerate() {
            self.write_u32(gpa + 4 * i as u64, *d);
        }
    }

    /// Maps `va` under the guest tables rooted at `root` to the leaf entry `leaf`
    /// (e.g. `encode::pte(..)`), making any missing lower table from a fresh page.
    /// A guest write like any other: the shadow sees it at the next sync point.
    pub fn map(&self, root: u64, va: u64, leaf: u64) {
        let mut table = root;
        for level in (2..=PT_LEVELS).rev() {
            let at = table + 8 * pt_index(va, level) as u64;
            let mut entry = self.read_u64(at);
            if entry & PTE_PRESENT == 0 {
                entry = pte(self.alloc_page(), false, true);
                self.write_u64(at, entry);
            }
            table = entry & PTE_ADDR_MASK;
        }
        self.write_u64(table + 8 * pt_index(va, 1) as u64, leaf);
    }

    /// Guest-physical address of the entry translating `va` at `level` (4 is the
    /// root's), walking the guest's tables as they are in RAM.
    pub fn entry_gpa(&self, root: u64, va: u64, level: u8) -> u64 {
        let mut table = root;
        for l in (level + 1..=PT_LEVELS).rev() {
            table = self.read_u64(table + 8 * pt_index(va, l) as u64) & PTE_ADDR_MASK;
        }
        table + 8 * pt_index(va, level) as u64
    }

    /// Guest frame of the table used at `level` for `va`.
    pub fn table_gfn(&self, root: u64, va: u64, level: u8) -> Gfn {
        self.entry_gpa(root, va, level) / PAGE_SIZE
    }

    /// A sync point, as the device's: guest writes to tracked tables reach the
    /// shadow, then the shadow looks at the DMA regions. Returns the entries
    /// the tracker reported.
    pub fn sync(&self) -> usize {
        let n = self.tracker.sync();
        self.shadow()
            .regions_changed(self.memory.regions_generation());
        n
    }

    /// Takes a context's reference on the root table at `root_gpa`.
    pub fn attach(&self, root_gpa: u64) -> Gfn {
        self.shadow().attach_root(root_gpa).expect("attach root")
    }

    pub fn translate(&self, root: Gfn, va: u64, write: bool) -> Result<Translation, u8> {
        self.shadow().translate(root, va, write)
    }

    /// Another memfd mapped as a DMA region of `pages` pages at `gpa` (returned
    /// so that it outlives the test's use of it).
    pub fn map_extra(&self, gpa: u64, pages: u64) -> MappedMemfd {
        let size = pages * PAGE_SIZE;
        let file = MappedMemfd::new("vgpu-test-extra", size as usize).expect("memfd");
        map_region(&self.memory, gpa, size, &file);
        file
    }

    /// DMA_UNMAP of all of guest RAM, as the device's server does it: the region
    /// goes, then the tracker (and through it the shadow) hears of it.
    pub fn unmap_ram(&self) {
        let removed = self
            .memory
            .with_regions(|r| r.remove_range(RAM_GPA, RAM_SIZE))
            .expect("unmap RAM");
        self.tracker.remove_region(RAM_GPA, RAM_SIZE);
        drop(removed);
    }

    /// A ring of one page of fresh RAM, empty at offset 0.
    pub fn ring(&self) -> Ring {
        Ring {
            base: self.alloc_page(),
            size: PAGE_SIZE as u32,
            tail: 0,
        }
    }

    /// Writes `cmd` at the ring's tail (wrapping) and moves the tail past it.
    pub fn push(&self, ring: &mut Ring, cmd: &[u32]) {
        for d in cmd {
            self.write_u32(ring.base + u64::from(ring.tail), *d);
            ring.tail = (ring.tail + 4) % ring.size;
        }
    }

    /// `audit_segment` over `ring` from `cursor`, for the context rooted at
    /// `root`, with `rings` the rings no command may write.
    pub fn audit(
        &self,
        root: Gfn,
        ring: &Ring,
        rings: &[(u64, u64)],
        cursor: &mut Cursor,
    ) -> Result<(Vec<Step>, bool), Fault> {
        let shadow = self.shadow();
        let ctx = AuditContext {
            shadow: &shadow,
            root,
            memory: &self.memory,
            vram: &self.vram,
            ring_base: ring.base,
            ring_size: ring.size,
            rings,
        };
        audit_segment(&ctx, cursor)
    }
}

/// A context's ring: where it is and where the driver writes next.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub base: u64,
    pub size: u32,
    pub tail: u32,
}

/// [`Gpu`]'s mappings: four writable pages of contiguous RAM.
pub const DATA_VA: u64 = 0x40_0000;
pub const DATA_PAGES: u64 = 4;
/// One read-only page of RAM.
pub const RO_VA: u64 = 0x50_0000;
/// VRAM offsets 0 and 0x1000, writable.
pub const VRAM_VA: u64 = 0x60_0000;
/// The context's own ring page, writable in the tables.
pub const RING_VA: u64 = 0x70_0000;
/// Two writable pages of RAM for batch buffers.
pub const BATCH_VA: u64 = 0x80_0000;
pub const BATCH_PAGES: u64 = 2;
/// Nothing is mapped here (its tables exist: the leaf entry is absent).
pub const UNMAPPED_VA: u64 = 0x90_0000;

/// One context set up for command audits.
pub struct Gpu {
    pub fx: Fixture,
    pub root_gpa: u64,
    pub root: Gfn,
    pub ring: Ring,
    /// Rings no command may write: this context's.
    pub rings: Vec<(u64, u64)>,
    /// Guest-physical addresses behind DATA_VA, RO_VA and BATCH_VA.
    pub data: u64,
    pub ro: u64,
    pub batch: u64,
}

impl Gpu {
    pub fn new() -> Gpu {
        let fx = Fixture::new();
        let root_gpa = fx.alloc_page();
        let ring = fx.ring();
        let data = fx.alloc_pages(DATA_PAGES);
        for i in 0..DATA_PAGES {
            let off = i * PAGE_SIZE;
            fx.map(root_gpa, DATA_VA + off, pte(data + off, false, true));
        }
        let ro = fx.alloc_page();
        fx.map(root_gpa, RO_VA, pte(ro, false, false));
        fx.map(root_gpa, VRAM_VA, pte(0, true, true));
        fx.map(root_gpa, VRAM_VA + PAGE_SIZE, pte(PAGE_SIZE, true, true));
        fx.map(root_gpa, RING_VA, pte(ring.base, false, true));
        let batch = fx.alloc_pages(BATCH_PAGES);
        for i in 0..BATCH_PAGES {
            let off = i * PAGE_SIZE;
            fx.map(root_gpa, BATCH_VA + off, pte(batch + off, false, true));
        }
        let root = fx.attach(root_gpa);
        Gpu {
            rings: vec![(ring.base, u64::from(ring.size))],
            fx,
            root_gpa,
            root,
            ring,
            data,
            ro,
            batch,
        }
    }

    /// Writes `cmds` at the ring's tail; returns a cursor over just them (HEAD
    /// the old tail, TAIL the new).
    pub fn submit(&mut self, cmds: &[Vec<u32>]) -> Cursor {
        let head = self.ring.tail;
        for c in cmds {
            self.fx.push(&mut self.ring, c);
        }
        Cursor::new(head, self.ring.tail)
    }

    /// Audits the next segment from `cursor`.
    pub fn audit(&self, cursor: &mut Cursor) -> Result<(Vec<Step>, bool), Fault> {
        self.fx.audit(self.root, &self.ring, &self.rings, cursor)
    }

    /// Submits `cmds` and audits them as one segment (no TLB_INVALIDATE).
    pub fn run(&mut self, cmds: &[Vec<u32>]) -> Result<Vec<Step>, Fault> {
        let mut cursor = self.submit(cmds);
        let (plan, more) = self.audit(&mut cursor)?;
        assert!(!more, "a TLB_INVALIDATE split the submission");
        Ok(plan)
    }

    /// Writes `cmds` into batch memory at `BATCH_VA + offset`; returns that GPU
    /// address.
    pub fn write_batch(&self, offset: u64, cmds: &[Vec<u32>]) -> u64 {
        let dwords: Vec<u32> = cmds.concat();
        self.fx.write_dwords(self.batch + offset, &dwords);
        BATCH_VA + offset
    }
}
