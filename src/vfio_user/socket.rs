//! Framing of vfio-user messages on a UNIX stream socket, with fds passed as
//! SCM_RIGHTS. Both the server and the client use these two halves.
//!
//! A message's fds arrive with its first byte, so the header is read with
//! `recvmsg` and the payload with plain reads into a buffer that is reused from one
//! message to the next (no allocation on the steady path).

use std::io::{self, IoSlice, Read};
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

use super::wire::{Header, WireStruct, HEADER_SIZE};

/// Most fds we accept in one message (QEMU refuses servers that ask for more than 16).
pub const MAX_FDS_PER_MESSAGE: usize = 16;

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

/// Reading half: frames messages and collects their fds.
pub struct MessageReader {
    stream: UnixStream,
    buf: Vec<u8>,
    max_payload: usize,
}

impl MessageReader {
    /// `max_payload` bounds what is kept in memory; larger payloads are drained.
    pub fn new(stream: UnixStream, max_payload: usize) -> Self {
        MessageReader {
            stream,
            buf: Vec::new(),
            max_payload,
        }
    }

    /// Reads the next whole message. `Err(FrameError::Closed)` at a clean EOF.
    pub fn read_message(&mut self) -> Result<Received<'_>, FrameError> {
        let mut hdr = [0u8; HEADER_SIZE];
        let (n, fds, truncated) = recv_with_fds(self.stream.as_raw_fd(), &mut hdr)?;
        if n == 0 {
            return Err(FrameError::Closed);
        }
        read_exact_or(&mut self.stream, &mut hdr[n..])?;
        // Unwrap-free: the array has exactly HEADER_SIZE bytes.
        let header = Header::read_from(&hdr).unwrap_or_default();
        let payload_len = header
            .payload_size()
            .ok_or(FrameError::BadSize(header.size))?;
        let oversized = payload_len > self.max_payload;
        if oversized {
            drain(&mut self.stream, payload_len)?;
            self.buf.clear();
        } else {
            self.buf.resize(payload_len, 0);
            read_exact_or(&mut self.stream, &mut self.buf)?;
        }
        Ok(Received {
            header,
            payload: if oversized { &[] } else { &self.buf },
            fds,
            oversized,
            fds_truncated: truncated,
        })
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }
}

fn read_exact_or(stream: &mut UnixStream, buf: &mut [u8]) -> Result<(), FrameError> {
    stream.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })
}

fn drain(stream: &mut UnixStream, mut len: usize) -> Result<(), FrameError> {
    let mut scratch = [0u8; 4096];
    while len > 0 {
        let chunk = len.min(scratch.len());
        read_exact_or(stream, &mut scratch[..chunk])?;
        len -= chunk;
    }
    Ok(())
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
    pub fn send(&self, header: &Header, parts: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
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

/// `recvmsg` into `buf`, collecting up to [`MAX_FDS_PER_MESSAGE`] fds (close-on-exec).
/// Returns bytes read, the fds, and whether the kernel truncated the fd list.
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
        // and writable for the duration of the call.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
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
    let truncated = msg.msg_flags & libc::MSG_CTRUNC != 0;
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
}
