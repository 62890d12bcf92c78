//! Server-initiated DMA_READ/DMA_WRITE: how fd-less guest memory is reached.
//!
//! The thread that needs guest memory (a device worker) writes the request on the
//! shared writer and waits on its own channel; the session thread, which is the
//! only reader of the socket, hands it the reply when it arrives and meanwhile
//! keeps serving the client's commands (QEMU may unmap/remap BAR pages before it
//! answers).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, warn};

use super::socket::MessageWriter;
use super::wire::{Command, DmaLayout, Header, FLAGS_TYPE_COMMAND, HEADER_SIZE};
use crate::memory::{DmaTransport, MemoryError};

/// Most server-initiated requests waiting for replies at once.
pub const MAX_PENDING_REQUESTS: usize = 64;

/// A reply to one of our requests.
pub struct PendingReply {
    pub error: Option<u32>,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct PendingInner {
    next_id: u16,
    waiting: HashMap<u16, SyncSender<PendingReply>>,
    closed: bool,
}

/// Requests we sent that await replies, by message id.
#[derive(Default)]
pub struct PendingRequests {
    inner: Mutex<PendingInner>,
}

impl PendingRequests {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self) -> Result<(u16, Receiver<PendingReply>), MemoryError> {
        let mut p = self.lock();
        if p.closed {
            return Err(MemoryError::NoTransport);
        }
        if p.waiting.len() >= MAX_PENDING_REQUESTS {
            return Err(MemoryError::Transport(
                "too many DMA requests in flight".into(),
            ));
        }
        let mut id = p.next_id;
        while p.waiting.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        p.next_id = id.wrapping_add(1);
        let (tx, rx) = sync_channel(1);
        p.waiting.insert(id, tx);
        Ok((id, rx))
    }

    fn cancel(&self, id: u16) {
        self.lock().waiting.remove(&id);
    }

    /// Called by the session thread for every reply the client sends.
    pub fn complete(&self, header: &Header, payload: &[u8]) {
        let Some(tx) = self.lock().waiting.remove(&header.msg_id) else {
            warn!(
                msg_id = header.msg_id,
                "reply to no request of ours; dropped"
            );
            return;
        };
        let reply = PendingReply {
            error: header.is_error().then_some(header.error),
            payload: payload.to_vec(),
        };
        let _ = tx.send(reply);
    }

    /// The connection is gone: every waiter fails, and no new request starts.
    pub fn close(&self) {
        let mut p = self.lock();
        p.closed = true;
        p.waiting.clear();
    }
}

/// [`DmaTransport`] over one client connection.
pub struct DmaLink {
    writer: Arc<MessageWriter>,
    pending: Arc<PendingRequests>,
    max_xfer: usize,
    timeout: Duration,
    layout: DmaLayout,
}

impl DmaLink {
    pub fn new(
        writer: Arc<MessageWriter>,
        pending: Arc<PendingRequests>,
        max_xfer: usize,
        timeout: Duration,
        layout: DmaLayout,
    ) -> Self {
        DmaLink {
            writer,
            pending,
            max_xfer,
            timeout,
            layout,
        }
    }

    /// Sends one request and waits for its reply.
    fn transact(
        &self,
        command: Command,
        gpa: u64,
        count: usize,
        data: Option<&[u8]>,
    ) -> Result<PendingReply, MemoryError> {
        let (id, rx) = self.pending.register()?;
        let fixed = self.layout.fixed_part(gpa, count as u64);
        let data_at = self.layout.data_offset();
        let pad = [0u8; 16];
        let payload_len = match data {
            Some(d) => DmaLayout::payload_len(d.len()),
            None => 16,
        };
        let header = Header {
            msg_id: id,
            command: command as u16,
            size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        };
        let sent = match data {
            Some(d) => {
                self.writer
                    .send(&header, &[&fixed[..data_at], d, &pad[..16 - data_at]], &[])
            }
            None => self.writer.send(&header, &[&fixed], &[]),
        };
        if let Err(e) = sent {
            self.pending.cancel(id);
            return Err(MemoryError::Transport(format!("send: {e}")));
        }
        let reply = match rx.recv_timeout(self.timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.pending.cancel(id);
                return Err(MemoryError::Transport(format!(
                    "{command:?} at {gpa:#x}: no reply in {:?}",
                    self.timeout
                )));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(MemoryError::NoTransport),
        };
        if let Some(errno) = reply.error {
            debug!(?command, gpa, errno, "client refused DMA");
            return Err(MemoryError::Transport(format!(
                "{command:?} at {gpa:#x}: client answered errno {errno}"
            )));
        }
        Ok(reply)
    }
}

impl DmaTransport for DmaLink {
    fn dma_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut addr = gpa;
        for chunk in buf.chunks_mut(self.max_xfer) {
            let reply = self.transact(Command::DmaRead, addr, chunk.len(), None)?;
            let at = self.layout.data_offset();
            let ok = self.layout.parse(&reply.payload) == Some((addr, chunk.len() as u64));
            let data = reply.payload.get(at..at + chunk.len());
            match (ok, data) {
                (true, Some(d)) => chunk.copy_from_slice(d),
                _ => {
                    return Err(MemoryError::Transport(format!(
                        "DMA_READ reply at {addr:#x} does not match the request"
                    )))
                }
            }
            addr += chunk.len() as u64;
        }
        Ok(())
    }

    fn dma_write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let mut addr = gpa;
        for chunk in buf.chunks(self.max_xfer) {
            self.transact(Command::DmaWrite, addr, chunk.len(), Some(chunk))?;
            addr += chunk.len() as u64;
        }
        Ok(())
    }
}
