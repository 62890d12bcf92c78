//! Shared memory made here and mapped here: what a VMM, a test client or a
//! benchmark shares with a backend (guest RAM, a dirty bitmap).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

/// A new memfd ([`memfd`](super::memfd)) mapped shared and read-write into
/// this process for as long as the value lives. The mapping is reached
/// through [`as_ptr`](Self::as_ptr): whoever reads or writes it decides what
/// the other side may be doing meanwhile.
pub struct MappedMemfd {
    file: File,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the struct owns the mapping and hands out only its address; every
// access through it is the caller's unsafe code.
unsafe impl Send for MappedMemfd {}
// SAFETY: as above: &self gives nothing but the file and the address.
unsafe impl Sync for MappedMemfd {}

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
        // SAFETY: maps `len` bytes of the memfd just sized to `len`, shared, at
        // an address the kernel picks; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | flags,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(std::io::ErrorKind::InvalidData)?;
        Ok(MappedMemfd { file, ptr, len })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MappedMemfd {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
