//! Surviving memory that a peer takes away: SIGBUS on shared mappings.
//!
//! A VMM shares guest memory as fds that this process maps. A hostile or broken
//! VMM can shrink such a file after the backend mapped it (a memfd without
//! seals, a regular file), and an fd can hide a file whose pages do not exist
//! at all (hugetlbfs without reserved pages). Touching such a page raises
//! SIGBUS, which by default kills the process.
//!
//! What can be refused up front is refused where the mapping is made (not a
//! regular file, a range past the end of the file, hugetlbfs without pages),
//! and what can be sealed is sealed (`F_SEAL_SHRINK`). For the rest, every
//! mapping of peer memory is registered here as a [`FaultGuard`]: a SIGBUS
//! whose address lies in a registered mapping replaces that whole mapping with
//! anonymous zero pages (`MAP_FIXED`), marks it faulted and returns, so the
//! faulting access completes with zeroes. The code that made the access asks
//! [`FaultGuard::faulted`] afterwards and fails it with a typed error; every
//! later access to the mapping fails the same way. libwayland-server treats
//! client shm pools the same way.
//!
//! A SIGBUS anywhere else is handed to the handler that was there before (the
//! Rust runtime's stack-overflow report, or the default action: the process
//! dies as it would have).
//!
//! The handler is installed by [`install`], which the binaries call before
//! their seccomp filter forbids `rt_sigaction`; [`FaultGuard::register`]
//! installs it too, for library users without a filter.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Most mappings registered at once: every DMA region (QEMU allows 65535),
/// plus bitmaps, VRAM and vhost-user memory tables.
pub const MAX_GUARDED_MAPPINGS: usize = 1 << 17;

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("already {MAX_GUARDED_MAPPINGS} guarded mappings")]
    Full,
    #[error("installing the SIGBUS handler: {0}")]
    Install(std::io::Error),
}

/// One registered mapping. `len == 0` means the slot is free. The signal
/// handler reads slots without locks; a slot is written only while no access
/// to its mapping can be in flight (registration before first use,
/// deregistration after the last).
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // each array element is its own slot
const FREE_SLOT: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

/// In the process's zero-filled data: pages of it that are never used cost no
/// memory.
static SLOTS: [Slot; MAX_GUARDED_MAPPINGS] = [FREE_SLOT; MAX_GUARDED_MAPPINGS];
/// Slots at or above this index have never been used: the handler stops here.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);
/// Freed slots below `HIGH_WATER`, for reuse.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
/// SIGBUS faults taken in guarded mappings since the process started.
static FAULTS: AtomicU64 = AtomicU64::new(0);
/// The SIGBUS disposition before ours, for faults that are not ours.
static PREVIOUS: OnceLock<Result<libc::sigaction, i32>> = OnceLock::new();

/// A mapping of peer memory registered with the SIGBUS handler. Drop it before
/// the mapping is unmapped (declare it before the mapping in a struct).
#[derive(Debug)]
pub struct FaultGuard {
    slot: usize,
}

impl FaultGuard {
    /// Guards `[addr, addr+len)`, a mapping this process made of a peer's fd.
    pub fn register(addr: *const u8, len: usize) -> Result<FaultGuard, GuardError> {
        install()?;
        let mut free = FREE.lock().unwrap_or_else(|p| p.into_inner());
        let slot = match free.pop() {
            Some(slot) => slot,
            None => {
                let next = HIGH_WATER.load(Ordering::Relaxed);
                if next == MAX_GUARDED_MAPPINGS {
                    return Err(GuardError::Full);
                }
                next
            }
        };
        let s = &SLOTS[slot];
        s.faulted.store(false, Ordering::Relaxed);
        s.start.store(addr as usize, Ordering::Relaxed);
        s.len.store(len, Ordering::Release);
        if slot == HIGH_WATER.load(Ordering::Relaxed) {
            HIGH_WATER.store(slot + 1, Ordering::Release);
        }
        Ok(FaultGuard { slot })
    }

    /// Whether the peer took this mapping's memory away: its contents are now
    /// anonymous zero pages, and no access to it since the fault means anything.
    #[inline]
    pub fn faulted(&self) -> bool {
        SLOTS[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for FaultGuard {
    fn drop(&mut self) {
        let s = &SLOTS[self.slot];
        s.len.store(0, Ordering::Release);
        s.start.store(0, Ordering::Release);
        FREE.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(self.slot);
    }
}

/// SIGBUS faults taken in guarded mappings since the process started.
pub fn fault_count() -> u64 {
    FAULTS.load(Ordering::Relaxed)
}

/// Installs the SIGBUS handler (once per process). Call before a seccomp
/// filter that forbids `rt_sigaction`.
pub fn install() -> Result<(), GuardError> {
    let previous = PREVIOUS.get_or_init(|| {
        // SAFETY: sigaction with a zeroed struct whose handler is an extern "C"
        // fn that does only async-signal-safe work (atomics, mmap, sigaction),
        // and a zeroed struct for the old disposition.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut sa.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &sa, &mut old) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
            Ok(old)
        }
    });
    match previous {
        Ok(_) => Ok(()),
        Err(errno) => Err(GuardError::Install(std::io::Error::from_raw_os_error(
            *errno,
        ))),
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let used = HIGH_WATER.load(Ordering::Acquire);
    for s in &SLOTS[..used] {
        let len = s.len.load(Ordering::Acquire);
        let start = s.start.load(Ordering::Acquire);
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        // Marked before the pages change: an access on another thread that
        // reads the zero pages below sees the mark when it checks afterwards.
        s.faulted.store(true, Ordering::Release);
        // SAFETY: replaces exactly the registered mapping, which its owner
        // keeps mapped while the slot is registered, with private anonymous
        // memory of the same size; nothing else lives in that range.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            FAULTS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        break;
    }
    // SAFETY: hands the signal on as the previous disposition would have
    // taken it: its handler with the same arguments, or the default action
    // (restored here; the faulting access then raises SIGBUS again).
    unsafe { chain(sig, info, ctx) }
}

unsafe fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    match PREVIOUS.get() {
        Some(Ok(old)) if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != libc::SIG_IGN => {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    std::mem::transmute(old.sa_sigaction);
                f(sig, info, ctx);
            } else {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(old.sa_sigaction);
                f(sig);
            }
        }
        _ => {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MappedMemfd;

    /// A memfd shrunk under its mapping: the read that faults completes with
    /// zeroes and the guard says so; unrelated guards stay clean.
    #[test]
    fn a_truncated_mapping_reads_zeroes_and_is_marked() {
        let ram = MappedMemfd::new("guard-test", 0x4000).unwrap();
        let other = MappedMemfd::new("guard-other", 0x1000).unwrap();
        let guard = FaultGuard::register(ram.as_ptr(), ram.len()).unwrap();
        let other_guard = FaultGuard::register(other.as_ptr(), other.len()).unwrap();
        // SAFETY: in-bounds volatile accesses to live mappings of this test.
        unsafe { std::ptr::write_volatile(ram.as_ptr().add(0x3000), 7u8) };
        assert!(!guard.faulted());
        ram.file().set_len(0x1000).unwrap();
        let before = fault_count();
        // SAFETY: as above; the page is past the file's end now, which the
        // guard turns from SIGBUS into a zero page.
        let v = unsafe { std::ptr::read_volatile(ram.as_ptr().add(0x3000)) };
        assert_eq!(v, 0);
        assert!(guard.faulted());
        assert!(!other_guard.faulted());
        assert!(fault_count() > before);
        drop(guard);
        let again = FaultGuard::register(other.as_ptr(), 1).unwrap();
        assert!(!again.faulted());
    }
}
