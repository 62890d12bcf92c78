//! Type-0 configuration space: the bytes, which of their bits the guest may write,
//! and which are write-1-to-clear. Everything the guest can change goes through
//! [`ConfigSpace::write`], which applies the masks byte by byte.

use super::bar::{BarDef, BarKind, NUM_BARS};

pub const PCI_CONFIG_SIZE: usize = 256;
pub const PCIE_CONFIG_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG: usize = 0x09;
pub const CACHE_LINE_SIZE: usize = 0x0c;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// First byte after the standard header, where capabilities go.
pub const CAPABILITIES_START: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY: u16 = 1 << 6;
pub const COMMAND_SERR: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
const COMMAND_WRITABLE: u16 = COMMAND_IO
    | COMMAND_MEMORY
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY
    | COMMAND_SERR
    | COMMAND_INTX_DISABLE;

pub const STATUS_INTERRUPT: u16 = 1 << 3;
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Error bits the guest clears by writing 1 (parity, aborts, SERR).
const STATUS_W1C: u16 = 0xf900;

/// Identity of a PCI function.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciIds {
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    /// Class code: base class << 16 | subclass << 8 | programming interface.
    pub class_code: u32,
    /// 0 for none, 1-4 for INTA#-INTD#.
    pub interrupt_pin: u8,
}

/// Config space bytes and their write masks.
#[derive(Clone)]
pub struct ConfigSpace {
    data: Vec<u8>,
    wmask: Vec<u8>,
    w1cmask: Vec<u8>,
    /// Offset where the next capability goes.
    next_cap: usize,
    /// Offset of the last capability's "next" byte, 0 while the list is empty.
    last_cap_next: usize,
}

impl ConfigSpace {
    /// A config space of `size` bytes (256, or 4096 for PCI Express) with the
    /// standard header filled from `ids` and `bars`.
    pub fn new(size: usize, ids: &PciIds, bars: &[Option<BarDef>; NUM_BARS]) -> Self {
        let mut cs = ConfigSpace {
            data: vec![0; size],
            wmask: vec![0; size],
            w1cmask: vec![0; size],
            next_cap: CAPABILITIES_START,
            last_cap_next: 0,
        };
        cs.set_u16(VENDOR_ID, ids.vendor_id);
        cs.set_u16(DEVICE_ID, ids.device_id);
        cs.set_u8(REVISION_ID, ids.revision);
        cs.set_u8(CLASS_PROG, ids.class_code as u8);
        cs.set_u16(CLASS_PROG + 1, (ids.class_code >> 8) as u16);
        cs.set_u16(SUBSYSTEM_VENDOR_ID, ids.subsystem_vendor_id);
        cs.set_u16(SUBSYSTEM_ID, ids.subsystem_id);
        cs.set_u8(HEADER_TYPE, 0);
        cs.set_u8(INTERRUPT_PIN, ids.interrupt_pin);
        cs.set_wmask_u16(COMMAND, COMMAND_WRITABLE);
        cs.set_w1c_u16(STATUS, STATUS_W1C);
        cs.set_wmask_u8(CACHE_LINE_SIZE, 0xff);
        cs.set_wmask_u8(INTERRUPT_LINE, 0xff);
        let mut i = 0;
        while i < NUM_BARS {
            let reg = BAR0 + 4 * i;
            if let Some(bar) = bars[i] {
                cs.set_u32(reg, bar.flag_bits());
                cs.set_wmask_u32(reg, bar.address_mask() as u32);
                if let BarKind::Memory64 { .. } = bar.kind {
                    cs.set_wmask_u32(reg + 4, (bar.address_mask() >> 32) as u32);
                    i += 1;
                }
            }
            i += 1;
        }
        cs
    }

    pub fn size(&self) -> usize {
        self.data.len()
    }

    /// Allocates a capability of `len` bytes (header included), links it into the
    /// list and writes its id. Returns its offset, or `None` when space runs out.
    pub fn add_capability(&mut self, id: u8, len: usize) -> Option<usize> {
        let offset = self.next_cap;
        let end = offset + len;
        if end > PCI_CONFIG_SIZE {
            return None;
        }
        self.set_u8(offset, id);
        self.set_u8(offset + 1, 0);
        if self.last_cap_next == 0 {
            self.set_u8(CAPABILITIES_POINTER, offset as u8);
            let status = self.u16(STATUS) | STATUS_CAP_LIST;
            self.set_u16(STATUS, status);
        } else {
            self.set_u8(self.last_cap_next, offset as u8);
        }
        self.last_cap_next = offset + 1;
        // Keep capabilities dword aligned.
        self.next_cap = (end + 3) & !3;
        Some(offset)
    }

    /// Guest read: copies bytes out (the caller checked the range).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        data.copy_from_slice(&self.data[offset..offset + data.len()]);
    }

    /// Guest write: only writable bits change; write-1-to-clear bits clear.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &val) in data.iter().enumerate() {
            let at = offset + i;
            let wmask = self.wmask[at];
            let w1c = self.w1cmask[at];
            let old = self.data[at];
            self.data[at] = ((old & !wmask) | (val & wmask)) & !(val & w1c);
        }
    }

    /// The whole space as bytes, for a state snapshot.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// Takes the writable bits of a snapshot ([`bytes`](Self::bytes) of a
    /// device like this one); read-only bits (IDs, capability layout) stay
    /// this device's, whatever the snapshot says. Refused if the size differs.
    pub fn restore_writable(&mut self, saved: &[u8]) -> bool {
        if saved.len() != self.data.len() {
            return false;
        }
        for ((d, &w), &s) in self.data.iter_mut().zip(&self.wmask).zip(saved) {
            *d = (*d & !w) | (s & w);
        }
        true
    }

    pub fn contains(&self, offset: u64, len: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.data.len() as u64)
    }

    pub fn u8(&self, at: usize) -> u8 {
        self.data[at]
    }
    pub fn u16(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.data[at], self.data[at + 1]])
    }
    pub fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.data[at..at + 4].try_into().unwrap_or_default())
    }
    pub fn set_u8(&mut self, at: usize, v: u8) {
        self.data[at] = v;
    }
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.data[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.data[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_wmask_u8(&mut self, at: usize, v: u8) {
        self.wmask[at] = v;
    }
    pub fn set_wmask_u16(&mut self, at: usize, v: u16) {
        self.wmask[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_wmask_u32(&mut self, at: usize, v: u32) {
        self.wmask[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_w1c_u16(&mut self, at: usize, v: u16) {
        self.w1cmask[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.u16(COMMAND)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bars() -> [Option<BarDef>; NUM_BARS] {
        [
            Some(BarDef::memory32(0x10_0000, false)),
            Some(BarDef::memory64(0x1_0000_0000, true)),
            None,
            Some(BarDef::io(0x100)),
            None,
            None,
        ]
    }

    #[test]
    fn bar_sizing() {
        let mut cs = ConfigSpace::new(PCI_CONFIG_SIZE, &PciIds::default(), &bars());
        for reg in 0..6 {
            cs.write(BAR0 + 4 * reg, &0xffff_ffffu32.to_le_bytes());
        }
        assert_eq!(cs.u32(0x10), 0xfff0_0000);
        // 64-bit prefetchable 4 GiB: low dword all address bits clear, flags 0xc.
        assert_eq!(cs.u32(0x14), 0x0000_000c);
        assert_eq!(cs.u32(0x18), 0xffff_ffff);
        assert_eq!(cs.u32(0x1c), 0xffff_ff01);
        assert_eq!(cs.u32(0x20), 0);
    }

    #[test]
    fn command_and_status_masks() {
        let mut cs = ConfigSpace::new(PCI_CONFIG_SIZE, &PciIds::default(), &bars());
        cs.write(COMMAND, &0xffffu16.to_le_bytes());
        assert_eq!(cs.command(), COMMAND_WRITABLE);
        cs.set_u16(STATUS, 0x8000 | STATUS_CAP_LIST);
        cs.write(STATUS, &0x8000u16.to_le_bytes());
        assert_eq!(cs.u16(STATUS), STATUS_CAP_LIST);
        cs.write(VENDOR_ID, &[0x55, 0x55]);
        assert_eq!(cs.u16(VENDOR_ID), 0);
    }

    #[test]
    fn capability_chain() {
        let mut cs = ConfigSpace::new(PCI_CONFIG_SIZE, &PciIds::default(), &bars());
        let a = cs.add_capability(0x01, 8).unwrap();
        let b = cs.add_capability(0x05, 14).unwrap();
        assert_eq!(cs.u8(CAPABILITIES_POINTER) as usize, a);
        assert_eq!(cs.u8(a + 1) as usize, b);
        assert_eq!(cs.u8(b + 1), 0);
        assert_eq!(b % 4, 0);
        assert!(cs.u16(STATUS) & STATUS_CAP_LIST != 0);
        assert!(cs.add_capability(0x10, 300).is_none());
    }
}
