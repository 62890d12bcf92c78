//! A whole vfio-user server session fed bytes that a hostile client chose.
//!
//! For [`run_bytes`], the input is written into one end of a socketpair, whose
//! write side is then shut down; `Server::serve_connection` serves the other end with an `edu`
//! function until it sees EOF (or gives up on the stream). Replies are drained and
//! discarded. No fds travel: what fds can do is covered by the integration tests.
//!
//! Two input formats:
//! - [`run_bytes`]: the raw byte stream, framing and all, through a socketpair
//!   and the server's own reader (target `vfio_user_session`).
//! - [`run_messages`]: a valid VERSION first, then well-framed messages built from
//!   the input, so that mutations reach the command handlers rather than the
//!   framing (target `vfio_user_messages`), fed straight into the session core
//!   without a socket or a thread. See [`messages_to_bytes`].

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use std::sync::Arc;
use umdev::memory::GuestMemory;
use umdev::vfio_user::wire::{
    Header, Version, WireStruct, FLAGS_ERROR, FLAGS_NO_REPLY, FLAGS_TYPE_COMMAND, FLAGS_TYPE_REPLY,
    HEADER_SIZE,
};

use umdev::vfio_user::server::MESSAGE_OVERHEAD;
use umdev::vfio_user::socket::Received;
use umdev::vfio_user::{MemoryTransport, Server, ServerConfig, Session};

/// What one session did, for tests of the harness.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Bytes of the input the server read before it closed the stream.
    pub input_accepted: usize,
    /// Bytes the server sent back.
    pub reply_bytes: usize,
    /// Whether the session ended without a framing or socket error.
    pub clean_end: bool,
}

/// Largest data transfer the fuzzed server accepts: smaller than the binaries'
/// 1 MiB so that small inputs reach the oversized-message (E2BIG) path too.
pub const MAX_DATA_XFER: u32 = 8192;

/// A server with an `edu` function, as `umdev-edu` builds it, except that a
/// server-initiated DMA the fuzz client never answers gives up after 50 ms and
/// that messages are limited to [`MAX_DATA_XFER`] bytes of data.
pub fn new_server() -> Server {
    let config = fuzz_config();
    let memory = GuestMemory::new(config.max_dma_maps as usize);
    let function = umdev_edu::new_function(memory, umdev_edu::DEFAULT_DMA_BITS)
        .expect("the edu description is valid");
    Server::new(function, config)
}

/// The fuzzed server's limits (see [`new_server`]).
fn fuzz_config() -> ServerConfig {
    ServerConfig {
        dma_timeout: Duration::from_millis(50),
        max_data_xfer_size: MAX_DATA_XFER,
        ..ServerConfig::default()
    }
}

/// Serves one session whose client sends exactly `input`, then hangs up.
pub fn run_bytes(input: &[u8]) -> Outcome {
    let (server_end, client_end) = UnixStream::pair().expect("socketpair");
    let closer = server_end.try_clone().expect("dup socket");
    let input = input.to_vec();
    let client = std::thread::Builder::new()
        .name("fuzz-client".into())
        .spawn(move || play_client(&client_end, &input))
        .expect("client thread");
    let server = new_server();
    let result = server.serve_connection(server_end);
    // The session has ended: whatever the server still holds, the client sees EOF.
    let _ = closer.shutdown(std::net::Shutdown::Both);
    let (input_accepted, reply_bytes) = client.join().expect("client thread panicked");
    // The server survives its session: the device answers a fresh client after
    // a reset (checked without a socket: config space reads its IDs again).
    let mut id = [0u8; 4];
    server
        .function()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .region_read(umdev::pci::Region::Config, 0, &mut id)
        .expect("config read after the session");
    assert_eq!(
        u32::from_le_bytes(id),
        u32::from(umdev_edu::DEVICE_ID) << 16 | u32::from(umdev_edu::VENDOR_ID),
        "IDs after a session"
    );
    Outcome {
        input_accepted,
        reply_bytes,
        clean_end: result.is_ok(),
    }
}

/// Writes `input`, shuts the write side, and reads until the server closes,
/// without ever blocking on one direction while the other is full.
fn play_client(stream: &UnixStream, input: &[u8]) -> (usize, usize) {
    let fd = stream.as_raw_fd();
    stream.set_nonblocking(true).expect("nonblocking");
    let mut written = 0;
    let mut writing = true;
    if input.is_empty() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        writing = false;
    }
    let mut received = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN | if writing { libc::POLLOUT } else { 0 },
            revents: 0,
        };
        // SAFETY: polls one pollfd on this stack frame.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if writing && pfd.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 {
            let rest = &input[written..];
            // SAFETY: sends from a live slice; MSG_NOSIGNAL because a libFuzzer
            // binary does not ignore SIGPIPE as a Rust main does.
            let sent = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if sent > 0 {
                written += sent as usize;
            } else if sent < 0 {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    // The server stopped reading (it ended the session).
                    writing = false;
                }
            }
            if written == input.len() {
                let _ = stream.shutdown(std::net::Shutdown::Write);
                writing = false;
            }
        }
        if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            // SAFETY: reads into a live buffer of the length given.
            let got =
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            if got == 0 {
                break;
            }
            if got > 0 {
                received += got as usize;
            } else {
                let e = io::Error::last_os_error();
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    break;
                }
            }
        }
    }
    (written, received)
}

/// The capabilities QEMU sends, as the first message of every structured input.
pub const CLIENT_CAPS: &[u8] =
    b"{\"capabilities\":{\"max_msg_fds\":16,\"max_data_xfer_size\":1048576,\"pgsizes\":4096}}\0";

fn push_message(out: &mut Vec<u8>, msg_id: u16, command: u16, flags: u32, payload: &[u8]) {
    let header = Header {
        msg_id,
        command,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: 0,
    };
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
}

/// A valid VERSION message (msg_id 0).
pub fn version_message() -> Vec<u8> {
    let v = Version { major: 0, minor: 1 };
    let mut payload = v.as_bytes().to_vec();
    payload.extend_from_slice(CLIENT_CAPS);
    let mut out = Vec::new();
    push_message(&mut out, 0, 1, FLAGS_TYPE_COMMAND, &payload);
    out
}

/// Turns a structured input into the byte stream a client would send: a valid
/// VERSION, then one message per record, each correctly framed:
///
/// ```text
/// record := command:u8 kind:u8 len:u16le payload[len]
/// ```
///
/// `command` is taken modulo 32 (so unknown and server-only commands occur too);
/// `kind` bit 0 asks for no reply, bit 1 makes the message a reply (as to a
/// server DMA request), bit 2 sets the error flag, bit 3 gives an invalid message
/// type. A record whose payload runs past the input is cut short.
pub fn messages_to_bytes(input: &[u8]) -> Vec<u8> {
    let mut out = version_message();
    let mut rest = input;
    let mut msg_id: u16 = 1;
    while rest.len() >= 4 {
        let command = u16::from(rest[0] % 32);
        let kind = rest[1];
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        rest = &rest[4..];
        let take = len.min(rest.len());
        let (payload, tail) = rest.split_at(take);
        rest = tail;
        let mut flags = if kind & 2 != 0 {
            FLAGS_TYPE_REPLY
        } else {
            FLAGS_TYPE_COMMAND
        };
        if kind & 1 != 0 {
            flags |= FLAGS_NO_REPLY;
        }
        if kind & 4 != 0 {
            flags |= FLAGS_ERROR;
        }
        if kind & 8 != 0 {
            flags = (flags & !0xf) | 0x7;
        }
        push_message(&mut out, msg_id, command, flags, payload);
        msg_id = msg_id.wrapping_add(1);
    }
    out
}

/// One record of the structured format, for building seeds.
pub fn record(command: u16, kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![command as u8, kind];
    out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Feeds the messages of `messages_to_bytes(input)` straight into the session
/// core ([`Session::handle`]): no socket, no thread; what the session sends
/// is kept by a [`MemoryTransport`].
pub fn run_messages(input: &[u8]) -> Outcome {
    let bytes = messages_to_bytes(input);
    let server = new_server();
    let config = fuzz_config();
    let transport = Arc::new(MemoryTransport::default());
    let mut session = Session::new(server.function(), &config, transport.clone());
    let limit = MAX_DATA_XFER as usize + MESSAGE_OVERHEAD;
    let mut at = 0;
    let mut clean_end = true;
    let mut reply_bytes = 0;
    while at + HEADER_SIZE <= bytes.len() {
        let header = Header::read_from(&bytes[at..]).expect("a whole header");
        let end = at + header.size as usize;
        let payload = &bytes[at + HEADER_SIZE..end];
        let oversized = payload.len() > limit;
        let msg = Received {
            header,
            payload: if oversized { &[] } else { payload },
            fds: Vec::new(),
            oversized,
            fds_truncated: false,
        };
        if session.handle(msg).is_err() {
            clean_end = false;
            break;
        }
        at = end;
        reply_bytes += transport.take().iter().map(Vec::len).sum::<usize>();
    }
    session.end();
    Outcome {
        input_accepted: at,
        reply_bytes,
        clean_end,
    }
}
