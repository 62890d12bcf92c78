//! The seam between the vhost-user glue and a virtio device model.
//!
//! A model describes its queues, features and config space, and handles one
//! request (a descriptor chain, as a [`Reader`] of what the driver wrote and a
//! [`Writer`] for the reply) at a time. It never sees the vhost-user socket,
//! vrings or notification suppression: [`backend`](super::backend) owns those.

use std::io;

use vhost::vhost_user::GpuBackend;
use virtio_queue::{Reader, Writer};

use super::dirty_log::{LogBitmap, VhostMemory};

/// What a request's descriptors read from guest memory through.
pub type RequestReader<'a> = Reader<'a, LogBitmap>;
/// What a request's reply is written to guest memory through; every byte
/// written is marked in the dirty log while logging is on.
pub type RequestWriter<'a> = Writer<'a, LogBitmap>;

/// A virtio device served over vhost-user.
pub trait VirtioDevice: Send + Sync + 'static {
    /// Name for logs and thread names.
    fn name(&self) -> &str;

    /// Number of virtqueues.
    fn num_queues(&self) -> usize;

    /// Largest queue size the model accepts.
    fn max_queue_size(&self) -> u16 {
        256
    }

    /// Virtio feature bits the model offers (device-specific ones and the
    /// transport ones it handles, such as `VIRTIO_F_VERSION_1`). The glue adds
    /// `VHOST_USER_F_PROTOCOL_FEATURES` and `VHOST_F_LOG_ALL`.
    fn features(&self) -> u64;

    /// The feature bits the driver accepted.
    fn ack_features(&self, _features: u64) {}

    /// Reads `len` bytes of the device config space at `offset`.
    fn read_config(&self, offset: u32, len: u32) -> Vec<u8>;

    /// Writes the device config space (the driver's write, relayed by the
    /// front-end).
    fn write_config(&self, _offset: u32, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Handles one request from queue `queue`: reads it from `request`, writes
    /// the reply to `reply`, and returns the number of bytes written (the used
    /// length). A malformed request must still be answered (with the device's
    /// error status) or consumed with length 0; it must never panic.
    ///
    /// `mem` (and what `request` and `reply` reach) is the front-end's memory:
    /// if the front-end takes it away meanwhile (truncates the file under the
    /// mapping), reads return zeroes and writes go nowhere instead of killing
    /// the process, and the glue drops the request afterwards and stops the
    /// queues (`guarded_memory`). A model only needs to survive zeroes.
    fn handle_request(
        &self,
        queue: u16,
        mem: &VhostMemory,
        request: &mut RequestReader<'_>,
        reply: &mut RequestWriter<'_>,
    ) -> u32;

    /// Returns the model to its power-on state: the driver reset the device or
    /// the front-end went away.
    fn reset(&self);

    /// The model's state, for migration (a versioned blob in the
    /// `umdev::state` layout; virtqueue positions are the front-end's).
    fn save(&self) -> Result<Vec<u8>, crate::state::StateError> {
        Err(crate::state::StateError::Unsupported)
    }

    /// Takes the state [`save`](Self::save) made; a bad blob is an error and
    /// changes nothing.
    fn restore(&self, _blob: &[u8]) -> Result<(), crate::state::StateError> {
        Err(crate::state::StateError::Unsupported)
    }

    /// The vhost-user-gpu display channel (`VHOST_USER_GPU_SET_SOCKET`); only GPU
    /// models take it.
    fn set_gpu_socket(&self, _gpu: GpuBackend) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}
