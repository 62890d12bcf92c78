//! The vhost-user dirty log: which guest pages the backend wrote while the
//! front-end migrates.
//!
//! The front-end shares a bitmap (`VHOST_USER_SET_LOG_BASE`, one bit per 4 KiB
//! guest page) and turns logging on and off with `VHOST_F_LOG_ALL` in
//! `SET_FEATURES`. The `vhost-user-backend` crate maps the bitmap and marks pages
//! for every write made through `vm-memory` (descriptor writers, used-ring
//! updates), but keeps marking once `LOG_ALL` is dropped again (its `set_log_base`
//! TODO). [`LogBitmap`] adds the missing gate: each region's bitmap shares an
//! `AtomicBool` that the backend glue sets from the acked features, so pages are
//! logged exactly while `LOG_ALL` is negotiated.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use tracing::warn;
use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::guard::FaultGuard;

/// Guest memory as a vhost-user backend sees it: the front-end's regions, each
/// with its slice of the dirty log.
pub type VhostMemory = vm_memory::GuestMemoryMmap<LogBitmap>;

/// [`VhostMemory`] that the front-end can replace (SET_MEM_TABLE, ADD_MEM_REG).
pub type VhostMemoryAtomic = vm_memory::GuestMemoryAtomic<VhostMemory>;

/// A region's dirty-log bitmap that marks pages only while logging is on.
///
/// The log is the front-end's memory too (an fd the crate maps at
/// SET_LOG_BASE without looking at its size), so its mapping is guarded
/// against SIGBUS like guest memory (`memory::guard`): a log the front-end
/// shrinks under the backend reads and writes as zeroes, and
/// [`log_lost`](Self::log_lost) says so.
#[derive(Debug, Clone)]
pub struct LogBitmap {
    // Shared by a region's bitmap and every slice taken of it; replaced whole
    // at SET_LOG_BASE.
    log: Arc<RwLock<Arc<LogState>>>,
    /// Offset of this slice in its region.
    base: usize,
    // Shared by a region's bitmap and every slice taken of it.
    logging: Arc<AtomicBool>,
}

/// The crate's bitmap of one region and the guard of the log mapping under it.
#[derive(Debug, Default)]
struct LogState {
    // Declared first: deregistered before the bitmap lets the mapping go.
    guard: Option<Arc<LogGuard>>,
    bitmap: BitmapMmapRegion,
}

/// The log mapping, registered with the SIGBUS handler; shared by every
/// region's bitmap that points into it.
#[derive(Debug)]
struct LogGuard {
    guard: FaultGuard,
    addr: usize,
    len: usize,
    reported: AtomicBool,
}

/// Guards of the log mappings in use, to share one per mapping.
static LOG_GUARDS: Mutex<Vec<Weak<LogGuard>>> = Mutex::new(Vec::new());

impl LogGuard {
    /// The guard of the log mapping `[addr, addr + len)`, registered on first use.
    fn shared(addr: usize, len: usize) -> Option<Arc<LogGuard>> {
        let mut guards = LOG_GUARDS.lock().unwrap_or_else(|p| p.into_inner());
        guards.retain(|g| g.strong_count() > 0);
        if let Some(g) = guards
            .iter()
            .filter_map(Weak::upgrade)
            .find(|g| g.addr == addr && g.len == len)
        {
            return Some(g);
        }
        match FaultGuard::register(addr as *const u8, len) {
            Ok(guard) => {
                let g = Arc::new(LogGuard {
                    guard,
                    addr,
                    len,
                    reported: AtomicBool::new(false),
                });
                guards.push(Arc::downgrade(&g));
                Some(g)
            }
            Err(e) => {
                warn!("dirty log mapping not guarded: {e}");
                None
            }
        }
    }
}

/// Where the crate mapped the log behind `bitmap`. `AtomicBitmapMmap` keeps
/// the mapping private; its `Debug` form (vhost-user-backend 0.24) is
/// `AtomicBitmapMmap { logmem: MmapLogReg { addr: 0x..., len: N }, .. }`.
fn log_mapping(bitmap: &AtomicBitmapMmap) -> Option<(usize, usize)> {
    let text = format!("{bitmap:?}");
    let field = |name: &str| text.split(name).nth(1);
    let hex: String = field("addr: 0x")?
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect();
    let dec: String = field("len: ")?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    let addr = usize::from_str_radix(&hex, 16).ok()?;
    let len = dec.parse().ok()?;
    (addr != 0 && len != 0).then_some((addr, len))
}

impl Default for LogBitmap {
    fn default() -> Self {
        // On until the glue says otherwise: marking needs a log base as well, and
        // a region that appears mid-migration must not miss writes in the moment
        // before the glue sets its gate.
        LogBitmap {
            log: Arc::default(),
            base: 0,
            logging: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl LogBitmap {
    /// Turns marking on or off for this region (and every slice of it).
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Release);
    }

    /// Whether this region marks pages now (given a log base).
    pub fn logging(&self) -> bool {
        self.logging.load(Ordering::Acquire)
    }

    fn state(&self) -> Arc<LogState> {
        self.log.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether the front-end took the log under this region away (SIGBUS).
    pub fn log_lost(&self) -> bool {
        self.state()
            .guard
            .as_ref()
            .is_some_and(|g| g.guard.faulted())
    }

    /// Whether the log was taken away and this is the first time anyone asks
    /// (to log it once per log).
    pub fn first_log_loss(&self) -> bool {
        self.state()
            .guard
            .as_ref()
            .is_some_and(|g| g.guard.faulted() && !g.reported.swap(true, Ordering::Relaxed))
    }
}

/// Sets the logging gate of every region of `mem`.
pub fn set_logging(mem: &VhostMemory, on: bool) {
    for region in mem.iter() {
        region.bitmap().set_logging(on);
    }
}

/// Whether the front-end took the dirty log of `mem` away, noticed for the
/// first time now.
pub fn first_log_loss(mem: &VhostMemory) -> bool {
    let mut first = false;
    for region in mem.iter() {
        first |= region.bitmap().first_log_loss();
    }
    first
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging.load(Ordering::Acquire) {
            // The read lock keeps the log mapped while it is marked.
            let state = self.log.read().unwrap_or_else(|p| p.into_inner());
            if let Some(offset) = self.base.checked_add(offset) {
                state.bitmap.mark_dirty(offset, len);
            }
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let state = self.log.read().unwrap_or_else(|p| p.into_inner());
        state.bitmap.dirty_at(self.base.saturating_add(offset))
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        LogBitmap {
            log: Arc::clone(&self.log),
            base: self.base.saturating_add(offset),
            logging: Arc::clone(&self.logging),
        }
    }
}

impl BitmapSlice for LogBitmap {}

impl WithBitmapSlice<'_> for LogBitmap {
    type S = Self;
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

impl BitmapReplace for LogBitmap {
    type InnerBitmap = AtomicBitmapMmap;

    /// SET_LOG_BASE: the region's bitmap in the new log. The new log mapping
    /// is guarded before it is used; the previous one goes with its guard
    /// deregistered first.
    fn replace(&self, bitmap: AtomicBitmapMmap) {
        let guard = match log_mapping(&bitmap) {
            Some((addr, len)) => LogGuard::shared(addr, len),
            None => {
                warn!("dirty log mapping not found in {bitmap:?}: not guarded");
                None
            }
        };
        let region = BitmapMmapRegion::default();
        region.replace(bitmap);
        let new = Arc::new(LogState {
            guard,
            bitmap: region,
        });
        let old = std::mem::replace(
            &mut *self.log.write().unwrap_or_else(|p| p.into_inner()),
            new,
        );
        drop(old);
    }
}
