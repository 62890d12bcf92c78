//! The vGPU's shadow page tables under arbitrary guest page-table entries, sync
//! points and remaps, compared with a reference walk of the guest's tables.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    umdev_fuzz::vgpu::run_page_tables(data);
});
