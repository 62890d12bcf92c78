//! DMA a device model starts in an access handler and gets back later.
//!
//! A model's handlers run on the session thread, which is also the only reader
//! of the client's socket, so a handler can never wait for a DMA_READ reply.
//! Blocking [`GuestMemory::read`](super::GuestMemory::read) therefore belongs on a
//! worker thread, and each DMA by message then costs two thread hops (handler to
//! worker, session to worker with the reply). A [`DmaQueue`] avoids both: the
//! handler queues the transfer with a token and returns; the session performs it
//! right after (fd-mapped memory is copied at once, fd-less memory becomes
//! DMA_READ/DMA_WRITE messages whose replies the session reads in its normal
//! loop) and hands the result to `PciDevice::dma_done(token, ..)`, again on the
//! session thread, with the same locking as any access handler.
//!
//! The token is the model's: it tells which transfer finished and whether the
//! state that started it still holds (a reset does not cancel transfers under
//! way; edu uses its reset generation as the token).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::MemoryError;

/// Most transfers queued at once (not yet started by the session).
pub const MAX_QUEUED_DMA: usize = 64;
/// Largest single queued transfer.
pub const MAX_QUEUED_DMA_LEN: usize = 16 << 20;

/// Which way a queued transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// Guest memory to the device: `data` receives the bytes.
    FromGuest,
    /// The device to guest memory: `data` holds the bytes.
    ToGuest,
}

/// One transfer waiting for the session.
#[derive(Debug)]
pub struct QueuedDma {
    pub token: u64,
    pub gpa: u64,
    pub direction: DmaDirection,
    /// The bytes to write, or the buffer (of the transfer's length) to read into.
    pub data: Vec<u8>,
}

#[derive(Default)]
struct QueueState {
    /// Whether a session executes queued transfers (a client is connected).
    attached: bool,
    ops: VecDeque<QueuedDma>,
    /// Buffers of finished transfers, for the next ones.
    spare: Vec<Vec<u8>>,
}

#[derive(Default)]
struct QueueShared {
    state: Mutex<QueueState>,
    /// Mirrors `!ops.is_empty()`: the session's per-message check is one load.
    queued: AtomicBool,
}

/// A device's queue of deferred DMA (see the module docs). Cloning gives
/// another handle to the same queue.
#[derive(Clone, Default)]
pub struct DmaQueue {
    shared: Arc<QueueShared>,
}

impl DmaQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a read of `len` bytes of guest memory at `gpa`. Refused at once
    /// (`NoTransport`) when no session runs, or when the queue is full.
    pub fn read(&self, token: u64, gpa: u64, len: usize) -> Result<(), MemoryError> {
        self.push(token, gpa, DmaDirection::FromGuest, len, |buf| {
            buf.resize(len, 0)
        })
    }

    /// Queues a write of `data` to guest memory at `gpa` (copied now).
    pub fn write(&self, token: u64, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.push(token, gpa, DmaDirection::ToGuest, data.len(), |buf| {
            buf.extend_from_slice(data)
        })
    }

    fn push(
        &self,
        token: u64,
        gpa: u64,
        direction: DmaDirection,
        len: usize,
        fill: impl FnOnce(&mut Vec<u8>),
    ) -> Result<(), MemoryError> {
        if len > MAX_QUEUED_DMA_LEN {
            return Err(MemoryError::Invalid("queued DMA longer than 16 MiB"));
        }
        gpa.checked_add(len as u64)
            .ok_or(MemoryError::Overflow { gpa, len })?;
        let mut st = self.lock();
        if !st.attached {
            return Err(MemoryError::NoTransport);
        }
        if st.ops.len() >= MAX_QUEUED_DMA {
            return Err(MemoryError::QueueFull);
        }
        let mut data = st.spare.pop().unwrap_or_default();
        data.clear();
        fill(&mut data);
        st.ops.push_back(QueuedDma {
            token,
            gpa,
            direction,
            data,
        });
        self.shared.queued.store(true, Ordering::Release);
        Ok(())
    }

    /// Executor side: whether transfers wait (cheap; checked after every message).
    pub fn has_queued(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// Executor side: the oldest waiting transfer.
    pub fn pop(&self) -> Option<QueuedDma> {
        let mut st = self.lock();
        let op = st.ops.pop_front();
        if st.ops.is_empty() {
            self.shared.queued.store(false, Ordering::Release);
        }
        op
    }

    /// Executor side: gives a finished transfer's buffer back for reuse.
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut st = self.lock();
        if st.spare.len() < MAX_QUEUED_DMA {
            st.spare.push(buf);
        }
    }

    /// Executor side: a session starts (true) or ends (false) executing the
    /// queue. Ending drops what is queued: the device is reset next.
    pub fn attach(&self, attached: bool) {
        let mut st = self.lock();
        st.attached = attached;
        if !attached {
            st.ops.clear();
            self.shared.queued.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_queue_in_order_only_while_a_session_runs() {
        let q = DmaQueue::default();
        assert!(matches!(
            q.read(1, 0x1000, 8),
            Err(MemoryError::NoTransport)
        ));
        q.attach(true);
        q.read(1, 0x1000, 8).unwrap();
        q.write(2, 0x2000, &[1, 2, 3]).unwrap();
        assert!(q.has_queued());
        let a = q.pop().unwrap();
        assert_eq!(
            (a.token, a.gpa, a.direction, a.data.len()),
            (1, 0x1000, DmaDirection::FromGuest, 8)
        );
        let b = q.pop().unwrap();
        assert_eq!(
            (b.token, b.direction, &b.data[..]),
            (2, DmaDirection::ToGuest, &[1, 2, 3][..])
        );
        assert!(!q.has_queued() && q.pop().is_none());
        q.recycle(a.data);
        q.write(3, 0, &[9]).unwrap();
        assert_eq!(q.pop().unwrap().data, [9]);
        q.read(4, 0, 1).unwrap();
        q.attach(false);
        assert!(!q.has_queued() && q.pop().is_none());
    }

    #[test]
    fn hostile_lengths_and_a_full_queue_are_refused() {
        let q = DmaQueue::default();
        q.attach(true);
        assert!(matches!(
            q.read(0, 0, MAX_QUEUED_DMA_LEN + 1),
            Err(MemoryError::Invalid(_))
        ));
        assert!(matches!(
            q.read(0, u64::MAX - 3, 8),
            Err(MemoryError::Overflow { .. })
        ));
        for i in 0..MAX_QUEUED_DMA {
            q.read(i as u64, 0, 4).unwrap();
        }
        assert!(matches!(q.read(99, 0, 4), Err(MemoryError::QueueFull)));
    }
}
