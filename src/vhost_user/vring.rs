//! [`Vring`]: the `vhost-user-backend` crate's `VringRwLock`, with the
//! front-end's kick and call fds checked when they arrive and used without
//! ever blocking.
//!
//! The crate keeps whatever fd SET_VRING_KICK / SET_VRING_CALL carried and
//! uses it blocking: `EventNotifier::notify` is a `write_all` of 8 bytes to
//! the call fd, `EventConsumer::consume` a `read_exact` of 8 bytes from the
//! kick fd. A front-end that hands over a pipe or a socket whose buffer it
//! never drains, or an eventfd whose counter it filled to the maximum, would
//! stop the vring thread in that write; a pipe with fewer than 8 bytes in it
//! as the kick fd would stop it in the read. A stopped vring thread is never
//! joined, so the next front-end would never be served either. So:
//! - a kick or call fd must be an eventfd (`/proc/self/fd` names it
//!   `anon_inode:[eventfd]`, [`crate::fd::kind`]); anything else is refused, logged
//!   (once per vring) and dropped: a queue without a kick fd is never started,
//!   one without a call fd is served without interrupts;
//! - accepted fds are switched to `O_NONBLOCK` (a flag of the open file,
//!   which QEMU and Cloud Hypervisor set on their eventfds anyway), and the
//!   flag is checked again before each use, since the front-end shares the
//!   open file and could clear it;
//! - a signal that finds the counter full is dropped: the counter already
//!   holds an interrupt for the driver, so it is coalesced, not lost (logged
//!   once per vring); a kick that finds the counter already taken (the
//!   front-end read it) is a spurious wake-up, not an error that would end
//!   the vring thread.
//!
//! What is left: a front-end that clears `O_NONBLOCK` in the instant between
//! the check and the write (or read) can still make that one call block; the
//! process still ends on SIGTERM (`server` exits on its own after a grace
//! period).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLockReadGuard, RwLockWriteGuard};

use tracing::{debug, warn};
use vhost_user_backend::{VringRwLock, VringState, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as QueueError;

use super::dirty_log::VhostMemoryAtomic;
use crate::fd::{ensure_nonblocking, kind as fd_kind, EVENTFD};

/// One virtqueue of a vhost-user backend (see the module documentation).
#[derive(Clone)]
pub struct Vring {
    inner: VringRwLock<VhostMemoryAtomic>,
    notes: Arc<Notes>,
}

/// What was logged already, so that a front-end repeating itself does not
/// flood the log.
#[derive(Default)]
struct Notes {
    refused: AtomicBool,
    saturated: AtomicBool,
    failed: AtomicBool,
    flag_cleared: AtomicBool,
}

impl Notes {
    /// Whether `flag` was clear (and is set now): log this time only.
    fn first(flag: &AtomicBool) -> bool {
        !flag.swap(true, Ordering::Relaxed)
    }
}

impl Vring {
    /// Takes `file` as this vring's `what` ("kick", "call") fd if it is a
    /// non-blocking eventfd; `None` otherwise (the file is closed).
    fn checked(&self, what: &str, file: File) -> Option<File> {
        let fd = file.as_raw_fd();
        let kind = fd_kind(fd);
        if kind != EVENTFD {
            if Notes::first(&self.notes.refused) {
                warn!(
                    fd,
                    "{what} fd is {kind}, not an eventfd: refused (the queue goes without it; \
                     logged once per queue)"
                );
            } else {
                debug!(fd, "{what} fd is {kind}, not an eventfd: refused");
            }
            return None;
        }
        match ensure_nonblocking(fd) {
            Ok(_) => Some(file),
            Err(e) => {
                warn!(fd, "{what} eventfd: making it non-blocking: {e}; refused");
                None
            }
        }
    }

    /// `O_NONBLOCK` on `fd` before it is used; false if that cannot be made
    /// sure (the fd is then not used).
    fn still_nonblocking(&self, what: &str, fd: RawFd) -> bool {
        match ensure_nonblocking(fd) {
            Ok(false) => true,
            Ok(true) => {
                if Notes::first(&self.notes.flag_cleared) {
                    warn!(
                        fd,
                        "the front-end cleared O_NONBLOCK on the {what} eventfd; set again \
                         (logged once per queue)"
                    );
                }
                true
            }
            Err(e) => {
                if Notes::first(&self.notes.failed) {
                    warn!(fd, "{what} eventfd: {e}; not used (logged once per queue)");
                }
                false
            }
        }
    }
}

impl<'a> VringStateGuard<'a, VhostMemoryAtomic> for Vring {
    type G = RwLockReadGuard<'a, VringState<VhostMemoryAtomic>>;
}

impl<'a> VringStateMutGuard<'a, VhostMemoryAtomic> for Vring {
    type G = RwLockWriteGuard<'a, VringState<VhostMemoryAtomic>>;
}

impl VringT<VhostMemoryAtomic> for Vring {
    fn new(mem: VhostMemoryAtomic, max_queue_size: u16) -> Result<Self, QueueError> {
        Ok(Vring {
            inner: VringRwLock::new(mem, max_queue_size)?,
            notes: Arc::default(),
        })
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, VhostMemoryAtomic>>::G {
        self.inner.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, VhostMemoryAtomic>>::G {
        self.inner.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), QueueError> {
        self.inner.add_used(desc_index, len)
    }

    /// Adds one to the call eventfd's counter without ever blocking; errors
    /// are logged (once per vring), never returned: an interrupt the
    /// front-end made impossible is its problem, not a reason to stop the
    /// queue.
    fn signal_used_queue(&self) -> io::Result<()> {
        // The read guard keeps the fd open (SET_VRING_CALL waits for it).
        let state = self.inner.get_ref();
        let Some(call) = state.get_call() else {
            return Ok(());
        };
        let fd = call.as_raw_fd();
        if !self.still_nonblocking("call", fd) {
            return Ok(());
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to the call fd, which the
        // guard above keeps open.
        let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        if n == 8 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            if Notes::first(&self.notes.saturated) {
                warn!(
                    fd,
                    "call eventfd counter full: interrupt coalesced with the one pending \
                     (logged once per queue)"
                );
            }
        } else if Notes::first(&self.notes.failed) {
            warn!(
                fd,
                "call eventfd not signalled: {err} (logged once per queue)"
            );
        }
        Ok(())
    }

    fn enable_notification(&self) -> Result<bool, QueueError> {
        self.inner.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), QueueError> {
        self.inner.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, QueueError> {
        self.inner.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.inner.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), QueueError> {
        self.inner.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.inner.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.inner.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.inner.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, QueueError> {
        self.inner.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.inner.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.inner.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.inner.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        let file = file.and_then(|f| self.checked("kick", f));
        self.inner.set_kick(file)
    }

    /// Takes the kick counter; a counter someone else took already (the
    /// crate's read would fail with `EAGAIN` and end the vring thread) is a
    /// spurious wake-up.
    fn read_kick(&self) -> io::Result<bool> {
        {
            let state = self.inner.get_ref();
            if let Some(kick) = state.get_kick() {
                if !self.still_nonblocking("kick", kick.as_raw_fd()) {
                    return Ok(false);
                }
            }
        }
        match self.inner.read_kick() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Ok(self.inner.get_ref().is_enabled())
            }
            other => other,
        }
    }

    fn set_call(&self, file: Option<File>) {
        let file = file.and_then(|f| self.checked("call", f));
        self.inner.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        // Never read or written by the crate or the glue: kept as given.
        self.inner.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    fn vring() -> Vring {
        let mem = VhostMemoryAtomic::new(super::super::dirty_log::VhostMemory::new());
        Vring::new(mem, 64).unwrap()
    }

    fn pipe() -> (File, File) {
        let mut p = [0; 2];
        // SAFETY: pipe2 writes two new fds into `p`, which the Files take.
        unsafe {
            assert_eq!(libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC), 0);
            (File::from_raw_fd(p[0]), File::from_raw_fd(p[1]))
        }
    }

    /// A blocking eventfd holding `count`.
    fn eventfd(count: u64) -> File {
        // SAFETY: eventfd2 with integer arguments; the File takes the new fd.
        let f = unsafe { File::from(OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC))) };
        // SAFETY: writes 8 bytes from a live u64 to the eventfd.
        let n = unsafe { libc::write(f.as_raw_fd(), (&count as *const u64).cast(), 8) };
        assert_eq!(n, 8);
        f
    }

    fn count(f: &File) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a local u64 from a non-blocking eventfd.
        unsafe { libc::read(f.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        v
    }

    #[test]
    fn pipes_and_sockets_are_refused_as_kick_and_call() {
        let v = vring();
        let (r, w) = pipe();
        v.set_call(Some(w));
        assert!(v.get_ref().get_call().is_none());
        v.set_kick(Some(r));
        assert!(v.get_ref().get_kick().is_none());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        v.set_call(Some(File::from(OwnedFd::from(a))));
        assert!(v.get_ref().get_call().is_none());
        v.set_call(Some(eventfd(0)));
        assert!(v.get_ref().get_call().is_some());
    }

    /// A call eventfd at its maximum (and one whose O_NONBLOCK the front-end
    /// cleared again): the signal is coalesced, never blocked on.
    #[test]
    fn a_full_call_counter_never_blocks() {
        let v = vring();
        let call = eventfd(u64::MAX - 1);
        let ours = call.try_clone().unwrap();
        v.set_call(Some(call));
        let start = Instant::now();
        v.signal_used_queue().unwrap();
        // The front-end clears O_NONBLOCK on the open file it shares.
        // SAFETY: fcntl with integer arguments on our duplicate.
        unsafe {
            let flags = libc::fcntl(ours.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(ours.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
        v.signal_used_queue().unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert_eq!(count(&ours), u64::MAX - 1);
        v.signal_used_queue().unwrap();
        assert_eq!(count(&ours), 1);
    }

    /// A kick whose counter someone else took is a spurious wake-up, not an
    /// error (which would end the crate's vring thread) nor a blocked read.
    #[test]
    fn a_kick_taken_by_someone_else_is_not_an_error() {
        let v = vring();
        let kick = eventfd(1);
        let ours = kick.try_clone().unwrap();
        v.set_kick(Some(kick));
        v.set_enabled(true);
        assert!(v.read_kick().unwrap());
        assert_eq!(count(&ours), 0);
        assert!(v.read_kick().unwrap());
    }
}
