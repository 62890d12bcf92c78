//! The VFIO migration v2 state machine (`enum vfio_device_mig_state` in Linux
//! `include/uapi/linux/vfio.h`, as vfio-user's DEVICE_FEATURE
//! MIG_DEVICE_STATE uses it).
//!
//! A SET names a final state; the device walks there one *arc* at a time,
//! each arc a step Linux's `vfio_mig_get_next_state` would take: the shortest
//! path, never through a saving state (PRE_COPY*, STOP_COPY) in the interior
//! unless it starts in one,
//! skipping states whose optional feature the device does not offer.
//! STOP_COPY -> PRE_COPY* is refused, and so is ERROR as a target.

use vfio_bindings::bindings::vfio;

/// Migration features a device offers (`VFIO_MIGRATION_*`).
pub const MIGRATION_STOP_COPY: u64 = vfio::VFIO_MIGRATION_STOP_COPY as u64;
pub const MIGRATION_P2P: u64 = vfio::VFIO_MIGRATION_P2P as u64;
pub const MIGRATION_PRE_COPY: u64 = vfio::VFIO_MIGRATION_PRE_COPY as u64;

/// What umdev devices offer: every state. A umdev device never initiates
/// peer-to-peer DMA, so the P2P states behave as their plain twins
/// (RUNNING_P2P as RUNNING, PRE_COPY_P2P as PRE_COPY).
pub const MIGRATION_FLAGS: u64 = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY;

/// A device's migration state, numbered as on the wire.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationState {
    Error = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
    Stop = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
    Running = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
    StopCopy = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
    Resuming = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
    RunningP2p = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
    PreCopy = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
    PreCopyP2p = vfio::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
}

use MigrationState::*;

/// Every state, in wire order.
pub const ALL_STATES: [MigrationState; 8] = [
    Error, Stop, Running, StopCopy, Resuming, RunningP2p, PreCopy, PreCopyP2p,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsmError {
    #[error("unknown migration state {0}")]
    Unknown(u32),
    #[error("migration state {0:?} is not offered by this device")]
    NotOffered(MigrationState),
    #[error("no migration arc leads from {from:?} to {to:?}")]
    NoPath {
        from: MigrationState,
        to: MigrationState,
    },
}

impl MigrationState {
    pub fn from_raw(raw: u32) -> Result<Self, FsmError> {
        ALL_STATES
            .get(raw as usize)
            .copied()
            .ok_or(FsmError::Unknown(raw))
    }

    /// Whether the device runs (serves BAR accesses, raises interrupts, does
    /// DMA) in this state.
    pub fn is_running(self) -> bool {
        matches!(self, Running | RunningP2p | PreCopy | PreCopyP2p)
    }

    /// Whether the device's state can be read out (the saving group).
    pub fn is_saving(self) -> bool {
        matches!(self, PreCopy | PreCopyP2p | StopCopy)
    }

    /// The `VFIO_MIGRATION_*` features a device needs to be in this state.
    fn needs(self) -> u64 {
        match self {
            Error => 0,
            Stop | Running | StopCopy | Resuming => MIGRATION_STOP_COPY,
            RunningP2p => MIGRATION_STOP_COPY | MIGRATION_P2P,
            PreCopy => MIGRATION_STOP_COPY | MIGRATION_PRE_COPY,
            PreCopyP2p => MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY,
        }
    }

    fn offered(self, flags: u64) -> bool {
        self.needs() & flags == self.needs()
    }
}

/// The first step from `from` towards `to` with every optional state (Linux's
/// table: row is where the device is, column where it goes).
fn first_step(from: MigrationState, to: MigrationState) -> MigrationState {
    if from == to {
        return to;
    }
    match (from, to) {
        (Error, _) | (_, Error) => Error,
        (Stop, Running | PreCopy | PreCopyP2p) => RunningP2p,
        (Stop, t) => t,
        (Running, PreCopy) => PreCopy,
        (Running, _) => RunningP2p,
        (PreCopy, PreCopyP2p | StopCopy) => PreCopyP2p,
        (PreCopy, _) => Running,
        (PreCopyP2p, PreCopy) => PreCopy,
        (PreCopyP2p, StopCopy) => StopCopy,
        (PreCopyP2p, _) => RunningP2p,
        (StopCopy, PreCopy | PreCopyP2p) => Error,
        (StopCopy, _) => Stop,
        (Resuming, _) => Stop,
        (RunningP2p, Running | PreCopy) => Running,
        (RunningP2p, PreCopyP2p) => PreCopyP2p,
        (RunningP2p, _) => Stop,
    }
}

/// The next arc the device takes from `from` on its way to `to`, for a
/// device offering `flags`: `Ok(from)` when it is there already.
pub fn next_step(
    from: MigrationState,
    to: MigrationState,
    flags: u64,
) -> Result<MigrationState, FsmError> {
    if !to.offered(flags) || to == Error {
        return Err(if to == Error {
            FsmError::NoPath { from, to }
        } else {
            FsmError::NotOffered(to)
        });
    }
    let mut next = first_step(from, to);
    // States the device lacks are skipped: it sees the arc to the state
    // after them.
    while !next.offered(flags) {
        next = first_step(next, to);
    }
    if next == Error {
        return Err(FsmError::NoPath { from, to });
    }
    Ok(next)
}

/// The whole path from `from` to `to` (without `from`), or why there is none.
pub fn path(
    from: MigrationState,
    to: MigrationState,
    flags: u64,
) -> Result<Vec<MigrationState>, FsmError> {
    let mut at = from;
    let mut steps = Vec::new();
    while at != to {
        at = next_step(at, to, flags)?;
        steps.push(at);
        if steps.len() > ALL_STATES.len() {
            return Err(FsmError::NoPath { from, to });
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASIC: u64 = MIGRATION_STOP_COPY;

    #[test]
    fn the_arcs_vfio_user_names_are_single_steps() {
        for (from, to) in [
            (Running, Stop),
            (StopCopy, Stop),
            (Resuming, Stop),
            (PreCopy, Running),
            (Stop, StopCopy),
            (Stop, Resuming),
            (Running, PreCopy),
            (PreCopy, StopCopy),
        ] {
            let flags = MIGRATION_STOP_COPY | MIGRATION_PRE_COPY;
            assert_eq!(path(from, to, flags), Ok(vec![to]), "{from:?} -> {to:?}");
        }
        assert_eq!(path(Stop, Running, BASIC), Ok(vec![Running]));
    }

    #[test]
    fn combined_transitions_go_through_stop_and_never_through_saving_states() {
        assert_eq!(path(Running, StopCopy, BASIC), Ok(vec![Stop, StopCopy]));
        assert_eq!(path(StopCopy, Resuming, BASIC), Ok(vec![Stop, Resuming]));
        assert_eq!(
            path(Resuming, Running, MIGRATION_FLAGS),
            Ok(vec![Stop, RunningP2p, Running])
        );
        assert_eq!(
            path(Running, StopCopy, MIGRATION_FLAGS),
            Ok(vec![RunningP2p, Stop, StopCopy])
        );
        assert_eq!(
            path(PreCopy, StopCopy, MIGRATION_FLAGS),
            Ok(vec![PreCopyP2p, StopCopy])
        );
        for flags in [BASIC, MIGRATION_FLAGS, BASIC | MIGRATION_PRE_COPY] {
            for &from in &ALL_STATES[1..] {
                for &to in &ALL_STATES[1..] {
                    let Ok(p) = path(from, to, flags) else {
                        continue;
                    };
                    // Only a path that starts saving keeps saving on the way
                    // (PRE_COPY -> PRE_COPY_P2P -> STOP_COPY).
                    let interior = &p[..p.len().saturating_sub(1)];
                    assert!(
                        from.is_saving() || interior.iter().all(|s| !s.is_saving()),
                        "{from:?} -> {to:?}: {p:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn refused_targets() {
        for flags in [BASIC, MIGRATION_FLAGS] {
            for &to in &[PreCopy, PreCopyP2p] {
                assert!(path(StopCopy, to, flags).is_err());
            }
            assert!(path(Running, Error, flags).is_err());
            assert!(path(Error, Running, flags).is_err());
        }
        assert_eq!(
            next_step(Running, PreCopy, BASIC),
            Err(FsmError::NotOffered(PreCopy))
        );
        assert_eq!(
            next_step(Running, RunningP2p, BASIC),
            Err(FsmError::NotOffered(RunningP2p))
        );
        assert_eq!(MigrationState::from_raw(8), Err(FsmError::Unknown(8)));
        assert_eq!(
            MigrationState::from_raw(u32::MAX),
            Err(FsmError::Unknown(u32::MAX))
        );
    }

    #[test]
    fn every_pair_but_the_refused_ones_has_a_path() {
        for &from in &ALL_STATES[1..] {
            for &to in &ALL_STATES[1..] {
                let blocked = from == StopCopy && matches!(to, PreCopy | PreCopyP2p);
                assert_eq!(
                    path(from, to, MIGRATION_FLAGS).is_ok(),
                    !blocked,
                    "{from:?} -> {to:?}"
                );
            }
        }
    }
}
