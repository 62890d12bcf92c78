//! The front-end's memory table as the glue touches it: a snapshot of the
//! crate's `GuestMemoryAtomic`, every region's mapping registered with the
//! SIGBUS guard (`memory::guard`), and the verdict on the fds behind it.
//!
//! The `vhost-user-backend` crate maps SET_MEM_TABLE / ADD_MEM_REG regions
//! itself (vm-memory's `MmapRegion::from_file`, `MAP_SHARED | MAP_NORESERVE`)
//! and checks nothing about the fd: a pipe, a socket or `/dev/null` fails at
//! mmap (`ENODEV`, the front-end gets an error reply), but a character device
//! that can be mapped (`/dev/zero`) or a regular file shorter than the range
//! is mapped as it is, and touching a page past the end of a file raises
//! SIGBUS. It also installs the new memory *before* it tells the backend
//! (`update_memory`), and an error from there does not take it back. So:
//! - every mapping is guarded, whatever the verdict, as soon as the glue
//!   hears of it (the crate itself reads the used index through the new
//!   memory at the next SET_VRING_ADDR);
//! - a region whose fd is not a regular file (memfds and hugetlbfs files
//!   are), or whose file is shorter than the range, makes the table
//!   *refused*: the queues do not touch it, and `update_memory` fails, on
//!   which the crate sends an error reply (with REPLY_ACK) and ends the
//!   connection (its request loop stops at the first handler error); the
//!   next front-end gets a fresh device;
//! - a file that can be sealed is sealed against shrinking (`F_SEAL_SHRINK`);
//! - the queues are processed only through the snapshot the glue checked,
//!   never through memory the crate installed a moment before.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::dirty_log::VhostMemory;
use crate::fd::kind as fd_kind;
use crate::memory::guard::{FaultGuard, GuardError};
use crate::memory::regions::{is_hugetlbfs, seal_against_shrinking};

/// Why a memory table is not used.
#[derive(Debug, thiserror::Error)]
pub enum MemoryTableError {
    #[error("region {index} (guest {gpa:#x}): its fd is {kind}, not a regular file or memfd")]
    NotAFile {
        index: usize,
        gpa: u64,
        kind: String,
    },
    #[error(
        "region {index} (guest {gpa:#x}): the file holds {file_len:#x} bytes, the region \
         needs {end:#x}"
    )]
    PastEndOfFile {
        index: usize,
        gpa: u64,
        file_len: u64,
        end: u64,
    },
    #[error("region {index} (guest {gpa:#x}): fstat: {source}")]
    Fstat {
        index: usize,
        gpa: u64,
        source: std::io::Error,
    },
    #[error("region {index} (guest {gpa:#x}): {source}")]
    Guard {
        index: usize,
        gpa: u64,
        source: GuardError,
    },
}

/// One region's mapping, registered with the SIGBUS handler.
#[derive(Debug)]
struct RegionGuard {
    guard: FaultGuard,
    addr: usize,
    len: usize,
}

/// A memory table the glue has checked (see the module documentation).
pub struct GuardedMemory {
    // Declared before `mem`: the guards are dropped (deregistered) before the
    // snapshot lets the mappings go. A region that stays in the next table
    // (ADD_MEM_REG, REM_MEM_REG of another one) shares its guard with it.
    guards: Vec<Arc<RegionGuard>>,
    refused: Option<MemoryTableError>,
    /// The loss of memory was logged.
    reported: AtomicBool,
    mem: Arc<VhostMemory>,
}

impl GuardedMemory {
    /// The table of a connection before SET_MEM_TABLE.
    pub fn empty() -> Self {
        GuardedMemory {
            guards: Vec::new(),
            refused: None,
            reported: AtomicBool::new(false),
            mem: Arc::new(VhostMemory::new()),
        }
    }

    /// Guards and checks `mem`, the table the front-end just installed;
    /// `previous` is the table it replaces (guards of regions kept are
    /// shared).
    pub fn new(mem: Arc<VhostMemory>, previous: &GuardedMemory) -> Self {
        let mut guards = Vec::new();
        let mut refused = None;
        for (index, region) in mem.iter().enumerate() {
            let gpa = region.start_addr().0;
            let addr = region.as_ptr() as usize;
            let len = region.len() as usize;
            // The previous table is alive here, so a mapping at the same
            // place is the same mapping.
            let kept = previous
                .guards
                .iter()
                .find(|g| g.addr == addr && g.len == len)
                .cloned();
            match kept.map(Ok).unwrap_or_else(|| {
                FaultGuard::register(addr as *const u8, len)
                    .map(|guard| Arc::new(RegionGuard { guard, addr, len }))
            }) {
                Ok(g) => guards.push(g),
                Err(source) => {
                    refused.get_or_insert(MemoryTableError::Guard { index, gpa, source });
                }
            }
            if let Err(e) = check_file(index, gpa, region) {
                refused.get_or_insert(e);
            }
        }
        GuardedMemory {
            guards,
            refused,
            reported: AtomicBool::new(false),
            mem,
        }
    }

    /// The snapshot, for descriptor chains, rings and the model.
    pub fn memory(&self) -> &Arc<VhostMemory> {
        &self.mem
    }

    /// Why this table is not used, if it is not.
    pub fn refused(&self) -> Option<&MemoryTableError> {
        self.refused.as_ref()
    }

    /// Whether the front-end took memory of this table away (a SIGBUS in one
    /// of its mappings, which now read as zeroes).
    pub fn lost(&self) -> bool {
        self.guards.iter().any(|g| g.guard.faulted())
    }

    /// Whether this is the first time the loss is noticed (to log it once).
    pub fn first_report(&self) -> bool {
        !self.reported.swap(true, Ordering::Relaxed)
    }

    /// Guest addresses of the regions that were taken away.
    pub fn lost_regions(&self) -> Vec<u64> {
        self.mem
            .iter()
            .filter(|r| {
                let addr = r.as_ptr() as usize;
                self.guards
                    .iter()
                    .any(|g| g.addr == addr && g.guard.faulted())
            })
            .map(|r| r.start_addr().0)
            .collect()
    }
}

/// Refuses a region whose fd is not a regular file or is shorter than the
/// range; seals what can be sealed.
fn check_file(
    index: usize,
    gpa: u64,
    region: &vm_memory::GuestRegionMmap<super::dirty_log::LogBitmap>,
) -> Result<(), MemoryTableError> {
    // The crate maps every region from the fd the front-end sent.
    let Some(fo) = region.file_offset() else {
        return Ok(());
    };
    let file = fo.file();
    let meta = file
        .metadata()
        .map_err(|source| MemoryTableError::Fstat { index, gpa, source })?;
    if !meta.is_file() {
        return Err(MemoryTableError::NotAFile {
            index,
            gpa,
            kind: fd_kind(file.as_raw_fd()),
        });
    }
    let end = fo.start().saturating_add(region.len());
    if meta.len() < end {
        return Err(MemoryTableError::PastEndOfFile {
            index,
            gpa,
            file_len: meta.len(),
            end,
        });
    }
    seal_against_shrinking(file);
    if is_hugetlbfs(file) {
        // The crate maps with MAP_NORESERVE, so huge pages are not reserved
        // at mmap: a file with none behind it faults at first touch, which
        // the guard turns into a lost table.
        tracing::debug!(
            index,
            "region on hugetlbfs: mapped without reservation, guarded"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use vm_memory::{Bytes, FileOffset, GuestAddress, GuestRegionMmap};

    fn table(file: File, offset: u64, len: usize) -> Arc<VhostMemory> {
        let region = vm_memory::MmapRegion::from_file(FileOffset::new(file, offset), len).unwrap();
        Arc::new(
            VhostMemory::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
                .unwrap(),
        )
    }

    /// What the crate maps without looking: a character device and a file
    /// shorter than the region are refused; a memfd is taken and sealed.
    #[test]
    fn fds_that_cannot_be_trusted_are_refused() {
        let empty = GuardedMemory::empty();
        let zero = File::options()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .unwrap();
        let t = GuardedMemory::new(table(zero, 0, 0x4000), &empty);
        assert!(matches!(
            t.refused(),
            Some(MemoryTableError::NotAFile { .. })
        ));
        let short = crate::memory::memfd("short", 0x1000).unwrap();
        let t = GuardedMemory::new(table(short, 0, 0x4000), &empty);
        assert!(matches!(
            t.refused(),
            Some(MemoryTableError::PastEndOfFile { .. })
        ));
        let ram = crate::memory::memfd("ram", 0x4000).unwrap();
        let ours = ram.try_clone().unwrap();
        let t = GuardedMemory::new(table(ram, 0, 0x4000), &empty);
        assert!(t.refused().is_none());
        assert!(ours.set_len(0x1000).is_err(), "sealed against shrinking");
    }

    /// An unsealable memfd shrunk under the table: the access reads zeroes,
    /// the table says it lost memory; a table keeping the region shares its
    /// guard (and its loss).
    #[test]
    fn memory_taken_away_is_noticed() {
        let empty = GuardedMemory::empty();
        let ram = crate::memory::memfd_with("ram", 0x4000, 0).unwrap();
        let ours = ram.try_clone().unwrap();
        let mem = table(ram, 0, 0x4000);
        let t = GuardedMemory::new(mem.clone(), &empty);
        mem.write_obj(7u8, GuestAddress(0x3000)).unwrap();
        assert!(!t.lost());
        ours.set_len(0x1000).unwrap();
        let v: u8 = mem.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!(v, 0);
        assert!(t.lost());
        assert_eq!(t.lost_regions(), vec![0]);
        assert!(t.first_report());
        assert!(!t.first_report());
        let next = GuardedMemory::new(mem, &t);
        assert!(next.lost());
    }
}
