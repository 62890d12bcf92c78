//! The shadow page tables against a mock context (`crate::test_fixture`):
//! translation, validation of every entry kind, guest writes seen at sync
//! points, sharing and refcounts, memory going away, reset and the table budget.

use umdev::pagetrack::Gfn;

use super::{Target, Translation};
use crate::encode::pte;
use crate::regs::*;
use crate::test_fixture::*;

/// A GPU address with a different index at every level (3, 5, 7, 9), plus an
/// offset into its page.
const VA: u64 = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0x128;

/// A root whose tables map the page of [`VA`] with `leaf`, attached.
fn mapped(fx: &Fixture, leaf: u64) -> (u64, Gfn) {
    let root_gpa = fx.alloc_page();
    fx.map(root_gpa, VA, leaf);
    (root_gpa, fx.attach(root_gpa))
}

fn ram(gpa: u64, writable: bool) -> Result<Translation, u8> {
    Ok(Translation {
        target: Target::Ram(gpa),
        writable,
    })
}

#[test]
fn present_leaf_translates_to_its_page_plus_the_offset() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    let (root_gpa, root) = mapped(&fx, pte(page, false, true));
    assert_eq!(fx.translate(root, VA, true), ram(page + 0x128, true));
    assert_eq!(fx.translate(root, VA, false), ram(page + 0x128, true));
    // One shadow table per level, each page tracked.
    assert_eq!(fx.shadow().len(), 4);
    for level in 1..=PT_LEVELS {
        assert!(fx.tracker.is_tracked(fx.table_gfn(root_gpa, VA, level)));
    }
}

#[test]
fn absent_entries_and_addresses_past_48_bits_are_not_present() {
    let fx = Fixture::new();
    let (_, root) = mapped(&fx, pte(fx.alloc_page(), false, true));
    // Absent leaf next to the mapped one, absent root entry, beyond the VA space.
    assert_eq!(
        fx.translate(root, VA + PAGE_SIZE, false),
        Err(FAULT_NOT_PRESENT)
    );
    assert_eq!(
        fx.translate(root, VA + (1 << 39), false),
        Err(FAULT_NOT_PRESENT)
    );
    assert_eq!(fx.translate(root, VA_LIMIT, false), Err(FAULT_NOT_PRESENT));
    assert_eq!(
        fx.translate(root, VA | VA_LIMIT, false),
        Err(FAULT_NOT_PRESENT)
    );
}

#[test]
fn read_only_leaf_allows_reads_and_refuses_writes() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    let (_, root) = mapped(&fx, pte(page, false, false));
    assert_eq!(fx.translate(root, VA, false), ram(page + 0x128, false));
    assert_eq!(fx.translate(root, VA, true), Err(FAULT_READ_ONLY));
}

#[test]
fn vram_leaf_translates_to_a_vram_offset() {
    let fx = Fixture::new();
    let (_, root) = mapped(&fx, pte(VRAM_SIZE - PAGE_SIZE, true, true));
    assert_eq!(
        fx.translate(root, VA, true),
        Ok(Translation {
            target: Target::Vram(VRAM_SIZE - PAGE_SIZE + 0x128),
            writable: true,
        })
    );
}

#[test]
fn upper_entry_outside_ram_or_with_the_vram_bit_is_bad_table() {
    let fx = Fixture::new();
    let root_gpa = fx.alloc_page();
    // VA's level-2 entry carries the VRAM bit; VA2's root entry points past RAM.
    fx.map(root_gpa, VA, pte(fx.alloc_page(), false, true));
    let l2_entry = fx.entry_gpa(root_gpa, VA, 2);
    fx.write_u64(l2_entry, fx.read_u64(l2_entry) | PTE_VRAM);
    let va2 = VA + (1 << 39);
    fx.write_u64(fx.entry_gpa(root_gpa, va2, 4), pte(RAM_END, false, true));
    let root = fx.attach(root_gpa);
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_BAD_TABLE));
    assert_eq!(fx.translate(root, va2, false), Err(FAULT_BAD_TABLE));
    // Neither bad entry made a table: root, level 3 and level 2 of VA.
    assert_eq!(fx.shadow().len(), 3);
}

#[test]
fn leaf_outside_ram_or_past_vram_is_bad_target() {
    let fx = Fixture::new();
    let root_gpa = fx.alloc_page();
    let leaves = [
        pte(RAM_END, false, true),
        pte(RAM_GPA - PAGE_SIZE, false, true),
        pte(VRAM_SIZE, true, true),
        pte(PTE_ADDR_MASK, true, false),
    ];
    for (i, leaf) in leaves.iter().enumerate() {
        fx.map(root_gpa, VA + i as u64 * PAGE_SIZE, *leaf);
    }
    let root = fx.attach(root_gpa);
    for i in 0..leaves.len() as u64 {
        let va = VA + i * PAGE_SIZE;
        assert_eq!(fx.translate(root, va, false), Err(FAULT_BAD_TARGET), "{i}");
    }
}

#[test]
fn root_must_be_a_nonzero_aligned_page_of_shared_ram() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    for bad in [0, page + 8, RAM_END, RAM_GPA - PAGE_SIZE] {
        assert_eq!(fx.shadow().attach_root(bad), Err(FAULT_NO_ROOT), "{bad:#x}");
    }
    assert!(fx.shadow().is_empty());
    assert_eq!(fx.shadow().attach_root(page), Ok(page / PAGE_SIZE));
}

#[test]
fn guest_write_changes_the_translation_at_the_next_sync_point() {
    let fx = Fixture::new();
    let (a, b) = (fx.alloc_page(), fx.alloc_page());
    let (root_gpa, root) = mapped(&fx, pte(a, false, true));
    let leaf = fx.entry_gpa(root_gpa, VA, 1);
    fx.write_u64(leaf, pte(b, false, false));
    // Between sync points the device uses its validated copy.
    assert_eq!(fx.translate(root, VA, true), ram(a + 0x128, true));
    assert_eq!(fx.sync(), 1);
    assert_eq!(fx.translate(root, VA, false), ram(b + 0x128, false));
    fx.write_u64(leaf, 0);
    fx.sync();
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_NOT_PRESENT));
}

#[test]
fn unlinking_an_upper_entry_frees_the_subtree_and_untracks_it() {
    let fx = Fixture::new();
    let (root_gpa, root) = mapped(&fx, pte(fx.alloc_page(), false, true));
    let below: Vec<Gfn> = (1..=3).map(|l| fx.table_gfn(root_gpa, VA, l)).collect();
    fx.write_u64(fx.entry_gpa(root_gpa, VA, 4), 0);
    fx.sync();
    assert_eq!(fx.shadow().len(), 1);
    for (level, gfn) in (1..=3).zip(&below) {
        assert_eq!(fx.shadow().refs(*gfn, level), 0);
        assert!(!fx.tracker.is_tracked(*gfn));
    }
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_NOT_PRESENT));
}

#[test]
fn table_shared_by_two_roots_lives_until_the_last_detach() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    let (root1_gpa, root1) = mapped(&fx, pte(page, false, true));
    let root2_gpa = fx.alloc_page();
    let entry = fx.read_u64(fx.entry_gpa(root1_gpa, VA, 4));
    fx.write_u64(fx.entry_gpa(root2_gpa, VA, 4), entry);
    let root2 = fx.attach(root2_gpa);
    let l3 = fx.table_gfn(root1_gpa, VA, 3);
    assert_eq!(fx.shadow().refs(l3, 3), 2);
    assert_eq!(fx.shadow().len(), 5);

    fx.shadow().detach_root(root1);
    assert_eq!(fx.shadow().refs(l3, 3), 1);
    assert!(!fx.tracker.is_tracked(root1));
    assert_eq!(fx.translate(root2, VA, false), ram(page + 0x128, true));

    fx.shadow().detach_root(root2);
    assert!(fx.shadow().is_empty());
    assert_eq!(fx.tracker.counters().pages_tracked, 0);
}

#[test]
fn table_shared_by_two_entries_of_one_parent_is_refcounted() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    let root_gpa = fx.alloc_page();
    fx.map(root_gpa, VA, pte(page, false, true));
    // The next 2 MiB of VA uses the same level-1 table.
    let va2 = VA + (1 << 21);
    let entry = fx.read_u64(fx.entry_gpa(root_gpa, VA, 2));
    fx.write_u64(fx.entry_gpa(root_gpa, va2, 2), entry);
    let root = fx.attach(root_gpa);
    let l1 = fx.table_gfn(root_gpa, VA, 1);
    assert_eq!(fx.shadow().refs(l1, 1), 2);
    assert_eq!(fx.shadow().len(), 4);
    assert_eq!(fx.translate(root, va2, false), ram(page + 0x128, true));

    fx.write_u64(fx.entry_gpa(root_gpa, VA, 2), 0);
    fx.sync();
    assert_eq!(fx.shadow().refs(l1, 1), 1);
    assert!(fx.tracker.is_tracked(l1));
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_NOT_PRESENT));
    assert_eq!(fx.translate(root, va2, false), ram(page + 0x128, true));
}

#[test]
fn removing_the_memory_under_the_tables_drops_every_shadow_table() {
    let fx = Fixture::new();
    let (_, root) = mapped(&fx, pte(fx.alloc_page(), false, true));
    let epoch = fx.shadow().epoch();
    // Memory without tables going away changes nothing.
    fx.shadow().on_remove_region(RAM_END / PAGE_SIZE, 16);
    assert_eq!(fx.shadow().len(), 4);
    assert_eq!(fx.shadow().epoch(), epoch);
    // DMA_UNMAP of RAM reaches the shadow through the tracker's notifier.
    fx.unmap_ram();
    assert!(fx.shadow().is_empty());
    assert_eq!(fx.shadow().epoch(), epoch + 1);
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_BAD_TABLE));
}

#[test]
fn regions_changed_revalidates_entries_against_the_new_regions() {
    let fx = Fixture::new();
    let extra_gpa = RAM_END + 0x10_0000;
    let (root_gpa, root) = mapped(&fx, pte(extra_gpa, false, true));
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_BAD_TARGET));
    let epoch = fx.shadow().epoch();
    // No change of regions: nothing is dropped.
    fx.sync();
    assert_eq!(fx.shadow().epoch(), epoch);

    let _extra = fx.map_extra(extra_gpa, 1);
    // Until the next sync point the shadow still holds what it validated.
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_BAD_TARGET));
    fx.sync();
    assert_eq!(fx.shadow().epoch(), epoch + 1);
    assert!(fx.shadow().is_empty());
    let root = fx.attach(root_gpa);
    assert_eq!(fx.translate(root, VA, false), ram(extra_gpa + 0x128, true));
}

#[test]
fn reset_drops_every_table_and_its_tracking() {
    let fx = Fixture::new();
    let page = fx.alloc_page();
    let (root_gpa, _) = mapped(&fx, pte(page, false, true));
    let epoch = fx.shadow().epoch();
    fx.shadow().reset();
    assert!(fx.shadow().is_empty());
    assert_eq!(fx.shadow().epoch(), epoch + 1);
    assert_eq!(fx.tracker.counters().pages_tracked, 0);
    // The guest's tables are shadowed afresh.
    let root = fx.attach(root_gpa);
    assert_eq!(fx.translate(root, VA, false), ram(page + 0x128, true));
}

#[test]
fn max_tables_bounds_the_shadow() {
    let fx = Fixture::new();
    let root_gpa = fx.alloc_page();
    fx.map(root_gpa, VA, pte(fx.alloc_page(), false, true));
    fx.shadow().set_max_tables(0);
    assert_eq!(fx.shadow().attach_root(root_gpa), Err(FAULT_NO_ROOT));
    fx.shadow().set_max_tables(2);
    let root = fx.attach(root_gpa);
    // Root and level 3 fit; level 2 did not.
    assert_eq!(fx.shadow().len(), 2);
    assert_eq!(fx.translate(root, VA, false), Err(FAULT_BUDGET));
    assert!(!fx.tracker.is_tracked(fx.table_gfn(root_gpa, VA, 2)));
    assert_eq!(fx.tracker.counters().pages_tracked, 2);
}
