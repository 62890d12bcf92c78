//! The userfaultfd write-protect source (umdev vfio-user extension).
//!
//! The VMM registers its own guest-memory mapping with a userfaultfd in
//! write-protect mode and passes us the fd with the mapping's address. We
//! write-protect tracked pages in the VMM's address space through it; the first
//! guest write to one blocks the writer and reaches us as a fault, which we
//! resolve by making the page writable and waking the writer. The page is then
//! compared (at once under the strict policy, at the next sync otherwise) and
//! protected again unless the policy leaves it out of sync.
//!
//! A uffd registered by the backend on its *own* mapping would see nothing the
//! guest writes: only the VMM's mapping is the one the guest writes through.
//!
//! Fault messages are read by the session's event loop (`crate::event`): each
//! registered uffd is an event source of the tracker's set, not a thread.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use tracing::{debug, warn};

use crate::event::{EventSet, EventSource};

use super::{Gfn, Policy, SourceKind, TrackError, WriteSource, PAGE_SIZE};

// linux/userfaultfd.h
const UFFDIO: u64 = 0xAA;
const UFFDIO_WRITEPROTECT_NR: u64 = 0x06;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect) on x86_64/aarch64.
const UFFDIO_WRITEPROTECT: u64 = (3 << 30) | (24 << 16) | (UFFDIO << 8) | UFFDIO_WRITEPROTECT_NR;

#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

const UFFDIO_API: u64 = (3 << 30) | (24 << 16) | (UFFDIO << 8) | 0x3F;
const UFFDIO_REGISTER: u64 = (3 << 30) | (32 << 16) | (UFFDIO << 8);
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;

/// The VMM's side of the uffd extension: a userfaultfd registered in
/// write-protect mode on `[addr, addr+len)` of the *calling* process's mapping of
/// guest memory (shared memory), ready to hand to the backend. It asks for exact
/// fault addresses (Linux 5.18+), so a strict fault that changed nothing visible
/// is reported as its 8-byte entry rather than its page.
pub fn register_write_protect(addr: u64, len: u64) -> std::io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    let last = std::io::Error::last_os_error;
    // SAFETY: userfaultfd(2) returns a new fd that the OwnedFd takes over.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(last());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = [
        UFFD_API,
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_EXACT_ADDRESS,
        0u64,
    ];
    // SAFETY: UFFDIO_API reads and writes the 24-byte struct uffdio_api above.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) } != 0 {
        return Err(last());
    }
    let mut reg = [addr, len, UFFDIO_REGISTER_MODE_WP, 0u64];
    // SAFETY: UFFDIO_REGISTER reads and writes the 32-byte struct uffdio_register
    // above; it registers the caller's own mapping.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER as _, reg.as_mut_ptr()) } != 0 {
        return Err(last());
    }
    Ok(fd)
}

/// What the VMM shares: its mapping of DMA region `[gpa, gpa+size)` starts at
/// `vmm_address` in its address space, registered in WP mode with `uffd`.
pub struct UffdRegistration {
    pub gpa: u64,
    pub size: u64,
    pub vmm_address: u64,
    pub uffd: OwnedFd,
}

impl UffdRegistration {
    /// Checks that `uffd` really is a userfaultfd.
    pub fn new(gpa: u64, size: u64, vmm_address: u64, uffd: OwnedFd) -> Result<Self, TrackError> {
        let kind = crate::fd::kind(uffd.as_raw_fd());
        if kind != "anon_inode:[userfaultfd]" {
            return Err(TrackError::NotUserfaultfd(kind.into()));
        }
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
            || !vmm_address.is_multiple_of(PAGE_SIZE)
            || size == 0
        {
            return Err(TrackError::Unaligned {
                what: "userfaultfd region",
                gpa,
                size,
            });
        }
        vmm_address.checked_add(size).ok_or(TrackError::Wraps {
            what: "userfaultfd region",
        })?;
        Ok(UffdRegistration {
            gpa,
            size,
            vmm_address,
            uffd,
        })
    }
}

/// A write fault, as the event loop read it.
pub(super) struct FaultEvent {
    registration: u64,
    address: u64,
}

/// A fault resolved: its page, the guest address it names (exact when the
/// VMM's uffd has UFFD_FEATURE_EXACT_ADDRESS, else the page's), and whether the
/// page is compared at once (strict).
pub(super) struct Resolved {
    pub gfn: Gfn,
    pub gpa: u64,
    pub strict: bool,
}

pub(super) type Sink = Arc<dyn Fn(FaultEvent) + Send + Sync>;

struct Registration {
    gpa: u64,
    size: u64,
    vmm_address: u64,
    uffd: Arc<OwnedFd>,
    /// Where its fault reader is registered; it leaves with the registration.
    events: Arc<EventSet>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.events.remove(self.uffd.as_raw_fd());
    }
}

/// Reads fault messages from one uffd when it is readable.
struct FaultReader {
    id: u64,
    uffd: Arc<OwnedFd>,
    sink: Sink,
}

impl EventSource for FaultReader {
    fn fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    fn ready(&self) {
        read_faults(self.id, &self.uffd, &*self.sink);
    }
}

impl Registration {
    fn protect(&self, gfn: Gfn, wp: bool) -> bool {
        let arg = UffdioWriteprotect {
            start: self.vmm_address + (gfn * PAGE_SIZE - self.gpa),
            len: PAGE_SIZE,
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a uffdio_writeprotect we own; it acts on
        // the VMM's mapping the uffd was registered for, never on our memory.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &arg) };
        if rc != 0 {
            warn!(
                gfn,
                wp,
                "UFFDIO_WRITEPROTECT failed: {}",
                std::io::Error::last_os_error()
            );
        }
        rc == 0
    }
}

#[derive(Default)]
struct PageMode {
    /// Written since last compared.
    dirty: bool,
    faults_since_sync: u32,
    /// Left writable, compared at every sync.
    out_of_sync: bool,
    quiet_syncs: u32,
}

pub struct UserfaultSource {
    policy: Policy,
    regs: BTreeMap<u64, Registration>,
    next_reg: u64,
    ids: HashMap<u64, u64>,
    pages: HashMap<Gfn, PageMode>,
    faults: u64,
    sink: Option<(Sink, Arc<EventSet>)>,
}

impl UserfaultSource {
    pub fn new(policy: Policy) -> Self {
        UserfaultSource {
            policy,
            regs: BTreeMap::new(),
            next_reg: 1,
            ids: HashMap::new(),
            pages: HashMap::new(),
            faults: 0,
            sink: None,
        }
    }

    /// Faults go to `sink`; the uffds are watched through `events`.
    pub(super) fn set_sink(&mut self, sink: Sink, events: Arc<EventSet>) {
        self.sink = Some((sink, events));
    }

    fn reg_for(&self, gfn: Gfn) -> Option<&Registration> {
        let gpa = gfn * PAGE_SIZE;
        self.regs
            .range(..=gpa)
            .next_back()
            .map(|(_, r)| r)
            .filter(|r| gpa - r.gpa < r.size)
    }

    /// Resolves a fault: the page becomes writable and the writer runs on.
    pub(super) fn fault(&mut self, event: FaultEvent) -> Option<Resolved> {
        let gpa_base = *self.ids.get(&event.registration)?;
        let reg = self.regs.get(&gpa_base)?;
        let offset = event.address.checked_sub(reg.vmm_address)?;
        if offset >= reg.size {
            return None;
        }
        let gpa = reg.gpa + offset;
        let gfn = gpa / PAGE_SIZE;
        self.faults += 1;
        let policy = self.policy;
        let mode = self.pages.entry(gfn).or_default();
        mode.dirty = true;
        mode.faults_since_sync += 1;
        let threshold = match policy {
            Policy::Strict => u32::MAX,
            Policy::OutOfSync { threshold } | Policy::Adaptive { threshold, .. } => threshold,
        };
        if mode.faults_since_sync >= threshold {
            mode.out_of_sync = true;
        }
        let strict = !mode.out_of_sync;
        // Writable again: this wakes the blocked writer.
        let reg = self.reg_for(gfn)?;
        reg.protect(gfn, false);
        Some(Resolved { gfn, gpa, strict })
    }
}

impl WriteSource for UserfaultSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Userfault
    }

    fn candidates(&mut self, gfns: &[Gfn], out: &mut Vec<Gfn>) {
        for &gfn in gfns {
            if self.reg_for(gfn).is_none() {
                // No uffd for this memory: scan it.
                out.push(gfn);
                continue;
            }
            let mode = self.pages.entry(gfn).or_default();
            mode.faults_since_sync = 0;
            if mode.dirty || mode.out_of_sync {
                out.push(gfn);
            }
        }
    }

    fn tracked(&mut self, gfn: Gfn) {
        if let Some(reg) = self.reg_for(gfn) {
            reg.protect(gfn, true);
            self.pages.insert(gfn, PageMode::default());
        }
    }

    fn untracked(&mut self, gfn: Gfn) {
        if let Some(reg) = self.reg_for(gfn) {
            reg.protect(gfn, false);
        }
        self.pages.remove(&gfn);
    }

    fn prepare_compare(&mut self, gfn: Gfn) {
        let policy = self.policy;
        let Some(mode) = self.pages.get_mut(&gfn) else {
            return;
        };
        if let Policy::Adaptive { quiet_syncs, .. } = policy {
            if mode.out_of_sync && mode.quiet_syncs >= quiet_syncs {
                mode.out_of_sync = false;
            }
        }
        if mode.out_of_sync {
            return;
        }
        // Protect before comparing: a write that lands before this is seen by the
        // comparison, one after it faults again.
        mode.dirty = false;
        if let Some(reg) = self.reg_for(gfn) {
            reg.protect(gfn, true);
        }
    }

    fn compared(&mut self, gfn: Gfn, changed: bool) {
        if let Some(mode) = self.pages.get_mut(&gfn) {
            if changed {
                mode.quiet_syncs = 0;
            } else {
                mode.quiet_syncs += 1;
            }
        }
    }

    fn region_removed(&mut self, gpa: u64, size: u64) {
        let gone: Vec<u64> = self
            .regs
            .iter()
            .filter(|(_, r)| r.gpa >= gpa && r.gpa - gpa < size)
            .map(|(&k, _)| k)
            .collect();
        for k in gone {
            self.regs.remove(&k);
            self.ids.retain(|_, v| *v != k);
        }
    }

    fn add_uffd(&mut self, reg: UffdRegistration) -> Result<(), TrackError> {
        let (sink, events) = self.sink.clone().ok_or(TrackError::NoFaultHandler)?;
        let overlaps = self
            .regs
            .values()
            .any(|r| reg.gpa < r.gpa + r.size && r.gpa < reg.gpa + reg.size);
        if overlaps {
            return Err(TrackError::UffdOverlap {
                gpa: reg.gpa,
                size: reg.size,
            });
        }
        let id = self.next_reg;
        self.next_reg += 1;
        // Read only when readable, never blocking the event loop.
        crate::fd::ensure_nonblocking(reg.uffd.as_raw_fd()).map_err(TrackError::Fd)?;
        let uffd = Arc::new(reg.uffd);
        events.insert(Arc::new(FaultReader {
            id,
            uffd: uffd.clone(),
            sink,
        }));
        self.ids.insert(id, reg.gpa);
        self.regs.insert(
            reg.gpa,
            Registration {
                gpa: reg.gpa,
                size: reg.size,
                vmm_address: reg.vmm_address,
                uffd,
                events,
            },
        );
        debug!(gpa = reg.gpa, size = reg.size, "userfaultfd registered");
        Ok(())
    }

    fn faults(&self) -> u64 {
        self.faults
    }

    fn as_userfault(&mut self) -> Option<&mut UserfaultSource> {
        Some(self)
    }
}

/// Reads the fault messages waiting in `uffd` (non-blocking) and hands each
/// write fault to `sink`.
fn read_faults(id: u64, uffd: &OwnedFd, sink: &(dyn Fn(FaultEvent) + Send + Sync)) {
    loop {
        let mut msg = [0u8; 32];
        // SAFETY: reads one 32-byte uffd_msg into a local buffer.
        let r = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if r != 32 {
            // Nothing more (EAGAIN), or the fd failed: back to the loop.
            return;
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let flags = u64::from_le_bytes(msg[8..16].try_into().unwrap_or_default());
        let address = u64::from_le_bytes(msg[16..24].try_into().unwrap_or_default());
        if flags & UFFD_PAGEFAULT_FLAG_WP == 0 {
            continue;
        }
        sink(FaultEvent {
            registration: id,
            address,
        });
    }
}
