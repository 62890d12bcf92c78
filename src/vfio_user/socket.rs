//! Framing of vfio-user messages on a UNIX stream socket, with fds passed as
//! SCM_RIGHTS. Both the server and the client use these two halves.
//!
//! The reader takes whatever the socket holds with one `recvmsg` into a buffer
//! that lives as long as the connection, and carries the bytes beyond the current
//! message over to the next call: one system call per message on the steady path
//! (fewer when the peer pipelines, as QEMU does with posted MMIO writes), and no
//! allocation.
//!
//! fds travel with the first byte of the message that carries them, and the
//! kernel ends a `recvmsg` right after the stretch of the stream that brought fds
//! (it glues earlier fd-less bytes in front of that stretch, never later bytes
//! behind it). So the fds of one `recvmsg` belong to the last message that starts
//! within the bytes that call returned: the reader files them under that
//! message's stream offset and hands them out with it.
//!
//! Why by hand and not vmm-sys-util's `ScmSocket`: that one reads into a
//! caller's buffer per call (a message would take two `recvmsg`, header then
//! payload, or a copy) and allocates its fd list on every call; the trapped
//! 4-byte read is one `recvmsg` and one `sendto` here, and the rest of the
//! round trip is measured against a bare socket echo (docs/performance.md:
//! the hand-written path is what keeps it at ≥ 0.95× the floor).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::wire::{Header, WireStruct, HEADER_SIZE};

/// Most fds we accept in one message (QEMU refuses servers that ask for more than 16).
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Size of the reader's buffer before a large message grows it: room for many
/// small pipelined messages in one `recvmsg`.
const READ_AHEAD: usize = 64 * 1024;

/// Buffered bytes are moved to the front of the buffer when less room than this
/// is left behind them (or the current message would not fit).
const MIN_ROOM: usize = READ_AHEAD / 4;

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a message")]
    Truncated,
    #[error("message size {0} is smaller than a header")]
    BadSize(u32),
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
}

/// One received message: header, payload (borrowed from the reader) and fds.
pub struct Received<'a> {
    pub header: Header,
    pub payload: &'a [u8],
    pub fds: Vec<OwnedFd>,
    /// Set when the payload was larger than the reader's limit: it was read and
    /// discarded, and `payload` is empty. The stream is still in step.
    pub oversized: bool,
    /// Set when more fds came than [`MAX_FDS_PER_MESSAGE`]: the kernel closed the
    /// excess, so the message cannot be acted on. The stream is still in step.
    pub fds_truncated: bool,
}

/// fds received before the message they belong to was handed out.
struct PendingFds {
    /// Stream offset of the first byte of their message.
    at: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// Reading half: frames messages and collects their fds.
pub struct MessageReader {
    stream: UnixStream,
    /// Bytes received and not yet handed out are `buf[start..end]`; a read may
    /// fill up to `buf.len()`, which grows to the largest message kept and never
    /// shrinks.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    max_payload: usize,
    /// Stream offset of the message being read, and of its end once the header
    /// is known.
    msg_start: u64,
    msg_end: Option<u64>,
    pending_fds: VecDeque<PendingFds>,
}

impl MessageReader {
    /// `max_payload` bounds what is kept in memory; larger payloads are drained.
    pub fn new(stream: UnixStream, max_payload: usize) -> Self {
        MessageReader {
            stream,
            buf: vec![0; READ_AHEAD],
            start: 0,
            end: 0,
            base: 0,
            max_payload,
            msg_start: 0,
            msg_end: None,
            pending_fds: VecDeque::new(),
        }
    }

    /// Reads the next whole message. `Err(FrameError::Closed)` at a clean EOF.
    pub fn read_message(&mut self) -> Result<Received<'_>, FrameError> {
        if self.start == self.end {
            // Nothing carried over: start again at the front, no copy.
            self.base += self.end as u64;
            self.start = 0;
            self.end = 0;
        }
        self.msg_start = self.base + self.start as u64;
        self.msg_end = None;
        while self.buffered() < HEADER_SIZE {
            self.fill(HEADER_SIZE)?;
        }
        let header =
            Header::read_from(&self.buf[self.start..self.end]).ok_or(FrameError::Truncated)?;
        let payload_len = header
            .payload_size()
            .ok_or(FrameError::BadSize(header.size))?;
        let total = header.size as usize;
        self.msg_end = Some(self.msg_start + total as u64);
        let oversized = payload_len > self.max_payload;
        if oversized {
            self.drain(total)?;
        } else {
            while self.buffered() < total {
                self.fill(total)?;
            }
        }
        let (fds, fds_truncated) = self.take_fds(self.msg_start);
        let payload = if oversized {
            &[][..]
        } else {
            let at = self.start + HEADER_SIZE;
            self.start += total;
            &self.buf[at..at + payload_len]
        };
        Ok(Received {
            header,
            payload,
            fds,
            oversized,
            fds_truncated,
        })
    }

    /// Whether received bytes wait in the reader. The next
    /// [`read_message`](MessageReader::read_message) may then return without the
    /// socket becoming readable: check this before polling the socket.
    pub fn has_buffered(&self) -> bool {
        self.end > self.start
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Moves the buffered bytes to the front of the buffer.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// One `recvmsg` of whatever the socket holds, with room for a message of
    /// `want` bytes at `start`.
    #[inline]
    fn fill(&mut self, want: usize) -> Result<(), FrameError> {
        if self.buf.len() - self.end < MIN_ROOM || self.buf.len() - self.start < want {
            self.compact();
        }
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        let read_at = self.base + self.end as u64;
        let (n, fds, truncated) =
            recv_with_fds(self.stream.as_raw_fd(), &mut self.buf[self.end..])?;
        if n == 0 {
            let between_messages = self.buffered() == 0 && self.msg_end.is_none();
            return Err(if between_messages {
                FrameError::Closed
            } else {
                FrameError::Truncated
            });
        }
        self.end += n;
        if !fds.is_empty() || truncated {
            let at = self.last_message_start_before(read_at + n as u64);
            self.pending_fds
                .push_back(PendingFds { at, fds, truncated });
        }
        Ok(())
    }

    /// Reads and discards the current message of `total` bytes, keeping whatever
    /// follows it.
    fn drain(&mut self, total: usize) -> Result<(), FrameError> {
        let mut left = total;
        loop {
            let take = left.min(self.buffered());
            self.start += take;
            left -= take;
            if left == 0 {
                return Ok(());
            }
            self.base += self.end as u64;
            self.start = 0;
            self.end = 0;
            self.fill(1)?;
        }
    }

    /// Stream offset of the last message that starts before stream offset `until`,
    /// walking the headers from the message being read.
    fn last_message_start_before(&self, until: u64) -> u64 {
        let mut at = self.msg_start;
        let mut next = self.msg_end;
        loop {
            let end = match next {
                Some(end) => end,
                None => match self.header_at(at) {
                    Some(h) if h.size as usize >= HEADER_SIZE => at + u64::from(h.size),
                    // Header not (fully) here yet, or broken: the message at `at`
                    // is the last one that starts in what we have.
                    _ => return at,
                },
            };
            if end >= until {
                return at;
            }
            at = end;
            next = None;
        }
    }

    /// The header at stream offset `at`, if all of it is buffered.
    fn header_at(&self, at: u64) -> Option<Header> {
        let from = usize::try_from(at.checked_sub(self.base)?).ok()?;
        if from < self.start {
            return None;
        }
        Header::read_from(self.buf.get(from..self.end)?)
    }

    /// The fds filed under the message at stream offset `at`. Any filed under an
    /// earlier offset belonged to no message we handed out (the peer broke the
    /// rules): they are closed.
    #[inline]
    fn take_fds(&mut self, at: u64) -> (Vec<OwnedFd>, bool) {
        if self.pending_fds.is_empty() {
            return (Vec::new(), false);
        }
        self.take_pending_fds(at)
    }

    #[cold]
    #[inline(never)]
    fn take_pending_fds(&mut self, at: u64) -> (Vec<OwnedFd>, bool) {
        let mut fds = Vec::new();
        let mut truncated = false;
        while self.pending_fds.front().is_some_and(|p| p.at <= at) {
            let Some(p) = self.pending_fds.pop_front() else {
                break;
            };
            if p.at == at {
                if fds.is_empty() {
                    fds = p.fds;
                } else {
                    fds.extend(p.fds);
                }
                truncated |= p.truncated;
            }
        }
        (fds, truncated)
    }
}

/// Writing half, shared by every thread that sends on the connection; a whole
/// message is written under the lock so messages never interleave.
pub struct MessageWriter {
    stream: Mutex<UnixStream>,
}

impl MessageWriter {
    pub fn new(stream: UnixStream) -> Self {
        MessageWriter {
            stream: Mutex::new(stream),
        }
    }

    /// Sends `header` followed by `parts`, with `fds` attached to the first byte.
    /// `header.size` must already be the total size.
    #[inline]
    pub fn send(&self, header: &Header, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        let total = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        if fds.is_empty() && total <= SMALL_MESSAGE {
            // Small and fd-less (every MMIO access and its reply): gathered into
            // one buffer and sent with send(2), which skips sendmsg's msghdr and
            // iovec copies. Inlined into its callers, the copies of fixed-size
            // parts become plain moves.
            let mut buf = [0u8; SMALL_MESSAGE];
            buf[..HEADER_SIZE].copy_from_slice(header.as_bytes());
            let mut at = HEADER_SIZE;
            for part in parts {
                buf[at..at + part.len()].copy_from_slice(part);
                at += part.len();
            }
            let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
            return send_small(stream.as_raw_fd(), &buf[..total]);
        }
        self.send_gathered(header, parts, fds)
    }

    /// Large messages and messages with fds: `sendmsg` of the parts in place.
    #[inline(never)]
    fn send_gathered(&self, header: &Header, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        let mut iov: [IoSlice<'_>; 4] = [IoSlice::new(&[]); 4];
        if parts.len() >= iov.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many message parts",
            ));
        }
        iov[0] = IoSlice::new(header.as_bytes());
        for (slot, part) in iov[1..].iter_mut().zip(parts) {
            *slot = IoSlice::new(part);
        }
        let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        send_all(stream.as_raw_fd(), &mut iov[..=parts.len()], fds)
    }

    /// Shuts the connection down in both directions, waking a blocked reader.
    pub fn shutdown(&self) {
        let stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let _ = stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Messages up to this size without fds are sent from one contiguous buffer.
pub const SMALL_MESSAGE: usize = 128;

/// Writes all of `buf` with send(2).
#[inline]
pub fn send_small(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: sendto reads `buf.len()` bytes from a live slice; no address.
        // The raw system call skips the C library's cancellation-point wrapper.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                buf.as_ptr(),
                buf.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// `recvmsg` into `buf`, collecting up to [`MAX_FDS_PER_MESSAGE`] fds (close-on-exec).
/// Returns bytes read, the fds, and whether the kernel truncated the fd list.
#[inline]
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>, bool)> {
    const CMSG_SPACE: usize = cmsg_space(MAX_FDS_PER_MESSAGE * size_of::<RawFd>());
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CMSG_SPACE.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CMSG_SPACE as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (covering `buf`) and at `control`, all live
        // and writable for the duration of the call. The raw system call skips the
        // C library's cancellation-point wrapper.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                fd,
                &mut msg as *mut libc::msghdr,
                libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
    if msg.msg_controllen == 0 {
        // No control message: the common case, nothing to walk.
        return Ok((n, Vec::new(), truncated));
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in, bounded
    // by msg_controllen; each SCM_RIGHTS payload is an array of fds the kernel
    // installed in our table, which we take ownership of exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                for i in 0..len / size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, fds, truncated))
}

const fn cmsg_space(len: usize) -> usize {
    let align = size_of::<usize>();
    let hdr = (size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    hdr + ((len + align - 1) & !(align - 1))
}

/// Writes every byte of `iov` with `sendmsg`, attaching `fds` to the first call.
pub fn send_all(fd: RawFd, iov: &mut [IoSlice<'_>], fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    const CMSG_SPACE: usize = cmsg_space(MAX_FDS_PER_MESSAGE * size_of::<RawFd>());
    let mut control = [0u64; CMSG_SPACE.div_ceil(8)];
    let mut fds_pending = !fds.is_empty();
    let mut iov = iov;
    IoSlice::advance_slices(&mut iov, 0);
    while !iov.is_empty() {
        // SAFETY: zeroed msghdr is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len() as _;
        if fds_pending {
            let data_len = std::mem::size_of_val(fds);
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(data_len) as _;
            // SAFETY: `control` is large enough for MAX_FDS_PER_MESSAGE fds (checked
            // above) and aligned; CMSG_FIRSTHDR is non-null because msg_controllen
            // covers one header; we copy exactly `data_len` bytes of fds into it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    data_len,
                );
            }
        }
        // SAFETY: IoSlice is ABI-compatible with iovec; `msg` points at live buffers.
        let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        fds_pending = false;
        IoSlice::advance_slices(&mut iov, n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio_user::wire::FLAGS_TYPE_COMMAND;
    use std::io::Write;

    #[test]
    fn message_with_fds_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = MessageWriter::new(a);
        let mut reader = MessageReader::new(b, 1024);
        let memfd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        let payload = [1u8, 2, 3, 4];
        let header = Header {
            msg_id: 3,
            command: 9,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        };
        writer
            .send(
                &header,
                &[&payload],
                &[memfd.as_raw_fd(), memfd.as_raw_fd()],
            )
            .unwrap();
        let m = reader.read_message().unwrap();
        assert_eq!(m.header, header);
        assert_eq!(m.payload, &payload);
        assert_eq!(m.fds.len(), 2);
    }

    #[test]
    fn oversized_payload_is_drained_in_step() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut reader = MessageReader::new(b, 8);
        let big = Header {
            msg_id: 1,
            command: 10,
            size: (HEADER_SIZE + 100) as u32,
            ..Default::default()
        };
        let small = Header {
            msg_id: 2,
            command: 13,
            size: HEADER_SIZE as u32,
            ..Default::default()
        };
        let writer = std::thread::spawn(move || {
            a.write_all(big.as_bytes()).unwrap();
            a.write_all(&[0xaa; 100]).unwrap();
            a.write_all(small.as_bytes()).unwrap();
        });
        let m = reader.read_message().unwrap();
        assert!(m.oversized && m.payload.is_empty());
        let m = reader.read_message().unwrap();
        assert_eq!(m.header.msg_id, 2);
        writer.join().unwrap();
        assert!(matches!(reader.read_message(), Err(FrameError::Closed)));
    }

    fn header(msg_id: u16, payload: usize) -> Header {
        Header {
            msg_id,
            command: 10,
            size: (HEADER_SIZE + payload) as u32,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        }
    }

    fn eventfd() -> vmm_sys_util::eventfd::EventFd {
        vmm_sys_util::eventfd::EventFd::new(0).unwrap()
    }

    #[test]
    fn pipelined_messages_come_out_one_by_one() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut reader = MessageReader::new(b, 1 << 20);
        let mut bytes = Vec::new();
        for id in 0..100u16 {
            bytes.extend_from_slice(header(id, 8).as_bytes());
            bytes.extend_from_slice(&u64::from(id).to_le_bytes());
        }
        a.write_all(&bytes).unwrap();
        drop(a);
        for id in 0..100u16 {
            let m = reader.read_message().unwrap();
            assert_eq!(m.header.msg_id, id);
            assert_eq!(m.payload, &u64::from(id).to_le_bytes());
            assert!(m.fds.is_empty());
        }
        assert!(!reader.has_buffered());
        assert!(matches!(reader.read_message(), Err(FrameError::Closed)));
    }

    #[test]
    fn fds_stay_with_their_message_when_reads_glue_messages() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = MessageWriter::new(a);
        let mut reader = MessageReader::new(b, 1 << 20);
        let (e1, e2) = (eventfd(), eventfd());
        // Everything is queued before the first read, so reads can glue messages.
        let plan: [(u16, Vec<RawFd>); 6] = [
            (0, vec![]),
            (1, vec![e1.as_raw_fd()]),
            (2, vec![]),
            (3, vec![]),
            (4, vec![e1.as_raw_fd(), e2.as_raw_fd()]),
            (5, vec![e2.as_raw_fd()]),
        ];
        for (id, fds) in &plan {
            writer.send(&header(*id, 4), &[&[7u8; 4]], fds).unwrap();
        }
        for (id, fds) in &plan {
            let m = reader.read_message().unwrap();
            assert_eq!(m.header.msg_id, *id);
            assert_eq!(m.fds.len(), fds.len(), "fds of message {id}");
            assert!(!m.fds_truncated);
        }
    }

    #[test]
    fn large_messages_grow_the_buffer_and_keep_what_follows() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = MessageWriter::new(a);
        let mut reader = MessageReader::new(b, 1 << 20);
        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let fd = eventfd();
        let t = std::thread::spawn(move || {
            writer.send(&header(1, 4), &[&[1; 4]], &[]).unwrap();
            writer
                .send(&header(2, big.len()), &[&big], &[fd.as_raw_fd()])
                .unwrap();
            writer.send(&header(3, 4), &[&[3; 4]], &[]).unwrap();
            big
        });
        assert_eq!(reader.read_message().unwrap().header.msg_id, 1);
        let m = reader.read_message().unwrap();
        assert_eq!(m.header.msg_id, 2);
        assert_eq!(m.fds.len(), 1);
        let got = m.payload.to_vec();
        let m = reader.read_message().unwrap();
        assert_eq!((m.header.msg_id, m.payload), (3, &[3u8; 4][..]));
        assert_eq!(got, t.join().unwrap());
    }

    #[test]
    fn oversized_message_with_fds_is_drained_and_the_next_keeps_its_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let writer = MessageWriter::new(a);
        let mut reader = MessageReader::new(b, 16);
        let (e1, e2) = (eventfd(), eventfd());
        let big = vec![0xaa; 200_000];
        let t = std::thread::spawn(move || {
            writer
                .send(&header(1, big.len()), &[&big], &[e1.as_raw_fd()])
                .unwrap();
            writer
                .send(&header(2, 8), &[&[2; 8]], &[e1.as_raw_fd(), e2.as_raw_fd()])
                .unwrap();
        });
        let m = reader.read_message().unwrap();
        assert!(m.oversized && m.payload.is_empty());
        assert_eq!(m.fds.len(), 1);
        let m = reader.read_message().unwrap();
        assert_eq!((m.header.msg_id, m.fds.len()), (2, 2));
        t.join().unwrap();
        assert!(matches!(reader.read_message(), Err(FrameError::Closed)));
    }

    #[test]
    fn message_split_across_writes_and_eof_inside_one() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut reader = MessageReader::new(b, 1024);
        let mut bytes = header(9, 8).as_bytes().to_vec();
        bytes.extend_from_slice(&[5; 8]);
        let t = std::thread::spawn(move || {
            for byte in &bytes {
                a.write_all(&[*byte]).unwrap();
                std::thread::yield_now();
            }
            // Half a header, then EOF.
            a.write_all(&bytes[..7]).unwrap();
        });
        let m = reader.read_message().unwrap();
        assert_eq!((m.header.msg_id, m.payload), (9, &[5u8; 8][..]));
        t.join().unwrap();
        assert!(matches!(reader.read_message(), Err(FrameError::Truncated)));
    }

    #[test]
    fn too_small_size_is_refused() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut reader = MessageReader::new(b, 1024);
        let mut h = header(1, 0);
        h.size = 8;
        a.write_all(h.as_bytes()).unwrap();
        assert!(matches!(reader.read_message(), Err(FrameError::BadSize(8))));
    }
}
