//! Base Address Registers: what a device declares, and what the BAR register's
//! read-only flag bits and writable address bits are for it.

pub const NUM_BARS: usize = 6;

/// Index of a BAR, 0 to 5.
pub type BarIndex = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Memory32 {
        prefetchable: bool,
    },
    /// Takes this BAR's register and the next one.
    Memory64 {
        prefetchable: bool,
    },
    Io,
}

/// Why a [`BarDef`] is not one hardware could have ([`BarDef::validate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    #[error("BAR size {size:#x} is not a power of two")]
    NotPowerOfTwo { size: u64 },
    #[error("I/O BAR size {size:#x} is not 4 bytes to 64 KiB")]
    IoSize { size: u64 },
    #[error("32-bit memory BAR size {size:#x} is not 16 bytes to 2 GiB")]
    Memory32Size { size: u64 },
    #[error("64-bit memory BAR size {size:#x} is not 16 bytes to 4 EiB")]
    Memory64Size { size: u64 },
}

/// A BAR the device implements: its kind and size (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarDef {
    pub kind: BarKind,
    pub size: u64,
}

impl BarDef {
    pub const fn memory32(size: u64, prefetchable: bool) -> Self {
        BarDef {
            kind: BarKind::Memory32 { prefetchable },
            size,
        }
    }
    pub const fn memory64(size: u64, prefetchable: bool) -> Self {
        BarDef {
            kind: BarKind::Memory64 { prefetchable },
            size,
        }
    }
    pub const fn io(size: u64) -> Self {
        BarDef {
            kind: BarKind::Io,
            size,
        }
    }

    pub fn is_io(&self) -> bool {
        self.kind == BarKind::Io
    }

    /// Checks what hardware could not have: sizes that are not powers of two, too
    /// small, or too large for the BAR kind.
    pub fn validate(&self) -> Result<(), BarError> {
        let size = self.size;
        if !size.is_power_of_two() {
            return Err(BarError::NotPowerOfTwo { size });
        }
        match self.kind {
            BarKind::Io if !(4..=0x1_0000).contains(&size) => Err(BarError::IoSize { size }),
            BarKind::Memory32 { .. } if !(16..=1 << 31).contains(&size) => {
                Err(BarError::Memory32Size { size })
            }
            BarKind::Memory64 { .. } if !(16..=1 << 62).contains(&size) => {
                Err(BarError::Memory64Size { size })
            }
            _ => Ok(()),
        }
    }

    /// The read-only low bits of the BAR register.
    pub fn flag_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    0x8
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => 0x4 | if prefetchable { 0x8 } else { 0 },
        }
    }

    /// The address bits software may write (the rest read back as zero, which is
    /// how sizing works). For 64-bit BARs the high half covers the upper register.
    pub fn address_mask(&self) -> u64 {
        let addr_bits = !(self.size - 1);
        match self.kind {
            BarKind::Io => addr_bits & 0xffff_fffc,
            BarKind::Memory32 { .. } => addr_bits & 0xffff_fff0,
            BarKind::Memory64 { .. } => addr_bits & !0xf,
        }
    }
}
