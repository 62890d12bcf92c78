//! An in-process vGPU over a memfd of guest RAM, driven through its PCI
//! function (no socket, no VMM): guest RAM, 4-level page tables and context
//! 0's ring written straight into memory. The harness of the state and
//! engine tests and of the scheduler benchmark. It panics on what a test
//! would fail on (a fault, a fence that does not come).

use std::time::{Duration, Instant};

use crate::encode::{self as cmd, pte};
use crate::pagetable::{entry_slot, TableMemory};
use crate::regs::*;
use crate::VgpuConfig;
use umdev::memory::{DmaRegion, GuestMemory, MappedMemfd};
use umdev::pci::{PciFunction, Region};

/// Guest RAM: 4 MiB at 1 GiB.
pub const RAM_GPA: u64 = 0x4000_0000;
pub const RAM_SIZE: usize = 4 << 20;
pub const BAR0: Region = Region::Bar(0);
/// GPU addresses the tests map: a data page, the fence page, VRAM.
pub const A_VA: u64 = 0x1000_0000;
pub const FENCE_VA: u64 = 0x7fff_f000;
pub const VRAM_VA: u64 = 0x2000_0000;
/// Context 0's ring.
pub const RING: u64 = RAM_GPA + 0x1000;
pub const RING_SIZE: u32 = 4096;
/// [`standard_mappings`]: `[BIG_VA, + BIG_PAGES pages)` maps [`DATA_PAGE`]
/// again and again, so a FILL can move many bytes with little guest RAM.
pub const BIG_VA: u64 = 0x4000_0000;
pub const BIG_PAGES: u64 = 4096;
pub const DATA_PAGE: u64 = RAM_GPA + 0x20_0000;
pub const FENCE_PAGE: u64 = RAM_GPA + 0x20_2000;

/// Guest RAM shared by the source and the destination (the VMM migrates it;
/// the device does not).
pub struct Ram(pub MappedMemfd);

impl Ram {
    /// Fresh zeroed guest RAM (a memfd named `name`).
    pub fn new(name: &str) -> Ram {
        Ram(MappedMemfd::new(name, RAM_SIZE).expect("memfd for guest RAM"))
    }

    /// The 32-bit value at `gpa` (e.g. a fence the device wrote).
    pub fn u32_at(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().expect("4 bytes"))
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let at = (gpa - RAM_GPA) as usize;
        assert!(at + data.len() <= RAM_SIZE);
        // SAFETY: in bounds of the live mapping; the device reads it only at
        // submissions, which the test orders after its writes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.0.as_ptr().add(at), data.len()) }
    }
    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let at = (gpa - RAM_GPA) as usize;
        let mut v = vec![0; len];
        // SAFETY: in bounds of the live mapping; read after the device is idle.
        unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr().add(at), v.as_mut_ptr(), len) }
        v
    }
    pub fn u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
}

pub struct Gpu {
    pub f: PciFunction,
    pub tail: u32,
    pub seq: u32,
}

impl Gpu {
    pub fn new(ram: &Ram) -> Gpu {
        Gpu::with_config(
            ram,
            VgpuConfig {
                vram_mib: 1,
                ..VgpuConfig::default()
            },
        )
    }

    /// A vGPU built with `config` over `ram` (all of it DMA-mapped), with
    /// memory and bus mastering enabled.
    pub fn with_config(ram: &Ram, config: VgpuConfig) -> Gpu {
        let memory = GuestMemory::new(8);
        let fd = ram.0.file().try_clone().unwrap();
        let region = DmaRegion::mapped(RAM_GPA, RAM_SIZE as u64, fd.into(), 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        let (mut f, _) = crate::new_function(memory, config).unwrap();
        f.region_write(Region::Config, 0x04, &6u16.to_le_bytes())
            .unwrap();
        Gpu { f, tail: 0, seq: 0 }
    }

    pub fn w32(&mut self, offset: u64, v: u32) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
    }
    pub fn w64(&mut self, offset: u64, v: u64) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
    }
    pub fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0; 4];
        self.f.region_read(BAR0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    pub fn r64(&mut self, offset: u64) -> u64 {
        let mut b = [0; 8];
        self.f.region_read(BAR0, offset, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    /// Context 0 with its ring; page tables rooted at `root`.
    pub fn program(&mut self, root: u64) {
        self.w64(ctx_reg(0, CTX_PT_ROOT), root);
        self.w64(ctx_reg(0, CTX_RING_BASE), RING);
        self.w32(ctx_reg(0, CTX_RING_SIZE), RING_SIZE);
        self.w32(ctx_reg(0, CTX_CONTROL), CTX_CONTROL_ENABLE);
    }

    /// Writes `cmds` and a fence into the ring, rings, waits for the fence.
    pub fn run(&mut self, ram: &Ram, cmds: &[Vec<u32>]) {
        let seq = self.submit(ram, cmds);
        self.wait_fence(seq, Duration::from_secs(10));
    }

    /// Writes `cmds` and a fence into context 0's ring and rings: the fence's
    /// sequence number.
    pub fn submit(&mut self, ram: &Ram, cmds: &[Vec<u32>]) -> u32 {
        self.seq += 1;
        let mut words: Vec<u32> = cmds.iter().flatten().copied().collect();
        words.extend(cmd::fence(FENCE_VA, self.seq, false));
        for w in words {
            ram.write(RING + u64::from(self.tail), &w.to_le_bytes());
            self.tail = (self.tail + 4) % RING_SIZE;
        }
        self.w32(ctx_reg(0, CTX_RING_TAIL), self.tail);
        self.seq
    }

    /// Waits until context 0's FENCE_SEQNO has reached `seq` (no fault
    /// meanwhile).
    pub fn wait_fence(&mut self, seq: u32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while (self.r32(ctx_reg(0, CTX_FENCE_SEQNO)).wrapping_sub(seq) as i32) < 0 {
            let status = self.r32(ctx_reg(0, CTX_STATUS));
            assert_eq!(status & CTX_STATUS_FAULTED, 0, "fault {status:#x}");
            assert!(Instant::now() < deadline, "fence {seq} did not come");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What a guest can read: every context register, the global ones, the
    /// GGTT entries the test uses.
    pub fn observe(&mut self) -> Vec<u64> {
        let mut v = vec![
            u64::from(self.r32(REG_IRQ_STATUS)),
            u64::from(self.r32(REG_GLOBAL_ERROR)),
        ];
        for n in 0..CONTEXTS {
            for r in [CTX_PT_ROOT, CTX_RING_BASE, CTX_FAULT_ADDR] {
                v.push(self.r64(ctx_reg(n, r)));
            }
            for r in [
                CTX_RING_SIZE,
                CTX_RING_HEAD,
                CTX_RING_TAIL,
                CTX_STATUS,
                CTX_FENCE_SEQNO,
            ] {
                v.push(u64::from(self.r32(ctx_reg(n, r))));
            }
        }
        for i in 0..4 {
            v.push(self.r64(GGTT_OFFSET + 8 * i));
        }
        v
    }
}

/// Page tables for VA -> target in RAM pages from 0x10000 on: level-4 root
/// at RAM_GPA + 0x10000.
pub struct Tables {
    next: u64,
}

impl Tables {
    pub const ROOT: u64 = RAM_GPA + 0x10000;

    pub fn new(ram: &Ram) -> Tables {
        ram.write(Self::ROOT, &[0; 4096]);
        Tables {
            next: Self::ROOT + 0x1000,
        }
    }

    /// The slot of `va`'s leaf entry, making the tables on the way.
    pub fn leaf_slot(&mut self, ram: &Ram, va: u64) -> u64 {
        /// `ram`, with new tables from `next` on.
        struct Memory<'a> {
            ram: &'a Ram,
            next: &'a mut u64,
        }
        impl TableMemory for Memory<'_> {
            fn read_u64(&mut self, gpa: u64) -> u64 {
                u64::from_le_bytes(self.ram.read(gpa, 8).try_into().unwrap())
            }
            fn write_u64(&mut self, gpa: u64, value: u64) {
                self.ram.u64(gpa, value)
            }
            fn new_table(&mut self) -> u64 {
                let t = *self.next;
                *self.next += 0x1000;
                self.ram.write(t, &[0; 4096]);
                t
            }
        }
        let mut memory = Memory {
            ram,
            next: &mut self.next,
        };
        entry_slot(&mut memory, Self::ROOT, va, 1)
    }

    pub fn map(&mut self, ram: &Ram, va: u64, addr: u64, vram: bool) {
        let slot = self.leaf_slot(ram, va);
        ram.u64(slot, pte(addr, vram, true));
    }
}

/// Page tables with the fence page, the data page at [`A_VA`] and, with
/// `big`, the [`BIG_VA`] range; context 0 programmed with them.
pub fn standard_mappings(gpu: &mut Gpu, ram: &Ram, big: bool) {
    let mut t = Tables::new(ram);
    t.map(ram, FENCE_VA, FENCE_PAGE, false);
    t.map(ram, A_VA, DATA_PAGE, false);
    if big {
        for p in 0..BIG_PAGES {
            t.map(ram, BIG_VA + p * 4096, DATA_PAGE, false);
        }
    }
    gpu.program(Tables::ROOT);
}
