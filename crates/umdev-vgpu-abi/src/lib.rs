//! The vGPU's programming model as code (device-models/vgpu/SPEC.md): what
//! the device, a guest driver, the fuzz harness and the benchmark must agree
//! on, defined once. Plain Rust, no dependencies, so that the statically
//! built guest driver can use it too.

pub mod encode;
pub mod pagetable;
pub mod picture;
pub mod regs;
