//! The vGPU's state through the device contract, in process: saved
//! mid-workload, restored into a fresh vGPU over the same guest memory,
//! continued (with a page-table edit that only a rebuilt, re-tracked shadow
//! sees), with the same results as a vGPU that never stopped; hostile blobs
//! refused without a change.

use std::time::{Duration, Instant};

use umdev::memory::{DmaRegion, GuestMemory, MappedMemfd};
use umdev::pci::{PciFunction, Region};
use umdev_vgpu::encode::{self as cmd, pte};
use umdev_vgpu::regs::*;
use umdev_vgpu::VgpuConfig;

const RAM_GPA: u64 = 0x4000_0000;
const RAM_SIZE: usize = 4 << 20;
const BAR0: Region = Region::Bar(0);
const A_VA: u64 = 0x1000_0000;
const FENCE_VA: u64 = 0x7fff_f000;
const VRAM_VA: u64 = 0x2000_0000;
const RING: u64 = RAM_GPA + 0x1000;
const RING_SIZE: u32 = 4096;

/// Guest RAM shared by the source and the destination (the VMM migrates it;
/// the device does not).
struct Ram(MappedMemfd);

impl Ram {
    fn write(&self, gpa: u64, data: &[u8]) {
        let at = (gpa - RAM_GPA) as usize;
        assert!(at + data.len() <= RAM_SIZE);
        // SAFETY: in bounds of the live mapping; the device reads it only at
        // submissions, which the test orders after its writes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.0.as_ptr().add(at), data.len()) }
    }
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let at = (gpa - RAM_GPA) as usize;
        let mut v = vec![0; len];
        // SAFETY: in bounds of the live mapping; read after the device is idle.
        unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr().add(at), v.as_mut_ptr(), len) }
        v
    }
    fn u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }
}

struct Gpu {
    f: PciFunction,
    tail: u32,
    seq: u32,
}

impl Gpu {
    fn new(ram: &Ram) -> Gpu {
        let memory = GuestMemory::new(8);
        let fd = ram.0.file().try_clone().unwrap();
        let region = DmaRegion::mapped(RAM_GPA, RAM_SIZE as u64, fd.into(), 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        let config = VgpuConfig {
            vram_mib: 1,
            ..VgpuConfig::default()
        };
        let (mut f, _) = umdev_vgpu::new_function(memory, config).unwrap();
        f.region_write(Region::Config, 0x04, &6u16.to_le_bytes())
            .unwrap();
        Gpu { f, tail: 0, seq: 0 }
    }

    fn w32(&mut self, offset: u64, v: u32) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
    }
    fn w64(&mut self, offset: u64, v: u64) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
    }
    fn r32(&mut self, offset: u64) -> u32 {
        let mut b = [0; 4];
        self.f.region_read(BAR0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
    fn r64(&mut self, offset: u64) -> u64 {
        let mut b = [0; 8];
        self.f.region_read(BAR0, offset, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    /// Context 0 with its ring; page tables rooted at `root`.
    fn program(&mut self, root: u64) {
        self.w64(ctx_reg(0, CTX_PT_ROOT), root);
        self.w64(ctx_reg(0, CTX_RING_BASE), RING);
        self.w32(ctx_reg(0, CTX_RING_SIZE), RING_SIZE);
        self.w32(ctx_reg(0, CTX_CONTROL), CTX_CONTROL_ENABLE);
    }

    /// Writes `cmds` and a fence into the ring, rings, waits for the fence.
    fn run(&mut self, ram: &Ram, cmds: &[Vec<u32>]) {
        self.seq += 1;
        let mut words: Vec<u32> = cmds.iter().flatten().copied().collect();
        words.extend(cmd::fence(FENCE_VA, self.seq, false));
        for w in words {
            ram.write(RING + u64::from(self.tail), &w.to_le_bytes());
            self.tail = (self.tail + 4) % RING_SIZE;
        }
        self.w32(ctx_reg(0, CTX_RING_TAIL), self.tail);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.r32(ctx_reg(0, CTX_FENCE_SEQNO)) != self.seq {
            let status = self.r32(ctx_reg(0, CTX_STATUS));
            assert_eq!(status & CTX_STATUS_FAULTED, 0, "fault {status:#x}");
            assert!(Instant::now() < deadline, "fence {} did not come", self.seq);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// What a guest can read: every context register, the global ones, the
    /// GGTT entries the test uses.
    fn observe(&mut self) -> Vec<u64> {
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
struct Tables {
    next: u64,
}

impl Tables {
    const ROOT: u64 = RAM_GPA + 0x10000;

    fn new(ram: &Ram) -> Tables {
        ram.write(Self::ROOT, &[0; 4096]);
        Tables {
            next: Self::ROOT + 0x1000,
        }
    }

    /// The slot of `va`'s leaf entry, making the tables on the way.
    fn leaf_slot(&mut self, ram: &Ram, va: u64) -> u64 {
        let mut table = Self::ROOT;
        for level in (2..=4).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 511;
            let slot = table + 8 * index;
            let entry = u64::from_le_bytes(ram.read(slot, 8).try_into().unwrap());
            table = if entry & PTE_PRESENT != 0 {
                entry & PTE_ADDR_MASK
            } else {
                let t = self.next;
                self.next += 0x1000;
                ram.write(t, &[0; 4096]);
                ram.u64(slot, pte(t, false, true));
                t
            };
        }
        table + 8 * ((va >> 12) & 511)
    }

    fn map(&mut self, ram: &Ram, va: u64, addr: u64, vram: bool) {
        let slot = self.leaf_slot(ram, va);
        ram.u64(slot, pte(addr, vram, true));
    }
}

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
