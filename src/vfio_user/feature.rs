//! DEVICE_FEATURE: decoding the request, checking it as Linux's
//! `vfio_ioctl_device_feature` does, and answering from the device's
//! [`DeviceMigration`] and the guest memory's dirty log.
//!
//! The reply to a SET or a PROBE is the request; the reply to a GET is the
//! head with `argsz` grown by the feature's data, then the data.

use std::mem::size_of;

use super::wire::*;
use crate::memory::dirty_log::{LogRange, LOG_PAGE_SIZE, MAX_LOG_RANGES};
use crate::memory::GuestMemory;
use crate::migration::{DeviceMigration, MigrationError, MigrationState};
use crate::pci::PciFunction;

use super::errno::Errno;

/// What one DEVICE_FEATURE needs to be answered.
pub(super) struct FeatureContext<'a> {
    pub migration: &'a mut DeviceMigration,
    pub function: &'a mut PciFunction,
    pub memory: &'a GuestMemory,
    /// Largest reply payload the client takes.
    pub max_reply: usize,
}

/// Which of GET and SET a feature takes, and the least data each needs.
struct Ops {
    get: bool,
    set: bool,
    /// Least request data (SET) or reply room (GET).
    min: usize,
}

/// Answers one DEVICE_FEATURE; `payload` is the whole request payload.
pub(super) fn handle(payload: &[u8], cx: FeatureContext<'_>) -> Result<Vec<u8>, i32> {
    let head = DeviceFeature::read_from(payload).ok_or(libc::EINVAL)?;
    let data = &payload[size_of::<DeviceFeature>()..];
    let flags = head.flags;
    if (head.argsz as usize) < size_of::<DeviceFeature>()
        || flags & !(FEATURE_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE) != 0
    {
        return Err(libc::EINVAL);
    }
    let (get, set, probe) = (
        flags & FEATURE_GET != 0,
        flags & FEATURE_SET != 0,
        flags & FEATURE_PROBE != 0,
    );
    if !probe && get && set {
        return Err(libc::EINVAL);
    }
    let feature = flags & FEATURE_MASK;
    let migration_feature = matches!(
        feature,
        FEATURE_MIGRATION | FEATURE_MIG_DEVICE_STATE | FEATURE_MIG_DATA_SIZE
    );
    if migration_feature && !cx.function.migratable() {
        return Err(libc::ENOTTY);
    }
    let ops = match feature {
        FEATURE_MIGRATION | FEATURE_MIG_DATA_SIZE => Ops {
            get: true,
            set: false,
            min: 8,
        },
        FEATURE_MIG_DEVICE_STATE => Ops {
            get: true,
            set: true,
            min: size_of::<MigDeviceState>(),
        },
        FEATURE_DMA_LOGGING_START => Ops {
            get: false,
            set: true,
            min: size_of::<DmaLoggingControl>(),
        },
        FEATURE_DMA_LOGGING_STOP => Ops {
            get: false,
            set: true,
            min: 0,
        },
        FEATURE_DMA_LOGGING_REPORT => Ops {
            get: true,
            set: false,
            min: size_of::<DmaLoggingReport>(),
        },
        _ => return Err(libc::ENOTTY),
    };
    if (get && !ops.get) || (set && !ops.set) {
        return Err(libc::EINVAL);
    }
    if probe {
        return Ok(payload.to_vec());
    }
    if !get && !set {
        return Err(libc::EINVAL);
    }
    let room = (head.argsz as usize - size_of::<DeviceFeature>()).min(cx.max_reply);
    if (set && data.len() < ops.min) || (get && room < ops.min) {
        return Err(libc::EINVAL);
    }
    let reply_data: Vec<u8> = match (feature, get) {
        (FEATURE_MIGRATION, _) => cx.migration.flags().to_le_bytes().to_vec(),
        (FEATURE_MIG_DATA_SIZE, _) => cx
            .migration
            .stop_copy_size(cx.function)
            .map_err(|e| e.errno())?
            .to_le_bytes()
            .to_vec(),
        (FEATURE_MIG_DEVICE_STATE, true) => state_reply(cx.migration.state()),
        (FEATURE_MIG_DEVICE_STATE, false) => {
            let ask = MigDeviceState::read_from(data).ok_or(libc::EINVAL)?;
            let target = MigrationState::from_raw(ask.device_state)
                .map_err(|e| MigrationError::from(e).errno())?;
            cx.migration
                .set_state(target, cx.function)
                .map_err(|e| e.errno())?;
            return Ok(set_reply(head, &state_reply(cx.migration.state())));
        }
        (FEATURE_DMA_LOGGING_START, _) => {
            let control = DmaLoggingControl::read_from(data).ok_or(libc::EINVAL)?;
            let ranges = &data[size_of::<DmaLoggingControl>()..];
            let n = control.num_ranges as usize;
            if n > MAX_LOG_RANGES {
                return Err(libc::E2BIG);
            }
            const RANGE: usize = size_of::<DmaLoggingRange>();
            if ranges.len() < n * RANGE {
                return Err(libc::EINVAL);
            }
            let ranges = ranges
                .chunks_exact(RANGE)
                .take(n)
                .filter_map(DmaLoggingRange::read_from)
                .map(|r| LogRange {
                    iova: r.iova,
                    length: r.length,
                })
                .collect();
            cx.memory
                .start_dirty_log(ranges, control.page_size)
                .map_err(|e| e.errno())?;
            // The page size we keep is LOG_PAGE_SIZE or the client's larger one.
            let mut echo = payload.to_vec();
            let granted = DmaLoggingControl {
                page_size: control.page_size.max(LOG_PAGE_SIZE),
                ..control
            };
            let at = size_of::<DeviceFeature>();
            echo[at..at + size_of::<DmaLoggingControl>()].copy_from_slice(granted.as_bytes());
            return Ok(echo);
        }
        (FEATURE_DMA_LOGGING_STOP, _) => {
            cx.memory.stop_dirty_log().map_err(|e| e.errno())?;
            return Ok(payload.to_vec());
        }
        (FEATURE_DMA_LOGGING_REPORT, _) => {
            let ask = DmaLoggingReport::read_from(data).ok_or(libc::EINVAL)?;
            let max_bitmap = room - size_of::<DmaLoggingReport>();
            let bitmap = cx
                .memory
                .report_dirty(ask.iova, ask.length, ask.page_size, max_bitmap)
                .map_err(|e| e.errno())?;
            let mut out = ask.as_bytes().to_vec();
            for w in bitmap {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out
        }
        _ => return Err(libc::EINVAL),
    };
    if reply_data.len() > room {
        return Err(libc::E2BIG);
    }
    let mut reply = DeviceFeature {
        argsz: (size_of::<DeviceFeature>() + reply_data.len()) as u32,
        flags,
    }
    .as_bytes()
    .to_vec();
    reply.extend_from_slice(&reply_data);
    Ok(reply)
}

fn state_reply(state: MigrationState) -> Vec<u8> {
    MigDeviceState {
        device_state: state as u32,
        data_fd: -1,
    }
    .as_bytes()
    .to_vec()
}

fn set_reply(head: DeviceFeature, data: &[u8]) -> Vec<u8> {
    let mut reply = head.as_bytes().to_vec();
    reply.extend_from_slice(data);
    reply
}
