//! The errno an error reply carries, for each typed error of the framework.
//!
//! Errnos are the wire's business: the library and the models return typed
//! errors, and only the vfio-user server turns them into numbers.

use crate::memory::MemoryError;
use crate::pagetrack::TrackError;
use crate::pci::irq::IrqError;
use crate::pci::irqfd::IrqFdError;
use crate::pci::PciError;

/// The errno of an error reply for this error.
pub trait Errno {
    fn errno(&self) -> i32;
}

impl Errno for MemoryError {
    fn errno(&self) -> i32 {
        match self {
            MemoryError::BusMasterDisabled => libc::EPERM,
            MemoryError::Unmapped(_) | MemoryError::NotMapped { .. } => libc::ENOENT,
            MemoryError::Overflow { .. } | MemoryError::Invalid(_) => libc::EINVAL,
            MemoryError::PartialUnmap { .. } => libc::EINVAL,
            MemoryError::Permission(_) => libc::EACCES,
            MemoryError::Overlap { .. } => libc::EEXIST,
            MemoryError::TooManyRegions(_) => libc::ENOSPC,
            MemoryError::Fd(_)
            | MemoryError::NotRegularFile
            | MemoryError::FileTooShort { .. }
            | MemoryError::Mmap(_) => libc::EINVAL,
            MemoryError::Guard(_) | MemoryError::QueueFull => libc::ENOSPC,
            MemoryError::NoTransport => libc::ENOTCONN,
            MemoryError::NoHostMapping(_) => libc::EINVAL,
            MemoryError::Transport(_) | MemoryError::Access(_) => libc::EIO,
            MemoryError::Lost(_) => libc::EFAULT,
        }
    }
}

impl Errno for TrackError {
    fn errno(&self) -> i32 {
        match self {
            TrackError::NotMapped(_) | TrackError::NotTracked(_) => libc::ENOENT,
            TrackError::RefcountOverflow(_) => libc::EOVERFLOW,
            TrackError::TooManyPages(_) => libc::ENOSPC,
            TrackError::Guard(_) => libc::ENOSPC,
            TrackError::Unaligned { .. }
            | TrackError::BitmapOffset(_)
            | TrackError::Fd(_)
            | TrackError::Wraps { .. }
            | TrackError::BitmapNotAFile
            | TrackError::BitmapTooShort { .. }
            | TrackError::BitmapMap(_)
            | TrackError::NotUserfaultfd(_)
            | TrackError::NoFaultHandler
            | TrackError::UffdOverlap { .. }
            | TrackError::NotHostMapped { .. } => libc::EINVAL,
            TrackError::Unsupported(_) => libc::ENOTSUP,
        }
    }
}

impl Errno for PciError {
    fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

impl Errno for IrqError {
    fn errno(&self) -> i32 {
        match self {
            IrqError::Unsupported(_) => libc::EINVAL,
            IrqError::Fd(IrqFdError::NonBlocking { .. }) => libc::EIO,
            _ => libc::EINVAL,
        }
    }
}

impl Errno for crate::migration::MigrationError {
    fn errno(&self) -> i32 {
        use crate::migration::MigrationError as E;
        match self {
            E::Unsupported => libc::ENOTTY,
            E::Fsm(_) | E::NotSaving(_) | E::NotResuming(_) | E::Stream(_) | E::State(_) => {
                libc::EINVAL
            }
        }
    }
}

impl Errno for crate::memory::DirtyLogError {
    fn errno(&self) -> i32 {
        use crate::memory::DirtyLogError as E;
        match self {
            E::AlreadyStarted => libc::EBUSY,
            E::TooManyRanges(_) | E::ReportTooLarge { .. } => libc::E2BIG,
            E::NotStarted | E::PageSize(_) | E::BadRange { .. } | E::Overlap(_) => libc::EINVAL,
        }
    }
}
