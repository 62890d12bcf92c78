//! The vGPU's slice of the hardware and its place on a shared engine, in
//! process: a vGPU has the contexts and GGTT its config gives it (a parent's
//! instance type) and nothing past them; two vGPUs on one scheduler each get
//! the engine, and a long submission of one is preempted at a command
//! boundary so the other's short one completes first.

use std::time::Duration;

use umdev_vgpu::encode::{self as cmd, pte};
use umdev_vgpu::inprocess::*;
use umdev_vgpu::regs::*;
use umdev_vgpu::sched::Scheduler;
use umdev_vgpu::VgpuConfig;

#[test]
fn a_vgpu_has_the_contexts_and_ggtt_of_its_config_and_nothing_past_them() {
    let ram = Ram::new("vgpu-layout");
    let config = VgpuConfig {
        vram_mib: 1,
        contexts: 1,
        ggtt_entries: 1024,
        ..VgpuConfig::default()
    };
    let mut gpu = Gpu::with_config(&ram, config);
    let caps = gpu.r32(REG_CAPS);
    assert_eq!(caps & 0xff, 1, "contexts in CAPS {caps:#x}");
    assert_eq!(
        (caps >> 8) & 0xff,
        10,
        "log2 GGTT entries in CAPS {caps:#x}"
    );
    assert_eq!(caps >> 16, 1, "VRAM MiB in CAPS {caps:#x}");
    assert_eq!(gpu.r32(REG_GGTT_SIZE), 1024);

    // The last entry is there; the one after it is not.
    gpu.w64(GGTT_OFFSET + 8 * 1023, pte(0x1000, true, true));
    assert_eq!(gpu.r64(GGTT_OFFSET + 8 * 1023), pte(0x1000, true, true));
    gpu.w64(GGTT_OFFSET + 8 * 1024, pte(0x1000, true, true));
    assert_eq!(gpu.r64(GGTT_OFFSET + 8 * 1024), 0);
    assert_eq!(gpu.r32(REG_GLOBAL_ERROR), 0);

    // Context 1 does not exist: its registers read 0 and ignore writes.
    gpu.w64(ctx_reg(1, CTX_RING_BASE), RING);
    gpu.w32(ctx_reg(1, CTX_CONTROL), CTX_CONTROL_ENABLE);
    assert_eq!(gpu.r64(ctx_reg(1, CTX_RING_BASE)), 0);
    assert_eq!(gpu.r32(ctx_reg(1, CTX_STATUS)), 0);
    gpu.w32(REG_IRQ_ENABLE, 0xffff_ffff);
    assert_eq!(gpu.r32(REG_IRQ_ENABLE), IRQ_GLOBAL_ERROR | 1);

    // A scanout reaching past the 4 MiB aperture is refused.
    let sc = |r| SCANOUT_BASE + r;
    gpu.w64(sc(SCANOUT_FB_ADDR), 1023 * 4096);
    gpu.w32(sc(SCANOUT_FB_WIDTH), 1024);
    gpu.w32(sc(SCANOUT_FB_HEIGHT), 2);
    gpu.w32(sc(SCANOUT_FB_STRIDE), 4096);
    gpu.w32(sc(SCANOUT_FB_FORMAT), FB_FORMAT_XRGB8888);
    gpu.w32(sc(SCANOUT_FB_ENABLE), 1);
    assert_eq!(gpu.r32(REG_GLOBAL_ERROR), GLOBAL_ERROR_BAD_SCANOUT);
}

#[test]
fn configs_outside_the_spec_are_refused() {
    for (contexts, ggtt_entries) in [(0, 1024), (5, 1024), (1, 1000), (1, 512), (1, 1 << 18)] {
        let config = VgpuConfig {
            vram_mib: 1,
            contexts,
            ggtt_entries,
            ..VgpuConfig::default()
        };
        let memory = umdev::memory::GuestMemory::new(8);
        let err = umdev_vgpu::new_function(memory, config).err();
        assert!(
            err.is_some(),
            "{contexts} contexts, {ggtt_entries} GGTT entries"
        );
    }
}

#[test]
fn a_long_submission_on_a_shared_engine_is_preempted_for_a_neighbour() {
    let engine = Scheduler::start();
    let config = |name| VgpuConfig {
        vram_mib: 1,
        engine: Some(engine.share(name, 1)),
        ..VgpuConfig::default()
    };
    let (ram_a, ram_b) = (Ram::new("vgpu-engine-a"), Ram::new("vgpu-engine-b"));
    let mut a = Gpu::with_config(&ram_a, config("a"));
    let mut b = Gpu::with_config(&ram_b, config("b"));
    standard_mappings(&mut a, &ram_a, true);
    standard_mappings(&mut b, &ram_b, false);

    // 15 FILLs of 16 MiB each: 240 MiB for A, within one submission's budget.
    let fill = cmd::fill(BIG_VA, (BIG_PAGES * 4096) as u32, 0xa5a5_a5a5);
    let long: Vec<Vec<u32>> = (0..15).map(|_| fill.clone()).collect();
    let seq_a = a.submit(&ram_a, &long);
    std::thread::sleep(Duration::from_millis(2));
    b.run(&ram_b, &[cmd::store_dword(A_VA, 0xb0b0)]);
    let a_done_when_b_was = a.r32(ctx_reg(0, CTX_FENCE_SEQNO)) == seq_a;
    a.wait_fence(seq_a, Duration::from_secs(60));
    assert_eq!(&ram_b.read(DATA_PAGE, 4)[..], &0xb0b0u32.to_le_bytes());
    assert_eq!(ram_a.read(DATA_PAGE, 4096), vec![0xa5; 4096]);
    assert!(
        !a_done_when_b_was,
        "B's one-command submission waited for A's 240 MiB"
    );
    let shares = engine.shares();
    assert_eq!(shares.len(), 2);
    assert!(shares
        .iter()
        .all(|(_, _, s)| s.tasks > 0 && !s.busy.is_zero()));
    assert!(shares[0].2.preemptions > 0, "{shares:?}");
}

/// Runs `cmds` on context 0: `Ok` when the fence came, `Err(reason)` when the
/// context faulted (the fault is then cleared).
fn try_run(gpu: &mut Gpu, ram: &Ram, cmds: &[Vec<u32>]) -> Result<(), u32> {
    let seq = gpu.submit(ram, cmds);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = gpu.r32(ctx_reg(0, CTX_STATUS));
        if status & CTX_STATUS_FAULTED != 0 {
            gpu.w32(
                ctx_reg(0, CTX_CONTROL),
                CTX_CONTROL_ENABLE | CTX_CONTROL_CLEAR_FAULT,
            );
            return Err((status >> 8) & 0xff);
        }
        if gpu.r32(ctx_reg(0, CTX_FENCE_SEQNO)) == seq {
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "fence {seq}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Every byte of guest RAM and VRAM of `gpu`.
fn memory_of(gpu: &mut Gpu, ram: &Ram) -> (Vec<u8>, Vec<u8>) {
    let mut vram = vec![0u8; 1 << 20];
    for (i, chunk) in vram.chunks_mut(4096).enumerate() {
        gpu.f
            .region_read(umdev::pci::Region::Bar(2), i as u64 * 4096, chunk)
            .unwrap();
    }
    (ram.read(RAM_GPA, RAM_SIZE), vram)
}

/// Two instances on one engine with the same guest-physical layout: B points
/// its page tables at every guest-physical page it can name (its whole RAM
/// window, just past it, address 0, far addresses) and at VRAM offsets inside
/// and past its VRAM, and writes through each. What B reaches is B's own
/// memory; the rest faults BAD_TARGET; A's RAM and VRAM do not change by a
/// byte, and A still works.
#[test]
fn an_instance_reaches_only_its_own_memory() {
    let engine = Scheduler::start();
    let config = |name| VgpuConfig {
        vram_mib: 1,
        engine: Some(engine.share(name, 1)),
        ..VgpuConfig::default()
    };
    let (ram_a, ram_b) = (Ram::new("vgpu-iso-a"), Ram::new("vgpu-iso-b"));
    let mut a = Gpu::with_config(&ram_a, config("a"));
    let mut b = Gpu::with_config(&ram_b, config("b"));
    standard_mappings(&mut a, &ram_a, false);
    a.run(&ram_a, &[cmd::fill(A_VA, 4096, 0xaaaa_aaaa)]);
    a.w64(GGTT_OFFSET, pte(0, true, true));
    a.w64(GGTT_OFFSET + 8, pte(0x1000, true, true));
    let before = memory_of(&mut a, &ram_a);

    let mut t = Tables::new(&ram_b);
    t.map(&ram_b, FENCE_VA, FENCE_PAGE, false);
    b.program(Tables::ROOT);
    // Pages of B's RAM that hold no tables, ring or fence: written.
    const VA: u64 = 0x8000_0000;
    let own: Vec<u64> = (0x30_0000..RAM_SIZE as u64)
        .step_by(0x1_0000)
        .map(|off| RAM_GPA + off)
        .collect();
    for (i, &gpa) in own.iter().enumerate() {
        t.map(&ram_b, VA + i as u64 * 4096, gpa, false);
    }
    let n = own.len() as u64;
    assert_eq!(
        try_run(
            &mut b,
            &ram_b,
            &[cmd::fill(VA, (n * 4096) as u32, 0xbbbb_bbbb)]
        ),
        Ok(())
    );
    for gpa in &own {
        assert_eq!(ram_b.read(*gpa, 4), vec![0xbb; 4]);
    }
    // Everything else it can name: refused.
    let elsewhere = [
        (0u64, false),
        (RAM_GPA - 4096, false),
        (RAM_GPA + RAM_SIZE as u64, false),
        (1 << 40, false),
        ((1 << 52) - 4096, false),
        (1 << 20, true),
        (64 << 20, true),
    ];
    for (i, &(addr, vram)) in elsewhere.iter().enumerate() {
        let va = 0x9000_0000 + i as u64 * 4096;
        t.map(&ram_b, va, addr, vram);
        let r = try_run(&mut b, &ram_b, &[cmd::fill(va, 4096, 0xdead_beef)]);
        assert_eq!(r, Err(u32::from(FAULT_BAD_TARGET)), "{addr:#x} vram={vram}");
    }
    // B's GGTT too.
    b.w64(GGTT_OFFSET, pte(RAM_GPA + RAM_SIZE as u64, false, true));
    assert_eq!(b.r32(REG_GLOBAL_ERROR), GLOBAL_ERROR_BAD_GGTT_ENTRY);

    assert!(before == memory_of(&mut a, &ram_a), "A's memory changed");
    a.run(&ram_a, &[cmd::store_dword(A_VA, 0x600d)]);
    assert_eq!(ram_a.read(DATA_PAGE, 4), 0x600du32.to_le_bytes());
}
