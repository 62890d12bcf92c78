//! Serving a [`VirtioDevice`] on a vhost-user socket, one front-end at a time,
//! for as long as the process runs: when a front-end goes away (QEMU quits,
//! or restarts its chardev with `reconnect-ms`), the model is reset and the next
//! front-end on the same socket gets a power-on device.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tracing::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon, VhostUserHandlerError};

use super::backend::{BackendStats, DeviceBackend};
use super::device::VirtioDevice;

/// Socket options of a vhost-user device binary.
#[derive(clap::Args, Debug, Clone)]
pub struct VhostUserArgs {
    /// UNIX socket to listen on (a stale socket file there is replaced); QEMU
    /// connects with `-chardev socket,id=ID,path=PATH`.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// Serve one front-end, then exit.
    #[arg(long)]
    pub once: bool,
    /// Do not confine the running backend with its seccomp filter (see
    /// `umdev::sandbox`).
    #[arg(long)]
    pub no_seccomp: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserRunError {
    #[error("socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("vhost-user daemon: {0}")]
    Daemon(#[from] DaemonError),
    #[error("signal thread: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
}

/// A failure of the vhost-user-backend crate's daemon. That crate's
/// `Error` implements no `std::error::Error` (so it cannot be a `#[source]`)
/// and holds a panic payload that is not `Sync`, so it is taken apart here:
/// each variant keeps the underlying error as its source, with the crate's
/// own message.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create vhost user handler: {0}")]
    NewHandler(#[source] VhostUserHandlerError),
    #[error("cannot create backend listener: {0}")]
    BackendListener(#[source] vhost::vhost_user::Error),
    #[error("cannot create backend req handler: {0}")]
    BackendReqHandler(#[source] vhost::vhost_user::Error),
    #[error("cannot create vhost-user listener: {0}")]
    Listener(#[source] vhost::vhost_user::Error),
    #[error("failed to start daemon: {0}")]
    Start(#[source] std::io::Error),
    /// The daemon thread panicked (its payload is dropped, as the crate's
    /// own message does).
    #[error("failed to wait for daemon exit")]
    Wait,
    #[error("failed to handle request: {0}")]
    HandleRequest(#[source] vhost::vhost_user::Error),
}

impl From<vhost_user_backend::Error> for DaemonError {
    fn from(e: vhost_user_backend::Error) -> Self {
        use vhost_user_backend::Error as E;
        match e {
            E::NewVhostUserHandler(e) => DaemonError::NewHandler(e),
            E::CreateBackendListener(e) => DaemonError::BackendListener(e),
            E::CreateBackendReqHandler(e) => DaemonError::BackendReqHandler(e),
            E::CreateVhostUserListener(e) => DaemonError::Listener(e),
            E::StartDaemon(e) => DaemonError::Start(e),
            E::WaitDaemon(_) => DaemonError::Wait,
            E::HandleRequest(e) => DaemonError::HandleRequest(e),
        }
    }
}

impl From<vhost_user_backend::Error> for VhostUserRunError {
    fn from(e: vhost_user_backend::Error) -> Self {
        VhostUserRunError::Daemon(e.into())
    }
}

/// System calls a vhost-user backend makes beyond [`crate::sandbox::ALLOWED`]:
/// the crate's vring threads wait on epoll.
pub const VHOST_USER_SYSCALLS: &[libc::c_long] = &[
    // The vhost crate checks each new connection's socket options (and
    // `gpu_socket::adopt` those of the display channel it looks for).
    libc::SYS_getsockopt,
    // `gpu_socket::adopt`: the display channel is the unnamed socket.
    libc::SYS_getsockname,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
];

/// Stops a running [`serve`] from another thread (a signal handler thread, a
/// test).
#[derive(Clone, Default)]
pub struct StopHandle {
    inner: Arc<StopState>,
}

#[derive(Default)]
struct StopState {
    stop: AtomicBool,
    listener_fd: Mutex<Option<i32>>,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl StopHandle {
    /// Ends the current connection and the accept loop.
    pub fn stop(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        if let Some(conn) = self.inner.connection.lock().unwrap().as_ref() {
            conn.shutdown();
        }
        if let Some(fd) = *self.inner.listener_fd.lock().unwrap() {
            // shutdown() on a listening socket makes a blocked accept() fail
            // (EINVAL), which is how the loop learns that it must end.
            // SAFETY: `fd` is the listener's, alive while `serve` runs (it clears
            // the slot before the listener is dropped); shutdown takes no memory.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn stopped(&self) -> bool {
        self.inner.stop.load(Ordering::SeqCst)
    }
}

/// Serves `device` on `listener` until `stop` (or, with `once`, until the first
/// front-end leaves). The model is reset after each front-end.
pub fn serve<D: VirtioDevice>(
    device: Arc<D>,
    mut listener: Listener,
    once: bool,
    stop: &StopHandle,
) -> Result<(), VhostUserRunError> {
    *stop.inner.listener_fd.lock().unwrap() = Some(listener.as_raw_fd());
    let result = serve_connections(&device, &mut listener, once, stop);
    *stop.inner.listener_fd.lock().unwrap() = None;
    result
}

fn serve_connections<D: VirtioDevice>(
    device: &Arc<D>,
    listener: &mut Listener,
    once: bool,
    stop: &StopHandle,
) -> Result<(), VhostUserRunError> {
    let stats = Arc::new(BackendStats::default());
    while !stop.stopped() {
        let mem = DeviceBackend::<D>::empty_memory();
        let backend = Arc::new(DeviceBackend::new(
            device.clone(),
            mem.clone(),
            stats.clone(),
        ));
        let mut daemon = VhostUserDaemon::new(device.name().to_string(), backend, mem)?;
        if let Err(e) = daemon.start(listener) {
            if stop.stopped() {
                break;
            }
            return Err(e.into());
        }
        info!("front-end connected");
        *stop.inner.connection.lock().unwrap() = daemon.shutdown_handle();
        if stop.stopped() {
            daemon.request_shutdown();
        }
        match daemon.wait() {
            Ok(()) => info!("front-end disconnected"),
            Err(e) => warn!("front-end connection ended: {e}"),
        }
        *stop.inner.connection.lock().unwrap() = None;
        // Dropping the daemon stops its vring threads before the model resets.
        drop(daemon);
        device.reset();
        info!(
            requests = stats.requests.load(Ordering::Relaxed),
            bad_chains = stats.bad_chains.load(Ordering::Relaxed),
            memory_lost = stats.memory_lost.load(Ordering::Relaxed),
            dropped = stats.dropped.load(Ordering::Relaxed),
            "device reset for the next front-end"
        );
        if once {
            break;
        }
    }
    Ok(())
}

/// How long a termination signal waits for the orderly stop (the front-end
/// connection shut down, the vring threads joined, the model reset) before the
/// process exits anyway: a front-end can keep a vring thread busy for up to
/// a second (a display channel it does not read, see the virtio-gpu model),
/// and SIGTERM must end the process within one.
pub const STOP_GRACE: Duration = Duration::from_millis(500);

/// Serves `device` as the arguments say until a termination signal (call
/// [`crate::cli::block_termination_signals`] first in `main`). The process
/// ends within [`STOP_GRACE`] of the signal, whatever the front-end does.
pub fn run<D: VirtioDevice>(args: &VhostUserArgs, device: Arc<D>) -> Result<(), VhostUserRunError> {
    let stop = StopHandle::default();
    let signal_stop = stop.clone();
    let (done, stopped) = mpsc::channel::<()>();
    let socket_path = args.socket_path.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = crate::cli::wait_for_termination_signal();
            info!(sig, "termination signal: stopping");
            signal_stop.stop();
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(STOP_GRACE) {
                error!(
                    "the connection did not stop within {STOP_GRACE:?} of the termination \
                     signal; exiting now"
                );
                let _ = std::fs::remove_file(&socket_path);
                std::process::exit(0);
            }
        })
        .map_err(VhostUserRunError::Signals)?;
    super::gpu_socket::prepare();

    let listener =
        Listener::new(&args.socket_path, true).map_err(|source| VhostUserRunError::Bind {
            path: args.socket_path.clone(),
            source,
        })?;
    info!(path = %args.socket_path.display(), "listening (vhost-user)");
    crate::sandbox::allow_extra(VHOST_USER_SYSCALLS);
    crate::sandbox::confine(!args.no_seccomp)?;
    let result = serve(device, listener, args.once, &stop);
    if let Err(e) = &result {
        error!("{e}");
    }
    let _ = std::fs::remove_file(&args.socket_path);
    drop(done);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_errors_keep_their_source_and_message() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<VhostUserRunError>();

        let io = std::io::Error::from_raw_os_error(libc::EAGAIN);
        let text = io.to_string();
        let err = VhostUserRunError::from(vhost_user_backend::Error::StartDaemon(io));
        assert!(matches!(
            err,
            VhostUserRunError::Daemon(DaemonError::Start(_))
        ));
        assert_eq!(
            err.to_string(),
            format!("vhost-user daemon: failed to start daemon: {text}")
        );
        let source = std::error::Error::source(&err).unwrap();
        assert!(source.is::<DaemonError>());
        assert!(source.source().unwrap().is::<std::io::Error>());

        let err = VhostUserRunError::from(vhost_user_backend::Error::WaitDaemon(Box::new(())));
        assert_eq!(
            err.to_string(),
            "vhost-user daemon: failed to wait for daemon exit"
        );
    }
}
