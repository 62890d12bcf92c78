//! VRAM: a memfd of the backend, mapped here for the engine and handed to the
//! VMM as BAR2's mappable area so the guest reaches it without traps.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionError};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
    VolatileSlice,
};

#[derive(Debug, thiserror::Error)]
pub enum VramError {
    #[error("creating VRAM: memfd of {size:#x} bytes: {source}")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("creating VRAM: sealing VRAM: {0}")]
    Seal(#[source] std::io::Error),
    #[error("creating VRAM: duplicating the memfd: {0}")]
    Dup(#[source] std::io::Error),
    #[error("creating VRAM: mapping {size:#x} bytes: {source}")]
    Map {
        size: u64,
        #[source]
        source: MmapRegionError,
    },
    /// `GuestRegionMmap::new` refuses a region that passes the end of the
    /// guest address space (at guest address 0 none does, but its API allows
    /// for it).
    #[error("creating VRAM: mapping {size:#x} bytes at guest address 0 overflows")]
    MapAddress { size: u64 },
    #[error("VRAM access {offset:#x}+{len:#x} is out of range")]
    Range { offset: u64, len: usize },
}

pub struct Vram {
    file: Arc<File>,
    map: GuestRegionMmap<()>,
    size: u64,
}

impl Vram {
    pub fn new(size: u64) -> Result<Self, VramError> {
        let file = umdev::memory::memfd("umdev-vgpu-vram", size)
            .map_err(|source| VramError::Memfd { size, source })?;
        // The VMM gets this fd (BAR2's mappable area): sealed so it cannot
        // change the size under our mapping (SIGBUS) or seal it further.
        // Hole punching (our `clear`) stays allowed.
        // SAFETY: fcntl on the memfd we just made, integer arguments only.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if rc != 0 {
            return Err(VramError::Seal(std::io::Error::last_os_error()));
        }
        let mmap = MmapRegion::build(
            Some(FileOffset::new(
                file.try_clone().map_err(VramError::Dup)?,
                0,
            )),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .map_err(|source| VramError::Map { size, source })?;
        let map =
            GuestRegionMmap::new(mmap, GuestAddress(0)).ok_or(VramError::MapAddress { size })?;
        Ok(Vram {
            file: Arc::new(file),
            map,
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), VramError> {
        if offset
            .checked_add(len as u64)
            .is_some_and(|e| e <= self.size)
        {
            Ok(())
        } else {
            Err(VramError::Range { offset, len })
        }
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VramError> {
        self.check(offset, buf.len())?;
        self.map
            .read_slice(buf, MemoryRegionAddress(offset))
            .map_err(|_| VramError::Range {
                offset,
                len: buf.len(),
            })
    }

    /// The host view of `len` bytes at `offset`, for a copy without a
    /// buffer (`VolatileSlice::copy_to_volatile_slice`).
    pub fn slice(&self, offset: u64, len: usize) -> Result<VolatileSlice<'_, ()>, VramError> {
        self.check(offset, len)?;
        self.map
            .get_slice(MemoryRegionAddress(offset), len)
            .map_err(|_| VramError::Range { offset, len })
    }

    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), VramError> {
        self.check(offset, data.len())?;
        self.map
            .write_slice(data, MemoryRegionAddress(offset))
            .map_err(|_| VramError::Range {
                offset,
                len: data.len(),
            })
    }

    /// Power-on contents: all zeroes. Punches the pages out rather than changing
    /// the size, which would SIGBUS a VMM that has the file mapped.
    pub fn clear(&self) {
        // SAFETY: fallocate on our own memfd; PUNCH_HOLE|KEEP_SIZE zeroes the range
        // without changing the file's size.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                self.size as libc::off_t,
            )
        };
        if rc != 0 {
            let zeros = vec![0u8; 1 << 20];
            let mut off = 0;
            while off < self.size {
                let n = (self.size - off).min(zeros.len() as u64) as usize;
                let _ = self.write(off, &zeros[..n]);
                off += n as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_errors_keep_their_source() {
        // An empty mapping is refused by mmap(2).
        let err = Vram::new(0).err().expect("an empty VRAM is refused");
        assert!(matches!(err, VramError::Map { size: 0, .. }), "{err:?}");
        assert!(err
            .to_string()
            .starts_with("creating VRAM: mapping 0x0 bytes: "));
        assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<MmapRegionError>()));
        let vram = Vram::new(1 << 20).unwrap();
        assert_eq!(vram.size(), 1 << 20);
    }
}
