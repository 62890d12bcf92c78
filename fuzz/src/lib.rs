//! The fuzz targets' harnesses live in `crates/umdev-fuzz-harness` (shared
//! with the stable replay in `tests/fuzz_corpus.rs`); this crate links them
//! with libFuzzer.

pub use umdev_fuzz_harness::*;
