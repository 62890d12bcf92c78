//! Any bytes as a request line to the vGPU parent's control socket: a request
//! or an error answer, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::vgpu_control::run(data);
});
