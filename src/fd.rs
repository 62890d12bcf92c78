//! What a client's fd is, and making it non-blocking: the checks every fd a
//! peer hands over goes through (interrupt eventfds, vhost-user kick/call
//! fds, userfaultfds, memory fds).

use std::io;
use std::os::fd::RawFd;

/// What `fd` is, as `/proc/self/fd` names it (`anon_inode:[eventfd]`,
/// `pipe:[...]`, `socket:[...]`, a path), or from its file type where /proc
/// is not mounted.
pub fn kind(fd: RawFd) -> String {
    if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        return link.to_string_lossy().into_owned();
    }
    // SAFETY: fstat fills a zeroed stat struct for a descriptor we were given.
    let mode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return "a closed fd".into();
        }
        st.st_mode & libc::S_IFMT
    };
    match mode {
        // Anonymous inodes (eventfd, timerfd, signalfd) have no file type.
        0 => EVENTFD.into(),
        libc::S_IFIFO => "a pipe".into(),
        libc::S_IFSOCK => "a socket".into(),
        libc::S_IFREG => "a regular file".into(),
        libc::S_IFCHR => "a character device".into(),
        _ => format!("file type {mode:#o}"),
    }
}

/// What `/proc/self/fd` calls an eventfd.
pub const EVENTFD: &str = "anon_inode:[eventfd]";

/// Sets `O_NONBLOCK` on `fd` (a flag of the open file, which the peer
/// shares) if it is not set. Returns whether it had to.
pub fn ensure_nonblocking(fd: RawFd) -> io::Result<bool> {
    // SAFETY: fcntl with integer arguments on a descriptor the caller holds.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(false);
        }
        if libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(true)
}
