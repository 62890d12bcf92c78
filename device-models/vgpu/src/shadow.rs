//! Shadow page tables: the device's validated copy of the guest's per-context
//! page tables.
//!
//! Every guest page-table page in use is write-tracked and has one shadow table,
//! keyed by (gfn, level) so a page used at two levels is two tables. A shadow
//! entry is either empty, a link to a child shadow table, a validated leaf
//! translation, or a recorded reason why the guest's entry cannot be used. Links
//! are refcounted: a table shared by several parents or contexts lives while any
//! of them points at it; the last unlink frees it, recursively, and untracks its
//! page. Changes arrive as `track_write` events and re-validate exactly the entry
//! written.

use std::collections::HashMap;

use umdev::memory::GuestMemory;
use umdev::pagetrack::{write_entries, Gfn, PageTrackNotifier, PageTracker};

use crate::regs::*;

/// Where a GPU page lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Guest-physical address.
    Ram(u64),
    /// Offset in VRAM.
    Vram(u64),
}

impl Target {
    pub fn offset(self, by: u64) -> Target {
        match self {
            Target::Ram(a) => Target::Ram(a + by),
            Target::Vram(a) => Target::Vram(a + by),
        }
    }
}

/// A validated leaf: the page and whether the guest allowed writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub target: Target,
    pub writable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    Empty,
    Table(Gfn),
    Page(Translation),
    /// The guest's entry is present but unusable; the fault reason.
    Bad(u8),
}

struct Table {
    refs: u32,
    entries: Box<[Entry]>,
}

/// Checks what a leaf or GGTT entry may point at.
#[derive(Clone)]
pub struct TargetCheck {
    pub memory: GuestMemory,
    pub vram_size: u64,
}

impl TargetCheck {
    /// Validates a present leaf entry.
    pub fn leaf(&self, raw: u64) -> Result<Translation, u8> {
        let addr = raw & PTE_ADDR_MASK;
        let target = if raw & PTE_VRAM != 0 {
            if addr
                .checked_add(PAGE_SIZE)
                .is_none_or(|end| end > self.vram_size)
            {
                return Err(FAULT_BAD_TARGET);
            }
            Target::Vram(addr)
        } else {
            if !self.memory.covers(addr, PAGE_SIZE) {
                return Err(FAULT_BAD_TARGET);
            }
            Target::Ram(addr)
        };
        Ok(Translation {
            target,
            writable: raw & PTE_WRITABLE != 0,
        })
    }
}

/// Most shadow tables alive at once (each costs a 4 KiB tracked snapshot and a
/// shadow of 512 entries).
pub const DEFAULT_MAX_TABLES: usize = 4096;

pub struct ShadowPageTables {
    tables: HashMap<(Gfn, u8), Table>,
    tracker: PageTracker,
    check: TargetCheck,
    max_tables: usize,
    /// Bumped whenever every table is dropped at once; a context whose root
    /// reference is from an older epoch attaches afresh.
    epoch: u64,
    /// `GuestMemory::regions_generation` when the tables were last checked
    /// against the regions.
    regions_generation: u64,
}

impl ShadowPageTables {
    pub fn new(tracker: PageTracker, check: TargetCheck) -> Self {
        ShadowPageTables {
            tables: HashMap::new(),
            tracker,
            check,
            max_tables: DEFAULT_MAX_TABLES,
            epoch: 0,
            regions_generation: 0,
        }
    }

    pub fn set_max_tables(&mut self, max: usize) {
        self.max_tables = max;
    }

    /// Shadow tables alive.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// References to the table at (gfn, level), 0 if it does not exist.
    pub fn refs(&self, gfn: Gfn, level: u8) -> u32 {
        self.tables.get(&(gfn, level)).map_or(0, |t| t.refs)
    }

    /// Takes a reference on the root table at `root_gpa` for a context.
    pub fn attach_root(&mut self, root_gpa: u64) -> Result<Gfn, u8> {
        if root_gpa == 0 || !root_gpa.is_multiple_of(PAGE_SIZE) {
            return Err(FAULT_NO_ROOT);
        }
        let gfn = root_gpa / PAGE_SIZE;
        if !self.check.memory.is_host_mapped(root_gpa, PAGE_SIZE) {
            return Err(FAULT_NO_ROOT);
        }
        self.attach(gfn, PT_LEVELS).map_err(|_| FAULT_NO_ROOT)?;
        Ok(gfn)
    }

    pub fn detach_root(&mut self, gfn: Gfn) {
        self.detach(gfn, PT_LEVELS);
    }

    fn attach(&mut self, gfn: Gfn, level: u8) -> Result<(), u8> {
        if let Some(t) = self.tables.get_mut(&(gfn, level)) {
            t.refs += 1;
            return Ok(());
        }
        self.build(gfn, level)
    }

    /// Creates the shadow of the table at `gfn`: tracks the page first (so a write
    /// racing the read below is reported later), then validates every entry.
    fn build(&mut self, gfn: Gfn, level: u8) -> Result<(), u8> {
        if self.tables.len() >= self.max_tables {
            return Err(FAULT_BUDGET);
        }
        self.tracker.track(gfn).map_err(|_| FAULT_BAD_TABLE)?;
        let mut page = [0u8; PAGE_SIZE as usize];
        if self.check.memory.peek(gfn * PAGE_SIZE, &mut page).is_err() {
            let _ = self.tracker.untrack(gfn);
            return Err(FAULT_BAD_TABLE);
        }
        self.tables.insert(
            (gfn, level),
            Table {
                refs: 1,
                entries: vec![Entry::Empty; PT_ENTRIES].into_boxed_slice(),
            },
        );
        for (i, raw) in page.chunks_exact(8).enumerate() {
            let raw = u64::from_le_bytes(raw.try_into().unwrap_or_default());
            if raw & PTE_PRESENT != 0 {
                self.set_entry(gfn, level, i, raw);
            }
        }
        Ok(())
    }

    /// Drops a reference; the last one frees the table, unlinks its children and
    /// untracks its page.
    fn detach(&mut self, gfn: Gfn, level: u8) {
        let Some(t) = self.tables.get_mut(&(gfn, level)) else {
            return;
        };
        t.refs -= 1;
        if t.refs > 0 {
            return;
        }
        let Some(t) = self.tables.remove(&(gfn, level)) else {
            return;
        };
        for e in t.entries.iter() {
            if let Entry::Table(child) = e {
                self.detach(*child, level - 1);
            }
        }
        let _ = self.tracker.untrack(gfn);
    }

    /// Re-validates entry `index` of table (gfn, level) from the guest's `raw`.
    fn set_entry(&mut self, gfn: Gfn, level: u8, index: usize, raw: u64) {
        let new = self.validate(level, raw);
        let Some(t) = self.tables.get_mut(&(gfn, level)) else {
            // The table went away while its children were built (a cycle through
            // a failing build); drop the link just made.
            if let Entry::Table(child) = new {
                self.detach(child, level - 1);
            }
            return;
        };
        let old = std::mem::replace(&mut t.entries[index], new);
        // Link the new child before unlinking the old: a child that merely moved
        // between entries stays alive.
        if let Entry::Table(child) = old {
            self.detach(child, level - 1);
        }
    }

    fn validate(&mut self, level: u8, raw: u64) -> Entry {
        if raw & PTE_PRESENT == 0 {
            return Entry::Empty;
        }
        if level == 1 {
            return match self.check.leaf(raw) {
                Ok(t) => Entry::Page(t),
                Err(r) => Entry::Bad(r),
            };
        }
        let addr = raw & PTE_ADDR_MASK;
        if raw & PTE_VRAM != 0 || !self.check.memory.is_host_mapped(addr, PAGE_SIZE) {
            return Entry::Bad(FAULT_BAD_TABLE);
        }
        let child = addr / PAGE_SIZE;
        match self.attach(child, level - 1) {
            Ok(()) => Entry::Table(child),
            Err(r) => Entry::Bad(r),
        }
    }

    /// A tracked write: `new` is the 8-byte entry now at `gpa`.
    pub fn on_write(&mut self, gpa: u64, new: u64) {
        let gfn = gpa / PAGE_SIZE;
        let index = ((gpa % PAGE_SIZE) / 8) as usize;
        for level in 1..=PT_LEVELS {
            if self.tables.contains_key(&(gfn, level)) {
                self.set_entry(gfn, level, index, new);
            }
        }
    }

    /// A tracked write of any length (`track_write`): every 8-byte entry it
    /// touches is re-validated, from `new` where the write covers the entry and
    /// from guest memory (as it is now) where it covers only part of it.
    /// Returns the entries applied.
    pub fn on_write_bytes(&mut self, gpa: u64, new: &[u8]) -> usize {
        let mut applied = 0;
        for (at, value) in write_entries(gpa, new) {
            let value = value.or_else(|| {
                let mut b = [0u8; 8];
                self.check.memory.peek(at, &mut b).ok()?;
                Some(u64::from_le_bytes(b))
            });
            if let Some(value) = value {
                self.on_write(at, value);
                applied += 1;
            }
        }
        applied
    }

    /// The gfns of the tables at `level` that translate some of
    /// `[start, end)` in the tree rooted at `root` (ascending, once each): what
    /// a range TLB invalidation brings up to date, level by level from the root.
    pub fn tables_covering(&self, root: Gfn, level: u8, start: u64, end: u64) -> Vec<Gfn> {
        let mut out = Vec::new();
        if start < end && (1..=PT_LEVELS).contains(&level) {
            self.collect_tables(root, PT_LEVELS, 0, level, (start, end), &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn collect_tables(
        &self,
        gfn: Gfn,
        level: u8,
        base: u64,
        want: u8,
        (start, end): (u64, u64),
        out: &mut Vec<Gfn>,
    ) {
        let Some(t) = self.tables.get(&(gfn, level)) else {
            return;
        };
        if level == want {
            out.push(gfn);
            return;
        }
        // Each entry of a table at `level` spans this much address space.
        let span = 1u64 << (12 + 9 * (u64::from(level) - 1));
        let first = (start.max(base) - base) / span;
        let last = ((end - 1).min(base + span * PT_ENTRIES as u64 - 1) - base) / span;
        for i in first..=last {
            if let Some(Entry::Table(child)) = t.entries.get(i as usize) {
                let child_base = base + i * span;
                self.collect_tables(*child, level - 1, child_base, want, (start, end), out);
            }
        }
    }

    /// Guest memory under `[gfn, gfn+pages)` is gone (its tracking with it). If any
    /// table lived there, every shadow is dropped: contexts rebuild theirs from the
    /// guest's tables at their next sync point, which also covers the memory
    /// coming back with the same contents (no guest write would re-validate it).
    pub fn on_remove_region(&mut self, gfn: Gfn, pages: u64) {
        let end = gfn.saturating_add(pages);
        if self.tables.keys().any(|(g, _)| *g >= gfn && *g < end) {
            self.reset();
        }
    }

    /// A sync point's look at the DMA regions (`generation` from
    /// `GuestMemory::regions_generation`). Entries were validated against the
    /// regions as they were: a leaf or a lower table that was unmapped then is
    /// BAD_TARGET / BAD_TABLE in the shadow, also once the memory is back. If
    /// the regions changed, every shadow is dropped and rebuilt from the
    /// guest's tables.
    pub fn regions_changed(&mut self, generation: u64) {
        if generation != self.regions_generation {
            self.regions_generation = generation;
            if !self.tables.is_empty() {
                self.reset();
            }
        }
    }

    /// Translates `va` through the tree rooted at `root`, for a read or a write.
    pub fn translate(&self, root: Gfn, va: u64, write: bool) -> Result<Translation, u8> {
        if va >= VA_LIMIT {
            return Err(FAULT_NOT_PRESENT);
        }
        let mut gfn = root;
        for level in (1..=PT_LEVELS).rev() {
            let table = self.tables.get(&(gfn, level)).ok_or(FAULT_BAD_TABLE)?;
            match table.entries[pt_index(va, level)] {
                Entry::Empty => return Err(FAULT_NOT_PRESENT),
                Entry::Bad(r) => return Err(r),
                Entry::Table(child) if level > 1 => gfn = child,
                Entry::Page(t) if level == 1 => {
                    if write && !t.writable {
                        return Err(FAULT_READ_ONLY);
                    }
                    return Ok(Translation {
                        target: t.target.offset(va % PAGE_SIZE),
                        writable: t.writable,
                    });
                }
                _ => return Err(FAULT_BAD_TABLE),
            }
        }
        Err(FAULT_BAD_TABLE)
    }

    /// Translates the pages of `[va, end)` that one leaf table maps (from `va`
    /// to the end of its table or `end`), walking the upper levels once:
    /// `each(page_va, translation)` for every page in order (the first one's
    /// translation at `va`'s offset in its page), then the address where the
    /// next leaf table starts (or `end`). A page that does not translate stops
    /// it with `fault(reason, address)`; so does an error from `each`.
    pub fn translate_span<E>(
        &self,
        root: Gfn,
        va: u64,
        end: u64,
        write: bool,
        fault: impl Fn(u8, u64) -> E,
        mut each: impl FnMut(u64, Translation) -> Result<(), E>,
    ) -> Result<u64, E> {
        if va >= VA_LIMIT {
            return Err(fault(FAULT_NOT_PRESENT, va));
        }
        let mut gfn = root;
        for level in (2..=PT_LEVELS).rev() {
            let table = self
                .tables
                .get(&(gfn, level))
                .ok_or_else(|| fault(FAULT_BAD_TABLE, va))?;
            gfn = match table.entries[pt_index(va, level)] {
                Entry::Empty => return Err(fault(FAULT_NOT_PRESENT, va)),
                Entry::Bad(r) => return Err(fault(r, va)),
                Entry::Table(child) => child,
                Entry::Page(_) => return Err(fault(FAULT_BAD_TABLE, va)),
            };
        }
        let leaf = self
            .tables
            .get(&(gfn, 1))
            .ok_or_else(|| fault(FAULT_BAD_TABLE, va))?;
        let table_end = (va | (PAGE_SIZE * 512 - 1)).saturating_add(1);
        let stop = end.min(table_end);
        let mut cur = va;
        while cur < stop {
            match leaf.entries[pt_index(cur, 1)] {
                Entry::Page(t) if !write || t.writable => each(
                    cur,
                    Translation {
                        target: t.target.offset(cur % PAGE_SIZE),
                        writable: t.writable,
                    },
                )?,
                Entry::Page(_) => return Err(fault(FAULT_READ_ONLY, cur)),
                Entry::Empty => return Err(fault(FAULT_NOT_PRESENT, cur)),
                Entry::Bad(r) => return Err(fault(r, cur)),
                Entry::Table(_) => return Err(fault(FAULT_BAD_TABLE, cur)),
            }
            cur = (cur - cur % PAGE_SIZE).saturating_add(PAGE_SIZE);
        }
        Ok(stop)
    }

    /// Drops every table and its tracking.
    pub fn reset(&mut self) {
        for ((gfn, _), _) in self.tables.drain() {
            let _ = self.tracker.untrack(gfn);
        }
        self.epoch += 1;
    }
}

/// Applies a tracker's reports to a shadow: what a vGPU's notifier does,
/// without the device around it (its tests and fuzz harness). Register it with
/// [`PageTracker::register`] and keep the guard beside the shadow.
pub struct ShadowNotifier(pub std::sync::Arc<std::sync::Mutex<ShadowPageTables>>);

impl PageTrackNotifier for ShadowNotifier {
    fn track_write(&self, gpa: u64, new: &[u8]) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.on_write_bytes(gpa, new);
    }
    fn track_remove_region(&self, gfn: Gfn, nr_pages: u64) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.on_remove_region(gfn, nr_pages);
    }
}

#[cfg(test)]
mod tests;
