//! Guest memory as the device sees it: the DMA regions the client shares.
//!
//! A region either comes with an fd, which is mapped through `vm-memory` and
//! accessed directly, or without one, in which case every access becomes a
//! DMA_READ/DMA_WRITE message through a [`DmaTransport`]. Device models use the
//! [`GuestMemory`] handle and never see which of the two they got.

pub mod dirty_log;
pub mod guard;
mod mapped_memfd;
mod queue;
pub(crate) mod regions;

pub use dirty_log::{DirtyLog, DirtyLogError, LogRange};
pub use mapped_memfd::MappedMemfd;

pub use queue::{DmaDirection, DmaQueue, QueuedDma, MAX_QUEUED_DMA, MAX_QUEUED_DMA_LEN};
pub use regions::{DmaRegion, DmaRegions, MappedRegion, RegionBacking};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use vm_memory::{Bytes, GuestMemoryRegion, MemoryRegionAddress, VolatileSlice};

/// A new memfd of `len` bytes (close-on-exec, sealable): guest RAM, VRAM,
/// bitmaps — every piece of shared memory the project makes.
pub fn memfd(name: &str, len: u64) -> std::io::Result<std::fs::File> {
    memfd_with(name, len, libc::MFD_ALLOW_SEALING)
}

/// A new close-on-exec memfd of `len` bytes with extra `memfd_create` flags
/// (`MFD_ALLOW_SEALING`, `MFD_HUGETLB`).
pub fn memfd_with(name: &str, len: u64, flags: libc::c_uint) -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: memfd_create with a valid C string; the File takes the new fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(len)?;
    Ok(file)
}

/// Errors of guest-memory accesses and of the region table.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("bus mastering is disabled in the PCI command register")]
    BusMasterDisabled,
    #[error("guest address {0:#x} is not in any DMA region")]
    Unmapped(u64),
    #[error("access at {gpa:#x} (+{len:#x}) wraps around the address space")]
    Overflow { gpa: u64, len: usize },
    #[error("DMA region at {0:#x} does not allow this access direction")]
    Permission(u64),
    #[error("range {gpa:#x}+{size:#x} overlaps an existing DMA region")]
    Overlap { gpa: u64, size: u64 },
    #[error("no DMA region lies in {gpa:#x}+{size:#x}")]
    NotMapped { gpa: u64, size: u64 },
    #[error("range {gpa:#x}+{size:#x} cuts through a DMA region")]
    PartialUnmap { gpa: u64, size: u64 },
    #[error("already {0} DMA regions mapped")]
    TooManyRegions(usize),
    #[error("invalid DMA region: {0}")]
    Invalid(&'static str),
    #[error("the region's fd: {0}")]
    Fd(#[source] std::io::Error),
    #[error("the region's fd is not a regular file or memfd")]
    NotRegularFile,
    #[error("the region's file holds {len:#x} bytes, it needs {needed:#x}")]
    FileTooShort { len: u64, needed: u64 },
    #[error("mapping the region's fd failed: {0}")]
    Mmap(#[source] vm_memory::mmap::MmapRegionError),
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
    #[error("guest address {0:#x} has no fd mapping (reachable only by message)")]
    NoHostMapping(u64),
    #[error("no client connected to carry DMA messages")]
    NoTransport,
    #[error("DMA message to the client failed: {0}")]
    Transport(#[from] DmaMessageError),
    #[error("too many queued DMA transfers")]
    QueueFull,
    #[error("guest memory access failed: {0}")]
    Access(#[source] vm_memory::GuestMemoryError),
    #[error("the client took the memory of the DMA region at {0:#x} away (SIGBUS); it is unusable until unmapped")]
    Lost(u64),
}

/// Why a DMA_READ/DMA_WRITE message exchange with the client failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaMessageError {
    #[error("too many DMA requests in flight")]
    TooManyInFlight,
    #[error("sending the request: {0}")]
    Send(#[source] std::io::Error),
    #[error("DMA request at {gpa:#x}: no reply in {timeout:?}")]
    Timeout {
        gpa: u64,
        timeout: std::time::Duration,
    },
    #[error("DMA transfer at {gpa:#x}: no reply before its deadline")]
    Expired { gpa: u64 },
    #[error("DMA request at {gpa:#x}: the client answered errno {errno}")]
    Refused { gpa: u64, errno: u32 },
    #[error("DMA_READ reply at {gpa:#x} does not match the request")]
    Mismatch { gpa: u64 },
}

/// How accesses to fd-less regions reach the guest: DMA_READ/DMA_WRITE messages
/// on the client connection. Implementations chunk as the protocol requires.
pub trait DmaTransport: Send + Sync {
    fn dma_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError>;
    fn dma_write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError>;
}

/// Told of every device write to guest memory that succeeded (the write
/// tracker uses it to see the backend's own writes; dirty logging can too).
pub type WriteObserver = Arc<dyn Fn(u64, usize) + Send + Sync>;

struct Shared {
    regions: RwLock<DmaRegions>,
    /// Bumped by every change of the region table (see `regions_generation`).
    regions_generation: AtomicU64,
    bus_master: AtomicBool,
    transport: RwLock<Option<Arc<dyn DmaTransport>>>,
    write_observers: RwLock<Vec<WriteObserver>>,
    /// Set while `dirty_log` holds a log: one load on the write path otherwise.
    logging: AtomicBool,
    dirty_log: Mutex<Option<DirtyLog>>,
    stats: MemoryStats,
}

/// Device DMA counted by how it reached guest memory, for `--metrics`.
#[derive(Debug, Default)]
pub struct MemoryStats {
    pub maps: AtomicU64,
    pub unmaps: AtomicU64,
    pub read_by_fd_bytes: AtomicU64,
    pub written_by_fd_bytes: AtomicU64,
    pub read_by_message_bytes: AtomicU64,
    pub written_by_message_bytes: AtomicU64,
}

/// A cloneable handle to guest memory, usable from any thread.
///
/// Accesses to fd-mapped regions hold the region table's read lock while they copy,
/// so DMA_UNMAP (which takes the write lock) returns only after every access to the
/// departing region has finished. Message-based accesses hold no lock while they wait.
#[derive(Clone)]
pub struct GuestMemory {
    shared: Arc<Shared>,
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl GuestMemory {
    pub fn new(max_regions: usize) -> Self {
        GuestMemory {
            shared: Arc::new(Shared {
                regions: RwLock::new(DmaRegions::new(max_regions)),
                regions_generation: AtomicU64::new(0),
                bus_master: AtomicBool::new(false),
                transport: RwLock::new(None),
                write_observers: RwLock::new(Vec::new()),
                logging: AtomicBool::new(false),
                dirty_log: Mutex::new(None),
                stats: MemoryStats::default(),
            }),
        }
    }

    /// Whether device-initiated accesses are allowed (PCI Bus Master Enable).
    pub fn bus_master(&self) -> bool {
        self.shared.bus_master.load(Ordering::Acquire)
    }

    pub fn set_bus_master(&self, enabled: bool) {
        self.shared.bus_master.store(enabled, Ordering::Release);
    }

    /// Installs (or removes) the transport for fd-less regions.
    pub fn set_transport(&self, transport: Option<Arc<dyn DmaTransport>>) {
        *self
            .shared
            .transport
            .write()
            .unwrap_or_else(|p| p.into_inner()) = transport;
    }

    /// The region table, shared with other readers (device accesses).
    fn regions(&self) -> std::sync::RwLockReadGuard<'_, DmaRegions> {
        self.shared
            .regions
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the region table with exclusive access: no device access is in
    /// flight on an fd-mapped region while `f` runs.
    pub fn with_regions<R>(&self, f: impl FnOnce(&mut DmaRegions) -> R) -> R {
        let mut regions = self
            .shared
            .regions
            .write()
            .unwrap_or_else(|p| p.into_inner());
        self.shared
            .regions_generation
            .fetch_add(1, Ordering::AcqRel);
        f(&mut regions)
    }

    /// Changes whenever the region table may have changed (DMA_MAP, DMA_UNMAP,
    /// the client leaving): a model that validated guest addresses against the
    /// regions (shadow page tables) checks it at its sync points.
    pub fn regions_generation(&self) -> u64 {
        self.shared.regions_generation.load(Ordering::Acquire)
    }

    /// Reads fd-mapped guest memory for the backend's own bookkeeping (write
    /// tracking, shadowing): not device DMA, so not gated by bus mastering, and
    /// never a message, so it may run on any thread, the session's included.
    pub fn peek(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read_with(gpa, buf, None, |_, gpa, _| {
            Err(MemoryError::NoHostMapping(gpa))
        })
    }

    /// Reads, copying fd-mapped parts directly (counted in `stats`, when
    /// this is device DMA) and handing fd-less parts to `by_message`.
    fn read_with(
        &self,
        gpa: u64,
        buf: &mut [u8],
        stats: Option<&MemoryStats>,
        by_message: impl Fn(&dyn DmaTransport, u64, &mut [u8]) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        self.access(
            gpa,
            buf.len(),
            Direction::Read,
            &|| true,
            |region_off, backing, range| {
                let dst = &mut buf[range];
                match backing {
                    Backing::Mapped(m) => {
                        m.map()
                            .read_slice(dst, MemoryRegionAddress(region_off))
                            .map_err(MemoryError::Access)?;
                        if let Some(s) = stats {
                            s.read_by_fd_bytes
                                .fetch_add(dst.len() as u64, Ordering::Relaxed);
                        }
                        Ok(())
                    }
                    Backing::Message(t, gpa) => by_message(t, gpa, dst),
                }
            },
        )
    }

    /// Whether `[gpa, gpa+len)` lies in DMA regions (of any kind).
    pub fn covers(&self, gpa: u64, len: u64) -> bool {
        self.covered_by(gpa, len, |_| true)
    }

    /// Whether `[gpa, gpa+len)` lies in fd-mapped regions only.
    pub fn is_host_mapped(&self, gpa: u64, len: u64) -> bool {
        self.covered_by(gpa, len, |r| matches!(r.backing, RegionBacking::Mapped(_)))
    }

    fn covered_by(&self, gpa: u64, len: u64, accept: impl Fn(&DmaRegion) -> bool) -> bool {
        let regions = self.regions();
        let mut cur = gpa;
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        while cur < end {
            match regions.find(cur) {
                Some(r) if accept(r) => cur = r.end(),
                _ => return false,
            }
        }
        true
    }

    /// The start of `[gpa, gpa+len)`: how many of its bytes lie in the region
    /// at `gpa` (at most `len`) and whether that region is fd-mapped (else it
    /// is reached by message). Refused as the access itself would be: unmapped
    /// address, wrong direction, wrap-around.
    pub fn piece_at(
        &self,
        gpa: u64,
        len: usize,
        direction: DmaDirection,
    ) -> Result<(usize, bool), MemoryError> {
        gpa.checked_add(len as u64)
            .ok_or(MemoryError::Overflow { gpa, len })?;
        let regions = self.regions();
        let region = regions.find(gpa).ok_or(MemoryError::Unmapped(gpa))?;
        let allowed = match direction {
            DmaDirection::FromGuest => region.readable,
            DmaDirection::ToGuest => region.writable,
        };
        if !allowed {
            return Err(MemoryError::Permission(region.gpa));
        }
        let here = ((region.end() - gpa) as usize).min(len);
        Ok((here, matches!(region.backing, RegionBacking::Mapped(_))))
    }

    /// DMA counters (the server counts maps and unmaps in them).
    pub fn stats(&self) -> &MemoryStats {
        &self.shared.stats
    }

    /// The DMA counters in `--metrics` form.
    pub fn write_metrics(&self, w: &mut crate::metrics::MetricsWriter) {
        let s = &self.shared.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        w.counter(
            "umdev_dma_maps_total",
            "DMA_MAP commands taken.",
            n(&s.maps),
        );
        w.counter(
            "umdev_dma_unmaps_total",
            "DMA_UNMAP commands taken.",
            n(&s.unmaps),
        );
        w.counters(
            "umdev_dma_read_bytes_total",
            "Bytes the device read from guest memory, by path.",
            "path",
            &[
                ("fd", n(&s.read_by_fd_bytes)),
                ("message", n(&s.read_by_message_bytes)),
            ],
        );
        w.counters(
            "umdev_dma_written_bytes_total",
            "Bytes the device wrote to guest memory, by path.",
            "path",
            &[
                ("fd", n(&s.written_by_fd_bytes)),
                ("message", n(&s.written_by_message_bytes)),
            ],
        );
        w.gauge(
            "umdev_dma_regions",
            "DMA regions mapped now.",
            self.regions().len() as u64,
        );
    }

    /// Runs `f` on the host mapping of `[gpa, gpa+len)` for a device access
    /// in `direction`, when that range lies in one fd-mapped region: a copy
    /// that needs no buffer (the vGPU's COPY and BLIT). Checked as
    /// [`read`](Self::read)/[`write_while`](Self::write_while) check: bus
    /// mastering, `live` (under the region table's lock, which an unmap
    /// waits for), permissions, a region the client took away; a write is
    /// logged and observed. `None`: the range is reached by message or
    /// crosses regions, and nothing was done.
    pub fn with_mapped<R>(
        &self,
        gpa: u64,
        len: usize,
        direction: DmaDirection,
        live: &dyn Fn() -> bool,
        f: impl FnOnce(VolatileSlice<'_, ()>) -> R,
    ) -> Result<Option<R>, MemoryError> {
        self.check_bus_master()?;
        gpa.checked_add(len as u64)
            .ok_or(MemoryError::Overflow { gpa, len })?;
        let regions = self.regions();
        if !live() {
            return Err(MemoryError::Unmapped(gpa));
        }
        let Some((region, m, slice)) = mapped_slice(&regions, gpa, len, direction)? else {
            return Ok(None);
        };
        let result = f(slice);
        if m.faulted() {
            return Err(lost(region, m));
        }
        drop(regions);
        self.note_mapped(gpa, len, direction);
        Ok(Some(result))
    }

    /// Copies `len` bytes guest to guest as the device, mapping to mapping
    /// (overlap allowed: memmove), when both ranges lie each in one
    /// fd-mapped region; `false` (nothing done) otherwise. Checked as
    /// [`with_mapped`](Self::with_mapped).
    pub fn copy_mapped(
        &self,
        src: u64,
        dst: u64,
        len: usize,
        live: &dyn Fn() -> bool,
    ) -> Result<bool, MemoryError> {
        self.check_bus_master()?;
        for gpa in [src, dst] {
            gpa.checked_add(len as u64)
                .ok_or(MemoryError::Overflow { gpa, len })?;
        }
        let regions = self.regions();
        if !live() {
            return Err(MemoryError::Unmapped(dst));
        }
        let from = mapped_slice(&regions, src, len, DmaDirection::FromGuest)?;
        let to = mapped_slice(&regions, dst, len, DmaDirection::ToGuest)?;
        let (Some((sr, sm, s)), Some((dr, dm, d))) = (from, to) else {
            return Ok(false);
        };
        s.copy_to_volatile_slice(d);
        for (region, m) in [(sr, sm), (dr, dm)] {
            if m.faulted() {
                return Err(lost(region, m));
            }
        }
        drop(regions);
        self.note_mapped(src, len, DmaDirection::FromGuest);
        self.note_mapped(dst, len, DmaDirection::ToGuest);
        Ok(true)
    }

    /// Counts a direct access, and logs and observes a write.
    fn note_mapped(&self, gpa: u64, len: usize, direction: DmaDirection) {
        let s = &self.shared.stats;
        match direction {
            DmaDirection::FromGuest => {
                s.read_by_fd_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            DmaDirection::ToGuest => {
                s.written_by_fd_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                self.log_write(gpa, len);
                self.notify_observers(gpa, len);
            }
        }
    }

    /// Tells the write observers of a device write that did not go through
    /// [`write`](Self::write) (a queued DMA's message-borne part).
    pub fn observe_write(&self, gpa: u64, len: usize) {
        self.shared
            .stats
            .written_by_message_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        self.log_write(gpa, len);
        self.notify_observers(gpa, len);
    }

    fn notify_observers(&self, gpa: u64, len: usize) {
        let observers = self
            .shared
            .write_observers
            .read()
            .unwrap_or_else(|p| p.into_inner());
        for o in observers.iter() {
            o(gpa, len);
        }
    }

    /// Reads guest memory at `gpa` into `buf` as the device (gated by bus mastering).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.check_bus_master()?;
        let s = &self.shared.stats;
        self.read_with(gpa, buf, Some(s), |t, gpa, dst| {
            t.dma_read(gpa, dst)?;
            s.read_by_message_bytes
                .fetch_add(dst.len() as u64, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Adds an observer of device writes.
    pub fn add_write_observer(&self, observer: WriteObserver) {
        self.shared
            .write_observers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(observer);
    }

    /// Writes `buf` to guest memory at `gpa` as the device (gated by bus mastering).
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.write_while(gpa, buf, || true)
    }

    /// `write`, for as long as `live` says the device state that asked for it
    /// still holds: `live` is checked under the region table's lock before each
    /// piece, so a device reset that comes after the regions are dropped (the
    /// client leaving) stops a write planned before it from reaching the next
    /// client's memory. A piece refused that way is `Unmapped`.
    pub fn write_while(
        &self,
        gpa: u64,
        buf: &[u8],
        live: impl Fn() -> bool,
    ) -> Result<(), MemoryError> {
        let written = self.write_unobserved(gpa, buf, &live);
        // Logged even if it failed part-way: some of it may have landed.
        self.log_write(gpa, buf.len());
        written?;
        self.notify_observers(gpa, buf.len());
        Ok(())
    }

    fn dirty_log(&self) -> std::sync::MutexGuard<'_, Option<DirtyLog>> {
        self.shared
            .dirty_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    #[inline]
    fn log_write(&self, gpa: u64, len: usize) {
        if self.shared.logging.load(Ordering::Acquire) {
            if let Some(log) = self.dirty_log().as_mut() {
                log.mark(gpa, len);
            }
        }
    }

    /// Starts logging the device's writes to `ranges` (none: everywhere) for
    /// migration; see [`dirty_log`].
    pub fn start_dirty_log(
        &self,
        ranges: Vec<LogRange>,
        page_size: u64,
    ) -> Result<(), DirtyLogError> {
        let mut log = self.dirty_log();
        if log.is_some() {
            return Err(DirtyLogError::AlreadyStarted);
        }
        *log = Some(DirtyLog::new(ranges, page_size)?);
        self.shared.logging.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops dirty logging and forgets the log; an error if it was off.
    pub fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut log = self.dirty_log();
        self.shared.logging.store(false, Ordering::Release);
        log.take().map(drop).ok_or(DirtyLogError::NotStarted)
    }

    /// The pages the device wrote in `[iova, iova+length)` since the last
    /// report, one bit per `page_size`, and clears them ([`DirtyLog::report`]).
    pub fn report_dirty(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        max_bytes: usize,
    ) -> Result<Vec<u64>, DirtyLogError> {
        self.dirty_log()
            .as_mut()
            .ok_or(DirtyLogError::NotStarted)?
            .report(iova, length, page_size, max_bytes)
    }

    fn write_unobserved(
        &self,
        gpa: u64,
        buf: &[u8],
        live: &dyn Fn() -> bool,
    ) -> Result<(), MemoryError> {
        self.check_bus_master()?;
        let stats = &self.shared.stats;
        self.access(
            gpa,
            buf.len(),
            Direction::Write,
            live,
            |region_off, backing, range| {
                let src = &buf[range];
                match backing {
                    Backing::Mapped(m) => {
                        m.map()
                            .write_slice(src, MemoryRegionAddress(region_off))
                            .map_err(MemoryError::Access)?;
                        stats
                            .written_by_fd_bytes
                            .fetch_add(src.len() as u64, Ordering::Relaxed);
                        Ok(())
                    }
                    Backing::Message(t, gpa) => {
                        t.dma_write(gpa, src)?;
                        stats
                            .written_by_message_bytes
                            .fetch_add(src.len() as u64, Ordering::Relaxed);
                        Ok(())
                    }
                }
            },
        )
    }

    fn check_bus_master(&self) -> Result<(), MemoryError> {
        if self.bus_master() {
            Ok(())
        } else {
            Err(MemoryError::BusMasterDisabled)
        }
    }

    /// Splits `[gpa, gpa+len)` into per-region pieces and calls `copy` on each, with
    /// the offset in the region, how to reach it and the matching range of the buffer.
    fn access(
        &self,
        gpa: u64,
        len: usize,
        dir: Direction,
        live: &dyn Fn() -> bool,
        mut copy: impl FnMut(u64, Backing<'_>, std::ops::Range<usize>) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        gpa.checked_add(len as u64)
            .ok_or(MemoryError::Overflow { gpa, len })?;
        let mut done = 0usize;
        while done < len {
            let cur = gpa + done as u64;
            let regions = self.regions();
            let region = regions.find(cur).ok_or(MemoryError::Unmapped(cur))?;
            if !live() {
                return Err(MemoryError::Unmapped(cur));
            }
            let allowed = match dir {
                Direction::Read => region.readable,
                Direction::Write => region.writable,
            };
            if !allowed {
                return Err(MemoryError::Permission(region.gpa));
            }
            let region_off = cur - region.gpa;
            let chunk = ((region.size - region_off) as usize).min(len - done);
            let range = done..done + chunk;
            match &region.backing {
                RegionBacking::Mapped(m) => {
                    // Checked before (a region known lost is not touched) and
                    // after (a copy that met the loss read or wrote zero pages).
                    if !m.faulted() {
                        copy(region_off, Backing::Mapped(m), range)?;
                    }
                    if m.faulted() {
                        return Err(lost(region, m));
                    }
                }
                RegionBacking::Message => {
                    drop(regions);
                    let transport: Arc<dyn DmaTransport> = self
                        .shared
                        .transport
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .unwrap_or_else(|| Arc::new(Disconnected));
                    copy(region_off, Backing::Message(&*transport, cur), range)?;
                }
            }
            done += chunk;
        }
        Ok(())
    }
}

/// The error for an access to a region the client took away (SIGBUS),
/// logged the first time.
fn lost(region: &DmaRegion, m: &MappedRegion) -> MemoryError {
    if m.first_report() {
        tracing::error!(
            gpa = format_args!("{:#x}", region.gpa),
            size = format_args!("{:#x}", region.size),
            "the client took a DMA region's memory away (SIGBUS); \
             its accesses fail until it is unmapped"
        );
    }
    MemoryError::Lost(region.gpa)
}

/// A range's host view, with the region it lies in (for the loss check).
type HostView<'a> = (&'a DmaRegion, &'a MappedRegion, VolatileSlice<'a, ()>);

/// The host view of `[gpa, gpa+len)` if it lies in one fd-mapped region
/// that allows `direction`; `None` if it is reached by message or crosses
/// regions (the caller copies through a buffer then).
fn mapped_slice(
    regions: &DmaRegions,
    gpa: u64,
    len: usize,
    direction: DmaDirection,
) -> Result<Option<HostView<'_>>, MemoryError> {
    let region = regions.find(gpa).ok_or(MemoryError::Unmapped(gpa))?;
    let allowed = match direction {
        DmaDirection::FromGuest => region.readable,
        DmaDirection::ToGuest => region.writable,
    };
    if !allowed {
        return Err(MemoryError::Permission(region.gpa));
    }
    let RegionBacking::Mapped(m) = &region.backing else {
        return Ok(None);
    };
    if gpa + len as u64 > region.end() {
        return Ok(None);
    }
    if m.faulted() {
        return Err(lost(region, m));
    }
    let slice = m
        .map()
        .get_slice(MemoryRegionAddress(gpa - region.gpa), len)
        .map_err(MemoryError::Access)?;
    Ok(Some((region, m, slice)))
}

/// The transport while no client is connected: every message access fails.
struct Disconnected;

impl DmaTransport for Disconnected {
    fn dma_read(&self, _: u64, _: &mut [u8]) -> Result<(), MemoryError> {
        Err(MemoryError::NoTransport)
    }

    fn dma_write(&self, _: u64, _: &[u8]) -> Result<(), MemoryError> {
        Err(MemoryError::NoTransport)
    }
}

enum Backing<'a> {
    Mapped(&'a MappedRegion),
    Message(&'a dyn DmaTransport, u64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    /// What the vGPU's engine relies on (found by its soak): a write planned
    /// before a reset is refused once `live` says so, and the region table's
    /// changes are counted.
    #[test]
    fn write_while_stops_when_the_state_is_gone_and_changes_are_counted() {
        let fd = OwnedFd::from(memfd("wt", 0x2000).unwrap());
        let memory = GuestMemory::new(4);
        memory.set_bus_master(true);
        let g0 = memory.regions_generation();
        let region = DmaRegion::mapped(0x1000, 0x2000, fd, 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        assert_ne!(memory.regions_generation(), g0);
        let live = std::sync::atomic::AtomicBool::new(true);
        let still = || live.load(Ordering::Acquire);
        memory.write_while(0x1ffe, &[1, 2, 3, 4], still).unwrap();
        live.store(false, Ordering::Release);
        assert!(matches!(
            memory.write_while(0x1000, &[9; 4], still),
            Err(MemoryError::Unmapped(0x1000))
        ));
        let mut back = [0; 6];
        memory.read(0x1ffe, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4, 0, 0]);
        let g1 = memory.regions_generation();
        memory.with_regions(|r| r.clear());
        assert_ne!(memory.regions_generation(), g1);
    }
}
