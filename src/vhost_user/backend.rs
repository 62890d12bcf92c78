//! [`DeviceBackend`]: a [`VirtioDevice`] dressed as a `vhost-user-backend`
//! backend. It owns what every virtio model would otherwise repeat: feature and
//! protocol negotiation, the dirty-log gate, popping descriptor chains,
//! used-ring updates and notification suppression (`VIRTIO_RING_F_EVENT_IDX`).
//!
//! A guest MMIO write reaches a model in four hops: the front-end's kick eventfd
//! wakes the crate's vring thread, which calls [`DeviceBackend::handle_event`],
//! which pops each chain and calls [`VirtioDevice::handle_request`].

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::VirtioDevice;
use super::dirty_log::{first_log_loss, set_logging, LogBitmap, VhostMemoryAtomic};
use super::guarded_memory::GuardedMemory;
use super::vring::Vring;

/// Bit of `VHOST_F_LOG_ALL` in the feature word.
pub const VHOST_F_LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();

/// The vhost-user protocol features every umdev backend offers: config space
/// (QEMU's vhost-user-gpu reads its config through GET_CONFIG), REPLY_ACK, the
/// shared-memory dirty log, and memory slots for ADD/REM_MEM_REG.
pub fn base_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::MQ
}

/// Counters a test or a log line can read.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Requests handed to the model.
    pub requests: AtomicU64,
    /// Descriptor chains that could not be read (addresses outside guest
    /// memory, overflowing lengths): consumed with used length 0.
    pub bad_chains: AtomicU64,
    /// Memory tables the front-end took memory of away (SIGBUS).
    pub memory_lost: AtomicU64,
    /// Requests dropped because their memory went away under them.
    pub dropped: AtomicU64,
}

/// The `VhostUserBackend` of one front-end connection.
pub struct DeviceBackend<D: VirtioDevice> {
    device: Arc<D>,
    mem: VhostMemoryAtomic,
    event_idx: AtomicBool,
    log_all: AtomicBool,
    stats: Arc<BackendStats>,
    /// Where each queue's next pass should start: where the last one ended.
    ring_positions: Mutex<Vec<Option<u16>>>,
    /// The memory table as last checked and guarded (`update_memory`).
    guarded: Mutex<Arc<GuardedMemory>>,
    /// The consumer ends of the vring threads' exit events, as the crate got
    /// them, each with a duplicate of our own (see [`Drop`]).
    exit_consumers: Mutex<Vec<(RawFd, OwnedFd)>>,
}

impl<D: VirtioDevice> DeviceBackend<D> {
    /// A backend for `device` whose guest memory lives in `mem` (the same atomic
    /// the daemon's handler replaces on SET_MEM_TABLE).
    pub fn new(device: Arc<D>, mem: VhostMemoryAtomic, stats: Arc<BackendStats>) -> Self {
        DeviceBackend {
            device,
            mem,
            event_idx: AtomicBool::new(false),
            log_all: AtomicBool::new(false),
            stats,
            ring_positions: Mutex::new(Vec::new()),
            guarded: Mutex::new(Arc::new(GuardedMemory::empty())),
            exit_consumers: Mutex::new(Vec::new()),
        }
    }

    /// Keeps a duplicate of an exit event's consumer end, to close the one
    /// the crate leaks when the backend goes.
    fn note_exit_consumer(&self, consumer: &EventConsumer) {
        let raw = consumer.as_raw_fd();
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor for an eventfd we just
        // made; the OwnedFd takes it.
        let dup = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 3) };
        if dup < 0 {
            debug!("exit event: {}", io::Error::last_os_error());
            return;
        }
        // SAFETY: `dup` is a new descriptor nothing else owns.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        self.exit_consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((raw, dup));
    }

    /// Empty guest memory to start a connection with.
    pub fn empty_memory() -> VhostMemoryAtomic {
        GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new())
    }

    /// Notices a driver reset. vhost-user tells the backend nothing when the
    /// driver resets the device (QEMU stops the rings, and restarts them from
    /// index 0 once the driver is back), while a VM stop/cont restarts them
    /// where they stopped. So a queue whose pass starts at 0, away from where the
    /// last pass ended, belongs to a new driver: the model is reset, and every
    /// queue is expected at 0.
    fn note_ring_start(&self, index: u16, start: u16) {
        let mut positions = self
            .ring_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let index = index as usize;
        if positions.len() <= index {
            positions.resize(index + 1, None);
        }
        if start == 0 && positions[index].is_some_and(|p| p != 0) {
            info!(
                queue = index,
                "{}: ring restarted from 0: the driver reset the device",
                self.device.name()
            );
            self.device.reset();
            positions.iter_mut().for_each(|p| *p = Some(0));
        }
    }

    fn note_ring_end(&self, index: u16, end: u16) {
        let mut positions = self
            .ring_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = positions.get_mut(index as usize) {
            *p = Some(end);
        }
    }

    /// The memory table the glue checked last.
    fn guarded(&self) -> Arc<GuardedMemory> {
        self.guarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the queues must not touch `table`: refused at `update_memory`
    /// (logged there), or taken away by the front-end since (logged here,
    /// once per table).
    fn unusable(&self, table: &GuardedMemory) -> bool {
        if table.refused().is_some() {
            return true;
        }
        if !table.lost() {
            return false;
        }
        if table.first_report() {
            self.stats.memory_lost.fetch_add(1, Ordering::Relaxed);
            error!(
                regions = ?table.lost_regions(),
                "the front-end took guest memory away (SIGBUS): the region now reads as \
                 zeroes; {} stops processing its queues until the front-end sends a new \
                 memory table or reconnects",
                self.device.name()
            );
        }
        true
    }

    fn process_queue(&self, index: u16, vring: &Vring) -> io::Result<()> {
        // Every access below goes through this snapshot, whose mappings are
        // guarded; the crate may already hold a newer table that the glue has
        // not checked yet (it installs it before calling `update_memory`).
        let table = self.guarded();
        if self.unusable(&table) {
            return Ok(());
        }
        let mem = table.memory();
        self.note_ring_start(index, vring.queue_next_avail());
        loop {
            let event_idx = self.event_idx.load(Ordering::Relaxed);
            if event_idx {
                vring
                    .get_mut()
                    .get_queue_mut()
                    .disable_notification(&**mem)
                    .map_err(io::Error::other)?;
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(io::Error::other)?
                .collect();
            for chain in chains {
                if self.unusable(&table) {
                    return Ok(());
                }
                let head = chain.head_index();
                let used_len = match (
                    Reader::<LogBitmap>::new(&**mem, chain.clone()),
                    Writer::<LogBitmap>::new(&**mem, chain),
                ) {
                    (Ok(mut reader), Ok(mut writer)) => {
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        self.device
                            .handle_request(index, mem, &mut reader, &mut writer)
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                        warn!(queue = index, head, "unreadable descriptor chain: {e}");
                        0
                    }
                };
                // A request that met lost memory read zeroes and wrote into
                // pages nobody shares any more: dropped, not answered.
                if self.unusable(&table) {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                vring
                    .get_mut()
                    .get_queue_mut()
                    .add_used(&**mem, head, used_len)
                    .map_err(io::Error::other)?;
            }
            self.note_ring_end(index, vring.queue_next_avail());
            if first_log_loss(mem) {
                error!(
                    "the front-end took the dirty log away (SIGBUS): pages {} writes are not \
                     logged any more, so a migration in progress will miss them",
                    self.device.name()
                );
            }
            let notify = vring
                .get_mut()
                .get_queue_mut()
                .needs_notification(&**mem)
                .map_err(io::Error::other)?;
            if self.unusable(&table) {
                return Ok(());
            }
            if notify {
                vring.signal_used_queue()?;
            }
            if !event_idx
                || !vring
                    .get_mut()
                    .get_queue_mut()
                    .enable_notification(&**mem)
                    .map_err(io::Error::other)?
            {
                return Ok(());
            }
        }
    }
}

impl<D: VirtioDevice> VhostUserBackend for DeviceBackend<D> {
    type Bitmap = LogBitmap;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.device.num_queues()
    }

    fn max_queue_size(&self) -> usize {
        self.device.max_queue_size() as usize
    }

    fn features(&self) -> u64 {
        // The transport features the glue and virtio-queue handle for every
        // model. QEMU's vhost-user-gpu forwards every feature the guest acked
        // (not only the backend's), and the crate refuses SET_FEATURES with a
        // bit the backend did not offer: offer what libvhost-user offers.
        self.device.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_F_NOTIFY_ON_EMPTY
            // Seen forwarded by QEMU 11.1 for a Linux 6.12 guest. No queue is
            // ever reset alone here: QEMU's vhost-user-gpu has no queue_reset.
            | 1 << VIRTIO_F_RING_RESET
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VHOST_F_LOG_ALL
    }

    fn acked_features(&self, features: u64) {
        debug!(features = format_args!("{features:#x}"), "features acked");
        let log_all = features & VHOST_F_LOG_ALL != 0;
        if self.log_all.swap(log_all, Ordering::AcqRel) != log_all {
            debug!(log_all, "dirty logging");
        }
        set_logging(&self.mem.memory(), log_all);
        self.device.ack_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        base_protocol_features()
    }

    fn reset_device(&self) {
        self.device.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.device.read_config(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.device.write_config(offset, buf)
    }

    /// Guards and checks the table the crate just installed (see
    /// [`super::guarded_memory`]); a refused table is not used by the queues
    /// until one that passes replaces it.
    fn update_memory(&self, mem: VhostMemoryAtomic) -> io::Result<()> {
        let snapshot = mem.memory().into_inner();
        set_logging(&snapshot, self.log_all.load(Ordering::Acquire));
        let mut current = self.guarded.lock().unwrap_or_else(|p| p.into_inner());
        let table = Arc::new(GuardedMemory::new(snapshot, &current));
        let refused = table.refused().map(|e| e.to_string());
        *current = table;
        drop(current);
        match refused {
            None => Ok(()),
            Some(reason) => {
                // The crate replies with an error and ends the connection.
                warn!("memory table refused: {reason}; the queues do not touch it");
                Err(io::Error::new(io::ErrorKind::InvalidInput, reason))
            }
        }
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the crate's vring threads never leave their
        // epoll loop, and dropping the daemon after a front-end leaves (to
        // serve the next one) would wait for them forever.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => {
                self.note_exit_consumer(&pair.0);
                Some(pair)
            }
            Err(e) => {
                warn!("exit event for a vring thread: {e}");
                None
            }
        }
    }

    fn set_gpu_socket(&self, gpu: GpuBackend) -> io::Result<()> {
        self.device.set_gpu_socket(gpu)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Ok(());
        };
        // An error here is the guest's (a ring outside memory, a looping chain):
        // logged, never returned, because the crate ends the vring thread on an
        // error and the device would stop for good.
        if let Err(e) = self.process_queue(device_event, vring) {
            warn!(
                queue = device_event,
                "{}: queue processing stopped: {e}",
                self.device.name()
            );
        }
        Ok(())
    }
}

/// Closes the exit events' consumer ends that the crate leaks: it registers
/// each with its epoll through `into_raw_fd` and never closes it
/// (vhost-user-backend 0.24, `VringEpollHandler::new`), one fd per vring thread
/// per front-end, until a front-end reconnecting in a loop fills the fd
/// table. The backend goes after the crate's vring threads and their epoll
/// (they hold it), so nothing uses those fds any more. Each is closed only if
/// it is still the eventfd we made — a marker written through our duplicate
/// is read back through it — so a crate that closes them itself one day is
/// not answered with a double close.
impl<D: VirtioDevice> Drop for DeviceBackend<D> {
    fn drop(&mut self) {
        const MARKER: u64 = 0x756d_6465_7600_0001;
        let consumers = std::mem::take(
            self.exit_consumers
                .get_mut()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (raw, ours) in consumers {
            let mut value = 0u64;
            // SAFETY: 8-byte reads and writes of local u64s on eventfds: ours
            // (owned, non-blocking like the crate's end: one open file), and
            // the number the crate was given, which is closed only once it is
            // shown to be that same eventfd.
            unsafe {
                libc::read(ours.as_raw_fd(), (&mut value as *mut u64).cast(), 8);
                libc::write(ours.as_raw_fd(), (&MARKER as *const u64).cast(), 8);
                let n = libc::read(raw, (&mut value as *mut u64).cast(), 8);
                if n == 8 && value == MARKER {
                    libc::close(raw);
                } else {
                    if n == 8 {
                        // Someone else's eventfd: its count goes back.
                        libc::write(raw, (&value as *const u64).cast(), 8);
                    }
                    libc::read(ours.as_raw_fd(), (&mut value as *mut u64).cast(), 8);
                }
            }
        }
    }
}

/// `VIRTIO_RING_F_EVENT_IDX` as a feature bit, for models that offer it.
pub const EVENT_IDX_FEATURE: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
