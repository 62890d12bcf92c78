//! Write tracking of guest pages with KVM's page-track semantics, for a backend
//! that lives outside the VMM and so cannot trap guest writes itself.
//!
//! Users [`PageTracker::track`] and [`PageTracker::untrack`] gfns (refcounted: many
//! users may track one page) and register [`TrackNotifier`]s. Writes are
//! *detected*: every tracked page has a snapshot, and at a sync point
//! ([`PageTracker::sync`]) the pages a [`WriteSource`] names as candidates are
//! compared with it. Each changed naturally aligned 8-byte entry becomes one
//! `track_write(gpa, new_bytes)`, in address order, after the write has landed.
//! When DMA_UNMAP takes memory from under tracked pages, `track_remove_region`
//! fires once for the region and the tracking state there is dropped.
//!
//! Sources: [`SourceKind::Scan`] compares every tracked page (works with every
//! VMM); [`SourceKind::DirtyBitmap`] compares only pages the VMM marked in a
//! shared bitmap; [`SourceKind::Userfault`] write-protects tracked pages through
//! the VMM's userfaultfd and compares only pages that took a write fault. Regions
//! a source has no hint for are scanned, so no source ever loses a write.

mod bitmap;
mod uffd;

pub use bitmap::DirtyBitmap;
pub use uffd::{register_write_protect, UffdRegistration, UserfaultSource};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tracing::debug;

use crate::memory::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;
/// Tracking granularity within a page: naturally aligned 8-byte entries, the size
/// of a page-table entry.
pub const ENTRY_SIZE: usize = 8;

/// Guest frame number.
pub type Gfn = u64;

/// Receives what the tracker detects. Called without tracker locks held, so a
/// notifier may track and untrack pages itself.
pub trait TrackNotifier: Send + Sync {
    /// `new` is the 8-byte entry at `gpa` as it is now.
    fn track_write(&self, gpa: u64, new: &[u8; ENTRY_SIZE]);
    /// Memory under `[gfn, gfn+nr_pages)` went away; tracking there is gone.
    fn track_remove_region(&self, gfn: Gfn, nr_pages: u64);
}

/// Names a registered notifier, for removal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierId(u64);

/// How writes are detected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SourceKind {
    #[default]
    Scan,
    DirtyBitmap,
    Userfault,
}

/// A page-track source name that is not one of ours.
#[derive(Debug, thiserror::Error)]
#[error("unknown page-track source {0:?} (scan, dirty-bitmap, uffd)")]
pub struct UnknownSource(pub String);

impl std::str::FromStr for SourceKind {
    type Err = UnknownSource;
    fn from_str(s: &str) -> Result<Self, UnknownSource> {
        match s {
            "scan" => Ok(SourceKind::Scan),
            "dirty-bitmap" => Ok(SourceKind::DirtyBitmap),
            "uffd" => Ok(SourceKind::Userfault),
            _ => Err(UnknownSource(s.into())),
        }
    }
}

/// What happens to a write-protected page that takes write faults (uffd source).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Every fault is resolved at once: the page is compared and reported as soon
    /// as the write lands, then protected again.
    Strict,
    /// After `threshold` faults between two syncs a page is left writable and only
    /// compared at sync points (GVT-g's out-of-sync pages).
    OutOfSync { threshold: u32 },
    /// Per page: out-of-sync while it is written often, strict again after
    /// `quiet_syncs` sync points without a change.
    Adaptive { threshold: u32, quiet_syncs: u32 },
}

impl Default for Policy {
    fn default() -> Self {
        Policy::Adaptive {
            threshold: 4,
            quiet_syncs: 8,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrackError {
    #[error("gfn {0:#x} is not in fd-mapped guest memory")]
    NotMapped(Gfn),
    #[error("gfn {0:#x} is not tracked")]
    NotTracked(Gfn),
    #[error("gfn {0:#x} is tracked too many times")]
    RefcountOverflow(Gfn),
    #[error("already {0} pages tracked")]
    TooManyPages(usize),
    #[error("{what} {gpa:#x}+{size:#x} is not page aligned")]
    Unaligned {
        what: &'static str,
        gpa: u64,
        size: u64,
    },
    #[error("dirty bitmap offset {0:#x} is not 8-byte aligned")]
    BitmapOffset(u64),
    #[error("the shared fd: {0}")]
    Fd(#[source] std::io::Error),
    #[error("{what} range wraps the address space")]
    Wraps { what: &'static str },
    #[error("the bitmap file is not a regular file or memfd")]
    BitmapNotAFile,
    #[error("bitmap file holds {len:#x} bytes, {needed:#x} needed for {size:#x} bytes of memory")]
    BitmapTooShort { len: u64, needed: u64, size: u64 },
    #[error("mapping the bitmap: {0}")]
    BitmapMap(#[source] vm_memory::mmap::MmapRegionError),
    #[error(transparent)]
    Guard(#[from] crate::memory::guard::GuardError),
    #[error("the fd is {0}, not a userfaultfd")]
    NotUserfaultfd(std::path::PathBuf),
    #[error("no fault handler for the userfaultfd")]
    NoFaultHandler,
    #[error("a userfaultfd already covers {gpa:#x}+{size:#x}")]
    UffdOverlap { gpa: u64, size: u64 },
    #[error("no fd-mapped DMA region covers {gpa:#x}+{size:#x}")]
    NotHostMapped { gpa: u64, size: u64 },
    #[error("this device's page-track source does not take {0}")]
    Unsupported(&'static str),
}

/// Counters, per tracker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub pages_tracked: u64,
    pub syncs: u64,
    pub pages_compared: u64,
    pub entries_changed: u64,
    pub faults: u64,
    pub source: Option<SourceKind>,
}

/// Where candidates for comparison come from. Implementations narrow the pages a
/// sync must compare; anything they cannot vouch for must be returned.
pub trait WriteSource: Send {
    fn kind(&self) -> SourceKind;
    /// Of the tracked `gfns` (ascending), push those that may have changed.
    fn candidates(&mut self, gfns: &[Gfn], out: &mut Vec<Gfn>);
    /// A page starts being tracked.
    fn tracked(&mut self, _gfn: Gfn) {}
    /// A page stops being tracked.
    fn untracked(&mut self, _gfn: Gfn) {}
    /// A candidate is about to be compared. A source that re-arms its hint for the
    /// page (write protection) must do it here, before the comparison, so a write
    /// is either seen by it or arms the hint again.
    fn prepare_compare(&mut self, _gfn: Gfn) {}
    /// A candidate was compared (and its snapshot refreshed).
    fn compared(&mut self, _gfn: Gfn, _changed: bool) {}
    /// Memory `[gpa, gpa+size)` was unmapped.
    fn region_removed(&mut self, _gpa: u64, _size: u64) {}
    /// The VMM shares a dirty bitmap for a DMA region.
    fn add_bitmap(&mut self, _bitmap: DirtyBitmap) -> Result<(), TrackError> {
        Err(TrackError::Unsupported("a dirty bitmap"))
    }
    /// The VMM shares a userfaultfd for a DMA region.
    fn add_uffd(&mut self, _reg: UffdRegistration) -> Result<(), TrackError> {
        Err(TrackError::Unsupported("a userfaultfd"))
    }
    /// Write faults taken so far.
    fn faults(&self) -> u64 {
        0
    }
    /// The uffd source, which resolves faults as they come.
    fn as_userfault(&mut self) -> Option<&mut UserfaultSource> {
        None
    }
}

/// Compares every tracked page at every sync.
#[derive(Default)]
pub struct ScanSource;

impl WriteSource for ScanSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Scan
    }
    fn candidates(&mut self, gfns: &[Gfn], out: &mut Vec<Gfn>) {
        out.extend_from_slice(gfns);
    }
}

/// Compares the pages the VMM marked dirty; scans regions without a bitmap.
#[derive(Default)]
pub struct DirtyBitmapSource {
    bitmaps: BTreeMap<u64, DirtyBitmap>,
}

impl WriteSource for DirtyBitmapSource {
    fn kind(&self) -> SourceKind {
        SourceKind::DirtyBitmap
    }
    fn candidates(&mut self, gfns: &[Gfn], out: &mut Vec<Gfn>) {
        for &gfn in gfns {
            let gpa = gfn * PAGE_SIZE;
            let bitmap = self
                .bitmaps
                .range(..=gpa)
                .next_back()
                .map(|(_, b)| b)
                .filter(|b| b.covers(gpa));
            match bitmap {
                // `lost` after `take`: a take that met the loss read zero.
                Some(b) => {
                    if b.take(gpa) || b.lost() {
                        out.push(gfn);
                    }
                }
                None => out.push(gfn),
            }
        }
        // A lost bitmap is dropped: its region is scanned from now on.
        self.bitmaps.retain(|&gpa, b| {
            if b.lost() {
                tracing::error!(
                    gpa = format_args!("{gpa:#x}"),
                    "the VMM took the dirty bitmap's memory away (SIGBUS); \
                     its region is scanned from now on"
                );
            }
            !b.lost()
        });
    }
    fn region_removed(&mut self, gpa: u64, size: u64) {
        self.bitmaps.retain(|_, b| !b.within(gpa, size));
    }
    fn add_bitmap(&mut self, bitmap: DirtyBitmap) -> Result<(), TrackError> {
        self.bitmaps.insert(bitmap.gpa(), bitmap);
        Ok(())
    }
}

struct TrackedPage {
    refs: u32,
    snapshot: Box<[u8; PAGE_SIZE as usize]>,
}

struct State {
    pages: BTreeMap<Gfn, TrackedPage>,
    source: Box<dyn WriteSource>,
    max_pages: usize,
    /// Tracked pages the backend itself wrote (through `GuestMemory::write`): no
    /// VMM hint covers those, so they are compared at the next sync whatever the
    /// source.
    self_written: std::collections::BTreeSet<Gfn>,
}

struct Shared {
    memory: GuestMemory,
    state: Mutex<State>,
    /// Held from comparing to delivering: a sync cannot return while changes that
    /// another path (a uffd fault) took are still on their way to the notifiers.
    delivery: Mutex<()>,
    notifiers: RwLock<Vec<(NotifierId, Arc<dyn TrackNotifier>)>>,
    next_notifier: AtomicU64,
    syncs: AtomicU64,
    pages_compared: AtomicU64,
    entries_changed: AtomicU64,
    /// Helper fds (the uffds) for the session's event loop.
    events: Arc<crate::event::EventSet>,
}

/// The write-tracking engine of one device. Cheap to clone; usable from any thread.
#[derive(Clone)]
pub struct PageTracker {
    shared: Arc<Shared>,
}

/// How many times a strict fault handler looks for the write to land.
const STRICT_SPIN: usize = 1000;

/// Most pages one tracker follows (each costs a 4 KiB snapshot).
pub const DEFAULT_MAX_TRACKED_PAGES: usize = 1 << 18;

impl PageTracker {
    pub fn new(memory: GuestMemory, source: Box<dyn WriteSource>) -> Self {
        PageTracker {
            shared: Arc::new(Shared {
                memory,
                state: Mutex::new(State {
                    pages: BTreeMap::new(),
                    source,
                    max_pages: DEFAULT_MAX_TRACKED_PAGES,
                    self_written: Default::default(),
                }),
                delivery: Mutex::new(()),
                notifiers: RwLock::new(Vec::new()),
                next_notifier: AtomicU64::new(1),
                syncs: AtomicU64::new(0),
                pages_compared: AtomicU64::new(0),
                entries_changed: AtomicU64::new(0),
                events: Arc::default(),
            }),
        }
    }

    /// A tracker with the source of `kind`.
    pub fn with_source(memory: GuestMemory, kind: SourceKind, policy: Policy) -> Self {
        let source: Box<dyn WriteSource> = match kind {
            SourceKind::Scan => Box::new(ScanSource),
            SourceKind::DirtyBitmap => Box::new(DirtyBitmapSource::default()),
            SourceKind::Userfault => Box::new(UserfaultSource::new(policy)),
        };
        let tracker = Self::new(memory.clone(), source);
        // The backend's own writes never reach a VMM-side hint: note them.
        let weak = Arc::downgrade(&tracker.shared);
        memory.add_write_observer(Arc::new(move |gpa, len| {
            if let Some(shared) = weak.upgrade() {
                PageTracker { shared }.note_backend_write(gpa, len as u64);
            }
        }));
        if kind == SourceKind::Userfault {
            // Faults are resolved by the event loop serving the tracker's
            // event set, which must not keep the tracker alive.
            let weak = Arc::downgrade(&tracker.shared);
            let sink: uffd::Sink = Arc::new(move |event| {
                if let Some(shared) = weak.upgrade() {
                    PageTracker { shared }.handle_fault_event(event);
                }
            });
            let events = tracker.shared.events.clone();
            if let Some(u) = tracker.state().source.as_userfault() {
                u.set_sink(sink, events);
            }
        }
        tracker
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_max_pages(&self, max: usize) {
        self.state().max_pages = max;
    }

    pub fn source_kind(&self) -> SourceKind {
        self.state().source.kind()
    }

    /// Adds a reference to `gfn`; the first one takes the page's snapshot.
    pub fn track(&self, gfn: Gfn) -> Result<(), TrackError> {
        let mut state = self.state();
        if let Some(page) = state.pages.get_mut(&gfn) {
            page.refs = page
                .refs
                .checked_add(1)
                .ok_or(TrackError::RefcountOverflow(gfn))?;
            return Ok(());
        }
        if state.pages.len() >= state.max_pages {
            return Err(TrackError::TooManyPages(state.pages.len()));
        }
        let gpa = gfn
            .checked_mul(PAGE_SIZE)
            .ok_or(TrackError::NotMapped(gfn))?;
        let mut snapshot = Box::new([0u8; PAGE_SIZE as usize]);
        self.shared
            .memory
            .peek(gpa, &mut snapshot[..])
            .map_err(|_| TrackError::NotMapped(gfn))?;
        state.pages.insert(gfn, TrackedPage { refs: 1, snapshot });
        state.source.tracked(gfn);
        Ok(())
    }

    /// Drops a reference to `gfn`; the last one ends tracking.
    pub fn untrack(&self, gfn: Gfn) -> Result<(), TrackError> {
        let mut state = self.state();
        let page = state
            .pages
            .get_mut(&gfn)
            .ok_or(TrackError::NotTracked(gfn))?;
        page.refs -= 1;
        if page.refs == 0 {
            state.pages.remove(&gfn);
            state.self_written.remove(&gfn);
            state.source.untracked(gfn);
        }
        Ok(())
    }

    pub fn is_tracked(&self, gfn: Gfn) -> bool {
        self.state().pages.contains_key(&gfn)
    }

    /// References held on `gfn` (0 when untracked).
    pub fn refcount(&self, gfn: Gfn) -> u32 {
        self.state().pages.get(&gfn).map_or(0, |p| p.refs)
    }

    pub fn register_notifier(&self, notifier: Arc<dyn TrackNotifier>) -> NotifierId {
        let id = NotifierId(self.shared.next_notifier.fetch_add(1, Ordering::Relaxed));
        self.shared
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push((id, notifier));
        id
    }

    pub fn unregister_notifier(&self, id: NotifierId) -> bool {
        let mut n = self
            .shared
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let before = n.len();
        n.retain(|(i, _)| *i != id);
        n.len() != before
    }

    /// A sync point over every tracked page. Returns the entries reported.
    pub fn sync(&self) -> usize {
        self.sync_range(0, u64::MAX)
    }

    /// The backend wrote `[gpa, gpa+len)`: tracked pages there are compared at the
    /// next sync.
    pub fn note_backend_write(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = gpa.saturating_add(len - 1) / PAGE_SIZE;
        let mut state = self.state();
        let hit: Vec<Gfn> = state.pages.range(first..=last).map(|(&g, _)| g).collect();
        state.self_written.extend(hit);
    }

    /// A sync point over tracked gfns in `[first, first+count)`.
    pub fn sync_range(&self, first: Gfn, count: u64) -> usize {
        let end = first.saturating_add(count);
        let mut events: Vec<(u64, [u8; ENTRY_SIZE])> = Vec::new();
        let _delivery = self
            .shared
            .delivery
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        {
            let mut state = self.state();
            let gfns: Vec<Gfn> = state.pages.range(first..end).map(|(&g, _)| g).collect();
            let mut candidates = Vec::with_capacity(gfns.len());
            state.source.candidates(&gfns, &mut candidates);
            let written: Vec<Gfn> = state.self_written.range(first..end).copied().collect();
            for g in &written {
                state.self_written.remove(g);
            }
            if !written.is_empty() {
                candidates.extend(written);
                candidates.sort_unstable();
                candidates.dedup();
            }
            let mut current = [0u8; PAGE_SIZE as usize];
            for gfn in candidates {
                state.source.prepare_compare(gfn);
                let changed = self.compare(&mut state, gfn, &mut current, &mut events);
                state.source.compared(gfn, changed);
            }
        }
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.deliver(&events);
        events.len()
    }

    /// Compares one tracked page with its snapshot, refreshing it; pushes the
    /// changed entries. Returns whether anything changed.
    fn compare(
        &self,
        state: &mut State,
        gfn: Gfn,
        current: &mut [u8; PAGE_SIZE as usize],
        events: &mut Vec<(u64, [u8; ENTRY_SIZE])>,
    ) -> bool {
        let Some(page) = state.pages.get_mut(&gfn) else {
            return false;
        };
        self.shared.pages_compared.fetch_add(1, Ordering::Relaxed);
        if self
            .shared
            .memory
            .peek(gfn * PAGE_SIZE, &mut current[..])
            .is_err()
        {
            // The region went away under us; remove_region cleans up.
            return false;
        }
        if current[..] == page.snapshot[..] {
            return false;
        }
        let before = events.len();
        for (i, (new, old)) in current
            .chunks_exact(ENTRY_SIZE)
            .zip(page.snapshot.chunks_exact_mut(ENTRY_SIZE))
            .enumerate()
        {
            if new != old {
                old.copy_from_slice(new);
                let mut entry = [0u8; ENTRY_SIZE];
                entry.copy_from_slice(new);
                events.push((gfn * PAGE_SIZE + (i * ENTRY_SIZE) as u64, entry));
            }
        }
        self.shared
            .entries_changed
            .fetch_add((events.len() - before) as u64, Ordering::Relaxed);
        true
    }

    fn notifiers(&self) -> Vec<(NotifierId, Arc<dyn TrackNotifier>)> {
        self.shared
            .notifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn deliver(&self, events: &[(u64, [u8; ENTRY_SIZE])]) {
        if events.is_empty() {
            return;
        }
        let notifiers = self.notifiers();
        for (gpa, entry) in events {
            for (_, n) in &notifiers {
                n.track_write(*gpa, entry);
            }
        }
    }

    /// DMA_UNMAP (or a memory-table change) removed `[gpa, gpa+size)`. If tracked
    /// pages were there, their state is dropped and `track_remove_region` fires
    /// once for the region. Call before replying to the client.
    pub fn remove_region(&self, gpa: u64, size: u64) {
        let first = gpa / PAGE_SIZE;
        let nr = size.div_ceil(PAGE_SIZE);
        let had_tracked = {
            let mut state = self.state();
            let gone: Vec<Gfn> = state
                .pages
                .range(first..first.saturating_add(nr))
                .map(|(&g, _)| g)
                .collect();
            for gfn in &gone {
                state.pages.remove(gfn);
                state.source.untracked(*gfn);
            }
            state.source.region_removed(gpa, size);
            !gone.is_empty()
        };
        if had_tracked {
            debug!(gpa, size, "tracked memory removed");
            let notifiers = self
                .shared
                .notifiers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            for (_, n) in &notifiers {
                n.track_remove_region(first, nr);
            }
        }
    }

    /// Device reset or lost connection: every page untracked, hints dropped.
    pub fn reset(&self) {
        let mut state = self.state();
        let gfns: Vec<Gfn> = state.pages.keys().copied().collect();
        for gfn in gfns {
            state.pages.remove(&gfn);
            state.source.untracked(gfn);
        }
        state.source.region_removed(0, u64::MAX);
    }

    /// Hints cover fd-mapped DMA regions only (the tracker compares through them).
    fn require_host_mapped(&self, gpa: u64, size: u64) -> Result<(), TrackError> {
        if self.shared.memory.is_host_mapped(gpa, size) {
            Ok(())
        } else {
            Err(TrackError::NotHostMapped { gpa, size })
        }
    }

    /// Registers a VMM-shared dirty bitmap (dirty-bitmap source only).
    pub fn add_dirty_bitmap(&self, bitmap: DirtyBitmap) -> Result<(), TrackError> {
        self.require_host_mapped(bitmap.gpa(), bitmap.size())?;
        self.state().source.add_bitmap(bitmap)
    }

    /// Helper fds the session's event loop serves for this tracker (the
    /// userfaultfds' fault readers).
    pub fn event_set(&self) -> &Arc<crate::event::EventSet> {
        &self.shared.events
    }

    /// Registers a VMM-shared userfaultfd (uffd source only).
    pub fn add_uffd(&self, reg: UffdRegistration) -> Result<(), TrackError> {
        self.require_host_mapped(reg.gpa, reg.size)?;
        let mut state = self.state();
        let tracked: Vec<Gfn> = state.pages.keys().copied().collect();
        state.source.add_uffd(reg)?;
        // Pages tracked before the uffd arrived are protected now.
        for gfn in tracked {
            state.source.tracked(gfn);
        }
        Ok(())
    }

    pub fn counters(&self) -> Counters {
        let state = self.state();
        Counters {
            pages_tracked: state.pages.len() as u64,
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            pages_compared: self.shared.pages_compared.load(Ordering::Relaxed),
            entries_changed: self.shared.entries_changed.load(Ordering::Relaxed),
            faults: state.source.faults(),
            source: Some(state.source.kind()),
        }
    }

    fn handle_fault_event(&self, event: uffd::FaultEvent) {
        let strict_gfn = {
            let mut state = self.state();
            let Some(source) = state.source.as_userfault() else {
                return;
            };
            match source.fault(event) {
                Some((gfn, true)) => gfn,
                _ => return,
            }
        };
        // Strict: the writer runs again; report its write as soon as it is visible.
        // If it does not show within the spin, the page stays writable and dirty
        // and the next sync point protects and compares it: nothing is lost.
        let _delivery = self
            .shared
            .delivery
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut events = Vec::new();
        let mut current = [0u8; PAGE_SIZE as usize];
        for _ in 0..STRICT_SPIN {
            let mut state = self.state();
            let differs = match state.pages.get(&strict_gfn) {
                Some(page) => {
                    self.shared
                        .memory
                        .peek(strict_gfn * PAGE_SIZE, &mut current[..])
                        .is_ok()
                        && current[..] != page.snapshot[..]
                }
                None => return,
            };
            if differs {
                state.source.prepare_compare(strict_gfn);
                let changed = self.compare(&mut state, strict_gfn, &mut current, &mut events);
                state.source.compared(strict_gfn, changed);
                break;
            }
            drop(state);
            std::thread::yield_now();
        }
        self.deliver(&events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::DmaRegion;
    use std::os::fd::OwnedFd;

    fn tracker_over_one_page() -> PageTracker {
        let fd = OwnedFd::from(crate::memory::memfd("pt", PAGE_SIZE).unwrap());
        let memory = GuestMemory::new(4);
        let region = DmaRegion::mapped(0x1000, PAGE_SIZE, fd, 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        PageTracker::with_source(memory, SourceKind::Scan, Policy::Strict)
    }

    #[test]
    fn refcount_overflow_and_underflow_are_errors() {
        let t = tracker_over_one_page();
        t.track(1).unwrap();
        t.state().pages.get_mut(&1).unwrap().refs = u32::MAX;
        assert!(matches!(t.track(1), Err(TrackError::RefcountOverflow(1))));
        assert_eq!(t.refcount(1), u32::MAX);
        t.state().pages.get_mut(&1).unwrap().refs = 1;
        t.untrack(1).unwrap();
        assert!(matches!(t.untrack(1), Err(TrackError::NotTracked(1))));
        assert!(matches!(t.track(2), Err(TrackError::NotMapped(2))));
    }

    #[test]
    fn notifiers_register_and_unregister() {
        struct Nop;
        impl TrackNotifier for Nop {
            fn track_write(&self, _: u64, _: &[u8; ENTRY_SIZE]) {}
            fn track_remove_region(&self, _: Gfn, _: u64) {}
        }
        let t = tracker_over_one_page();
        let id = t.register_notifier(Arc::new(Nop));
        assert!(t.unregister_notifier(id));
        assert!(!t.unregister_notifier(id));
    }
}
