//! Live migration of a device: the VFIO migration v2 state machine
//! ([`fsm`]), the stream that carries the device's state ([`stream`]), and
//! [`DeviceMigration`], which walks a [`PciFunction`] through the arcs.
//!
//! What each arc does here:
//!
//! | arc | action |
//! |---|---|
//! | RUNNING(_P2P) -> STOP, PRE_COPY(_P2P) -> STOP_COPY | [`PciFunction::quiesce`]: the model finishes its work under way |
//! | RUNNING -> PRE_COPY (and the _P2P twin) | a stream is opened with an early image of the state |
//! | PRE_COPY(_P2P) -> STOP_COPY, STOP -> STOP_COPY | the final image is queued as the chunks that changed, then END |
//! | PRE_COPY -> RUNNING, STOP_COPY -> STOP | the stream is dropped |
//! | STOP -> RESUMING | an empty incoming stream |
//! | RESUMING -> STOP | the complete image is restored ([`PciFunction::restore`]) |
//! | STOP -> RUNNING(_P2P) | [`PciFunction::resume`] |
//!
//! The state image is [`PciFunction::save`]'s blob: configuration space,
//! interrupts, the DMA map list and the model's state. Guest memory is not in
//! it: the VMM copies that, using the device's dirty log
//! ([`crate::memory::dirty_log`]) for the pages the device wrote.
//!
//! While the device is not running, the transport sends it no BAR access
//! and starts no queued DMA (the vfio-user server answers such accesses with
//! an error); configuration space stays reachable, as VFIO requires.

pub mod fsm;
pub mod stream;

pub use fsm::{FsmError, MigrationState, MIGRATION_FLAGS};
pub use stream::{StreamError, StreamReader, StreamWriter};

use tracing::{debug, info, warn};

use crate::pci::PciFunction;
use crate::state::StateError;

/// The largest state image a destination accepts, unless told otherwise.
pub const DEFAULT_MAX_IMAGE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("this device cannot migrate (its model saves no state)")]
    Unsupported,
    #[error(transparent)]
    Fsm(#[from] FsmError),
    #[error("migration data can be read only in PRE_COPY or STOP_COPY, not {0:?}")]
    NotSaving(MigrationState),
    #[error("migration data can be written only in RESUMING, not {0:?}")]
    NotResuming(MigrationState),
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    #[error("device state: {0}")]
    State(#[from] StateError),
}

/// A device's migration state and its data stream, for one client.
#[derive(Debug)]
pub struct DeviceMigration {
    state: MigrationState,
    flags: u64,
    outgoing: Option<StreamWriter>,
    incoming: Option<Box<StreamReader>>,
    max_image: u64,
}

impl Default for DeviceMigration {
    fn default() -> Self {
        Self::new(MIGRATION_FLAGS, DEFAULT_MAX_IMAGE)
    }
}

impl DeviceMigration {
    /// A running device offering `flags` (`VFIO_MIGRATION_*`) that accepts
    /// state images up to `max_image` bytes.
    pub fn new(flags: u64, max_image: u64) -> Self {
        DeviceMigration {
            state: MigrationState::Running,
            flags,
            outgoing: None,
            incoming: None,
            max_image,
        }
    }

    pub fn state(&self) -> MigrationState {
        self.state
    }

    /// The `VFIO_MIGRATION_*` features offered.
    pub fn flags(&self) -> u64 {
        self.flags
    }

    /// Whether BAR accesses and DMA may reach the device now.
    #[inline]
    pub fn device_runs(&self) -> bool {
        self.state.is_running()
    }

    /// The device was reset (DEVICE_RESET, the only way out of ERROR): it
    /// runs, and any stream is gone.
    pub fn reset(&mut self) {
        self.state = MigrationState::Running;
        self.outgoing = None;
        self.incoming = None;
    }

    /// Walks to `target` arc by arc. A refused target changes nothing; an arc
    /// that fails leaves the device in the last state it reached, or in
    /// ERROR when the state it was in no longer holds.
    pub fn set_state(
        &mut self,
        target: MigrationState,
        function: &mut PciFunction,
    ) -> Result<(), MigrationError> {
        if !function.migratable() {
            return Err(MigrationError::Unsupported);
        }
        // The whole path is checked before the first arc is taken.
        let path = fsm::path(self.state, target, self.flags)?;
        for next in path {
            self.arc(next, function)?;
            debug!(from = ?self.state, to = ?next, "migration arc");
            self.state = next;
        }
        Ok(())
    }

    fn arc(
        &mut self,
        to: MigrationState,
        function: &mut PciFunction,
    ) -> Result<(), MigrationError> {
        use MigrationState::*;
        match (self.state, to) {
            (Running | RunningP2p, Stop) => function.quiesce(),
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                let mut out = StreamWriter::new();
                let queued = out.queue_image(function.save()?);
                info!(bytes = queued, "migration: pre-copy image queued");
                self.outgoing = Some(out);
            }
            (PreCopy | PreCopyP2p, StopCopy) | (Stop, StopCopy) => {
                if self.state != Stop {
                    function.quiesce();
                }
                let mut out = self.outgoing.take().unwrap_or_default();
                let queued = out.queue_image(function.save()?);
                out.finish();
                info!(bytes = queued, "migration: final image queued");
                self.outgoing = Some(out);
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                self.outgoing = None;
            }
            (Stop, Resuming) => {
                self.incoming = Some(Box::new(StreamReader::new(self.max_image)));
            }
            (Resuming, Stop) => {
                let incoming = self.incoming.as_ref().ok_or(StreamError::Incomplete)?;
                // An unfinished stream: the client may still send the rest.
                let image = incoming.image()?;
                match function.restore(image) {
                    Ok(source_maps) => {
                        let here = function.dma_maps();
                        let same = source_maps.len() == here.len()
                            && source_maps
                                .iter()
                                .zip(&here)
                                .all(|(a, b)| a.gpa == b.gpa && a.size == b.size);
                        if !same {
                            warn!(
                                source = source_maps.len(),
                                here = here.len(),
                                "migration: the destination's DMA map differs from the source's"
                            );
                        }
                        info!(bytes = image.len(), "migration: device state restored");
                        self.incoming = None;
                    }
                    Err(e) => {
                        // The device is as it was, but the stream cannot be
                        // used: the client must reset.
                        warn!("migration: restoring the device state failed: {e}");
                        self.incoming = None;
                        self.state = Error;
                        return Err(e.into());
                    }
                }
            }
            (Stop, Running | RunningP2p) => function.resume(),
            // Arcs between a state and its P2P twin change nothing here.
            _ => {}
        }
        Ok(())
    }

    /// Up to `max` bytes of the outgoing stream; fewer (possibly none) means
    /// no more for now. In PRE_COPY a read that finds nothing queued takes a
    /// fresh image and queues what changed since the last one.
    pub fn read(&mut self, max: usize, function: &PciFunction) -> Result<Vec<u8>, MigrationError> {
        let Some(out) = self.outgoing.as_mut().filter(|_| self.state.is_saving()) else {
            return Err(MigrationError::NotSaving(self.state));
        };
        if out.pending() == 0 && !out.is_finished() {
            let queued = out.queue_image(function.save()?);
            debug!(bytes = queued, "migration: pre-copy delta queued");
        }
        Ok(out.read(max))
    }

    /// Takes the next piece of the incoming stream. A malformed stream puts
    /// the device in ERROR (the client must reset it).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        let Some(incoming) = self
            .incoming
            .as_mut()
            .filter(|_| self.state == MigrationState::Resuming)
        else {
            return Err(MigrationError::NotResuming(self.state));
        };
        if let Err(e) = incoming.feed(bytes) {
            warn!("migration: bad incoming stream: {e}");
            self.incoming = None;
            self.state = MigrationState::Error;
            return Err(e.into());
        }
        Ok(())
    }

    /// An estimate of the bytes STOP_COPY will produce: what is queued and a
    /// whole image.
    pub fn stop_copy_size(&self, function: &PciFunction) -> Result<u64, MigrationError> {
        if !function.migratable() {
            return Err(MigrationError::Unsupported);
        }
        let queued = self.outgoing.as_ref().map_or(0, |o| o.pending());
        Ok((queued + function.save()?.len() + 64) as u64)
    }
}
