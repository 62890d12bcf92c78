//! The null device: the smallest complete umdev device model, to copy when
//! writing a new one. Everything a model does is here once: a description
//! (IDs, one BAR, MSI-X), register reads and writes, an interrupt, a DMA
//! queued from a handler and finished in `dma_done`, reset, and state
//! save/restore.
//!
//! BAR0 (4 KiB of registers, 4-byte accesses):
//!
//! | offset | register | |
//! |---|---|---|
//! | 0x00 | ID | reads [`ID_VALUE`] |
//! | 0x04 | SCRATCH | read/write |
//! | 0x08 | DOORBELL | a write raises MSI-X vector 0 (INTx when MSI-X is off) |
//! | 0x10 | DMA_ADDR (64) | guest address for COPY |
//! | 0x18 | DMA_COPY | a write copies SCRATCH to guest memory at DMA_ADDR; reads 1 while under way |
//! | 0x1c | DMA_STATUS | 0 ok, 1 the last DMA failed |

use tracing::warn;
use umdev::memory::{GuestMemory, MemoryError};
use umdev::pci::{
    BarDef, BarIndex, DeviceContext, MsixLayout, PciDevice, PciDeviceDescription, PciError,
    PciFunction, PciIds,
};
use umdev::state::{StateError, StateReader, StateWriter};

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x0001;
pub const ID_VALUE: u32 = 0x6e75_6c6c; // "null"

pub mod reg {
    pub const ID: u64 = 0x00;
    pub const SCRATCH: u64 = 0x04;
    pub const DOORBELL: u64 = 0x08;
    pub const DMA_ADDR: u64 = 0x10;
    pub const DMA_COPY: u64 = 0x18;
    pub const DMA_STATUS: u64 = 0x1c;
}

/// What the device looks like on the bus.
pub fn description() -> PciDeviceDescription {
    PciDeviceDescription {
        ids: PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            class_code: 0xff_0000,
            interrupt_pin: 1,
            ..PciIds::default()
        },
        bars: PciDeviceDescription::only_bar0(BarDef::memory32(0x1000, false)),
        msix: Some(MsixLayout {
            vectors: 1,
            bar: 0,
            table_offset: 0x800,
            pba_offset: 0xc00,
        }),
        ..PciDeviceDescription::default()
    }
}

/// The device on `memory`, ready for `umdev::cli::run` or a `Server`.
pub fn new_function(memory: GuestMemory) -> Result<PciFunction, PciError> {
    PciFunction::new(description(), memory, |ctx| Box::new(Null::new(ctx)))
}

#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
struct Registers {
    scratch: u32,
    dma_addr: u64,
    dma_busy: bool,
    dma_failed: bool,
}

pub struct Null {
    regs: Registers,
    ctx: DeviceContext,
    /// Bumped by reset and restore: a DMA started before finishes into nothing.
    generation: u64,
}

impl Null {
    pub fn new(ctx: DeviceContext) -> Self {
        Null {
            regs: Registers::default(),
            ctx,
            generation: 0,
        }
    }

    fn interrupt(&self) {
        if self.ctx.irq.msix_enabled() {
            self.ctx.irq.notify(0);
        } else {
            // A pulse: edge semantics over a level line.
            self.ctx.irq.set_intx(true);
            self.ctx.irq.set_intx(false);
        }
    }

    /// Queued on the session (fd memory directly, fd-less by message), never
    /// blocking this handler; `dma_done` finishes it.
    fn start_dma(&mut self) {
        let bytes = self.regs.scratch.to_le_bytes();
        match self
            .ctx
            .dma
            .write(self.generation, self.regs.dma_addr, &bytes)
        {
            Ok(()) => self.regs.dma_busy = true,
            Err(e) => self.dma_finished(Err(e)),
        }
    }

    fn dma_finished(&mut self, result: Result<(), MemoryError>) {
        self.regs.dma_busy = false;
        self.regs.dma_failed = result.is_err();
        if let Err(e) = result {
            warn!("null: DMA failed: {e}");
        }
        self.interrupt();
    }
}

/// Layout version of section `NULL`: scratch u32, dma_addr u64, dma_busy
/// and dma_failed bools.
const STATE_VERSION: u32 = 1;

impl PciDevice for Null {
    fn bar_read(&mut self, _bar: BarIndex, offset: u64, data: &mut [u8]) {
        let value = match offset {
            reg::ID => ID_VALUE,
            reg::SCRATCH => self.regs.scratch,
            reg::DMA_ADDR => self.regs.dma_addr as u32,
            0x14 => (self.regs.dma_addr >> 32) as u32,
            reg::DMA_COPY => u32::from(self.regs.dma_busy),
            reg::DMA_STATUS => u32::from(self.regs.dma_failed),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        match offset {
            reg::SCRATCH => self.regs.scratch = value as u32,
            reg::DOORBELL => self.interrupt(),
            reg::DMA_ADDR if data.len() == 8 => self.regs.dma_addr = value,
            reg::DMA_ADDR => {
                self.regs.dma_addr = (self.regs.dma_addr & !0xffff_ffff) | (value & 0xffff_ffff)
            }
            0x14 => self.regs.dma_addr = (self.regs.dma_addr & 0xffff_ffff) | (value << 32),
            reg::DMA_COPY if !self.regs.dma_busy => self.start_dma(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.regs = Registers::default();
        self.generation += 1;
    }

    fn dma_done(&mut self, token: u64, result: Result<&[u8], MemoryError>) {
        if token == self.generation && self.regs.dma_busy {
            self.dma_finished(result.map(|_| ()));
        }
    }

    fn migratable(&self) -> bool {
        true
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        let mut w = StateWriter::new();
        w.section(b"NULL", STATE_VERSION, |s| {
            s.u32(self.regs.scratch);
            s.u64(self.regs.dma_addr);
            s.bool(self.regs.dma_busy);
            s.bool(self.regs.dma_failed);
        });
        Ok(w.finish())
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), StateError> {
        let mut r = StateReader::new(blob)?;
        let (_, mut s) = r.section(b"NULL", STATE_VERSION)?;
        let regs = Registers {
            scratch: s.u32()?,
            dma_addr: s.u64()?,
            dma_busy: s.bool()?,
            dma_failed: s.bool()?,
        };
        s.finish()?;
        r.finish()?;
        self.regs = regs;
        self.generation += 1;
        // A copy under way at the source runs again here (it is idempotent).
        if regs.dma_busy {
            self.start_dma();
        }
        Ok(())
    }
}
