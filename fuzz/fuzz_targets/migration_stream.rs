//! Migration streams written to a destination in RESUMING, in pieces of any
//! size, then restored: an error or a device that migrates on, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::migration::run(data);
});
