//! The seam between the framework and a device model.
//!
//! A model describes itself once ([`PciDeviceDescription`]), then handles BAR
//! accesses and resets ([`PciDevice`]). What it needs from the outside world comes
//! in a [`DeviceContext`]: guest memory (DMA, gated by Bus Master Enable) and its
//! interrupts. It never sees sockets or wire structs.

use std::fs::File;
use std::sync::Arc;

use super::bar::{BarDef, BarIndex, NUM_BARS};
use super::capability::MsixLayout;
use super::config::PciIds;
use super::irq::InterruptHandle;
use crate::memory::{DmaQueue, GuestMemory, MemoryError};
use crate::pagetrack::{PageTracker, Policy, SourceKind};
use crate::state::StateError;

/// Everything about a device that does not change while it runs.
#[derive(Clone, Debug, Default)]
pub struct PciDeviceDescription {
    pub ids: PciIds,
    pub bars: [Option<BarDef>; NUM_BARS],
    /// MSI vectors offered (0: no MSI capability).
    pub msi_vectors: u32,
    pub msix: Option<MsixLayout>,
    /// Adds a PCI Express endpoint capability and a 4 KiB config space.
    pub pcie: bool,
    /// Adds a Power Management capability.
    pub power_management: bool,
    /// How the device's page tracker detects guest writes.
    pub page_track_source: SourceKind,
    pub page_track_policy: Policy,
}

impl PciDeviceDescription {
    /// The BAR table of a device with one BAR, BAR0 (the common small case).
    pub fn only_bar0(bar0: BarDef) -> [Option<BarDef>; NUM_BARS] {
        let mut bars = [None; NUM_BARS];
        bars[0] = Some(bar0);
        bars
    }
}

/// What a device model gets to reach the world.
#[derive(Clone)]
pub struct DeviceContext {
    pub memory: GuestMemory,
    /// DMA started from an access handler, finished later by the session with
    /// [`PciDevice::dma_done`] (no worker thread needed; see `memory::queue`).
    pub dma: DmaQueue,
    pub irq: InterruptHandle,
    /// Write tracking of guest pages (KVM page-track semantics).
    pub page_tracker: PageTracker,
}

/// Part of a BAR the guest maps directly (sparse mmap): backend memory behind an
/// fd, touched without a trap.
#[derive(Clone, Debug)]
pub struct BarMapping {
    pub file: Arc<File>,
    /// Offset of the BAR's first byte in `file`.
    pub file_offset: u64,
    /// (offset, size) pairs within the BAR that may be mapped.
    pub areas: Vec<(u64, u64)>,
}

/// A PCI device model.
///
/// Accesses arrive already checked against the BAR's size; the MSI-X table and
/// PBA are handled by the framework and never reach the model. Methods run on the
/// session thread and must not wait for work of the device's own threads that may
/// in turn wait for the session (DMA by message does): hand such work off.
pub trait PciDevice: Send {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]);
    /// Return to power-on state (DEVICE_RESET, or the client went away).
    fn reset(&mut self);
    /// A transfer queued on [`DeviceContext::dma`] finished: `Ok` carries the
    /// bytes read (empty for a write). Runs on the session thread like the
    /// access handlers. Transfers still under way when the client leaves are
    /// dropped without a call (the device is reset then).
    fn dma_done(&mut self, _token: u64, _result: Result<&[u8], MemoryError>) {}
    /// Directly mappable parts of a BAR, if any.
    fn bar_mapping(&self, _bar: BarIndex) -> Option<BarMapping> {
        None
    }
    /// The model's state, for migration: a versioned blob of the model's own
    /// layout (`umdev::state`). Called with the device quiescent (no access
    /// in flight); work the device still has under way is finished first or
    /// saved so that the restored device carries it on. Guest memory is not
    /// part of it, and nothing derived from guest memory needs to be (the
    /// restored device rebuilds such things from guest memory). A device
    /// that cannot save says [`StateError::Unsupported`].
    fn save(&self) -> Result<Vec<u8>, StateError> {
        Err(StateError::Unsupported)
    }
    /// Takes the state [`save`](Self::save) made, into a device just built
    /// (or reset). The blob may come from anywhere: a bad one is an error
    /// and leaves the device as it was.
    fn restore(&mut self, _blob: &[u8]) -> Result<(), StateError> {
        Err(StateError::Unsupported)
    }
    /// Whether [`save`](Self::save) and [`restore`](Self::restore) work, so
    /// that the device may offer migration to its client.
    fn migratable(&self) -> bool {
        false
    }
    /// The VMM stops the device for migration: finish the work under way
    /// (a submission, an engine's queue) so that no interrupt, DMA or state
    /// change happens after this returns. The framework sends no BAR access
    /// and starts no queued DMA until [`resume`](Self::resume).
    fn quiesce(&mut self) {}
    /// The device runs again after [`quiesce`](Self::quiesce) (the migration
    /// was cancelled, or this is the destination).
    fn resume(&mut self) {}
    /// The model's own counters for `--metrics` (fences, faults, ...), if it
    /// keeps any.
    fn metrics(&self) -> Option<std::sync::Arc<dyn crate::metrics::MetricsSource>> {
        None
    }
}
