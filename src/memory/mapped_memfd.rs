//! Shared memory made here and mapped here: what a VMM, a test client or a
//! benchmark shares with a backend (guest RAM, a dirty bitmap).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

/// A new memfd ([`memfd`](super::memfd)) mapped shared and read-write into
/// this process (a vm-memory `MmapRegion`) for as long as the value lives.
/// The mapping is reached through [`as_ptr`](Self::as_ptr): whoever reads or
/// writes it decides what the other side may be doing meanwhile.
pub struct MappedMemfd {
    map: MmapRegion<()>,
    len: usize,
}

impl MappedMemfd {
    /// `len` bytes (non-zero), mapped lazily.
    pub fn new(name: &str, len: usize) -> std::io::Result<MappedMemfd> {
        Self::map(name, len, 0)
    }

    /// `len` bytes with every page faulted in at once (`MAP_POPULATE`), so
    /// that first touches do not land in a measurement.
    pub fn populated(name: &str, len: usize) -> std::io::Result<MappedMemfd> {
        Self::map(name, len, libc::MAP_POPULATE)
    }

    /// `len` bytes in a memfd made without `MFD_ALLOW_SEALING`, so nobody
    /// can seal it: what a VMM shares that lets nothing stop it from
    /// truncating its memory (QEMU's `memory-backend-memfd,seal=off`).
    pub fn unsealable(name: &str, len: usize) -> std::io::Result<MappedMemfd> {
        Self::map_file(super::memfd_with(name, len as u64, 0)?, len, 0)
    }

    fn map(name: &str, len: usize, flags: libc::c_int) -> std::io::Result<MappedMemfd> {
        Self::map_file(super::memfd(name, len as u64)?, len, flags)
    }

    fn map_file(file: File, len: usize, flags: libc::c_int) -> std::io::Result<MappedMemfd> {
        let map = MmapRegion::build(
            Some(FileOffset::new(file, 0)),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | flags,
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(MappedMemfd { map, len })
    }

    pub fn file(&self) -> &File {
        self.map.file_offset().expect("mapped from a file").file()
    }

    pub fn fd(&self) -> RawFd {
        self.file().as_raw_fd()
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}
