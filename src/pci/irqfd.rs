//! An interrupt eventfd the client installed: checked when it arrives and
//! signalled without ever blocking.
//!
//! A client may hand over anything as an "eventfd": a pipe or a socket whose
//! buffer it never drains, a regular file, an eventfd whose counter it filled
//! to the maximum. A blocking write to any of those would stop the thread that
//! raises the interrupt, and with it the session (no client served again, no
//! termination signal taken). So the fd must be an eventfd ([`IrqFd::new`]
//! refuses the rest, and SET_IRQS fails), it is switched to `O_NONBLOCK`, and
//! a signal that would block is dropped: an eventfd that cannot take another
//! increment already holds a non-zero count, so its reader sees an interrupt
//! anyway — the signal is coalesced, not lost. It is logged once per fd.
//!
//! `O_NONBLOCK` is a flag of the open file, which the client shares: QEMU and
//! Cloud Hypervisor make their eventfds non-blocking themselves, and KVM's
//! irqfd does not read through the file, so nobody who uses an eventfd as one
//! notices.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum IrqFdError {
    #[error("interrupt fd {fd} is not an eventfd but {kind}")]
    NotEventfd { fd: RawFd, kind: String },
    #[error("making interrupt fd {fd} non-blocking: {source}")]
    NonBlocking { fd: RawFd, source: std::io::Error },
}

/// An eventfd that raises one interrupt vector (or unmasks INTx).
#[derive(Debug)]
pub struct IrqFd {
    fd: OwnedFd,
    /// A signal was dropped because the counter was full (logged once).
    saturated: AtomicBool,
}

impl IrqFd {
    /// Takes `fd` if it is an eventfd, and makes it non-blocking.
    pub fn new(fd: OwnedFd) -> Result<IrqFd, IrqFdError> {
        let raw = fd.as_raw_fd();
        let kind = crate::fd::kind(raw);
        if kind != crate::fd::EVENTFD {
            return Err(IrqFdError::NotEventfd { fd: raw, kind });
        }
        crate::fd::ensure_nonblocking(raw)
            .map_err(|source| IrqFdError::NonBlocking { fd: raw, source })?;
        Ok(IrqFd {
            fd,
            saturated: AtomicBool::new(false),
        })
    }

    /// Adds one to the counter, never blocking. Returns whether the count
    /// went up; a full counter (the reader has not read for 2^64-2 signals)
    /// keeps its pending interrupt and this one is coalesced into it.
    pub fn signal(&self) -> bool {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n == 8 {
            return true;
        }
        let err = std::io::Error::last_os_error();
        if !self.saturated.swap(true, Ordering::Relaxed) {
            warn!(
                fd = self.fd.as_raw_fd(),
                "interrupt eventfd not signalled ({err}); its reader still has one pending \
                 if the counter is full (logged once per eventfd)"
            );
        }
        false
    }

    /// Takes the counter (for an unmask eventfd the client signals); 0 if
    /// nothing was there.
    pub fn take(&self) -> u64 {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
        if n == 8 {
            count
        } else {
            0
        }
    }
}

impl AsRawFd for IrqFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn eventfd(initial: u32) -> OwnedFd {
        // SAFETY: eventfd2 with integer arguments; the OwnedFd takes the new fd.
        unsafe { OwnedFd::from_raw_fd(libc::eventfd(initial, libc::EFD_CLOEXEC)) }
    }

    #[test]
    fn pipes_sockets_and_files_are_refused() {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two new fds into `p`, which the OwnedFds take.
        let (r, w) = unsafe {
            assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
        };
        assert!(matches!(IrqFd::new(w), Err(IrqFdError::NotEventfd { .. })));
        drop(r);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(IrqFd::new(OwnedFd::from(a)).is_err());
        let f = crate::memory::memfd("irqfd-test", 8).unwrap();
        assert!(IrqFd::new(OwnedFd::from(f)).is_err());
        assert!(IrqFd::new(eventfd(0)).is_ok());
    }

    /// A counter at its maximum: the signal is dropped, not blocked on.
    #[test]
    fn a_full_counter_never_blocks() {
        let fd = eventfd(0);
        let max: u64 = u64::MAX - 1;
        // SAFETY: writes 8 bytes from a live u64 to the eventfd (not yet
        // non-blocking: a full counter is reached without blocking).
        let n = unsafe { libc::write(fd.as_raw_fd(), (&max as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        let irq = IrqFd::new(fd).unwrap();
        assert!(!irq.signal());
        assert!(!irq.signal());
        assert_eq!(irq.take(), max);
        assert!(irq.signal());
        assert_eq!(irq.take(), 1);
        assert_eq!(irq.take(), 0);
    }
}
