//! Arbitrary sequences of config-space and BAR accesses, SET_IRQS and device-side
//! interrupts against a `PciFunction` that has every capability the framework
//! offers (PM, MSI, MSI-X, PCI Express) and every BAR kind (32-bit, 64-bit,
//! prefetchable or not, I/O), checking after each step what the PCI spec promises
//! whatever the guest writes:
//!
//! - identity (IDs, class, header type, interrupt pin), the capability list and
//!   every read-only capability field never change;
//! - a BAR register always keeps its read-only flag bits and the address bits
//!   below its size read as zero (the sizing protocol); unimplemented BAR
//!   registers and the expansion ROM register read zero;
//! - the command register holds only the bits the framework lets the guest set;
//! - the model only sees accesses inside an implemented BAR, never the MSI-X
//!   table or PBA, and nothing while the command register disables decoding;
//! - out-of-range accesses are refused, in-range ones succeed;
//! - PBA bits past the last vector read zero;
//! - reset returns config space to its power-on bytes.
//!
//! Input format: a sequence of operations, each an opcode byte then its operands
//! (see [`run`]); a truncated operation ends the input.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use umdev::memory::GuestMemory;
use umdev::pci::capability::{CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCIE, CAP_ID_PM};
use umdev::pci::config::{COMMAND, STATUS, STATUS_CAP_LIST, STATUS_INTERRUPT};
use umdev::pci::{
    BarDef, BarIndex, DeviceContext, InterruptHandle, MsixLayout, PciDevice, PciDeviceDescription,
    PciFunction, PciIds,
};
use umdev::pci::{IrqKind, Region};
use umdev::vfio_user::pci_map::region_of;
use umdev::vfio_user::wire::{IrqSet, PCI_CONFIG_REGION_INDEX as CONFIG_REGION};

pub const MSIX_VECTORS: u16 = 40;
pub const MSIX_TABLE: u64 = 0x2000;
pub const MSIX_PBA: u64 = 0x3000;
pub const MSI_VECTORS: u32 = 3;

/// Bits of the command register the guest may set (I/O, memory, bus master,
/// parity, SERR, INTx disable).
const COMMAND_WRITABLE: u16 = 0x0547;

pub fn bars() -> [Option<BarDef>; 6] {
    [
        Some(BarDef::memory32(0x4000, false)),
        Some(BarDef::io(0x100)),
        Some(BarDef::memory64(0x10_0000, true)),
        None,
        Some(BarDef::memory32(0x8000_0000, true)),
        Some(BarDef::io(4)),
    ]
}

pub fn description() -> PciDeviceDescription {
    PciDeviceDescription {
        ids: PciIds {
            vendor_id: 0x1b36,
            device_id: 0x00fe,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 7,
            class_code: 0x0c0330,
            interrupt_pin: 2,
        },
        bars: bars(),
        msi_vectors: MSI_VECTORS,
        msix: Some(MsixLayout {
            vectors: MSIX_VECTORS,
            bar: 0,
            table_offset: MSIX_TABLE,
            pba_offset: MSIX_PBA,
        }),
        pcie: true,
        power_management: true,
        ..PciDeviceDescription::default()
    }
}

/// A model that checks what reaches it, echoes writes to its first 256 bytes of
/// each BAR, and raises interrupts when told to through BAR0.
struct ProbeDevice {
    ctx: DeviceContext,
    store: Vec<[u8; 256]>,
    calls: Arc<AtomicU64>,
}

impl ProbeDevice {
    fn check(&self, bar: BarIndex, offset: u64, len: usize) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let def = bars()[bar].unwrap_or_else(|| panic!("access to unimplemented BAR{bar}"));
        assert!(len > 0, "empty access reached the model");
        assert!(
            offset
                .checked_add(len as u64)
                .is_some_and(|e| e <= def.size),
            "BAR{bar} access {offset:#x}+{len} beyond {:#x}",
            def.size
        );
        if bar == 0 {
            let end = offset + len as u64;
            let table_end = MSIX_TABLE + 16 * u64::from(MSIX_VECTORS);
            let pba_end = MSIX_PBA + u64::from(MSIX_VECTORS).div_ceil(64) * 8;
            assert!(
                end <= MSIX_TABLE || offset >= table_end,
                "MSI-X table access {offset:#x}+{len} reached the model"
            );
            assert!(
                end <= MSIX_PBA || offset >= pba_end,
                "PBA access {offset:#x}+{len} reached the model"
            );
        }
    }
}

impl PciDevice for ProbeDevice {
    fn bar_read(&mut self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        self.check(bar, offset, data.len());
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = match self.store[bar].get(at as usize) {
                Some(v) => *v,
                None => (at as u8) ^ 0x5a,
            };
        }
    }

    fn bar_write(&mut self, bar: BarIndex, offset: u64, data: &[u8]) {
        self.check(bar, offset, data.len());
        match (bar, offset) {
            (0, 0) => self.ctx.irq.notify(u32::from(data[0])),
            (0, 4) => self.ctx.irq.set_intx(data[0] & 1 != 0),
            (0, 8) => self.ctx.irq.signal_index(if data[0] & 1 == 0 {
                IrqKind::Err
            } else {
                IrqKind::Req
            }),
            _ => {}
        }
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = self.store[bar].get_mut(offset as usize + i) {
                *slot = *b;
            }
        }
    }

    fn reset(&mut self) {
        self.store.iter_mut().for_each(|s| s.fill(0));
    }
}

/// The function under test and what the harness watches.
pub struct Rig {
    pub function: PciFunction,
    calls: Arc<AtomicU64>,
    irq: InterruptHandle,
    power_on: Vec<u8>,
}

impl Rig {
    pub fn new() -> Rig {
        let calls = Arc::new(AtomicU64::new(0));
        let device_calls = calls.clone();
        let function = PciFunction::new(description(), GuestMemory::new(4), move |ctx| {
            Box::new(ProbeDevice {
                ctx,
                store: vec![[0; 256]; 6],
                calls: device_calls,
            })
        })
        .expect("the fuzz device description is valid");
        let irq = function.interrupts().clone();
        let mut rig = Rig {
            function,
            calls,
            irq,
            power_on: Vec::new(),
        };
        rig.power_on = rig.config_bytes();
        rig
    }

    pub fn config_bytes(&mut self) -> Vec<u8> {
        let mut cfg = vec![0u8; 4096];
        self.function
            .region_read(Region::Config, 0, &mut cfg)
            .expect("whole config space reads");
        cfg
    }

    fn cfg_u16(cfg: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([cfg[at], cfg[at + 1]])
    }

    fn cfg_u32(cfg: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([cfg[at], cfg[at + 1], cfg[at + 2], cfg[at + 3]])
    }

    /// The capability list: (id, offset).
    fn caps(cfg: &[u8]) -> Vec<(u8, usize)> {
        let mut at = usize::from(cfg[0x34]);
        let mut out = Vec::new();
        while at != 0 && out.len() < 48 {
            out.push((cfg[at], at));
            at = usize::from(cfg[at + 1]);
        }
        out
    }

    /// Every invariant in the module documentation.
    pub fn check_invariants(&mut self) {
        let cfg = self.config_bytes();
        let p = &self.power_on;
        // Identity and header: vendor/device, revision/class, header type,
        // subsystem, capability pointer, interrupt pin, expansion ROM, and the
        // reserved bytes 0x35-0x3b.
        for range in [0x00..0x04, 0x08..0x0c, 0x0e..0x0f, 0x2c..0x3c, 0x3d..0x3e] {
            assert_eq!(
                cfg[range.clone()],
                p[range.clone()],
                "read-only header bytes {range:x?} changed"
            );
        }
        let cmd = Self::cfg_u16(&cfg, COMMAND);
        assert_eq!(cmd & !COMMAND_WRITABLE, 0, "command register {cmd:#x}");
        let status = Self::cfg_u16(&cfg, STATUS);
        assert!(status & STATUS_CAP_LIST != 0, "capability list bit lost");
        assert_eq!(
            status & STATUS_INTERRUPT != 0,
            self.irq.intx_level(),
            "status interrupt bit disagrees with the INTx line"
        );
        // BARs.
        let defs = bars();
        let mut i = 0;
        while i < 6 {
            let reg = Self::cfg_u32(&cfg, 0x10 + 4 * i);
            match defs[i] {
                None => assert_eq!(reg, 0, "unimplemented BAR{i} reads {reg:#x}"),
                Some(def) => {
                    let mask = def.address_mask();
                    assert_eq!(
                        reg & !(mask as u32),
                        def.flag_bits(),
                        "BAR{i} {reg:#x}: flag or size bits changed"
                    );
                    // Independent of the framework's masks: the bits below the
                    // size are zero apart from the flags.
                    let low = (def.size.min(1 << 32) - 1) as u32;
                    let flag_area = if def.is_io() { 0x3 } else { 0xf };
                    assert_eq!(reg & low & !flag_area, 0, "BAR{i} {reg:#x} below size");
                    if let umdev::pci::BarKind::Memory64 { .. } = def.kind {
                        let hi = Self::cfg_u32(&cfg, 0x10 + 4 * (i + 1));
                        assert_eq!(hi & !((mask >> 32) as u32), 0, "BAR{} upper", i + 1);
                        i += 1;
                    }
                }
            }
            i += 1;
        }
        // Capabilities: same chain, read-only fields unchanged.
        let chain = Self::caps(&cfg);
        assert_eq!(chain, Self::caps(p), "capability list changed");
        let ids: Vec<u8> = chain.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, [CAP_ID_PM, CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCIE]);
        for &(id, at) in &chain {
            // PM: PMC. MSI-X: table and PBA offset/BIR. PCIe: capabilities
            // register, device capabilities, link capabilities.
            let fixed: &[(usize, usize)] = match id {
                CAP_ID_PM => &[(2, 2)],
                CAP_ID_MSIX => &[(4, 8)],
                CAP_ID_PCIE => &[(2, 6), (0xc, 4)],
                _ => &[],
            };
            for &(off, len) in fixed {
                let r = at + off..at + off + len;
                assert_eq!(cfg[r.clone()], p[r.clone()], "cap {id:#x} bytes {r:x?}");
            }
            match id {
                CAP_ID_MSI => {
                    let ctrl = Self::cfg_u16(&cfg, at + 2);
                    let ctrl0 = Self::cfg_u16(p, at + 2);
                    assert_eq!(ctrl & !0x71, ctrl0 & !0x71, "MSI control {ctrl:#x}");
                    // Reserved low bits of the message address.
                    assert_eq!(cfg[at + 4] & 3, 0, "MSI address alignment");
                }
                CAP_ID_MSIX => {
                    let ctrl = Self::cfg_u16(&cfg, at + 2);
                    assert_eq!(ctrl & 0x7ff, MSIX_VECTORS - 1, "MSI-X table size");
                    assert_eq!(ctrl & 0x3800, 0, "MSI-X reserved bits");
                }
                _ => {}
            }
        }
        // PBA bits past the last vector read zero (through the BAR, when it decodes).
        if cmd & 0x2 != 0 {
            let before = self.calls.load(Ordering::Relaxed);
            let mut pba = [0u8; 8];
            self.function
                .region_read(Region::Bar(0), MSIX_PBA, &mut pba)
                .expect("PBA read");
            let bits = u64::from_le_bytes(pba);
            assert_eq!(bits >> MSIX_VECTORS, 0, "PBA bits past the last vector");
            assert_eq!(self.calls.load(Ordering::Relaxed), before);
        }
    }

    /// A config or BAR access, checked against what must happen.
    fn access(&mut self, index: u32, offset: u64, len: usize, write: Option<&[u8]>) {
        let Some(region) = region_of(index) else {
            // Not a vfio region: the server refuses it before the function.
            return;
        };
        let size = self.function.region(region).map(|r| r.size);
        let in_range = matches!(size, Ok(s) if len > 0
            && offset.checked_add(len as u64).is_some_and(|e| e <= s));
        let cmd = self.function.config().command();
        let decodes = match bars().get(index as usize).copied().flatten() {
            Some(def) if def.is_io() => cmd & 1 != 0,
            Some(_) => cmd & 2 != 0,
            None => false,
        };
        let before = self.calls.load(Ordering::Relaxed);
        let result = match write {
            Some(data) => self.function.region_write(region, offset, data),
            None => {
                let mut buf = vec![0u8; len];
                let r = self.function.region_read(region, offset, &mut buf);
                if r.is_ok() && index < 6 && !decodes {
                    assert!(buf.iter().all(|&b| b == 0xff), "BAR off, read not all-ones");
                }
                r
            }
        };
        assert_eq!(
            result.is_ok(),
            in_range,
            "region {index} {offset:#x}+{len}: {result:?}"
        );
        if index < 6 && !decodes {
            assert_eq!(
                self.calls.load(Ordering::Relaxed),
                before,
                "model reached while BAR{index} does not decode"
            );
        }
    }

    /// SET_IRQS as the server decodes it (`vfio_user::pci_map::set_irqs`).
    fn set_irqs(&mut self, index: u32, flags: u32, start: u32, count: u32, ops: &mut Ops<'_>) {
        let mut rest: &[u8] = &[];
        let mut fds: Vec<OwnedFd> = Vec::new();
        match flags & 0x7 {
            umdev::vfio_user::wire::IRQ_SET_DATA_BOOL => {
                let n = (count as usize).min(64);
                rest = ops.take(n).unwrap_or(&[]);
            }
            umdev::vfio_user::wire::IRQ_SET_DATA_EVENTFD => {
                let n = (count as usize).min(64);
                let pattern = ops.u8().unwrap_or(0);
                for i in 0..n {
                    if pattern & (1 << (i % 8)) == 0 {
                        continue;
                    }
                    // SAFETY: eventfd() returns a fresh fd (or -1, checked) that the
                    // OwnedFd takes over.
                    let owned = unsafe {
                        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
                        assert!(fd >= 0, "eventfd");
                        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                    };
                    fds.push(owned);
                }
            }
            _ => {}
        }
        let set = IrqSet {
            argsz: (std::mem::size_of::<IrqSet>() + rest.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        let irqs = self.function.interrupts().clone();
        let _ = umdev::vfio_user::pci_map::set_irqs(&irqs, &set, rest, fds);
    }
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Stops an INTx resample thread, if one was started.
        self.function.interrupts().disconnect();
    }
}

/// A cursor over the input.
pub struct Ops<'a> {
    data: &'a [u8],
}

impl<'a> Ops<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.data.len() < n {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// An access length: mostly 1, 2, 4 or 8, sometimes odd, zero or long.
    fn len(&mut self) -> Option<usize> {
        let b = self.u8()?;
        Some(match b & 0x7 {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 8,
            4 => 0,
            5 => 3,
            _ => usize::from(b >> 3) * 8 + 1,
        })
    }
}

/// Opcodes, each followed by its operands:
///
/// ```text
/// 0 cfg read    off:u16 len:u8
/// 1 cfg write   off:u16 len:u8 data[len]
/// 2 BAR read    region:u8 off:u32 len:u8      (region modulo 10: 6-9 are ROM, config, VGA, none)
/// 3 BAR write   region:u8 off:u32 len:u8 data[len]
/// 4 reset
/// 5 SET_IRQS    index:u8 flags:u8 start:u8 count:u8 [bools | fd pattern:u8]
/// 6 BAR sizing  (all ones into every BAR register, then check, then restore)
/// 7 enable      command:u16 (a 2-byte config write of the command register)
/// 8 high BAR    region:u8 off:u32 len:u8       (offset shifted up 32 bits)
/// ```
/// Opcodes are taken modulo 9.
pub fn run(input: &[u8]) {
    let mut rig = Rig::new();
    let mut ops = Ops { data: input };
    rig.check_invariants();
    while let Some(op) = ops.u8() {
        if step(&mut rig, op % 9, &mut ops).is_none() {
            break;
        }
        rig.check_invariants();
    }
}

fn step(rig: &mut Rig, op: u8, ops: &mut Ops<'_>) -> Option<()> {
    match op {
        0 | 1 => {
            let offset = u64::from(ops.u16()? % 4200);
            let len = ops.len()?;
            let data = if op == 1 { Some(ops.take(len)?) } else { None };
            rig.access(CONFIG_REGION, offset, len, data);
        }
        2 | 3 | 8 => {
            let region = u32::from(ops.u8()? % 10);
            let mut offset = u64::from(ops.u32()?);
            if op == 8 {
                offset <<= 32;
            } else if region != 1 && region != 5 {
                // Mostly near the interesting parts of the BAR.
                offset %= 0x4_0000;
            }
            let len = ops.len()?;
            let data = if op == 3 { Some(ops.take(len)?) } else { None };
            rig.access(region, offset, len, data);
        }
        4 => {
            rig.function.reset();
            let cfg = rig.config_bytes();
            assert!(cfg == rig.power_on, "config space after reset differs");
        }
        5 => {
            let index = u32::from(ops.u8()? % 6);
            let flags = u32::from(ops.u8()?);
            let start = u32::from(ops.u8()?);
            let count = u32::from(ops.u8()?);
            rig.set_irqs(index, flags, start, count, ops);
        }
        6 => {
            let saved: Vec<u8> = rig.config_bytes()[0x10..0x28].to_vec();
            for reg in 0..6u64 {
                rig.access(CONFIG_REGION, 0x10 + 4 * reg, 4, Some(&[0xff; 4]));
            }
            let cfg = rig.config_bytes();
            let defs = bars();
            let mut i = 0;
            while i < 6 {
                let reg = Rig::cfg_u32(&cfg, 0x10 + 4 * i);
                if let Some(def) = defs[i] {
                    // The sizing answer: every address bit at or above the size.
                    let want = def.address_mask() as u32 | def.flag_bits();
                    assert_eq!(reg, want, "BAR{i} sizing");
                    if let umdev::pci::BarKind::Memory64 { .. } = def.kind {
                        let hi = Rig::cfg_u32(&cfg, 0x10 + 4 * (i + 1));
                        assert_eq!(hi, (def.address_mask() >> 32) as u32, "BAR{i} upper");
                        i += 1;
                    }
                }
                i += 1;
            }
            rig.access(CONFIG_REGION, 0x10, saved.len(), Some(&saved));
        }
        7 => {
            let cmd = ops.u16()?;
            rig.access(CONFIG_REGION, COMMAND as u64, 2, Some(&cmd.to_le_bytes()));
        }
        _ => {}
    }
    Some(())
}
