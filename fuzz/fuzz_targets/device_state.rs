//! Device state blobs (a migration stream's payload) restored into every
//! model: refused or accepted, never a panic; what is accepted carries on.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::device_state::run(data);
});
