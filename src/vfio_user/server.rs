//! The vfio-user server: accepts one client at a time on a UNIX socket and serves
//! its commands against a [`PciFunction`].
//!
//! Two layers: [`Session`], the protocol core, takes one received message at a
//! time ([`Session::handle`]) and sends what it has to say through a
//! [`Transport`]; it does no I/O of its own, so tests and the fuzz harness
//! drive it with messages in memory. [`Server`] owns the socket: it accepts,
//! reads messages with [`MessageReader`] and hands them to the session.
//!
//! A guest MMIO write travels: [`MessageReader::read_message`] (socket) ->
//! [`Session::handle`] (dispatch through the handler table) ->
//! [`PciFunction::region_write`] -> the model's `bar_write`.
//!
//! The session thread is the only reader of the socket. Server-initiated DMA
//! requests are written by whichever thread needs them (see [`dma`](super::dma)),
//! and their replies are handed back by the session thread, which keeps serving the
//! client's own commands in the meantime. DMA a model queued from a handler
//! (`DeviceContext::dma`) is done by the session thread itself, right after the
//! handler, and finished when the replies arrive (see `deferred`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{debug, info, warn};

use super::caps::Capabilities;
use super::deferred::{DeferredDma, FinishedDma};
use super::dma::{DmaLink, PendingRequests};
use super::errno::Errno;
use super::feature;
use super::pci_map::{self, irq_info_flags, irq_kind_of, region_of};
use super::socket::{FrameError, MessageReader, MessageWriter, Received, MAX_FDS_PER_MESSAGE};
use super::transport::Transport;
use super::wire::*;
use crate::event::{EventLoop, Wake};
use crate::memory::{DmaDirection, DmaQueue, DmaRegion, GuestMemory, MemoryError};
use crate::migration::{DeviceMigration, MIGRATION_FLAGS};
use crate::pagetrack::{DirtyBitmap, SourceKind, UffdRegistration};
use crate::pci::config::{COMMAND_BUS_MASTER, COMMAND_MEMORY};
use crate::pci::{PciFunction, Region};

/// Limits the server announces and enforces.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest data transfer in one message (REGION_READ/WRITE, DMA_READ/WRITE).
    pub max_data_xfer_size: u32,
    /// Most DMA regions mapped at once.
    pub max_dma_maps: u32,
    /// How long a server-initiated DMA request may wait for its reply.
    pub dma_timeout: std::time::Duration,
    /// Layout of DMA_READ/DMA_WRITE messages (QEMU's differs from the spec's).
    pub dma_layout: DmaLayout,
    /// Largest device state image a migration destination accepts.
    pub max_migration_image: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: 1024 * 1024,
            // QEMU refuses more than 65535.
            max_dma_maps: 65535,
            dma_timeout: std::time::Duration::from_secs(10),
            dma_layout: DmaLayout::default(),
            max_migration_image: crate::migration::DEFAULT_MAX_IMAGE,
        }
    }
}

/// Bytes of message metadata allowed beyond `max_data_xfer_size`.
pub const MESSAGE_OVERHEAD: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
}

/// Ends a running server from another thread or a signal handler.
#[derive(Clone, Default)]
pub struct StopHandle {
    inner: Arc<StopInner>,
}

struct StopInner {
    stopped: AtomicBool,
    /// The listening socket and the connection being served, as raw fds (-1:
    /// none), so that [`StopHandle::stop`] can run in a signal handler: it only
    /// loads these and calls shutdown(2). A number cleared and closed just as a
    /// stop reads it is harmless: shutting down a closed or reused fd at worst
    /// fails or ends a connection while the server is stopping anyway.
    listener: AtomicI32,
    connection: AtomicI32,
}

impl Default for StopInner {
    fn default() -> Self {
        StopInner {
            stopped: AtomicBool::new(false),
            listener: AtomicI32::new(-1),
            connection: AtomicI32::new(-1),
        }
    }
}

impl StopHandle {
    /// Stops accepting, and ends the current session (the device is reset as on a
    /// lost connection). Async-signal-safe: atomics and shutdown(2) only.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for fd in [&self.inner.listener, &self.inner.connection] {
            let fd = fd.load(Ordering::SeqCst);
            if fd >= 0 {
                // SAFETY: shutdown(2) on a number; it touches no memory of ours,
                // and on a listener or connection it only wakes the blocked
                // accept()/recvmsg() (see the field comment for stale numbers).
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// A client is being served now.
    pub fn has_client(&self) -> bool {
        self.inner.connection.load(Ordering::SeqCst) >= 0
    }
}

/// A vfio-user server for one PCI function.
pub struct Server {
    function: Arc<Mutex<PciFunction>>,
    config: ServerConfig,
    stop: StopHandle,
}

impl Server {
    pub fn new(function: PciFunction, config: ServerConfig) -> Self {
        Server {
            function: Arc::new(Mutex::new(function)),
            config,
            stop: StopHandle::default(),
        }
    }

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// The function, for inspection (tests, tools).
    pub fn function(&self) -> &Arc<Mutex<PciFunction>> {
        &self.function
    }

    /// Serves clients from `listener` one after another until stopped.
    pub fn serve_listener(&self, listener: &UnixListener) -> Result<(), ServerError> {
        self.accept_loop(listener, false)
    }

    /// Serves the first client that connects to `listener`, unless stopped first.
    pub fn serve_one(&self, listener: &UnixListener) -> Result<(), ServerError> {
        self.accept_loop(listener, true)
    }

    fn accept_loop(&self, listener: &UnixListener, once: bool) -> Result<(), ServerError> {
        // Registered first, checked after: a stop either sees the listener or
        // is seen by the loop (both SeqCst).
        let registered = &self.stop.inner.listener;
        registered.store(listener.as_raw_fd(), Ordering::SeqCst);
        let mut result = Ok(());
        while !self.stop.is_stopped() {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) if self.stop.is_stopped() => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            };
            info!("client connected");
            let served = self.serve_connection(stream);
            if once {
                result = served;
                break;
            }
            match served {
                Ok(()) => info!("client disconnected; device reset, waiting for the next"),
                Err(e) => warn!("session ended: {e}; device reset, waiting for the next client"),
            }
        }
        registered.store(-1, Ordering::SeqCst);
        result
    }

    /// Serves one connected client until it goes away, then resets the device.
    pub fn serve_connection(&self, stream: UnixStream) -> Result<(), ServerError> {
        let writer = Arc::new(MessageWriter::new(stream.try_clone()?));
        // Registered for StopHandle::stop until the session is over (`stream`
        // stays open as long as the reader, which outlives the registration).
        let stream_fd = stream.as_raw_fd();
        let mut reader = MessageReader::new(
            stream,
            self.config.max_data_xfer_size as usize + MESSAGE_OVERHEAD,
        );
        self.stop
            .inner
            .connection
            .store(stream_fd, Ordering::SeqCst);
        if self.stop.is_stopped() {
            writer.shutdown();
        }
        // One thread for the connection and the device's helper fds (INTx
        // unmask eventfd, userfaultfds); while there are none, the socket is
        // read directly, with no epoll call on the message path.
        let sets = {
            let f = lock(&self.function);
            vec![
                f.interrupts().event_set().clone(),
                f.page_tracker().event_set().clone(),
            ]
        };
        let mut events = EventLoop::new(stream_fd, sets)?;
        let mut session = Session::new(&self.function, &self.config, writer);
        let result = loop {
            if !reader.has_buffered() && !events.idle() {
                match events.wait() {
                    Ok(Wake::Served) => continue,
                    Ok(Wake::Readable) => {}
                    Err(e) => break Err(e.into()),
                }
            }
            match reader.read_message() {
                Ok(msg) => {
                    if let Err(e) = session.handle(msg) {
                        break Err(e);
                    }
                }
                Err(FrameError::Closed) => break Ok(()),
                Err(e) => break Err(e.into()),
            }
        };
        self.stop.inner.connection.store(-1, Ordering::SeqCst);
        session.end();
        result
    }
}

fn lock(function: &Mutex<PciFunction>) -> MutexGuard<'_, PciFunction> {
    function.lock().unwrap_or_else(|p| p.into_inner())
}

/// Result of a command handler: Ok once the reply is sent, or the errno for an
/// error reply.
type HandlerResult = Result<(), i32>;

/// One command the server takes (README: "Adding a vfio-user command").
struct Handler {
    command: u16,
    name: &'static str,
    /// For a umdev extension: the capability both sides must announce in
    /// VERSION, without which the command is unknown.
    extension: Option<&'static str>,
    /// Whether the command may carry fds (any other with fds is refused).
    takes_fds: bool,
    run: fn(&mut Session<'_>, Request<'_>) -> HandlerResult,
}

/// A table row: `command, fds?, handler method` (or an errno for commands
/// a client must not send or that are not supported).
macro_rules! row {
    ($cmd:ident, $fds:expr, $method:ident) => {
        Handler {
            command: Command::$cmd as u16,
            name: stringify!($cmd),
            extension: None,
            takes_fds: $fds,
            run: |s, r| s.$method(r),
        }
    };
    ($cmd:ident, refused $errno:expr) => {
        Handler {
            command: Command::$cmd as u16,
            name: stringify!($cmd),
            extension: None,
            takes_fds: false,
            run: |_, _| Err($errno),
        }
    };
    ($cmd:expr, $name:literal, extension $cap:expr, $fds:expr, $method:ident) => {
        Handler {
            command: $cmd,
            name: $name,
            extension: Some($cap),
            takes_fds: $fds,
            run: |s, r| s.$method(r),
        }
    };
}

/// Every command, standard and umdev extension, in one table.
#[rustfmt::skip]
static HANDLERS: &[Handler] = &[
    // The hot path first: trapped MMIO.
    row!(RegionRead, false, region_read),
    row!(RegionWrite, false, region_write),
    row!(RegionWriteMulti, false, region_write_multi),
    row!(Version, false, version),
    row!(DmaMap, true, dma_map),
    row!(DmaUnmap, false, dma_unmap),
    row!(DeviceGetInfo, false, device_info),
    row!(DeviceGetRegionInfo, false, region_info),
    row!(DeviceGetRegionIoFds, false, region_io_fds),
    row!(DeviceGetIrqInfo, false, irq_info),
    row!(DeviceSetIrqs, true, set_irqs),
    row!(DeviceReset, false, device_reset),
    // Server-to-client commands are not for the client to send.
    row!(DmaRead, refused libc::EINVAL),
    row!(DmaWrite, refused libc::EINVAL),
    // Migration (src/migration).
    row!(DeviceFeature, false, device_feature),
    row!(MigDataRead, false, mig_data_read),
    row!(MigDataWrite, false, mig_data_write),
    row!(UMDEV_CMD_DIRTY_BITMAP, "UMDEV_DIRTY_BITMAP", extension CAP_UMDEV_DIRTY_BITMAP, true, dirty_bitmap),
    row!(UMDEV_CMD_UFFD, "UMDEV_UFFD", extension CAP_UMDEV_UFFD_WP, true, uffd),
];

/// The protocol core of one client connection: fed received messages,
/// it answers through its [`Transport`] and acts on the function. It does no
/// I/O itself (see the module comment).
pub struct Session<'a> {
    function: &'a Mutex<PciFunction>,
    memory: GuestMemory,
    /// The model's deferred DMA: queued by its handlers, done by this session.
    dma_queue: DmaQueue,
    deferred: DeferredDma,
    /// The DMA_READ/DMA_WRITE link agreed at VERSION.
    link: Option<Arc<DmaLink>>,
    config: &'a ServerConfig,
    writer: Arc<dyn Transport>,
    pending: Arc<PendingRequests>,
    client_caps: Option<Capabilities>,
    /// REGION_READ data, reused from one read to the next.
    read_buf: Vec<u8>,
    /// umdev extensions both sides announced.
    extensions: Vec<&'static str>,
    /// The device's migration state and data stream.
    migration: DeviceMigration,
    /// Whether the client asked about migration (DEVICE_FEATURE), or was
    /// told that it did not (see `warn_if_client_cannot_migrate`).
    migration_asked: bool,
}

/// A command as the handlers see it.
struct Request<'m> {
    header: Header,
    payload: &'m [u8],
    fds: Vec<OwnedFd>,
}

impl<'a> Session<'a> {
    /// A session of a client just connected, sending through `transport`.
    pub fn new(
        function: &'a Mutex<PciFunction>,
        config: &'a ServerConfig,
        transport: Arc<dyn Transport>,
    ) -> Session<'a> {
        let (memory, dma_queue) = {
            let function = lock(function);
            (function.memory().clone(), function.dma_queue().clone())
        };
        dma_queue.attach(true);
        Session {
            function,
            memory,
            dma_queue,
            deferred: DeferredDma::default(),
            link: None,
            config,
            writer: transport,
            pending: Arc::new(PendingRequests::default()),
            client_caps: None,
            read_buf: Vec::new(),
            extensions: Vec::new(),
            migration: DeviceMigration::new(MIGRATION_FLAGS, config.max_migration_image),
            migration_asked: false,
        }
    }

    /// The client went away: fails waiting DMA, forgets the client's memory
    /// and interrupts, and returns the device to power-on state.
    pub fn end(self) {
        self.pending.close();
        self.dma_queue.attach(false);
        let mut function = lock(self.function);
        // Logging for a client that is gone serves no one.
        let _ = function.memory().stop_dirty_log();
        if !self.migration.device_runs() {
            function.resume();
        }
        function.memory().set_transport(None);
        let dropped = function.memory().with_regions(|r| r.clear());
        debug!(regions = dropped.len(), "DMA regions dropped");
        // Page tracking hears of each region gone, as on DMA_UNMAP.
        let tracker = function.page_tracker().clone();
        for r in &dropped {
            tracker.remove_region(r.gpa, r.size);
        }
        drop(dropped);
        function.reset();
        function.interrupts().disconnect();
    }

    /// Handles one message from the client: a command (answered, unless it
    /// asked for no reply), or the reply to one of our DMA requests. An error
    /// means the connection cannot go on (an error reply could not be sent).
    pub fn handle(&mut self, msg: Received<'_>) -> Result<(), ServerError> {
        let Received {
            header,
            payload,
            fds,
            oversized,
            fds_truncated,
        } = msg;
        if header.is_reply() {
            let finished = match self.pending.complete(&header, payload) {
                Some(piece) => self.deferred.on_reply(
                    piece,
                    &header,
                    payload,
                    &self.memory,
                    self.link.as_deref(),
                    &self.pending,
                ),
                None => None,
            };
            if let Some(f) = finished {
                self.finish_dma(f);
            }
            self.after_message();
            return Ok(());
        }
        let req = Request {
            header,
            payload,
            fds,
        };
        let errno = if !header.is_command() {
            Some(libc::EINVAL)
        } else if oversized {
            Some(libc::E2BIG)
        } else if fds_truncated {
            Some(libc::EINVAL)
        } else {
            self.dispatch(req).err()
        };
        if let Some(errno) = errno {
            debug!(
                msg_id = header.msg_id,
                command = header.command,
                errno,
                "command failed"
            );
            if !header.no_reply() {
                self.send_error(&header, errno)?;
            }
        }
        self.after_message();
        Ok(())
    }

    /// Runs the DMA the model queued while handling the message, and fails
    /// transfers whose replies are overdue. Two loads when there is neither.
    #[inline]
    fn after_message(&mut self) {
        // A device stopped for migration starts no DMA: it stays queued.
        if self.dma_queue.has_queued() && self.migration.device_runs() {
            self.run_queued_dma();
        }
        if !self.deferred.is_idle() {
            let now = std::time::Instant::now();
            while let Some(f) = self.deferred.take_expired(now, &self.pending) {
                self.finish_dma(f);
            }
        }
    }

    #[cold]
    fn run_queued_dma(&mut self) {
        // A model may queue the next transfer from dma_done; a bounded number
        // per message keeps one that always does from holding the session.
        for _ in 0..crate::memory::MAX_QUEUED_DMA {
            let Some(op) = self.dma_queue.pop() else {
                return;
            };
            if let Some(f) =
                self.deferred
                    .start(op, &self.memory, self.link.as_deref(), &self.pending)
            {
                self.finish_dma(f);
            }
        }
        if self.dma_queue.has_queued() {
            debug!("queued DMA left for after the next message");
        }
    }

    /// Hands a finished transfer to the model and keeps its buffer.
    fn finish_dma(&mut self, f: FinishedDma) {
        let FinishedDma {
            token,
            direction,
            data,
            result,
        } = f;
        if let Err(e) = &result {
            debug!(token, "queued DMA failed: {e}");
        }
        let outcome = result.map(|()| match direction {
            DmaDirection::FromGuest => &data[..],
            DmaDirection::ToGuest => &[][..],
        });
        lock(self.function).dma_done(token, outcome);
        self.dma_queue.recycle(data);
    }

    fn dispatch(&mut self, req: Request<'_>) -> HandlerResult {
        let command = req.header.command;
        let Some(handler) = HANDLERS.iter().find(|h| h.command == command) else {
            warn!(command, "unknown command");
            return Err(libc::ENOSYS);
        };
        // An extension neither side agreed to is an unknown command.
        if handler.extension.is_some_and(|e| !self.agreed(e)) {
            warn!(command, "extension command without its capability");
            return Err(libc::ENOSYS);
        }
        if self.client_caps.is_none() && command != Command::Version as u16 {
            warn!(command = handler.name, "command before VERSION negotiation");
            return Err(libc::EINVAL);
        }
        if !req.fds.is_empty() && !handler.takes_fds {
            return Err(libc::EINVAL);
        }
        (handler.run)(self, req)
    }

    fn device_reset(&mut self, req: Request<'_>) -> HandlerResult {
        let mut function = lock(self.function);
        if !self.migration.device_runs() {
            function.resume();
        }
        function.reset();
        drop(function);
        self.migration.reset();
        self.reply(&req.header, &[], &[])
    }

    /// BAR accesses reach a device only while it runs; configuration space
    /// stays reachable in every migration state.
    #[inline]
    fn reachable(&self, region: Region) -> HandlerResult {
        if self.migration.device_runs() || region == Region::Config {
            Ok(())
        } else {
            debug!(state = ?self.migration.state(), "region access while the device is stopped");
            Err(libc::EBUSY)
        }
    }

    // ---- migration -------------------------------------------------------

    fn device_feature(&mut self, req: Request<'_>) -> HandlerResult {
        if let Some(f) = DeviceFeature::read_from(req.payload) {
            self.migration_asked |= matches!(
                f.flags & FEATURE_MASK,
                FEATURE_MIGRATION | FEATURE_MIG_DEVICE_STATE
            );
        }
        let mut function = lock(self.function);
        let reply = feature::handle(
            req.payload,
            feature::FeatureContext {
                migration: &mut self.migration,
                function: &mut function,
                memory: &self.memory,
                max_reply: self.config.max_data_xfer_size as usize,
            },
        )?;
        drop(function);
        self.reply(&req.header, &[&reply], &[])
    }

    fn mig_data_read(&mut self, req: Request<'_>) -> HandlerResult {
        let ask = MigData::read_from(req.payload).ok_or(libc::EINVAL)?;
        if ask.size > self.config.max_data_xfer_size {
            return Err(libc::E2BIG);
        }
        let head = std::mem::size_of::<MigData>();
        if (ask.argsz as usize) < head + ask.size as usize {
            return Err(libc::EINVAL);
        }
        let data = {
            let function = lock(self.function);
            self.migration.read(ask.size as usize, &function)
        }
        .map_err(|e| {
            debug!("MIG_DATA_READ refused: {e}");
            e.errno()
        })?;
        let reply = MigData {
            argsz: (head + data.len()) as u32,
            size: data.len() as u32,
        };
        // `argsz` and `size` say how much there is; the message itself has
        // the room the client asked for, zero-filled past `size`, as
        // libvfio-user's server sends it (its client takes nothing shorter).
        let padding = vec![0u8; ask.size as usize - data.len()];
        self.reply(&req.header, &[reply.as_bytes(), &data, &padding], &[])
    }

    fn mig_data_write(&mut self, req: Request<'_>) -> HandlerResult {
        let ask = MigData::read_from(req.payload).ok_or(libc::EINVAL)?;
        let data = &req.payload[std::mem::size_of::<MigData>()..];
        if data.len() != ask.size as usize {
            return Err(libc::EINVAL);
        }
        self.migration.write(data).map_err(|e| {
            debug!("MIG_DATA_WRITE refused: {e}");
            e.errno()
        })?;
        self.reply(&req.header, &[], &[])
    }

    // ---- replies ---------------------------------------------------------

    #[inline]
    fn reply(&self, req: &Header, parts: &[&[u8]], fds: &[RawFd]) -> HandlerResult {
        if req.no_reply() {
            return Ok(());
        }
        let size = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = Header {
            msg_id: req.msg_id,
            command: req.command,
            size: size as u32,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        };
        // Never more fds than the client said it takes (the spec's default
        // is 1 until VERSION says otherwise).
        let max_fds = self
            .client_caps
            .as_ref()
            .map_or(crate::vfio_user::caps::DEFAULT_MAX_MSG_FDS, |c| {
                c.max_msg_fds
            });
        let fds = &fds[..fds.len().min(max_fds as usize)];
        // A failed send means the client is gone; the next read sees it.
        if let Err(e) = self.writer.send(&header, parts, fds) {
            debug!("sending reply failed: {e}");
        }
        Ok(())
    }

    fn send_error(&self, req: &Header, errno: i32) -> Result<(), ServerError> {
        let header = Header {
            msg_id: req.msg_id,
            command: req.command,
            size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno as u32,
        };
        if let Err(e) = self.writer.send(&header, &[], &[]) {
            debug!("sending error reply failed: {e}");
        }
        Ok(())
    }

    // ---- commands --------------------------------------------------------

    fn version(&mut self, req: Request<'_>) -> HandlerResult {
        if self.client_caps.is_some() {
            warn!("second VERSION refused");
            return Err(libc::EINVAL);
        }
        let v = Version::read_from(req.payload).ok_or(libc::EINVAL)?;
        if v.major != VERSION_MAJOR {
            warn!(
                major = v.major,
                "client protocol major version not supported"
            );
            return Err(libc::ENOTSUP);
        }
        let caps =
            Capabilities::parse(&req.payload[std::mem::size_of::<Version>()..]).map_err(|e| {
                warn!("client capabilities refused: {e}");
                libc::EINVAL
            })?;
        if caps.max_data_xfer_size == 0 {
            warn!("client announced max_data_xfer_size 0: no DMA message could carry data");
            return Err(libc::EINVAL);
        }
        info!(
            minor = v.minor,
            max_msg_fds = caps.max_msg_fds,
            max_data_xfer_size = caps.max_data_xfer_size,
            "client version negotiated"
        );
        let mut ours = Capabilities::new(
            MAX_FDS_PER_MESSAGE as u32,
            self.config.max_data_xfer_size,
            self.config.max_dma_maps,
            true,
        );
        // Extensions this device offers; each is in force when the client
        // announced it too.
        let offered: &[&'static str] = match lock(self.function).page_tracker().source_kind() {
            SourceKind::DirtyBitmap => &[CAP_UMDEV_DIRTY_BITMAP],
            SourceKind::Userfault => &[CAP_UMDEV_UFFD_WP],
            SourceKind::Scan => &[],
        };
        for &name in offered {
            if let Some(obj) = ours.raw.as_object_mut() {
                obj.insert(
                    name.into(),
                    serde_json::json!({ "version": 1, "pgsize": 4096 }),
                );
            }
            if caps.raw.get(name).is_some() {
                self.extensions.push(name);
            }
        }
        let json = ours.to_json_bytes();
        let reply = Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR.min(v.minor),
        };
        // DMA requests we send must fit the client's limit as well as ours,
        // however small the client's is (a client that takes no data at all
        // is refused above).
        let max_xfer = caps.max_data_xfer_size.min(self.config.max_data_xfer_size);
        let link = Arc::new(DmaLink::new(
            self.writer.clone(),
            self.pending.clone(),
            max_xfer as usize,
            self.config.dma_timeout,
            self.config.dma_layout,
        ));
        self.memory.set_transport(Some(link.clone()));
        self.link = Some(link);
        self.client_caps = Some(caps);
        self.reply(&req.header, &[reply.as_bytes(), &json], &[])
    }

    fn dma_map(&mut self, mut req: Request<'_>) -> HandlerResult {
        let m = DmaMap::read_from(req.payload).ok_or(libc::EINVAL)?;
        if m.flags & !(DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE) != 0 || req.fds.len() > 1 {
            return Err(libc::EINVAL);
        }
        let readable = m.flags & DMA_MAP_FLAG_READ != 0;
        let writable = m.flags & DMA_MAP_FLAG_WRITE != 0;
        let with_fd = !req.fds.is_empty();
        let region = match req.fds.pop() {
            Some(fd) => DmaRegion::mapped(m.address, m.size, fd, m.offset, readable, writable),
            None => DmaRegion::message(m.address, m.size, readable, writable),
        };
        let result = region.and_then(|region| {
            let function = lock(self.function);
            function.memory().with_regions(|r| r.insert(region))
        });
        match result {
            Ok(()) => {
                debug!(gpa = m.address, size = m.size, with_fd, "DMA map");
                self.memory.stats().maps.fetch_add(1, Ordering::Relaxed);
                self.reply(&req.header, &[], &[])
            }
            Err(e) => {
                warn!(
                    gpa = format_args!("{:#x}", m.address),
                    size = m.size,
                    "DMA_MAP refused: {e}"
                );
                Err(e.errno())
            }
        }
    }

    fn dma_unmap(&mut self, req: Request<'_>) -> HandlerResult {
        let u = DmaUnmap::read_from(req.payload).ok_or(libc::EINVAL)?;
        if u.flags & DMA_UNMAP_FLAG_GET_DIRTY_BITMAP != 0 {
            return Err(libc::ENOTSUP);
        }
        if u.flags & !DMA_UNMAP_FLAG_ALL != 0 {
            return Err(libc::EINVAL);
        }
        let removed = {
            let function = lock(self.function);
            function.memory().with_regions(|r| {
                if u.flags & DMA_UNMAP_FLAG_ALL != 0 {
                    if u.address != 0 || u.size != 0 {
                        return Err(MemoryError::Invalid("unmap-all with a range"));
                    }
                    Ok(r.clear())
                } else {
                    r.remove_range(u.address, u.size)
                }
            })
        };
        match removed {
            Ok(regions) => {
                self.memory.stats().unmaps.fetch_add(1, Ordering::Relaxed);
                debug!(
                    gpa = u.address,
                    size = u.size,
                    n = regions.len(),
                    "DMA unmap"
                );
                // Tracking state and mappings go away here, before the client
                // hears back.
                let tracker = lock(self.function).page_tracker().clone();
                for r in &regions {
                    tracker.remove_region(r.gpa, r.size);
                }
                drop(regions);
                let echo = DmaUnmap {
                    argsz: std::mem::size_of::<DmaUnmap>() as u32,
                    ..u
                };
                self.reply(&req.header, &[echo.as_bytes()], &[])
            }
            Err(e) => {
                debug!("DMA_UNMAP refused: {e}");
                Err(e.errno())
            }
        }
    }

    fn device_info(&mut self, req: Request<'_>) -> HandlerResult {
        let info = DeviceInfo::read_from(req.payload).ok_or(libc::EINVAL)?;
        if (info.argsz as usize) < std::mem::size_of::<DeviceInfo>() {
            return Err(libc::EINVAL);
        }
        let reply = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
            num_regions: PCI_NUM_REGIONS,
            num_irqs: PCI_NUM_IRQS,
        };
        self.reply(&req.header, &[reply.as_bytes()], &[])
    }

    fn region_info(&mut self, req: Request<'_>) -> HandlerResult {
        let ask = RegionInfo::read_from(req.payload).ok_or(libc::EINVAL)?;
        const INFO: usize = std::mem::size_of::<RegionInfo>();
        if (ask.argsz as usize) < INFO {
            return Err(libc::EINVAL);
        }
        let region = region_of(ask.index).ok_or(libc::EINVAL)?;
        let region = lock(self.function).region(region).map_err(|e| e.errno())?;
        let mut flags = 0;
        if region.readable {
            flags |= REGION_INFO_FLAG_READ;
        }
        if region.writable {
            flags |= REGION_INFO_FLAG_WRITE;
        }
        // Sparse mmap capability, when the region has directly mappable areas.
        let mut caps = Vec::new();
        let mut fd = None;
        let mut file_offset = 0;
        if let Some(mapping) = &region.mapping {
            flags |= REGION_INFO_FLAG_MMAP;
            fd = Some(mapping.file.as_raw_fd());
            file_offset = mapping.file_offset;
            let whole = mapping.areas.len() == 1 && mapping.areas[0] == (0, region.size);
            if !whole {
                flags |= REGION_INFO_FLAG_CAPS;
                let header = CapHeader {
                    id: REGION_INFO_CAP_SPARSE_MMAP,
                    version: 1,
                    next: 0,
                };
                let sparse = SparseMmapHeader {
                    nr_areas: mapping.areas.len() as u32,
                    reserved: 0,
                };
                caps.extend_from_slice(header.as_bytes());
                caps.extend_from_slice(sparse.as_bytes());
                for &(offset, size) in &mapping.areas {
                    caps.extend_from_slice(SparseMmapArea { offset, size }.as_bytes());
                }
            }
        }
        let needed = INFO + caps.len();
        let fits = ask.argsz as usize >= needed;
        if !fits {
            // QEMU refuses CAPS without a capability offset; the client asks again
            // with the argsz we report.
            flags &= !REGION_INFO_FLAG_CAPS;
        }
        let info = RegionInfo {
            argsz: needed as u32,
            flags,
            index: ask.index,
            cap_offset: if fits && !caps.is_empty() {
                INFO as u32
            } else {
                0
            },
            size: region.size,
            offset: file_offset,
        };
        let caps_part: &[u8] = if fits { &caps } else { &[] };
        // The fd goes with every reply: QEMU closes the one from its first try.
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.reply(&req.header, &[info.as_bytes(), caps_part], &fds)
    }

    fn region_io_fds(&mut self, req: Request<'_>) -> HandlerResult {
        let ask = RegionIoFds::read_from(req.payload).ok_or(libc::EINVAL)?;
        if ask.index >= PCI_NUM_REGIONS {
            return Err(libc::EINVAL);
        }
        let reply = RegionIoFds {
            argsz: std::mem::size_of::<RegionIoFds>() as u32,
            flags: 0,
            index: ask.index,
            count: 0,
        };
        self.reply(&req.header, &[reply.as_bytes()], &[])
    }

    fn irq_info(&mut self, req: Request<'_>) -> HandlerResult {
        let ask = IrqInfo::read_from(req.payload).ok_or(libc::EINVAL)?;
        let kind = irq_kind_of(ask.index).ok_or(libc::EINVAL)?;
        let info = lock(self.function).interrupts().info(kind);
        let reply = IrqInfo {
            argsz: std::mem::size_of::<IrqInfo>() as u32,
            flags: irq_info_flags(info),
            index: ask.index,
            count: info.count,
        };
        self.reply(&req.header, &[reply.as_bytes()], &[])
    }

    fn set_irqs(&mut self, req: Request<'_>) -> HandlerResult {
        let set = IrqSet::read_from(req.payload).ok_or(libc::EINVAL)?;
        let irqs = lock(self.function).interrupts().clone();
        let rest = &req.payload[std::mem::size_of::<IrqSet>()..];
        pci_map::set_irqs(&irqs, &set, rest, req.fds)?;
        self.reply(&req.header, &[], &[])
    }

    fn region_read(&mut self, req: Request<'_>) -> HandlerResult {
        let access = RegionAccess::read_from(req.payload).ok_or(libc::EINVAL)?;
        if access.count > self.config.max_data_xfer_size {
            return Err(libc::E2BIG);
        }
        let count = access.count as usize;
        // MMIO-sized reads use the stack; larger ones a buffer kept across reads.
        let mut small = [0u8; 8];
        let mut large = Vec::new();
        let data: &mut [u8] = if count <= small.len() {
            &mut small[..count]
        } else {
            large = std::mem::take(&mut self.read_buf);
            large.clear();
            large.resize(count, 0);
            &mut large
        };
        let Some(region) = region_of(access.region) else {
            return Err(libc::EINVAL);
        };
        self.reachable(region)?;
        let read = lock(self.function).region_read(region, access.offset, data);
        let result = match read {
            Ok(()) => self.reply(&req.header, &[access.as_bytes(), data], &[]),
            Err(e) => {
                debug!("REGION_READ refused: {e}");
                Err(e.errno())
            }
        };
        if large.capacity() > 0 {
            self.read_buf = large;
        }
        result
    }

    fn region_write(&mut self, req: Request<'_>) -> HandlerResult {
        let access = RegionAccess::read_from(req.payload).ok_or(libc::EINVAL)?;
        let data = &req.payload[std::mem::size_of::<RegionAccess>()..];
        if data.len() != access.count as usize {
            return Err(libc::EINVAL);
        }
        let region = region_of(access.region).ok_or(libc::EINVAL)?;
        self.reachable(region)?;
        let mut function = lock(self.function);
        if req.header.no_reply() {
            function.count_posted_write();
        }
        function
            .region_write(region, access.offset, data)
            .map_err(|e| {
                debug!("REGION_WRITE refused: {e}");
                e.errno()
            })?;
        drop(function);
        if region == Region::Config && !self.migration_asked {
            self.warn_if_client_cannot_migrate();
        }
        let echo = RegionAccess {
            offset: access.offset,
            region: access.region,
            count: access.count,
        };
        self.reply(&req.header, &[echo.as_bytes()], &[])
    }

    /// A guest driver enabled the device, and the client never asked about
    /// migration: QEMU 11.1's vfio-user-pci never does, and live-migrates
    /// the VM without this device's state (docs/migration.md). Said once, at
    /// the first moment the backend can tell.
    #[cold]
    fn warn_if_client_cannot_migrate(&mut self) {
        let command = lock(self.function).config().command();
        if command & (COMMAND_MEMORY | COMMAND_BUS_MASTER) == 0 {
            return;
        }
        warn!(
            "a guest driver enabled the device, and this client has not asked about \
             migration (QEMU 11.1's vfio-user-pci never does): if the VM is live-migrated, \
             the device's state is not carried over and the guest meets an unconfigured \
             device on the destination (docs/migration.md)"
        );
        self.migration_asked = true;
    }

    fn agreed(&self, extension: &str) -> bool {
        self.extensions.contains(&extension)
    }

    /// umdev extension: the VMM shares a dirty bitmap for a DMA region.
    fn dirty_bitmap(&mut self, mut req: Request<'_>) -> HandlerResult {
        let ask = UmdevDirtyBitmap::read_from(req.payload).ok_or(libc::EINVAL)?;
        let fd = req.fds.pop().ok_or(libc::EINVAL)?;
        if !req.fds.is_empty() || ask.flags != 0 {
            return Err(libc::EINVAL);
        }
        let tracker = lock(self.function).page_tracker().clone();
        DirtyBitmap::new(ask.address, ask.size, std::fs::File::from(fd), ask.offset)
            .and_then(|b| tracker.add_dirty_bitmap(b))
            .map_err(|e| {
                warn!("dirty bitmap refused: {e}");
                e.errno()
            })?;
        self.reply(&req.header, &[ask.as_bytes()], &[])
    }

    /// umdev extension: the VMM shares a write-protect userfaultfd.
    fn uffd(&mut self, mut req: Request<'_>) -> HandlerResult {
        let ask = UmdevUffd::read_from(req.payload).ok_or(libc::EINVAL)?;
        let fd = req.fds.pop().ok_or(libc::EINVAL)?;
        if !req.fds.is_empty() || ask.flags != 0 {
            return Err(libc::EINVAL);
        }
        let tracker = lock(self.function).page_tracker().clone();
        UffdRegistration::new(ask.address, ask.size, ask.vmm_address, fd)
            .and_then(|r| tracker.add_uffd(r))
            .map_err(|e| {
                warn!("userfaultfd refused: {e}");
                e.errno()
            })?;
        self.reply(&req.header, &[ask.as_bytes()], &[])
    }

    fn region_write_multi(&mut self, req: Request<'_>) -> HandlerResult {
        let head = WriteMultiHeader::read_from(req.payload).ok_or(libc::EINVAL)?;
        let entries = &req.payload[std::mem::size_of::<WriteMultiHeader>()..];
        const ENTRY: usize = std::mem::size_of::<WriteMultiEntry>();
        let count = usize::try_from(head.wr_cnt).map_err(|_| libc::EINVAL)?;
        if count == 0 || count > WRITE_MULTI_MAX || entries.len() < count * ENTRY {
            return Err(libc::EINVAL);
        }
        // Validate every entry before applying any, so a bad batch changes nothing.
        let parsed: Vec<WriteMultiEntry> = entries
            .chunks_exact(ENTRY)
            .take(count)
            .filter_map(WriteMultiEntry::read_from)
            .collect();
        if parsed
            .iter()
            .any(|e| e.count == 0 || e.count as usize > WRITE_MULTI_DATA)
        {
            return Err(libc::EINVAL);
        }
        for e in &parsed {
            self.reachable(region_of(e.region).ok_or(libc::EINVAL)?)?;
        }
        let mut function = lock(self.function);
        for e in &parsed {
            let region = region_of(e.region).ok_or(libc::EINVAL)?;
            function
                .region_write(region, e.offset, &e.data[..e.count as usize])
                .map_err(|err| {
                    debug!("REGION_WRITE_MULTI entry refused: {err}");
                    err.errno()
                })?;
        }
        drop(function);
        self.reply(&req.header, &[], &[])
    }
}

/// Pairs SET_IRQS vectors with the fds that came with the message: one fd per
/// vector assigns, no fds at all de-assigns the range (how QEMU sends fd -1).
/// Takes ownership of a raw fd handed to us (`--fd N`).
///
/// # Safety
/// `fd` must be an open fd that nothing else in the process owns.
pub unsafe fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
