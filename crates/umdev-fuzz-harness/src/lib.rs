//! Harnesses of the umdev fuzz targets. They are plain functions over bytes, so
//! the same code runs under libFuzzer (`cargo fuzz run <target>`, the binaries in
//! `fuzz/fuzz_targets/`) and as a replay of the corpora on stable Rust
//! (`tests/fuzz_corpus.rs` in the root workspace). See `docs/robustness.md`.

pub mod device_state;
pub mod metrics;
pub mod migration;
pub mod pci_config;
pub mod seeds;
pub mod session;
pub mod vgpu;
pub mod vgpu_control;
pub mod virtio_gpu;
pub mod vnc;
