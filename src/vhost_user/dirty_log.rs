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
use std::sync::Arc;

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapMmapRegion, BitmapReplace};
use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};
use vm_memory::mmap::NewBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Guest memory as a vhost-user backend sees it: the front-end's regions, each
/// with its slice of the dirty log.
pub type VhostMemory = vm_memory::GuestMemoryMmap<LogBitmap>;

/// [`VhostMemory`] that the front-end can replace (SET_MEM_TABLE, ADD_MEM_REG).
pub type VhostMemoryAtomic = vm_memory::GuestMemoryAtomic<VhostMemory>;

/// A region's dirty-log bitmap that marks pages only while logging is on.
#[derive(Debug, Clone)]
pub struct LogBitmap {
    inner: BitmapMmapRegion,
    // Shared by a region's bitmap and every slice taken of it.
    logging: Arc<AtomicBool>,
}

impl Default for LogBitmap {
    fn default() -> Self {
        // On until the glue says otherwise: marking needs a log base as well, and
        // a region that appears mid-migration must not miss writes in the moment
        // before the glue sets its gate.
        LogBitmap {
            inner: BitmapMmapRegion::default(),
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
}

/// Sets the logging gate of every region of `mem`.
pub fn set_logging(mem: &VhostMemory, on: bool) {
    for region in mem.iter() {
        region.bitmap().set_logging(on);
    }
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if self.logging.load(Ordering::Acquire) {
            self.inner.mark_dirty(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.inner.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        LogBitmap {
            inner: self.inner.slice_at(offset),
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

    fn replace(&self, bitmap: AtomicBitmapMmap) {
        self.inner.replace(bitmap);
    }
}
