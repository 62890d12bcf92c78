//! The vfio-user protocol: wire format, framing, the server and a client.

pub mod caps;
pub mod client;
mod deferred;
pub mod dma;
pub mod errno;
mod feature;
pub mod migration_client;
pub mod pci_map;
pub mod server;
pub mod socket;
pub mod transport;
pub mod wire;

pub use client::Client;
pub use migration_client::{migrate, Migration, MigrationReport};
pub use server::{Server, ServerConfig, Session, StopHandle};
pub use transport::{MemoryTransport, Transport};
