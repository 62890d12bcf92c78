//! What umdev's tests share (one unpublished crate instead of copies and
//! `#[path]` includes): start real device binaries on real sockets, share
//! real memfd guest memory, serve in process, wait, boot QEMU guests
//! ([`e2e`]), soak and attack ([`soak`]).

pub mod e2e;
pub mod metrics;
pub mod soak;
mod tempdir;

pub use tempdir::TempDir;

use std::fs::File;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use umdev::vfio_user::client::DmaTarget;
use umdev::vfio_user::Client;

/// A binary of the workspace, built next to the test executables.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace)",
        bin.display()
    );
    // `cargo test` rebuilds libraries, not other packages' binaries: refuse a
    // binary older than the libraries this test was built against.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let bin_time = modified(&bin);
    for lib in ["libumdev.rlib", "libumdev_edu.rlib"] {
        if let (Some(b), Some(l)) = (bin_time, modified(&dir.join(lib))) {
            assert!(
                b >= l,
                "{} is older than {lib}: rebuild it (cargo build --workspace)",
                bin.display()
            );
        }
    }
    bin
}

/// A device backend process on a socket in a private temporary directory,
/// its stderr in `backend.log` there; killed on drop, the end of its log
/// printed if the test panicked.
pub struct Backend {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl Backend {
    /// The workspace binary `bin` with `extra` arguments, logging at
    /// `RUST_LOG` (default `debug`).
    pub fn start(bin: &str, extra: &[&str]) -> Backend {
        Self::spawn(
            &workspace_bin(bin),
            TempDir::new(),
            "dev.sock",
            extra,
            "debug",
        )
    }

    pub fn edu() -> Backend {
        Self::start("umdev-edu", &[])
    }

    /// `bin` listening on `dir/<socket>` with `args`, logging at `RUST_LOG`
    /// (else `log_level`); returns once it listens there
    /// ([`umdev::cli::wait_listening`]: the socket file appears at bind(), a
    /// moment before listen()), so a plain connect succeeds; panics with the
    /// log if the process died (its exit status) or took 10 s.
    pub fn spawn<A: AsRef<std::ffi::OsStr>>(
        bin: &Path,
        dir: TempDir,
        socket: &str,
        args: &[A],
        log_level: &str,
    ) -> Backend {
        let socket = dir.path().join(socket);
        let log = File::create(dir.path().join("backend.log")).unwrap();
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(&socket)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| log_level.into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut backend = Backend { child, socket, dir };
        let socket = backend.socket.clone();
        if let Err(e) =
            umdev::cli::wait_listening(&socket, Some(&mut backend.child), Duration::from_secs(10))
        {
            panic!("{}: {e}:\n{}", bin.display(), backend.log());
        }
        backend
    }

    /// A negotiated client.
    pub fn connect(&self) -> Client {
        Client::connect(&self.socket).expect("connect and negotiate")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("backend.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() || std::env::var_os("UMDEV_TEST_LOG").is_some() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(200)..].join("\n");
            eprintln!("---- backend log (last 200 lines) ----\n{tail}");
        }
    }
}

/// Guest RAM in a memfd, mapped here too so the test can look at it.
pub struct MemfdRam {
    map: umdev::memory::MappedMemfd,
    pub size: usize,
}

impl MemfdRam {
    pub fn new(size: usize) -> MemfdRam {
        let map = umdev::memory::MappedMemfd::new("guest-ram", size).expect("memfd");
        MemfdRam { map, size }
    }

    pub fn fd(&self) -> RawFd {
        self.map.fd()
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `size` bytes and lives as long as self. The backend
        // may write concurrently; tests read only after the device says it is done.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.size) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, exclusive through &mut self on our side.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), self.size) }
    }
}

/// Guest memory the client serves to DMA_READ/DMA_WRITE, shared with the test.
#[derive(Clone)]
pub struct SharedRam {
    pub base: u64,
    pub bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl SharedRam {
    pub fn new(base: u64, size: usize) -> SharedRam {
        SharedRam {
            base,
            bytes: std::sync::Arc::new(std::sync::Mutex::new(vec![0; size])),
        }
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let b = self.bytes.lock().unwrap();
        let at = (gpa - self.base) as usize;
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let mut b = self.bytes.lock().unwrap();
        let at = (gpa - self.base) as usize;
        b[at..at + data.len()].copy_from_slice(data);
    }
}

impl DmaTarget for SharedRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), u32> {
        let bytes = self.bytes.lock().unwrap();
        buf.copy_from_slice(&bytes[self.range(bytes.len(), gpa, buf.len())?]);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), u32> {
        let mut bytes = self.bytes.lock().unwrap();
        let r = self.range(bytes.len(), gpa, data.len())?;
        bytes[r].copy_from_slice(data);
        Ok(())
    }
}

impl SharedRam {
    /// Where `[gpa, gpa+len)` is in the `size` bytes; EFAULT if not all of it is.
    fn range(&self, size: usize, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, u32> {
        let efault = libc::EFAULT as u32;
        let at = gpa.checked_sub(self.base).ok_or(efault)? as usize;
        match at.checked_add(len) {
            Some(end) if end <= size => Ok(at..end),
            _ => Err(efault),
        }
    }
}

/// A client on `stream` (the other end handed to a backend as its
/// connection), VERSION negotiated: 16 fds a message, 1 MiB transfers, 16
/// DMA maps, no REGION_WRITE_MULTI.
pub fn client_on(stream: std::os::unix::net::UnixStream) -> Client {
    let mut c = Client::from_stream(stream).unwrap();
    c.negotiate(&umdev::vfio_user::caps::Capabilities::new(
        16,
        1 << 20,
        16,
        false,
    ))
    .unwrap();
    c
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Makes `fd` the child's descriptor 3 (without close-on-exec), for `--fd 3`;
/// with `close_others`, every descriptor above 3 is closed before exec too.
pub fn pass_as_fd3(cmd: &mut Command, fd: RawFd, close_others: bool) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only async-signal-safe dup2, fcntl and
    // close_range run.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it explicitly.
            if libc::dup2(fd, 3) < 0 || libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if close_others {
                libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
            }
            Ok(())
        });
    }
}

/// A `Server` serving from a thread of the test process, on a socket in a
/// private directory; stopped and joined when dropped.
pub struct InProcessServer {
    _dir: TempDir,
    pub path: PathBuf,
    stop: umdev::vfio_user::StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcessServer {
    pub fn start(server: umdev::vfio_user::Server) -> InProcessServer {
        let stop = server.stop_handle();
        let dir = TempDir::new();
        let path = dir.path().join("server.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || server.serve_listener(&listener).unwrap());
        InProcessServer {
            _dir: dir,
            path,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
