//! Where the picture goes: the vhost-user-gpu display channel to the front-end
//! (QEMU shows it), behind a small trait so the model does not care.
//!
//! The channel is spoken here, on the socket taken back from the `vhost` crate
//! (`umdev::vhost_user::gpu_socket`), because the crate's `GpuBackend` blocks
//! for as long as the front-end does not read (it retries `EAGAIN` forever)
//! and awaits replies without a timeout. Here every message has a deadline
//! ([`DISPLAY_TIMEOUT`]): it is sent with non-blocking sends and waits for
//! room (and a reply for its answer) at most that long. A front-end that does
//! not read or answer in time loses the channel: it is shut down, logged once,
//! and the device goes on without a display (its own modes and EDID, no
//! updates) until the front-end sends another socket or reconnects. Frames are
//! never dropped half-way: a message is sent whole or the channel is closed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, error, warn};
// The display channel's requests (QEMU `docs/interop/vhost-user-gpu.rst`).
use vhost::vhost_user::gpu_message::{GpuBackendReq, VhostUserGpuHeaderFlag};

use crate::protocol::{DisplayMode, Rect, EDID_BLOB_SIZE, MAX_SCANOUTS};

/// `VHOST_USER_GPU_PROTOCOL_F_EDID` (bit 0, as QEMU sends it). The `vhost`
/// crate's `VhostUserGpuProtocolFeatures` has EDID as 0 and DMABUF2 as bit 0,
/// so it is not used.
pub const GPU_PROTOCOL_F_EDID: u64 = 1 << 0;

/// Cursor images are 64 x 64 pixels, B, G, R, A bytes.
pub const CURSOR_SIZE: u32 = 64;

/// How long one message to the display may take to be sent whole (the
/// front-end reading it) and, for a request, answered.
pub const DISPLAY_TIMEOUT: Duration = Duration::from_secs(1);

const HEADER_SIZE: usize = 12;
/// Largest reply taken (a `virtio_gpu_resp_edid` is 1056 bytes).
const MAX_REPLY: usize = 4096;
/// `struct virtio_gpu_resp_display_info`: a 24-byte header, then 16 x
/// (rect, enabled, flags).
const DISPLAY_INFO_SIZE: usize = 24 + 16 * 24;

/// A display that shows the device's scanouts.
pub trait DisplayOutput: Send {
    /// The display's preferred modes, if it has an opinion.
    fn display_info(&self) -> Option<Vec<DisplayMode>>;
    /// The display's EDID for `scanout`, if it has one.
    fn edid(&self, scanout: u32) -> Option<Vec<u8>>;
    /// Scanout `scanout` now shows a `width` x `height` picture (0 x 0: off).
    fn set_scanout(&self, scanout: u32, width: u32, height: u32) -> io::Result<()>;
    /// New pixels (B, G, R, X) for `rect` of the scanout's picture.
    fn update(&self, scanout: u32, rect: Rect, bgrx: &[u8]) -> io::Result<()>;
    /// A new cursor image (`image` of [`CURSOR_SIZE`]² B, G, R, A pixels) or
    /// `None` to hide it, at (`x`, `y`) of `scanout`.
    fn cursor(
        &self,
        scanout: u32,
        x: u32,
        y: u32,
        hot: (u32, u32),
        image: Option<&[u8]>,
    ) -> io::Result<()>;
    /// Moves the cursor.
    fn move_cursor(&self, scanout: u32, x: u32, y: u32) -> io::Result<()>;
}

/// Why a message to the display failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the display channel is closed (an earlier message failed)")]
    Closed,
    #[error("the front-end did not {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("unexpected reply: request {request}, flags {flags:#x}, {size} bytes")]
    BadReply { request: u32, flags: u32, size: u32 },
}

impl From<ChannelError> for io::Error {
    fn from(e: ChannelError) -> io::Error {
        match e {
            ChannelError::Io(e) => e,
            ChannelError::Timeout { .. } => io::Error::new(io::ErrorKind::TimedOut, e),
            ChannelError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, e),
            ChannelError::BadReply { .. } => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// The socket, and whether it still works.
struct Channel {
    sock: OwnedFd,
    closed: bool,
}

impl Channel {
    /// Waits until the socket is ready for `events` or the deadline passes.
    fn wait(
        &self,
        events: libc::c_short,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), ChannelError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::Timeout {
                    what,
                    timeout: DISPLAY_TIMEOUT,
                });
            }
            let mut pfd = libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: poll on one pollfd on the stack, for a socket we own.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if n > 0 {
                // Ready, or an error/hang-up the next call reports.
                return Ok(());
            }
        }
    }

    /// Sends `parts` as one message, whole, before `deadline`.
    fn send_all(&self, parts: &[&[u8]], deadline: Instant) -> Result<(), ChannelError> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        while sent < total {
            // The parts not sent yet, the first one cut where it stopped.
            let mut iov = Vec::with_capacity(parts.len());
            let mut skip = sent;
            for p in parts {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov.push(libc::iovec {
                    iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: p.len() - skip,
                });
                skip = 0;
            }
            // SAFETY: a zeroed msghdr pointing at iovecs of live slices that
            // outlive the call; nothing is received into them.
            let n = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = iov.len() as _;
                libc::sendmsg(
                    self.sock.as_raw_fd(),
                    &msg,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                sent += n as usize;
                continue;
            }
            self.after_failure(libc::POLLOUT, deadline, "read the display channel")?;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes before `deadline`.
    fn recv_exact(&self, buf: &mut [u8], deadline: Instant) -> Result<(), ChannelError> {
        let mut got = 0;
        while got < buf.len() {
            // SAFETY: receives into the unfilled tail of a live buffer.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    buf[got..].as_mut_ptr().cast(),
                    buf.len() - got,
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                got += n as usize;
                continue;
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            self.after_failure(libc::POLLIN, deadline, "answer on the display channel")?;
        }
        Ok(())
    }

    /// After a non-blocking send or receive failed: waits for `events`
    /// (bounded by `deadline`) if it would have blocked, goes on if it was
    /// interrupted, else fails with its error.
    fn after_failure(
        &self,
        events: libc::c_short,
        deadline: Instant,
        what: &'static str,
    ) -> Result<(), ChannelError> {
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => self.wait(events, deadline, what),
            io::ErrorKind::Interrupted => Ok(()),
            _ => Err(e.into()),
        }
    }

    /// Sends `request` with `body` parts; with `reply`, waits for the
    /// answer and returns its payload.
    fn call(
        &self,
        request: GpuBackendReq,
        body: &[&[u8]],
        reply: bool,
    ) -> Result<Vec<u8>, ChannelError> {
        let code = request as u32;
        if self.closed {
            return Err(ChannelError::Closed);
        }
        let size: usize = body.iter().map(|p| p.len()).sum();
        let size = u32::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut header = [0u8; HEADER_SIZE];
        header[0..4].copy_from_slice(&code.to_ne_bytes());
        header[8..12].copy_from_slice(&size.to_ne_bytes());
        let mut parts = Vec::with_capacity(body.len() + 1);
        parts.push(&header[..]);
        parts.extend_from_slice(body);
        let deadline = Instant::now() + DISPLAY_TIMEOUT;
        self.send_all(&parts, deadline)?;
        if !reply {
            return Ok(Vec::new());
        }
        let mut header = [0u8; HEADER_SIZE];
        self.recv_exact(&mut header, deadline)?;
        let word = |i: usize| u32::from_ne_bytes(header[i..i + 4].try_into().unwrap_or_default());
        let (answered, flags, size) = (word(0), word(4), word(8));
        let is_reply = flags & VhostUserGpuHeaderFlag::REPLY.bits() != 0;
        if answered != code || !is_reply || size as usize > MAX_REPLY {
            return Err(ChannelError::BadReply {
                request: answered,
                flags,
                size,
            });
        }
        let mut payload = vec![0; size as usize];
        self.recv_exact(&mut payload, deadline)?;
        Ok(payload)
    }
}

/// The vhost-user-gpu channel QEMU hands over with VHOST_USER_GPU_SET_SOCKET
/// (see the module documentation for the deadlines).
///
/// Protocol features are negotiated on first use, not when the socket
/// arrives: QEMU sends SET_SOCKET from its main loop and keeps talking
/// vhost-user before it reads the display socket, so a reply awaited there
/// would deadlock both sides.
pub struct FrontendDisplay {
    channel: Mutex<Channel>,
    edid: Mutex<Option<bool>>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

impl FrontendDisplay {
    /// The display behind `sock`, the front-end's display socket.
    pub fn new(sock: OwnedFd) -> Self {
        FrontendDisplay {
            channel: Mutex::new(Channel {
                sock,
                closed: false,
            }),
            edid: Mutex::new(None),
        }
    }

    /// One message; a failure closes the channel for good (logged once).
    fn call(&self, request: GpuBackendReq, body: &[&[u8]], reply: bool) -> io::Result<Vec<u8>> {
        let mut channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        let result = channel.call(request, body, reply);
        if let Err(e) = &result {
            if !channel.closed {
                channel.closed = true;
                // SAFETY: shutdown on the socket we own; the peer sees the end.
                unsafe { libc::shutdown(channel.sock.as_raw_fd(), libc::SHUT_RDWR) };
                error!(
                    request = request as u32,
                    "display channel: {e}; closed: no more display output, modes and EDID \
                     are the device's own until the front-end sends another socket"
                );
            }
        }
        result.map_err(io::Error::from)
    }

    /// Whether the front-end offers EDID (asked once).
    fn edid_supported(&self) -> bool {
        let mut known = self.edid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = *known {
            return v;
        }
        let offered = match self.call(GpuBackendReq::GET_PROTOCOL_FEATURES, &[], true) {
            Ok(f) => f
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_ne_bytes),
            Err(e) => {
                warn!("display: GET_PROTOCOL_FEATURES: {e}");
                0
            }
        };
        let ours = offered & GPU_PROTOCOL_F_EDID;
        if let Err(e) = self.call(
            GpuBackendReq::SET_PROTOCOL_FEATURES,
            &[&ours.to_ne_bytes()],
            false,
        ) {
            warn!("display: SET_PROTOCOL_FEATURES: {e}");
        }
        debug!(offered, "display protocol features");
        *known = Some(ours != 0);
        ours != 0
    }
}

fn words(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_ne_bytes()).collect()
}

impl DisplayOutput for FrontendDisplay {
    fn display_info(&self) -> Option<Vec<DisplayMode>> {
        self.edid_supported();
        match self.call(GpuBackendReq::GET_DISPLAY_INFO, &[], true) {
            Ok(info) if info.len() >= DISPLAY_INFO_SIZE => Some(
                (0..MAX_SCANOUTS)
                    .map(|i| {
                        let at = 24 + 24 * i;
                        DisplayMode {
                            rect: Rect {
                                x: u32_at(&info, at),
                                y: u32_at(&info, at + 4),
                                width: u32_at(&info, at + 8),
                                height: u32_at(&info, at + 12),
                            },
                            enabled: u32_at(&info, at + 16) != 0,
                        }
                    })
                    .collect(),
            ),
            Ok(info) => {
                warn!("display: GET_DISPLAY_INFO: {} bytes of reply", info.len());
                None
            }
            Err(e) => {
                warn!("display: GET_DISPLAY_INFO: {e}");
                None
            }
        }
    }

    fn edid(&self, scanout: u32) -> Option<Vec<u8>> {
        if !self.edid_supported() {
            return None;
        }
        match self.call(GpuBackendReq::GET_EDID, &[&scanout.to_ne_bytes()], true) {
            // struct virtio_gpu_resp_edid: header, size, padding, edid[1024].
            Ok(resp) if resp.len() >= 32 => {
                let len = (u32_at(&resp, 24) as usize)
                    .min(EDID_BLOB_SIZE)
                    .min(resp.len() - 32);
                Some(resp[32..32 + len].to_vec())
            }
            Ok(resp) => {
                warn!("display: GET_EDID: {} bytes of reply", resp.len());
                None
            }
            Err(e) => {
                warn!("display: GET_EDID: {e}");
                None
            }
        }
    }

    fn set_scanout(&self, scanout: u32, width: u32, height: u32) -> io::Result<()> {
        let body = words(&[scanout, width, height]);
        self.call(GpuBackendReq::SCANOUT, &[&body], false).map(drop)
    }

    fn update(&self, scanout: u32, rect: Rect, bgrx: &[u8]) -> io::Result<()> {
        let body = words(&[scanout, rect.x, rect.y, rect.width, rect.height]);
        self.call(GpuBackendReq::UPDATE, &[&body, bgrx], false)
            .map(drop)
    }

    fn cursor(
        &self,
        scanout: u32,
        x: u32,
        y: u32,
        hot: (u32, u32),
        image: Option<&[u8]>,
    ) -> io::Result<()> {
        let pos = words(&[scanout, x, y]);
        let Some(image) = image else {
            return self
                .call(GpuBackendReq::CURSOR_POS_HIDE, &[&pos], false)
                .map(drop);
        };
        let mut data = vec![0u8; 4 * (CURSOR_SIZE * CURSOR_SIZE) as usize];
        let n = image.len().min(data.len());
        data[..n].copy_from_slice(&image[..n]);
        let hot = words(&[hot.0, hot.1]);
        self.call(GpuBackendReq::CURSOR_UPDATE, &[&pos, &hot, &data], false)
            .map(drop)
    }

    fn move_cursor(&self, scanout: u32, x: u32, y: u32) -> io::Result<()> {
        let pos = words(&[scanout, x, y]);
        self.call(GpuBackendReq::CURSOR_POS, &[&pos], false)
            .map(drop)
    }
}
