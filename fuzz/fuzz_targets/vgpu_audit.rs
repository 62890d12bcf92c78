//! The vGPU's command parser and auditor over arbitrary guest memory: rings,
//! batches and page tables from the input, every audited step checked against
//! the guest's tables.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::vgpu::run_audit(data);
});
