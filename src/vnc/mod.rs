//! A live view of a device's scanout over VNC (RFB 3.8): what QEMU and Cloud
//! Hypervisor cannot show for a vfio-user GPU (`vfio-user-pci` has no
//! `display`), any standard VNC viewer can.
//!
//! A device gives the server a [`FrameSource`]; while viewers are connected
//! a pacer thread captures a frame at most [`VncConfig::fps`] times a second
//! (and at once after [`VncServer::notify`], the device's hint that something
//! changed: a FENCE, a RESOURCE_FLUSH), keeps it if it differs from the last,
//! and wakes the viewers. Each viewer has a reader thread (its messages) and a
//! writer thread, which sends, per FramebufferUpdateRequest, the tiles that
//! changed since the frame that viewer has ([`encode::damage`]), as ZRLE or
//! Raw in the viewer's pixel format, and a DesktopSize rectangle when the mode
//! changed.
//!
//! The device never waits for a viewer: only the latest frame is kept, so a
//! slow viewer skips frames; a viewer that stops reading for
//! [`VIEWER_WRITE_TIMEOUT`] is dropped; one that sends anything this server
//! does not understand is dropped at once. At most [`MAX_VIEWERS`] at a time.
//!
//! Access: without `--vnc-password-file` the server listens on loopback or a
//! UNIX socket only; it refuses any other address without a password.

pub mod auth;
pub mod client;
pub mod encode;
pub mod rfb;
mod viewer;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use tracing::{info, warn};

pub use auth::VncPassword;
pub use viewer::{handshake, ViewerSession};

/// Viewers served at once.
pub const MAX_VIEWERS: usize = 16;
/// A viewer that takes no bytes for this long is dropped.
pub const VIEWER_WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// System calls the VNC threads make after start-up beyond the default
/// sandbox (`umdev::sandbox::allow_extra`): the viewer's write timeout.
pub const SYSCALLS: &[libc::c_long] = &[libc::SYS_setsockopt];

/// A frame: XRGB8888 pixels, little-endian (memory bytes B, G, R, X),
/// `4 * width` bytes per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Where frames come from: a device's scanout.
pub trait FrameSource: Send + Sync + 'static {
    /// The scanout now, or `None` while it is off.
    fn capture(&self) -> Option<Frame>;
}

#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error("--vnc {0:?}: expected ADDR:PORT or unix:PATH")]
    Address(String),
    #[error("--vnc {0}: not a loopback address; a password (--vnc-password-file) is required")]
    NeedsPassword(SocketAddr),
    #[error("--vnc-password-file {path}: {why}")]
    PasswordFile { path: PathBuf, why: String },
    #[error("--vnc: listening on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("--vnc: starting a thread: {0}")]
    Thread(io::Error),
}

/// Where the server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = VncError;
    fn from_str(s: &str) -> Result<Self, VncError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(VncError::Address(s.into()));
            }
            return Ok(Listen::Unix(path.into()));
        }
        s.parse()
            .map(Listen::Tcp)
            .map_err(|_| VncError::Address(s.into()))
    }
}

impl Listen {
    /// Where display `n` of a multi-display device listens: the next ports
    /// after the first, or `PATH.n` beside the first socket.
    pub fn nth(&self, n: u16) -> Listen {
        match self {
            Listen::Tcp(a) => {
                let mut a = *a;
                a.set_port(a.port().wrapping_add(n));
                Listen::Tcp(a)
            }
            Listen::Unix(p) if n == 0 => Listen::Unix(p.clone()),
            Listen::Unix(p) => {
                let mut s = p.clone().into_os_string();
                s.push(format!(".{n}"));
                Listen::Unix(s.into())
            }
        }
    }
}

/// The command-line options of a device binary with a display.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct VncArgs {
    /// Serve the scanout over VNC on ADDR:PORT (loopback unless a password
    /// is set) or unix:PATH.
    #[arg(long, value_name = "ADDR:PORT|unix:PATH")]
    pub vnc: Option<String>,
    /// VNC authentication with the password on this file's first line
    /// (8 characters are used); needed for a non-loopback address.
    #[arg(long, value_name = "FILE")]
    pub vnc_password_file: Option<PathBuf>,
    /// Most frames captured per second while viewers are connected.
    #[arg(long, default_value_t = 30)]
    pub vnc_fps: u32,
}

/// What [`VncServer::start`] needs.
#[derive(Clone, Debug)]
pub struct VncConfig {
    pub listen: Listen,
    pub password: Option<VncPassword>,
    pub fps: u32,
    /// The desktop name viewers show.
    pub name: String,
}

impl VncArgs {
    /// The configuration these options ask for (`None`: no `--vnc`).
    pub fn config(&self, name: &str) -> Result<Option<VncConfig>, VncError> {
        let Some(listen) = &self.vnc else {
            return Ok(None);
        };
        let listen: Listen = listen.parse()?;
        if let Listen::Tcp(addr) = listen {
            if !addr.ip().is_loopback() && self.vnc_password_file.is_none() {
                return Err(VncError::NeedsPassword(addr));
            }
        }
        let password = match &self.vnc_password_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| VncError::PasswordFile {
                    path: path.clone(),
                    why: e.to_string(),
                })?;
                Some(VncPassword::from_file_contents(&text).ok_or_else(|| {
                    VncError::PasswordFile {
                        path: path.clone(),
                        why: "no password on its first line".into(),
                    }
                })?)
            }
        };
        Ok(Some(VncConfig {
            listen,
            password,
            fps: self.vnc_fps.clamp(1, 120),
            name: name.into(),
        }))
    }

    /// Starts a server per display these options ask for (and allows their
    /// system calls in the sandbox), or none without `--vnc`: display `n`
    /// listens where [`Listen::nth`] says.
    pub fn start(
        &self,
        name: &str,
        displays: Vec<Arc<dyn FrameSource>>,
    ) -> Result<Vec<VncServer>, VncError> {
        let Some(config) = self.config(name)? else {
            return Ok(Vec::new());
        };
        crate::sandbox::allow_extra(SYSCALLS);
        let many = displays.len() > 1;
        displays
            .into_iter()
            .enumerate()
            .map(|(n, source)| {
                let config = VncConfig {
                    listen: config.listen.nth(n as u16),
                    name: if many {
                        format!("{name} display {n}")
                    } else {
                        name.into()
                    },
                    ..config.clone()
                };
                VncServer::start(config, source)
            })
            .collect()
    }
}

/// Counters for the metrics endpoint and the logs.
#[derive(Debug, Default)]
pub struct VncStats {
    pub viewers: AtomicUsize,
    pub viewers_total: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub updates_sent: AtomicU64,
    pub frames_captured: AtomicU64,
    pub viewers_dropped: AtomicU64,
}

/// The latest frame and its number.
#[derive(Default)]
struct Latest {
    frame: Option<Arc<Frame>>,
    generation: u64,
}

/// What the pacer, the viewers and the device share.
struct Shared {
    config: VncConfig,
    source: Arc<dyn FrameSource>,
    latest: Mutex<Latest>,
    /// The pacer sleeps on this until a viewer comes or a hint arrives.
    pace: Mutex<bool>,
    pace_cv: Condvar,
    viewers: Mutex<Vec<Weak<viewer::Signal>>>,
    stats: VncStats,
    stopping: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running VNC server; stops (and ends its viewers) when dropped.
pub struct VncServer {
    shared: Arc<Shared>,
    listener: ListenerFd,
}

/// The listening socket, kept to shut it down on drop.
enum ListenerFd {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl VncServer {
    /// Binds the listener (now, before the sandbox), starts the accept and
    /// pacer threads.
    pub fn start(config: VncConfig, source: Arc<dyn FrameSource>) -> Result<VncServer, VncError> {
        let listen_err = |what: String| move |source| VncError::Listen { what, source };
        let listener = match &config.listen {
            Listen::Tcp(addr) => {
                if !addr.ip().is_loopback() && config.password.is_none() {
                    return Err(VncError::NeedsPassword(*addr));
                }
                ListenerFd::Tcp(TcpListener::bind(addr).map_err(listen_err(addr.to_string()))?)
            }
            Listen::Unix(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(listen_err(path.display().to_string()))?;
                ListenerFd::Unix(l, path.clone())
            }
        };
        let shared = Arc::new(Shared {
            config,
            source,
            latest: Mutex::new(Latest::default()),
            pace: Mutex::new(false),
            pace_cv: Condvar::new(),
            viewers: Mutex::new(Vec::new()),
            stats: VncStats::default(),
            stopping: AtomicBool::new(false),
        });
        register_metrics(&shared);
        let server = VncServer { shared, listener };
        server.spawn_accept()?;
        let pacer = server.shared.clone();
        std::thread::Builder::new()
            .name("vnc-pacer".into())
            .spawn(move || pace(&pacer))
            .map_err(VncError::Thread)?;
        info!(
            listen = ?server.shared.config.listen,
            auth = server.shared.config.password.is_some(),
            "VNC server listening"
        );
        Ok(server)
    }

    /// The TCP address actually bound (port 0 asks for a free one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            ListenerFd::Tcp(l) => l.local_addr().ok(),
            ListenerFd::Unix(..) => None,
        }
    }

    /// The device's hint that the picture changed: capture now.
    pub fn notify(&self) {
        notify_pacer(&self.shared);
    }

    pub fn stats(&self) -> &VncStats {
        &self.shared.stats
    }

    fn spawn_accept(&self) -> Result<(), VncError> {
        let shared = self.shared.clone();
        let accept: Accept = match &self.listener {
            ListenerFd::Tcp(l) => {
                let l = l.try_clone().map_err(VncError::Thread)?;
                Box::new(move || l.accept().map(|(s, _)| viewer::Conn::Tcp(s)))
            }
            ListenerFd::Unix(l, _) => {
                let l = l.try_clone().map_err(VncError::Thread)?;
                Box::new(move || l.accept().map(|(s, _)| viewer::Conn::Unix(s)))
            }
        };
        std::thread::Builder::new()
            .name("vnc-accept".into())
            .spawn(move || accept_loop(&shared, accept))
            .map_err(VncError::Thread)?;
        Ok(())
    }
}

/// Accepts the next viewer connection.
type Accept = Box<dyn Fn() -> io::Result<viewer::Conn> + Send>;

impl Drop for VncServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        use std::os::fd::AsRawFd;
        let fd = match &self.listener {
            ListenerFd::Tcp(l) => l.as_raw_fd(),
            ListenerFd::Unix(l, path) => {
                let _ = std::fs::remove_file(path);
                l.as_raw_fd()
            }
        };
        // SAFETY: shutdown(2) on our own listening socket only wakes the
        // accept thread's accept(); it touches no memory.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        for v in lock(&self.shared.viewers).iter().filter_map(Weak::upgrade) {
            v.close();
        }
        notify_pacer(&self.shared);
    }
}

fn accept_loop(shared: &Arc<Shared>, accept: Accept) {
    loop {
        let conn = accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let conn = match conn {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("VNC accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.stats.viewers.load(Ordering::SeqCst) >= MAX_VIEWERS {
            warn!("VNC: {MAX_VIEWERS} viewers already; refusing another");
            conn.shutdown();
            continue;
        }
        viewer::spawn(shared.clone(), conn);
    }
}

fn notify_pacer(shared: &Shared) {
    *lock(&shared.pace) = true;
    shared.pace_cv.notify_one();
}

/// Captures frames while viewers are connected; wakes them on a new one.
fn pace(shared: &Shared) {
    let period = Duration::from_secs(1) / shared.config.fps.max(1);
    while !shared.stopping.load(Ordering::SeqCst) {
        {
            let mut hinted = lock(&shared.pace);
            let timeout = if shared.stats.viewers.load(Ordering::SeqCst) > 0 {
                period
            } else {
                Duration::from_secs(3600)
            };
            if !*hinted {
                hinted = shared
                    .pace_cv
                    .wait_timeout(hinted, timeout)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            *hinted = false;
        }
        if shared.stats.viewers.load(Ordering::SeqCst) == 0 {
            continue;
        }
        let frame = shared.source.capture().map(Arc::new);
        let mut latest = lock(&shared.latest);
        if latest.frame.as_deref() == frame.as_deref() {
            continue;
        }
        latest.frame = frame;
        latest.generation += 1;
        drop(latest);
        shared.stats.frames_captured.fetch_add(1, Ordering::Relaxed);
        let mut viewers = lock(&shared.viewers);
        viewers.retain(|v| v.strong_count() > 0);
        for v in viewers.iter().filter_map(Weak::upgrade) {
            v.wake();
        }
        // At most `fps` captures a second, hints included.
        std::thread::sleep(period);
    }
}

/// The running servers, for one metrics family per counter with a
/// `display` label each.
static DISPLAYS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

fn register_metrics(shared: &Arc<Shared>) {
    static SOURCE: std::sync::OnceLock<Arc<dyn crate::metrics::MetricsSource>> =
        std::sync::OnceLock::new();
    let mut displays = lock(&DISPLAYS);
    displays.retain(|d| d.strong_count() > 0);
    displays.push(Arc::downgrade(shared));
    drop(displays);
    crate::metrics::register(SOURCE.get_or_init(|| Arc::new(VncMetrics)));
}

struct VncMetrics;

/// A family: name, help, whether a counter (else a gauge), and its value.
type Family = (&'static str, &'static str, bool, fn(&VncStats) -> u64);

impl crate::metrics::MetricsSource for VncMetrics {
    fn write_metrics(&self, w: &mut crate::metrics::MetricsWriter) {
        let displays: Vec<Arc<Shared>> = lock(&DISPLAYS).iter().filter_map(Weak::upgrade).collect();
        let family = |get: fn(&VncStats) -> u64| -> Vec<(String, u64)> {
            displays
                .iter()
                .map(|d| (d.config.name.clone(), get(&d.stats)))
                .collect()
        };
        let families: [Family; 6] = [
            (
                "umdev_vnc_viewers",
                "VNC viewers connected now.",
                false,
                |s| s.viewers.load(Ordering::Relaxed) as u64,
            ),
            (
                "umdev_vnc_viewers_total",
                "VNC viewers that connected.",
                true,
                |s| s.viewers_total.load(Ordering::Relaxed),
            ),
            (
                "umdev_vnc_viewers_dropped_total",
                "VNC viewers dropped for an error or a protocol violation.",
                true,
                |s| s.viewers_dropped.load(Ordering::Relaxed),
            ),
            (
                "umdev_vnc_sent_bytes_total",
                "Bytes of updates sent to VNC viewers.",
                true,
                |s| s.bytes_sent.load(Ordering::Relaxed),
            ),
            (
                "umdev_vnc_updates_total",
                "FramebufferUpdates sent to VNC viewers.",
                true,
                |s| s.updates_sent.load(Ordering::Relaxed),
            ),
            (
                "umdev_vnc_frames_captured_total",
                "Scanout frames captured that differed from the last.",
                true,
                |s| s.frames_captured.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, counter, get) in families {
            let samples = family(get);
            let samples: Vec<(&str, u64)> = samples.iter().map(|(d, v)| (d.as_str(), *v)).collect();
            if counter {
                w.counters(name, help, "display", &samples);
            } else {
                w.gauges(name, help, "display", &samples);
            }
        }
    }
}
