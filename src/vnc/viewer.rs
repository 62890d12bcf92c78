//! One viewer: the handshake, then a reader thread for its messages and a
//! writer thread for its updates. [`ViewerSession`] is the protocol logic
//! without I/O (what the fuzz harness drives).

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tracing::{debug, info};

use super::auth::{self, VncPassword};
use super::encode::{self, Zrle};
use super::rfb::*;
use super::{lock, Frame, Shared, VIEWER_WRITE_TIMEOUT};

/// The size a viewer is told while the scanout is off.
pub const BLANK_SIZE: (u32, u32) = (640, 480);
/// How long a viewer may take over the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A viewer's connection.
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self) {
        let _ = match self {
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Conn::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The handshake, server side: version, security (VNC authentication when
/// `password` is set, none otherwise), ClientInit, ServerInit.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    password: Option<&VncPassword>,
    size: (u16, u16),
    name: &str,
) -> Result<Version, RfbError> {
    s.write_all(PROTOCOL_VERSION)?;
    let version = read_version(s)?;
    let offered = if password.is_some() {
        SECURITY_VNC_AUTH
    } else {
        SECURITY_NONE
    };
    if version == Version::V3_3 {
        s.write_all(&u32::from(offered).to_be_bytes())?;
    } else {
        s.write_all(&[1, offered])?;
        let mut chosen = [0u8];
        s.read_exact(&mut chosen)?;
        if chosen[0] != offered {
            if version == Version::V3_8 {
                s.write_all(&1u32.to_be_bytes())?;
                write_reason(s, "security type not offered")?;
            }
            return Err(RfbError::Security(chosen[0]));
        }
    }
    if let Some(p) = password {
        let challenge = auth::challenge()?;
        s.write_all(&challenge)?;
        let mut answer = [0u8; 16];
        s.read_exact(&mut answer)?;
        if !p.check(&challenge, &answer) {
            s.write_all(&1u32.to_be_bytes())?;
            if version == Version::V3_8 {
                write_reason(s, "authentication failed")?;
            }
            return Err(RfbError::AuthFailed);
        }
    }
    if password.is_some() || version == Version::V3_8 {
        s.write_all(&0u32.to_be_bytes())?;
    }
    let mut shared_flag = [0u8];
    s.read_exact(&mut shared_flag)?;
    s.write_all(&server_init(size.0, size.1, name))?;
    Ok(version)
}

/// A black frame of `size`, what a viewer sees while the scanout is off.
pub fn blank(size: (u32, u32)) -> Frame {
    Frame {
        width: size.0,
        height: size.1,
        pixels: vec![0; 4 * size.0 as usize * size.1 as usize],
    }
}

/// A frame's size as RFB carries it (u16 each), `None` past that.
fn rfb_size(f: &Frame) -> Option<(u16, u16)> {
    Some((u16::try_from(f.width).ok()?, u16::try_from(f.height).ok()?))
}

/// One viewer's protocol state, without I/O.
pub struct ViewerSession {
    pf: PixelFormat,
    encodings: Vec<i32>,
    zrle: Zrle,
    /// The frame the viewer has, and the size it was told.
    sent: Option<Arc<Frame>>,
    size: (u16, u16),
}

impl ViewerSession {
    /// A viewer told `size` in ServerInit.
    pub fn new(size: (u16, u16)) -> Self {
        ViewerSession {
            pf: PixelFormat::XRGB8888,
            encodings: Vec::new(),
            zrle: Zrle::default(),
            sent: None,
            size,
        }
    }

    /// Takes a message that changes the session; update requests are the
    /// caller's (they wait for frames).
    pub fn apply(&mut self, msg: &ClientMessage) -> Result<(), RfbError> {
        match msg {
            ClientMessage::SetPixelFormat(pf) => {
                pf.check()?;
                self.pf = *pf;
            }
            ClientMessage::SetEncodings(e) => self.encodings = e.clone(),
            _ => {}
        }
        Ok(())
    }

    fn wants(&self, encoding: i32) -> bool {
        self.encodings.contains(&encoding)
    }

    /// The FramebufferUpdate answering `req` with `frame`: everything asked
    /// for if not incremental, else the tiles that changed; `None` when an
    /// incremental request has nothing new (it waits for the next frame).
    pub fn update(&mut self, frame: &Arc<Frame>, req: &UpdateRequest) -> Option<Vec<u8>> {
        let size = rfb_size(frame)?;
        let full = Rect {
            x: 0,
            y: 0,
            width: size.0,
            height: size.1,
        };
        let mut out = Vec::new();
        let mut rects: Vec<Rect> = Vec::new();
        let mut resized = false;
        if size != self.size && self.wants(ENCODING_DESKTOP_SIZE) {
            resized = true;
            self.size = size;
            rects.push(full);
        } else {
            let asked = Rect {
                x: req.x,
                y: req.y,
                width: req.width,
                height: req.height,
            };
            let area = encode::clip(asked, full).and_then(|a| {
                // A viewer that was not told of a new size sees what fits.
                encode::clip(
                    a,
                    Rect {
                        x: 0,
                        y: 0,
                        width: self.size.0,
                        height: self.size.1,
                    },
                )
            });
            let damaged = match &self.sent {
                Some(old) if req.incremental && rfb_size(old) == Some(size) => {
                    encode::damage(old, frame)
                }
                Some(old) if req.incremental && Arc::ptr_eq(old, frame) => Vec::new(),
                _ => vec![full],
            };
            if let Some(area) = area {
                rects.extend(damaged.into_iter().filter_map(|r| encode::clip(r, area)));
            }
            if rects.is_empty() && req.incremental {
                self.sent = Some(frame.clone());
                return None;
            }
        }
        let count = rects.len() + usize::from(resized);
        put_update_header(&mut out, count.min(usize::from(u16::MAX)) as u16);
        if resized {
            put_rect_header(&mut out, full, ENCODING_DESKTOP_SIZE);
        }
        let zrle = self
            .encodings
            .iter()
            .find(|&&e| e == ENCODING_ZRLE || e == ENCODING_RAW)
            == Some(&ENCODING_ZRLE);
        for r in rects
            .iter()
            .take(usize::from(u16::MAX) - usize::from(resized))
        {
            if zrle {
                put_rect_header(&mut out, *r, ENCODING_ZRLE);
                self.zrle.encode(frame, *r, &self.pf, &mut out);
            } else {
                put_rect_header(&mut out, *r, ENCODING_RAW);
                encode::raw(frame, *r, &self.pf, &mut out);
            }
        }
        self.sent = Some(frame.clone());
        Some(out)
    }
}

/// What the reader thread hands the writer.
#[derive(Default)]
struct SignalState {
    request: Option<UpdateRequest>,
    pending: Vec<ClientMessage>,
    closed: bool,
    woken: bool,
}

/// A viewer's mailbox: the reader and the pacer wake the writer through it.
#[derive(Default)]
pub(crate) struct Signal {
    state: Mutex<SignalState>,
    cv: Condvar,
}

impl Signal {
    pub(crate) fn wake(&self) {
        lock(&self.state).woken = true;
        self.cv.notify_one();
    }

    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.cv.notify_one();
    }
}

/// Serves `conn` on a thread of its own (and one for its reader).
pub(crate) fn spawn(shared: Arc<Shared>, conn: Conn) {
    let stats = &shared.stats;
    stats.viewers.fetch_add(1, Ordering::SeqCst);
    stats.viewers_total.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let started = std::thread::Builder::new()
        .name("vnc-viewer".into())
        .spawn(move || {
            match serve(&s, conn) {
                Ok(()) => info!("VNC viewer left"),
                Err(e) => {
                    s.stats.viewers_dropped.fetch_add(1, Ordering::Relaxed);
                    info!("VNC viewer dropped: {e}");
                }
            }
            s.stats.viewers.fetch_sub(1, Ordering::SeqCst);
        });
    if started.is_err() {
        shared.stats.viewers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(shared: &Arc<Shared>, mut conn: Conn) -> Result<(), RfbError> {
    conn.set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(VIEWER_WRITE_TIMEOUT))?;
    let first = lock(&shared.latest).frame.clone();
    let first = match first {
        Some(f) => f,
        None => Arc::new(shared.source.capture().unwrap_or_else(|| blank(BLANK_SIZE))),
    };
    let size = rfb_size(&first).unwrap_or((BLANK_SIZE.0 as u16, BLANK_SIZE.1 as u16));
    handshake(
        &mut conn,
        shared.config.password.as_ref(),
        size,
        &shared.config.name,
    )?;
    conn.set_timeouts(None, Some(VIEWER_WRITE_TIMEOUT))?;
    info!("VNC viewer connected");
    let signal = Arc::new(Signal::default());
    {
        // A server dropped meanwhile (its device gone) closes the viewers it
        // finds here, after setting `stopping`: one that was still shaking
        // hands sees the flag under this lock instead.
        let mut viewers = lock(&shared.viewers);
        if shared.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        viewers.push(Arc::downgrade(&signal));
    }
    super::notify_pacer(shared);

    let reader_conn = conn.try_clone()?;
    let reader_signal = signal.clone();
    let reader = std::thread::Builder::new()
        .name("vnc-viewer-rx".into())
        .spawn(move || read_messages(reader_conn, &reader_signal))
        .map_err(RfbError::Io)?;
    let result = write_updates(shared, &mut conn, &signal, first);
    signal.close();
    conn.shutdown();
    let read = reader.join().unwrap_or(Ok(()));
    result.and(read)
}

fn read_messages(conn: Conn, signal: &Signal) -> Result<(), RfbError> {
    let mut r = BufReader::new(conn);
    let result = loop {
        let msg = match read_client_message(&mut r) {
            // A format we cannot serve ends the viewer here, not later.
            Ok(ClientMessage::SetPixelFormat(pf)) if pf.check().is_err() => {
                break pf.check().map(drop)
            }
            Ok(m) => m,
            Err(RfbError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        };
        let mut st = lock(&signal.state);
        if st.closed {
            break Ok(());
        }
        match msg {
            ClientMessage::UpdateRequest(req) => st.request = Some(req),
            ClientMessage::SetPixelFormat(_) | ClientMessage::SetEncodings(_) => {
                st.pending.push(msg)
            }
            _ => continue,
        }
        st.woken = true;
        drop(st);
        signal.cv.notify_one();
    };
    signal.close();
    r.get_ref().shutdown();
    result
}

fn write_updates(
    shared: &Shared,
    conn: &mut Conn,
    signal: &Signal,
    first: Arc<Frame>,
) -> Result<(), RfbError> {
    let size = rfb_size(&first).unwrap_or((BLANK_SIZE.0 as u16, BLANK_SIZE.1 as u16));
    let mut session = ViewerSession::new(size);
    let mut sent_generation = u64::MAX;
    loop {
        let (req, pending) = {
            let mut st = lock(&signal.state);
            loop {
                if st.closed {
                    return Ok(());
                }
                let generation = lock(&shared.latest).generation;
                let ready = st
                    .request
                    .is_some_and(|r| !r.incremental || generation != sent_generation);
                if ready || !st.pending.is_empty() {
                    break;
                }
                st.woken = false;
                st = signal
                    .cv
                    .wait_while(st, |s| !s.woken && !s.closed)
                    .unwrap_or_else(|p| p.into_inner());
            }
            let generation = lock(&shared.latest).generation;
            let req = st
                .request
                .filter(|r| !r.incremental || generation != sent_generation);
            if req.is_some() {
                st.request = None;
            }
            (req, std::mem::take(&mut st.pending))
        };
        for msg in &pending {
            session.apply(msg)?;
        }
        let Some(req) = req else { continue };
        let (frame, generation) = {
            let l = lock(&shared.latest);
            (l.frame.clone(), l.generation)
        };
        sent_generation = generation;
        let frame = frame.unwrap_or_else(|| first.clone());
        match session.update(&frame, &req) {
            Some(bytes) => {
                conn.write_all(&bytes)?;
                shared
                    .stats
                    .bytes_sent
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                shared.stats.updates_sent.fetch_add(1, Ordering::Relaxed);
                debug!(bytes = bytes.len(), "VNC update sent");
            }
            // Nothing new: the request waits for the next frame.
            None => {
                lock(&signal.state).request.get_or_insert(req);
            }
        }
    }
}
