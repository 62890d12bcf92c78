//! A hostile or broken VMM against the real `umdev-vgpu`: VRAM the VMM tries
//! to resize, guest RAM and the dirty bitmap shrunk under the backend while
//! work runs, scanout geometries that would make it allocate without bound,
//! interrupt fds that would block. After each attack the backend is alive,
//! serves a fresh client, keeps its fds and memory bounded, and ends on
//! SIGTERM within 1 s.

mod driver;
use umdev_testkit::soak as soak_support;

use std::time::Duration;

use driver::regs::*;
use driver::*;
use soak_support::resources;
use soak_support::{open_fds, rss_kib, terminate};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;

const A_VA: u64 = 0x0000_1000_0000;
const B_VA: u64 = 0x0000_2000_0000;
/// RSS bound of umdev-vgpu (docs/robustness.md): VRAM (64 MiB by default,
/// touched by these tests only in part), the GGTT and its shadow (~3 MiB),
/// the scanout capture (at most 64 MiB), page-track snapshots and the rest.
const RSS_BOUND_KIB: u64 = 160 * 1024;

/// The backend after the attack: alive, a fresh client reads the device's
/// identity and runs work, RSS within its bound, SIGTERM ends it within 1 s.
fn still_sound(gpu: Vgpu) {
    let Vgpu {
        client,
        mut backend,
        ..
    } = gpu;
    let id = {
        let mut c = client;
        c.read_u32(0, REG_ID).unwrap_or(0)
    };
    assert!(backend.alive(), "backend died:\n{}", backend.log());
    let pid = backend.child.id();
    let mut fresh = Client::connect(&backend.socket).expect("a fresh client");
    fresh
        .region_write(PCI_CONFIG_REGION_INDEX, 0x04, &0x0006u16.to_le_bytes())
        .unwrap();
    assert_eq!(fresh.read_u32(0, REG_ID).unwrap(), id);
    drop(fresh);
    let fds = open_fds(pid);
    assert!(fds < 32, "{fds} fds open");
    let rss = rss_kib(pid);
    assert!(
        rss < RSS_BOUND_KIB,
        "RSS {rss} KiB over {RSS_BOUND_KIB} KiB"
    );
    let took = terminate(&mut backend.child);
    eprintln!("fds {fds}, RSS {rss} KiB, SIGTERM took {took:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
}

/// The VRAM memfd the VMM receives (BAR2) is sealed: it cannot shrink it
/// under the engine, nor grow it.
#[test]
fn the_vram_fd_cannot_be_resized() {
    let mut gpu = Vgpu::start();
    let details = gpu.client.region_info(2).unwrap();
    let vram = std::fs::File::from(details.fd.expect("BAR2 comes with its fd"));
    let size = details.info.size;
    for len in [0, size / 2, size * 2] {
        let e = vram.set_len(len).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "set_len({len})");
    }
    let mut ctx = gpu.context(0);
    ctx.pt.map(&mut gpu, A_VA, Target::Vram(size - PAGE), true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA + 0xffc, 0x1234_5678)]);
    assert_eq!(
        gpu.vram_read(size - 4, 4),
        0x1234_5678u32.to_le_bytes().to_vec()
    );
    still_sound(gpu);
}

/// Guest RAM nobody could seal shrinks under a submission's target: the
/// submission faults (guest-visible), the region is out of use, the backend
/// lives on.
#[test]
fn guest_ram_shrunk_under_running_work() {
    let mut gpu = Vgpu::start_with(Options {
        unsealable: true,
        ..Default::default()
    });
    let size = gpu.ram.size();
    let mut ctx = gpu.context(0);
    // Tables and ring sit low; the target in the top page, which goes.
    let target = RAM_GPA + size - PAGE;
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(target), true);
    let low = ctx.pt.map_new(&mut gpu, B_VA, 1, true);
    ctx.run_ok(
        &mut gpu,
        &[cmd::store_dword(A_VA, 1), cmd::store_dword(B_VA, 2)],
    );
    assert_eq!(gpu.ram.read_u32(target), 1);
    gpu.ram.mem.shrink(size / 2).unwrap();
    ctx.submit(&mut gpu, &[cmd::store_dword(A_VA, 3)]);
    let f = gpu.wait_fault(0);
    eprintln!("after the shrink: {f}");
    assert!(
        matches!(
            f.reason,
            FAULT_DMA_ERROR | FAULT_BAD_RING | FAULT_NO_ROOT | FAULT_BAD_TARGET
        ),
        "{f}"
    );
    assert!(gpu
        .backend
        .log()
        .contains("took a DMA region's memory away"));
    // The whole region is out of use (even its intact half) until the VMM
    // unmaps it; mapped again, work goes on.
    gpu.client.dma_unmap(RAM_GPA, size, 0).unwrap();
    gpu.map_ram(0, size / 2);
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(B_VA, 4)]);
    assert_eq!(gpu.ram.read_u32(low), 4);
    still_sound(gpu);
}

/// The VMM's dirty bitmap shrinks under the backend: the backend drops it and
/// scans the region instead, so page-table edits are still seen.
#[test]
fn a_lost_dirty_bitmap_falls_back_to_scanning() {
    let mut gpu = Vgpu::start_with(Options {
        unsealable: true,
        ..Options::with_source(PageTrack::DirtyBitmap)
    });
    let mut ctx = gpu.context(0);
    let first = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
    assert_eq!(gpu.ram.read_u32(first), 1);
    // The test stops marking the bitmap (its pages are gone) and the VMM
    // shrinks it; then the guest remaps A_VA without any dirty bit set.
    let bitmap = gpu.ram.bitmap.take().unwrap();
    bitmap.shrink(0).unwrap();
    let second = gpu.alloc.page();
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(second), true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    assert_eq!(gpu.ram.read_u32(second), 2, "the remap was not seen");
    assert_eq!(gpu.ram.read_u32(first), 1);
    assert!(gpu.backend.log().contains("dirty bitmap's memory away"));
    still_sound(gpu);
}

/// Scanout geometries a guest can program: a stride near 4 GiB at 4096 lines
/// (terabytes) is refused as BAD_SCANOUT before anything is allocated; a
/// 64 KiB stride costs only the visible pixels, frame after frame.
#[test]
fn scanout_geometry_cannot_make_the_backend_allocate() {
    let (mut gpu, png) = Vgpu::start_scanout_png();
    let program = |gpu: &mut Vgpu, w: u32, h: u32, stride: u32| {
        gpu.show_xrgb8888(0, false, w, h, stride);
    };
    program(&mut gpu, 4096, 4096, u32::MAX - 3);
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), GLOBAL_ERROR_BAD_SCANOUT);
    let mut ctx = gpu.context(0);
    ctx.run_ok(&mut gpu, &[cmd::fence(FENCE_VA, 1, true)]);
    assert!(gpu.backend.alive());
    gpu.write_reg(REG_GLOBAL_ERROR, GLOBAL_ERROR_BAD_SCANOUT);
    gpu.write_reg(REG_IRQ_STATUS, IRQ_GLOBAL_ERROR);

    // 64 KiB per line, 16 pixels wide, 4096 lines: 256 MiB of aperture read
    // as 256 KiB of picture, at every FENCE.
    program(&mut gpu, 16, 4096, 64 << 10);
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);
    let pid = gpu.backend.child.id();
    let before = rss_kib(pid);
    for seq in 2..12 {
        ctx.run_ok(&mut gpu, &[cmd::fence(FENCE_VA, seq, true)]);
    }
    let after = rss_kib(pid);
    eprintln!("RSS {before} KiB before ten 64 KiB-stride frames, {after} KiB after");
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    let picture = umdev::scanout::decode_png(&std::fs::read(&png).unwrap()).unwrap();
    assert_eq!((picture.width, picture.height), (16, 4096));
    still_sound(gpu);
}

/// Interrupt fds that are not eventfds are refused; a saturated one takes
/// fences without blocking the engine or the session.
#[test]
fn interrupt_fds_that_would_block() {
    let mut gpu = Vgpu::start();
    let trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
    let (_r, w) = resources::full_pipe();
    let (s, _peer) = resources::full_socket();
    for fd in [resources::raw(&w), resources::raw(&s)] {
        let e = gpu.client.set_irqs(2, trigger, 0, 1, &[fd], &[]);
        assert_eq!(e.unwrap_err().errno(), Some(libc::EINVAL as u32));
    }
    let full: Vec<_> = (0..MSIX_VECTORS as u32)
        .map(|_| resources::saturated_eventfd())
        .collect();
    let raw: Vec<_> = full.iter().map(resources::raw).collect();
    gpu.client
        .set_irqs(2, trigger, 0, raw.len() as u32, &raw, &[])
        .unwrap();
    let mut ctx = gpu.context(0);
    for seq in 1..50 {
        ctx.submit(&mut gpu, &[cmd::fence(FENCE_VA, seq, true)]);
    }
    gpu.wait_idle(ctx.n, TIMEOUT).unwrap();
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);
    still_sound(gpu);
}
