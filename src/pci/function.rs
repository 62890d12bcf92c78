//! A PCI function: config space, capabilities, MSI-X table and interrupts around
//! a device model. The vfio-user session calls [`PciFunction::region_read`] and
//! [`PciFunction::region_write`]; they route to config space, the MSI-X table or
//! the model's BAR handlers.

use std::sync::{Arc, Mutex, Weak};

use tracing::{debug, trace};

use super::bar::{BarDef, BarError, BarIndex, NUM_BARS};
use super::capability::{self, CapabilityOffsets};
use super::config::{
    ConfigSpace, BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO,
    COMMAND_MEMORY, PCIE_CONFIG_SIZE, PCI_CONFIG_SIZE, STATUS, STATUS_INTERRUPT,
};
use super::device::{BarMapping, DeviceContext, PciDevice, PciDeviceDescription};
use super::irq::{InterruptHandle, Interrupts};
use super::msix::MsixTable;
use crate::memory::{DmaQueue, GuestMemory, MemoryError};
use crate::pagetrack::PageTracker;
use crate::state::{StateError, StateReader, StateWriter};

/// Layout versions of the function's state sections (see [`PciFunction::save`]).
const PCI_STATE_VERSION: u32 = 1;
const DMA_MAPS_VERSION: u32 = 1;
const MODEL_STATE_VERSION: u32 = 1;

/// A DMA region as a state snapshot records it (the fds are the client's:
/// the destination's client maps its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedDmaMap {
    pub gpa: u64,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    pub with_fd: bool,
}

/// The address spaces of a PCI function that a transport reaches: the six
/// BARs, the expansion ROM, config space and the legacy VGA ranges. (vfio
/// numbers them 0-5, 6, 7, 8; that numbering belongs to the transport.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    Bar(BarIndex),
    Rom,
    Config,
    Vga,
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("BAR{0} does not exist")]
    NoSuchBar(BarIndex),
    #[error("access {offset:#x}+{len} is outside {region:?} ({size:#x} bytes)")]
    OutOfRange {
        region: Region,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("invalid device description: BAR{bar}: {source}")]
    BarInvalid {
        bar: BarIndex,
        #[source]
        source: BarError,
    },
    #[error("invalid device description: 64-bit BAR{bar} needs BAR{} free", .bar + 1)]
    Bar64NeedsNext { bar: BarIndex },
    #[error("invalid device description: {vectors} MSI vectors, at most 32")]
    TooManyMsiVectors { vectors: u32 },
    #[error("invalid device description: MSI-X BAR{bar} is not implemented")]
    MsixBarMissing { bar: BarIndex },
    #[error("invalid device description: MSI-X needs 1 to 2048 vectors, not {vectors}")]
    MsixVectors { vectors: u16 },
    #[error(
        "invalid device description: MSI-X table ({table_offset:#x}) and PBA \
         ({pba_offset:#x}) must be 8-byte aligned"
    )]
    MsixAlignment { table_offset: u64, pba_offset: u64 },
    #[error(
        "invalid device description: MSI-X table ({table_offset:#x}+{table_size:#x}) or PBA \
         ({pba_offset:#x}+{pba_size:#x}) outside BAR{bar} ({bar_size:#x} bytes)"
    )]
    MsixOutsideBar {
        bar: BarIndex,
        bar_size: u64,
        table_offset: u64,
        table_size: u64,
        pba_offset: u64,
        pba_size: u64,
    },
    #[error(
        "invalid device description: MSI-X table ({table_offset:#x}+{table_size:#x}) and PBA \
         ({pba_offset:#x}+{pba_size:#x}) overlap"
    )]
    MsixOverlap {
        table_offset: u64,
        table_size: u64,
        pba_offset: u64,
        pba_size: u64,
    },
    #[error("invalid device description: capabilities do not fit in config space")]
    CapabilitiesFull,
}

/// What DEVICE_GET_REGION_INFO reports for a region.
#[derive(Clone, Debug, Default)]
pub struct RegionDescription {
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    pub mapping: Option<BarMapping>,
}

pub struct PciFunction {
    description: PciDeviceDescription,
    config: ConfigSpace,
    power_on_config: ConfigSpace,
    caps: CapabilityOffsets,
    msix: Option<MsixTable>,
    irq: InterruptHandle,
    memory: GuestMemory,
    dma: DmaQueue,
    page_tracker: PageTracker,
    device: Box<dyn PciDevice>,
    counts: AccessCounts,
}

/// Guest accesses a function served, for the metrics endpoint. Plain
/// numbers: only the thread holding the function counts, and the endpoint
/// reads them under the same lock, so the trapped-access path pays no atomic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessCounts {
    /// Per region (BAR 0-5, ROM, config, VGA).
    pub reads: [u64; 9],
    pub writes: [u64; 9],
    /// Writes the client posted (sent without waiting for a reply).
    pub posted_writes: u64,
}

/// The label of a region's counters.
const REGION_NAMES: [&str; 9] = [
    "bar0", "bar1", "bar2", "bar3", "bar4", "bar5", "rom", "config", "vga",
];

fn region_slot(region: Region) -> usize {
    match region {
        Region::Bar(b) => b.min(5),
        Region::Rom => 6,
        Region::Config => 7,
        Region::Vga => 8,
    }
}

/// Everything a function counts, as one metrics source: its accesses, its
/// guest memory's DMA, its page tracker, its model's own.
pub struct FunctionMetrics {
    function: Weak<Mutex<PciFunction>>,
    memory: GuestMemory,
    tracker: PageTracker,
    model: Option<Arc<dyn crate::metrics::MetricsSource>>,
}

impl FunctionMetrics {
    /// The metrics of the function a server serves.
    pub fn source_for(
        function: &Arc<Mutex<PciFunction>>,
    ) -> Arc<dyn crate::metrics::MetricsSource> {
        let f = function.lock().unwrap_or_else(|p| p.into_inner());
        Arc::new(FunctionMetrics {
            function: Arc::downgrade(function),
            memory: f.memory.clone(),
            tracker: f.page_tracker.clone(),
            model: f.device.metrics(),
        })
    }
}

impl crate::metrics::MetricsSource for FunctionMetrics {
    fn write_metrics(&self, w: &mut crate::metrics::MetricsWriter) {
        let Some(function) = self.function.upgrade() else {
            return;
        };
        let counts = function.lock().unwrap_or_else(|p| p.into_inner()).counts;
        let per_region = |a: &[u64; 9]| -> Vec<(&str, u64)> {
            REGION_NAMES
                .iter()
                .copied()
                .zip(a.iter().copied())
                .collect()
        };
        w.counters(
            "umdev_region_reads_total",
            "Trapped guest reads (REGION_READ) per region.",
            "region",
            &per_region(&counts.reads),
        );
        w.counters(
            "umdev_region_writes_total",
            "Trapped guest writes (REGION_WRITE, WRITE_MULTI entries) per region.",
            "region",
            &per_region(&counts.writes),
        );
        w.counter(
            "umdev_posted_writes_total",
            "Writes the client sent without waiting for a reply.",
            counts.posted_writes,
        );
        self.memory.write_metrics(w);
        let t = self.tracker.counters();
        let source = t
            .source
            .map_or("none".into(), |k| format!("{k:?}").to_lowercase());
        w.gauge(
            "umdev_pagetrack_pages_tracked",
            "Guest pages write-tracked now.",
            t.pages_tracked,
        );
        w.counters(
            "umdev_pagetrack_syncs_total",
            "Sync points of the page tracker, by write source.",
            "source",
            &[(source.as_str(), t.syncs)],
        );
        w.counter(
            "umdev_pagetrack_pages_compared_total",
            "Tracked pages compared with their snapshot at sync points.",
            t.pages_compared,
        );
        w.counter(
            "umdev_pagetrack_track_writes_total",
            "track_write notifications (changed 8-byte entries) delivered.",
            t.entries_changed,
        );
        w.counter(
            "umdev_pagetrack_uffd_faults_total",
            "Write faults the userfaultfd source resolved.",
            t.faults,
        );
        if let Some(m) = &self.model {
            m.write_metrics(w);
        }
    }
}

impl PciFunction {
    /// Builds the function for `description`; `make` creates the model with its context.
    pub fn new(
        description: PciDeviceDescription,
        memory: GuestMemory,
        make: impl FnOnce(DeviceContext) -> Box<dyn PciDevice>,
    ) -> Result<Self, PciError> {
        validate(&description)?;
        let size = if description.pcie {
            PCIE_CONFIG_SIZE
        } else {
            PCI_CONFIG_SIZE
        };
        let mut config = ConfigSpace::new(size, &description.ids, &description.bars);
        let full = || PciError::CapabilitiesFull;
        let mut caps = CapabilityOffsets::default();
        if description.power_management {
            caps.pm = Some(capability::add_pm(&mut config).ok_or_else(full)?);
        }
        if description.msi_vectors > 0 {
            caps.msi =
                Some(capability::add_msi(&mut config, description.msi_vectors).ok_or_else(full)?);
        }
        if let Some(layout) = &description.msix {
            caps.msix = Some(capability::add_msix(&mut config, layout).ok_or_else(full)?);
        }
        if description.pcie {
            caps.pcie = Some(capability::add_pcie_endpoint(&mut config).ok_or_else(full)?);
        }
        let msi_vectors = description.msi_vectors.max(1).next_power_of_two();
        let irq = Interrupts::new(
            if description.msi_vectors > 0 {
                msi_vectors
            } else {
                0
            },
            description.msix.map_or(0, |m| u32::from(m.vectors)),
        );
        let page_tracker = PageTracker::with_source(
            memory.clone(),
            description.page_track_source,
            description.page_track_policy,
        );
        let dma = DmaQueue::default();
        let device = make(DeviceContext {
            memory: memory.clone(),
            dma: dma.clone(),
            irq: irq.clone(),
            page_tracker: page_tracker.clone(),
        });
        Ok(PciFunction {
            msix: description.msix.map(MsixTable::new),
            power_on_config: config.clone(),
            config,
            caps,
            irq,
            memory,
            dma,
            page_tracker,
            device,
            description,
            counts: AccessCounts::default(),
        })
    }

    pub fn description(&self) -> &PciDeviceDescription {
        &self.description
    }

    pub fn interrupts(&self) -> &InterruptHandle {
        &self.irq
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The model's queue of deferred DMA, which the session executes.
    pub fn dma_queue(&self) -> &DmaQueue {
        &self.dma
    }

    /// Hands a finished queued transfer to the model.
    pub fn dma_done(&mut self, token: u64, result: Result<&[u8], MemoryError>) {
        self.device.dma_done(token, result);
    }

    pub fn page_tracker(&self) -> &PageTracker {
        &self.page_tracker
    }

    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// What `region` is: size, access, directly mappable parts.
    pub fn region(&self, region: Region) -> Result<RegionDescription, PciError> {
        match region {
            Region::Bar(i) if i < NUM_BARS => Ok(match self.bar_def(i) {
                Some(def) => RegionDescription {
                    size: def.size,
                    readable: true,
                    writable: true,
                    mapping: self.device.bar_mapping(i),
                },
                None => RegionDescription::default(),
            }),
            Region::Bar(i) => Err(PciError::NoSuchBar(i)),
            Region::Rom | Region::Vga => Ok(RegionDescription::default()),
            Region::Config => Ok(RegionDescription {
                size: self.config.size() as u64,
                readable: true,
                writable: true,
                mapping: None,
            }),
        }
    }

    /// The BAR whose register is `index` (the upper half of a 64-bit BAR is none).
    fn bar_def(&self, index: BarIndex) -> Option<BarDef> {
        self.description.bars.get(index).copied().flatten()
    }

    /// Size of region `index`, without building its full description (the access
    /// path runs this for every REGION_READ/WRITE).
    fn region_size(&self, region: Region) -> Result<u64, PciError> {
        match region {
            Region::Bar(i) if i < NUM_BARS => Ok(self.bar_def(i).map_or(0, |d| d.size)),
            Region::Bar(i) => Err(PciError::NoSuchBar(i)),
            Region::Rom | Region::Vga => Ok(0),
            Region::Config => Ok(self.config.size() as u64),
        }
    }

    fn check(&self, region: Region, offset: u64, len: usize) -> Result<(), PciError> {
        let size = self.region_size(region)?;
        if offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size)
            && len > 0
        {
            Ok(())
        } else {
            Err(PciError::OutOfRange {
                region,
                offset,
                len,
                size,
            })
        }
    }

    /// A guest (client) read of `data.len()` bytes at `offset` in `region`.
    pub fn region_read(
        &mut self,
        region: Region,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), PciError> {
        self.check(region, offset, data.len())?;
        self.counts.reads[region_slot(region)] += 1;
        let bar = match region {
            Region::Bar(bar) => bar,
            Region::Config => {
                self.config.read(offset as usize, data);
                self.overlay_dynamic_config(offset as usize, data);
                return Ok(());
            }
            // Empty: `check` refused every access.
            Region::Rom | Region::Vga => return Ok(()),
        };
        if !self.decodes(bar) {
            trace!(bar, offset, "read with decoding disabled: all ones");
            data.fill(0xff);
            return Ok(());
        }
        if let Some(msix) = &self.msix {
            if let Some(part) = msix.claims(bar, offset, data.len()) {
                msix.read(part, offset, data, &self.irq);
                return Ok(());
            }
        }
        self.device.bar_read(bar, offset, data);
        Ok(())
    }

    /// A guest (client) write at `offset` in `region`.
    pub fn region_write(
        &mut self,
        region: Region,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PciError> {
        self.check(region, offset, data.len())?;
        self.counts.writes[region_slot(region)] += 1;
        let bar = match region {
            Region::Bar(bar) => bar,
            Region::Config => {
                self.config.write(offset as usize, data);
                self.config_written(offset as usize, data.len());
                return Ok(());
            }
            Region::Rom | Region::Vga => return Ok(()),
        };
        if !self.decodes(bar) {
            debug!(bar, offset, "write with decoding disabled dropped");
            return Ok(());
        }
        if let Some(msix) = &mut self.msix {
            if let Some(part) = msix.claims(bar, offset, data.len()) {
                msix.write(part, offset, data, &self.irq);
                return Ok(());
            }
        }
        self.device.bar_write(bar, offset, data);
        Ok(())
    }

    /// Whether the command register lets the BAR decode accesses.
    fn decodes(&self, bar: BarIndex) -> bool {
        let enable = match self.bar_def(bar) {
            Some(def) if def.is_io() => COMMAND_IO,
            _ => COMMAND_MEMORY,
        };
        self.config.command() & enable != 0
    }

    /// Status register Interrupt Status follows the INTx line.
    fn overlay_dynamic_config(&self, offset: usize, data: &mut [u8]) {
        let status_byte = STATUS;
        if (offset..offset + data.len()).contains(&status_byte) {
            let byte = &mut data[status_byte - offset];
            if self.irq.intx_level() {
                *byte |= STATUS_INTERRUPT as u8;
            } else {
                *byte &= !(STATUS_INTERRUPT as u8);
            }
        }
    }

    /// Reacts to a config write that touched `[offset, offset+len)`.
    fn config_written(&mut self, offset: usize, len: usize) {
        let touched = |at: usize, size: usize| offset < at + size && offset + len > at;
        if touched(COMMAND, 2) {
            let cmd = self.config.command();
            self.memory.set_bus_master(cmd & COMMAND_BUS_MASTER != 0);
            self.irq
                .update_intx_disable(cmd & COMMAND_INTX_DISABLE != 0);
        }
        if let Some(at) = self.caps.msi {
            if touched(at + 2, 2) {
                let (enabled, vectors) = capability::msi_state(&self.config, at);
                self.irq.update_msi(enabled, vectors);
            }
        }
        if let Some(at) = self.caps.msix {
            if touched(at + 2, 2) {
                let (enabled, masked) = capability::msix_state(&self.config, at);
                self.irq.update_msix(enabled, masked);
            }
        }
        if touched(BAR0, 24) {
            trace!("BAR registers written");
        }
    }

    /// The function's state for migration (`umdev::state` layout), taken with
    /// the device quiescent. Sections, in order:
    /// - `PCIF` v1: config space (bytes); whether there is an MSI-X table
    ///   (bool) and its entries (count, then 4 u32 each); the interrupt
    ///   state (`Interrupts::save`).
    /// - `DMAM` v1: the DMA regions (count, then gpa u64, size u64,
    ///   readable, writable, with_fd as bools).
    /// - `DEVM` v1: the model's own blob (bytes, [`PciDevice::save`]).
    pub fn save(&self) -> Result<Vec<u8>, StateError> {
        let model = self.device.save()?;
        let mut w = StateWriter::new();
        self.save_framework(&mut w);
        w.section(b"DMAM", DMA_MAPS_VERSION, |s| {
            let maps = self.dma_maps();
            s.u64(maps.len() as u64);
            for m in maps {
                s.u64(m.gpa);
                s.u64(m.size);
                s.bool(m.readable);
                s.bool(m.writable);
                s.bool(m.with_fd);
            }
        });
        w.section(b"DEVM", MODEL_STATE_VERSION, |s| s.bytes(&model));
        Ok(w.finish())
    }

    fn save_framework(&self, w: &mut StateWriter) {
        w.section(b"PCIF", PCI_STATE_VERSION, |s| {
            s.bytes(self.config.bytes());
            s.bool(self.msix.is_some());
            if let Some(msix) = &self.msix {
                msix.save(s);
            }
            self.irq.save(s);
        });
    }

    /// The DMA regions in force now.
    pub fn dma_maps(&self) -> Vec<SavedDmaMap> {
        self.memory.with_regions(|r| {
            r.iter()
                .map(|m| SavedDmaMap {
                    gpa: m.gpa,
                    size: m.size,
                    readable: m.readable,
                    writable: m.writable,
                    with_fd: matches!(m.backing, crate::memory::RegionBacking::Mapped(_)),
                })
                .collect()
        })
    }

    /// Takes a state [`save`](Self::save) made (on this process or another)
    /// into this function, built from the same description. Returns the DMA
    /// regions the source had, for the caller to compare with what its
    /// client mapped. A blob that does not read, or does not fit this device,
    /// is an error and changes nothing.
    pub fn restore(&mut self, blob: &[u8]) -> Result<Vec<SavedDmaMap>, StateError> {
        let mut r = StateReader::new(blob)?;
        let undo = {
            let mut w = StateWriter::new();
            self.save_framework(&mut w);
            w.finish()
        };
        self.restore_framework(&mut r)?;
        let parsed = (|| {
            let (_, mut s) = r.section(b"DMAM", DMA_MAPS_VERSION)?;
            let n = s.count(19)?;
            let mut maps = Vec::with_capacity(n);
            for _ in 0..n {
                maps.push(SavedDmaMap {
                    gpa: s.u64()?,
                    size: s.u64()?,
                    readable: s.bool()?,
                    writable: s.bool()?,
                    with_fd: s.bool()?,
                });
            }
            s.finish()?;
            let (_, mut s) = r.section(b"DEVM", MODEL_STATE_VERSION)?;
            let model = s.bytes()?;
            s.finish()?;
            r.finish()?;
            Ok::<_, StateError>((maps, model))
        })();
        let result = parsed.and_then(|(maps, model)| {
            self.device.restore(model)?;
            Ok(maps)
        });
        if result.is_err() {
            let mut u = StateReader::new(&undo).expect("our own blob");
            self.restore_framework(&mut u)
                .expect("our own blob restores");
        }
        result
    }

    fn restore_framework(&mut self, r: &mut StateReader<'_>) -> Result<(), StateError> {
        let (_, mut s) = r.section(b"PCIF", PCI_STATE_VERSION)?;
        let config = s.bytes()?;
        if config.len() != self.config.size() {
            return Err(StateError::Invalid("config space of another size"));
        }
        if s.bool()? != self.msix.is_some() {
            return Err(StateError::Invalid("MSI-X presence differs"));
        }
        // All of it is read before any of it is applied (the MSI-X table and
        // the interrupts each parse fully before they change).
        let mut msix = self.msix.clone();
        if let Some(m) = &mut msix {
            m.restore(&mut s)?;
        }
        let irq = self.irq.parse_state(&mut s)?;
        s.finish()?;
        self.irq.apply(irq);
        self.config = self.power_on_config.clone();
        self.config.restore_writable(config);
        self.msix = msix;
        let cmd = self.config.command();
        self.memory.set_bus_master(cmd & COMMAND_BUS_MASTER != 0);
        Ok(())
    }

    /// The guest accesses served so far.
    pub fn counts(&self) -> AccessCounts {
        self.counts
    }

    /// Counts a write the client posted (the server knows, the function not).
    pub fn count_posted_write(&mut self) {
        self.counts.posted_writes += 1;
    }

    /// Whether the model can save and restore its state (migration).
    pub fn migratable(&self) -> bool {
        self.device.migratable()
    }

    /// Stops the model's own work for migration ([`PciDevice::quiesce`]).
    pub fn quiesce(&mut self) {
        self.device.quiesce();
    }

    /// Lets the model run again ([`PciDevice::resume`]).
    pub fn resume(&mut self) {
        self.device.resume();
    }

    /// Power-on state for everything: config space, MSI-X table, interrupt masks,
    /// bus mastering, and the model.
    pub fn reset(&mut self) {
        self.config = self.power_on_config.clone();
        if let Some(msix) = &mut self.msix {
            msix.reset();
        }
        self.memory.set_bus_master(false);
        self.irq.reset();
        self.device.reset();
        self.page_tracker.reset();
    }
}

fn validate(d: &PciDeviceDescription) -> Result<(), PciError> {
    for (i, bar) in d.bars.iter().enumerate() {
        let Some(bar) = bar else { continue };
        bar.validate()
            .map_err(|source| PciError::BarInvalid { bar: i, source })?;
        if let super::bar::BarKind::Memory64 { .. } = bar.kind {
            if i == NUM_BARS - 1 || d.bars[i + 1].is_some() {
                return Err(PciError::Bar64NeedsNext { bar: i });
            }
        }
    }
    if d.msi_vectors > 32 {
        return Err(PciError::TooManyMsiVectors {
            vectors: d.msi_vectors,
        });
    }
    if let Some(m) = &d.msix {
        let Some(bar) = d.bars.get(m.bar).copied().flatten() else {
            return Err(PciError::MsixBarMissing { bar: m.bar });
        };
        if m.vectors == 0 || m.vectors > 2048 {
            return Err(PciError::MsixVectors { vectors: m.vectors });
        }
        if m.table_offset % 8 != 0 || m.pba_offset % 8 != 0 {
            return Err(PciError::MsixAlignment {
                table_offset: m.table_offset,
                pba_offset: m.pba_offset,
            });
        }
        let (table_size, pba_size) = (m.table_size(), m.pba_size());
        let inside = |at: u64, size: u64| at.checked_add(size).is_some_and(|end| end <= bar.size);
        if !inside(m.table_offset, table_size) || !inside(m.pba_offset, pba_size) {
            return Err(PciError::MsixOutsideBar {
                bar: m.bar,
                bar_size: bar.size,
                table_offset: m.table_offset,
                table_size,
                pba_offset: m.pba_offset,
                pba_size,
            });
        }
        let overlap =
            m.table_offset < m.pba_offset + pba_size && m.pba_offset < m.table_offset + table_size;
        if overlap {
            return Err(PciError::MsixOverlap {
                table_offset: m.table_offset,
                table_size,
                pba_offset: m.pba_offset,
                pba_size,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::capability::MsixLayout;

    fn with_bar0(bar0: BarDef) -> PciDeviceDescription {
        PciDeviceDescription {
            bars: PciDeviceDescription::only_bar0(bar0),
            ..PciDeviceDescription::default()
        }
    }

    fn with_msix(vectors: u16, table_offset: u64, pba_offset: u64) -> PciDeviceDescription {
        PciDeviceDescription {
            msix: Some(MsixLayout {
                vectors,
                bar: 0,
                table_offset,
                pba_offset,
            }),
            ..with_bar0(BarDef::memory32(0x1000, false))
        }
    }

    #[test]
    fn descriptions_are_refused_with_what_is_wrong() {
        let err = validate(&with_bar0(BarDef::io(0x300))).unwrap_err();
        assert!(matches!(
            err,
            PciError::BarInvalid {
                bar: 0,
                source: BarError::NotPowerOfTwo { size: 0x300 }
            }
        ));
        assert_eq!(
            err.to_string(),
            "invalid device description: BAR0: BAR size 0x300 is not a power of two"
        );
        assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<BarError>()));
        assert!(matches!(
            validate(&with_bar0(BarDef::io(0x2_0000))),
            Err(PciError::BarInvalid {
                source: BarError::IoSize { size: 0x2_0000 },
                ..
            })
        ));
        assert!(matches!(
            validate(&with_bar0(BarDef::memory32(8, false))),
            Err(PciError::BarInvalid {
                source: BarError::Memory32Size { size: 8 },
                ..
            })
        ));
        assert!(matches!(
            validate(&with_bar0(BarDef::memory64(1 << 63, true))),
            Err(PciError::BarInvalid {
                source: BarError::Memory64Size { .. },
                ..
            })
        ));

        let mut d = with_bar0(BarDef::memory64(0x1000, false));
        validate(&d).unwrap();
        d.bars[1] = Some(BarDef::io(4));
        let err = validate(&d).unwrap_err();
        assert!(matches!(err, PciError::Bar64NeedsNext { bar: 0 }));
        assert_eq!(
            err.to_string(),
            "invalid device description: 64-bit BAR0 needs BAR1 free"
        );
        let mut d = PciDeviceDescription::default();
        d.bars[NUM_BARS - 1] = Some(BarDef::memory64(0x1000, false));
        assert!(matches!(
            validate(&d),
            Err(PciError::Bar64NeedsNext { bar: 5 })
        ));

        let d = PciDeviceDescription {
            msi_vectors: 33,
            ..PciDeviceDescription::default()
        };
        let err = validate(&d).unwrap_err();
        assert!(matches!(err, PciError::TooManyMsiVectors { vectors: 33 }));
        assert_eq!(
            err.to_string(),
            "invalid device description: 33 MSI vectors, at most 32"
        );
    }

    #[test]
    fn msix_layouts_are_refused_with_what_is_wrong() {
        validate(&with_msix(8, 0, 0x800)).unwrap();
        let d = PciDeviceDescription {
            msix: Some(MsixLayout {
                vectors: 1,
                bar: 2,
                table_offset: 0,
                pba_offset: 0x800,
            }),
            ..with_bar0(BarDef::memory32(0x1000, false))
        };
        assert!(matches!(
            validate(&d),
            Err(PciError::MsixBarMissing { bar: 2 })
        ));
        assert!(matches!(
            validate(&with_msix(0, 0, 0x800)),
            Err(PciError::MsixVectors { vectors: 0 })
        ));
        assert!(matches!(
            validate(&with_msix(2049, 0, 0x800)),
            Err(PciError::MsixVectors { vectors: 2049 })
        ));
        assert!(matches!(
            validate(&with_msix(8, 4, 0x800)),
            Err(PciError::MsixAlignment {
                table_offset: 4,
                pba_offset: 0x800
            })
        ));
        let err = validate(&with_msix(8, 0xf88, 0x800)).unwrap_err();
        assert!(matches!(
            err,
            PciError::MsixOutsideBar {
                bar: 0,
                bar_size: 0x1000,
                table_offset: 0xf88,
                table_size: 0x80,
                ..
            }
        ));
        assert_eq!(
            err.to_string(),
            "invalid device description: MSI-X table (0xf88+0x80) or PBA (0x800+0x8) \
             outside BAR0 (0x1000 bytes)"
        );
        let err = validate(&with_msix(8, 0, 0x78)).unwrap_err();
        assert!(matches!(
            err,
            PciError::MsixOverlap {
                table_offset: 0,
                table_size: 0x80,
                pba_offset: 0x78,
                pba_size: 8
            }
        ));
        assert_eq!(
            err.to_string(),
            "invalid device description: MSI-X table (0x0+0x80) and PBA (0x78+0x8) overlap"
        );
    }
}
