//! The vGPU's state through the device contract, in process: saved
//! mid-workload, restored into a fresh vGPU over the same guest memory,
//! continued (with a page-table edit that only a rebuilt, re-tracked shadow
//! sees), with the same results as a vGPU that never stopped; hostile blobs
//! refused without a change.

use umdev::memory::{DmaRegion, GuestMemory, MappedMemfd};
use umdev_vgpu::encode::{self as cmd, pte};
use umdev_vgpu::inprocess::*;
use umdev_vgpu::regs::*;
use umdev_vgpu::VgpuConfig;

const PAGE_X: u64 = RAM_GPA + 0x20_0000;
const PAGE_Y: u64 = RAM_GPA + 0x20_1000;
const FENCE_PAGE: u64 = RAM_GPA + 0x20_2000;

fn first_half(gpu: &mut Gpu, ram: &Ram, t: &mut Tables) {
    t.map(ram, A_VA, PAGE_X, false);
    t.map(ram, FENCE_VA, FENCE_PAGE, false);
    t.map(ram, VRAM_VA, 0x3000, true);
    gpu.program(Tables::ROOT);
    // GGTT: two entries into VRAM, one into RAM.
    gpu.w64(GGTT_OFFSET, pte(0x1000, true, true));
    gpu.w64(GGTT_OFFSET + 8, pte(0x3000, true, false));
    gpu.w64(GGTT_OFFSET + 16, pte(PAGE_Y, false, true));
    gpu.run(
        ram,
        &[
            cmd::fill(A_VA, 4096, 0x1111_1111),
            cmd::store_dword(A_VA + 8, 0xabcd),
            cmd::fill(VRAM_VA, 64, 0x5a5a_5a5a),
        ],
    );
}

fn second_half(gpu: &mut Gpu, ram: &Ram, t: &mut Tables) {
    // The shadow is built (on the destination: rebuilt from guest memory)...
    gpu.run(ram, &[cmd::store_dword(A_VA + 12, 0x3333)]);
    // ...then A_VA moves to PAGE_Y: only a shadow whose write tracking is
    // armed sees that.
    t.map(ram, A_VA, PAGE_Y, false);
    gpu.run(
        ram,
        &[
            cmd::store_dword(A_VA + 16, 0x2222),
            cmd::copy(VRAM_VA, A_VA + 64, 64),
        ],
    );
}

/// Fresh guest RAM named `name`, a device on it, and the first half of the
/// workload run there.
fn after_first_half(name: &str) -> (Ram, Gpu, Tables) {
    let ram = Ram(MappedMemfd::new(name, RAM_SIZE).unwrap());
    let mut gpu = Gpu::new(&ram);
    let mut t = Tables::new(&ram);
    first_half(&mut gpu, &ram, &mut t);
    (ram, gpu, t)
}

fn results(gpu: &mut Gpu, ram: &Ram) -> (Vec<u64>, Vec<u8>, Vec<u8>) {
    (
        gpu.observe(),
        ram.read(PAGE_X, 4096),
        ram.read(PAGE_Y, 4096),
    )
}

#[test]
fn saved_mid_workload_and_continued_elsewhere_gives_the_same_results() {
    let (ram, mut reference, mut t) = after_first_half("vgpu-state-ref");
    second_half(&mut reference, &ram, &mut t);
    let want = results(&mut reference, &ram);
    assert_eq!(&want.2[16..20], &0x2222u32.to_le_bytes());
    assert_eq!(&want.2[64..128], &[0x5a; 64][..]);
    assert_eq!(&want.1[12..16], &0x3333u32.to_le_bytes());

    let (ram, mut source, mut t) = after_first_half("vgpu-state");
    let blob = source.f.save().unwrap();
    let before = source.observe();
    drop(source);
    let mut destination = Gpu::new(&ram);
    destination.f.restore(&blob).unwrap();
    assert_eq!(destination.observe(), before);
    destination.tail = destination.r32(ctx_reg(0, CTX_RING_TAIL));
    destination.seq = 1;
    second_half(&mut destination, &ram, &mut t);
    assert_eq!(results(&mut destination, &ram), want);
}

/// Truncated or corrupted blobs are errors that change nothing, and GGTT
/// entries are validated again on restore: one that points outside guest
/// memory is a global error, not a translation.
#[test]
fn hostile_blobs_are_refused_and_ggtt_entries_are_checked_again() {
    let (ram, source, _) = after_first_half("vgpu-state-hostile");
    let blob = source.f.save().unwrap();
    let mut target = Gpu::new(&ram);
    target.w32(ctx_reg(1, CTX_RING_SIZE), 8192);
    let before = target.observe();
    for len in (0..blob.len()).step_by(97).chain([blob.len() - 1]) {
        assert!(
            target.f.restore(&blob[..len]).is_err(),
            "truncated to {len}"
        );
    }
    assert_eq!(target.observe(), before);

    // The source's memory layout differs from the destination's: its GGTT
    // entry into RAM is refused there.
    let other = Ram(MappedMemfd::new("vgpu-state-small", RAM_SIZE).unwrap());
    let memory = GuestMemory::new(8);
    let fd = other.0.file().try_clone().unwrap();
    let region = DmaRegion::mapped(RAM_GPA, 0x10_0000, fd.into(), 0, true, true).unwrap();
    memory.with_regions(|r| r.insert(region)).unwrap();
    let config = VgpuConfig {
        vram_mib: 1,
        ..VgpuConfig::default()
    };
    let (mut small, _) = umdev_vgpu::new_function(memory, config).unwrap();
    small.restore(&blob).unwrap();
    let mut b = [0; 4];
    small.region_read(BAR0, REG_GLOBAL_ERROR, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), GLOBAL_ERROR_BAD_GGTT_ENTRY);

    // Another VRAM size does not fit.
    let config = VgpuConfig {
        vram_mib: 2,
        ..VgpuConfig::default()
    };
    let (mut bigger, _) = umdev_vgpu::new_function(GuestMemory::new(8), config).unwrap();
    assert!(bigger.restore(&blob).is_err());
}
