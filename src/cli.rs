//! What every device binary shares: socket options, logging, signals, the run loop.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicPtr, Ordering};

use tracing::{error, info};

use crate::pci::PciFunction;
use crate::vfio_user::server::StopHandle;
use crate::vfio_user::wire::DmaLayout;
use crate::vfio_user::{Server, ServerConfig};

/// Socket options of a device binary.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// UNIX socket to listen on (a stale socket file there is replaced).
    #[arg(long, required_unless_present = "fd", conflicts_with = "fd")]
    pub socket_path: Option<PathBuf>,
    /// An inherited socket fd: a listening socket, or one connected client.
    #[arg(long)]
    pub fd: Option<i32>,
    /// Layout of server-initiated DMA_READ/DMA_WRITE messages: `spec`
    /// (docs/interop/vfio-user.rst, libvfio-user, QEMU 11.1) or `qemu-10` (the u32
    /// count and data at byte 28 of QEMU's first hw/vfio-user).
    #[arg(long, default_value = "spec")]
    pub dma_layout: DmaLayout,
    /// Serve one client, then exit.
    #[arg(long)]
    pub once: bool,
    /// Do not confine the running backend with its seccomp filter (see
    /// `umdev::sandbox`).
    #[arg(long)]
    pub no_seccomp: bool,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only on a terminal: logs in files stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--fd {0}: {1}")]
    Fd(i32, std::io::Error),
    #[error(transparent)]
    Server(#[from] crate::vfio_user::server::ServerError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it
/// starts afterwards. Call first in `main`, before the device model starts
/// threads: [`run`] unblocks them in its own thread only, so they never land in
/// a model's thread (servers without [`run`] take them with
/// [`wait_for_termination_signal`]).
pub fn block_termination_signals() {
    for sig in TERMINATION_SIGNALS {
        // Only fails for an invalid signal number, which these are not.
        let _ = vmm_sys_util::signal::block_signal(sig);
    }
}

/// Waits for SIGTERM, SIGINT or SIGHUP (blocked by [`block_termination_signals`]).
pub fn wait_for_termination_signal() -> i32 {
    wait_for_signal(&TERMINATION_SIGNALS)
}

/// Blocks SIGUSR1 as [`block_termination_signals`] blocks those: a device
/// binary takes it in a thread of its own ([`on_sigusr1`]) as a request to
/// write out a picture of its state (the vGPU: its scanout).
pub fn block_sigusr1() {
    let _ = vmm_sys_util::signal::block_signal(libc::SIGUSR1);
}

/// Runs `action` on every SIGUSR1 (blocked by [`block_sigusr1`]), in a
/// thread started here for as long as the process lives (none if it cannot
/// start: the signal then stays blocked and pending, harmless).
pub fn on_sigusr1(mut action: impl FnMut() + Send + 'static) {
    let started = std::thread::Builder::new()
        .name("sigusr1".into())
        .spawn(move || {
            while wait_for_signal(&[libc::SIGUSR1]) == libc::SIGUSR1 {
                action();
            }
            tracing::warn!("SIGUSR1 cannot be waited for; pictures on request are off");
        });
    if let Err(e) = started {
        tracing::warn!("no SIGUSR1 thread: {e}");
    }
}

/// Waits for one of `signals` (blocked): its number, 0 if the set cannot be
/// built.
fn wait_for_signal(signals: &[i32]) -> i32 {
    let Ok(set) = vmm_sys_util::signal::create_sigset(signals) else {
        return 0;
    };
    let mut sig = 0;
    // SAFETY: sigwait reads a signal set built above and writes the signal
    // number to a local.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// The rest of a PCI device binary's `main` once its arguments are parsed:
/// termination signals blocked before the model can start threads, logging,
/// guest memory sized for the server, the function `build` makes on it, and
/// [`run`]. Returns the process's exit code (errors are logged).
///
/// ```no_run
/// # use umdev::cli::{self, ServerArgs};
/// # #[derive(clap::Parser)] struct Args { #[command(flatten)] server: ServerArgs }
/// # fn new_function(m: umdev::memory::GuestMemory) -> Result<umdev::pci::PciFunction, umdev::pci::PciError> { unimplemented!() }
/// fn main() -> std::process::ExitCode {
///     let args = <Args as clap::Parser>::parse();
///     cli::serve_pci(&args.server, new_function)
/// }
/// ```
pub fn serve_pci<E: std::fmt::Display>(
    args: &ServerArgs,
    build: impl FnOnce(crate::memory::GuestMemory) -> Result<PciFunction, E>,
) -> std::process::ExitCode {
    block_termination_signals();
    init_logging();
    let memory = crate::memory::GuestMemory::new(ServerConfig::default().max_dma_maps as usize);
    let function = match build(memory) {
        Ok(f) => f,
        Err(e) => {
            error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match run(args, function) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Serves `function` as the arguments say until a termination signal or, with
/// `--once` or a connected `--fd`, until the client leaves.
pub fn run(args: &ServerArgs, function: PciFunction) -> Result<(), RunError> {
    let config = ServerConfig {
        dma_layout: args.dma_layout,
        ..ServerConfig::default()
    };
    let server = Server::new(function, config);
    // Kept for as long as the server runs (the registry holds it weakly).
    let counters = crate::pci::function::FunctionMetrics::source_for(server.function());
    if let Some(addr) = args.metrics {
        crate::metrics::serve(addr)?;
        crate::metrics::register(&counters);
    }
    stop_on_termination_signals(server.stop_handle()).map_err(|e| RunError::Fd(-1, e))?;
    let result = serve_as_told(args, &server);
    if server.stop_handle().is_stopped() {
        info!("stopped by a termination signal");
    }
    // What the run did, also without a scraper (the e2e tests read it).
    info!("counters at exit: {}", crate::metrics::summary(&*counters));
    result
}

/// The server a termination signal stops. `stop_on_termination_signals` leaks
/// the handle it stores: a handler may be using it at any time, so it is never
/// freed (one small allocation per `run`).
static SIGNAL_STOP: AtomicPtr<StopHandle> = AtomicPtr::new(std::ptr::null_mut());

extern "C" fn on_termination_signal(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let stop = SIGNAL_STOP.load(Ordering::SeqCst);
    if !stop.is_null() {
        // SAFETY: a leaked, never freed StopHandle; `stop` is async-signal-safe
        // (atomics and shutdown(2)).
        unsafe { (*stop).stop() };
    }
}

/// Makes SIGTERM, SIGINT and SIGHUP stop the server, from a signal handler on
/// the calling thread. No signal thread: a backend whose model starts no
/// threads stays single-threaded, and the kernel's fd lookup on each socket
/// call is cheaper for a process that shares its fd table with no other
/// thread (docs/performance.md, "Where the rest goes").
fn stop_on_termination_signals(stop: StopHandle) -> std::io::Result<()> {
    SIGNAL_STOP.store(Box::into_raw(Box::new(stop)), Ordering::SeqCst);
    // Without SA_RESTART (vmm-sys-util's registration): a call the signal
    // interrupts fails with EINTR, and every blocking call of the session
    // retries on EINTR, finding the sockets the handler shut down.
    for sig in TERMINATION_SIGNALS {
        vmm_sys_util::signal::register_signal_handler(sig, on_termination_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        vmm_sys_util::signal::unblock_signal(sig)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn serve_as_told(args: &ServerArgs, server: &Server) -> Result<(), RunError> {
    if let Some(fd) = args.fd {
        // SAFETY: the user handed us this fd on the command line; nothing else in
        // the process owns it.
        let owned = unsafe { crate::vfio_user::server::owned_fd(fd) };
        if is_listening(fd).map_err(|e| RunError::Fd(fd, e))? {
            let listener = UnixListener::from(owned);
            info!(fd, "serving on inherited listening socket");
            crate::sandbox::confine(!args.no_seccomp)?;
            return serve(server, &listener, args.once);
        }
        info!(fd, "serving the inherited connection");
        crate::sandbox::confine(!args.no_seccomp)?;
        server.serve_connection(UnixStream::from(owned))?;
        return Ok(());
    }
    let path = args.socket_path.clone().unwrap_or_default();
    remove_stale_socket(&path);
    let listener = UnixListener::bind(&path).map_err(|source| RunError::Bind {
        path: path.clone(),
        source,
    })?;
    info!(path = %path.display(), "listening");
    crate::sandbox::confine(!args.no_seccomp)?;
    let result = serve(server, &listener, args.once);
    let _ = std::fs::remove_file(&path);
    result
}

fn serve(server: &Server, listener: &UnixListener, once: bool) -> Result<(), RunError> {
    if once {
        if let Err(e) = server.serve_one(listener) {
            error!("session: {e}");
        }
        return Ok(());
    }
    server.serve_listener(listener)?;
    Ok(())
}

fn is_listening(fd: i32) -> std::io::Result<bool> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one c_int into `val`, whose size we pass.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(val != 0)
}

/// Whether a UNIX socket listens at `path` (as the listener gave it to bind(),
/// e.g. the `--socket-path` it was started with), from /proc/net/unix; None
/// when that cannot be read. Without connecting, which a one-client backend
/// would take for its client.
pub fn socket_listening(path: &std::path::Path) -> Option<bool> {
    const ACCEPTCON: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.to_str()?;
    Some(table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & ACCEPTCON != 0)
    }))
}

/// Waits until a UNIX socket listens at `path` ([`socket_listening`]; where
/// /proc/net/unix cannot be read, until the socket file exists), for whoever
/// started a backend on it: the file appears at bind(), a moment before
/// listen(), and a connect in between is refused. `child` is the process
/// that is to listen, if it is ours: its exit ends the wait. An error naming
/// the socket (and the exit status) if `child` exits first or `timeout`
/// passes.
pub fn wait_listening(
    path: &std::path::Path,
    mut child: Option<&mut std::process::Child>,
    timeout: std::time::Duration,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let listening = match socket_listening(path) {
            Some(l) => l,
            None => std::fs::symlink_metadata(path).is_ok(),
        };
        if listening {
            return Ok(());
        }
        if let Some(child) = child.as_deref_mut() {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(format!(
                        "exited ({status}) before listening on {}",
                        path.display()
                    ))
                }
                Ok(None) => {}
                Err(e) => return Err(format!("waiting to listen on {}: {e}", path.display())),
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "nothing listening on {} after {timeout:?}",
                path.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Removes a socket file left by an earlier run; anything else at the path stays
/// (bind then reports it).
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn temp_dir() -> PathBuf {
        crate::test_util::temp_dir("cli")
    }

    #[test]
    fn listening_means_listen_not_a_socket_file() {
        let dir = temp_dir();
        // Bound, never listening (as a backend between bind() and listen()).
        let bound = dir.join("bound.sock");
        let _dgram = std::os::unix::net::UnixDatagram::bind(&bound).unwrap();
        assert_eq!(socket_listening(&bound), Some(false));
        let e = wait_listening(&bound, None, Duration::from_millis(50)).unwrap_err();
        assert!(e.contains(bound.to_str().unwrap()), "{e}");
        assert_eq!(socket_listening(&dir.join("none.sock")), Some(false));

        let path = dir.join("listening.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        assert_eq!(socket_listening(&path), Some(true));
        wait_listening(&path, None, Duration::from_secs(1)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_that_exits_ends_the_wait_with_its_status() {
        let path = temp_dir().join("never.sock");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let e = wait_listening(&path, Some(&mut child), Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("exit status: 3"), "{e}");
        assert!(e.contains(path.to_str().unwrap()), "{e}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
