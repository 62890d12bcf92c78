//! QEMU's educational `edu` device (docs/specs/edu.rst), register for register,
//! so one guest program gives the same answers on QEMU's `-device edu` and here.
//!
//! Differences, all on paths where QEMU misbehaves: a DMA whose device-side range
//! leaves the 4 KiB buffer is refused (QEMU logs it and copies out of bounds), and
//! a reset returns every register to power-on state (QEMU's edu has no reset).
//!
//! The model runs entirely on the session thread and starts no thread of its
//! own. QEMU computes the factorial on a thread because its loop runs n times;
//! here it takes at most 34 steps (see [`factorial`]). The DMA engine queues its
//! transfer on the device's DMA queue: the session performs it right after the
//! access that started it and hands the result back ([`PciDevice::dma_done`]);
//! a transfer through DMA_READ/DMA_WRITE messages never blocks the session
//! thread that carries its reply, and wakes no thread.

use tracing::{debug, warn};
use umdev::memory::{GuestMemory, MemoryError};
use umdev::pci::{
    BarDef, BarIndex, DeviceContext, PciDevice, PciDeviceDescription, PciError, PciFunction, PciIds,
};
use umdev::state::{StateError, StateReader, StateWriter};

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x11e8;
pub const BAR0_SIZE: u64 = 1 << 20;
pub const DEFAULT_DMA_BITS: u32 = 28;

/// Register offsets in BAR0.
pub mod reg {
    pub const ID: u64 = 0x00;
    pub const LIVENESS: u64 = 0x04;
    pub const FACTORIAL: u64 = 0x08;
    pub const STATUS: u64 = 0x20;
    pub const IRQ_STATUS: u64 = 0x24;
    pub const IRQ_RAISE: u64 = 0x60;
    pub const IRQ_ACK: u64 = 0x64;
    pub const DMA_SRC: u64 = 0x80;
    pub const DMA_DST: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_CMD: u64 = 0x98;
}

/// Identification: major 1, minor 0.
pub const ID_VALUE: u32 = 0x0100_00ed;
pub const STATUS_COMPUTING: u32 = 0x01;
pub const STATUS_IRQ_FACT: u32 = 0x80;
pub const FACT_IRQ: u32 = 0x001;
pub const DMA_IRQ: u32 = 0x100;
pub const DMA_CMD_RUN: u64 = 0x1;
/// Direction bit: clear = RAM to device buffer, set = device buffer to RAM.
pub const DMA_CMD_TO_RAM: u64 = 0x2;
pub const DMA_CMD_IRQ: u64 = 0x4;
/// Device-side address of the DMA buffer, and its size.
pub const DMA_BUF_ADDR: u64 = 0x40000;
pub const DMA_BUF_SIZE: usize = 4096;

/// The device's PCI description: QEMU's IDs, a 1 MiB BAR0, one MSI vector, INTA.
pub fn description() -> PciDeviceDescription {
    PciDeviceDescription {
        ids: PciIds {
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 0x10,
            // Base class 0x00, subclass 0xff ("unclassified"), as QEMU's edu.
            class_code: 0x00ff00,
            interrupt_pin: 1,
        },
        bars: PciDeviceDescription::only_bar0(BarDef::memory32(BAR0_SIZE, false)),
        msi_vectors: 1,
        msix: None,
        pcie: false,
        power_management: false,
        ..Default::default()
    }
}

/// A PCI function carrying an `edu` whose DMA engine drives `dma_bits` address bits.
pub fn new_function(memory: GuestMemory, dma_bits: u32) -> Result<PciFunction, PciError> {
    PciFunction::new(description(), memory, |ctx| {
        Box::new(Edu::new(ctx, dma_bits))
    })
}

/// Why an edu DMA failed (logged; edu has no error register, as QEMU's).
#[derive(Debug, thiserror::Error)]
enum EduDmaError {
    #[error("device range {addr:#x}+{count:#x} is outside the DMA buffer")]
    OutsideBuffer { addr: u64, count: u64 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

#[derive(Clone)]
struct Registers {
    liveness: u32,
    factorial: u32,
    status: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_count: u64,
    dma_cmd: u64,
    dma_buf: Box<[u8; DMA_BUF_SIZE]>,
    /// Bumped by reset, so work started before it does not land after it.
    generation: u64,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            liveness: 0,
            factorial: 0,
            status: 0,
            irq_status: 0,
            dma_src: 0,
            dma_dst: 0,
            dma_count: 0,
            dma_cmd: 0,
            dma_buf: Box::new([0; DMA_BUF_SIZE]),
            generation: 0,
        }
    }
}

/// The `edu` device model. Everything runs on the session thread: the factorial
/// is at most 34 multiplications, and DMA is queued for the session.
pub struct Edu {
    regs: Registers,
    ctx: DeviceContext,
    dma_mask: u64,
}

impl Edu {
    pub fn new(ctx: DeviceContext, dma_bits: u32) -> Self {
        let dma_mask = if dma_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << dma_bits) - 1
        };
        Edu {
            regs: Registers::default(),
            ctx,
            dma_mask,
        }
    }

    fn raise_irq(&mut self, bits: u32) {
        self.regs.irq_status |= bits;
        if self.regs.irq_status != 0 {
            if self.ctx.irq.msi_enabled() {
                self.ctx.irq.notify(0);
            } else {
                self.ctx.irq.set_intx(true);
            }
        }
    }

    fn lower_irq(&mut self, bits: u32) {
        self.regs.irq_status &= !bits;
        if self.regs.irq_status == 0 && !self.ctx.irq.msi_enabled() {
            self.ctx.irq.set_intx(false);
        }
    }

    /// Starts the DMA just commanded: queued on the device's DMA queue, which the
    /// session performs as soon as this access returns (reaching the client by
    /// message for fd-less memory, without waiting here) and finishes in
    /// [`PciDevice::dma_done`].
    fn start_dma(&mut self) {
        let regs = &self.regs;
        let to_ram = regs.dma_cmd & DMA_CMD_TO_RAM != 0;
        let device_side = if to_ram { regs.dma_src } else { regs.dma_dst };
        let count = regs.dma_count;
        let Some(range) = buffer_range(device_side, count) else {
            return self.dma_finished(Err(EduDmaError::OutsideBuffer {
                addr: device_side,
                count,
            }));
        };
        let queued = if to_ram {
            let gpa = self.clamp(regs.dma_dst);
            self.ctx
                .dma
                .write(regs.generation, gpa, &regs.dma_buf[range])
        } else {
            let gpa = self.clamp(regs.dma_src);
            self.ctx.dma.read(regs.generation, gpa, range.len())
        };
        if let Err(e) = queued {
            self.dma_finished(Err(e.into()));
        }
    }

    /// The DMA is over: `data` holds what was read from RAM (for a transfer to
    /// the device). Clears RUN and raises the interrupt if asked for.
    fn dma_finished(&mut self, result: Result<&[u8], EduDmaError>) {
        let regs = &mut self.regs;
        let (src, dst, count) = (regs.dma_src, regs.dma_dst, regs.dma_count);
        match result {
            Ok(data) if regs.dma_cmd & DMA_CMD_TO_RAM == 0 => {
                if let Some(range) = buffer_range(dst, count).filter(|r| r.len() == data.len()) {
                    regs.dma_buf[range].copy_from_slice(data);
                }
            }
            Ok(_) => {}
            Err(e) => warn!(src, dst, count, "edu DMA failed: {e}"),
        }
        let cmd = regs.dma_cmd;
        regs.dma_cmd &= !DMA_CMD_RUN;
        if cmd & DMA_CMD_IRQ != 0 {
            self.raise_irq(DMA_IRQ);
        }
    }

    fn clamp(&self, addr: u64) -> u64 {
        let clamped = addr & self.dma_mask;
        if clamped != addr {
            debug!(addr, clamped, "edu: DMA address clamped to the DMA mask");
        }
        clamped
    }
}

/// `n!` modulo 2^32, as QEMU's edu computes it (multiplying down from n with
/// wrap-around). 34! holds the factor 2 thirty-two times, so from 34 on the
/// answer is 0: at most 34 multiplications, never a loop the guest sizes.
pub fn factorial(n: u32) -> u32 {
    (1..=n.min(34)).fold(1u32, |acc, k| acc.wrapping_mul(k))
}

/// The buffer indices for device address `addr` and `count` bytes, if inside.
fn buffer_range(addr: u64, count: u64) -> Option<std::ops::Range<usize>> {
    let end = addr.checked_add(count)?;
    if addr >= DMA_BUF_ADDR && end <= DMA_BUF_ADDR + DMA_BUF_SIZE as u64 {
        Some((addr - DMA_BUF_ADDR) as usize..(end - DMA_BUF_ADDR) as usize)
    } else {
        None
    }
}

fn valid_size(offset: u64, len: usize) -> bool {
    if offset < 0x80 {
        len == 4
    } else {
        len == 4 || len == 8
    }
}

/// Layout version of edu's state section `EDU0`: liveness, factorial, status,
/// irq_status (u32 each); dma_src, dma_dst, dma_count, dma_cmd, dma_mask (u64
/// each); the DMA buffer (bytes, 4096).
const STATE_VERSION: u32 = 1;

impl Edu {
    fn save_state(&self) -> Vec<u8> {
        let r = &self.regs;
        let mut w = StateWriter::new();
        w.section(b"EDU0", STATE_VERSION, |s| {
            for v in [r.liveness, r.factorial, r.status, r.irq_status] {
                s.u32(v);
            }
            for v in [r.dma_src, r.dma_dst, r.dma_count, r.dma_cmd, self.dma_mask] {
                s.u64(v);
            }
            s.bytes(&r.dma_buf[..]);
        });
        w.finish()
    }

    fn restore_state(&mut self, blob: &[u8]) -> Result<(), StateError> {
        let mut r = StateReader::new(blob)?;
        let (_, mut s) = r.section(b"EDU0", STATE_VERSION)?;
        let (liveness, factorial, status, irq_status) = (s.u32()?, s.u32()?, s.u32()?, s.u32()?);
        let (dma_src, dma_dst, dma_count, dma_cmd) = (s.u64()?, s.u64()?, s.u64()?, s.u64()?);
        if s.u64()? != self.dma_mask {
            return Err(StateError::Invalid("edu of another DMA address width"));
        }
        let buf: [u8; DMA_BUF_SIZE] = s
            .bytes()?
            .try_into()
            .map_err(|_| StateError::Invalid("edu DMA buffer of another size"))?;
        s.finish()?;
        r.finish()?;
        let generation = self.regs.generation + 1;
        self.regs = Registers {
            liveness,
            factorial,
            status,
            irq_status,
            dma_src,
            dma_dst,
            dma_count,
            dma_cmd,
            dma_buf: Box::new(buf),
            generation,
        };
        // A DMA under way at the source runs again here: both directions
        // copy the same bytes again, so running twice is running once.
        if self.regs.dma_cmd & DMA_CMD_RUN != 0 {
            self.start_dma();
        }
        Ok(())
    }
}

impl PciDevice for Edu {
    fn migratable(&self) -> bool {
        true
    }

    fn save(&self) -> Result<Vec<u8>, StateError> {
        Ok(self.save_state())
    }

    fn restore(&mut self, blob: &[u8]) -> Result<(), StateError> {
        self.restore_state(blob)
    }

    fn bar_read(&mut self, _bar: BarIndex, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !valid_size(offset, data.len()) {
            return;
        }
        let regs = &self.regs;
        let value: u64 = match offset {
            reg::ID => u64::from(ID_VALUE),
            reg::LIVENESS => u64::from(regs.liveness),
            reg::FACTORIAL => u64::from(regs.factorial),
            reg::STATUS => u64::from(regs.status),
            reg::IRQ_STATUS => u64::from(regs.irq_status),
            reg::DMA_SRC => regs.dma_src,
            reg::DMA_DST => regs.dma_dst,
            reg::DMA_COUNT => regs.dma_count,
            reg::DMA_CMD => regs.dma_cmd,
            _ => return,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8]) {
        if !valid_size(offset, data.len()) {
            debug!(
                offset,
                len = data.len(),
                "edu: write of unsupported size ignored"
            );
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let regs = &mut self.regs;
        match offset {
            reg::LIVENESS => regs.liveness = !(value as u32),
            // Done before the write returns, so STATUS_COMPUTING never shows
            // (a guest that polls it, as QEMU's would, sees it clear at once).
            reg::FACTORIAL => {
                regs.factorial = factorial(value as u32);
                if regs.status & STATUS_IRQ_FACT != 0 {
                    self.raise_irq(FACT_IRQ);
                }
            }
            reg::STATUS => {
                if value as u32 & STATUS_IRQ_FACT != 0 {
                    regs.status |= STATUS_IRQ_FACT;
                } else {
                    regs.status &= !STATUS_IRQ_FACT;
                }
            }
            reg::IRQ_RAISE => self.raise_irq(value as u32),
            reg::IRQ_ACK => self.lower_irq(value as u32),
            reg::DMA_SRC | reg::DMA_DST | reg::DMA_COUNT | reg::DMA_CMD => {
                if regs.dma_cmd & DMA_CMD_RUN != 0 {
                    return;
                }
                match offset {
                    reg::DMA_SRC => regs.dma_src = value,
                    reg::DMA_DST => regs.dma_dst = value,
                    reg::DMA_COUNT => regs.dma_count = value,
                    _ => {
                        if value & DMA_CMD_RUN != 0 {
                            regs.dma_cmd = value;
                            self.start_dma();
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        let generation = self.regs.generation + 1;
        self.regs = Registers {
            generation,
            ..Registers::default()
        };
    }

    fn dma_done(&mut self, token: u64, result: Result<&[u8], MemoryError>) {
        if token != self.regs.generation || self.regs.dma_cmd & DMA_CMD_RUN == 0 {
            debug!("DMA finished after a reset; result dropped");
            return;
        }
        self.dma_finished(result.map_err(EduDmaError::from));
    }
}

#[cfg(test)]
mod tests {
    use super::factorial;

    #[test]
    fn the_factorial_matches_qemus_wrapping_loop() {
        let qemu = |mut n: u32| {
            let mut r: u32 = 1;
            while n > 0 {
                r = r.wrapping_mul(n);
                n -= 1;
            }
            r
        };
        for n in (0..200).chain([1000, 65_537, 1 << 20]) {
            assert_eq!(factorial(n), qemu(n), "{n}!");
        }
        assert_eq!(factorial(u32::MAX), 0);
    }
}
