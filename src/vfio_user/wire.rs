//! vfio-user wire format: plain little-endian structs as QEMU's
//! `docs/interop/vfio-user.rst` lays them out, and nothing else.
//!
//! Every struct here is `#[repr(C)]`, has no padding and is made of integers, so it
//! can be read from and written to any byte buffer with [`WireStruct`]. Parsing
//! never trusts a size the peer sent: every accessor checks the buffer it is given.
//! The flags and indices vfio-user shares with the kernel's VFIO come from
//! rust-vmm's `vfio-bindings` (Linux `include/uapi/linux/vfio.h`).

use std::mem::size_of;

use vfio_bindings::bindings::vfio;

/// Size of the message header that starts every message.
pub const HEADER_SIZE: usize = size_of::<Header>();

/// Major protocol version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// Minor protocol version we speak.
pub const VERSION_MINOR: u16 = 1;

/// Command numbers (header `command` field).
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    DeviceGetRegionIoFds = 6,
    DeviceGetIrqInfo = 7,
    DeviceSetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    /// 14 was VFIO_USER_DIRTY_PAGES, obsolete.
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    /// The command for a raw number, `None` for unknown or obsolete numbers.
    pub fn from_raw(raw: u16) -> Option<Command> {
        use Command::*;
        Some(match raw {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => DeviceGetRegionIoFds,
            7 => DeviceGetIrqInfo,
            8 => DeviceSetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// Header `flags`: bits 0-3 are the message type.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
pub const FLAGS_TYPE_COMMAND: u32 = 0;
pub const FLAGS_TYPE_REPLY: u32 = 1;
/// The sender expects no reply.
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// The reply carries an errno in `error`.
pub const FLAGS_ERROR: u32 = 1 << 5;

/// The 16-byte header of every message.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn is_reply(&self) -> bool {
        self.flags & FLAGS_TYPE_MASK == FLAGS_TYPE_REPLY
    }
    pub fn is_command(&self) -> bool {
        self.flags & FLAGS_TYPE_MASK == FLAGS_TYPE_COMMAND
    }
    pub fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }
    pub fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }
    /// Payload size the header announces, `None` if it is smaller than a header.
    pub fn payload_size(&self) -> Option<usize> {
        (self.size as usize).checked_sub(HEADER_SIZE)
    }
}

/// A struct that is plain bytes on the wire.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain only integer fields (every bit pattern
/// valid) and have no padding.
pub unsafe trait WireStruct: Copy + Default {
    /// Reads one from the start of `bytes`, `None` when `bytes` is too short.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        let src = bytes.get(..size_of::<Self>())?;
        let mut value = Self::default();
        // SAFETY: `Self` is plain integers without padding (trait contract), so any
        // byte pattern of its size is a valid value; `src` has exactly that size and
        // cannot overlap the local `value`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                &mut value as *mut Self as *mut u8,
                size_of::<Self>(),
            );
        }
        Some(value)
    }

    /// The value as bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: `Self` is plain integers without padding (trait contract): all of
        // its bytes are initialised, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self as *const Self as *const u8, size_of::<Self>()) }
    }
}

macro_rules! wire_structs {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: each listed type is #[repr(C)], all-integer and padding-free;
            // the size assertions below the definitions check the last point.
            unsafe impl WireStruct for $t {}
        )*
    };
}

/// VERSION payload (before the NUL-terminated JSON).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
}

/// DMA_MAP flags.
pub const DMA_MAP_FLAG_READ: u32 = vfio::VFIO_DMA_MAP_FLAG_READ;
pub const DMA_MAP_FLAG_WRITE: u32 = vfio::VFIO_DMA_MAP_FLAG_WRITE;

/// DMA_MAP request payload. The fd, if any, travels as SCM_RIGHTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset of the region in the fd.
    pub offset: u64,
    /// Guest (DMA) address.
    pub address: u64,
    pub size: u64,
}

/// DMA_UNMAP flags. Bit 0 asked for a dirty bitmap (obsolete, refused).
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = vfio::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
pub const DMA_UNMAP_FLAG_ALL: u32 = vfio::VFIO_DMA_UNMAP_FLAG_ALL;

/// DMA_UNMAP request and reply payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub address: u64,
    pub size: u64,
}

/// DEVICE_GET_INFO flags.
pub const DEVICE_FLAGS_RESET: u32 = vfio::VFIO_DEVICE_FLAGS_RESET;
pub const DEVICE_FLAGS_PCI: u32 = vfio::VFIO_DEVICE_FLAGS_PCI;

/// DEVICE_GET_INFO request and reply payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

/// Region info flags.
pub const REGION_INFO_FLAG_READ: u32 = vfio::VFIO_REGION_INFO_FLAG_READ;
pub const REGION_INFO_FLAG_WRITE: u32 = vfio::VFIO_REGION_INFO_FLAG_WRITE;
pub const REGION_INFO_FLAG_MMAP: u32 = vfio::VFIO_REGION_INFO_FLAG_MMAP;
pub const REGION_INFO_FLAG_CAPS: u32 = vfio::VFIO_REGION_INFO_FLAG_CAPS;

/// Capability id of the sparse mmap capability in a region-info chain.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;

/// DEVICE_GET_REGION_INFO request and reply payload (capabilities follow in the reply).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    /// Offset of the first capability from the start of this struct, 0 for none.
    pub cap_offset: u32,
    pub size: u64,
    /// Offset of the region in the fd passed with the reply.
    pub offset: u64,
}

/// Header of each capability in a region-info chain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CapHeader {
    pub id: u16,
    pub version: u16,
    /// Offset of the next capability from the start of [`RegionInfo`], 0 ends.
    pub next: u32,
}

/// Sparse mmap capability body: `nr_areas` [`SparseMmapArea`]s follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SparseMmapHeader {
    pub nr_areas: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SparseMmapArea {
    pub offset: u64,
    pub size: u64,
}

/// DEVICE_GET_REGION_IO_FDS request and reply payload (sub-regions follow).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionIoFds {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// IRQ info flags.
pub const IRQ_INFO_EVENTFD: u32 = vfio::VFIO_IRQ_INFO_EVENTFD;
pub const IRQ_INFO_MASKABLE: u32 = vfio::VFIO_IRQ_INFO_MASKABLE;
pub const IRQ_INFO_AUTOMASKED: u32 = vfio::VFIO_IRQ_INFO_AUTOMASKED;
pub const IRQ_INFO_NORESIZE: u32 = vfio::VFIO_IRQ_INFO_NORESIZE;

/// DEVICE_GET_IRQ_INFO request and reply payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// SET_IRQS data kinds (exactly one must be set).
pub const IRQ_SET_DATA_NONE: u32 = vfio::VFIO_IRQ_SET_DATA_NONE;
pub const IRQ_SET_DATA_BOOL: u32 = vfio::VFIO_IRQ_SET_DATA_BOOL;
pub const IRQ_SET_DATA_EVENTFD: u32 = vfio::VFIO_IRQ_SET_DATA_EVENTFD;
pub const IRQ_SET_DATA_MASK: u32 = vfio::VFIO_IRQ_SET_DATA_TYPE_MASK;
/// SET_IRQS actions (exactly one must be set).
pub const IRQ_SET_ACTION_MASK: u32 = vfio::VFIO_IRQ_SET_ACTION_MASK;
pub const IRQ_SET_ACTION_UNMASK: u32 = vfio::VFIO_IRQ_SET_ACTION_UNMASK;
pub const IRQ_SET_ACTION_TRIGGER: u32 = vfio::VFIO_IRQ_SET_ACTION_TRIGGER;
pub const IRQ_SET_ACTION_MASK_ALL: u32 = vfio::VFIO_IRQ_SET_ACTION_TYPE_MASK;

/// DEVICE_SET_IRQS request payload; for DATA_BOOL `count` bytes follow, for
/// DATA_EVENTFD the fds travel as SCM_RIGHTS.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// REGION_READ / REGION_WRITE payload; data follows for a write request and a read reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

/// DMA_READ / DMA_WRITE payload (server to client) as the spec lays it out;
/// data follows for a write request and a read reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaAccess {
    pub address: u64,
    pub count: u64,
}

/// Where DMA_READ/DMA_WRITE data sits. The spec puts a u64 count at payload
/// offset 8 and the data at 16, and QEMU 11.1.3 (tested here) does the same. The
/// hw/vfio-user code QEMU first merged used a u32 count and put the data at
/// payload offset 12, the message still 32 + count bytes long. Both layouts have
/// the same size, so the layout cannot be detected: it is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DmaLayout {
    /// docs/interop/vfio-user.rst, libvfio-user, QEMU 11.1: data at payload offset 16.
    #[default]
    Spec,
    /// QEMU's first hw/vfio-user: u32 count, data at payload offset 12, 4 bytes of
    /// padding at the end.
    Qemu10,
}

impl DmaLayout {
    /// Payload offset of the data.
    pub fn data_offset(self) -> usize {
        match self {
            DmaLayout::Qemu10 => 12,
            DmaLayout::Spec => 16,
        }
    }

    /// Payload bytes of a message carrying `count` data bytes (32 + count in all).
    pub fn payload_len(count: usize) -> usize {
        16 + count
    }

    /// The fixed part of a request or reply for `address`/`count`.
    pub fn fixed_part(self, address: u64, count: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&address.to_le_bytes());
        match self {
            DmaLayout::Qemu10 => b[8..12].copy_from_slice(&(count as u32).to_le_bytes()),
            DmaLayout::Spec => b[8..16].copy_from_slice(&count.to_le_bytes()),
        }
        b
    }

    /// Parses address and count from the start of a payload.
    pub fn parse(self, payload: &[u8]) -> Option<(u64, u64)> {
        let address = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
        let count = match self {
            DmaLayout::Qemu10 => {
                u64::from(u32::from_le_bytes(payload.get(8..12)?.try_into().ok()?))
            }
            DmaLayout::Spec => u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?),
        };
        Some((address, count))
    }
}

/// A DMA message layout name that is neither `spec` nor `qemu-10`.
#[derive(Debug, thiserror::Error)]
#[error("unknown DMA message layout {0:?} (spec or qemu-10)")]
pub struct UnknownDmaLayout(pub String);

impl std::str::FromStr for DmaLayout {
    type Err = UnknownDmaLayout;
    fn from_str(s: &str) -> Result<Self, UnknownDmaLayout> {
        match s {
            "spec" => Ok(DmaLayout::Spec),
            "qemu-10" => Ok(DmaLayout::Qemu10),
            _ => Err(UnknownDmaLayout(s.into())),
        }
    }
}

/// Largest number of writes in one REGION_WRITE_MULTI message.
pub const WRITE_MULTI_MAX: usize = 200;
/// Bytes of data each REGION_WRITE_MULTI entry carries (at most).
pub const WRITE_MULTI_DATA: usize = 8;

/// REGION_WRITE_MULTI payload: `wr_cnt` then [`WriteMultiEntry`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteMultiHeader {
    pub wr_cnt: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct WriteMultiEntry {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
    pub data: [u8; WRITE_MULTI_DATA],
}

/// DEVICE_FEATURE payload: this head, then the feature's data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DeviceFeature {
    pub argsz: u32,
    /// Feature index (bits 0-15) and GET/SET/PROBE.
    pub flags: u32,
}

/// DEVICE_FEATURE `flags` bits and feature indices (Linux `vfio.h`).
pub const FEATURE_MASK: u32 = vfio::VFIO_DEVICE_FEATURE_MASK;
pub const FEATURE_GET: u32 = vfio::VFIO_DEVICE_FEATURE_GET;
pub const FEATURE_SET: u32 = vfio::VFIO_DEVICE_FEATURE_SET;
pub const FEATURE_PROBE: u32 = vfio::VFIO_DEVICE_FEATURE_PROBE;
pub const FEATURE_MIGRATION: u32 = vfio::VFIO_DEVICE_FEATURE_MIGRATION;
pub const FEATURE_MIG_DEVICE_STATE: u32 = vfio::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
pub const FEATURE_DMA_LOGGING_START: u32 = vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
pub const FEATURE_DMA_LOGGING_STOP: u32 = vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;
pub const FEATURE_DMA_LOGGING_REPORT: u32 = vfio::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
pub const FEATURE_MIG_DATA_SIZE: u32 = vfio::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE;

/// MIG_DEVICE_STATE data (`vfio_device_feature_mig_state`); `data_fd` is
/// unused in vfio-user (-1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MigDeviceState {
    pub device_state: u32,
    pub data_fd: i32,
}

/// DMA_LOGGING_START data: this head, then `num_ranges` [`DmaLoggingRange`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaLoggingControl {
    pub page_size: u64,
    pub num_ranges: u32,
    pub reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaLoggingRange {
    pub iova: u64,
    pub length: u64,
}

/// DMA_LOGGING_REPORT request data; the reply adds the bitmap (u64 words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DmaLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
}

/// MIG_DATA_READ request and reply head, MIG_DATA_WRITE request head.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MigData {
    pub argsz: u32,
    pub size: u32,
}

/// umdev protocol extensions (docs/protocol-extensions.md). Their command numbers
/// lie far outside the spec's; each is valid only once both peers announced the
/// matching `umdev.` capability in VERSION, and is an unknown command otherwise.
pub const UMDEV_CMD_DIRTY_BITMAP: u16 = 0x5501;
pub const UMDEV_CMD_UFFD: u16 = 0x5502;
/// Capability announcing [`UMDEV_CMD_DIRTY_BITMAP`].
pub const CAP_UMDEV_DIRTY_BITMAP: &str = "umdev.dirty_bitmap";
/// Capability announcing [`UMDEV_CMD_UFFD`].
pub const CAP_UMDEV_UFFD_WP: &str = "umdev.uffd_wp";

/// UMDEV_CMD_DIRTY_BITMAP request and reply payload; the bitmap fd travels as
/// SCM_RIGHTS with the request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UmdevDirtyBitmap {
    pub argsz: u32,
    pub flags: u32,
    /// The DMA region the bitmap covers.
    pub address: u64,
    pub size: u64,
    /// Offset of the bitmap in the fd (8-byte aligned).
    pub offset: u64,
}

/// UMDEV_CMD_UFFD request and reply payload; the userfaultfd travels as
/// SCM_RIGHTS with the request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UmdevUffd {
    pub argsz: u32,
    pub flags: u32,
    /// The DMA region the uffd-registered mapping holds.
    pub address: u64,
    pub size: u64,
    /// Where that mapping starts in the VMM's address space.
    pub vmm_address: u64,
}

wire_structs!(
    UmdevDirtyBitmap,
    UmdevUffd,
    Header,
    Version,
    DmaMap,
    DmaUnmap,
    DeviceInfo,
    RegionInfo,
    CapHeader,
    SparseMmapHeader,
    SparseMmapArea,
    RegionIoFds,
    IrqInfo,
    IrqSet,
    RegionAccess,
    DmaAccess,
    WriteMultiHeader,
    WriteMultiEntry,
    DeviceFeature,
    MigDeviceState,
    DmaLoggingControl,
    DmaLoggingRange,
    DmaLoggingReport,
    MigData,
    u64,
);

const _: () = {
    assert!(size_of::<Header>() == 16);
    assert!(size_of::<Version>() == 4);
    assert!(size_of::<DmaMap>() == 32);
    assert!(size_of::<DmaUnmap>() == 24);
    assert!(size_of::<DeviceInfo>() == 16);
    assert!(size_of::<RegionInfo>() == 32);
    assert!(size_of::<CapHeader>() == 8);
    assert!(size_of::<SparseMmapHeader>() == 8);
    assert!(size_of::<SparseMmapArea>() == 16);
    assert!(size_of::<RegionIoFds>() == 16);
    assert!(size_of::<IrqInfo>() == 16);
    assert!(size_of::<IrqSet>() == 20);
    assert!(size_of::<RegionAccess>() == 16);
    assert!(size_of::<DmaAccess>() == 16);
    assert!(size_of::<WriteMultiHeader>() == 8);
    assert!(size_of::<WriteMultiEntry>() == 24);
    assert!(size_of::<DeviceFeature>() == 8);
    assert!(size_of::<MigDeviceState>() == 8);
    assert!(size_of::<DmaLoggingControl>() == 16);
    assert!(size_of::<DmaLoggingRange>() == 16);
    assert!(size_of::<DmaLoggingReport>() == 24);
    assert!(size_of::<MigData>() == 8);
};

/// Region indices of a vfio-user PCI device.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_ROM_REGION_INDEX: u32 = vfio::VFIO_PCI_ROM_REGION_INDEX;
pub const PCI_CONFIG_REGION_INDEX: u32 = vfio::VFIO_PCI_CONFIG_REGION_INDEX;
pub const PCI_VGA_REGION_INDEX: u32 = vfio::VFIO_PCI_VGA_REGION_INDEX;
/// Regions a PCI device reports (BAR0-5, ROM, config, VGA).
pub const PCI_NUM_REGIONS: u32 = vfio::VFIO_PCI_NUM_REGIONS;

/// IRQ indices of a vfio-user PCI device.
pub const PCI_INTX_IRQ_INDEX: u32 = vfio::VFIO_PCI_INTX_IRQ_INDEX;
pub const PCI_MSI_IRQ_INDEX: u32 = vfio::VFIO_PCI_MSI_IRQ_INDEX;
pub const PCI_MSIX_IRQ_INDEX: u32 = vfio::VFIO_PCI_MSIX_IRQ_INDEX;
pub const PCI_ERR_IRQ_INDEX: u32 = vfio::VFIO_PCI_ERR_IRQ_INDEX;
pub const PCI_REQ_IRQ_INDEX: u32 = vfio::VFIO_PCI_REQ_IRQ_INDEX;
/// IRQ indices a PCI device reports.
pub const PCI_NUM_IRQS: u32 = vfio::VFIO_PCI_NUM_IRQS;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_id: 7,
            command: Command::RegionWrite as u16,
            size: 40,
            flags: FLAGS_NO_REPLY,
            error: 0,
        };
        let bytes = h.as_bytes().to_vec();
        assert_eq!(bytes.len(), HEADER_SIZE);
        assert_eq!(Header::read_from(&bytes), Some(h));
        assert_eq!(Header::read_from(&bytes[..15]), None);
        assert!(h.no_reply() && h.is_command() && !h.is_reply());
        assert_eq!(h.payload_size(), Some(24));
    }

    #[test]
    fn command_numbers() {
        for raw in 0..64u16 {
            if let Some(c) = Command::from_raw(raw) {
                assert_eq!(c as u16, raw);
            }
        }
        assert_eq!(Command::from_raw(14), None);
        assert_eq!(Command::from_raw(15), Some(Command::RegionWriteMulti));
        assert_eq!(Command::from_raw(0), None);
    }
}
