//! The PCI device framework: config space, capabilities, BARs, MSI-X and
//! interrupts, around a device model that implements [`PciDevice`].

pub mod bar;
pub mod capability;
pub mod config;
pub mod device;
pub mod function;
pub mod irq;
pub mod irqfd;
pub mod msix;

pub use bar::{BarDef, BarIndex, BarKind};
pub use capability::MsixLayout;
pub use config::PciIds;
pub use device::{BarMapping, DeviceContext, PciDevice, PciDeviceDescription};
pub use function::{PciError, PciFunction, Region, RegionDescription};
pub use irq::{InterruptHandle, Interrupts, IrqKind, IrqKindInfo, VectorRange};
