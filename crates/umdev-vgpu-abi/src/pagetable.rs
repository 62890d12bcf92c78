//! A driver's side of the GPU page tables (SPEC.md "Page tables"): finding
//! the entry that maps a GPU address, making the tables above it on the way.
//! Every driver of the vGPU (the e2e guest driver, the benchmarks' drivers,
//! the tests' drivers) walks the tree this one way.

use crate::regs::{pt_index, PTE_ADDR_MASK, PTE_PRESENT, PT_LEVELS};

/// Guest RAM as a driver that builds page tables sees it.
pub trait TableMemory {
    fn read_u64(&mut self, gpa: u64) -> u64;
    /// One 8-byte entry store, as the guest makes it.
    fn write_u64(&mut self, gpa: u64, value: u64);
    /// A zeroed page for a new table: its guest-physical address.
    fn new_table(&mut self) -> u64;
}

/// The guest-physical address of the entry for `va` at `level` (1: the leaf)
/// in the tree rooted at `root`; a missing table above it is made with
/// [`TableMemory::new_table`] and linked as `table | PTE_PRESENT`.
pub fn entry_slot(mem: &mut impl TableMemory, root: u64, va: u64, level: u8) -> u64 {
    let mut table = root;
    for l in (level + 1..=PT_LEVELS).rev() {
        let slot = table + 8 * pt_index(va, l) as u64;
        let e = mem.read_u64(slot);
        table = if e & PTE_PRESENT != 0 {
            e & PTE_ADDR_MASK
        } else {
            let t = mem.new_table();
            mem.write_u64(slot, t | PTE_PRESENT);
            t
        };
    }
    table + 8 * pt_index(va, level) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Mem {
        words: BTreeMap<u64, u64>,
        next: u64,
    }

    impl TableMemory for Mem {
        fn read_u64(&mut self, gpa: u64) -> u64 {
            self.words.get(&gpa).copied().unwrap_or(0)
        }
        fn write_u64(&mut self, gpa: u64, value: u64) {
            self.words.insert(gpa, value);
        }
        fn new_table(&mut self) -> u64 {
            self.next += 0x1000;
            self.next
        }
    }

    #[test]
    fn tables_are_made_once_and_linked_present() {
        let mut m = Mem::default();
        let va = 0x7f12_3456_7000;
        let leaf = entry_slot(&mut m, 0x10_0000, va, 1);
        // Three tables made (levels 3, 2, 1), linked from the one above.
        assert_eq!(m.next, 0x3000);
        assert_eq!(
            m.words[&(0x10_0000 + 8 * pt_index(va, 4) as u64)],
            0x1000 | PTE_PRESENT
        );
        assert_eq!(leaf, 0x3000 + 8 * pt_index(va, 1) as u64);
        // The same walk again makes nothing new; a neighbour shares the leaf.
        assert_eq!(entry_slot(&mut m, 0x10_0000, va, 1), leaf);
        assert_eq!(entry_slot(&mut m, 0x10_0000, va + 0x1000, 1), leaf + 8);
        assert_eq!(m.next, 0x3000);
        // The level-2 entry is the leaf table's link.
        let l2 = entry_slot(&mut m, 0x10_0000, va, 2);
        assert_eq!(m.words[&l2], 0x3000 | PTE_PRESENT);
    }
}
