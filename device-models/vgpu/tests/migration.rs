//! The vGPU moved mid-picture from one `umdev-vgpu` process to another over
//! vfio-user migration v2: the test plays both VMMs (guest RAM copied while
//! the source runs, then the pages the device's dirty log names), the
//! destination finishes the picture, pixel for pixel, with its fences in order.

mod driver;

use driver::regs::*;
use driver::*;
use umdev::migration::MigrationState;
use umdev::vfio_user::Migration;
use umdev_vgpu::picture;

#[test]
fn a_vgpu_drawing_moves_to_another_process_and_finishes_the_picture() {
    let mut src = Vgpu::start();
    let mut dst = Vgpu::start();
    assert_eq!(src.vram_size, dst.vram_size);

    let mut ctx = src.context_with_ring(0, 1 << 18);
    prepare_picture(&mut src, &ctx);
    let scene = picture::SCENE;
    let (done, rest) = scene.split_at(scene.len() / 3);
    let (running, after) = rest.split_at(rest.len() / 2);
    let first = draw(&mut ctx, &mut src, done);
    src.wait_fence(0, *first.last().unwrap(), TIMEOUT)
        .expect("first third drawn");
    let ram = src.ram.size();
    let mut migration = {
        let (src_ram, dst_ram) = (&src.ram, &dst.ram);
        let mut copy = |gpa: u64, len: u64| dst_ram.write(gpa, &src_ram.read(gpa, len as usize));
        Migration::begin(
            &mut src.client,
            &mut dst.client,
            &[(RAM_GPA, ram)],
            &mut copy,
        )
        .expect("pre-copy")
    };
    // The guest keeps drawing during pre-copy: the next third is submitted
    // and left running when the source stops. The ring pages the guest wrote
    // meanwhile are copied as the VMM's own dirty tracking would; the pages
    // the device writes (fences) must come from the device's dirty log.
    assert_eq!(
        migration.precopy(&mut src.client, &mut dst.client).unwrap(),
        0,
        "nothing changed since the first round"
    );
    let ring_before = src.ram.read(ctx.ring.base, ctx.ring.size as usize);
    let in_flight = draw(&mut ctx, &mut src, running);
    assert_ne!(
        src.ram.read(ctx.ring.base, ctx.ring.size as usize),
        ring_before
    );
    dst.ram.write(
        ctx.ring.base,
        &src.ram.read(ctx.ring.base, ctx.ring.size as usize),
    );
    let report = {
        let (src_ram, dst_ram) = (&src.ram, &dst.ram);
        let mut copy = |gpa: u64, len: u64| dst_ram.write(gpa, &src_ram.read(gpa, len as usize));
        migration
            .finish(&mut src.client, &mut dst.client, &mut copy)
            .expect("stop-copy and resume")
    };
    eprintln!("migration: {report:?}");
    // The final image carries the VRAM the running submissions drew.
    assert!(
        report.stop_copy_bytes > 1024 && report.dirty_pages > 0,
        "{report:?}"
    );
    assert_eq!(
        src.client.migration_state().unwrap(),
        MigrationState::Stop as u32
    );

    // The destination has every fence the source retired, in order, and
    // carries on with the last third.
    let last_in_flight = *in_flight.last().unwrap();
    dst.wait_fence(0, last_in_flight, TIMEOUT)
        .expect("the submissions running at the migration are retired");
    assert_eq!(dst.ctx_read(0, CTX_FENCE_SEQNO), last_in_flight);
    assert_eq!(dst.ram.read_u32(ctx.fence_gpa), last_in_flight);
    let last = draw(&mut ctx, &mut dst, after);
    dst.wait_fence(0, *last.last().unwrap(), TIMEOUT)
        .expect("last third drawn on the destination");
    assert_eq!(dst.ram.read_u32(ctx.fence_gpa), *last.last().unwrap());
    assert_eq!(dst.ctx_read(0, CTX_STATUS) & CTX_STATUS_FAULTED, 0);

    let got = dst.vram_read(0, picture::FB_BYTES);
    let want = picture::render();
    let differing = got.iter().zip(&want).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "framebuffer bytes differing from the picture");
    assert_eq!(dst.read_reg(REG_GLOBAL_ERROR), 0);
    assert!(src.backend.alive() && dst.backend.alive());
}

/// The device's dirty log holds what the engine wrote to guest RAM (the
/// fence, a STORE) and nothing the backend only read: not the page tables
/// the page tracker snapshots and shadows at each sync, not the ring.
#[test]
fn the_dirty_log_has_the_engines_writes_and_not_the_trackers_reads() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let store_gpa = ctx.pt.map_new(&mut gpu, 0x3000_0000, 1, true);
    ctx.run_ok(&mut gpu, &[]);
    let ram = gpu.ram.size();
    let page = gpu.client.dma_logging_start(PAGE, &[]).unwrap();
    assert_eq!(page, PAGE);
    // The guest edits its page tables (a new leaf table is shadowed and
    // tracked at the next sync), then the engine stores and fences.
    let other = ctx.pt.map_new(&mut gpu, 0x3100_0000, 1, true);
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(0x3000_0010, 7),
            cmd::store_dword(0x3100_0000, 9),
        ],
    );
    let bitmap = gpu.client.dma_logging_report(RAM_GPA, ram, PAGE).unwrap();
    let dirty: Vec<u64> = bitmap
        .iter()
        .enumerate()
        .flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word & 1 << b != 0)
                .map(move |b| w as u64 * 64 + b)
        })
        .map(|pfn| RAM_GPA + pfn * PAGE)
        .collect();
    let mut want = vec![ctx.fence_gpa, store_gpa, other];
    want.sort();
    assert_eq!(dirty, want, "exactly the fence and the two stored pages");
    gpu.client.dma_logging_stop().unwrap();
}
