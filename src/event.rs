//! Helper fds a client hands over (an INTx unmask eventfd, a userfaultfd),
//! served by the session's own event loop: one thread for the connection and
//! every helper fd, instead of a thread per fd.
//!
//! A part of the device that owns such an fd registers an [`EventSource`] in
//! its [`EventSet`]; the session's [`EventLoop`] watches the connection and
//! every registered fd with one epoll, and calls [`EventSource::ready`] when
//! one is readable. While no helper fd is registered (the common case: QEMU
//! without KVM's resample, no write-protect userfaultfd) the session reads the
//! socket directly, with no epoll call on the message path.
//!
//! Users of a device part without a session (benchmarks) run [`serve`] on a
//! thread of their own.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet as EpollFlags};
use vmm_sys_util::eventfd::EventFd;

/// An fd that needs attention when it is readable.
pub trait EventSource: Send + Sync {
    fn fd(&self) -> RawFd;
    /// The fd is readable: handle what is there without blocking (the fd is
    /// non-blocking; a wake-up with nothing to read is harmless).
    fn ready(&self);
}

/// The event sources of one part of a device, as they come and go.
#[derive(Default)]
pub struct EventSet {
    sources: Mutex<Vec<Arc<dyn EventSource>>>,
    /// Bumped by every change, so a loop resyncs only when something changed.
    generation: AtomicU64,
    len: AtomicUsize,
}

impl EventSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn EventSource>>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn changed(&self, sources: &[Arc<dyn EventSource>]) {
        self.len.store(sources.len(), Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn insert(&self, source: Arc<dyn EventSource>) {
        let mut s = self.lock();
        s.push(source);
        self.changed(&s);
    }

    /// Removes the source watching `fd` (if any).
    pub fn remove(&self, fd: RawFd) {
        let mut s = self.lock();
        s.retain(|x| x.fd() != fd);
        self.changed(&s);
    }

    pub fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn snapshot(&self) -> Vec<Arc<dyn EventSource>> {
        self.lock().clone()
    }
}

/// What an [`EventLoop`] wait ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The watched fd (the connection) is readable.
    Readable,
    /// Helper fds were served; nothing for the caller.
    Served,
}

/// One epoll over a connection and the sources of several sets.
pub struct EventLoop {
    /// Made when the first helper fd comes (a session without any makes none).
    epoll: Option<Epoll>,
    main: RawFd,
    sets: Vec<Arc<EventSet>>,
    seen: Vec<u64>,
    registered: HashMap<RawFd, Arc<dyn EventSource>>,
}

/// The epoll data of the connection (helper fds carry their fd number).
const MAIN: u64 = u64::MAX;

impl EventLoop {
    /// Watches `main` (readable) and every source of `sets`.
    pub fn new(main: RawFd, sets: Vec<Arc<EventSet>>) -> io::Result<EventLoop> {
        let seen = vec![u64::MAX; sets.len()];
        Ok(EventLoop {
            epoll: None,
            main,
            sets,
            seen,
            registered: HashMap::new(),
        })
    }

    /// Whether no helper fd is registered: the caller may block on the
    /// connection directly. Two atomic loads per set.
    #[inline]
    pub fn idle(&self) -> bool {
        self.registered.is_empty() && self.sets.iter().all(|s| s.is_empty())
    }

    fn epoll(&mut self) -> io::Result<&Epoll> {
        if self.epoll.is_none() {
            let epoll = Epoll::new()?;
            epoll.ctl(
                ControlOperation::Add,
                self.main,
                EpollEvent::new(EpollFlags::IN, MAIN),
            )?;
            self.epoll = Some(epoll);
        }
        Ok(self.epoll.as_ref().expect("just made"))
    }

    /// Brings the epoll in line with the sets, if they changed.
    fn sync(&mut self) -> io::Result<()> {
        let changed = self
            .sets
            .iter()
            .zip(&self.seen)
            .any(|(s, &g)| s.generation() != g);
        if !changed {
            return Ok(());
        }
        let mut now: HashMap<RawFd, Arc<dyn EventSource>> = HashMap::new();
        for (set, seen) in self.sets.iter().zip(self.seen.iter_mut()) {
            *seen = set.generation();
            for s in set.snapshot() {
                now.insert(s.fd(), s);
            }
        }
        let registered = std::mem::take(&mut self.registered);
        let epoll = self.epoll()?;
        for fd in registered.keys() {
            if !now.contains_key(fd) {
                // The source may have closed its fd already (epoll forgot it).
                let _ = epoll.ctl(ControlOperation::Delete, *fd, EpollEvent::default());
            }
        }
        for fd in now.keys() {
            if !registered.contains_key(fd) {
                epoll.ctl(
                    ControlOperation::Add,
                    *fd,
                    EpollEvent::new(EpollFlags::IN, *fd as u64),
                )?;
            }
        }
        self.registered = now;
        Ok(())
    }

    /// Waits until the connection is readable or helper fds were served.
    pub fn wait(&mut self) -> io::Result<Wake> {
        self.sync()?;
        let mut events = [EpollEvent::default(); 8];
        let epoll = self.epoll()?;
        let n = loop {
            match epoll.wait(-1, &mut events) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        let mut wake = Wake::Served;
        for e in &events[..n] {
            if e.data() == MAIN {
                wake = Wake::Readable;
            } else if let Some(s) = self.registered.get(&(e.data() as RawFd)) {
                s.ready();
            }
        }
        Ok(wake)
    }
}

/// Serves the sources of `sets` until `stop` is signalled: for users of a
/// device part without a session (benchmarks, tools).
pub fn serve(sets: Vec<Arc<EventSet>>, stop: &EventFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut lp = EventLoop::new(stop.as_raw_fd(), sets)?;
    loop {
        if lp.wait()? == Wake::Readable {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicU32;

    struct Counter {
        fd: EventFd,
        hits: AtomicU32,
    }

    impl EventSource for Counter {
        fn fd(&self) -> RawFd {
            self.fd.as_raw_fd()
        }
        fn ready(&self) {
            let _ = self.fd.read();
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn sources_are_served_and_the_connection_wakes_the_caller() {
        let main = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let set = Arc::new(EventSet::default());
        let mut lp = EventLoop::new(main.as_raw_fd(), vec![set.clone()]).unwrap();
        assert!(lp.idle());
        let c = Arc::new(Counter {
            fd: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            hits: AtomicU32::new(0),
        });
        set.insert(c.clone());
        assert!(!lp.idle());
        c.fd.write(1).unwrap();
        assert_eq!(lp.wait().unwrap(), Wake::Served);
        assert_eq!(c.hits.load(Ordering::Relaxed), 1);
        main.write(1).unwrap();
        assert_eq!(lp.wait().unwrap(), Wake::Readable);
        set.remove(c.fd());
        c.fd.write(1).unwrap();
        main.write(1).unwrap();
        assert_eq!(lp.wait().unwrap(), Wake::Readable);
        assert_eq!(c.hits.load(Ordering::Relaxed), 1);
        assert!(lp.idle());
    }
}
