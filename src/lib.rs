//! umdev: userspace mediated devices.
//!
//! A device backend process that speaks vfio-user on a UNIX socket, maps the
//! guest memory its client shares, and runs a PCI device model. See
//! `../shared/DESIGN.md` for the architecture and the protocol facts real clients
//! depend on.

pub mod benchmark;
pub mod cli;
pub mod event;
pub mod fd;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod pagetrack;
pub mod pci;
pub mod sandbox;
pub mod scanout;
pub mod state;
#[cfg(test)]
mod test_util;
pub mod vfio_user;
pub mod vhost_user;
pub mod vnc;
