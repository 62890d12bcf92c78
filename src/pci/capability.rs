//! Standard capabilities placed in config space: Power Management, MSI, MSI-X
//! and the PCI Express endpoint capability. Each builder writes the initial
//! values and the writable masks; [`CapabilityOffsets`] remembers where they went
//! so the function can react to writes.

use super::bar::BarIndex;
use super::config::ConfigSpace;

pub const CAP_ID_PM: u8 = 0x01;
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

/// MSI: Message Control bits.
pub const MSI_CTRL_ENABLE: u16 = 1 << 0;
pub const MSI_CTRL_64BIT: u16 = 1 << 7;
/// MSI-X: Message Control bits.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;

/// Where an MSI-X table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub bar: BarIndex,
    pub table_offset: u64,
    pub pba_offset: u64,
}

impl MsixLayout {
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * 16
    }
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// Offsets of the capabilities a function has, for write handling.
#[derive(Clone, Copy, Debug, Default)]
pub struct CapabilityOffsets {
    pub pm: Option<usize>,
    pub msi: Option<usize>,
    pub msix: Option<usize>,
    pub pcie: Option<usize>,
}

/// Power Management capability, version 3, D0/D3hot.
pub fn add_pm(cs: &mut ConfigSpace) -> Option<usize> {
    let at = cs.add_capability(CAP_ID_PM, 8)?;
    cs.set_u16(at + 2, 0x0003);
    // PMCSR: PowerState is writable; No_Soft_Reset set (state is kept in D3hot).
    cs.set_u16(at + 4, 1 << 3);
    cs.set_wmask_u16(at + 4, 0x0003);
    Some(at)
}

/// MSI capability, 64-bit, `vectors` (a power of two, 1-32) message vectors.
pub fn add_msi(cs: &mut ConfigSpace, vectors: u32) -> Option<usize> {
    let at = cs.add_capability(CAP_ID_MSI, 14)?;
    let mmc = vectors.max(1).next_power_of_two().trailing_zeros().min(5) as u16;
    cs.set_u16(at + 2, MSI_CTRL_64BIT | (mmc << 1));
    // Enable and Multiple Message Enable.
    cs.set_wmask_u16(at + 2, MSI_CTRL_ENABLE | (0x7 << 4));
    cs.set_wmask_u32(at + 4, 0xffff_fffc);
    cs.set_wmask_u32(at + 8, 0xffff_ffff);
    cs.set_wmask_u16(at + 12, 0xffff);
    Some(at)
}

/// MSI capability state: (enabled, vectors enabled).
pub fn msi_state(cs: &ConfigSpace, at: usize) -> (bool, u32) {
    let ctrl = cs.u16(at + 2);
    let mmc = (ctrl >> 1) & 0x7;
    let mme = ((ctrl >> 4) & 0x7).min(mmc);
    (ctrl & MSI_CTRL_ENABLE != 0, 1 << mme)
}

/// MSI-X capability for `layout`.
pub fn add_msix(cs: &mut ConfigSpace, layout: &MsixLayout) -> Option<usize> {
    let at = cs.add_capability(CAP_ID_MSIX, 12)?;
    cs.set_u16(at + 2, layout.vectors.saturating_sub(1) & 0x7ff);
    cs.set_wmask_u16(at + 2, MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
    cs.set_u32(at + 4, layout.table_offset as u32 | layout.bar as u32);
    cs.set_u32(at + 8, layout.pba_offset as u32 | layout.bar as u32);
    Some(at)
}

/// MSI-X capability state: (enabled, function masked).
pub fn msix_state(cs: &ConfigSpace, at: usize) -> (bool, bool) {
    let ctrl = cs.u16(at + 2);
    (
        ctrl & MSIX_CTRL_ENABLE != 0,
        ctrl & MSIX_CTRL_FUNCTION_MASK != 0,
    )
}

/// PCI Express capability, version 2, endpoint, 2.5 GT/s x1 link.
pub fn add_pcie_endpoint(cs: &mut ConfigSpace) -> Option<usize> {
    let at = cs.add_capability(CAP_ID_PCIE, 0x3c)?;
    // PCIe Capabilities: version 2, device/port type 0 (endpoint).
    cs.set_u16(at + 2, 0x0002);
    // Device Capabilities: 128-byte max payload, FLR not offered (reset is DEVICE_RESET).
    cs.set_u32(at + 4, 0);
    // Device Control: error reporting enables, relaxed ordering, max payload / read request.
    cs.set_u16(at + 8, 0x2810);
    cs.set_wmask_u16(at + 8, 0x7cff);
    // Device Status: error bits are write-1-to-clear.
    cs.set_w1c_u16(at + 0xa, 0x000f);
    // Link Capabilities: 2.5 GT/s, x1. Link Status: the same, trained.
    cs.set_u32(at + 0xc, 0x0000_0011);
    cs.set_wmask_u16(at + 0x10, 0x01c3);
    cs.set_u16(at + 0x12, 0x0011);
    // Link Control 2: target link speed 2.5 GT/s.
    cs.set_u16(at + 0x30, 0x0001);
    Some(at)
}
