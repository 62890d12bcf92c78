//! Where a session's outgoing messages go: the seam that keeps the session
//! core ([`Session`](super::server::Session)) free of I/O.
//!
//! The socket ([`MessageWriter`]) is the transport of every real client; the
//! fuzz harness and unit tests use [`MemoryTransport`], which keeps what was
//! sent. Incoming messages are the caller's business: it reads them however
//! it likes (the server from the socket with
//! [`MessageReader`](super::socket::MessageReader)) and hands each to
//! [`Session::handle`](super::server::Session::handle).

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use super::socket::MessageWriter;
use super::wire::Header;

/// Sends whole messages to the client; shared by the session and the
/// threads that send server-initiated DMA requests.
pub trait Transport: Send + Sync {
    /// Sends `header` (whose size is already the total) followed by `parts`,
    /// with `fds` attached. Messages from several threads never interleave.
    fn send(&self, header: &Header, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()>;
    /// Ends the connection, waking whoever waits to read from it.
    fn shutdown(&self) {}
}

impl Transport for MessageWriter {
    #[inline]
    fn send(&self, header: &Header, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        MessageWriter::send(self, header, parts, fds)
    }

    fn shutdown(&self) {
        MessageWriter::shutdown(self)
    }
}

/// Messages kept in memory (fds are not kept: they are the sender's).
#[derive(Debug, Default)]
pub struct MemoryTransport {
    sent: Mutex<Vec<Vec<u8>>>,
}

impl MemoryTransport {
    /// Takes the messages sent so far, each as its bytes.
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut *self.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Transport for MemoryTransport {
    fn send(&self, header: &Header, parts: &[&[u8]], _fds: &[RawFd]) -> io::Result<()> {
        use super::wire::WireStruct;
        let mut msg = header.as_bytes().to_vec();
        for p in parts {
            msg.extend_from_slice(p);
        }
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(msg);
        Ok(())
    }
}
