//! The virtio-gpu request decoder and command handlers over guest memory the
//! input fills.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::virtio_gpu::run(data);
});
