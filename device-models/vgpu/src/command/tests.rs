//! The audit against a mock context (`crate::test_fixture::Gpu`): the plan each
//! command yields, batches, TLB_INVALIDATE segments, and the faults of SPEC.md
//! with the address it gives for each.

use super::{Extent, Fault, Step};
use crate::encode::*;
use crate::regs::*;
use crate::shadow::Target;
use crate::test_fixture::*;

fn fault(reason: u8, addr: u64) -> Fault {
    Fault { reason, addr }
}

fn extent(target: Target, len: u64) -> Extent {
    Extent { target, len }
}

/// The (dst, value, va) of a Store step.
fn store_of(step: &Step) -> (Target, u32, u64) {
    match step {
        Step::Store { dst, value, va } => (*dst, *value, *va),
        other => panic!("not a store: {other:?}"),
    }
}

/// The (src, dst, va) of a Copy step.
fn copy_of(step: &Step) -> (&[Extent], &[Extent], u64) {
    match step {
        Step::Copy { src, dst, va } => (src, dst, *va),
        other => panic!("not a copy: {other:?}"),
    }
}

/// Ring offset of the command after `before` dwords of this submission.
fn offset(gpu: &Gpu, before: u32) -> u64 {
    u64::from((gpu.ring.tail + 4 * before) % gpu.ring.size)
}

/// Runs a NOP then `bad`: the submission faults `reason` at `bad`'s ring
/// offset.
#[track_caller]
fn faults_after_a_nop(gpu: &mut Gpu, bad: &[u32], reason: u8) {
    let at = offset(gpu, 1);
    assert_eq!(
        gpu.run(&[nop(), bad.to_vec()]).unwrap_err(),
        fault(reason, at),
        "{bad:x?}"
    );
}

#[test]
fn nops_and_an_empty_ring_give_an_empty_plan() {
    let mut gpu = Gpu::new();
    assert!(gpu.run(&[]).unwrap().is_empty());
    let mut cursor = gpu.submit(&[nop(), nop(), nop()]);
    let (plan, more) = gpu.audit(&mut cursor).unwrap();
    assert!(plan.is_empty() && !more);
    assert_eq!((cursor.ring_pos, cursor.commands), (12, 3));
}

#[test]
fn store_dword_plans_one_store_to_the_translated_address() {
    let mut gpu = Gpu::new();
    let plan = gpu
        .run(&[
            store_dword(DATA_VA + 8, 0xdead),
            store_dword(VRAM_VA + 0x1004, 7),
        ])
        .unwrap();
    assert_eq!(plan.len(), 2);
    assert_eq!(
        store_of(&plan[0]),
        (Target::Ram(gpu.data + 8), 0xdead, DATA_VA + 8)
    );
    assert_eq!(
        store_of(&plan[1]),
        (Target::Vram(0x1004), 7, VRAM_VA + 0x1004)
    );
}

#[test]
fn fill_plans_one_extent_per_contiguous_run_of_targets() {
    let mut gpu = Gpu::new();
    let plan = gpu.run(&[fill(DATA_VA + 0xff0, 0x20, 0x5a5a)]).unwrap();
    let [Step::Fill { dst, pattern, va }] = &plan[..] else {
        panic!("{plan:?}");
    };
    // Two pages of contiguous RAM: one extent.
    assert_eq!(dst, &[extent(Target::Ram(gpu.data + 0xff0), 0x20)]);
    assert_eq!((*pattern, *va), (0x5a5a, DATA_VA + 0xff0));
    // The second page remapped to VRAM: one extent each.
    let leaf = gpu.fx.entry_gpa(gpu.root_gpa, DATA_VA + PAGE_SIZE, 1);
    gpu.fx.write_u64(leaf, pte(0x1000, true, true));
    gpu.fx.sync();
    let plan = gpu.run(&[fill(DATA_VA + 0xff0, 0x20, 0)]).unwrap();
    let [Step::Fill { dst, .. }] = &plan[..] else {
        panic!("{plan:?}");
    };
    assert_eq!(
        dst,
        &[
            extent(Target::Ram(gpu.data + 0xff0), 0x10),
            extent(Target::Vram(0x1000), 0x10)
        ]
    );
}

#[test]
fn copy_reads_its_source_and_writes_its_destination() {
    let mut gpu = Gpu::new();
    let plan = gpu.run(&[copy(RO_VA + 4, VRAM_VA + 0xffc, 8)]).unwrap();
    let (src, dst, va) = copy_of(&plan[0]);
    assert_eq!(src, [extent(Target::Ram(gpu.ro + 4), 8)]);
    assert_eq!(dst, [extent(Target::Vram(0xffc), 8)]);
    assert_eq!(va, VRAM_VA + 0xffc);
    // The read-only page may be read, not written.
    assert_eq!(
        gpu.run(&[copy(DATA_VA, RO_VA + 0x10, 4)]).unwrap_err(),
        fault(FAULT_READ_ONLY, RO_VA + 0x10)
    );
}

#[test]
fn blit_plans_one_copy_per_line_and_counts_each_line() {
    let mut gpu = Gpu::new();
    let mut cursor = gpu.submit(&[blit(DATA_VA, 0x100, VRAM_VA, 0x200, 0x40, 3)]);
    let (plan, _) = gpu.audit(&mut cursor).unwrap();
    assert_eq!(plan.len(), 3);
    for (row, step) in plan.iter().enumerate() {
        let row = row as u64;
        let (src, dst, va) = copy_of(step);
        assert_eq!(src, [extent(Target::Ram(gpu.data + row * 0x100), 0x40)]);
        assert_eq!(dst, [extent(Target::Vram(row * 0x200), 0x40)]);
        assert_eq!(va, VRAM_VA + row * 0x200);
    }
    assert_eq!((cursor.commands, cursor.bytes), (3, 0xc0));
}

#[test]
fn fence_plans_its_sequence_number_and_interrupt_flag() {
    let mut gpu = Gpu::new();
    let plan = gpu
        .run(&[fence(DATA_VA + 0x10, 7, true), fence(VRAM_VA, 8, false)])
        .unwrap();
    let data = gpu.data;
    assert!(
        matches!(
            plan[..],
            [
                Step::Fence { dst: Target::Ram(a), seqno: 7, irq: true, va: va0 },
                Step::Fence { dst: Target::Vram(0), seqno: 8, irq: false, va: va1 },
            ] if a == data + 0x10 && va0 == DATA_VA + 0x10 && va1 == VRAM_VA
        ),
        "{plan:?}"
    );
}

#[test]
fn zero_sized_moves_translate_nothing() {
    let mut gpu = Gpu::new();
    let plan = gpu.run(&[
        fill(UNMAPPED_VA, 0, 1),
        copy(UNMAPPED_VA, RO_VA, 0),
        blit(UNMAPPED_VA, 4, RO_VA, 4, 0, 8),
        blit(UNMAPPED_VA, 4, RO_VA, 4, 8, 0),
    ]);
    assert!(plan.unwrap().is_empty());
    // A FILL's address must still be a multiple of 4.
    let at = offset(&gpu, 0);
    assert_eq!(
        gpu.run(&[fill(UNMAPPED_VA + 2, 0, 1)]).unwrap_err(),
        fault(FAULT_MALFORMED, at)
    );
}

/// Batch buffer `i` of a chain sits at `BATCH_VA + 0x100 * i`.
fn batch_va(i: u64) -> u64 {
    BATCH_VA + 0x100 * i
}

#[test]
fn batches_nest_four_deep_and_return_to_their_callers() {
    let mut gpu = Gpu::new();
    for i in 0..3 {
        gpu.write_batch(0x100 * i, &[batch_start(batch_va(i + 1)), batch_end()]);
    }
    gpu.write_batch(0x300, &[store_dword(DATA_VA, 1), batch_end()]);
    let mut cursor = gpu.submit(&[batch_start(batch_va(0)), store_dword(DATA_VA + 4, 2)]);
    let (plan, more) = gpu.audit(&mut cursor).unwrap();
    assert!(!more && cursor.batches.is_empty());
    let stores: Vec<(u32, u64)> = plan
        .iter()
        .map(store_of)
        .map(|(_, v, va)| (v, va))
        .collect();
    assert_eq!(stores, [(1, DATA_VA), (2, DATA_VA + 4)]);
    // 4 BATCH_STARTs, 2 stores, 4 BATCH_ENDs.
    assert_eq!(cursor.commands, 10);
}

#[test]
fn a_fifth_nested_batch_faults_nesting_at_its_batch_start() {
    let mut gpu = Gpu::new();
    for i in 0..4 {
        gpu.write_batch(0x100 * i, &[batch_start(batch_va(i + 1)), batch_end()]);
    }
    gpu.write_batch(0x400, &[batch_end()]);
    assert_eq!(
        gpu.run(&[batch_start(batch_va(0))]).unwrap_err(),
        fault(FAULT_NESTING, batch_va(3))
    );
}

#[test]
fn tlb_invalidate_splits_the_audit_and_the_next_part_sees_new_tables() {
    let mut gpu = Gpu::new();
    let mut cursor = gpu.submit(&[
        store_dword(DATA_VA, 1),
        tlb_invalidate(),
        store_dword(DATA_VA, 2),
    ]);
    let (first, more) = gpu.audit(&mut cursor).unwrap();
    assert!(more);
    assert_eq!(cursor.ring_pos, 20);
    assert_eq!(first.len(), 1);
    assert_eq!(store_of(&first[0]), (Target::Ram(gpu.data), 1, DATA_VA));
    // The driver remaps DATA_VA between the parts; the sync point shows it.
    let leaf = gpu.fx.entry_gpa(gpu.root_gpa, DATA_VA, 1);
    gpu.fx.write_u64(leaf, pte(0x2000, true, true));
    gpu.fx.sync();
    let (second, more) = gpu.audit(&mut cursor).unwrap();
    assert!(!more);
    assert_eq!(second.len(), 1);
    assert_eq!(store_of(&second[0]), (Target::Vram(0x2000), 2, DATA_VA));
}

#[test]
fn tlb_invalidate_in_a_batch_keeps_the_batch_stack() {
    let mut gpu = Gpu::new();
    let b = gpu.write_batch(0, &[tlb_invalidate(), store_dword(DATA_VA, 3), batch_end()]);
    let mut cursor = gpu.submit(&[batch_start(b)]);
    let (first, more) = gpu.audit(&mut cursor).unwrap();
    assert!(first.is_empty() && more);
    assert_eq!(cursor.batches, [b + 4]);
    let (second, more) = gpu.audit(&mut cursor).unwrap();
    assert!(!more && cursor.batches.is_empty());
    assert_eq!(store_of(&second[0]).1, 3);
}

#[test]
fn malformed_headers_fault_at_their_ring_offset() {
    let mut gpu = Gpu::new();
    let unknown = vec![0x09 << 24 | 1];
    let mut short_store = store_dword(DATA_VA, 1);
    short_store[0] -= 1;
    for bad in [unknown, short_store, batch_end()] {
        faults_after_a_nop(&mut gpu, &bad, FAULT_MALFORMED);
    }
}

#[test]
fn a_command_cut_off_by_tail_is_malformed_at_its_offset() {
    let mut gpu = Gpu::new();
    let mut cursor = gpu.submit(&[nop(), store_dword(DATA_VA, 1)]);
    // TAIL two dwords into the STORE_DWORD.
    cursor.ring_end = 12;
    assert_eq!(
        gpu.audit(&mut cursor).unwrap_err(),
        fault(FAULT_MALFORMED, 4)
    );
}

#[test]
fn a_command_across_the_end_of_the_ring_is_read_across_it() {
    let mut gpu = Gpu::new();
    gpu.ring.tail = gpu.ring.size - 8;
    let mut cursor = gpu.submit(&[store_dword(DATA_VA + 12, 0xabc)]);
    assert_eq!(cursor.ring_end, 8);
    let (plan, _) = gpu.audit(&mut cursor).unwrap();
    assert_eq!(store_of(&plan[0]).1, 0xabc);
    assert_eq!(cursor.ring_pos, 8);
}

#[test]
fn faults_in_a_batch_report_the_gpu_address() {
    let mut gpu = Gpu::new();
    let b = gpu.write_batch(0, &[nop(), vec![0xff << 24 | 1]]);
    assert_eq!(
        gpu.run(&[batch_start(b)]).unwrap_err(),
        fault(FAULT_MALFORMED, b + 4)
    );
    // A batch nothing maps, and one at a misaligned address.
    assert_eq!(
        gpu.run(&[batch_start(UNMAPPED_VA)]).unwrap_err(),
        fault(FAULT_NOT_PRESENT, UNMAPPED_VA)
    );
    assert_eq!(
        gpu.run(&[batch_start(BATCH_VA + 2)]).unwrap_err(),
        fault(FAULT_MALFORMED, BATCH_VA + 2)
    );
}

#[test]
fn unmapped_addresses_fault_not_present_where_the_mapping_ends() {
    let mut gpu = Gpu::new();
    assert_eq!(
        gpu.run(&[copy(UNMAPPED_VA + 0x10, DATA_VA, 4)])
            .unwrap_err(),
        fault(FAULT_NOT_PRESENT, UNMAPPED_VA + 0x10)
    );
    // A FILL running off the end of the data pages faults at the first page
    // that is not mapped.
    let end = DATA_VA + DATA_PAGES * PAGE_SIZE;
    assert_eq!(
        gpu.run(&[fill(end - PAGE_SIZE, 2 * PAGE_SIZE as u32, 0)])
            .unwrap_err(),
        fault(FAULT_NOT_PRESENT, end)
    );
}

#[test]
fn a_write_to_a_read_only_page_faults_at_the_gpu_address() {
    let mut gpu = Gpu::new();
    assert_eq!(
        gpu.run(&[store_dword(RO_VA + 8, 1)]).unwrap_err(),
        fault(FAULT_READ_ONLY, RO_VA + 8)
    );
    assert_eq!(
        gpu.run(&[fence(RO_VA, 1, false)]).unwrap_err(),
        fault(FAULT_READ_ONLY, RO_VA)
    );
}

#[test]
fn a_write_into_any_ring_faults_ring_write() {
    let mut gpu = Gpu::new();
    assert_eq!(
        gpu.run(&[store_dword(RING_VA + 0x40, 1)]).unwrap_err(),
        fault(FAULT_RING_WRITE, RING_VA + 0x40)
    );
    // Reading the ring is allowed.
    assert!(gpu.run(&[copy(RING_VA, DATA_VA, 16)]).is_ok());
    // Another context's ring on the second data page: a FILL over both pages
    // faults where it reaches that ring.
    gpu.rings.push((gpu.data + PAGE_SIZE, PAGE_SIZE));
    assert_eq!(
        gpu.run(&[fill(DATA_VA, 2 * PAGE_SIZE as u32, 0)])
            .unwrap_err(),
        fault(FAULT_RING_WRITE, DATA_VA + PAGE_SIZE)
    );
}

#[test]
fn misaligned_store_fill_and_fence_are_malformed_at_the_command() {
    let mut gpu = Gpu::new();
    for bad in [
        store_dword(DATA_VA + 2, 1),
        fill(DATA_VA + 1, 4, 0),
        fill(DATA_VA, 6, 0),
        fence(DATA_VA + 3, 1, true),
    ] {
        faults_after_a_nop(&mut gpu, &bad, FAULT_MALFORMED);
    }
}

#[test]
fn commands_over_the_budget_fault_at_the_command_that_went_over() {
    let mut gpu = Gpu::new();
    let lines = MAX_COMMANDS_PER_SUBMISSION as u32;
    // Exactly the budget: one BLIT of 65 536 lines.
    let plan = gpu.run(&[blit(DATA_VA, 0, DATA_VA + 0x100, 0, 4, lines)]);
    assert_eq!(plan.unwrap().len(), MAX_COMMANDS_PER_SUBMISSION);
    // One command more.
    let over = blit(DATA_VA, 0, DATA_VA + 0x100, 0, 4, lines);
    faults_after_a_nop(&mut gpu, &over, FAULT_BUDGET);
}

#[test]
fn bytes_over_the_budget_fault_before_any_translation() {
    let mut gpu = Gpu::new();
    // One FILL of 256 MiB + 4 where nothing is mapped: BUDGET, not NOT_PRESENT.
    let too_much = (MAX_BYTES_PER_SUBMISSION + 4) as u32;
    let at = offset(&gpu, 0);
    assert_eq!(
        gpu.run(&[fill(UNMAPPED_VA, too_much, 0)]).unwrap_err(),
        fault(FAULT_BUDGET, at)
    );
    // Two BLITs moving 128 MiB each (two pages per line, pitch 0) use the
    // budget up exactly; 4 more bytes go over.
    let lines = (MAX_BYTES_PER_SUBMISSION / (2 * PAGE_SIZE) / 2) as u32;
    let half = blit(
        DATA_VA,
        0,
        DATA_VA + 2 * PAGE_SIZE,
        0,
        2 * PAGE_SIZE as u32,
        lines,
    );
    let at = offset(&gpu, 2 * 9);
    let mut cursor = gpu.submit(&[half.clone(), half, fill(UNMAPPED_VA, 4, 0)]);
    assert_eq!(gpu.audit(&mut cursor).unwrap_err(), fault(FAULT_BUDGET, at));
    assert_eq!(cursor.bytes, MAX_BYTES_PER_SUBMISSION + 4);
}

#[test]
fn a_faulting_segment_yields_no_plan() {
    let mut gpu = Gpu::new();
    // Good commands before the bad one are not planned either.
    assert_eq!(
        gpu.run(&[
            store_dword(DATA_VA, 1),
            fence(DATA_VA + 4, 1, true),
            store_dword(UNMAPPED_VA, 2),
        ])
        .unwrap_err(),
        fault(FAULT_NOT_PRESENT, UNMAPPED_VA)
    );
    // Split by a TLB_INVALIDATE: the part before stands, the failing part
    // yields nothing.
    let mut cursor = gpu.submit(&[
        store_dword(DATA_VA, 1),
        tlb_invalidate(),
        store_dword(DATA_VA, 2),
        store_dword(RO_VA, 3),
    ]);
    let (first, more) = gpu.audit(&mut cursor).unwrap();
    assert_eq!((first.len(), more), (1, true));
    assert_eq!(
        gpu.audit(&mut cursor).unwrap_err(),
        fault(FAULT_READ_ONLY, RO_VA)
    );
}

#[test]
fn a_range_past_48_bits_faults_at_the_first_address_beyond_them() {
    let mut gpu = Gpu::new();
    let last = VA_LIMIT - PAGE_SIZE;
    gpu.fx.map(gpu.root_gpa, last, pte(gpu.data, false, true));
    gpu.fx.sync();
    assert!(gpu.run(&[fill(last, PAGE_SIZE as u32, 0)]).is_ok());
    // The last page is mapped: what has no mapping is VA_LIMIT, as for a
    // range running into any unmapped page.
    assert_eq!(
        gpu.run(&[fill(last, 2 * PAGE_SIZE as u32, 0)]).unwrap_err(),
        fault(FAULT_NOT_PRESENT, VA_LIMIT)
    );
    assert_eq!(
        gpu.run(&[copy(last + 0x800, DATA_VA, PAGE_SIZE as u32)])
            .unwrap_err(),
        fault(FAULT_NOT_PRESENT, VA_LIMIT)
    );
}

/// Another enabled context's ring registers are not checked until it submits:
/// whatever they hold, the ring check of a write must not overflow.
#[test]
fn another_context_s_ring_at_the_top_of_the_address_space_is_harmless() {
    let mut gpu = Gpu::new();
    gpu.rings.push((u64::MAX - PAGE_SIZE + 1, PAGE_SIZE));
    gpu.rings.push((u64::MAX - 0xfff, u64::from(u32::MAX)));
    let plan = gpu.run(&[store_dword(DATA_VA, 1)]).unwrap();
    assert_eq!(store_of(&plan[0]), (Target::Ram(gpu.data), 1, DATA_VA));
}
