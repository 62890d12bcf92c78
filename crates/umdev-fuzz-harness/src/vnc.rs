//! A VNC viewer that sends anything: the server's side of the handshake and
//! of the session (`umdev::vnc::handshake`, `ViewerSession`), fed the
//! viewer's bytes, answering each update request from a fixed frame (and a
//! second one of another size, so DesktopSize and damage run). Errors end
//! the viewer; nothing panics, nothing allocates past the frames.
//!
//! Input: one byte choosing VNC authentication (odd) or none, then the bytes
//! a viewer sends.

use std::io::{Cursor, Read, Write};
use std::sync::Arc;

use umdev::vnc::rfb::{read_client_message, ClientMessage};
use umdev::vnc::{handshake, Frame, ViewerSession, VncPassword};

/// The viewer's bytes in, the server's bytes out.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Keep what a real socket would have sent, but not without bound.
        if self.output.len() < 1 << 20 {
            self.output.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn frame(w: u32, h: u32, seed: u8) -> Arc<Frame> {
    Arc::new(Frame {
        width: w,
        height: h,
        pixels: (0..4 * w * h)
            .map(|i| (i as u8).wrapping_mul(seed))
            .collect(),
    })
}

pub fn run(data: &[u8]) {
    let Some((&mode, viewer)) = data.split_first() else {
        return;
    };
    let password = VncPassword::from_file_contents("fuzzpass");
    let password = if mode & 1 == 1 {
        password.as_ref()
    } else {
        None
    };
    let mut io = Duplex {
        input: Cursor::new(viewer.to_vec()),
        output: Vec::new(),
    };
    if handshake(&mut io, password, (100, 70), "fuzz").is_err() {
        return;
    }
    let frames = [frame(100, 70, 3), frame(33, 130, 7)];
    let mut session = ViewerSession::new((100, 70));
    let mut shown = 0usize;
    while let Ok(msg) = read_client_message(&mut io.input) {
        if session.apply(&msg).is_err() {
            return;
        }
        if let ClientMessage::UpdateRequest(req) = msg {
            shown += 1;
            let f = &frames[(shown / 3) % 2];
            if let Some(bytes) = session.update(f, &req) {
                let _ = io.write_all(&bytes);
            }
        }
    }
}

/// Viewers that get as far as updates: none and VNC auth (whose response
/// cannot be right without the challenge, so it stops there).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut session = vec![0u8];
    session.extend(b"RFB 003.008\n\x01\x01");
    session.extend([2, 0, 0, 3, 0, 0, 0, 16, 0xff, 0xff, 0xff, 0x21, 0, 0, 0, 0]);
    let mut pf = vec![
        0u8, 0, 0, 0, 16, 16, 1, 1, 0, 31, 0, 63, 0, 31, 11, 5, 0, 0, 0, 0,
    ];
    session.append(&mut pf);
    for incremental in [0u8, 1, 1, 1, 1, 0] {
        session.extend([3, incremental, 0, 0, 0, 0, 0, 100, 0, 70]);
    }
    session.extend([
        4, 1, 0, 0, 0, 0, 0, 65, 5, 0, 0, 1, 0, 1, 6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i',
    ]);
    let mut auth = vec![1u8];
    auth.extend(b"RFB 003.008\n\x02");
    auth.extend([0u8; 16]);
    let mut old = vec![0u8];
    old.extend(b"RFB 003.003\n\x01");
    old.extend([3, 0, 0, 0, 0, 0, 0, 10, 0, 10]);
    vec![("session", session), ("auth", auth), ("v3.3", old)]
}
