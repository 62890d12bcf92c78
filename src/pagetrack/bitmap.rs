//! A dirty bitmap the VMM shares for one DMA region (umdev vfio-user extension).
//!
//! One bit per 4 KiB page of the region, bit `i % 64` of little-endian u64 word
//! `i / 64`. The VMM sets a page's bit (an atomic OR) once a guest write to it has
//! landed; the backend takes bits with an atomic swap at sync points. A write after
//! the swap sets the bit again, so the next sync sees it.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use super::{TrackError, PAGE_SIZE};
use crate::memory::guard::FaultGuard;

pub struct DirtyBitmap {
    gpa: u64,
    size: u64,
    // Before `map`: deregistered before the mapping goes (`memory::guard`).
    guard: FaultGuard,
    map: MmapRegion<()>,
    /// u64 words in the mapping.
    words: usize,
    /// Words before the bitmap proper (the file offset's distance from its page).
    lead_words: usize,
}

impl DirtyBitmap {
    /// Bytes of bitmap a region of `size` bytes needs (whole u64 words).
    pub fn bytes_for(size: u64) -> u64 {
        size.div_ceil(PAGE_SIZE).div_ceil(64) * 8
    }

    /// Maps the bitmap for DMA region `[gpa, gpa+size)` from `file` at `offset`.
    pub fn new(gpa: u64, size: u64, file: File, offset: u64) -> Result<Self, TrackError> {
        if !gpa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) || size == 0 {
            return Err(TrackError::Unaligned {
                what: "dirty-bitmap region",
                gpa,
                size,
            });
        }
        if !offset.is_multiple_of(8) {
            return Err(TrackError::BitmapOffset(offset));
        }
        let len = Self::bytes_for(size);
        let meta = file.metadata().map_err(TrackError::Fd)?;
        let end = offset
            .checked_add(len)
            .ok_or(TrackError::Wraps { what: "bitmap" })?;
        if !meta.is_file() {
            return Err(TrackError::BitmapNotAFile);
        }
        if meta.len() < end {
            return Err(TrackError::BitmapTooShort {
                len: meta.len(),
                needed: end,
                size,
            });
        }
        crate::memory::regions::seal_against_shrinking(&file);
        // mmap needs a page-aligned file offset: map from the page holding `offset`.
        let page_off = offset & !(PAGE_SIZE - 1);
        let lead = (offset - page_off) as usize;
        let map = MmapRegion::build(
            Some(FileOffset::new(file, page_off)),
            lead + len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(TrackError::BitmapMap)?;
        let guard = FaultGuard::register(map.as_ptr(), map.size())?;
        Ok(DirtyBitmap {
            gpa,
            size,
            guard,
            map,
            words: (lead + len as usize) / 8,
            lead_words: lead / 8,
        })
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        let index = index + self.lead_words;
        assert!(index < self.words);
        // SAFETY: the mapping is page aligned and at least `words * 8` bytes long,
        // so word `index` is in bounds and 8-byte aligned; AtomicU64 has the layout
        // of u64, and the mapping lives as long as `self`, which the borrow ties.
        unsafe { &*(self.map.as_ptr() as *const AtomicU64).add(index) }
    }

    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn covers(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    /// Whether the bitmap's region lies inside `[gpa, gpa+size)`.
    pub fn within(&self, gpa: u64, size: u64) -> bool {
        self.gpa >= gpa && self.gpa - gpa < size
    }

    /// Whether the VMM took the bitmap's memory away (SIGBUS, `memory::guard`):
    /// its bits mean nothing since, so every page of the region counts as dirty.
    pub fn lost(&self) -> bool {
        self.guard.faulted()
    }

    /// Takes the dirty bit of the page at `gpa` (which must be covered): returns
    /// whether it was set, and clears it.
    pub fn take(&self, gpa: u64) -> bool {
        let page = ((gpa - self.gpa) / PAGE_SIZE) as usize;
        let bit = 1u64 << (page % 64);
        self.word(page / 64).fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }
}
