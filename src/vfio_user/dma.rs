//! Server-initiated DMA_READ/DMA_WRITE: how fd-less guest memory is reached.
//!
//! The thread that needs guest memory (a device worker) writes the request on the
//! shared writer and waits on its slot; the session thread, which is the only
//! reader of the socket, copies the reply into the slot when it arrives and
//! meanwhile keeps serving the client's commands (QEMU may unmap/remap BAR pages
//! before it answers). Slots and their buffers are reused: no allocation per
//! request once the connection is warm.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::transport::Transport;
use super::wire::{Command, DmaLayout, Header, FLAGS_TYPE_COMMAND, HEADER_SIZE};
use crate::memory::{DmaMessageError, DmaTransport, MemoryError};

/// Most server-initiated requests waiting for replies at once.
pub const MAX_PENDING_REQUESTS: usize = 64;

/// Where one request's reply lands. Slots (and their payload buffers) are reused
/// from one request to the next: a DMA by message allocates nothing once the
/// connection has seen as many requests in flight, and replies as large.
#[derive(Default)]
struct Slot {
    state: Mutex<SlotState>,
    ready: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// The request the slot serves now; a reply that was on its way to an
    /// earlier one (given up on) must not land here.
    ticket: u64,
    /// A reply arrived (`error`, `payload` hold it) or the connection closed.
    done: bool,
    closed: bool,
    error: Option<u32>,
    payload: Vec<u8>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Who waits for a reply: a thread blocked on its slot (with the slot's
/// ticket for this request), or the session itself (a queued DMA's piece).
enum Waiter {
    Thread(Arc<Slot>, u64),
    Session(SessionPiece),
}

/// The part of a queued DMA one request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionPiece {
    /// The session's number for the queued transfer.
    pub op: u64,
    /// Where the piece starts in the transfer, its guest address and length.
    pub offset: usize,
    pub gpa: u64,
    pub len: usize,
}

#[derive(Default)]
struct PendingInner {
    next_id: u16,
    next_ticket: u64,
    waiting: HashMap<u16, Waiter>,
    /// Slots no request uses, for the next ones.
    free: Vec<Arc<Slot>>,
    closed: bool,
}

/// Requests we sent that await replies, by message id.
#[derive(Default)]
pub struct PendingRequests {
    inner: Mutex<PendingInner>,
}

impl PendingRequests {
    fn lock(&self) -> MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self) -> Result<(u16, Arc<Slot>), MemoryError> {
        let mut p = self.lock();
        let id = p.free_id()?;
        p.next_ticket += 1;
        let ticket = p.next_ticket;
        let slot = p.free.pop().unwrap_or_default();
        {
            let mut st = slot.lock();
            st.ticket = ticket;
            st.done = false;
            st.closed = false;
            st.error = None;
        }
        p.waiting.insert(id, Waiter::Thread(slot.clone(), ticket));
        Ok((id, slot))
    }

    /// A message id for a request whose reply the session handles itself.
    pub fn register_session(&self, piece: SessionPiece) -> Result<u16, MemoryError> {
        let mut p = self.lock();
        let id = p.free_id()?;
        p.waiting.insert(id, Waiter::Session(piece));
        Ok(id)
    }

    /// Gives up on a session request: a late reply finds no request.
    pub fn forget(&self, id: u16) {
        self.lock().waiting.remove(&id);
    }

    /// Gives up on every request of the session's transfer `op`.
    pub fn forget_session_op(&self, op: u64) {
        self.lock()
            .waiting
            .retain(|_, w| !matches!(w, Waiter::Session(p) if p.op == op));
    }

    /// Gives a slot back once its request is over (answered, failed or given up).
    fn release(&self, id: u16, slot: Arc<Slot>) {
        let mut p = self.lock();
        // Still waiting means given up: a late reply finds no request. (The id
        // may serve another request by now only if that one has another slot.)
        if matches!(p.waiting.get(&id), Some(Waiter::Thread(s, _)) if Arc::ptr_eq(s, &slot)) {
            p.waiting.remove(&id);
        }
        if !p.closed {
            p.free.push(slot);
        }
    }

    /// Called by the session thread for every reply the client sends. A reply
    /// to a waiting thread is handed over here; one to the session's own
    /// request comes back as the piece it answers.
    pub fn complete(&self, header: &Header, payload: &[u8]) -> Option<SessionPiece> {
        let (slot, ticket) = match self.lock().waiting.remove(&header.msg_id) {
            Some(Waiter::Thread(slot, ticket)) => (slot, ticket),
            Some(Waiter::Session(piece)) => return Some(piece),
            None => {
                warn!(
                    msg_id = header.msg_id,
                    "reply to no request of ours; dropped"
                );
                return None;
            }
        };
        let mut st = slot.lock();
        if st.ticket != ticket {
            // Its request timed out meanwhile and the slot serves another.
            return None;
        }
        st.error = header.is_error().then_some(header.error);
        st.payload.clear();
        st.payload.extend_from_slice(payload);
        st.done = true;
        drop(st);
        slot.ready.notify_one();
        None
    }

    /// The connection is gone: every waiter fails, and no new request starts.
    pub fn close(&self) {
        let mut p = self.lock();
        p.closed = true;
        p.free.clear();
        for (_, waiter) in p.waiting.drain() {
            if let Waiter::Thread(slot, _) = waiter {
                slot.lock().closed = true;
                slot.ready.notify_one();
            }
        }
    }
}

impl PendingInner {
    /// An id no waiting request uses, if the connection is open and the
    /// number in flight allows another.
    fn free_id(&mut self) -> Result<u16, MemoryError> {
        if self.closed {
            return Err(MemoryError::NoTransport);
        }
        if self.waiting.len() >= MAX_PENDING_REQUESTS {
            return Err(DmaMessageError::TooManyInFlight.into());
        }
        let mut id = self.next_id;
        while self.waiting.contains_key(&id) {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        Ok(id)
    }
}

/// [`DmaTransport`] over one client connection.
pub struct DmaLink {
    writer: Arc<dyn Transport>,
    pending: Arc<PendingRequests>,
    max_xfer: usize,
    timeout: Duration,
    layout: DmaLayout,
}

impl DmaLink {
    pub fn new(
        writer: Arc<dyn Transport>,
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

    /// Sends one request, waits for its reply and hands it to `take` (the
    /// payload, on success).
    fn transact<R>(
        &self,
        command: Command,
        gpa: u64,
        count: usize,
        data: Option<&[u8]>,
        take: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, MemoryError> {
        let (id, slot) = self.pending.register()?;
        let result = self
            .send_request(id, gpa, count, data)
            .and_then(|()| self.wait_reply(&slot, command, gpa))
            .map(|st| take(&st.payload));
        self.pending.release(id, slot);
        result
    }

    /// The longest piece one request may carry.
    pub fn max_xfer(&self) -> usize {
        self.max_xfer
    }

    /// How long a request may wait for its reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Writes one DMA_READ (`data` None, `count` bytes) or DMA_WRITE request.
    pub fn send_request(
        &self,
        id: u16,
        gpa: u64,
        count: usize,
        data: Option<&[u8]>,
    ) -> Result<(), MemoryError> {
        let fixed = self.layout.fixed_part(gpa, count as u64);
        let data_at = self.layout.data_offset();
        let pad = [0u8; 16];
        let (command, payload_len) = match data {
            Some(d) => (Command::DmaWrite, DmaLayout::payload_len(d.len())),
            None => (Command::DmaRead, 16),
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
        sent.map_err(|e| DmaMessageError::Send(e).into())
    }

    /// The data of a DMA_READ reply, if it answers `len` bytes at `gpa`.
    pub fn read_reply_data<'p>(&self, payload: &'p [u8], gpa: u64, len: usize) -> Option<&'p [u8]> {
        if self.layout.parse(payload) != Some((gpa, len as u64)) {
            return None;
        }
        let at = self.layout.data_offset();
        payload.get(at..at + len)
    }

    /// Waits on `slot` for the reply to the request just sent; the reply's
    /// payload is in the returned state.
    fn wait_reply<'s>(
        &self,
        slot: &'s Slot,
        command: Command,
        gpa: u64,
    ) -> Result<MutexGuard<'s, SlotState>, MemoryError> {
        let deadline = Instant::now() + self.timeout;
        let mut st = slot.lock();
        while !st.done && !st.closed {
            let now = Instant::now();
            if now >= deadline {
                // Given up: `release` forgets the id, so a late reply is dropped.
                return Err(DmaMessageError::Timeout {
                    gpa,
                    timeout: self.timeout,
                }
                .into());
            }
            st = slot
                .ready
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if !st.done {
            return Err(MemoryError::NoTransport);
        }
        if let Some(errno) = st.error {
            debug!(?command, gpa, errno, "client refused DMA");
            return Err(DmaMessageError::Refused { gpa, errno }.into());
        }
        Ok(st)
    }
}

impl DmaTransport for DmaLink {
    fn dma_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut addr = gpa;
        for chunk in buf.chunks_mut(self.max_xfer) {
            let len = chunk.len();
            let copied = self.transact(Command::DmaRead, addr, len, None, |payload| match self
                .read_reply_data(payload, addr, len)
            {
                Some(d) => {
                    chunk.copy_from_slice(d);
                    true
                }
                None => false,
            })?;
            if !copied {
                return Err(DmaMessageError::Mismatch { gpa: addr }.into());
            }
            addr += len as u64;
        }
        Ok(())
    }

    fn dma_write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        let mut addr = gpa;
        for chunk in buf.chunks(self.max_xfer) {
            self.transact(Command::DmaWrite, addr, chunk.len(), Some(chunk), |_| ())?;
            addr += chunk.len() as u64;
        }
        Ok(())
    }
}

/// A link (spec layout) whose requests arrive on the returned client end;
/// replies go in through `pending.complete`, as the session thread delivers them.
#[cfg(test)]
pub(super) fn link_for_tests(
    max_xfer: usize,
    timeout: Duration,
) -> (
    DmaLink,
    Arc<PendingRequests>,
    std::os::unix::net::UnixStream,
) {
    let (server, client) = std::os::unix::net::UnixStream::pair().unwrap();
    let pending = Arc::new(PendingRequests::default());
    let link = DmaLink::new(
        Arc::new(super::socket::MessageWriter::new(server)),
        pending.clone(),
        max_xfer,
        timeout,
        DmaLayout::Spec,
    );
    (link, pending, client)
}

/// A client's reply to request `h` in the spec layout: `data` for a read, an
/// error reply if `errno` is given.
#[cfg(test)]
pub(super) fn reply_for_tests(
    h: &Header,
    gpa: u64,
    data: &[u8],
    errno: Option<u32>,
) -> (Header, Vec<u8>) {
    use super::wire::{FLAGS_ERROR, FLAGS_TYPE_REPLY};
    let layout = DmaLayout::Spec;
    let mut payload = layout.fixed_part(gpa, data.len() as u64)[..layout.data_offset()].to_vec();
    payload.extend_from_slice(data);
    let header = Header {
        msg_id: h.msg_id,
        command: h.command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: FLAGS_TYPE_REPLY | if errno.is_some() { FLAGS_ERROR } else { 0 },
        error: errno.unwrap_or(0),
    };
    (header, payload)
}

#[cfg(test)]
mod tests {
    use super::super::wire::WireStruct;
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn link(timeout: Duration) -> (Arc<DmaLink>, Arc<PendingRequests>, UnixStream) {
        let (link, pending, client) = link_for_tests(4096, timeout);
        (Arc::new(link), pending, client)
    }

    /// Reads one DMA_READ request: its header.
    fn request(client: &mut UnixStream) -> Header {
        let mut buf = [0u8; HEADER_SIZE + 16];
        client.read_exact(&mut buf).unwrap();
        Header::read_from(&buf).unwrap()
    }

    fn reply_to(h: &Header, gpa: u64, data: &[u8]) -> (Header, Vec<u8>) {
        reply_for_tests(h, gpa, data, None)
    }

    #[test]
    fn a_late_reply_never_lands_in_the_next_request() {
        let (link, pending, mut client) = link(Duration::from_millis(50));
        let mut buf = [0u8; 4];
        // The first request goes unanswered and times out.
        let l = link.clone();
        let first = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            l.dma_read(0x1000, &mut b).map(|_| b)
        });
        let h1 = request(&mut client);
        assert!(first.join().unwrap().is_err());
        // The second reuses the slot; the first one's reply arrives late.
        let l = link.clone();
        let second = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            l.dma_read(0x1000, &mut b).map(|_| b)
        });
        let h2 = request(&mut client);
        assert_ne!(h1.msg_id, h2.msg_id);
        let (late, late_payload) = reply_to(&h1, 0x1000, &[1, 1, 1, 1]);
        pending.complete(&late, &late_payload);
        let (good, good_payload) = reply_to(&h2, 0x1000, &[2, 2, 2, 2]);
        pending.complete(&good, &good_payload);
        assert_eq!(second.join().unwrap().unwrap(), [2, 2, 2, 2]);
        // Slots are reused: still one after many requests.
        for i in 0..20u8 {
            let l = link.clone();
            let t = std::thread::spawn(move || {
                let mut b = [0u8; 4];
                l.dma_read(0x2000, &mut b).map(|_| b)
            });
            let h = request(&mut client);
            let (r, p) = reply_to(&h, 0x2000, &[i; 4]);
            pending.complete(&r, &p);
            assert_eq!(t.join().unwrap().unwrap(), [i; 4]);
        }
        assert_eq!(pending.lock().free.len(), 1);
        // A closed connection fails waiters and new requests.
        let l = link.clone();
        let waiter = std::thread::spawn(move || {
            let mut b = [0u8; 4];
            l.dma_read(0x3000, &mut b)
        });
        request(&mut client);
        pending.close();
        assert!(matches!(
            waiter.join().unwrap(),
            Err(MemoryError::NoTransport)
        ));
        assert!(link.dma_read(0x3000, &mut buf).is_err());
    }
}
