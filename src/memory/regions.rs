//! The table of DMA regions, keyed by guest address.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

use super::guard::FaultGuard;
use super::MemoryError;

/// How the backend reaches a region's bytes.
pub enum RegionBacking {
    /// The client's fd, mapped into this process.
    Mapped(MappedRegion),
    /// No fd: only DMA_READ/DMA_WRITE messages reach it.
    Message,
}

/// A client's fd mapped into this process, guarded against the client taking
/// the memory away (`memory::guard`): once [`faulted`](Self::faulted), every
/// access to it fails.
pub struct MappedRegion {
    // Declared first: the guard is dropped (deregistered) before the mapping
    // goes, so a later mapping at the same address is never taken for it.
    guard: FaultGuard,
    map: GuestRegionMmap<()>,
    /// The loss was logged (once per region).
    reported: std::sync::atomic::AtomicBool,
}

impl MappedRegion {
    /// The mapping, for copies. Check [`faulted`](Self::faulted) after
    /// copying: a copy that raced the client's truncation read zeroes.
    pub fn map(&self) -> &GuestRegionMmap<()> {
        &self.map
    }

    /// Whether the client took this region's memory away (SIGBUS).
    #[inline]
    pub fn faulted(&self) -> bool {
        self.guard.faulted()
    }

    /// Whether this is the first time the loss is noticed (to log it once).
    pub fn first_report(&self) -> bool {
        !self
            .reported
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }
}

/// One range of guest memory shared by the client.
pub struct DmaRegion {
    pub gpa: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    pub backing: RegionBacking,
}

impl std::fmt::Debug for DmaRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaRegion")
            .field("gpa", &format_args!("{:#x}", self.gpa))
            .field("size", &format_args!("{:#x}", self.size))
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .field("mapped", &matches!(self.backing, RegionBacking::Mapped(_)))
            .finish()
    }
}

impl DmaRegion {
    /// A region reached through DMA messages only.
    pub fn message(
        gpa: u64,
        size: u64,
        readable: bool,
        writable: bool,
    ) -> Result<Self, MemoryError> {
        check_range(gpa, size)?;
        Ok(DmaRegion {
            gpa,
            size,
            readable,
            writable,
            backing: RegionBacking::Message,
        })
    }

    /// A region backed by `fd` at `offset`, mapped shared with the permissions asked.
    ///
    /// Refused up front: an fd that is not a regular file (memfds and hugetlbfs
    /// files are; character devices, pipes and sockets are not, and their size
    /// cannot be checked), a file smaller than `offset + size` (touching a
    /// mapping past the end of its file raises SIGBUS), and hugetlbfs memory
    /// whose huge pages cannot be reserved now (it is mapped without
    /// `MAP_NORESERVE`, so the kernel reserves them at mmap or refuses). Where
    /// the fd allows it, the file is sealed against shrinking; what cannot be
    /// sealed is guarded (`memory::guard`).
    pub fn mapped(
        gpa: u64,
        size: u64,
        fd: OwnedFd,
        offset: u64,
        readable: bool,
        writable: bool,
    ) -> Result<Self, MemoryError> {
        check_range(gpa, size)?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(MemoryError::Fd)?;
        let end = offset
            .checked_add(size)
            .ok_or(MemoryError::Invalid("fd offset + size overflows"))?;
        if !meta.is_file() {
            return Err(MemoryError::NotRegularFile);
        }
        if meta.len() < end {
            return Err(MemoryError::FileTooShort {
                len: meta.len(),
                needed: end,
            });
        }
        seal_against_shrinking(&file);
        let mut prot = 0;
        if readable {
            prot |= libc::PROT_READ;
        }
        if writable {
            prot |= libc::PROT_WRITE;
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::Invalid("size too large"))?;
        // hugetlbfs pages are reserved at mmap unless MAP_NORESERVE: without
        // it, a file with no pages behind it is refused here, not at first touch.
        let noreserve = if is_hugetlbfs(&file) {
            0
        } else {
            libc::MAP_NORESERVE
        };
        let mmap = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len,
            prot,
            libc::MAP_SHARED | noreserve,
        )
        .map_err(MemoryError::Mmap)?;
        let map = GuestRegionMmap::new(mmap, GuestAddress(gpa))
            .ok_or(MemoryError::Invalid("region wraps the address space"))?;
        let guard = FaultGuard::register(map.as_ptr(), len)?;
        Ok(DmaRegion {
            gpa,
            size,
            readable,
            writable,
            backing: RegionBacking::Mapped(MappedRegion {
                guard,
                map,
                reported: Default::default(),
            }),
        })
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }

    /// Host address of the mapping, for regions that have one.
    pub fn host_ptr(&self) -> Option<*mut u8> {
        match &self.backing {
            RegionBacking::Mapped(m) => Some(m.map.as_ptr()),
            RegionBacking::Message => None,
        }
    }
}

fn check_range(gpa: u64, size: u64) -> Result<(), MemoryError> {
    if size == 0 {
        return Err(MemoryError::Invalid("zero size"));
    }
    gpa.checked_add(size)
        .ok_or(MemoryError::Invalid("range wraps the address space"))?;
    Ok(())
}

/// Whether `file` lives on hugetlbfs (a `MFD_HUGETLB` memfd included).
pub(crate) fn is_hugetlbfs(file: &File) -> bool {
    const HUGETLBFS_MAGIC: libc::c_long = 0x958458f6;
    // SAFETY: fstatfs fills a zeroed statfs struct for an fd we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::fstatfs(file.as_raw_fd(), &mut st) == 0
            && st.f_type as libc::c_long == HUGETLBFS_MAGIC
    }
}

/// Seals a file the peer sent against shrinking, where it allows that (a
/// memfd made with `MFD_ALLOW_SEALING` and not yet sealed against sealing).
pub(crate) fn seal_against_shrinking(file: &File) {
    // SAFETY: fcntl on an fd we own; F_ADD_SEALS only changes the file's seal set,
    // and failure (not a memfd, sealing not allowed) is harmless.
    unsafe {
        libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK);
    }
}

/// The DMA regions in force, non-overlapping, ordered by guest address.
/// Lookups are O(log n), so the region count does not slow the data path.
pub struct DmaRegions {
    map: BTreeMap<u64, DmaRegion>,
    max_regions: usize,
}

impl DmaRegions {
    pub fn new(max_regions: usize) -> Self {
        DmaRegions {
            map: BTreeMap::new(),
            max_regions,
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &DmaRegion> {
        self.map.values()
    }

    /// The region containing `gpa`.
    pub fn find(&self, gpa: u64) -> Option<&DmaRegion> {
        self.map
            .range(..=gpa)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| r.contains(gpa))
    }

    /// Adds a region; overlapping an existing one is refused.
    pub fn insert(&mut self, region: DmaRegion) -> Result<(), MemoryError> {
        let (gpa, size) = (region.gpa, region.size);
        if self.map.len() >= self.max_regions {
            return Err(MemoryError::TooManyRegions(self.map.len()));
        }
        let overlaps_before = self
            .map
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, r)| r.end() > gpa);
        let overlaps_after = self
            .map
            .range(gpa..)
            .next()
            .is_some_and(|(&start, _)| start < gpa + size);
        if overlaps_before || overlaps_after {
            return Err(MemoryError::Overlap { gpa, size });
        }
        self.map.insert(gpa, region);
        Ok(())
    }

    /// Removes every region inside `[gpa, gpa+size)`. A region that straddles an
    /// edge of the range is refused (nothing is removed), as is a range with no
    /// region in it.
    pub fn remove_range(&mut self, gpa: u64, size: u64) -> Result<Vec<DmaRegion>, MemoryError> {
        let end = gpa
            .checked_add(size)
            .ok_or(MemoryError::Invalid("range wraps the address space"))?;
        if size == 0 {
            return Err(MemoryError::Invalid("zero size"));
        }
        let straddles_start = self.find(gpa).is_some_and(|r| r.gpa < gpa);
        let straddles_end = self.find(end - 1).is_some_and(|r| r.end() > end);
        if straddles_start || straddles_end {
            return Err(MemoryError::PartialUnmap { gpa, size });
        }
        let keys: Vec<u64> = self.map.range(gpa..end).map(|(&k, _)| k).collect();
        if keys.is_empty() {
            return Err(MemoryError::NotMapped { gpa, size });
        }
        Ok(keys
            .into_iter()
            .filter_map(|k| self.map.remove(&k))
            .collect())
    }

    /// Removes every region.
    pub fn clear(&mut self) -> Vec<DmaRegion> {
        std::mem::take(&mut self.map).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(gpa: u64, size: u64) -> DmaRegion {
        DmaRegion::message(gpa, size, true, true).unwrap()
    }

    #[test]
    fn overlap_and_lookup() {
        let mut t = DmaRegions::new(8);
        t.insert(msg(0x1000, 0x1000)).unwrap();
        t.insert(msg(0x3000, 0x1000)).unwrap();
        assert!(matches!(
            t.insert(msg(0x1800, 0x100)),
            Err(MemoryError::Overlap { .. })
        ));
        assert!(matches!(
            t.insert(msg(0x0, 0x1001)),
            Err(MemoryError::Overlap { .. })
        ));
        assert!(matches!(
            t.insert(msg(0x2fff, 0x2)),
            Err(MemoryError::Overlap { .. })
        ));
        t.insert(msg(0x2000, 0x1000)).unwrap();
        assert_eq!(t.find(0x2fff).unwrap().gpa, 0x2000);
        assert!(t.find(0x4000).is_none());
        assert!(t.find(0xfff).is_none());
    }

    #[test]
    fn unmap_rules() {
        let mut t = DmaRegions::new(8);
        t.insert(msg(0x1000, 0x2000)).unwrap();
        assert!(matches!(
            t.remove_range(0x1000, 0x1000),
            Err(MemoryError::PartialUnmap { .. })
        ));
        assert!(matches!(
            t.remove_range(0x8000, 0x1000),
            Err(MemoryError::NotMapped { .. })
        ));
        assert_eq!(t.remove_range(0, 0x10000).unwrap().len(), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn region_limit() {
        let mut t = DmaRegions::new(1);
        t.insert(msg(0, 0x1000)).unwrap();
        assert!(matches!(
            t.insert(msg(0x1000, 0x1000)),
            Err(MemoryError::TooManyRegions(1))
        ));
    }

    #[test]
    fn short_file_refused() {
        let file = tempfile_of(0x1000);
        let err = DmaRegion::mapped(0, 0x2000, file.into(), 0, true, true).unwrap_err();
        assert!(matches!(err, MemoryError::FileTooShort { .. }));
    }

    fn tempfile_of(len: u64) -> File {
        let name = std::ffi::CString::new("umdev-test").unwrap();
        // SAFETY: memfd_create with a valid C string; we take ownership of the fd.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh fd we own.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }
}
