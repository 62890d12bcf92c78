//! edu's state through the device contract: saved mid-workload, restored into
//! a fresh device, continued, with the same results as a device that never
//! stopped; hostile blobs refused without a change.

use umdev::memory::{DmaDirection, DmaRegion, GuestMemory, MappedMemfd};
use umdev::pci::{PciFunction, Region};
use umdev::state::StateError;
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_CMD_IRQ, DMA_CMD_RUN, DMA_CMD_TO_RAM};

const RAM: u64 = 0x10_0000;
const BAR0: Region = Region::Bar(0);

/// An edu function with 1 MiB of memfd RAM at `RAM`, bus mastering on.
struct Rig {
    f: PciFunction,
    memory: GuestMemory,
    _ram: MappedMemfd,
}

impl Rig {
    fn new() -> Rig {
        let ram = MappedMemfd::new("edu-state", 1 << 20).unwrap();
        let memory = GuestMemory::new(8);
        let fd = ram.file().try_clone().unwrap();
        let region = DmaRegion::mapped(RAM, 1 << 20, fd.into(), 0, true, true).unwrap();
        memory.with_regions(|r| r.insert(region)).unwrap();
        let mut f = umdev_edu::new_function(memory.clone(), 28).unwrap();
        f.dma_queue().attach(true);
        f.region_write(Region::Config, 0x04, &6u16.to_le_bytes())
            .unwrap();
        Rig {
            f,
            memory,
            _ram: ram,
        }
    }

    fn write(&mut self, offset: u64, v: u64) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
        self.run_queued_dma();
    }

    fn write32(&mut self, offset: u64, v: u32) {
        self.f.region_write(BAR0, offset, &v.to_le_bytes()).unwrap();
        self.run_queued_dma();
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0; 4];
        self.f.region_read(BAR0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    /// What the session does after each access: performs the queued DMA.
    fn run_queued_dma(&mut self) {
        while let Some(op) = self.f.dma_queue().pop() {
            let mut data = op.data;
            let result = match op.direction {
                DmaDirection::FromGuest => self.memory.read(op.gpa, &mut data),
                DmaDirection::ToGuest => self.memory.write(op.gpa, &data),
            };
            let bytes = match op.direction {
                DmaDirection::FromGuest => &data[..],
                DmaDirection::ToGuest => &[][..],
            };
            self.f.dma_done(op.token, result.map(|()| bytes));
        }
    }

    fn ram(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.memory.peek(gpa, &mut b).unwrap();
        b
    }

    /// Registers and the DMA buffer's first bytes, as a guest sees them.
    fn observe(&mut self) -> Vec<u32> {
        let mut v: Vec<u32> = [
            reg::ID,
            reg::LIVENESS,
            reg::FACTORIAL,
            reg::STATUS,
            reg::IRQ_STATUS,
        ]
        .iter()
        .map(|&r| self.read32(r))
        .collect();
        for r in [reg::DMA_SRC, reg::DMA_DST, reg::DMA_COUNT, reg::DMA_CMD] {
            v.push(self.read32(r));
        }
        v
    }
}

/// The first half of a workload: registers, a factorial, an interrupt, a
/// DMA from RAM into the device buffer.
fn first_half(r: &mut Rig) {
    r.memory
        .write(RAM + 0x1000, &(0..=255u8).collect::<Vec<_>>())
        .unwrap();
    r.write32(reg::LIVENESS, 0x1234_5678);
    r.write32(reg::STATUS, 0x80);
    r.write32(reg::FACTORIAL, 10);
    r.write32(reg::IRQ_RAISE, 0x40);
    r.write(reg::DMA_SRC, RAM + 0x1000);
    r.write(reg::DMA_DST, DMA_BUF_ADDR);
    r.write(reg::DMA_COUNT, 256);
    r.write(reg::DMA_CMD, DMA_CMD_RUN);
}

/// The second half: the device buffer back to RAM elsewhere, another factorial.
fn second_half(r: &mut Rig) {
    r.write(reg::DMA_SRC, DMA_BUF_ADDR + 16);
    r.write(reg::DMA_DST, RAM + 0x3000);
    r.write(reg::DMA_COUNT, 128);
    r.write(reg::DMA_CMD, DMA_CMD_RUN | DMA_CMD_TO_RAM | DMA_CMD_IRQ);
    r.write32(reg::FACTORIAL, 7);
}

#[test]
fn saved_mid_workload_and_continued_elsewhere_gives_the_same_results() {
    let mut reference = Rig::new();
    first_half(&mut reference);
    second_half(&mut reference);
    let want = (reference.observe(), reference.ram(RAM + 0x3000, 128));

    let mut source = Rig::new();
    first_half(&mut source);
    let blob = source.f.save().unwrap();
    let mut destination = Rig::new();
    // The destination's guest memory holds what the source's did (migrated
    // by the VMM, not by the device).
    destination
        .memory
        .write(RAM + 0x1000, &source.ram(RAM + 0x1000, 256))
        .unwrap();
    let maps = destination.f.restore(&blob).unwrap();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].gpa, maps[0].size), (RAM, 1 << 20));
    assert_eq!(destination.observe(), source.observe());
    second_half(&mut destination);
    assert_eq!(
        (destination.observe(), destination.ram(RAM + 0x3000, 128)),
        want
    );
}

/// A DMA still running when the state is saved runs on the destination.
#[test]
fn a_dma_under_way_at_save_completes_after_restore() {
    let mut source = Rig::new();
    source.memory.write(RAM + 0x2000, &[0xab; 64]).unwrap();
    source.write(reg::DMA_SRC, DMA_BUF_ADDR);
    source.write(reg::DMA_DST, RAM + 0x2000);
    source.write(reg::DMA_COUNT, 64);
    // Queued, not yet performed by the session.
    source
        .f
        .region_write(
            BAR0,
            reg::DMA_CMD,
            &(DMA_CMD_RUN | DMA_CMD_TO_RAM).to_le_bytes(),
        )
        .unwrap();
    let blob = source.f.save().unwrap();
    let mut destination = Rig::new();
    destination.memory.write(RAM + 0x2000, &[0xab; 64]).unwrap();
    destination.f.restore(&blob).unwrap();
    assert_ne!(destination.read32(reg::DMA_CMD) & DMA_CMD_RUN as u32, 0);
    destination.run_queued_dma();
    assert_eq!(destination.read32(reg::DMA_CMD) & DMA_CMD_RUN as u32, 0);
    assert_eq!(destination.ram(RAM + 0x2000, 64), vec![0; 64]);
}

/// Every truncation of a real blob, and corrupted ones, are errors that
/// leave the device as it was.
#[test]
fn hostile_blobs_are_refused_and_change_nothing() {
    let mut source = Rig::new();
    first_half(&mut source);
    let blob = source.f.save().unwrap();
    let mut target = Rig::new();
    target.write32(reg::LIVENESS, 0xfeed);
    let before = (target.observe(), target.f.save().unwrap());
    for len in 0..blob.len() {
        assert!(
            target.f.restore(&blob[..len]).is_err(),
            "truncated to {len}"
        );
    }
    let mut step = 0;
    for i in (0..blob.len()).step_by(3) {
        let mut bad = blob.clone();
        bad[i] ^= 0x5a;
        if target.f.restore(&bad).is_ok() {
            // A corrupted register value can still be a valid state; put
            // the device back for the next round.
            target.f.restore(&before.1).unwrap();
            step += 1;
        }
    }
    eprintln!("{step} corrupted blobs restored as other valid states");
    assert_eq!((target.observe(), target.f.save().unwrap()), before);
    assert!(matches!(
        target.f.restore(b"UMDEVST1"),
        Err(StateError::Truncated { .. })
    ));
    assert!(matches!(
        target.f.restore(b"UMDEVST0"),
        Err(StateError::BadMagic)
    ));
}
