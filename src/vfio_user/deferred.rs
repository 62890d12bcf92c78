//! The session's side of deferred DMA (`memory::queue`): it performs the
//! transfers a model queued and finishes them when the client's replies come.
//!
//! fd-mapped pieces are copied at once; fd-less pieces become DMA_READ/DMA_WRITE
//! requests (at most `max_data_xfer_size` each, at most [`WINDOW`] unanswered
//! per transfer) registered with the session as their waiter, so their replies
//! come back here from the session's own read loop: no thread waits, and none
//! is woken. A transfer finishes when its last
//! request is answered, or fails when the client refuses one, sends a reply
//! that does not match, or lets the DMA timeout pass (checked whenever a
//! message arrives; a silent client has nothing else going on either).

use std::time::Instant;

use tracing::debug;

use super::dma::{DmaLink, PendingRequests, SessionPiece};
use super::wire::Header;
use crate::memory::{DmaDirection, DmaMessageError, GuestMemory, MemoryError, QueuedDma};

/// A transfer that is over, to hand to the model.
pub(super) struct FinishedDma {
    pub token: u64,
    pub direction: DmaDirection,
    pub data: Vec<u8>,
    pub result: Result<(), MemoryError>,
}

/// Most requests one transfer keeps unanswered at once; the next go out as
/// replies come back.
pub(super) const WINDOW: usize = 16;

struct InFlight {
    op: u64,
    token: u64,
    gpa: u64,
    direction: DmaDirection,
    data: Vec<u8>,
    /// Bytes of `data` handled or asked for so far.
    cursor: usize,
    /// Requests sent and not yet answered.
    outstanding: usize,
    /// The first failure; the transfer still waits for its outstanding replies.
    error: Option<MemoryError>,
    deadline: Instant,
}

impl InFlight {
    fn is_over(&self) -> bool {
        self.outstanding == 0 && (self.error.is_some() || self.cursor == self.data.len())
    }

    /// Moves the transfer on: copies fd-mapped pieces and sends requests for
    /// fd-less ones until all is asked for or [`WINDOW`] requests are out.
    /// Records the first failure and stops there.
    fn pump(&mut self, memory: &GuestMemory, link: Option<&DmaLink>, pending: &PendingRequests) {
        if self.error.is_none() {
            if let Err(e) = self.issue(memory, link, pending) {
                self.error = Some(e);
            }
        }
    }

    fn issue(
        &mut self,
        memory: &GuestMemory,
        link: Option<&DmaLink>,
        pending: &PendingRequests,
    ) -> Result<(), MemoryError> {
        if !memory.bus_master() {
            return Err(MemoryError::BusMasterDisabled);
        }
        while self.cursor < self.data.len() && self.outstanding < WINDOW {
            let at = self.gpa + self.cursor as u64;
            let (here, mapped) =
                memory.piece_at(at, self.data.len() - self.cursor, self.direction)?;
            let range = self.cursor..self.cursor + here;
            if mapped {
                match self.direction {
                    DmaDirection::FromGuest => memory.read(at, &mut self.data[range])?,
                    DmaDirection::ToGuest => memory.write(at, &self.data[range])?,
                }
                self.cursor += here;
                continue;
            }
            let link = link.ok_or(MemoryError::NoTransport)?;
            let len = here.min(link.max_xfer());
            let piece = SessionPiece {
                op: self.op,
                offset: self.cursor,
                gpa: at,
                len,
            };
            let id = match pending.register_session(piece) {
                Ok(id) => id,
                // Other transfers fill the table: carry on as their replies come.
                Err(MemoryError::Transport(DmaMessageError::TooManyInFlight))
                    if self.outstanding > 0 =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            let data = match self.direction {
                DmaDirection::FromGuest => None,
                DmaDirection::ToGuest => Some(&self.data[self.cursor..self.cursor + len]),
            };
            if let Err(e) = link.send_request(id, at, len, data) {
                pending.forget(id);
                return Err(e);
            }
            self.outstanding += 1;
            self.cursor += len;
        }
        Ok(())
    }
}

/// Queued transfers the session has started and not finished.
#[derive(Default)]
pub(super) struct DeferredDma {
    in_flight: Vec<InFlight>,
    next_op: u64,
}

impl DeferredDma {
    pub fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Starts `op`: returns it finished if nothing needs the client.
    pub fn start(
        &mut self,
        op: QueuedDma,
        memory: &GuestMemory,
        link: Option<&DmaLink>,
        pending: &PendingRequests,
    ) -> Option<FinishedDma> {
        self.next_op += 1;
        let mut flight = InFlight {
            op: self.next_op,
            token: op.token,
            gpa: op.gpa,
            direction: op.direction,
            data: op.data,
            cursor: 0,
            outstanding: 0,
            error: None,
            deadline: Instant::now() + link.map(|l| l.timeout()).unwrap_or_default(),
        };
        flight.pump(memory, link, pending);
        if flight.is_over() {
            return Some(finish(flight));
        }
        self.in_flight.push(flight);
        None
    }

    /// The client answered `piece`; returns its transfer if that was the last.
    pub fn on_reply(
        &mut self,
        piece: SessionPiece,
        header: &Header,
        payload: &[u8],
        memory: &GuestMemory,
        link: Option<&DmaLink>,
        pending: &PendingRequests,
    ) -> Option<FinishedDma> {
        let i = self.in_flight.iter().position(|f| f.op == piece.op)?;
        let flight = &mut self.in_flight[i];
        flight.outstanding -= 1;
        let answer = if header.is_error() {
            Err(DmaMessageError::Refused {
                gpa: piece.gpa,
                errno: header.error,
            }
            .into())
        } else if flight.direction == DmaDirection::ToGuest {
            memory.observe_write(piece.gpa, piece.len);
            Ok(())
        } else {
            match link.and_then(|l| l.read_reply_data(payload, piece.gpa, piece.len)) {
                Some(d) => {
                    memory
                        .stats()
                        .read_by_message_bytes
                        .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    flight.data[piece.offset..piece.offset + piece.len].copy_from_slice(d);
                    Ok(())
                }
                None => Err(DmaMessageError::Mismatch { gpa: piece.gpa }.into()),
            }
        };
        if let Err(e) = answer {
            flight.error.get_or_insert(e);
        }
        flight.pump(memory, link, pending);
        if !flight.is_over() {
            return None;
        }
        Some(finish(self.in_flight.swap_remove(i)))
    }

    /// A transfer whose deadline has passed, failed; its late replies are
    /// dropped as answers to no request.
    pub fn take_expired(&mut self, now: Instant, pending: &PendingRequests) -> Option<FinishedDma> {
        let i = self.in_flight.iter().position(|f| f.deadline <= now)?;
        let mut flight = self.in_flight.swap_remove(i);
        pending.forget_session_op(flight.op);
        debug!(
            token = flight.token,
            outstanding = flight.outstanding,
            "queued DMA timed out"
        );
        flight
            .error
            .get_or_insert(DmaMessageError::Expired { gpa: flight.gpa }.into());
        Some(finish(flight))
    }
}

fn finish(flight: InFlight) -> FinishedDma {
    FinishedDma {
        token: flight.token,
        direction: flight.direction,
        data: flight.data,
        result: flight.error.map_or(Ok(()), Err),
    }
}

#[cfg(test)]
mod tests {
    use super::super::dma::{link_for_tests, reply_for_tests};
    use super::super::wire::{Command, DmaLayout, WireStruct, HEADER_SIZE};
    use super::*;
    use crate::memory::{memfd, DmaRegion};
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Guest memory: fd-mapped [0x1000, 0x3000) (bytes i as u8 at 0x1000+i),
    /// fd-less [0x3000, 0x5000). Requests carry at most `max_xfer` bytes.
    struct Setup {
        memory: GuestMemory,
        link: DmaLink,
        pending: Arc<PendingRequests>,
        client: UnixStream,
        deferred: DeferredDma,
        written: Arc<Mutex<Vec<(u64, usize)>>>,
    }

    fn setup(max_xfer: usize) -> Setup {
        let mut file = memfd("deferred", 0x2000).unwrap();
        let pattern: Vec<u8> = (0..0x2000).map(|i| i as u8).collect();
        file.write_all(&pattern).unwrap();
        let memory = GuestMemory::new(8);
        memory.set_bus_master(true);
        let mapped = DmaRegion::mapped(0x1000, 0x2000, OwnedFd::from(file), 0, true, true).unwrap();
        let message = DmaRegion::message(0x3000, 0x2000, true, true).unwrap();
        memory
            .with_regions(|r| r.insert(mapped).and_then(|()| r.insert(message)))
            .unwrap();
        let written = Arc::new(Mutex::new(Vec::new()));
        let w = written.clone();
        memory.add_write_observer(Arc::new(move |gpa, len| w.lock().unwrap().push((gpa, len))));
        let (link, pending, client) = link_for_tests(max_xfer, Duration::from_secs(5));
        Setup {
            memory,
            link,
            pending,
            client,
            deferred: DeferredDma::default(),
            written,
        }
    }

    impl Setup {
        fn start(
            &mut self,
            token: u64,
            gpa: u64,
            direction: DmaDirection,
            data: Vec<u8>,
        ) -> Option<FinishedDma> {
            let op = QueuedDma {
                token,
                gpa,
                direction,
                data,
            };
            self.deferred
                .start(op, &self.memory, Some(&self.link), &self.pending)
        }

        /// Starts a transfer that must wait for the client.
        fn start_waiting(&mut self, token: u64, gpa: u64, direction: DmaDirection, data: Vec<u8>) {
            assert!(
                self.start(token, gpa, direction, data).is_none(),
                "finished at once"
            );
        }

        /// The next request the server sent: header, address, count, data.
        fn request(&mut self) -> (Header, u64, usize, Vec<u8>) {
            let mut head = [0u8; HEADER_SIZE];
            self.client.read_exact(&mut head).unwrap();
            let h = Header::read_from(&head).unwrap();
            let mut payload = vec![0u8; h.size as usize - HEADER_SIZE];
            self.client.read_exact(&mut payload).unwrap();
            let (gpa, count) = DmaLayout::Spec.parse(&payload).unwrap();
            let at = DmaLayout::Spec.data_offset();
            let data = payload.get(at..at + count as usize).unwrap_or(&[]).to_vec();
            (h, gpa, count as usize, data)
        }

        /// Answers `h` (with `data` for a read; `errno` makes it an error reply).
        fn answer(
            &mut self,
            h: &Header,
            gpa: u64,
            data: &[u8],
            errno: Option<u32>,
        ) -> Option<FinishedDma> {
            let (reply, payload) = reply_for_tests(h, gpa, data, errno);
            let piece = self.pending.complete(&reply, &payload)?;
            self.deferred.on_reply(
                piece,
                &reply,
                &payload,
                &self.memory,
                Some(&self.link),
                &self.pending,
            )
        }
    }

    #[test]
    fn a_read_across_mapped_and_message_memory_finishes_with_its_last_reply() {
        let mut s = setup(0x800);
        // 0x100 mapped bytes, then 0x1100 by message: three requests.
        s.start_waiting(7, 0x2f00, DmaDirection::FromGuest, vec![0; 0x1200]);
        let requests: Vec<_> = (0..3).map(|_| s.request()).collect();
        let shape: Vec<_> = requests
            .iter()
            .map(|(h, gpa, n, _)| (h.command, *gpa, *n))
            .collect();
        let read = Command::DmaRead as u16;
        assert_eq!(
            shape,
            [
                (read, 0x3000, 0x800),
                (read, 0x3800, 0x800),
                (read, 0x4000, 0x100)
            ]
        );
        // Answered out of order; only the last answer finishes the transfer.
        let fill = |gpa: u64, n: usize| vec![(gpa >> 8) as u8; n];
        for (h, gpa, n, _) in requests[1..].iter().rev() {
            assert!(s.answer(h, *gpa, &fill(*gpa, *n), None).is_none());
        }
        let (h, gpa, n, _) = &requests[0];
        let done = s.answer(h, *gpa, &fill(*gpa, *n), None).expect("finished");
        assert_eq!((done.token, done.direction), (7, DmaDirection::FromGuest));
        done.result.unwrap();
        let expect: Vec<u8> = (0x1f00..0x2000)
            .map(|i| i as u8)
            .chain(fill(0x3000, 0x800))
            .chain(fill(0x3800, 0x800))
            .chain(fill(0x4000, 0x100))
            .collect();
        assert!(done.data == expect);
        assert!(s.deferred.is_idle());
    }

    fn readable(sock: &UnixStream) -> bool {
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(sock),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, zero timeout.
        unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
    }

    #[test]
    fn a_long_transfer_keeps_at_most_a_window_of_requests_out() {
        // 0x2000 bytes by message in 0x100-byte requests: 32 of them.
        let mut s = setup(0x100);
        s.start_waiting(9, 0x3000, DmaDirection::FromGuest, vec![0; 0x2000]);
        let mut out = std::collections::VecDeque::new();
        let mut done = None;
        let mut most = 0;
        while done.is_none() {
            // Everything the server sent by now (it is all buffered).
            while readable(&s.client) {
                out.push_back(s.request());
            }
            most = most.max(out.len());
            let (h, gpa, n, _) = out.pop_front().expect("a request is out");
            done = s.answer(&h, gpa, &vec![(gpa >> 8) as u8; n], None);
        }
        assert_eq!(most, WINDOW);
        let done = done.unwrap();
        done.result.unwrap();
        assert!(done
            .data
            .chunks(0x100)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == (0x30 + i) as u8)));
    }

    #[test]
    fn a_write_reaches_both_kinds_of_memory_and_its_observers() {
        let mut s = setup(0x800);
        let data: Vec<u8> = (0..0x200).map(|i| (i * 3) as u8).collect();
        s.start_waiting(1, 0x2f00, DmaDirection::ToGuest, data.clone());
        let (h, gpa, n, sent) = s.request();
        assert_eq!(
            (h.command, gpa, n),
            (Command::DmaWrite as u16, 0x3000, 0x100)
        );
        assert_eq!(sent, data[0x100..]);
        let done = s.answer(&h, gpa, &[], None).expect("finished");
        done.result.unwrap();
        let mut back = [0u8; 0x100];
        s.memory.read(0x2f00, &mut back).unwrap();
        assert_eq!(back[..], data[..0x100]);
        assert_eq!(
            *s.written.lock().unwrap(),
            [(0x2f00, 0x100), (0x3000, 0x100)]
        );
        // All fd-mapped: finished at once, no message.
        let done = s
            .start(2, 0x1000, DmaDirection::ToGuest, vec![5; 8])
            .expect("at once");
        done.result.unwrap();
    }

    #[test]
    fn refusals_mismatches_and_silence_fail_the_transfer_not_the_session() {
        let mut s = setup(0x800);
        // The client refuses one of two requests: the transfer fails once both
        // are answered.
        s.start_waiting(1, 0x3000, DmaDirection::FromGuest, vec![0; 0x1000]);
        let (h1, g1, n1, _) = s.request();
        let (h2, g2, _, _) = s.request();
        assert!(s.answer(&h2, g2, &[], Some(libc::EFAULT as u32)).is_none());
        let done = s.answer(&h1, g1, &vec![0; n1], None).expect("finished");
        assert!(matches!(done.result, Err(MemoryError::Transport(_))));
        // A reply for another address than asked.
        s.start_waiting(2, 0x3000, DmaDirection::FromGuest, vec![0; 16]);
        let (h, _, _, _) = s.request();
        let done = s.answer(&h, 0x3100, &[0; 16], None).expect("finished");
        assert!(matches!(done.result, Err(MemoryError::Transport(_))));
        // No reply: expired at the deadline, and the late reply finds nothing.
        s.start_waiting(3, 0x3000, DmaDirection::FromGuest, vec![0; 16]);
        let (h, g, n, _) = s.request();
        assert!(s
            .deferred
            .take_expired(Instant::now(), &s.pending)
            .is_none());
        let later = Instant::now() + Duration::from_secs(6);
        let done = s.deferred.take_expired(later, &s.pending).expect("expired");
        assert_eq!(done.token, 3);
        assert!(done.result.is_err());
        assert!(s.answer(&h, g, &vec![0; n], None).is_none());
        assert!(s.deferred.is_idle());
        // Unmapped bytes after fd-less ones: the transfer goes as far as a
        // device's would, and fails there once the request out is answered.
        s.start_waiting(4, 0x4ff0, DmaDirection::FromGuest, vec![0; 0x20]);
        let (h, g, n, _) = s.request();
        assert_eq!((g, n), (0x4ff0, 0x10));
        let done = s.answer(&h, g, &[0; 0x10], None).expect("finished");
        assert!(matches!(done.result, Err(MemoryError::Unmapped(0x5000))));
        // Refused before any message: unmapped start, bus mastering off.
        let done = s
            .start(4, 0x6000, DmaDirection::FromGuest, vec![0; 0x20])
            .expect("at once");
        assert!(matches!(done.result, Err(MemoryError::Unmapped(0x6000))));
        s.memory.set_bus_master(false);
        let done = s
            .start(5, 0x3000, DmaDirection::ToGuest, vec![0; 4])
            .expect("at once");
        assert!(matches!(done.result, Err(MemoryError::BusMasterDisabled)));
    }
}
