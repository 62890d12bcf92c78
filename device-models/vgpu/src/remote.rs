//! A guest driver for a vGPU reached over vfio-user, as the benchmarks play
//! VMM and guest at once: memfd guest RAM given to the device by DMA_MAP,
//! page tables and a ring written straight into that memory, doorbells as
//! REGION_WRITEs, fences read where the device writes them in guest memory.
//! ([`crate::inprocess`] is the same driver for a vGPU in this process.)

use std::path::Path;
use std::time::{Duration, Instant};

use umdev::memory::MappedMemfd;
use umdev::vfio_user::wire::{DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, PCI_CONFIG_REGION_INDEX};
use umdev::vfio_user::Client;

use crate::encode as cmd;
use crate::pagetable::{entry_slot, TableMemory};
use crate::regs::*;

/// Where guest RAM starts in the guest-physical address space.
pub const RAM_GPA: u64 = 0x4000_0000;
/// The ring of context 0.
pub const RING_SIZE: u32 = 64 << 10;
/// Where the fence page is mapped in the GPU address space.
pub const FENCE_VA: u64 = 0x7f00_0000_0000;

const BAR0: u32 = MMIO_BAR as u32;
const CTX: usize = 0;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("vfio-user: {0}")]
    Client(#[from] umdev::vfio_user::client::ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the device cannot migrate")]
    NotMigratable,
    #[error("context fault: status {status:#x} address {addr:#x}")]
    Fault { status: u32, addr: u64 },
    #[error("fence {0} not retired within 30 s")]
    Timeout(u32),
    #[error("a submission of {0} bytes does not fit in the {RING_SIZE}-byte ring")]
    TooBig(usize),
}

pub type Result<T> = std::result::Result<T, DriverError>;

/// Guest RAM: a memfd mapped here and given to the device by DMA_MAP.
pub struct Ram(pub MappedMemfd);

impl Ram {
    pub fn new(size: usize) -> Result<Ram> {
        Ok(Ram(MappedMemfd::populated("umdev-vgpu-guest", size)?))
    }

    /// Pointer to `len` bytes at guest-physical `gpa`, aligned to `align`.
    /// Panics outside RAM: the driver only names memory it laid out.
    pub fn at(&self, gpa: u64, len: usize, align: usize) -> *mut u8 {
        let off = gpa
            .checked_sub(RAM_GPA)
            .map(|o| o as usize)
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= self.0.len()))
            .filter(|o| o % align == 0);
        let Some(off) = off else {
            panic!("guest access {gpa:#x}+{len} outside RAM or misaligned")
        };
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.0.as_ptr().add(off) }
    }

    pub fn write_u32(&self, gpa: u64, v: u32) {
        // SAFETY: in bounds and aligned (`at` checks the offset; the mapping
        // starts on a page); the device may read concurrently, hence volatile.
        unsafe { std::ptr::write_volatile(self.at(gpa, 4, 4).cast::<u32>(), v) }
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: as above; the device writes it behind our back.
        unsafe { std::ptr::read_volatile(self.at(gpa, 4, 4).cast::<u32>()) }
    }

    /// One 8-byte store, as a guest writes a page-table entry.
    pub fn write_u64(&self, gpa: u64, v: u64) {
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(self.at(gpa, 8, 8).cast::<u64>(), v) }
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.at(gpa, 8, 8).cast::<u64>()) }
    }

    /// memcpy between two guest ranges (the baseline for BLIT/COPY).
    pub fn memcpy(&self, src: u64, dst: u64, len: usize) {
        let (s, d) = (self.at(src, len, 1), self.at(dst, len, 1));
        assert!(src + len as u64 <= dst || dst + len as u64 <= src);
        // SAFETY: both ranges are in the mapping and do not overlap (checked).
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) }
    }

    /// The VMM's guest RAM copy for a migration from `from` to `to`.
    pub fn copier<'a>(from: &'a Ram, to: &'a Ram) -> impl FnMut(u64, u64) + 'a {
        |gpa, len| to.copy_from(from, gpa, len as usize)
    }

    /// What the VMM does to migrate guest RAM: copies `[gpa, gpa+len)` from
    /// `from`.
    pub fn copy_from(&self, from: &Ram, gpa: u64, len: usize) {
        assert!(!std::ptr::eq(self, from), "a RAM copied onto itself");
        let (s, d) = (from.at(gpa, len, 1), self.at(gpa, len, 1));
        // SAFETY: both ranges are in bounds of their own mappings (checked
        // by `at`), which are distinct (two `Ram`s, each its own memfd
        // mapping: checked above), so they do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) }
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        // SAFETY: in bounds (checked by `at`).
        unsafe { std::ptr::write_bytes(self.at(gpa, len, 1), byte, len) }
    }
}

/// The driver's page tables live in its guest RAM, new ones from its pages.
impl TableMemory for Gpu {
    fn read_u64(&mut self, gpa: u64) -> u64 {
        self.ram.read_u64(gpa)
    }
    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.ram.write_u64(gpa, value)
    }
    fn new_table(&mut self) -> u64 {
        self.pages(1)
    }
}

/// How the driver waits for a fence in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Spins on the fence (the lowest latency; a CPU taken meanwhile).
    Spin,
    /// Sleeps this long between looks (a CPU left to the device).
    Sleep(Duration),
}

/// Driver state: the client, guest RAM, page tables, context 0's ring.
pub struct Gpu {
    pub client: Client,
    pub ram: Ram,
    next_page: u64,
    root: u64,
    ring: u64,
    tail: u32,
    fence_gpa: u64,
    seq: u32,
    /// Submissions the device may not have read yet: fence and ring bytes,
    /// oldest first (what keeps the ring from being overwritten).
    in_flight: std::collections::VecDeque<(u32, u32)>,
}

impl Gpu {
    /// Connects to the vGPU at `socket`, gives it `ram_mib` MiB of guest RAM,
    /// turns on memory decoding and bus mastering and programs context 0
    /// (page-table root, ring, the fence page mapped at [`FENCE_VA`]).
    pub fn new(socket: &Path, ram_mib: usize) -> Result<Gpu> {
        Gpu::open(socket, ram_mib, false)
    }

    /// As [`new`](Self::new), for a VMM that will migrate the device: it
    /// asks first whether the device can.
    pub fn migratable(socket: &Path, ram_mib: usize) -> Result<Gpu> {
        Gpu::open(socket, ram_mib, true)
    }

    fn open(socket: &Path, ram_mib: usize, migrate: bool) -> Result<Gpu> {
        let mut client = Client::connect(socket)?;
        if migrate && client.migration_flags()? & umdev::migration::fsm::MIGRATION_STOP_COPY == 0 {
            return Err(DriverError::NotMigratable);
        }
        let ram = Ram::new(ram_mib << 20)?;
        client.dma_map(
            RAM_GPA,
            ram.0.len() as u64,
            Some(ram.0.fd()),
            0,
            DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        )?;
        // Memory decoding and bus mastering on (one 2-byte access, as QEMU).
        client.region_write(PCI_CONFIG_REGION_INDEX, 4, &6u16.to_le_bytes())?;
        let mut gpu = Gpu {
            client,
            ram,
            next_page: RAM_GPA + PAGE_SIZE,
            root: 0,
            ring: 0,
            tail: 0,
            fence_gpa: 0,
            seq: 0,
            in_flight: Default::default(),
        };
        gpu.root = gpu.pages(1);
        gpu.ring = gpu.pages(u64::from(RING_SIZE) / PAGE_SIZE);
        gpu.fence_gpa = gpu.pages(1);
        gpu.map(FENCE_VA, gpu.fence_gpa, true);
        let c = |r| ctx_reg(CTX, r);
        gpu.client.write_u64(BAR0, c(CTX_PT_ROOT), gpu.root)?;
        gpu.client.write_u64(BAR0, c(CTX_RING_BASE), gpu.ring)?;
        gpu.client.write_u32(BAR0, c(CTX_RING_SIZE), RING_SIZE)?;
        gpu.client
            .write_u32(BAR0, c(CTX_CONTROL), CTX_CONTROL_ENABLE)?;
        Ok(gpu)
    }

    /// `n` zeroed pages of guest RAM.
    pub fn pages(&mut self, n: u64) -> u64 {
        let gpa = self.next_page;
        self.next_page += n * PAGE_SIZE;
        self.ram.fill(gpa, (n * PAGE_SIZE) as usize, 0);
        gpa
    }

    /// Guest-physical address of the leaf entry for `va`, tables made as needed.
    pub fn leaf_slot(&mut self, va: u64) -> u64 {
        let root = self.root;
        entry_slot(self, root, va, 1)
    }

    pub fn map(&mut self, va: u64, gpa: u64, writable: bool) {
        let slot = self.leaf_slot(va);
        let w = if writable { PTE_WRITABLE } else { 0 };
        self.ram.write_u64(slot, gpa | PTE_PRESENT | w);
    }

    /// Maps `n` fresh pages at `va`; their first gpa (contiguous).
    pub fn map_new(&mut self, va: u64, n: u64, writable: bool) -> u64 {
        let gpa = self.pages(n);
        for i in 0..n {
            self.map(va + i * PAGE_SIZE, gpa + i * PAGE_SIZE, writable);
        }
        gpa
    }

    /// Maps `va` to VRAM offset `offset`, writable.
    pub fn map_vram(&mut self, va: u64, offset: u64) {
        let slot = self.leaf_slot(va);
        self.ram
            .write_u64(slot, offset | PTE_PRESENT | PTE_WRITABLE | PTE_VRAM);
    }

    /// Takes over the driver's view of a device migrated here from `from`
    /// (nothing in flight there).
    pub fn adopt(&mut self, from: &Gpu) {
        self.next_page = from.next_page;
        self.root = from.root;
        self.ring = from.ring;
        self.tail = from.tail;
        self.fence_gpa = from.fence_gpa;
        self.seq = from.seq;
        self.in_flight.clear();
    }

    /// Context 0's ring in guest RAM: its address and size.
    pub fn ring(&self) -> (u64, u32) {
        (self.ring, RING_SIZE)
    }

    /// Writes `cmds` + FENCE into the ring, waiting for older submissions to
    /// retire while there is no room (one dword stays free: a full ring
    /// would read as empty); the fence's sequence number and the bytes
    /// written. [`ring_doorbell`](Self::ring_doorbell) hands them to the
    /// device.
    fn write(&mut self, cmds: &[u32]) -> Result<(u32, u32)> {
        let seq = self.seq.wrapping_add(1);
        let mut dwords = cmds.to_vec();
        dwords.extend(cmd::fence(FENCE_VA, seq, false));
        let bytes = 4 * dwords.len();
        if bytes >= RING_SIZE as usize {
            return Err(DriverError::TooBig(bytes));
        }
        loop {
            while self
                .in_flight
                .front()
                .is_some_and(|&(s, _)| self.retired(s))
            {
                self.in_flight.pop_front();
            }
            let used: u32 = self.in_flight.iter().map(|&(_, b)| b).sum();
            if used as usize + bytes < RING_SIZE as usize {
                break;
            }
            let (oldest, _) = self.in_flight[0];
            self.wait(oldest, Wait::Spin)?;
        }
        for d in dwords {
            self.ram.write_u32(self.ring + u64::from(self.tail), d);
            self.tail = (self.tail + 4) % RING_SIZE;
        }
        self.seq = seq;
        Ok((seq, bytes as u32))
    }

    /// Tells the device the ring's new tail (a REGION_WRITE); the submission
    /// `write` wrote is then in flight.
    fn ring_doorbell(&mut self, (seq, bytes): (u32, u32)) -> Result<()> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.client
            .write_u32(BAR0, ctx_reg(CTX, CTX_RING_TAIL), self.tail)?;
        self.in_flight.push_back((seq, bytes));
        Ok(())
    }

    /// Writes `cmds` + FENCE into the ring and rings the doorbell: the
    /// fence's sequence number.
    pub fn submit(&mut self, cmds: &[u32]) -> Result<u32> {
        let written = self.write(cmds)?;
        self.ring_doorbell(written)?;
        Ok(written.0)
    }

    /// Whether the fence has reached `seq` (wrapping).
    pub fn retired(&self, seq: u32) -> bool {
        self.ram.read_u32(self.fence_gpa).wrapping_sub(seq) as i32 >= 0
    }

    /// Waits until the fence has reached `seq`; a context fault or 30 s
    /// without it is an error.
    pub fn wait(&mut self, seq: u32, how: Wait) -> Result<()> {
        let start = Instant::now();
        // A fault is looked for every 5 ms only: a register read is a socket
        // round trip that takes the server's CPU from the engine being timed
        // (on 2 cores, reading every few microseconds cost COPY ~10%).
        let mut next_check = start + Duration::from_millis(5);
        let mut spins = 0u64;
        while !self.retired(seq) {
            spins += 1;
            let look = match how {
                Wait::Spin => spins.is_multiple_of(256),
                Wait::Sleep(d) => {
                    std::thread::sleep(d);
                    true
                }
            };
            if look && Instant::now() >= next_check {
                next_check = Instant::now() + Duration::from_millis(5);
                let status = self.client.read_u32(BAR0, ctx_reg(CTX, CTX_STATUS))?;
                if status & CTX_STATUS_FAULTED != 0 {
                    let addr = self.client.read_u64(BAR0, ctx_reg(CTX, CTX_FAULT_ADDR))?;
                    return Err(DriverError::Fault { status, addr });
                }
                if start.elapsed() > Duration::from_secs(30) {
                    return Err(DriverError::Timeout(seq));
                }
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
        Ok(())
    }

    /// `cmds` + FENCE, doorbell, spin until the fence is in memory. The time
    /// from the doorbell to the fence.
    pub fn run(&mut self, cmds: &[u32]) -> Result<Duration> {
        let written = self.write(cmds)?;
        let start = Instant::now();
        self.ring_doorbell(written)?;
        self.wait(written.0, Wait::Spin)?;
        Ok(start.elapsed())
    }
}
