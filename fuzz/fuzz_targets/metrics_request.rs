//! Any bytes as a request to the metrics endpoint: an HTTP answer, never a
//! panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::metrics::run(data);
});
