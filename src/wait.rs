//! Waiting on an fd until it is readable or a stop eventfd fires: the loop of
//! every helper thread that watches a client-supplied fd (an INTx unmask
//! eventfd, a userfaultfd).

use std::os::fd::RawFd;

/// Why [`wait_readable`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// `fd` has data.
    Readable,
    /// `stop` fired, or `fd` failed or hung up: the watcher should end.
    Stop,
}

/// Blocks until `fd` is readable or `stop` is signalled.
pub fn wait_readable(fd: RawFd, stop: RawFd) -> Wake {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polls two pollfds that live on this stack frame.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Wake::Stop;
        }
        if fds[1].revents != 0
            || fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
        {
            return Wake::Stop;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Wake::Readable;
        }
    }
}
