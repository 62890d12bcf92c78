//! A second, independent client: the rust-vmm `vfio_user::Client` that Cloud
//! Hypervisor runs, against the real `umdev-edu` binary. It reads fixed-size
//! replies and never looks at the error flag, so every exchange here must succeed.

use umdev_testkit as common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{wait_for, Backend, MemfdRam};
use umdev_edu::{reg, ID_VALUE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn read_u32(c: &mut vfio_user::Client, region: u32, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, offset, &mut b).unwrap();
    u32::from_le_bytes(b)
}

#[test]
fn cloud_hypervisor_client_drives_edu() {
    let be = Backend::edu();
    let mut c = vfio_user::Client::new(&be.socket).expect("negotiate and list regions");
    assert_eq!(c.region(0).unwrap().size, 1 << 20);
    assert_eq!(c.region(7).unwrap().size, 256);
    assert!(c.region(8).is_some(), "all nine regions answered");

    // Guest memory with an fd, as Cloud Hypervisor shares all of it.
    let ram = MemfdRam::new(1 << 20);
    c.dma_map(0, 0x1000_0000, 1 << 20, ram.fd()).unwrap();

    // Size BAR0 through config writes, then place it and enable decoding.
    c.region_write(7, 0x10, &u32::MAX.to_le_bytes()).unwrap();
    assert_eq!(read_u32(&mut c, 7, 0x10), 0xfff0_0000);
    c.region_write(7, 0x10, &0xfe00_0000u32.to_le_bytes())
        .unwrap();
    assert_eq!(read_u32(&mut c, 7, 0x10), 0xfe00_0000);
    c.region_write(7, 0x04, &0x0006u16.to_le_bytes()).unwrap();

    assert_eq!(read_u32(&mut c, 0, reg::ID), ID_VALUE);
    c.region_write(0, reg::FACTORIAL, &5u32.to_le_bytes())
        .unwrap();
    wait_for(Duration::from_secs(5), || {
        (read_u32(&mut c, 0, reg::STATUS) & 1 == 0).then_some(())
    });
    assert_eq!(read_u32(&mut c, 0, reg::FACTORIAL), 120);

    // Interrupts the way it sets them up: IRQ info, then eventfds.
    let msi_info = c.get_irq_info(1).unwrap();
    assert_eq!(msi_info.count, 1);
    let efd = EventFd::new(EFD_NONBLOCK).unwrap();
    let flags = umdev::vfio_user::wire::IRQ_SET_DATA_EVENTFD
        | umdev::vfio_user::wire::IRQ_SET_ACTION_TRIGGER;
    c.set_irqs(0, flags, 0, 1, &[efd.as_raw_fd()]).unwrap();
    c.region_write(0, reg::IRQ_RAISE, &1u32.to_le_bytes())
        .unwrap();
    assert_eq!(efd.read().unwrap(), 1);

    c.dma_unmap(0x1000_0000, 1 << 20).unwrap();
    c.reset().unwrap();
    assert_eq!(
        read_u32(&mut c, 7, 0x10),
        0,
        "reset returns config space to power-on"
    );
}
