//! The real `umdev-edu` binary driven over its UNIX socket by our client: every
//! command, the error paths, DMA by fd and by message, reconnect, SIGTERM.

mod edu_dma;

use umdev_testkit as common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use common::{wait_for, Backend, MemfdRam, SharedRam};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_CMD_IRQ, DMA_CMD_RUN, DMA_CMD_TO_RAM, ID_VALUE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// Memory decoding and bus mastering on, as a guest driver would.
fn enable(c: &mut Client) {
    c.enable_device().unwrap();
}

#[test]
fn negotiation_and_device_description() {
    let be = Backend::edu();
    let mut c = be.connect();
    let caps = c.server_caps().unwrap().clone();
    assert_eq!(caps.max_msg_fds, 16);
    assert_eq!(caps.max_data_xfer_size, 1 << 20);
    assert_eq!(caps.pgsizes, 4096);
    assert_eq!(caps.max_dma_maps, 65535);
    assert!(caps.write_multiple);
    assert_eq!(c.server_version().major, 0);

    let info = c.device_info().unwrap();
    assert_eq!(info.flags, DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
    assert_eq!(info.num_regions, 9);
    assert_eq!(info.num_irqs, 5);

    for index in 0..9 {
        let r = c.region_info(index).unwrap();
        let expected = match index {
            0 => 1 << 20,
            7 => 256,
            _ => 0,
        };
        assert_eq!(r.info.size, expected, "region {index}");
        assert!(r.fd.is_none());
    }
    assert_eq!(c.region_io_fds(0).unwrap().count, 0);
    let counts: Vec<u32> = (0..5).map(|i| c.irq_info(i).unwrap().count).collect();
    assert_eq!(counts, [1, 1, 0, 1, 1]);
    let intx = c.irq_info(0).unwrap();
    assert_eq!(intx.flags & IRQ_INFO_AUTOMASKED, IRQ_INFO_AUTOMASKED);

    // Config space as QEMU's edu has it.
    let cfg = c.region_read(CONFIG, 0, 256).unwrap();
    assert_eq!(&cfg[0..4], &[0x34, 0x12, 0xe8, 0x11]);
    assert_eq!(cfg[8], 0x10);
    assert_eq!(&cfg[0x0a..0x0c], &[0xff, 0x00]);
    assert_eq!(cfg[0x3d], 1, "INTA");
    assert_eq!(cfg[0x34], 0x40, "MSI capability first");
    assert_eq!(cfg[0x40], 0x05);
}

#[test]
fn registers_factorial_and_liveness() {
    let be = Backend::edu();
    let mut c = be.connect();
    // Decoding is off until the command register enables it: all ones.
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), 0xffff_ffff);
    enable(&mut c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    c.write_u32(BAR0, reg::LIVENESS, 0x1234_5678).unwrap();
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !0x1234_5678);
    for (n, want) in [(0u32, 1u32), (5, 120), (10, 3_628_800), (13, 1_932_053_504)] {
        c.write_u32(BAR0, reg::FACTORIAL, n).unwrap();
        wait_for(Duration::from_secs(5), || {
            (c.read_u32(BAR0, reg::STATUS).unwrap() & 1 == 0).then_some(())
        });
        assert_eq!(c.read_u32(BAR0, reg::FACTORIAL).unwrap(), want, "{n}!");
    }
    // Wrong access sizes read all ones and are ignored, as on QEMU's edu.
    assert_eq!(c.region_read(BAR0, reg::ID, 2).unwrap(), [0xff, 0xff]);
    assert_eq!(c.read_u32(BAR0, 0x100).unwrap(), 0xffff_ffff);
    // 8-byte registers.
    c.write_u64(BAR0, reg::DMA_SRC, 0x1_2345_6789).unwrap();
    assert_eq!(c.read_u64(BAR0, reg::DMA_SRC).unwrap(), 0x1_2345_6789);
}

#[test]
fn posted_writes_and_write_multi() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    // No-reply writes get no reply; the next request's reply is the next message.
    for i in 0..100u32 {
        c.region_write_posted(BAR0, reg::LIVENESS, &i.to_le_bytes())
            .unwrap();
    }
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !99);
    let a = 7u32.to_le_bytes();
    let b = 0x80u32.to_le_bytes();
    c.region_write_multi(&[(BAR0, reg::LIVENESS, &a), (BAR0, reg::STATUS, &b)], false)
        .unwrap();
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !7);
    assert_eq!(c.read_u32(BAR0, reg::STATUS).unwrap(), 0x80);
    let z = 9u32.to_le_bytes();
    c.region_write_multi(&[(BAR0, reg::LIVENESS, &z)], true)
        .unwrap();
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !9);
}

#[test]
fn intx_and_msi_through_eventfds() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(0, 0, &[intx.as_raw_fd()]).unwrap();
    c.write_u32(BAR0, reg::IRQ_RAISE, 0x10).unwrap();
    assert_eq!(c.read_u32(BAR0, reg::IRQ_STATUS).unwrap(), 0x10);
    assert_eq!(intx.read().unwrap(), 1);
    // Status register reports the asserted line.
    let status = c.region_read(CONFIG, 0x06, 2).unwrap();
    assert!(status[0] & 0x08 != 0);
    c.write_u32(BAR0, reg::IRQ_ACK, 0x10).unwrap();
    assert_eq!(c.read_u32(BAR0, reg::IRQ_STATUS).unwrap(), 0);
    c.unmask_irq(0, 0).unwrap();

    // Factorial with the interrupt bit over MSI.
    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(1, 0, &[msi.as_raw_fd()]).unwrap();
    c.region_write(CONFIG, 0x42, &0x0081u16.to_le_bytes())
        .unwrap(); // MSI enable
    c.write_u32(BAR0, reg::STATUS, 0x80).unwrap();
    c.write_u32(BAR0, reg::FACTORIAL, 4).unwrap();
    wait_for(Duration::from_secs(5), || msi.read().ok());
    assert_eq!(c.read_u32(BAR0, reg::FACTORIAL).unwrap(), 24);
    assert_eq!(c.read_u32(BAR0, reg::IRQ_STATUS).unwrap(), 1);
    // SET_IRQS count 0 disables: no more signals.
    c.set_irqs(
        1,
        IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
        0,
        0,
        &[],
        &[],
    )
    .unwrap();
    c.write_u32(BAR0, reg::IRQ_RAISE, 2).unwrap();
    assert!(msi.read().is_err());
}

fn dma_round_trip(c: &mut Client, ram_base: u64, src: u64, dst: u64) {
    // RAM -> device buffer, then device buffer -> RAM elsewhere.
    edu_dma::run(c, ram_base + src, DMA_BUF_ADDR, 256, DMA_CMD_RUN);
    let to_ram = DMA_CMD_RUN | DMA_CMD_TO_RAM | DMA_CMD_IRQ;
    edu_dma::run(c, DMA_BUF_ADDR, ram_base + dst, 256, to_ram);
    assert_eq!(c.read_u32(BAR0, reg::IRQ_STATUS).unwrap() & 0x100, 0x100);
}

#[test]
fn dma_through_fd_mapped_memory() {
    let be = Backend::edu();
    let mut c = be.connect();
    let mut ram = MemfdRam::new(1 << 20);
    for (i, b) in ram.bytes_mut()[0x1000..0x1100].iter_mut().enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    c.dma_map(0x10_0000, 1 << 20, Some(ram.fd()), 0, RW)
        .unwrap();
    // Without bus mastering the engine must not touch memory.
    c.region_write(CONFIG, 0x04, &0x0002u16.to_le_bytes())
        .unwrap();
    ram.bytes_mut()[0x3000] = 0xee;
    let to_ram = DMA_CMD_RUN | DMA_CMD_TO_RAM;
    edu_dma::run(&mut c, DMA_BUF_ADDR, 0x10_0000 + 0x3000, 16, to_ram);
    assert_eq!(ram.bytes()[0x3000], 0xee, "DMA without Bus Master Enable");

    enable(&mut c);
    dma_round_trip(&mut c, 0x10_0000, 0x1000, 0x2000);
    assert_eq!(&ram.bytes()[0x2000..0x2100], &ram.bytes()[0x1000..0x1100]);
}

#[test]
fn dma_through_messages_with_requests_interleaved() {
    dma_through_messages(Backend::edu(), DmaLayout::Spec);
}

#[test]
fn dma_through_messages_in_the_older_qemu_layout() {
    dma_through_messages(
        Backend::start("umdev-edu", &["--dma-layout", "qemu-10"]),
        DmaLayout::Qemu10,
    );
}

fn dma_through_messages(be: Backend, layout: DmaLayout) {
    let mut c = be.connect();
    let ram = SharedRam::new(0x20_0000, 0x10000);
    {
        let mut b = ram.bytes.lock().unwrap();
        for (i, x) in b[0x100..0x200].iter_mut().enumerate() {
            *x = (i * 7) as u8;
        }
    }
    c.set_dma_target(Box::new(ram.clone()), layout);
    c.dma_map(0x20_0000, 0x10000, None, 0, RW).unwrap();
    enable(&mut c);
    // Polling the command register serves the server's DMA requests meanwhile.
    dma_round_trip(&mut c, 0x20_0000, 0x100, 0x800);
    {
        let b = ram.bytes.lock().unwrap();
        assert_eq!(&b[0x800..0x900], &b[0x100..0x200]);
    }
    assert!(c.dma_requests_served >= 2);

    // Now script it: hold the server's DMA_READ unanswered while the client maps,
    // unmaps and reads registers; the server must answer all of that first.
    edu_dma::program(&mut c, 0x20_0000 + 0x100, DMA_BUF_ADDR + 0x800, 64);
    // Posted, as QEMU sends MMIO writes: no reply can arrive before the request.
    edu_dma::start_posted(&mut c, DMA_CMD_RUN);
    let request = c.next_message().unwrap();
    assert_eq!(request.header.command, Command::DmaRead as u16);
    assert!(request.header.is_command());
    let ram2 = MemfdRam::new(0x10000);
    c.dma_map(0x40_0000, 0x10000, Some(ram2.fd()), 0, RW)
        .unwrap();
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    c.dma_unmap(0x40_0000, 0x10000, 0).unwrap();
    c.answer(&request).unwrap();
    edu_dma::wait(&mut c);
}

/// A DEVICE_RESET while the server's DMA_READ is unanswered: the late answer
/// must not land in the reset device (no RUN, no buffer change, no interrupt),
/// and the next DMA works.
#[test]
fn a_reset_during_a_dma_by_message_drops_its_late_result() {
    let be = Backend::edu();
    let mut c = be.connect();
    let ram = SharedRam::new(0x20_0000, 0x10000);
    ram.bytes.lock().unwrap()[..64].fill(0xab);
    c.set_dma_target(Box::new(ram.clone()), DmaLayout::Spec);
    c.dma_map(0x20_0000, 0x10000, None, 0, RW).unwrap();
    enable(&mut c);
    edu_dma::program(&mut c, 0x20_0000, DMA_BUF_ADDR, 64);
    edu_dma::start_posted(&mut c, DMA_CMD_RUN | DMA_CMD_IRQ);
    let request = c.next_message().unwrap();
    assert_eq!(request.header.command, Command::DmaRead as u16);
    c.reset().unwrap();
    c.answer(&request).unwrap();
    // (The reset switched decoding off too.)
    enable(&mut c);
    assert_eq!(c.read_u64(BAR0, reg::DMA_CMD).unwrap(), 0);
    assert_eq!(c.read_u32(BAR0, reg::IRQ_STATUS).unwrap(), 0);
    // The buffer kept its power-on zeros: copy it out to see.
    let to_ram = DMA_CMD_RUN | DMA_CMD_TO_RAM;
    edu_dma::run(&mut c, DMA_BUF_ADDR, 0x20_0000 + 0x1000, 64, to_ram);
    assert_eq!(ram.bytes.lock().unwrap()[0x1000..0x1040], [0u8; 64]);
}

#[test]
fn dma_by_message_error_reply_does_not_kill_the_session() {
    let be = Backend::edu();
    let mut c = be.connect();
    // The client refuses every DMA (as QEMU does before Bus Master Enable).
    c.dma_map(0x20_0000, 0x10000, None, 0, RW).unwrap();
    enable(&mut c);
    c.write_u64(BAR0, reg::DMA_SRC, 0x20_0000).unwrap();
    c.write_u64(BAR0, reg::DMA_DST, DMA_BUF_ADDR).unwrap();
    c.write_u64(BAR0, reg::DMA_COUNT, 64).unwrap();
    c.write_u64(BAR0, reg::DMA_CMD, DMA_CMD_RUN).unwrap();
    edu_dma::wait(&mut c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
}

#[test]
fn dma_map_and_unmap_rules() {
    let be = Backend::edu();
    let mut c = be.connect();
    let ram = MemfdRam::new(0x10_0000);
    c.dma_map(0x100000, 0x80000, Some(ram.fd()), 0, RW).unwrap();
    c.dma_map(0x180000, 0x80000, Some(ram.fd()), 0x80000, RW)
        .unwrap();
    let overlap = c
        .dma_map(0x170000, 0x20000, Some(ram.fd()), 0, RW)
        .unwrap_err();
    assert_eq!(overlap.errno(), Some(libc::EEXIST as u32));
    // A region larger than its file would SIGBUS the backend: refused.
    let short = c
        .dma_map(0x400000, 0x20_0000, Some(ram.fd()), 0, RW)
        .unwrap_err();
    assert_eq!(short.errno(), Some(libc::EINVAL as u32));
    let never = c.dma_unmap(0x800000, 0x1000, 0).unwrap_err();
    assert_eq!(never.errno(), Some(libc::ENOENT as u32));
    let partial = c.dma_unmap(0x100000, 0x1000, 0).unwrap_err();
    assert_eq!(partial.errno(), Some(libc::EINVAL as u32));
    let echo = c.dma_unmap(0x100000, 0x80000, 0).unwrap();
    assert_eq!((echo.address, echo.size), (0x100000, 0x80000));
    // Unmap-all (flag 2) with a range is malformed; without one it clears all.
    assert!(c.dma_unmap(0x180000, 0x80000, DMA_UNMAP_FLAG_ALL).is_err());
    c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    assert!(c.dma_unmap(0x180000, 0x80000, 0).is_err());
    // And the old range maps again.
    c.dma_map(0x100000, 0x80000, Some(ram.fd()), 0, RW).unwrap();
}

#[test]
fn malformed_and_unknown_commands_get_errors_and_the_stream_stays_in_step() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    let errno = |r: umdev::vfio_user::client::Result<umdev::vfio_user::client::Reply>| {
        r.err().and_then(|e| e.errno())
    };
    // Unknown command with a payload: error after the payload is drained.
    let junk = [0xabu8; 300];
    assert_eq!(errno(c.request_raw(99, &junk)), Some(libc::ENOSYS as u32));
    assert_eq!(errno(c.request_raw(14, &junk)), Some(libc::ENOSYS as u32));
    // Short payloads.
    assert_eq!(
        errno(c.request_raw(Command::RegionRead as u16, &[0; 8])),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        errno(c.request_raw(Command::DmaMap as u16, &[0; 31])),
        Some(libc::EINVAL as u32)
    );
    // REGION_WRITE whose count disagrees with its data.
    let msg = common::soak::access_payload(0, 0, 64, &[0; 4]);
    assert_eq!(
        errno(c.request_raw(Command::RegionWrite as u16, &msg)),
        Some(libc::EINVAL as u32)
    );
    // Out-of-range regions and offsets.
    assert_eq!(
        c.region_read(9, 0, 4).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.region_read(BAR0, (1 << 20) - 2, 4).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.region_read(CONFIG, 0xfe, 4).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.region_read(BAR0, 0, 2 << 20).unwrap_err().errno(),
        Some(libc::E2BIG as u32)
    );
    assert_eq!(
        c.region_info(42).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.irq_info(5).unwrap_err().errno(),
        Some(libc::EINVAL as u32)
    );
    // SET_IRQS: two actions, too many vectors, fds for the wrong count.
    let e = EventFd::new(0).unwrap();
    assert!(c
        .set_irqs(
            1,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_TRIGGER,
            0,
            1,
            &[],
            &[]
        )
        .is_err());
    assert!(c
        .set_irqs(
            1,
            IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
            0,
            4,
            &[],
            &[]
        )
        .is_err());
    assert!(c
        .set_irq_eventfds(0, 0, &[e.as_raw_fd(), e.as_raw_fd()])
        .is_err());
    // A reply-typed message from the client is ignored; a second VERSION is refused.
    let v = Version { major: 0, minor: 0 };
    assert!(c
        .request(
            Command::Version,
            &[v.as_bytes(), b"{\"capabilities\":{}}\0"],
            &[]
        )
        .is_err());
    // fds on a command that takes none: refused, and closed by the server.
    let fds = [e.as_raw_fd()];
    let id_read = common::soak::access_payload(0, 0, 4, &[]);
    assert!(c.request(Command::RegionRead, &[&id_read], &fds).is_err());
    // Still in step.
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
}

#[test]
fn commands_before_version_are_refused() {
    let be = Backend::edu();
    let stream = std::os::unix::net::UnixStream::connect(&be.socket).unwrap();
    let mut c = Client::from_stream(stream).unwrap();
    assert!(c.device_info().is_err());
    c.negotiate(&umdev::vfio_user::caps::Capabilities::new(
        1, 4096, 16, false,
    ))
    .unwrap();
    assert_eq!(c.device_info().unwrap().num_regions, 9);
}

#[test]
fn reset_and_reconnect() {
    let mut be = Backend::edu();
    {
        let mut c = be.connect();
        enable(&mut c);
        c.write_u32(BAR0, reg::LIVENESS, 1).unwrap();
        c.reset().unwrap();
        // Reset turns decoding off and the registers to power-on values.
        enable(&mut c);
        assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), 0);
        c.write_u32(BAR0, reg::LIVENESS, 5).unwrap();
        let ram = MemfdRam::new(0x10000);
        c.dma_map(0x10000, 0x10000, Some(ram.fd()), 0, RW).unwrap();
    }
    // A client vanishing mid-message is a lost connection too.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&be.socket).unwrap();
        s.write_all(&[1, 0, 1, 0, 100, 0]).unwrap();
    }
    let mut c = be.connect();
    enable(&mut c);
    assert_eq!(
        c.read_u32(BAR0, reg::LIVENESS).unwrap(),
        0,
        "state of the last client is gone"
    );
    // The old client's DMA region is gone as well: mapping it again works.
    let ram = MemfdRam::new(0x10000);
    c.dma_map(0x10000, 0x10000, Some(ram.fd()), 0, RW).unwrap();
    assert!(be.alive());
}

#[test]
fn sigterm_ends_cleanly_and_removes_the_socket() {
    let mut be = Backend::edu();
    let _c = be.connect();
    // SAFETY: signals our own child process.
    unsafe { libc::kill(be.child.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(10), || be.child.try_wait().unwrap());
    assert!(status.success(), "exit status {status:?}");
    assert!(!be.socket.exists());
}

/// Starts umdev-edu with `fd` as its descriptor 3 and `--fd 3`.
fn spawn_with_fd3(fd: std::os::fd::RawFd) -> std::process::Child {
    let mut cmd = std::process::Command::new(common::workspace_bin("umdev-edu"));
    cmd.args(["--fd", "3"]).stderr(std::process::Stdio::null());
    common::pass_as_fd3(&mut cmd, fd, false);
    cmd.spawn().unwrap()
}

#[test]
fn inherited_connected_socket() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut child = spawn_with_fd3(theirs.as_raw_fd());
    drop(theirs);
    let mut c = common::client_on(ours);
    enable(&mut c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    drop(c);
    // One client on a connected fd: the backend exits when it leaves.
    let status = wait_for(Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(status.success());
}

#[test]
fn inherited_listening_socket() {
    let dir = common::TempDir::new();
    let path = dir.path().join("l.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut child = spawn_with_fd3(listener.as_raw_fd());
    for _ in 0..2 {
        let mut c = Client::connect(&path).unwrap();
        enable(&mut c);
        assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    }
    // SAFETY: signals our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(status.success());
}
