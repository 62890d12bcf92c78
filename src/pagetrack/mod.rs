//! Write tracking of guest pages with KVM's page-track semantics, for a backend
//! that lives outside the VMM and so cannot trap guest writes itself.
//!
//! Users [`PageTracker::track`] and [`PageTracker::untrack`] gfns (refcounted: many
//! users may track one page) and register [`PageTrackNotifier`]s. Writes are
//! *detected*: every tracked page has a snapshot, and at a sync point
//! ([`PageTracker::sync`]) the pages a [`WriteSource`] names as candidates are
//! compared with it. Each changed naturally aligned 8-byte entry becomes one
//! `track_write(gpa, new bytes)`, in address order, after the write has landed.
//! When guest memory goes away, `track_remove_region` reaches every notifier
//! and the tracking state there is dropped after it.
//!
//! # KVM's API and umdev's
//!
//! | KVM (`arch/x86/kvm/mmu/page_track.c`, Linux 6.7+) | umdev | difference |
//! |---|---|---|
//! | `kvm_write_track_add_gfn(kvm, gfn)` | [`PageTracker::track`] | refcount `u32` (KVM: `u16`, WARN on overflow), overflow is [`TrackError::RefcountOverflow`]; a gfn outside fd-mapped memory is [`TrackError::NotMapped`] (KVM: `-EINVAL` outside a memslot); at most [`DEFAULT_MAX_TRACKED_PAGES`] pages, each with a 4 KiB snapshot |
//! | `kvm_write_track_remove_gfn(kvm, gfn)` | [`PageTracker::untrack`] | an untracked gfn is [`TrackError::NotTracked`] (KVM: WARN) |
//! | `kvm_page_track_register_notifier(kvm, node)` (takes a VM reference) | [`PageTracker::register`] → [`NotifierRegistration`] | the guard holds the tracker as KVM's reference holds the VM (the notifier is only ever called by that live tracker), and unregisters when dropped; users keep no `Weak`/`Arc` pairs. KVM's `-ESRCH` for another process's VM has no equivalent |
//! | `kvm_page_track_unregister_notifier(kvm, node)` (`synchronize_srcu`) | [`NotifierRegistration::unregister`], its `Drop` | waits per notifier: after it returns the notifier is never called, calls under way on other threads have finished, the tracker has let go of it. From inside a callback of the same tracker it is refused ([`NotifierError::InCallback`]) where KVM would deadlock; a guard dropped there retires the notifier without waiting |
//! | `track_write(gpa, new, bytes, node)`, called by `kvm_page_track_write` after each emulated write to a tracked page | [`PageTrackNotifier::track_write`]`(gpa, new)`, `new.len()` the bytes | KVM traps every guest write and reports it exactly. umdev sees memory, not writes: scan and dirty bitmap report the **net change of each 8-byte entry at a sync point** (A->B->A and a rewrite of the same bytes are invisible, two writes to one entry between syncs are one report); the uffd source in strict mode reports **every write fault** at once (a fault that changed nothing: the faulting entry, or the whole page when the VMM's uffd lacks `UFFD_FEATURE_EXACT_ADDRESS`, as it now is), but writes that land while the page is writable for a fault just resolved merge into that fault's report, and out-of-sync pages behave like scan. Writes the backend itself makes (`GuestMemory::write`) are compared at the next sync whatever the source |
//! | `track_remove_region(gfn, nr_pages, node)`, from `kvm_page_track_delete_slot` on memslot deletion | [`PageTrackNotifier::track_remove_region`], from [`PageTracker::remove_region`] on DMA_UNMAP of a region, unmap-all (each region) and client loss (each region) | the same: every notifier, the region's first gfn and page count, tracked pages there or not; tracked gfns there are dropped after the call, whatever their refcount. KVM calls it with the memslot already invalid; umdev with the region already out of the table (reads there fail) |
//! | `kvm_page_track_is_valid_gfn` | `GuestMemory::is_host_mapped` | |
//! | (none: KVM's writes are trapped, nothing to sync) | [`PageTracker::sync`], [`PageTracker::sync_range`], [`PageTracker::sync_gfns`] | the sync point where detection happens; refused from inside a callback |
//! | (none) | [`PageTracker::reset`] | device reset: every page untracked without a notification (no memory went away) |
//!
//! What a separate process cannot match: KVM write-protects tracked gfns in the
//! guest's own page tables (EPT/NPT) and emulates each write, so it knows the
//! address, bytes and length of every write, before any other vCPU can act on
//! it. A vfio-user or vhost-user backend has no hold on the guest's page
//! tables; it only shares the memory. So umdev reports after the fact: at a
//! sync point (scan, bitmap), or at the first write fault through a
//! userfaultfd the VMM registered on its own mapping (the guest writes through
//! that mapping; a uffd on the backend's mapping sees nothing). Even in strict
//! mode the faulting vCPU runs on once the page is made writable, so the
//! bytes reported are what the page holds when the handler looks, not the
//! exact bytes of the write, and a second write racing that window is merged.
//! Dirty logging through KVM (`KVM_GET_DIRTY_LOG`, dirty rings) works only in
//! the VMM's process.
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
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};

use tracing::{debug, warn};

use crate::memory::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;
/// Tracking granularity within a page: naturally aligned 8-byte entries, the size
/// of a page-table entry.
pub const ENTRY_SIZE: usize = 8;

/// Guest frame number.
pub type Gfn = u64;

/// KVM's `struct kvm_page_track_notifier_node` callbacks: what the tracker
/// reports. Called without tracker locks held, so a notifier may track and
/// untrack pages itself; it must not unregister a notifier of the same tracker
/// (refused, [`NotifierError::InCallback`]) nor call [`PageTracker::sync`]
/// (refused with a warning: the sync it is part of has not finished).
pub trait PageTrackNotifier: Send + Sync {
    /// KVM's `track_write(gpa, new, bytes)`: a write to a tracked page has
    /// landed, and `new` holds the `new.len()` bytes now at `gpa`. What a write
    /// is depends on the source (module docs): for umdev's sources a changed
    /// naturally aligned 8-byte entry, or, for a strict userfaultfd fault that
    /// changed nothing visible, the faulting entry or page as it is.
    /// [`write_entries`] splits it into the 8-byte entries it touches.
    fn track_write(&self, gpa: u64, new: &[u8]);
    /// KVM's `track_remove_region(gfn, nr_pages)`: guest memory
    /// `[gfn, gfn+nr_pages)` is going away (DMA_UNMAP, unmap-all, client loss),
    /// whether or not this notifier tracks pages there. Pages still tracked in
    /// it are untracked once every notifier has returned.
    fn track_remove_region(&self, gfn: Gfn, nr_pages: u64);
}

/// The naturally aligned 8-byte entries a `track_write(gpa, new)` touches, in
/// address order: each entry's gpa with its new value (little-endian) where
/// the write covers the whole entry, `None` where it covers only part of it
/// (the rest is in guest memory). For notifiers that work in entries, such as
/// page-table shadows; a write whose end does not fit in a `u64` touches none.
pub fn write_entries(gpa: u64, new: &[u8]) -> impl Iterator<Item = (u64, Option<u64>)> + '_ {
    const E: u64 = ENTRY_SIZE as u64;
    let end = gpa.checked_add(new.len() as u64).unwrap_or(gpa);
    let first = gpa & !(E - 1);
    let count = if end > gpa {
        (end - first).div_ceil(E)
    } else {
        0
    };
    (0..count).map(move |i| {
        let at = first + i * E;
        let whole = at >= gpa && end - at >= E;
        let value = whole.then(|| {
            let off = (at - gpa) as usize;
            let mut b = [0u8; ENTRY_SIZE];
            b.copy_from_slice(&new[off..off + ENTRY_SIZE]);
            u64::from_le_bytes(b)
        });
        (at, value)
    })
}

/// Names a registration (in errors and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotifierId(u64);

/// Why a notifier could not be unregistered.
#[derive(Debug, thiserror::Error)]
pub enum NotifierError {
    /// Unregistering waits for deliveries in progress, this thread's among them:
    /// from inside a callback that would never return.
    #[error("notifier {0:?} cannot be unregistered from inside a page-track callback")]
    InCallback(NotifierId),
}

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
    notifiers: RwLock<Vec<Arc<Slot>>>,
    next_notifier: AtomicU64,
    syncs: AtomicU64,
    pages_compared: AtomicU64,
    entries_changed: AtomicU64,
    /// Helper fds (the uffds) for the session's event loop.
    events: Arc<crate::event::EventSet>,
}

/// The writes one comparison found, delivered after it: `(gpa, new bytes)`.
#[derive(Default)]
struct Writes {
    at: Vec<(u64, usize, usize)>,
    bytes: Vec<u8>,
}

impl Writes {
    fn push(&mut self, gpa: u64, new: &[u8]) {
        self.at.push((gpa, self.bytes.len(), new.len()));
        self.bytes.extend_from_slice(new);
    }

    fn len(&self) -> usize {
        self.at.len()
    }

    fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.at
            .iter()
            .map(|&(gpa, off, len)| (gpa, &self.bytes[off..off + len]))
    }
}

/// One registered notifier. A delivery takes the slot (`calls`), unless it is
/// retired; unregistering retires it and waits until no call is under way: the
/// `synchronize_srcu` of KVM's unregister, per notifier.
struct Slot {
    id: NotifierId,
    notifier: Arc<dyn PageTrackNotifier>,
    calls: Mutex<SlotCalls>,
    idle: Condvar,
}

#[derive(Default)]
struct SlotCalls {
    retired: bool,
    under_way: usize,
}

impl Slot {
    fn calls(&self) -> MutexGuard<'_, SlotCalls> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the notifier unless the slot is retired.
    fn call(&self, f: &dyn Fn(&dyn PageTrackNotifier)) {
        {
            let mut c = self.calls();
            if c.retired {
                return;
            }
            c.under_way += 1;
        }
        // Ends the call also when `f` unwinds.
        struct End<'a>(&'a Slot);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                let mut c = self.0.calls();
                c.under_way -= 1;
                if c.under_way == 0 {
                    self.0.idle.notify_all();
                }
            }
        }
        let _end = End(self);
        f(&*self.notifier);
    }

    /// No call starts after this; with `wait`, none is under way when it returns.
    fn retire(&self, wait: bool) {
        let mut c = self.calls();
        c.retired = true;
        while wait && c.under_way > 0 {
            c = self.idle.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }
}

thread_local! {
    /// The trackers whose callbacks this thread is inside (by `Shared` address).
    static IN_CALLBACK: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Marks this thread as inside `shared`'s callbacks while it lives.
struct CallbackScope(usize);

impl CallbackScope {
    fn enter(shared: &Arc<Shared>) -> Self {
        let key = Arc::as_ptr(shared) as usize;
        IN_CALLBACK.with(|v| v.borrow_mut().push(key));
        CallbackScope(key)
    }

    fn inside(shared: &Arc<Shared>) -> bool {
        let key = Arc::as_ptr(shared) as usize;
        IN_CALLBACK.with(|v| v.borrow().contains(&key))
    }
}

impl Drop for CallbackScope {
    fn drop(&mut self) {
        IN_CALLBACK.with(|v| {
            let mut v = v.borrow_mut();
            if let Some(i) = v.iter().rposition(|&k| k == self.0) {
                v.remove(i);
            }
        });
    }
}

/// A notifier registered with [`PageTracker::register`], KVM's
/// `kvm_page_track_register_notifier`. Like KVM's registration (which takes a
/// reference on the VM), it holds the tracker: the tracker outlives it, and
/// its notifier is only ever called by that live tracker. Dropping it (or
/// [`unregister`](Self::unregister)) ends the registration and waits for calls
/// under way on other threads; after that the notifier is never called again
/// and the tracker lets go of it. Keep it beside what the notifier refers to,
/// not inside it (the tracker holds the notifier until then).
pub struct NotifierRegistration {
    tracker: PageTracker,
    id: NotifierId,
    registered: bool,
}

impl NotifierRegistration {
    pub fn id(&self) -> NotifierId {
        self.id
    }

    pub fn tracker(&self) -> &PageTracker {
        &self.tracker
    }

    /// KVM's `kvm_page_track_unregister_notifier`: when this returns, the
    /// notifier is not called again, and a call under way on another thread
    /// has finished (KVM's `synchronize_srcu`). Refused from inside a callback
    /// of the same tracker, which that wait would never see end (the
    /// registration stays); a second call does nothing.
    pub fn unregister(&mut self) -> Result<(), NotifierError> {
        if !self.registered {
            return Ok(());
        }
        self.tracker.remove_notifier(self.id)?;
        self.registered = false;
        Ok(())
    }
}

impl Drop for NotifierRegistration {
    fn drop(&mut self) {
        if !self.registered {
            return;
        }
        if let Err(e) = self.unregister() {
            // Inside a callback: waiting would never end. No call starts from
            // now on; one under way on another thread may still finish.
            warn!("{e}; retired without waiting");
            if let Some(slot) = self.tracker.take_slot(self.id) {
                slot.retire(false);
            }
        }
    }
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

    /// Adds `notifier` to those every report goes to; a registration guard
    /// removes it.
    fn add_notifier(&self, notifier: Arc<dyn PageTrackNotifier>) -> NotifierId {
        let id = NotifierId(self.shared.next_notifier.fetch_add(1, Ordering::Relaxed));
        self.shared
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(Slot {
                id,
                notifier,
                calls: Mutex::default(),
                idle: Condvar::new(),
            }));
        id
    }

    /// KVM's `kvm_page_track_register_notifier`: the registration is a guard
    /// that holds the tracker and unregisters (waiting) when dropped.
    pub fn register(&self, notifier: Arc<dyn PageTrackNotifier>) -> NotifierRegistration {
        NotifierRegistration {
            id: self.add_notifier(notifier),
            tracker: self.clone(),
            registered: true,
        }
    }

    fn take_slot(&self, id: NotifierId) -> Option<Arc<Slot>> {
        let mut n = self
            .shared
            .notifiers
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let i = n.iter().position(|s| s.id == id)?;
        Some(n.remove(i))
    }

    /// KVM's `kvm_page_track_unregister_notifier`: when this returns, the
    /// notifier is not called again, and a call under way on another thread
    /// has finished (KVM's `synchronize_srcu`). Refused from inside a callback
    /// of this tracker, which that wait would never see end.
    fn remove_notifier(&self, id: NotifierId) -> Result<(), NotifierError> {
        if CallbackScope::inside(&self.shared) {
            return Err(NotifierError::InCallback(id));
        }
        // A registered guard's slot is there until this or its drop takes it.
        if let Some(slot) = self.take_slot(id) {
            slot.retire(true);
        }
        Ok(())
    }

    /// Notifiers registered now.
    pub fn notifier_count(&self) -> usize {
        self.shared
            .notifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Calls `f` on every registered notifier, this thread marked as inside
    /// the tracker's callbacks.
    fn for_each_notifier(&self, f: &dyn Fn(&dyn PageTrackNotifier)) {
        let slots: Vec<Arc<Slot>> = self
            .shared
            .notifiers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if slots.is_empty() {
            return;
        }
        let _scope = CallbackScope::enter(&self.shared);
        for slot in &slots {
            slot.call(f);
        }
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
        self.sync_selected(|state| {
            (
                state.pages.range(first..end).map(|(&g, _)| g).collect(),
                state.self_written.range(first..end).copied().collect(),
            )
        })
    }

    /// A sync point over the tracked ones of `gfns` (in any order).
    pub fn sync_gfns(&self, gfns: &[Gfn]) -> usize {
        let mut gfns = gfns.to_vec();
        gfns.sort_unstable();
        gfns.dedup();
        self.sync_selected(|state| {
            gfns.retain(|g| state.pages.contains_key(g));
            let written = gfns
                .iter()
                .copied()
                .filter(|g| state.self_written.contains(g))
                .collect();
            (gfns, written)
        })
    }

    /// Compares the tracked gfns `select` names (ascending) and the backend-
    /// written ones among them, then delivers what changed.
    fn sync_selected(&self, select: impl FnOnce(&State) -> (Vec<Gfn>, Vec<Gfn>)) -> usize {
        if CallbackScope::inside(&self.shared) {
            warn!("page-track sync from inside a page-track callback refused");
            return 0;
        }
        let mut writes = Writes::default();
        let _delivery = self
            .shared
            .delivery
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        {
            let mut state = self.state();
            let (gfns, written) = select(&state);
            let mut candidates = Vec::with_capacity(gfns.len());
            state.source.candidates(&gfns, &mut candidates);
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
                let changed = self.compare(&mut state, gfn, &mut current, &mut writes);
                state.source.compared(gfn, changed);
            }
        }
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.deliver(&writes);
        writes.len()
    }

    /// Compares one tracked page with its snapshot, refreshing it; pushes the
    /// changed entries. Returns whether anything changed.
    fn compare(
        &self,
        state: &mut State,
        gfn: Gfn,
        current: &mut [u8; PAGE_SIZE as usize],
        writes: &mut Writes,
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
        let before = writes.len();
        for (i, (new, old)) in current
            .chunks_exact(ENTRY_SIZE)
            .zip(page.snapshot.chunks_exact_mut(ENTRY_SIZE))
            .enumerate()
        {
            if new != old {
                old.copy_from_slice(new);
                writes.push(gfn * PAGE_SIZE + (i * ENTRY_SIZE) as u64, new);
            }
        }
        self.shared
            .entries_changed
            .fetch_add((writes.len() - before) as u64, Ordering::Relaxed);
        true
    }

    fn deliver(&self, writes: &Writes) {
        if writes.is_empty() {
            return;
        }
        self.for_each_notifier(&|n| {
            for (gpa, bytes) in writes.iter() {
                n.track_write(gpa, bytes);
            }
        });
    }

    /// KVM's `kvm_page_track_delete_slot`: guest memory `[gpa, gpa+size)` is
    /// gone (DMA_UNMAP of a region, unmap-all, client loss). Every notifier
    /// hears `track_remove_region(first gfn, pages)` whether or not pages were
    /// tracked there; then the pages still tracked there are dropped, whatever
    /// their references, with the source's hints for the memory. Call before
    /// replying to the client.
    pub fn remove_region(&self, gpa: u64, size: u64) {
        if size == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let nr = gpa.saturating_add(size - 1) / PAGE_SIZE - first + 1;
        debug!(gpa, size, "guest memory removed");
        {
            // Ordered with syncs: no write of a sync that began before is
            // delivered after this. (A callback calling this is already inside
            // a delivery that holds the lock.)
            let _delivery = (!CallbackScope::inside(&self.shared)).then(|| {
                self.shared
                    .delivery
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            });
            self.for_each_notifier(&|n| n.track_remove_region(first, nr));
        }
        let mut state = self.state();
        let gone: Vec<Gfn> = state
            .pages
            .range(first..first.saturating_add(nr))
            .map(|(&g, _)| g)
            .collect();
        for gfn in &gone {
            state.pages.remove(gfn);
            state.self_written.remove(gfn);
            state.source.untracked(*gfn);
        }
        state.source.region_removed(gpa, size);
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
        let (gfn, gpa) = {
            let mut state = self.state();
            let Some(source) = state.source.as_userfault() else {
                return;
            };
            match source.fault(event) {
                Some(uffd::Resolved {
                    gfn,
                    gpa,
                    strict: true,
                }) => (gfn, gpa),
                _ => return,
            }
        };
        // Strict: the writer runs again; report its write as soon as it is
        // visible. Every fault is reported: one that changed nothing visible
        // within the spin (a rewrite of the same bytes, or a write still on its
        // way) is protected again, compared (a write that landed before the
        // protection is seen; one after it faults again) and reported as the
        // faulting entry, or page, as it is.
        let _delivery = self
            .shared
            .delivery
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut writes = Writes::default();
        let mut current = [0u8; PAGE_SIZE as usize];
        let mut seen = false;
        for _ in 0..STRICT_SPIN {
            let mut state = self.state();
            let differs = match state.pages.get(&gfn) {
                Some(page) => {
                    self.shared
                        .memory
                        .peek(gfn * PAGE_SIZE, &mut current[..])
                        .is_ok()
                        && current[..] != page.snapshot[..]
                }
                None => return,
            };
            if differs {
                state.source.prepare_compare(gfn);
                let changed = self.compare(&mut state, gfn, &mut current, &mut writes);
                state.source.compared(gfn, changed);
                seen = true;
                break;
            }
            drop(state);
            std::thread::yield_now();
        }
        if !seen {
            let mut state = self.state();
            if !state.pages.contains_key(&gfn) {
                return;
            }
            state.source.prepare_compare(gfn);
            let changed = self.compare(&mut state, gfn, &mut current, &mut writes);
            state.source.compared(gfn, changed);
            if let (false, Some(page)) = (changed, state.pages.get(&gfn)) {
                // A uffd with UFFD_FEATURE_EXACT_ADDRESS names the byte; an
                // address at a page start may be a masked one: the whole page.
                let (from, len) = if gpa % PAGE_SIZE != 0 {
                    ((gpa % PAGE_SIZE) as usize & !(ENTRY_SIZE - 1), ENTRY_SIZE)
                } else {
                    (0, PAGE_SIZE as usize)
                };
                writes.push(
                    gfn * PAGE_SIZE + from as u64,
                    &page.snapshot[from..from + len],
                );
                self.shared.entries_changed.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.deliver(&writes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::DmaRegion;
    use std::os::fd::OwnedFd;

    fn tracker_over_one_page() -> PageTracker {
        tracker_over(1).0
    }

    /// A scan tracker over guest pages 1..1+pages (one DMA region), and the
    /// memory, writable by the device.
    fn tracker_over(pages: u64) -> (PageTracker, GuestMemory) {
        let fd = OwnedFd::from(crate::memory::memfd("pt", pages * PAGE_SIZE).unwrap());
        let memory = GuestMemory::new(4);
        let region = DmaRegion::mapped(0x1000, pages * PAGE_SIZE, fd, 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        memory.set_bus_master(true);
        let t = PageTracker::with_source(memory.clone(), SourceKind::Scan, Policy::Strict);
        (t, memory)
    }

    /// Counts calls; flags any call that starts once `done` is set.
    #[derive(Default)]
    struct Watch {
        calls: AtomicU64,
        late: AtomicU64,
        done: std::sync::atomic::AtomicBool,
    }

    impl PageTrackNotifier for Watch {
        fn track_write(&self, _: u64, _: &[u8]) {
            if self.done.load(Ordering::SeqCst) {
                self.late.fetch_add(1, Ordering::SeqCst);
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            // A slow notifier: a delivery is under way for a while.
            for _ in 0..200 {
                std::hint::spin_loop();
            }
        }
        fn track_remove_region(&self, _: Gfn, _: u64) {}
    }

    #[test]
    fn no_call_lands_after_unregister_returns() {
        let (t, memory) = tracker_over(1);
        t.track(1).unwrap();
        let watch = Arc::new(Watch::default());
        let mut registration = t.register(watch.clone());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flood = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u8;
                while !stop.load(Ordering::SeqCst) {
                    round = round.wrapping_add(1);
                    // Every entry of the page changes: 512 writes a sync.
                    memory.write(0x1000, &[round; PAGE_SIZE as usize]).unwrap();
                    t.sync();
                }
            })
        };
        while watch.calls.load(Ordering::SeqCst) < 2000 {
            std::thread::yield_now();
        }
        registration.unregister().unwrap();
        watch.done.store(true, Ordering::SeqCst);
        // The flood goes on a while after the return.
        let until = watch.calls.load(Ordering::SeqCst);
        let s0 = t.counters().syncs;
        while t.counters().syncs < s0 + 50 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::SeqCst);
        flood.join().unwrap();
        assert_eq!(
            watch.late.load(Ordering::SeqCst),
            0,
            "a call after unregister"
        );
        assert_eq!(watch.calls.load(Ordering::SeqCst), until);
        assert_eq!(t.notifier_count(), 0);
        assert_eq!(Arc::strong_count(&watch), 1, "the tracker let go of it");
    }

    /// Tries to unregister itself (through its guard, or by dropping the
    /// guard) from its own callback.
    #[derive(Default)]
    struct SelfRemover {
        /// Unregistered (kept) from the callback.
        me: Mutex<Option<(PageTracker, NotifierRegistration)>>,
        /// Dropped in the callback.
        guard: Mutex<Option<NotifierRegistration>>,
        results: Mutex<Vec<Result<(), String>>>,
        calls: AtomicU64,
    }

    impl PageTrackNotifier for SelfRemover {
        fn track_write(&self, _: u64, _: &[u8]) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some((t, registration)) = self.me.lock().unwrap().as_mut() {
                let r = registration.unregister().map_err(|e| e.to_string());
                self.results.lock().unwrap().push(r);
                // A sync from here would wait for itself: refused.
                assert_eq!(t.sync(), 0);
            }
            drop(self.guard.lock().unwrap().take());
        }
        fn track_remove_region(&self, _: Gfn, _: u64) {}
    }

    #[test]
    fn unregister_inside_a_callback_is_refused_not_a_hang() {
        let (t, memory) = tracker_over(1);
        t.track(1).unwrap();
        let n = Arc::new(SelfRemover::default());
        *n.me.lock().unwrap() = Some((t.clone(), t.register(n.clone())));
        memory.write(0x1000, &[1; 8]).unwrap();
        assert_eq!(t.sync(), 1);
        let results = std::mem::take(&mut *n.results.lock().unwrap());
        assert_eq!(results.len(), 1);
        assert!(results[0]
            .as_ref()
            .unwrap_err()
            .contains("inside a page-track callback"));
        assert_eq!(t.notifier_count(), 1, "still registered");
        let (_, mut registration) = n.me.lock().unwrap().take().unwrap();
        registration.unregister().unwrap();

        // A guard dropped inside its own callback retires the notifier at once.
        let n = Arc::new(SelfRemover::default());
        *n.guard.lock().unwrap() = Some(t.register(n.clone()));
        memory.write(0x1000, &[2; 8]).unwrap();
        assert_eq!(t.sync(), 1);
        assert_eq!(t.notifier_count(), 0);
        memory.write(0x1000, &[3; 8]).unwrap();
        t.sync();
        assert_eq!(n.calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_registration_holds_the_tracker_and_ends_with_its_guard() {
        let (t, memory) = tracker_over(1);
        t.track(1).unwrap();
        let watch = Arc::new(Watch::default());
        let reg = t.register(watch.clone());
        let weak = Arc::downgrade(&t.shared);
        drop(t);
        assert!(
            weak.upgrade().is_some(),
            "the registration holds the tracker"
        );
        memory.write(0x1000, &[1; 8]).unwrap();
        assert_eq!(reg.tracker().sync(), 1);
        assert_eq!(watch.calls.load(Ordering::SeqCst), 1);
        drop(reg);
        assert!(weak.upgrade().is_none(), "tracker gone with its last user");
        assert_eq!(Arc::strong_count(&watch), 1);
        // Explicit unregister, then the guard's drop does nothing more.
        let (t, _memory) = tracker_over(1);
        let mut reg = t.register(watch.clone());
        reg.unregister().unwrap();
        reg.unregister().unwrap();
        assert_eq!(t.notifier_count(), 0);
        drop(reg);
    }

    /// Records removals and whether the first page was still tracked then.
    struct Removals {
        tracker: std::sync::OnceLock<PageTracker>,
        seen: Mutex<Vec<(Gfn, u64, bool)>>,
    }

    impl PageTrackNotifier for Removals {
        fn track_write(&self, _: u64, _: &[u8]) {}
        fn track_remove_region(&self, gfn: Gfn, nr: u64) {
            let tracked = self.tracker.get().is_some_and(|t| t.is_tracked(gfn));
            self.seen.lock().unwrap().push((gfn, nr, tracked));
        }
    }

    #[test]
    fn remove_region_reaches_every_notifier_then_untracks() {
        let (t, _memory) = tracker_over(4);
        let a = Arc::new(Removals {
            tracker: t.clone().into(),
            seen: Mutex::default(),
        });
        let b = Arc::new(Removals {
            tracker: std::sync::OnceLock::new(),
            seen: Mutex::default(),
        });
        let _ra = t.register(a.clone());
        let _rb = t.register(b.clone());
        // Nothing tracked there: reported all the same.
        t.remove_region(0x3000, 0x2000);
        t.track(1).unwrap();
        t.track(1).unwrap();
        t.track(2).unwrap();
        // Unaligned: every page it touches.
        t.remove_region(0x1800, 0x1000);
        assert_eq!(*a.seen.lock().unwrap(), [(3, 2, false), (1, 2, true)]);
        assert_eq!(b.seen.lock().unwrap().len(), 2);
        assert!(
            !t.is_tracked(1) && !t.is_tracked(2),
            "dropped after the call"
        );
        assert_eq!(t.counters().pages_tracked, 0);
        t.remove_region(0x1000, 0);
        assert_eq!(
            a.seen.lock().unwrap().len(),
            2,
            "an empty range is no region"
        );
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
    fn a_registration_unregisters_once_and_when_dropped() {
        struct Nop;
        impl PageTrackNotifier for Nop {
            fn track_write(&self, _: u64, _: &[u8]) {}
            fn track_remove_region(&self, _: Gfn, _: u64) {}
        }
        let t = tracker_over_one_page();
        let nop = Arc::new(Nop);
        let mut r = t.register(nop.clone());
        let _kept = t.register(nop.clone());
        assert_eq!(t.notifier_count(), 2);
        r.unregister().unwrap();
        r.unregister().unwrap();
        assert_eq!(t.notifier_count(), 1);
        drop(r);
        assert_eq!(t.notifier_count(), 1);
        drop(_kept);
        assert_eq!(t.notifier_count(), 0);
        assert_eq!(Arc::strong_count(&nop), 1, "the tracker let go of it");
    }

    /// Holds its first delivery until released.
    #[derive(Default)]
    struct Gate {
        entered: std::sync::atomic::AtomicBool,
        release: std::sync::atomic::AtomicBool,
        finished: std::sync::atomic::AtomicBool,
        calls: AtomicU64,
    }

    impl PageTrackNotifier for Gate {
        fn track_write(&self, _: u64, _: &[u8]) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.entered.store(true, Ordering::SeqCst);
            while !self.release.load(Ordering::SeqCst) {
                std::thread::yield_now();
            }
            self.finished.store(true, Ordering::SeqCst);
        }
        fn track_remove_region(&self, _: Gfn, _: u64) {}
    }

    #[test]
    fn dropping_the_guard_waits_for_a_delivery_under_way() {
        let (t, memory) = tracker_over(1);
        t.track(1).unwrap();
        let gate = Arc::new(Gate::default());
        let registration = t.register(gate.clone());
        memory.write(0x1000, &[1; 8]).unwrap();
        let sync = {
            let t = t.clone();
            std::thread::spawn(move || t.sync())
        };
        while !gate.entered.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropper = {
            let (gate, dropped) = (gate.clone(), dropped.clone());
            std::thread::spawn(move || {
                drop(registration);
                dropped.store(true, Ordering::SeqCst);
                gate.finished.load(Ordering::SeqCst)
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the drop returned with a delivery under way"
        );
        gate.release.store(true, Ordering::SeqCst);
        assert!(
            dropper.join().unwrap(),
            "the drop returned before the delivery finished"
        );
        assert_eq!(sync.join().unwrap(), 1);
        assert_eq!(t.notifier_count(), 0);
        memory.write(0x1000, &[2; 8]).unwrap();
        t.sync();
        assert_eq!(
            gate.calls.load(Ordering::SeqCst),
            1,
            "called after the drop"
        );
        assert_eq!(Arc::strong_count(&gate), 1, "the tracker let go of it");
    }

    #[test]
    fn write_entries_splits_a_write_into_whole_and_partial_entries() {
        let bytes: Vec<u8> = (1..=20).collect();
        let v = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[r]);
            Some(u64::from_le_bytes(b))
        };
        let entries = |gpa, new| write_entries(gpa, new).collect::<Vec<_>>();
        assert_eq!(
            entries(0x1000, &bytes[..16]),
            [(0x1000, v(0..8)), (0x1008, v(8..16))]
        );
        // Unaligned: a partial head, then whole entries.
        assert_eq!(
            entries(0x1004, &bytes),
            [(0x1000, None), (0x1008, v(4..12)), (0x1010, v(12..20))]
        );
        // Straddling two entries, covering neither whole.
        assert_eq!(
            entries(0x1004, &bytes[..8]),
            [(0x1000, None), (0x1008, None)]
        );
        assert_eq!(entries(0x1002, &bytes[..2]), [(0x1000, None)]);
        // A whole page, as an inexact uffd fault reports it.
        assert_eq!(write_entries(0x2000, &[0; PAGE_SIZE as usize]).count(), 512);
        assert!(entries(0x1000, &[]).is_empty());
        assert!(entries(u64::MAX - 3, &bytes[..8]).is_empty());
    }
}
