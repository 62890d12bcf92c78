//! [`DeviceBackend`]: a [`VirtioDevice`] dressed as a `vhost-user-backend`
//! backend. It owns what every virtio model would otherwise repeat: feature and
//! protocol negotiation, the dirty-log gate, popping descriptor chains,
//! used-ring updates and notification suppression (`VIRTIO_RING_F_EVENT_IDX`).
//!
//! A guest MMIO write reaches a model in four hops: the front-end's kick eventfd
//! wakes the crate's vring thread, which calls [`DeviceBackend::handle_event`],
//! which pops each chain and calls [`VirtioDevice::handle_request`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::GpuBackend;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_config::{
    VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::device::VirtioDevice;
use super::dirty_log::{set_logging, LogBitmap, VhostMemoryAtomic};

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
        }
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

    fn process_queue(&self, index: u16, vring: &VringRwLock<VhostMemoryAtomic>) -> io::Result<()> {
        let mem = self.mem.memory();
        self.note_ring_start(index, vring.queue_next_avail());
        loop {
            if self.event_idx.load(Ordering::Relaxed) {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let chains: Vec<_> = vring
                .get_mut()
                .get_queue_mut()
                .iter(mem.clone())
                .map_err(io::Error::other)?
                .collect();
            for chain in chains {
                let head = chain.head_index();
                let used_len = match (
                    Reader::<LogBitmap>::new(&*mem, chain.clone()),
                    Writer::<LogBitmap>::new(&*mem, chain),
                ) {
                    (Ok(mut reader), Ok(mut writer)) => {
                        self.stats.requests.fetch_add(1, Ordering::Relaxed);
                        self.device
                            .handle_request(index, &mem, &mut reader, &mut writer)
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                        warn!(queue = index, head, "unreadable descriptor chain: {e}");
                        0
                    }
                };
                vring.add_used(head, used_len).map_err(io::Error::other)?;
            }
            self.note_ring_end(index, vring.queue_next_avail());
            if vring.needs_notification().map_err(io::Error::other)? {
                vring.signal_used_queue()?;
            }
            if !self.event_idx.load(Ordering::Relaxed)
                || !vring.enable_notification().map_err(io::Error::other)?
            {
                return Ok(());
            }
        }
    }
}

impl<D: VirtioDevice> VhostUserBackend for DeviceBackend<D> {
    type Bitmap = LogBitmap;
    type Vring = VringRwLock<VhostMemoryAtomic>;

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

    fn update_memory(&self, mem: VhostMemoryAtomic) -> io::Result<()> {
        set_logging(&mem.memory(), self.log_all.load(Ordering::Acquire));
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the crate's vring threads never leave their
        // epoll loop, and dropping the daemon after a front-end leaves (to
        // serve the next one) would wait for them forever.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
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

/// `VIRTIO_RING_F_EVENT_IDX` as a feature bit, for models that offer it.
pub const EVENT_IDX_FEATURE: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
