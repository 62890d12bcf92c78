//! vfio's view of a PCI function mapped onto the typed one: region and IRQ
//! index numbering, GET_IRQ_INFO flags, and SET_IRQS decoded into the calls
//! of [`Interrupts`]. The PCI layer knows nothing of these numbers.

use std::os::fd::OwnedFd;

use super::errno::Errno;
use super::wire::*;
use crate::pci::irq::VectorRange;
use crate::pci::{Interrupts, IrqKind, IrqKindInfo, Region};

/// vfio's region numbering: BARs 0-5, the ROM, config space, VGA.
pub fn region_of(index: u32) -> Option<Region> {
    match index {
        0..=5 => Some(Region::Bar(index as usize)),
        PCI_ROM_REGION_INDEX => Some(Region::Rom),
        PCI_CONFIG_REGION_INDEX => Some(Region::Config),
        PCI_VGA_REGION_INDEX => Some(Region::Vga),
        _ => None,
    }
}

/// vfio's IRQ index numbering: INTx, MSI, MSI-X, ERR, REQ.
pub fn irq_kind_of(index: u32) -> Option<IrqKind> {
    IrqKind::ALL.get(index as usize).copied()
}

/// GET_IRQ_INFO flags for what an interrupt kind offers.
pub fn irq_info_flags(info: IrqKindInfo) -> u32 {
    let mut flags = IRQ_INFO_EVENTFD;
    if info.maskable {
        flags |= IRQ_INFO_MASKABLE;
    }
    if info.automasked {
        flags |= IRQ_INFO_AUTOMASKED;
    }
    if !info.resizable {
        flags |= IRQ_INFO_NORESIZE;
    }
    flags
}

/// Carries out SET_IRQS `set` (with the payload after its header in `rest`
/// and the fds that came with it) on `irqs`; the errno on refusal.
pub fn set_irqs(
    irqs: &std::sync::Arc<Interrupts>,
    set: &IrqSet,
    rest: &[u8],
    fds: Vec<OwnedFd>,
) -> Result<(), i32> {
    let kind = irq_kind_of(set.index).ok_or(libc::EINVAL)?;
    let data = set.flags & IRQ_SET_DATA_MASK;
    let action = set.flags & IRQ_SET_ACTION_MASK_ALL;
    if data.count_ones() != 1
        || action.count_ones() != 1
        || set.flags & !(IRQ_SET_DATA_MASK | IRQ_SET_ACTION_MASK_ALL) != 0
    {
        return Err(libc::EINVAL);
    }
    // The vector range is checked before anything is sized by `count`: a
    // count of 2^32-1 with no fds would otherwise allocate 16 GiB (fuzzing).
    let available = irqs.info(kind).count;
    let end = set.start.checked_add(set.count);
    if end.is_none_or(|end| end > available) || (set.count == 0 && set.start != 0) {
        return Err(libc::EINVAL);
    }
    let select = match data {
        IRQ_SET_DATA_BOOL => Some(rest.get(..set.count as usize).ok_or(libc::EINVAL)?),
        _ => None,
    };
    let vectors = VectorRange {
        first: set.start,
        count: set.count,
        select,
    };
    let result = match (action, data) {
        (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD) => {
            irqs.assign(kind, set.start, eventfd_list(set, fds)?)
        }
        (IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_NONE) if set.count == 0 => {
            irqs.disable(kind);
            Ok(())
        }
        (IRQ_SET_ACTION_TRIGGER, _) => irqs.trigger(kind, vectors),
        (IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD) if kind == IrqKind::Intx => {
            let mut fds = eventfd_list(set, fds)?;
            irqs.set_intx_unmask_eventfd(fds.pop().flatten())
        }
        // Only INTx has an unmask eventfd, as in the kernel's vfio-pci.
        (_, IRQ_SET_DATA_EVENTFD) => return Err(libc::EINVAL),
        (IRQ_SET_ACTION_MASK, _) => irqs.mask(kind, vectors),
        (IRQ_SET_ACTION_UNMASK, _) => irqs.unmask(kind, vectors),
        _ => return Err(libc::EINVAL),
    };
    result.map_err(|e| {
        tracing::debug!("SET_IRQS refused: {e}");
        e.errno()
    })
}

/// One entry per vector: the fds sent, or none at all (every vector's
/// eventfd taken away).
fn eventfd_list(set: &IrqSet, fds: Vec<OwnedFd>) -> Result<Vec<Option<OwnedFd>>, i32> {
    let count = set.count as usize;
    if fds.is_empty() {
        return Ok((0..count).map(|_| None).collect());
    }
    if fds.len() != count {
        return Err(libc::EINVAL);
    }
    Ok(fds.into_iter().map(Some).collect())
}
