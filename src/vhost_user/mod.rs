//! vhost-user transport: umdev's glue over the rust-vmm `vhost-user-backend`
//! and `virtio-queue` crates.
//!
//! The crates speak the protocol (SET_MEM_TABLE, vrings, kicks and calls,
//! SET_LOG_BASE); umdev adds what a device model should not repeat:
//! - [`device::VirtioDevice`], the small trait a virtio model implements;
//! - [`backend::DeviceBackend`], which pops descriptor chains, updates the used
//!   ring and suppresses notifications for the model;
//! - [`dirty_log`], the dirty log gated by `VHOST_F_LOG_ALL`;
//! - [`guarded_memory`], the memory table checked and guarded against a
//!   front-end that takes it away (SIGBUS);
//! - [`vring`], the crate's vring with kick and call fds that never block;
//! - [`gpu_socket`], the vhost-user-gpu display socket taken back from the
//!   `vhost` crate, so that a display that never reads cannot block;
//! - [`server`], the accept loop that resets the model between front-ends
//!   (reconnect) and confines the process.

pub mod backend;
pub mod device;
pub mod dirty_log;
pub mod gpu_socket;
pub mod guarded_memory;
pub mod server;
pub mod vring;

pub use backend::{BackendStats, DeviceBackend};
pub use device::{RequestReader, RequestWriter, VirtioDevice};
pub use dirty_log::{LogBitmap, VhostMemory, VhostMemoryAtomic};
pub use server::{run, serve, StopHandle, VhostUserArgs};
pub use vring::Vring;
