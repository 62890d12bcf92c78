//! A whole vfio-user server session (edu device) fed the input as raw bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::session::run_bytes(data);
});
