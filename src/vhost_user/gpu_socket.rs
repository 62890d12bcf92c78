//! The vhost-user-gpu display socket (VHOST_USER_GPU_SET_SOCKET), taken back
//! from the `vhost` crate so that a front-end that never reads it cannot
//! block the backend.
//!
//! The `vhost` crate (0.18) wraps the socket in a `GpuBackend` that hides the
//! fd, sends blocking, and retries `EAGAIN` and `EINTR` forever
//! (`Endpoint::send_iovec_all`): neither a send timeout (`SO_SNDTIMEO`) nor
//! `O_NONBLOCK` would bound a send to a front-end that never reads, and a
//! reply (GET_DISPLAY_INFO, GET_EDID) is awaited without a timeout. So
//! [`adopt`] finds the socket among the process's fds, keeps a duplicate of
//! it and drops the `GpuBackend`; the model then speaks the (small) display
//! protocol itself, with deadlines.
//!
//! Finding it: when the crate hands the `GpuBackend` over, the socket it
//! holds is the only AF_UNIX stream socket of the process (fds 0-2 aside)
//! that is unnamed and not listening — the listener and the vhost-user
//! connection carry the socket path, and the model drops its previous
//! display before it adopts the next one. Exactly one candidate must be
//! found, and dropping the `GpuBackend` must close exactly that fd;
//! otherwise nothing is adopted and the caller goes without a display.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use vhost::vhost_user::GpuBackend;

/// Fds scanned when [`prepare`] was not called (the usual soft limit).
const DEFAULT_FD_LIMIT: usize = 1024;
/// Most fds scanned, whatever the limit says.
const MAX_FD_LIMIT: usize = 1 << 20;

static FD_LIMIT: AtomicUsize = AtomicUsize::new(0);

/// System calls [`adopt`] makes beyond those every vhost-user backend makes
/// (`fcntl`, `fstat` and `getsockopt` are allowed already).
pub const ADOPT_SYSCALLS: &[libc::c_long] = &[libc::SYS_getsockname];

#[derive(Debug, thiserror::Error)]
pub enum GpuSocketError {
    #[error("no unnamed AF_UNIX stream socket found for the display channel")]
    NotFound,
    #[error("several sockets could be the display channel (fds {0:?}); none taken")]
    Ambiguous(Vec<RawFd>),
    #[error("duplicating display socket fd {fd}: {source}")]
    Dup { fd: RawFd, source: io::Error },
    #[error("fd {0} stayed open when the crate's display channel was dropped: not it")]
    Mismatch(RawFd),
}

/// Notes how many fds the process may have (`RLIMIT_NOFILE`), for
/// [`adopt`]'s scan. Call before a seccomp filter (it forbids `prlimit64`).
pub fn prepare() {
    // SAFETY: getrlimit fills a zeroed struct on the stack.
    let limit = unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return;
        }
        rl.rlim_cur
    };
    let limit = usize::try_from(limit).unwrap_or(MAX_FD_LIMIT);
    FD_LIMIT.store(limit.clamp(3, MAX_FD_LIMIT), Ordering::Relaxed);
}

fn getsockopt_int(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into a local int.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Whether `fd` is an AF_UNIX stream socket, not listening, without a name.
fn is_candidate(fd: RawFd) -> bool {
    // SAFETY: fcntl(F_GETFD) and fstat on a descriptor number that may or may
    // not be open; neither touches memory but the zeroed stat struct.
    let is_socket = unsafe {
        if libc::fcntl(fd, libc::F_GETFD) < 0 {
            return false;
        }
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket
        || getsockopt_int(fd, libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || getsockopt_int(fd, libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || getsockopt_int(fd, libc::SO_ACCEPTCONN) != Some(0)
    {
        return false;
    }
    // SAFETY: getsockname writes at most `len` bytes into a zeroed local
    // sockaddr_un.
    let named = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) != 0 {
            return false;
        }
        len as usize > std::mem::size_of::<libc::sa_family_t>()
    };
    !named
}

fn is_open(fd: RawFd) -> bool {
    // SAFETY: fcntl(F_GETFD) on a descriptor number; no memory involved.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

/// Takes the socket behind `gpu` (see the module documentation): a
/// close-on-exec duplicate of it; `gpu` is dropped either way.
pub fn adopt(gpu: GpuBackend) -> Result<OwnedFd, GpuSocketError> {
    let limit = match FD_LIMIT.load(Ordering::Relaxed) {
        0 => DEFAULT_FD_LIMIT,
        n => n,
    };
    let candidates: Vec<RawFd> = (3..limit as RawFd).filter(|&fd| is_candidate(fd)).collect();
    let fd = match candidates[..] {
        [fd] => fd,
        [] => return Err(GpuSocketError::NotFound),
        _ => return Err(GpuSocketError::Ambiguous(candidates)),
    };
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor for the open socket at
    // `fd` (held by `gpu`, alive here); the OwnedFd takes the new one.
    let dup = unsafe {
        let new = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3);
        if new < 0 {
            return Err(GpuSocketError::Dup {
                fd,
                source: io::Error::last_os_error(),
            });
        }
        OwnedFd::from_raw_fd(new)
    };
    drop(gpu);
    if is_open(fd) {
        return Err(GpuSocketError::Mismatch(fd));
    }
    Ok(dup)
}
