//! Serving the control socket: a thread per client (at most
//! [`CONTROL_CLIENTS`] at once; one more is told [`control::BUSY`] and
//! closed), request lines in, response lines out.
//!
//! A client must send each whole request line within
//! [`CONTROL_REQUEST_DEADLINE`] of connecting or of its previous answer: one
//! that says nothing, or drips a byte now and then, is told so and dropped,
//! so a full house of stalled clients lasts a few seconds at most. A line
//! longer than [`control::MAX_REQUEST`] is skipped up to its newline and
//! answered with an error; the connection goes on.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::control::{self, Response};
use super::Parent;

/// How long a client may take to send a whole request line.
pub const CONTROL_REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Control connections served at once.
pub const CONTROL_CLIENTS: usize = 16;

/// Serves control clients from `listener` until it is shut down
/// ([`shutdown_listener`]).
pub fn serve_control(parent: &Arc<Parent>, listener: &UnixListener) {
    let clients = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // ECONNABORTED and the like concern one client only.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => continue,
            Err(e) => {
                debug!("control socket: {e}; no longer accepting");
                break;
            }
        };
        if clients.fetch_add(1, Ordering::SeqCst) >= CONTROL_CLIENTS {
            clients.fetch_sub(1, Ordering::SeqCst);
            debug!("control client turned away: {CONTROL_CLIENTS} served already");
            // A fresh socket's buffer takes one short line without blocking.
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(&Response::error(control::BUSY).to_line());
            continue;
        }
        let slot = Slot(clients.clone());
        let parent = parent.clone();
        let spawned = std::thread::Builder::new()
            .name("vgpu-control".into())
            .spawn(move || {
                let _slot = slot;
                serve_client(&parent, stream);
            });
        if let Err(e) = spawned {
            warn!("control client not served: {e}");
        }
    }
}

/// A place among the [`CONTROL_CLIENTS`], given back when dropped (also when
/// the thread was never made).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a client sent next.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// One line, without its newline.
    Request(Vec<u8>),
    /// A line longer than the limit, now skipped.
    TooLong,
    /// Nothing whole before the deadline.
    Late,
    /// Closed or broken.
    End,
}

/// Lines from a stream, each read by a deadline, in bounded memory.
struct LineReader<'a> {
    stream: &'a UnixStream,
    buf: Vec<u8>,
    /// Inside a line already known to be too long.
    skipping: bool,
}

impl<'a> LineReader<'a> {
    fn new(stream: &'a UnixStream) -> Self {
        LineReader {
            stream,
            buf: Vec::new(),
            skipping: false,
        }
    }

    fn next(&mut self, deadline: Instant) -> Line {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(pos + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if std::mem::take(&mut self.skipping) {
                    return Line::TooLong;
                }
                return Line::Request(line);
            }
            if self.buf.len() > control::MAX_REQUEST {
                self.buf.clear();
                self.skipping = true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Line::Late;
            }
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return Line::End;
            }
            let mut chunk = [0u8; 4096];
            match (&mut &*self.stream).read(&mut chunk) {
                Ok(0) => return Line::End,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Line::Late
                }
                Err(_) => return Line::End,
            }
        }
    }
}

/// Request lines in, response lines out, until the client closes, is late
/// or breaks the stream.
fn serve_client(parent: &Parent, stream: UnixStream) {
    let _ = stream.set_write_timeout(Some(CONTROL_REQUEST_DEADLINE));
    let mut lines = LineReader::new(&stream);
    loop {
        let response = match lines.next(Instant::now() + CONTROL_REQUEST_DEADLINE) {
            Line::Request(line) => match control::parse_request(&line) {
                Ok(r) => parent.handle(r),
                Err(e) => Response::error(e),
            },
            Line::TooLong => Response::error(control::RequestError::TooLong),
            Line::Late => {
                debug!("control client sent no whole request in time; dropped");
                let _ = (&stream).write_all(
                    &Response::error(format!(
                        "no whole request line within {} s; closing",
                        CONTROL_REQUEST_DEADLINE.as_secs()
                    ))
                    .to_line(),
                );
                return;
            }
            Line::End => return,
        };
        if (&stream).write_all(&response.to_line()).is_err() {
            return;
        }
    }
}

/// Ends the accept loop of [`serve_control`] on `listener` from another thread.
pub fn shutdown_listener(listener: &UnixListener) {
    // SAFETY: shutdown(2) on a socket this process owns; it wakes accept().
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn lines_split_skip_and_time_out() {
        let (mut a, b) = pair();
        let mut r = LineReader::new(&b);
        let soon = || Instant::now() + Duration::from_secs(2);
        // Two pipelined requests in one write, the second split over two.
        a.write_all(b"one\ntw").unwrap();
        assert_eq!(r.next(soon()), Line::Request(b"one".to_vec()));
        a.write_all(b"o\n").unwrap();
        assert_eq!(r.next(soon()), Line::Request(b"two".to_vec()));
        // Too long: skipped, said once, and the next line is whole.
        let writer = std::thread::spawn(move || {
            a.write_all(&vec![b'x'; 3 * control::MAX_REQUEST]).unwrap();
            a.write_all(b"y\nthree\n").unwrap();
            a
        });
        assert_eq!(r.next(soon()), Line::TooLong);
        let mut a = writer.join().unwrap();
        assert_eq!(r.next(soon()), Line::Request(b"three".to_vec()));
        // A drip that never ends its line is late, by the deadline.
        a.write_all(b"par").unwrap();
        let t = Instant::now();
        assert_eq!(
            r.next(Instant::now() + Duration::from_millis(200)),
            Line::Late
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        drop(a);
        assert_eq!(r.next(soon()), Line::End);
    }
}
