//! The null device's binary over its socket: every register, an interrupt, a
//! DMA into memfd guest memory, and its state round trip in process.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use umdev::memory::{GuestMemory, MappedMemfd};
use umdev::vfio_user::wire::*;
use umdev_null::{reg, ID_VALUE};
use umdev_testkit::{Backend, TempDir};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// `umdev-null` on a socket of its own, listening once started.
fn start() -> Backend {
    Backend::spawn::<&str>(
        std::path::Path::new(env!("CARGO_BIN_EXE_umdev-null")),
        TempDir::new(),
        "null.sock",
        &[],
        "info",
    )
}

#[test]
fn registers_interrupt_and_dma_over_the_socket() {
    let be = start();
    let mut c = be.connect();
    c.region_write(PCI_CONFIG_REGION_INDEX, 0x04, &6u16.to_le_bytes())
        .unwrap();
    assert_eq!(c.read_u32(0, reg::ID).unwrap(), ID_VALUE);
    c.write_u32(0, reg::SCRATCH, 0xcafe_f00d).unwrap();
    assert_eq!(c.read_u32(0, reg::SCRATCH).unwrap(), 0xcafe_f00d);

    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(0, 0, &[intx.as_raw_fd()]).unwrap();
    c.write_u32(0, reg::DOORBELL, 1).unwrap();
    assert_eq!(intx.read().unwrap(), 1);
    c.unmask_irq(0, 0).unwrap();

    let ram = MappedMemfd::new("null-ram", 1 << 20).unwrap();
    c.dma_map(
        0x10_0000,
        1 << 20,
        Some(ram.fd()),
        0,
        DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
    )
    .unwrap();
    c.write_u64(0, reg::DMA_ADDR, 0x10_0000 + 0x40).unwrap();
    c.write_u32(0, reg::DMA_COPY, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.read_u32(0, reg::DMA_COPY).unwrap() != 0 {
        assert!(Instant::now() < deadline);
    }
    assert_eq!(c.read_u32(0, reg::DMA_STATUS).unwrap(), 0);
    let mut got = [0u8; 4];
    // SAFETY: 4 bytes inside our live mapping, read after the device is done.
    unsafe { std::ptr::copy_nonoverlapping(ram.as_ptr().add(0x40), got.as_mut_ptr(), 4) };
    assert_eq!(u32::from_le_bytes(got), 0xcafe_f00d);
    // Outside guest memory: a failed DMA, visible to the guest.
    c.write_u64(0, reg::DMA_ADDR, 0x9000_0000).unwrap();
    c.write_u32(0, reg::DMA_COPY, 1).unwrap();
    while c.read_u32(0, reg::DMA_COPY).unwrap() != 0 {}
    assert_eq!(c.read_u32(0, reg::DMA_STATUS).unwrap(), 1);
}

#[test]
fn state_round_trip() {
    let mut a = umdev_null::new_function(GuestMemory::new(4)).unwrap();
    let bar0 = umdev::pci::Region::Bar(0);
    a.region_write(umdev::pci::Region::Config, 0x04, &2u16.to_le_bytes())
        .unwrap();
    a.region_write(bar0, reg::SCRATCH, &7u32.to_le_bytes())
        .unwrap();
    let blob = a.save().unwrap();
    let mut b = umdev_null::new_function(GuestMemory::new(4)).unwrap();
    b.restore(&blob).unwrap();
    let mut v = [0; 4];
    b.region_read(bar0, reg::SCRATCH, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 7);
    assert!(b.restore(&blob[..blob.len() - 1]).is_err());
}
