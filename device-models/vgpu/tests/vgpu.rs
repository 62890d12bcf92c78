//! The vGPU over its vfio-user socket, driven as SPEC.md describes: the real
//! `umdev-vgpu` binary, memfd guest RAM, page tables built in guest memory, a
//! command ring, fences, faults, the GGTT, VRAM and the scanout PNG.

mod driver;

use std::time::Duration;

use driver::regs::*;
use driver::*;
use umdev::vfio_user::wire::*;

const A_VA: u64 = 0x0000_1000_0000; // L4 0, L3 0, L2 0x80
const B_VA: u64 = 0x0080_2000_0000; // another L4 slot
const C_VA: u64 = 0x7f00_0000_0000;
const VRAM_VA: u64 = 0x0000_4000_0000;

fn expect_fault(f: Fault, reason: u8, addr: u64) {
    assert_eq!(
        (fault_name(f.reason), f.addr),
        (fault_name(reason), addr),
        "expected {} at {addr:#x}, got {f}",
        fault_name(reason)
    );
}

// ---- identity ------------------------------------------------------------------

#[test]
fn identity_registers_and_config_space() {
    let mut gpu = Vgpu::start();
    let cfg = gpu
        .client
        .region_read(PCI_CONFIG_REGION_INDEX, 0, 64)
        .unwrap();
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    assert_eq!((u16_at(0), u16_at(2)), (VENDOR_ID, DEVICE_ID));
    assert_eq!(cfg[8], REVISION);
    assert_eq!(
        u32::from_le_bytes([cfg[9], cfg[10], cfg[11], 0]),
        CLASS_CODE
    );
    assert_eq!(
        (u16_at(0x2c), u16_at(0x2e)),
        (SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
    );
    assert_eq!(cfg[0x3d], 1, "INTA");
    // BAR0: 64-bit non-prefetchable; BAR2: 64-bit prefetchable.
    assert_eq!(cfg[0x10] & 0xf, 0b0100);
    assert_eq!(cfg[0x18] & 0xf, 0b1100);
    for cap in [0x11, 0x10, 0x01] {
        assert!(gpu.capability(cap).is_some(), "capability {cap:#x}");
    }
    let msix = gpu.capability(0x11).unwrap();
    let ctl = gpu
        .client
        .region_read(PCI_CONFIG_REGION_INDEX, msix + 2, 2)
        .unwrap();
    assert_eq!(
        u16::from_le_bytes([ctl[0], ctl[1]]) & 0x7ff,
        MSIX_VECTORS - 1
    );
    assert_eq!(gpu.client.irq_info(PCI_MSIX_IRQ_INDEX).unwrap().count, 4);

    assert_eq!(gpu.client.region_info(0).unwrap().info.size, MMIO_BAR_SIZE);
    assert_eq!(gpu.vram_size, (DEFAULT_VRAM_MIB as u64) << 20);
    assert!(gpu.vram_is_mapped(), "BAR2 (VRAM) is offered for mmap");
    assert_eq!(gpu.read_reg(REG_ID), ID_VALUE);
    assert_eq!(
        gpu.read_reg(REG_CAPS),
        4 | 17 << 8 | DEFAULT_VRAM_MIB << 16,
        "CAPS"
    );
    assert_eq!(gpu.read_reg(REG_GGTT_SIZE), GGTT_ENTRIES as u32);
    assert_eq!(gpu.read_reg(REG_STATUS) & 1, 0, "idle");
    // Undefined offsets read 0 and ignore writes.
    gpu.write_reg(0x800, 0x1234);
    assert_eq!(gpu.read_reg(0x800), 0);
    assert_eq!(gpu.read_reg(ctx_reg(0, 0x80)), 0);
    // Read-only registers ignore writes.
    gpu.write_reg(REG_ID, 0);
    assert_eq!(gpu.read_reg(REG_ID), ID_VALUE);
    // Misaligned or odd-sized accesses read as all ones and are ignored.
    assert_eq!(gpu.client.region_read(0, 2, 2).unwrap(), [0xff; 2]);
    assert_eq!(gpu.client.region_read(0, 1, 4).unwrap(), [0xff; 4]);
    assert_eq!(gpu.client.region_read(0, 4, 8).unwrap(), [0xff; 8]);
    gpu.client
        .region_write(0, ctx_reg(0, CTX_RING_SIZE) + 1, &[0x10])
        .unwrap();
    assert_eq!(gpu.ctx_read(0, CTX_RING_SIZE), 0);
    gpu.client
        .region_write(0, ctx_reg(0, CTX_MSIX_VECTOR), &[3, 0])
        .unwrap();
    assert_eq!(gpu.ctx_read(0, CTX_MSIX_VECTOR), 0);
}

#[test]
fn vram_size_option() {
    let mut gpu = Vgpu::start_with(Options {
        vram_mib: Some(16),
        ..Default::default()
    });
    assert_eq!(gpu.vram_size, 16 << 20);
    assert_eq!(gpu.read_reg(REG_CAPS) >> 16, 16);
    // The last VRAM page is usable by the engine; one past it is not.
    let mut ctx = gpu.context(0);
    let last = (16 << 20) - PAGE;
    ctx.pt.map(&mut gpu, VRAM_VA, Target::Vram(last), true);
    ctx.pt
        .map(&mut gpu, VRAM_VA + PAGE, Target::Vram(last + PAGE), true);
    ctx.run_ok(&mut gpu, &[cmd::fill(VRAM_VA, 4096, 0x0102_0304)]);
    assert_eq!(gpu.vram_read(last, 4096), pattern_bytes(0x0102_0304, 4096));
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(VRAM_VA + PAGE + 8, 1)]);
    expect_fault(f, FAULT_BAD_TARGET, VRAM_VA + PAGE + 8);
}

// ---- the basic engine -------------------------------------------------------------

/// FILL, STORE_DWORD, COPY, BLIT and FENCE on guest RAM and VRAM.
fn basic_commands(gpu: &mut Vgpu) {
    let mut ctx = gpu.context(0);
    let a = ctx.pt.map_new(gpu, A_VA, 4, true);
    let b = ctx.pt.map_new(gpu, B_VA, 4, true);
    ctx.run_ok(
        gpu,
        &[
            cmd::fill(A_VA, 0x4000, 0xdead_beef),
            cmd::store_dword(A_VA + 8, 0x1234_5678),
            cmd::store_dword(A_VA + 0x3ffc, 0x0bad_f00d),
            cmd::copy(A_VA, B_VA + 0x10, 0x3ff0),
        ],
    );
    let mut want = pattern_bytes(0xdead_beef, 0x4000);
    want[8..12].copy_from_slice(&0x1234_5678u32.to_le_bytes());
    want[0x3ffc..].copy_from_slice(&0x0bad_f00du32.to_le_bytes());
    assert_eq!(gpu.ram.read(a, 0x4000), want);
    assert_eq!(gpu.ram.read(b, 0x10), [0; 16], "COPY wrote only its range");
    assert_eq!(gpu.ram.read(b + 0x10, 0x3ff0), want[..0x3ff0]);
    assert_eq!(ctx.fence_in_memory(gpu), ctx.seq);
    assert_eq!(gpu.ctx_read(0, CTX_FENCE_SEQNO), ctx.seq);

    // VRAM: the engine and the guest's direct mapping see the same bytes.
    ctx.pt
        .map_range(gpu, VRAM_VA, Target::Vram(0x10_0000), 4, true);
    gpu.vram_write(0x10_0000 + 0x2000, &pattern_bytes(0x5555_aaaa, 0x1000));
    ctx.run_ok(
        gpu,
        &[
            cmd::fill(VRAM_VA, 0x1000, 0x0101_0101),
            cmd::copy(A_VA, VRAM_VA + 0x1000, 0x1000),
            cmd::copy(VRAM_VA + 0x2000, B_VA, 0x800),
        ],
    );
    assert_eq!(
        gpu.vram_read(0x10_0000, 0x1000),
        pattern_bytes(0x0101_0101, 0x1000)
    );
    assert_eq!(gpu.vram_read(0x10_1000, 0x1000), want[..0x1000]);
    assert_eq!(gpu.ram.read(b, 0x800), pattern_bytes(0x5555_aaaa, 0x800));

    // BLIT: a 24-byte x 10-line rectangle with different pitches, crossing pages.
    let src: Vec<u8> = (0..0x4000u32).map(|i| (i * 7 + i / 256) as u8).collect();
    gpu.ram.write(a, &src);
    gpu.ram.fill(b, 0x4000, 0xee);
    let (src_off, src_pitch, dst_off, dst_pitch, w, h) =
        (0x13c, 0x500u32, 0x20u64, 0x640u32, 24u32, 10u32);
    ctx.run_ok(
        gpu,
        &[cmd::blit(
            A_VA + src_off,
            src_pitch,
            B_VA + dst_off,
            dst_pitch,
            w,
            h,
        )],
    );
    let got = gpu.ram.read(b, 0x4000);
    let mut want = vec![0xee; 0x4000];
    for y in 0..h as usize {
        let s = src_off as usize + y * src_pitch as usize;
        let d = dst_off as usize + y * dst_pitch as usize;
        want[d..d + w as usize].copy_from_slice(&src[s..s + w as usize]);
    }
    assert!(got == want, "BLIT result differs");
}

#[test]
fn zero_sized_operations_do_nothing() {
    // SPEC.md: moving 0 bytes does nothing and translates nothing (the
    // addresses here are unaligned or even unmapped).
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let a = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    for c in [
        cmd::fill(A_VA, 0, 1),
        cmd::copy(A_VA + 4, A_VA, 0),
        cmd::blit(A_VA + 4, 0, A_VA, 0, 0, 0),
        cmd::blit(A_VA + 4, 16, A_VA, 16, 0, 4),
        cmd::blit(A_VA + 4, 16, A_VA, 16, 4, 0),
        cmd::copy(0x7777_0001, 0x7777_1003, 0),
        cmd::blit(0x7777_0001, u32::MAX, 0x7777_1003, u32::MAX, 0, u32::MAX),
        cmd::blit(0x7777_0001, u32::MAX, 0x7777_1003, u32::MAX, u32::MAX, 0),
    ] {
        gpu.ram.write_u32(a + 4, 0x1111);
        if let Err(f) = ctx.run(&mut gpu, std::slice::from_ref(&c)) {
            panic!("{c:x?}: {f}");
        }
        assert_eq!(gpu.ram.read_u32(a), 0, "{c:x?} wrote");
    }
    // A FILL's address and size must be multiples of 4 even when it is empty.
    let f = ctx.run_fault(&mut gpu, &[cmd::fill(A_VA + 2, 0, 1)]);
    assert_eq!(f.reason, FAULT_MALFORMED, "{f}");
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
}

#[test]
fn fill_store_copy_blit_fence() {
    let mut gpu = Vgpu::start();
    basic_commands(&mut gpu);
}

#[test]
fn fence_interrupts_go_to_the_context_vector() {
    let mut gpu = Vgpu::start();
    let mut c0 = gpu.context(0);
    let mut c2 = gpu.context(2);
    c0.run_ok(&mut gpu, &[]);
    assert_eq!(
        gpu.take_irq(Some(0)),
        0,
        "a FENCE without its flag raises nothing"
    );
    c0.run_irq(&mut gpu, &[], true).unwrap();
    assert!(gpu.wait_irq(Some(0), TIMEOUT), "vector 0 for context 0");
    assert_eq!(gpu.read_reg(REG_IRQ_STATUS) & 0xf, 1);
    assert_eq!(gpu.ack_irqs(), 1);
    assert_eq!(gpu.read_reg(REG_IRQ_STATUS), 0, "RW1C");
    c2.run_irq(&mut gpu, &[], true).unwrap();
    assert!(gpu.wait_irq(Some(2), TIMEOUT), "vector 2 for context 2");
    assert_eq!(gpu.ack_irqs(), 1 << 2);
    // MSIX_VECTOR moves it.
    gpu.ctx_write(2, CTX_MSIX_VECTOR, 3);
    c2.run_irq(&mut gpu, &[], true).unwrap();
    assert!(
        gpu.wait_irq(Some(3), TIMEOUT),
        "vector 3 after MSIX_VECTOR = 3"
    );
    assert_eq!(gpu.take_irq(Some(2)), 0);
    assert_eq!(gpu.ack_irqs(), 1 << 2);
    // IRQ_ENABLE gates it; the status bit is still set.
    gpu.write_reg(REG_IRQ_ENABLE, 0);
    c0.run_irq(&mut gpu, &[], true).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(gpu.take_irq(Some(0)), 0, "IRQ_ENABLE bit 0 clear");
    assert_eq!(gpu.ack_irqs() & 1, 1, "IRQ_STATUS bit 0 set all the same");
}

#[test]
fn intx_when_msix_is_off() {
    let mut gpu = Vgpu::start_with(Options {
        msix: false,
        ..Default::default()
    });
    let mut c1 = gpu.context(1);
    c1.run_irq(&mut gpu, &[], true).unwrap();
    assert!(gpu.wait_irq(None, TIMEOUT), "INTx");
    assert_eq!(gpu.ack_irqs(), 1 << 1);
}

#[test]
fn batch_buffers_and_nesting_to_four() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let data = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    // Five batch pages at C_VA + i pages, read-only to the engine.
    let batches = ctx.pt.map_new(&mut gpu, C_VA, 5, false);
    let bva = |i: u64| C_VA + i * PAGE;
    let bgpa = |i: u64| batches + i * PAGE;
    write_batch(
        &mut gpu,
        bgpa(0),
        &[
            cmd::fill(A_VA, 64, 0x1111_1111),
            cmd::store_dword(A_VA + 4, 0xb0),
            cmd::batch_end(),
        ],
    );
    // The ring continues after the batch: its STORE lands after the batch's.
    ctx.run_ok(
        &mut gpu,
        &[cmd::batch_start(bva(0)), cmd::store_dword(A_VA + 8, 0xa1)],
    );
    assert_eq!(gpu.ram.read_u32(data), 0x1111_1111);
    assert_eq!(gpu.ram.read_u32(data + 4), 0xb0);
    assert_eq!(gpu.ram.read_u32(data + 8), 0xa1);
    assert_eq!(gpu.ram.read_u32(data + 12), 0x1111_1111);

    // Batches 1 -> 2 -> 3 -> 4: four deep is allowed. Each stores before and
    // after its child, so the order shows.
    for i in 1..=4u64 {
        let mut cmds = vec![cmd::store_dword(A_VA + 0x100 + 8 * i, i as u32)];
        if i < 4 {
            cmds.push(cmd::batch_start(bva(i + 1)));
        }
        cmds.push(cmd::store_dword(A_VA + 0x104 + 8 * i, 0x10 + i as u32));
        cmds.push(cmd::batch_end());
        write_batch(&mut gpu, bgpa(i), &cmds);
    }
    ctx.run_ok(&mut gpu, &[cmd::batch_start(bva(1))]);
    for i in 1..=4u64 {
        assert_eq!(gpu.ram.read_u32(data + 0x100 + 8 * i), i as u32);
        assert_eq!(gpu.ram.read_u32(data + 0x104 + 8 * i), 0x10 + i as u32);
    }
    // A batch that ends without BATCH_END at a page that is not mapped: a fault
    // (NOT_PRESENT) is the only sane outcome; checked in the hostile tests.
}

#[test]
fn ring_wraps_around_with_commands_straddling_the_end() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let data = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    // One NOP shifts every later 32-byte (STORE + FENCE) group by 4 bytes, so at
    // each wrap a command straddles the ring's end.
    ctx.submit(&mut gpu, &[cmd::nop()]);
    for i in 0..300u32 {
        ctx.run_ok(
            &mut gpu,
            &[cmd::store_dword(A_VA + 4 * (i as u64 % 1024), i)],
        );
        assert_eq!(gpu.ram.read_u32(data + 4 * (i as u64 % 1024)), i);
    }
    // Big submissions that wrap, emitted while the engine drains.
    for round in 0..4u32 {
        let cmds: Vec<Vec<u32>> = (0..150u32)
            .map(|i| cmd::store_dword(A_VA + 4 * i as u64, round << 16 | i))
            .collect();
        ctx.run_ok(&mut gpu, &cmds);
        for i in 0..150u32 {
            assert_eq!(gpu.ram.read_u32(data + 4 * i as u64), round << 16 | i);
        }
    }
    assert_eq!(gpu.ctx_read(0, CTX_RING_HEAD), ctx.ring.tail);
}

#[test]
fn bigger_ring_and_registers_written_as_halves() {
    let mut gpu = Vgpu::start();
    let pt = PageTables::new(&mut gpu);
    let data = pt.map_new(&mut gpu, A_VA, 1, true);
    let fence = pt.map_new(&mut gpu, FENCE_VA, 1, true);
    let size = 64 << 10;
    let ring = gpu.alloc.pages_aligned(16, 16);
    // PT_ROOT and RING_BASE as two 4-byte writes each, low half first.
    gpu.write_reg64(ctx_reg(3, CTX_PT_ROOT), pt.root, true);
    gpu.write_reg64(ctx_reg(3, CTX_RING_BASE), ring, true);
    assert_eq!(gpu.ctx_read64(3, CTX_PT_ROOT), pt.root);
    assert_eq!(gpu.ctx_read64(3, CTX_RING_BASE), ring);
    gpu.ctx_write(3, CTX_RING_SIZE, size);
    gpu.ctx_write(3, CTX_MSIX_VECTOR, 3);
    gpu.ctx_write(3, CTX_CONTROL, CTX_CONTROL_ENABLE);
    assert_eq!(
        gpu.ctx_read(3, CTX_STATUS) & CTX_STATUS_ENABLED,
        CTX_STATUS_ENABLED
    );
    let mut ctx = Ctx {
        n: 3,
        pt,
        ring: Ring {
            ctx: 3,
            base: ring,
            size,
            tail: 0,
            head: 0,
        },
        fence_gpa: fence,
        seq: 0,
    };
    let cmds: Vec<Vec<u32>> = (0..1000u32)
        .map(|i| cmd::store_dword(A_VA + 4 * i as u64, !i))
        .collect();
    ctx.run_ok(&mut gpu, &cmds);
    for i in 0..1000u32 {
        assert_eq!(gpu.ram.read_u32(data + 4 * i as u64), !i);
    }
}

#[test]
fn all_four_contexts_at_once() {
    let mut gpu = Vgpu::start();
    let mut ctxs: Vec<Ctx> = (0..4).map(|n| gpu.context(n)).collect();
    let pages: Vec<u64> = ctxs
        .iter()
        .map(|c| c.pt.map_new(&mut gpu, A_VA, 4, true))
        .collect();
    let mut seqs = Vec::new();
    for (n, c) in ctxs.iter_mut().enumerate() {
        seqs.push(c.next_fence(
            &mut gpu,
            &[
                cmd::fill(A_VA, 0x4000, 0x0101_0101 * (n as u32 + 1)),
                cmd::copy(A_VA, A_VA + 0x2000, 0x1000),
            ],
            false,
        ));
    }
    for n in 0..4 {
        gpu.wait_fence(n, seqs[n], TIMEOUT).unwrap();
        assert_eq!(
            gpu.ram.read(pages[n], 0x4000),
            pattern_bytes(0x0101_0101 * (n as u32 + 1), 0x4000)
        );
    }
}

// ---- remapping and sync points ---------------------------------------------------

/// How the driver makes a changed PTE visible.
#[derive(Clone, Copy, Debug)]
enum Sync {
    /// TLB_INVALIDATE register, whole context.
    WholeInvalidate,
    /// TLB_INVALIDATE register, range INV_START/INV_PAGES.
    RangeInvalidate,
    /// Nothing: the next submission is a sync point by itself.
    Submission,
}

/// Maps A_VA to page X, stores, remaps it to Y (and unmaps/remaps others),
/// syncs as `sync` says, stores again: the work follows the mapping.
fn remap_follows(gpu: &mut Vgpu, sync: Sync) {
    let mut ctx = gpu.context(1);
    let x = gpu.alloc.page();
    let y = gpu.alloc.page();
    let v = gpu.alloc.page();
    ctx.pt.map(gpu, A_VA, Target::Ram(x), true);
    ctx.pt.map(gpu, A_VA + PAGE, Target::Ram(v), true);
    ctx.run_ok(gpu, &[cmd::store_dword(A_VA + 0x10, 1)]);
    assert_eq!(gpu.ram.read_u32(x + 0x10), 1);
    let mut vram_off = 0x20_0000;
    for round in 2..12u32 {
        let (from, to) = if round % 2 == 0 { (x, y) } else { (y, x) };
        ctx.pt.map(gpu, A_VA, Target::Ram(to), true);
        // A second page goes to VRAM and back, read-only in between.
        let second = if round % 3 == 0 {
            Target::Ram(v)
        } else {
            vram_off += PAGE;
            Target::Vram(vram_off)
        };
        ctx.pt.map(gpu, A_VA + PAGE, second, true);
        match sync {
            Sync::WholeInvalidate => gpu.ctx_write(1, CTX_TLB_INVALIDATE, TLB_INVALIDATE_ALL),
            Sync::RangeInvalidate => {
                gpu.ctx_write64(1, CTX_INV_START, A_VA);
                gpu.ctx_write(1, CTX_INV_PAGES, 2);
                gpu.ctx_write(1, CTX_TLB_INVALIDATE, TLB_INVALIDATE_RANGE);
            }
            Sync::Submission => {}
        }
        ctx.run_ok(
            gpu,
            &[
                cmd::store_dword(A_VA + 0x10, round),
                cmd::store_dword(A_VA + PAGE + 0x20, round),
            ],
        );
        assert_eq!(gpu.ram.read_u32(to + 0x10), round, "round {round} {sync:?}");
        assert_eq!(
            gpu.ram.read_u32(from + 0x10),
            round - 1,
            "old page untouched"
        );
        let got = match second {
            Target::Ram(g) => gpu.ram.read_u32(g + 0x20),
            Target::Vram(o) => u32::from_le_bytes(gpu.vram_read(o + 0x20, 4).try_into().unwrap()),
        };
        assert_eq!(got, round, "second page, round {round}");
    }
    // Unmapped: NOT_PRESENT at the next submission.
    ctx.pt.unmap(gpu, A_VA);
    if let Sync::WholeInvalidate = sync {
        gpu.ctx_write(1, CTX_TLB_INVALIDATE, TLB_INVALIDATE_ALL);
    }
    let f = ctx.run_fault(gpu, &[cmd::store_dword(A_VA + 0x10, 99)]);
    expect_fault(f, FAULT_NOT_PRESENT, A_VA + 0x10);
    ctx.clear_fault(gpu);
    // Read-only now: READ_ONLY; then writable again works.
    ctx.pt.map(gpu, A_VA, Target::Ram(x), false);
    let f = ctx.run_fault(gpu, &[cmd::store_dword(A_VA + 0x10, 99)]);
    expect_fault(f, FAULT_READ_ONLY, A_VA + 0x10);
    ctx.clear_fault(gpu);
    ctx.pt.map(gpu, A_VA, Target::Ram(x), true);
    ctx.run_ok(gpu, &[cmd::store_dword(A_VA + 0x10, 100)]);
    assert_eq!(gpu.ram.read_u32(x + 0x10), 100);
    // A whole upper-level subtree replaced: the level-2 entry now points to a new
    // level-1 table mapping A_VA to y.
    let l1 = gpu.alloc.page();
    gpu.ram
        .write_u64(l1 + 8 * pt_index(A_VA, 1) as u64, pte(Target::Ram(y), true));
    let slot = ctx.pt.slot(gpu, A_VA, 2);
    gpu.write_pte(slot, l1 | PTE_PRESENT);
    ctx.run_ok(gpu, &[cmd::store_dword(A_VA + 0x10, 101)]);
    assert_eq!(gpu.ram.read_u32(y + 0x10), 101, "new subtree used");
    assert_eq!(gpu.ram.read_u32(x + 0x10), 100);
}

#[test]
fn remap_with_whole_invalidate() {
    let mut gpu = Vgpu::start();
    remap_follows(&mut gpu, Sync::WholeInvalidate);
}

#[test]
fn remap_with_range_invalidate() {
    let mut gpu = Vgpu::start();
    remap_follows(&mut gpu, Sync::RangeInvalidate);
}

#[test]
fn remap_without_invalidate_each_submission_syncs() {
    let mut gpu = Vgpu::start();
    remap_follows(&mut gpu, Sync::Submission);
}

/// A range TLB_INVALIDATE brings up to date only the tables that translate
/// INV_START..INV_PAGES (SPEC.md): a leaf edit inside the range is seen, one
/// in another subtree is not until a whole invalidation. Seen through the
/// page tracker's track_write count (`--metrics`): no doorbell may ring in
/// between, since every submission is a whole sync point.
#[test]
fn a_range_invalidate_syncs_only_the_tables_of_its_range() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut gpu = Vgpu::start_with(Options {
        extra_args: vec!["--metrics".into(), format!("127.0.0.1:{port}")],
        ..Options::default()
    });
    let writes = || {
        let (_, text) = umdev_testkit::metrics::http(port, b"GET /metrics HTTP/1.0\r\n\r\n");
        umdev_testkit::metrics::sample(&text, "umdev_pagetrack_track_writes_total")
            .unwrap_or_else(|| panic!("no track_write count in:\n{text}"))
    };
    let wait_writes = |n: f64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while writes() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        writes()
    };
    let mut ctx = gpu.context(1);
    let [x, y, u, z] = [(); 4].map(|_| gpu.alloc.page());
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(x), true);
    ctx.pt.map(&mut gpu, B_VA, Target::Ram(y), true);
    ctx.run_ok(
        &mut gpu,
        &[cmd::store_dword(A_VA, 1), cmd::store_dword(B_VA, 2)],
    );
    let before = writes();
    // One leaf entry edited in each subtree (A_VA and B_VA differ at the root).
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(u), true);
    ctx.pt.map(&mut gpu, B_VA, Target::Ram(z), true);
    gpu.ctx_write64(1, CTX_INV_START, A_VA);
    gpu.ctx_write(1, CTX_INV_PAGES, 1);
    gpu.ctx_write(1, CTX_TLB_INVALIDATE, TLB_INVALIDATE_RANGE);
    assert_eq!(wait_writes(before + 1.0), before + 1.0, "the edit in range");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        writes(),
        before + 1.0,
        "the edit outside the range is not seen"
    );
    gpu.ctx_write(1, CTX_TLB_INVALIDATE, TLB_INVALIDATE_ALL);
    assert_eq!(wait_writes(before + 2.0), before + 2.0, "whole invalidate");
    ctx.run_ok(
        &mut gpu,
        &[cmd::store_dword(A_VA, 3), cmd::store_dword(B_VA, 4)],
    );
    assert_eq!((gpu.ram.read_u32(u), gpu.ram.read_u32(z)), (3, 4));
    assert_eq!((gpu.ram.read_u32(x), gpu.ram.read_u32(y)), (1, 2));
}

#[test]
fn pte_writes_as_two_halves() {
    let mut gpu = Vgpu::start();
    gpu.split_pte_writes = true;
    remap_follows(&mut gpu, Sync::Submission);
    // High halves matter: a target above 4 GiB of guest address space (outside
    // guest RAM) differs from its low half only in the high dword.
    let mut ctx = gpu.context(2);
    let x = ctx.pt.map_new(&mut gpu, B_VA, 1, true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(B_VA, 7)]);
    let slot = ctx.pt.slot(&mut gpu, B_VA, 1);
    gpu.ram.write_u32(slot + 4, 1); // + 16 TiB: outside guest RAM
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(B_VA, 8)]);
    expect_fault(f, FAULT_BAD_TARGET, B_VA);
    ctx.clear_fault(&mut gpu);
    gpu.ram.write_u32(slot + 4, 0);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(B_VA, 9)]);
    assert_eq!(gpu.ram.read_u32(x), 9);
}

#[test]
fn gpu_rewrites_its_page_tables_with_scan() {
    gpu_rewrites_ptes(PageTrack::Scan);
}

#[test]
fn gpu_rewrites_its_page_tables_with_dirty_bitmap() {
    gpu_rewrites_ptes(PageTrack::DirtyBitmap);
}

#[test]
fn gpu_rewrites_its_page_tables_with_uffd() {
    gpu_rewrites_ptes(PageTrack::Uffd);
}

/// The GPU rewrites a leaf PTE of its own context (the leaf table is mapped
/// writable): a TLB_INVALIDATE command after it splits the submission, so the
/// commands after it use the new mapping; without one, the whole submission was
/// translated before it ran and keeps the old one.
fn gpu_rewrites_ptes(source: PageTrack) {
    let mut gpu = Vgpu::start_source(source);
    let mut ctx = gpu.context(0);
    let x = gpu.alloc.page();
    let y = gpu.alloc.page();
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(x), true);
    let slot = ctx.pt.slot(&mut gpu, A_VA, 1);
    let leaf_table = slot & !(PAGE - 1);
    const PT_VA: u64 = 0x0000_6000_0000;
    ctx.pt.map(&mut gpu, PT_VA, Target::Ram(leaf_table), true);
    let slot_va = PT_VA + (slot & (PAGE - 1));
    let to = |t: u64| pte(Target::Ram(t), true);
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(A_VA, 1),
            cmd::store_dword(slot_va, to(y) as u32),
            cmd::store_dword(slot_va + 4, (to(y) >> 32) as u32),
            cmd::tlb_invalidate(),
            cmd::store_dword(A_VA, 2),
        ],
    );
    assert_eq!(
        gpu.ram.read_u64(slot),
        to(y),
        "{source:?}: the GPU wrote the PTE"
    );
    assert_eq!(
        (gpu.ram.read_u32(x), gpu.ram.read_u32(y)),
        (1, 2),
        "{source:?}: after the TLB_INVALIDATE command the new mapping"
    );
    // No command in between: the submission was audited and translated whole.
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(slot_va, to(x) as u32),
            cmd::store_dword(A_VA, 3),
        ],
    );
    assert_eq!(
        (gpu.ram.read_u32(x), gpu.ram.read_u32(y)),
        (1, 3),
        "{source:?}: without a sync point the old translation"
    );
    // The next submission syncs and sees the GPU's own write.
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 4)]);
    assert_eq!(
        (gpu.ram.read_u32(x), gpu.ram.read_u32(y)),
        (4, 3),
        "{source:?}: the next submission sees the GPU-written PTE"
    );
}

// ---- each page-track source -------------------------------------------------------

/// The same workload and results with every source.
fn workload_with(source: PageTrack) {
    let mut gpu = Vgpu::start_source(source);
    basic_commands(&mut gpu);
    remap_follows(&mut gpu, Sync::Submission);
    remap_follows(&mut gpu, Sync::RangeInvalidate);
    gpu.split_pte_writes = true;
    remap_follows(&mut gpu, Sync::WholeInvalidate);
    shared_subtrees(&mut gpu);
    // Many quick remaps of one PTE, each followed by a submission.
    let mut ctx = gpu.context(3);
    let pages: Vec<u64> = (0..8).map(|_| gpu.alloc.page()).collect();
    for i in 0..64u32 {
        let p = pages[i as usize % pages.len()];
        ctx.pt.map(&mut gpu, C_VA, Target::Ram(p), true);
        ctx.run_ok(&mut gpu, &[cmd::store_dword(C_VA + 4 * (i as u64 / 8), i)]);
        assert_eq!(
            gpu.ram.read_u32(p + 4 * (i as u64 / 8)),
            i,
            "{source:?} remap {i}"
        );
    }
    assert!(gpu.backend.alive());
}

#[test]
fn workload_with_scan() {
    workload_with(PageTrack::Scan);
}

#[test]
fn workload_with_dirty_bitmap() {
    workload_with(PageTrack::DirtyBitmap);
}

#[test]
fn workload_with_uffd() {
    workload_with(PageTrack::Uffd);
}

#[test]
fn switching_pt_root_takes_effect_at_the_next_submission() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    let other = PageTables::new(&mut gpu);
    let y = other.map_new(&mut gpu, A_VA, 1, true);
    other.map(&mut gpu, FENCE_VA, Target::Ram(ctx.fence_gpa), true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
    for round in 2..8u32 {
        let (root, page) = if round % 2 == 0 {
            (other.root, y)
        } else {
            (ctx.pt.root, x)
        };
        gpu.ctx_write64(0, CTX_PT_ROOT, root);
        ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, round)]);
        assert_eq!(gpu.ram.read_u32(page), round, "round {round}");
    }
}

// ---- shared tables --------------------------------------------------------------

/// Contexts 0 and 1 share a level-3 table (their level-4 entries for B_VA point
/// at it); a change in the shared leaf is seen by both at their sync points.
fn shared_subtrees(gpu: &mut Vgpu) {
    let mut c0 = gpu.context(0);
    let mut c1 = gpu.context(1);
    let x = gpu.alloc.page();
    let y = gpu.alloc.page();
    c0.pt.map(gpu, B_VA, Target::Ram(x), true);
    let l4 = c0.pt.entry(gpu, B_VA, 4);
    c1.pt.set_entry(gpu, B_VA, 4, l4);
    c0.run_ok(gpu, &[cmd::store_dword(B_VA, 0xc0)]);
    c1.run_ok(gpu, &[cmd::store_dword(B_VA + 4, 0xc1)]);
    assert_eq!((gpu.ram.read_u32(x), gpu.ram.read_u32(x + 4)), (0xc0, 0xc1));
    // Changed through either: context 1 syncs first, then context 0.
    c1.pt.map(gpu, B_VA, Target::Ram(y), true);
    c1.run_ok(gpu, &[cmd::store_dword(B_VA + 4, 0xd1)]);
    c0.run_ok(gpu, &[cmd::store_dword(B_VA, 0xd0)]);
    assert_eq!((gpu.ram.read_u32(y), gpu.ram.read_u32(y + 4)), (0xd0, 0xd1));
    assert_eq!((gpu.ram.read_u32(x), gpu.ram.read_u32(x + 4)), (0xc0, 0xc1));
    // Unmapped in the shared leaf: both fault; the private parts still work.
    c0.pt.unmap(gpu, B_VA);
    let f = c1.run_fault(gpu, &[cmd::store_dword(B_VA, 1)]);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA);
    let f = c0.run_fault(gpu, &[cmd::store_dword(B_VA, 1)]);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA);
    c0.clear_fault(gpu);
    c1.clear_fault(gpu);
    // Context 1 stops sharing: its own level-3 table; context 0 keeps the old.
    c1.pt.set_entry(gpu, B_VA, 4, 0);
    c1.pt.map(gpu, B_VA, Target::Ram(y), true);
    c0.pt.map(gpu, B_VA, Target::Ram(x), true);
    c1.run_ok(gpu, &[cmd::store_dword(B_VA + 8, 0xe1)]);
    c0.run_ok(gpu, &[cmd::store_dword(B_VA + 8, 0xe0)]);
    assert_eq!(
        (gpu.ram.read_u32(x + 8), gpu.ram.read_u32(y + 8)),
        (0xe0, 0xe1)
    );
}

#[test]
fn shared_subtrees_between_contexts() {
    let mut gpu = Vgpu::start();
    shared_subtrees(&mut gpu);
}

#[test]
fn one_table_under_two_parents() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 2, true);
    // The level-2 entry of another 2 MiB range points at the same level-1 table:
    // both ranges alias the same pages.
    let alias = A_VA + (7 << 21);
    let l2 = ctx.pt.entry(&gpu, A_VA, 2);
    ctx.pt.set_entry(&mut gpu, alias, 2, l2);
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(alias + PAGE, 0xa11a5),
            cmd::copy(A_VA + PAGE, alias + 0x40, 4),
        ],
    );
    assert_eq!(gpu.ram.read_u32(x + PAGE), 0xa11a5);
    assert_eq!(gpu.ram.read_u32(x + 0x40), 0xa11a5);
    // Changing the shared leaf changes both ranges.
    let y = gpu.alloc.page();
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(y), true);
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(alias + 8, 5),
            cmd::store_dword(A_VA + 12, 6),
        ],
    );
    assert_eq!((gpu.ram.read_u32(y + 8), gpu.ram.read_u32(y + 12)), (5, 6));
    // One parent drops it; the other still uses it.
    ctx.pt.set_entry(&mut gpu, alias, 2, 0);
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(alias + 8, 7)]);
    expect_fault(f, FAULT_NOT_PRESENT, alias + 8);
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA + 8, 8)]);
    assert_eq!(gpu.ram.read_u32(y + 8), 8);
}

// ---- audits and faults ---------------------------------------------------------------

#[test]
fn audit_is_all_or_nothing() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    let ring_start = ctx.ring.tail;
    let f = ctx.run_fault(
        &mut gpu,
        &[
            cmd::store_dword(A_VA, 1),
            cmd::fill(A_VA, 64, 0x77),
            cmd::copy(A_VA, B_VA + 0x123 * 4, 4),
        ],
    );
    expect_fault(f, FAULT_NOT_PRESENT, B_VA + 0x123 * 4);
    assert_eq!(f.head, ring_start);
    assert_eq!(
        gpu.ram.read(x, 64),
        [0; 64],
        "nothing of the submission ran"
    );
    assert_ne!(f.status & CTX_STATUS_FAULTED, 0);
    // The fault interrupt, on the context's vector.
    assert!(gpu.wait_irq(Some(0), TIMEOUT), "fault interrupt");
    assert_eq!(gpu.ack_irqs() & 1, 1);
    // A doorbell while faulted runs nothing.
    ctx.submit(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(gpu.ram.read_u32(x), 0, "a faulted context runs nothing");
    assert!(gpu.fault(0).is_some());
    // Clear: HEAD jumps to TAIL (the pending STORE is skipped); the next works.
    ctx.clear_fault(&mut gpu);
    assert_eq!(gpu.ctx_read(0, CTX_STATUS) & CTX_STATUS_FAULTED, 0);
    assert_eq!(
        gpu.ctx_read(0, CTX_RING_HEAD),
        gpu.ctx_read(0, CTX_RING_TAIL)
    );
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA + 4, 3)]);
    assert_eq!(gpu.ram.read(x, 8), [0, 0, 0, 0, 3, 0, 0, 0]);
}

#[test]
fn a_tlb_invalidate_command_splits_the_audit() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    // The first part runs, the second faults on its own.
    let start = ctx.ring.tail;
    ctx.submit(
        &mut gpu,
        &[
            cmd::store_dword(A_VA, 1),
            cmd::tlb_invalidate(),
            cmd::store_dword(B_VA, 2),
        ],
    );
    let f = gpu.wait_fault(0);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA);
    assert_eq!(
        gpu.ram.read_u32(x),
        1,
        "the part before the TLB_INVALIDATE ran"
    );
    // SPEC: RING_HEAD stays at the start of the submission, also when a part
    // before the faulting one ran.
    assert_eq!(f.head, start, "head (submission at {start:#x})");
}

#[test]
fn not_present_read_only_and_partial_ranges() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    ctx.pt.map_new(&mut gpu, A_VA, 2, true);
    let ro = ctx.pt.map_new(&mut gpu, B_VA, 1, false);
    gpu.ram.write_u32(ro, 0x5a5a);
    // Reading a read-only page is fine.
    ctx.run_ok(&mut gpu, &[cmd::copy(B_VA, A_VA, 4)]);
    let cases: Vec<(Vec<u32>, u8, u64)> = vec![
        (
            cmd::store_dword(B_VA + 0x40, 1),
            FAULT_READ_ONLY,
            B_VA + 0x40,
        ),
        (cmd::fill(B_VA + 0x100, 8, 1), FAULT_READ_ONLY, B_VA + 0x100),
        (
            cmd::copy(A_VA, B_VA + 0x10, 8),
            FAULT_READ_ONLY,
            B_VA + 0x10,
        ),
        (
            cmd::copy(C_VA + 0x30, A_VA, 8),
            FAULT_NOT_PRESENT,
            C_VA + 0x30,
        ),
        (cmd::store_dword(C_VA, 1), FAULT_NOT_PRESENT, C_VA),
        // A range that runs off its mapping: the first byte not mapped.
        (
            cmd::fill(A_VA + 0x1f00, 0x200, 1),
            FAULT_NOT_PRESENT,
            A_VA + 0x2000,
        ),
        (
            cmd::copy(A_VA + 0x1800, A_VA, 0x1000),
            FAULT_NOT_PRESENT,
            A_VA + 0x2000,
        ),
        // Blit lines past the mapped rows of its source.
        (
            cmd::blit(A_VA, 0x1000, B_VA - 0x10_0000, 0, 4, 1),
            FAULT_NOT_PRESENT,
            B_VA - 0x10_0000,
        ),
        (
            cmd::blit(A_VA + 0x10, 0x800, A_VA, 16, 16, 5),
            FAULT_NOT_PRESENT,
            A_VA + 0x2010,
        ),
        // The FENCE address is checked as any write.
        (cmd::fence(B_VA, 1, false), FAULT_READ_ONLY, B_VA),
        // Beyond 48 bits.
        (cmd::store_dword(VA_LIMIT, 1), FAULT_NOT_PRESENT, VA_LIMIT),
    ];
    for (i, (c, reason, addr)) in cases.into_iter().enumerate() {
        let f = ctx.run_fault(&mut gpu, &[cmd::nop(), c]);
        assert_eq!(
            (fault_name(f.reason), f.addr),
            (fault_name(reason), addr),
            "case {i}: {f}"
        );
        ctx.clear_fault(&mut gpu);
        ctx.run_ok(&mut gpu, &[]);
    }
    assert_eq!(gpu.ram.read_u32(ro), 0x5a5a, "the read-only page is intact");
}

#[test]
fn ptes_pointing_outside_guest_memory_are_bad_target() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let ram_end = RAM_GPA + gpu.ram.size();
    let vram_end = gpu.vram_size;
    let targets = [
        Target::Ram(ram_end),
        Target::Ram(0),
        Target::Ram(RAM_GPA - PAGE),
        Target::Ram(PTE_ADDR_MASK),
        Target::Vram(vram_end),
        Target::Vram(PTE_ADDR_MASK),
    ];
    for (i, t) in targets.into_iter().enumerate() {
        let va = C_VA + i as u64 * PAGE;
        ctx.pt.map(&mut gpu, va, t, true);
        for c in [
            cmd::store_dword(va + 0x44, 1),
            cmd::copy(va + 0x44, FENCE_VA + 0x100, 4),
        ] {
            let f = ctx.run_fault(&mut gpu, &[c]);
            expect_fault(f, FAULT_BAD_TARGET, va + 0x44);
            ctx.clear_fault(&mut gpu);
        }
    }
    // The last page of guest RAM is fine.
    ctx.pt
        .map(&mut gpu, A_VA, Target::Ram(ram_end - PAGE), true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA + 0xffc, 0x1a57)]);
    assert_eq!(gpu.ram.read_u32(ram_end - 4), 0x1a57);
    assert!(gpu.backend.alive());
}

#[test]
fn writes_into_any_ring_are_ring_write() {
    let mut gpu = Vgpu::start();
    let mut c0 = gpu.context(0);
    let c1 = gpu.context(1);
    let own = c0.ring.base;
    let other = c1.ring.base;
    c0.pt.map(&mut gpu, A_VA, Target::Ram(own), true);
    c0.pt.map(&mut gpu, A_VA + PAGE, Target::Ram(other), true);
    let before_other = gpu.ram.read(other, 4096);
    for (c, addr) in [
        (cmd::store_dword(A_VA + 0x800, 0), A_VA + 0x800),
        (cmd::fill(A_VA + PAGE + 0x40, 16, 0), A_VA + PAGE + 0x40),
        (
            cmd::copy(FENCE_VA, A_VA + PAGE + 0xf00, 4),
            A_VA + PAGE + 0xf00,
        ),
        (cmd::fence(A_VA + 0x10, 1, false), A_VA + 0x10),
    ] {
        let f = c0.run_fault(&mut gpu, &[c]);
        expect_fault(f, FAULT_RING_WRITE, addr);
        c0.clear_fault(&mut gpu);
    }
    assert_eq!(gpu.ram.read(other, 4096), before_other);
    // Reading a ring is allowed.
    let dst = c0.pt.map_new(&mut gpu, B_VA, 1, true);
    c0.run_ok(&mut gpu, &[cmd::copy(A_VA, B_VA, 16)]);
    assert_eq!(gpu.ram.read(dst, 16), gpu.ram.read(own, 16));
}

#[test]
fn rings_outside_memory_or_malformed_are_bad_ring() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let good_base = ctx.ring.base;
    let ram_end = RAM_GPA + gpu.ram.size();
    for (base, size) in [
        (ram_end, 4096),        // outside guest memory
        (0x10_0000_0000, 4096), // far outside
        (ram_end - PAGE, 8192), // runs off the end
        (good_base, 3000),      // not a power of two
        (good_base, 2048),      // too small
        (good_base, 2 << 20),   // too large
        (good_base, 0),         // zero
    ] {
        gpu.ctx_write64(0, CTX_RING_BASE, base);
        gpu.ctx_write(0, CTX_RING_SIZE, size);
        let head = gpu.ctx_read(0, CTX_RING_HEAD);
        gpu.ctx_write(0, CTX_RING_TAIL, (head + 16) % 4096);
        let f = gpu.wait_fault(0);
        assert_eq!(
            (fault_name(f.reason), f.addr),
            ("BAD_RING", base),
            "ring {base:#x}/{size:#x}: {f}"
        );
        assert!(gpu.backend.alive());
        gpu.ctx_write64(0, CTX_RING_BASE, good_base);
        gpu.ctx_write(0, CTX_RING_SIZE, 4096);
        ctx.clear_fault(&mut gpu);
        ctx.run_ok(&mut gpu, &[]);
    }
    // A base that is not 4 KiB aligned: BAD_RING, unless the register keeps only
    // the aligned part (SPEC.md says the base is aligned, not what happens if not).
    gpu.ctx_write64(0, CTX_RING_BASE, good_base + 0x800);
    let read_back = gpu.ctx_read64(0, CTX_RING_BASE);
    if read_back == good_base + 0x800 {
        ctx.submit(&mut gpu, &[cmd::nop()]);
        let f = gpu.wait_fault(0);
        expect_fault(f, FAULT_BAD_RING, good_base + 0x800);
        gpu.ctx_write64(0, CTX_RING_BASE, good_base);
        ctx.clear_fault(&mut gpu);
    } else {
        assert_eq!(read_back, good_base);
    }
    ctx.run_ok(&mut gpu, &[]);
}

#[test]
fn no_root_and_bad_tables() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let root = ctx.pt.root;
    let ram_end = RAM_GPA + gpu.ram.size();
    for bad_root in [0, ram_end, 0x10_0000_0000] {
        gpu.ctx_write64(0, CTX_PT_ROOT, bad_root);
        let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(FENCE_VA + 0x100, 1)]);
        expect_fault(f, FAULT_NO_ROOT, bad_root);
        ctx.clear_fault(&mut gpu);
    }
    gpu.ctx_write64(0, CTX_PT_ROOT, root);
    ctx.run_ok(&mut gpu, &[]);
    // An upper-level entry pointing outside guest RAM, at each level.
    for level in [4u8, 3, 2] {
        let va = C_VA + ((level as u64) << 30);
        ctx.pt.map_new(&mut gpu, va, 1, true);
        ctx.run_ok(&mut gpu, &[cmd::store_dword(va, 1)]);
        let old = ctx.pt.entry(&gpu, va, level);
        ctx.pt.set_entry(&mut gpu, va, level, ram_end | PTE_PRESENT);
        let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(va + 4, 1)]);
        expect_fault(f, FAULT_BAD_TABLE, va + 4);
        ctx.clear_fault(&mut gpu);
        // The VRAM bit in an upper level.
        ctx.pt.set_entry(&mut gpu, va, level, old | PTE_VRAM);
        let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(va + 8, 1)]);
        expect_fault(f, FAULT_BAD_TABLE, va + 8);
        ctx.clear_fault(&mut gpu);
        ctx.pt.set_entry(&mut gpu, va, level, old);
        ctx.run_ok(&mut gpu, &[cmd::store_dword(va + 12, 1)]);
    }
    // The WRITABLE bit of upper levels is ignored (our upper entries never have
    // it; set it on one path and clear it on another: both write).
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    let e = ctx.pt.entry(&gpu, A_VA, 3);
    ctx.pt.set_entry(&mut gpu, A_VA, 3, e | PTE_WRITABLE);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 0x77)]);
    assert_eq!(gpu.ram.read_u32(x), 0x77);
    // A root entry that points at the root itself (a loop) is just a table:
    // whatever the walk finds, the backend lives and the context recovers.
    let loop_va = 0x0000_7e80_0000_0000;
    ctx.pt.set_entry(&mut gpu, loop_va, 4, root | PTE_PRESENT);
    if ctx.run(&mut gpu, &[cmd::store_dword(loop_va, 1)]).is_err() {
        ctx.clear_fault(&mut gpu);
    }
    assert!(gpu.backend.alive());
    ctx.run_ok(&mut gpu, &[]);
}

#[test]
fn malformed_commands() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    let batch = ctx.pt.map_new(&mut gpu, C_VA, 1, false);
    let cases: Vec<Vec<u32>> = vec![
        vec![0x7700_0001],                         // unknown opcode
        vec![0xff00_0001],                         // unknown opcode
        vec![header(OP_STORE_DWORD, 0) - 1, 0, 0], // length 3 for STORE_DWORD
        vec![header(OP_NOP, 0) + 1, 0],            // length 2 for NOP
        vec![header(OP_NOP, 0) - 1],               // length 0
        cmd::fill(A_VA, 6, 0),                     // size not a multiple of 4
        cmd::batch_end(),                          // BATCH_END in the ring
    ];
    for (i, bad) in cases.into_iter().enumerate() {
        let good = cmd::store_dword(A_VA, i as u32 + 1);
        let at = ctx.ring.tail;
        let f = ctx.run_fault(&mut gpu, &[good.clone(), bad]);
        assert_eq!(
            (fault_name(f.reason), f.addr),
            ("MALFORMED", ((at + 16) & (ctx.ring.size - 1)) as u64),
            "case {i}: FAULT_ADDR is the ring offset of the command: {f}"
        );
        assert_eq!(gpu.ram.read_u32(x), i as u32, "case {i}: nothing ran");
        ctx.clear_fault(&mut gpu);
        ctx.run_ok(&mut gpu, &[good]);
        assert_eq!(gpu.ram.read_u32(x), i as u32 + 1);
    }
    // Inside a batch: FAULT_ADDR is the GPU address of the command.
    write_batch(
        &mut gpu,
        batch,
        &[
            cmd::nop(),
            cmd::store_dword(A_VA, 0x99),
            vec![0x4200_0001],
            cmd::batch_end(),
        ],
    );
    let f = ctx.run_fault(&mut gpu, &[cmd::batch_start(C_VA)]);
    expect_fault(f, FAULT_MALFORMED, C_VA + 20);
    ctx.clear_fault(&mut gpu);
    // A command cut off by the doorbell's TAIL: MALFORMED at its ring offset,
    // and nothing of it ran.
    let at = ctx.ring.tail;
    ctx.ring.emit(&mut gpu, &cmd::store_dword(A_VA, 0x55));
    gpu.ctx_write(0, CTX_RING_TAIL, at + 8);
    let f = gpu.wait_fault(0);
    expect_fault(f, FAULT_MALFORMED, at as u64);
    assert_eq!(f.head, at, "{f}");
    assert_ne!(gpu.ram.read_u32(x), 0x55, "the cut command ran");
    ctx.clear_fault(&mut gpu);
    // TAIL not a multiple of 4: BAD_RING or MALFORMED, or ignored; not a crash.
    let at = ctx.ring.tail;
    gpu.ctx_write(0, CTX_RING_TAIL, at + 2);
    std::thread::sleep(Duration::from_millis(50));
    if let Some(f) = gpu.fault(0) {
        assert!(matches!(f.reason, FAULT_MALFORMED | FAULT_BAD_RING), "{f}");
    }
    gpu.ctx_write(0, CTX_RING_TAIL, at);
    ctx.clear_fault(&mut gpu);
    assert!(gpu.backend.alive());
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 0x66)]);
    assert_eq!(gpu.ram.read_u32(x), 0x66);
}

#[test]
fn self_jumping_and_too_deep_batches() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    let b = ctx.pt.map_new(&mut gpu, C_VA, 8, false);
    // A batch that starts itself.
    write_batch(
        &mut gpu,
        b,
        &[
            cmd::store_dword(A_VA, 1),
            cmd::batch_start(C_VA),
            cmd::batch_end(),
        ],
    );
    let f = ctx.run_fault(&mut gpu, &[cmd::batch_start(C_VA)]);
    match f.reason {
        FAULT_NESTING => assert_eq!(f.addr, C_VA + 16, "the BATCH_START too deep: {f}"),
        FAULT_BUDGET => {}
        _ => panic!("self-jumping batch: {f}"),
    }
    assert_eq!(gpu.ram.read_u32(x), 0, "nothing ran");
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[]);
    // Batch k (1..=5) at C_VA + k pages starts batch k + 1. Ring -> 1 -> 2 -> 3
    // -> 4 is four deep; batch 4's BATCH_START (at C_VA + 4 pages + 16) would
    // make it five.
    for k in 1..=5u64 {
        let mut cmds = vec![cmd::store_dword(A_VA + 4 * k, 1)];
        if k < 5 {
            cmds.push(cmd::batch_start(C_VA + (k + 1) * PAGE));
        }
        cmds.push(cmd::batch_end());
        write_batch(&mut gpu, b + k * PAGE, &cmds);
    }
    let f = ctx.run_fault(&mut gpu, &[cmd::batch_start(C_VA + PAGE)]);
    expect_fault(f, FAULT_NESTING, C_VA + 4 * PAGE + 16);
    assert_eq!(gpu.ram.read(x, 32), [0; 32], "nothing ran");
    ctx.clear_fault(&mut gpu);
    // A batch running off into unmapped memory without BATCH_END.
    let end = ctx.pt.map_new(&mut gpu, B_VA, 1, false);
    let nops: Vec<u32> = vec![header(OP_NOP, 0); 1024];
    gpu.ram.write_dwords(end, &nops);
    let f = ctx.run_fault(&mut gpu, &[cmd::batch_start(B_VA)]);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA + PAGE);
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 0x600d)]);
    assert_eq!(gpu.ram.read_u32(x), 0x600d);
}

#[test]
fn budgets_of_one_submission() {
    let mut gpu = Vgpu::start_with(Options {
        ram_mib: 8,
        ..Default::default()
    });
    let mut ctx = gpu.context_with_ring(0, RING_SIZE_MAX);
    let x = gpu.alloc.page();
    // 200 MiB of GPU VA, all aliasing one page.
    let pages = 200 << 8;
    for i in 0..pages {
        ctx.pt.map(&mut gpu, A_VA + i * PAGE, Target::Ram(x), true);
    }
    // Two FILLs of 200 MiB move 400 MiB: over the 256 MiB budget.
    let at = ctx.ring.tail;
    let f = ctx.run_fault(
        &mut gpu,
        &[cmd::fill(A_VA, 200 << 20, 1), cmd::fill(A_VA, 200 << 20, 2)],
    );
    assert_eq!(fault_name(f.reason), "BUDGET", "{f}");
    assert_eq!(
        f.addr,
        u64::from(at) + 20,
        "the second FILL's ring offset: {f}"
    );
    assert_eq!(gpu.ram.read_u32(x), 0, "nothing ran");
    ctx.clear_fault(&mut gpu);
    // A BLIT larger than memory: BUDGET or NOT_PRESENT, never a run.
    let f = ctx.run_fault(
        &mut gpu,
        &[cmd::blit(
            A_VA,
            0x10_0000,
            A_VA,
            0x10_0000,
            0x10_0000,
            0xffff_ffff,
        )],
    );
    assert!(matches!(f.reason, FAULT_BUDGET | FAULT_NOT_PRESENT), "{f}");
    ctx.clear_fault(&mut gpu);
    let f = ctx.run_fault(
        &mut gpu,
        &[cmd::blit(
            A_VA,
            0xffff_ffff,
            A_VA,
            0xffff_ffff,
            0xffff_fffc,
            0xffff_ffff,
        )],
    );
    assert!(matches!(f.reason, FAULT_BUDGET | FAULT_NOT_PRESENT), "{f}");
    ctx.clear_fault(&mut gpu);
    assert_eq!(gpu.ram.read_u32(x), 0, "nothing ran");

    // 65 536 commands are allowed (65 535 NOPs and the FENCE) ...
    let nops = vec![cmd::nop(); 65535];
    ctx.run_ok(&mut gpu, &nops);
    // ... one more is not: the 65 537th is where it went over.
    let at = ctx.ring.tail;
    let nops = vec![cmd::nop(); 65537];
    let f = ctx.run_fault(&mut gpu, &nops);
    assert_eq!(fault_name(f.reason), "BUDGET", "{f}");
    assert_eq!(f.addr, u64::from((at + 4 * 65536) % RING_SIZE_MAX), "{f}");
    ctx.clear_fault(&mut gpu);
    // A BLIT counts one command per line: 65 536 lines of 4 bytes are over
    // the budget with the FENCE, fewer are not.
    let f = ctx.run_fault(
        &mut gpu,
        &[cmd::blit(A_VA, 0, A_VA + 4, 0, 4, 65536), cmd::nop()],
    );
    assert_eq!(fault_name(f.reason), "BUDGET", "{f}");
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::blit(A_VA, 0, A_VA + 4, 0, 4, 65534)]);
    // In a batch buffer, FAULT_ADDR is the GPU address of the command.
    let batch = ctx.pt.map_new(&mut gpu, C_VA, 1, false);
    write_batch(
        &mut gpu,
        batch,
        &[
            cmd::nop(),
            cmd::blit(A_VA, 0, A_VA + 4, 0, 4, 70000),
            cmd::batch_end(),
        ],
    );
    let f = ctx.run_fault(&mut gpu, &[cmd::batch_start(C_VA)]);
    assert_eq!(fault_name(f.reason), "BUDGET", "{f}");
    assert_eq!(f.addr, C_VA + 4, "{f}");
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 5)]);
    assert_eq!(gpu.ram.read_u32(x), 5);
}

#[test]
fn a_fault_leaves_other_contexts_running() {
    let mut gpu = Vgpu::start();
    let mut c0 = gpu.context(0);
    let mut c1 = gpu.context(1);
    let x0 = c0.pt.map_new(&mut gpu, A_VA, 1, true);
    let x1 = c1.pt.map_new(&mut gpu, A_VA, 1, true);
    let f = c0.run_fault(&mut gpu, &[cmd::store_dword(B_VA, 1)]);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA);
    assert!(gpu.wait_irq(Some(0), TIMEOUT));
    assert_eq!(gpu.ack_irqs(), 1);
    for i in 0..10 {
        c1.run_ok(&mut gpu, &[cmd::store_dword(A_VA, i)]);
        assert_eq!(gpu.ram.read_u32(x1), i);
    }
    assert!(gpu.fault(0).is_some(), "context 0 stays faulted");
    assert_eq!(gpu.fault(1), None);
    c0.clear_fault(&mut gpu);
    c0.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 0xc0)]);
    assert_eq!(gpu.ram.read_u32(x0), 0xc0);
}

#[test]
fn disabled_context_and_bus_master_off() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    // Disabled: a doorbell runs nothing until enabled.
    gpu.ctx_write(0, CTX_CONTROL, 0);
    assert_eq!(gpu.ctx_read(0, CTX_STATUS) & CTX_STATUS_ENABLED, 0);
    let seq = ctx.next_fence(&mut gpu, &[cmd::store_dword(A_VA, 1)], false);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(gpu.ram.read_u32(x), 0, "disabled context ran");
    gpu.ctx_write(0, CTX_CONTROL, CTX_CONTROL_ENABLE);
    // Enabling need not kick the engine; a doorbell does.
    let tail = ctx.ring.tail;
    gpu.ctx_write(0, CTX_RING_TAIL, tail);
    gpu.wait_fence(0, seq, TIMEOUT).unwrap();
    assert_eq!(gpu.ram.read_u32(x), 1);
    // Bus mastering off: the device must not touch guest memory.
    gpu.set_command(0x0002);
    ctx.submit(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        gpu.ram.read_u32(x),
        1,
        "wrote guest memory with bus mastering off"
    );
    if let Some(f) = gpu.fault(0) {
        assert!(
            matches!(f.reason, FAULT_DMA_ERROR | FAULT_BAD_RING | FAULT_NO_ROOT),
            "{f}"
        );
        gpu.set_command(0x0006);
        ctx.clear_fault(&mut gpu);
    } else {
        gpu.set_command(0x0006);
        let tail = ctx.ring.tail;
        gpu.ctx_write(0, CTX_RING_TAIL, tail);
        gpu.wait_idle(0, TIMEOUT).unwrap();
    }
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 3)]);
    assert_eq!(gpu.ram.read_u32(x), 3);
}

#[test]
fn guest_memory_unmapped_under_the_device() {
    let mut gpu = Vgpu::start();
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
    let size = gpu.ram.size();
    gpu.client.dma_unmap(RAM_GPA, size, 0).unwrap();
    ctx.submit(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    let f = gpu.wait_fault(0);
    // SPEC.md: DMA_ERROR is "guest memory went away"; the ring and the root are
    // gone too, so BAD_RING or NO_ROOT are as fair.
    assert!(
        matches!(f.reason, FAULT_DMA_ERROR | FAULT_BAD_RING | FAULT_NO_ROOT),
        "{f}"
    );
    eprintln!("with guest memory unmapped: {f}");
    assert!(gpu.backend.alive());
    // The same memory back: clear and go on (the tables are read afresh).
    gpu.map_ram(0, size);
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 3)]);
    assert_eq!(gpu.ram.read_u32(x), 3);
}

/// Found by the soak (device-models/vgpu/tests/soak.rs): a leaf, or a link to a lower table,
/// validated while the memory it points at was unmapped was kept as
/// BAD_TARGET / BAD_TABLE after the memory came back, so a submission with
/// all of its memory mapped faulted until the guest rewrote the entry.
#[test]
fn memory_mapped_again_is_seen_at_the_next_sync_point() {
    let mut gpu = Vgpu::start();
    let size = gpu.ram.size();
    let half = size / 2;
    // Guest RAM as two regions: the context's tables in the low one; a target
    // page, and the leaf table of B_VA, in the high one.
    gpu.client.dma_unmap(RAM_GPA, size, 0).unwrap();
    gpu.map_ram(0, half);
    gpu.map_ram(half, half);
    let mut ctx = gpu.context(0);
    let target = RAM_GPA + half + PAGE;
    ctx.pt.map(&mut gpu, A_VA, Target::Ram(target), true);
    let low = std::mem::replace(
        &mut gpu.alloc,
        PageAllocator::new(RAM_GPA + half + 2 * PAGE, RAM_GPA + size),
    );
    let b = ctx.pt.map_new(&mut gpu, B_VA, 1, true);
    gpu.alloc = low;
    // The high region goes before the tables are first shadowed.
    gpu.client.dma_unmap(RAM_GPA + half, half, 0).unwrap();
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
    expect_fault(f, FAULT_BAD_TARGET, A_VA);
    ctx.clear_fault(&mut gpu);
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(B_VA, 2)]);
    expect_fault(f, FAULT_BAD_TABLE, B_VA);
    ctx.clear_fault(&mut gpu);
    // Back, with the same contents: both run.
    gpu.map_ram(half, half);
    ctx.run_ok(
        &mut gpu,
        &[cmd::store_dword(A_VA, 3), cmd::store_dword(B_VA, 4)],
    );
    assert_eq!(gpu.ram.read_u32(target), 3);
    assert_eq!(gpu.ram.read_u32(b), 4);
}

#[test]
fn memory_reached_only_by_message() {
    // Guest RAM the VMM does not share (no fd): data pages there work through
    // DMA_READ/DMA_WRITE messages; page tables there are BAD_TABLE (NO_ROOT for
    // the root).
    let mut gpu = Vgpu::start();
    const MSG_GPA: u64 = 0x1_0000_0000;
    let msg = gpu.map_message_ram(MSG_GPA, 1 << 20);
    let mut ctx = gpu.context(0);
    let x = ctx.pt.map_new(&mut gpu, A_VA, 1, true);
    ctx.pt
        .map_range(&mut gpu, B_VA, Target::Ram(MSG_GPA), 2, true);
    msg.write(MSG_GPA + 0x1000, &0xfeed_f00du32.to_le_bytes());
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::store_dword(B_VA + 0x10, 0x5107e),
            cmd::copy(B_VA + 0x1000, A_VA, 4),
            cmd::fill(B_VA + 0x20, 16, 0x0f0f_0f0f),
        ],
    );
    assert_eq!(msg.read_u32(MSG_GPA + 0x10), 0x5107e);
    assert_eq!(gpu.ram.read_u32(x), 0xfeed_f00d);
    assert_eq!(msg.read_u32(MSG_GPA + 0x2c), 0x0f0f_0f0f);
    assert!(gpu.client.dma_requests_served > 0, "went by message");

    // A level-1 table in that memory.
    let l1 = MSG_GPA + 0x8000;
    msg.write(
        l1 + 8 * pt_index(C_VA, 1) as u64,
        &pte(Target::Ram(x), true).to_le_bytes(),
    );
    ctx.pt.set_entry(&mut gpu, C_VA, 2, l1 | PTE_PRESENT);
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(C_VA, 1)]);
    expect_fault(f, FAULT_BAD_TABLE, C_VA);
    ctx.clear_fault(&mut gpu);
    // The root there.
    let root = MSG_GPA + 0x9000;
    gpu.ctx_write64(0, CTX_PT_ROOT, root);
    let f = ctx.run_fault(&mut gpu, &[cmd::store_dword(FENCE_VA + 0x40, 1)]);
    expect_fault(f, FAULT_NO_ROOT, root);
    gpu.ctx_write64(0, CTX_PT_ROOT, ctx.pt.root);
    ctx.clear_fault(&mut gpu);
    ctx.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    assert_eq!(gpu.ram.read_u32(x), 2);
}

// ---- GGTT ----------------------------------------------------------------------------

#[test]
fn ggtt_entries_and_hostile_writes() {
    let mut gpu = Vgpu::start();
    let ram_page = gpu.alloc.page();
    let good = [
        ggtt_entry(Target::Ram(ram_page), true),
        ggtt_entry(Target::Vram(0x1000), false),
        ggtt_entry(Target::Vram(gpu.vram_size - PAGE), true),
    ];
    for (i, e) in good.iter().enumerate() {
        gpu.ggtt_write(i as u64, *e);
        gpu.ggtt_write_halves(100 + i as u64, *e);
    }
    let last = GGTT_ENTRIES - 1;
    gpu.ggtt_write(last, good[1]);
    for (i, e) in good.iter().enumerate() {
        assert_eq!(gpu.ggtt_read(i as u64), *e);
        assert_eq!(gpu.ggtt_read(100 + i as u64), *e);
    }
    assert_eq!(gpu.ggtt_read(last), good[1]);
    // 4-byte reads of each half.
    assert_eq!(gpu.read_reg(GGTT_OFFSET), good[0] as u32);
    assert_eq!(gpu.read_reg(GGTT_OFFSET + 4), (good[0] >> 32) as u32);
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);
    assert_eq!(gpu.read_reg(REG_IRQ_STATUS), 0);
    // A lone high-half write merges with the current low half.
    gpu.write_reg(GGTT_OFFSET + 8 * 100 + 4, 0);
    assert_eq!(gpu.ggtt_read(100), good[0]);

    // Invalid targets: global error 1 on vector 0; the entry reads back as written.
    let bad = [
        ggtt_entry(Target::Ram(RAM_GPA + gpu.ram.size()), true),
        ggtt_entry(Target::Ram(0x1000), true),
        ggtt_entry(Target::Vram(gpu.vram_size), true),
    ];
    for (i, e) in bad.iter().enumerate() {
        gpu.drain_irqs();
        if i == 2 {
            gpu.ggtt_write_halves(200, *e);
        } else {
            gpu.ggtt_write(200, *e);
        }
        assert_eq!(gpu.ggtt_read(200), *e, "reads back as written");
        assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), GLOBAL_ERROR_BAD_GGTT_ENTRY);
        assert_ne!(gpu.read_reg(REG_IRQ_STATUS) & IRQ_GLOBAL_ERROR, 0);
        assert!(gpu.wait_irq(Some(0), TIMEOUT), "global error on vector 0");
        gpu.write_reg(REG_IRQ_STATUS, IRQ_GLOBAL_ERROR);
        assert_eq!(
            gpu.read_reg(REG_GLOBAL_ERROR),
            0,
            "cleared with IRQ_STATUS bit 8"
        );
        assert_eq!(gpu.read_reg(REG_IRQ_STATUS), 0);
    }
    // An entry that is not VALID maps nothing and is no error.
    gpu.ggtt_write(201, RAM_GPA + gpu.ram.size());
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);

    // Past the GGTT's end (and BAR0's): an error reply, nothing changes.
    for (off, len) in [
        (0x20_0000u64, 8usize),
        (0x1f_fffc, 8),
        (0x20_0000, 4),
        (u64::MAX - 3, 4),
    ] {
        let r = gpu.client.region_write(0, off, &vec![0xff; len]);
        assert!(r.is_err(), "write {len} at {off:#x} past BAR0 accepted");
        assert!(gpu.client.region_read(0, off, len).is_err());
    }
    assert_eq!(gpu.ggtt_read(last), good[1]);
    // Misaligned GGTT accesses read as all ones and are ignored.
    gpu.client
        .region_write(0, GGTT_OFFSET + 2, &[0; 4])
        .unwrap();
    assert_eq!(
        gpu.client.region_read(0, GGTT_OFFSET + 2, 4).unwrap(),
        [0xff; 4]
    );
    assert_eq!(gpu.ggtt_read(0), good[0]);
    assert!(gpu.backend.alive());
}

// ---- scanout ---------------------------------------------------------------------------

fn decode_png(bytes: &[u8]) -> Option<(u32, u32, Vec<u8>)> {
    let pic = umdev::scanout::decode_png(bytes).ok()?;
    Some((pic.width, pic.height, pic.rgb))
}

/// Waits until the PNG at `path` shows `want` (w, h, RGB); panics on timeout with
/// what it saw last.
fn wait_for_png(path: &std::path::Path, want: &(u32, u32, Vec<u8>)) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut last = None;
    loop {
        if let Ok(bytes) = std::fs::read(path) {
            last = decode_png(&bytes);
            if last.as_ref() == Some(want) {
                return;
            }
        }
        if std::time::Instant::now() > deadline {
            match last {
                None => panic!("no readable PNG at {}", path.display()),
                Some((w, h, rgb)) => {
                    let first_diff = rgb.iter().zip(&want.2).position(|(a, b)| a != b);
                    panic!(
                        "PNG is {w}x{h}, want {}x{}; first differing byte {first_diff:?} (pixel {:?})",
                        want.0,
                        want.1,
                        first_diff.map(|d| (d / 3 % w as usize, d / 3 / w as usize))
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn scanout_png_after_fence() {
    let (mut gpu, png_path) = Vgpu::start_scanout_png();
    let (w, h, stride) = (64u32, 48u32, 320u32);
    let fb_pages = (stride as u64 * h as u64).div_ceil(PAGE);
    // Framebuffer: GGTT pages 16.. -> VRAM at 0x40000, half of the entries
    // written as two 4-byte halves.
    let fb_vram = 0x4_0000;
    for i in 0..fb_pages {
        let e = ggtt_entry(Target::Vram(fb_vram + i * PAGE), true);
        if i % 2 == 0 {
            gpu.ggtt_write(16 + i, e);
        } else {
            gpu.ggtt_write_halves(16 + i, e);
        }
    }
    gpu.show_xrgb8888(16 * PAGE, false, w, h, stride);
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);

    // Draw through a context that maps the same VRAM: background, a blitted
    // sprite from guest RAM, one pixel.
    let mut ctx = gpu.context(0);
    ctx.pt
        .map_range(&mut gpu, VRAM_VA, Target::Vram(fb_vram), fb_pages, true);
    let sprite_gpa = ctx.pt.map_new(&mut gpu, A_VA, 1, false);
    let (sw, sh) = (16u32, 8u32);
    let sprite: Vec<u8> = (0..sw * sh)
        .flat_map(|i| [(i * 3) as u8, (i * 5) as u8, (i * 7) as u8, 0xff])
        .collect();
    gpu.ram.write(sprite_gpa, &sprite);
    let (sx, sy) = (10u32, 5u32);
    ctx.run_ok(
        &mut gpu,
        &[
            cmd::fill(VRAM_VA, stride * h, 0x0033_6699),
            cmd::blit(
                A_VA,
                sw * 4,
                VRAM_VA + (sy * stride + sx * 4) as u64,
                stride,
                sw * 4,
                sh,
            ),
            cmd::store_dword(VRAM_VA + (47 * stride + 63 * 4) as u64, 0x00ff_0000),
        ],
    );
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let px = if x == 63 && y == 47 {
                [0xff, 0, 0]
            } else if (sx..sx + sw).contains(&x) && (sy..sy + sh).contains(&y) {
                let i = ((y - sy) * sw + (x - sx)) as usize * 4;
                [sprite[i + 2], sprite[i + 1], sprite[i]]
            } else {
                [0x33, 0x66, 0x99]
            };
            rgb.extend_from_slice(&px);
        }
    }
    wait_for_png(&png_path, &(w, h, rgb.clone()));

    // The guest draws directly into VRAM; the next FENCE writes a new picture.
    let mut px = 0x0000_ff00u32.to_le_bytes().to_vec();
    px.extend_from_slice(&0x0000_00ffu32.to_le_bytes());
    gpu.vram_write(fb_vram, &px);
    rgb[..6].copy_from_slice(&[0, 0xff, 0, 0, 0, 0xff]);
    ctx.run_ok(&mut gpu, &[]);
    wait_for_png(&png_path, &(w, h, rgb.clone()));

    // SIGUSR1 writes it too.
    std::fs::remove_file(&png_path).unwrap();
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(gpu.backend.child.id() as i32, libc::SIGUSR1) };
    wait_for_png(&png_path, &(w, h, rgb));
    assert!(gpu.backend.alive());
}

#[test]
fn scanout_from_guest_ram_and_bad_configuration() {
    scanout_from_guest_ram(&[
        (SCANOUT_FB_FORMAT, 2),
        (SCANOUT_FB_WIDTH, 0),
        (SCANOUT_FB_WIDTH, 4097),
        (SCANOUT_FB_HEIGHT, 0),
        (SCANOUT_FB_STRIDE, 32 * 4 - 4),
    ]);
}

#[test]
fn scanout_stride_not_a_multiple_of_four() {
    scanout_from_guest_ram(&[(SCANOUT_FB_STRIDE, 32 * 4 * 2 + 2)]);
}

/// A 32x32 picture in two guest RAM pages through the GGTT; then each
/// `(register, value)` of `bad` must raise global error 2.
fn scanout_from_guest_ram(bad: &[(u64, u32)]) {
    let (mut gpu, png_path) = Vgpu::start_scanout_png();
    let (w, h) = (32u32, 32u32);
    let stride = w * 4 * 2;
    // Two guest RAM pages, not contiguous, mapped at GGTT pages 0 and 1.
    let p0 = gpu.alloc.page();
    gpu.alloc.page();
    let p1 = gpu.alloc.page();
    gpu.ggtt_write(0, ggtt_entry(Target::Ram(p0), false));
    gpu.ggtt_write(1, ggtt_entry(Target::Ram(p1), false));
    let mut rgb = Vec::new();
    for y in 0..h {
        for x in 0..w {
            let (r, g, b) = ((x * 8) as u8, (y * 8) as u8, 0x80u8);
            let page = if y < 16 { p0 } else { p1 };
            let gpa = page + ((y % 16) * stride + x * 4) as u64;
            gpu.ram.write(gpa, &[b, g, r, 0]);
            rgb.extend_from_slice(&[r, g, b]);
        }
    }
    gpu.show_xrgb8888(0, true, w, h, stride);
    let mut ctx = gpu.context(1);
    ctx.run_ok(&mut gpu, &[]);
    wait_for_png(&png_path, &(w, h, rgb));
    assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);

    // Invalid configurations: global error 2 (on vector 0), never a crash.
    for &(reg, value) in bad {
        gpu.drain_irqs();
        gpu.scanout_write(SCANOUT_FB_ENABLE, 0);
        gpu.scanout_write(reg, value);
        gpu.scanout_write(SCANOUT_FB_ENABLE, 1);
        ctx.run_ok(&mut gpu, &[]);
        let deadline = std::time::Instant::now() + TIMEOUT;
        while gpu.read_reg(REG_GLOBAL_ERROR) != GLOBAL_ERROR_BAD_SCANOUT {
            assert!(
                std::time::Instant::now() < deadline,
                "no global error 2 for scanout register {reg:#x} = {value}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(gpu.wait_irq(Some(0), TIMEOUT), "global error interrupt");
        gpu.write_reg(REG_IRQ_STATUS, IRQ_GLOBAL_ERROR);
        assert_eq!(gpu.read_reg(REG_GLOBAL_ERROR), 0);
        // Restore the good value.
        let good = match reg {
            SCANOUT_FB_FORMAT => FB_FORMAT_XRGB8888,
            SCANOUT_FB_WIDTH => w,
            SCANOUT_FB_HEIGHT => h,
            _ => stride,
        };
        gpu.scanout_write(reg, good);
    }
    // A framebuffer larger than its GGTT mapping: no picture, no crash.
    gpu.scanout_write(SCANOUT_FB_HEIGHT, 4096);
    ctx.run_ok(&mut gpu, &[]);
    std::thread::sleep(Duration::from_millis(50));
    assert!(gpu.backend.alive());
    ctx.run_ok(&mut gpu, &[]);
}

// ---- reset ----------------------------------------------------------------------------

/// Registers other than the identification: all zero.
fn assert_registers_zero(gpu: &mut Vgpu, when: &str) {
    assert_eq!(gpu.read_reg(REG_ID), ID_VALUE, "{when}");
    assert_eq!(gpu.read_reg(REG_GGTT_SIZE), GGTT_ENTRIES as u32, "{when}");
    assert_eq!(gpu.read_reg(REG_CAPS) & 0xff, 4, "{when}");
    for reg in [REG_STATUS, REG_IRQ_STATUS, REG_IRQ_ENABLE, REG_GLOBAL_ERROR] {
        assert_eq!(gpu.read_reg(reg), 0, "{when}: global register {reg:#x}");
    }
    for n in 0..CONTEXTS {
        for reg in [
            CTX_PT_ROOT,
            CTX_PT_ROOT + 4,
            CTX_RING_BASE,
            CTX_RING_BASE + 4,
            CTX_RING_SIZE,
            CTX_RING_HEAD,
            CTX_RING_TAIL,
            CTX_STATUS,
            CTX_FAULT_ADDR,
            CTX_FAULT_ADDR + 4,
            CTX_FENCE_SEQNO,
            CTX_INV_START,
            CTX_INV_START + 4,
            CTX_INV_PAGES,
            CTX_CONTROL,
            CTX_MSIX_VECTOR,
        ] {
            assert_eq!(
                gpu.ctx_read(n, reg),
                0,
                "{when}: context {n} register {reg:#x}"
            );
        }
    }
    for reg in (0..0x1c).step_by(4) {
        assert_eq!(
            gpu.read_reg(SCANOUT_BASE + reg),
            0,
            "{when}: scanout register {reg:#x}"
        );
    }
    for i in [0, 1, 16, 200, GGTT_ENTRIES - 1] {
        assert_eq!(gpu.ggtt_read(i), 0, "{when}: GGTT entry {i}");
    }
}

/// Puts state everywhere: contexts (one faulted), GGTT, scanout, VRAM, IRQs.
fn dirty_everything(gpu: &mut Vgpu) -> (Ctx, u64) {
    let mut c0 = gpu.context(0);
    let mut c1 = gpu.context(1);
    let x = c0.pt.map_new(gpu, A_VA, 1, true);
    c0.pt.map(gpu, VRAM_VA, Target::Vram(0), true);
    c0.run_irq(
        gpu,
        &[
            cmd::fill(VRAM_VA, 4096, 0xabab_abab),
            cmd::store_dword(A_VA, 1),
        ],
        true,
    )
    .unwrap();
    let f = c1.run_fault(gpu, &[cmd::store_dword(B_VA, 1)]);
    expect_fault(f, FAULT_NOT_PRESENT, B_VA);
    gpu.ctx_write64(2, CTX_INV_START, 0x1234_5000);
    gpu.ctx_write(2, CTX_INV_PAGES, 3);
    gpu.ctx_write(3, CTX_MSIX_VECTOR, 2);
    for i in [0, 1, 16, 200, GGTT_ENTRIES - 1] {
        gpu.ggtt_write(i, ggtt_entry(Target::Vram(i * PAGE % gpu.vram_size), true));
    }
    gpu.write_reg64(SCANOUT_BASE + SCANOUT_FB_ADDR, 0x1000, false);
    gpu.scanout_write(SCANOUT_FB_WIDTH, 8);
    gpu.scanout_write(SCANOUT_FB_HEIGHT, 8);
    gpu.scanout_write(SCANOUT_FB_STRIDE, 32);
    gpu.scanout_write(SCANOUT_FB_FORMAT, 1);
    gpu.scanout_write(SCANOUT_FB_ENABLE, 1);
    assert_ne!(gpu.read_reg(REG_IRQ_STATUS), 0);
    assert_eq!(gpu.vram_read(0, 4), [0xab; 4]);
    (c0, x)
}

#[test]
fn device_reset_drops_everything() {
    let mut gpu = Vgpu::start();
    let (_, x) = dirty_everything(&mut gpu);
    gpu.device_reset();
    assert_registers_zero(&mut gpu, "after DEVICE_RESET");
    assert!(
        gpu.vram_read(0, 4096).iter().all(|&b| b == 0),
        "VRAM cleared"
    );
    assert_eq!(gpu.ram.read_u32(x), 1, "guest RAM is the guest's");
    // The device works again once the driver sets it up anew, with the same
    // guest memory (DMA mappings survive a device reset).
    gpu.init();
    let mut c = gpu.context(0);
    let y = c.pt.map_new(&mut gpu, A_VA, 1, true);
    c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
    assert_eq!(gpu.ram.read_u32(y), 2);
    assert_eq!(gpu.ctx_read(0, CTX_FENCE_SEQNO), 1);

    // The RESET register does the same.
    let (_, _) = dirty_everything(&mut gpu);
    gpu.write_reg(REG_RESET, 1);
    gpu.drain_irqs();
    assert_registers_zero(&mut gpu, "after RESET register");
    assert!(
        gpu.vram_read(0, 4096).iter().all(|&b| b == 0),
        "VRAM cleared"
    );
    gpu.init();
    let mut c = gpu.context(2);
    let z = c.pt.map_new(&mut gpu, A_VA, 1, true);
    c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 3)]);
    assert_eq!(gpu.ram.read_u32(z), 3);
}

#[test]
fn device_reset_with_each_source_then_work_again() {
    for source in [PageTrack::DirtyBitmap, PageTrack::Uffd] {
        let mut gpu = Vgpu::start_source(source);
        let mut c = gpu.context(0);
        c.pt.map_new(&mut gpu, A_VA, 1, true);
        c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 1)]);
        gpu.device_reset();
        gpu.init();
        // Fresh tables after the reset, then remapped: tracking still works.
        let mut c = gpu.context(0);
        let x = gpu.alloc.page();
        let y = gpu.alloc.page();
        c.pt.map(&mut gpu, A_VA, Target::Ram(x), true);
        c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 2)]);
        c.pt.map(&mut gpu, A_VA, Target::Ram(y), true);
        c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 3)]);
        assert_eq!(
            (gpu.ram.read_u32(x), gpu.ram.read_u32(y)),
            (2, 3),
            "{source:?}"
        );
    }
}

#[test]
fn the_vmm_leaving_resets_the_device() {
    let mut gpu = Vgpu::start();
    dirty_everything(&mut gpu);
    gpu.reconnect();
    // init() set IRQ_ENABLE again; everything else is zero.
    gpu.write_reg(REG_IRQ_ENABLE, 0);
    assert_registers_zero(&mut gpu, "after the VMM left");
    gpu.write_reg(REG_IRQ_ENABLE, 0x10f);
    let mut c = gpu.context(0);
    let x = c.pt.map_new(&mut gpu, A_VA, 1, true);
    c.run_ok(&mut gpu, &[cmd::store_dword(A_VA, 7)]);
    assert_eq!(gpu.ram.read_u32(x), 7);
}
