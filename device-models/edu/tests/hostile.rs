//! A hostile or broken VMM against the real `umdev-edu`: resources that
//! misbehave after the backend accepted them (memory shrunk under its
//! mappings, fds that are not what they claim, interrupt fds that would
//! block, a client with small limits, a client that never reads). After each
//! attack the backend is alive, serves a fresh client correctly, keeps its fds
//! and memory bounded, and ends on SIGTERM within 1 s.

mod edu_dma;

use umdev_testkit as common;
use umdev_testkit::soak as soak_support;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_for, Backend, MemfdRam};
use soak_support::resources::{self, raw};
use soak_support::{open_fds, rss_kib, terminate};
use umdev::vfio_user::caps::Capabilities;
use umdev::vfio_user::client::DmaTarget;
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_CMD_RUN, DMA_CMD_TO_RAM, ID_VALUE};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const RAM: u64 = 0x10_0000;
const MIB: usize = 1 << 20;

/// Memory decoding and bus mastering on, as a guest driver would.
fn enable(c: &mut Client) {
    c.enable_device().unwrap();
}

/// Runs an edu DMA of `count` bytes and waits for the engine to finish.
fn dma(c: &mut Client, src: u64, dst: u64, count: u64, to_ram: bool) {
    let cmd = DMA_CMD_RUN | if to_ram { DMA_CMD_TO_RAM } else { 0 };
    edu_dma::run(c, src, dst, count, cmd);
}

/// What must hold after every attack: the backend runs, a fresh client gets
/// a correct device (ID, factorial, a DMA round trip through fd memory), its
/// fds and RSS stay bounded, and SIGTERM ends it within 1 s.
fn still_sound(mut be: Backend, fds_before: usize) {
    assert!(be.alive(), "backend died:\n{}", be.log());
    let pid = be.child.id();
    {
        let mut c = be.connect();
        enable(&mut c);
        assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
        c.write_u32(BAR0, reg::FACTORIAL, 5).unwrap();
        wait_for(Duration::from_secs(5), || {
            (c.read_u32(BAR0, reg::STATUS).unwrap() & 1 == 0).then_some(())
        });
        assert_eq!(c.read_u32(BAR0, reg::FACTORIAL).unwrap(), 120);
        let mut ram = MemfdRam::new(MIB);
        ram.bytes_mut()[..64].copy_from_slice(&[0x42; 64]);
        c.dma_map(RAM, MIB as u64, Some(ram.fd()), 0, RW).unwrap();
        dma(&mut c, RAM, DMA_BUF_ADDR, 64, false);
        dma(&mut c, DMA_BUF_ADDR, RAM + 0x1000, 64, true);
        assert_eq!(&ram.bytes()[0x1000..0x1040], &[0x42; 64]);
    }
    // The client's departure is processed: fds back to what they were.
    let fds = wait_for(Duration::from_secs(5), || {
        let n = open_fds(pid);
        (n <= fds_before).then_some(n)
    });
    let rss = rss_kib(pid);
    assert!(rss < 64 * 1024, "edu RSS {rss} KiB over its 64 MiB bound");
    let took = terminate(&mut be.child);
    eprintln!("fds {fds} (before {fds_before}), RSS {rss} KiB, SIGTERM took {took:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
}

fn start() -> (Backend, usize) {
    let be = Backend::edu();
    // A first client and its departure, so lazily made state is counted.
    drop(be.connect());
    std::thread::sleep(Duration::from_millis(50));
    let fds = open_fds(be.child.id());
    (be, fds)
}

/// [`start`], and a client that enabled the device.
fn start_enabled() -> (Backend, usize, Client) {
    let (be, fds) = start();
    let mut c = be.connect();
    enable(&mut c);
    (be, fds, c)
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, umdev::vfio_user::client::ClientError>) -> u32 {
    r.expect_err("the request should have been refused")
        .errno()
        .expect("an error reply, not a lost connection")
}

#[test]
fn dma_map_refuses_fds_it_cannot_trust() {
    let (be, fds) = start();
    let mut c = be.connect();
    // Not regular files: their size cannot be checked, and a pipe or socket
    // cannot be mapped at all.
    let (r, _w) = resources::full_pipe();
    assert_eq!(
        errno_of(c.dma_map(RAM, 0x1000, Some(raw(&r)), 0, RW)),
        libc::EINVAL as u32
    );
    let dev = resources::char_device();
    assert_eq!(
        errno_of(c.dma_map(RAM, 0x1000, Some(raw(&dev)), 1 << 40, RW)),
        libc::EINVAL as u32
    );
    let (s, _peer) = resources::full_socket();
    assert!(c.dma_map(RAM, 0x1000, Some(raw(&s)), 0, RW).is_err());
    // A range past the end of the file.
    let short = resources::unsealable_ram(0x2000);
    assert!(c.dma_map(RAM, 0x3000, Some(short.fd()), 0, RW).is_err());
    assert!(c
        .dma_map(RAM, 0x2000, Some(short.fd()), 0x1000, RW)
        .is_err());
    // hugetlb memory without huge pages behind it: refused at DMA_MAP (the
    // kernel reserves the pages when it is mapped), not a SIGBUS later.
    if let Some(huge) = resources::hugetlb_memfd(2 * MIB as u64) {
        let r = c.dma_map(RAM, 2 * MIB as u64, Some(raw(&huge)), 0, RW);
        if resources::free_huge_pages() == 0 {
            assert!(r.is_err(), "hugetlb memory without pages was accepted");
        } else {
            eprintln!("this host has huge pages: DMA_MAP of hugetlb memory {r:?}");
        }
    }
    // Nothing of that took: the range is still free for good memory.
    let ram = MemfdRam::new(MIB);
    c.dma_map(RAM, MIB as u64, Some(ram.fd()), 0, RW).unwrap();
    drop(c);
    still_sound(be, fds);
}

/// The VMM shrinks guest memory under the backend's mapping: memory it could
/// seal cannot shrink any more; memory it could not seal faults, and the DMA
/// into it fails (a logged device error), not the process.
#[test]
fn memory_shrunk_under_the_backend_fails_the_access_not_the_backend() {
    let (be, fds, mut c) = start_enabled();
    let sealable = MemfdRam::new(MIB);
    c.dma_map(RAM, MIB as u64, Some(sealable.fd()), 0, RW)
        .unwrap();
    // SAFETY: ftruncate on our own memfd.
    let rc = unsafe { libc::ftruncate(sealable.fd(), 0) };
    assert_eq!(rc, -1, "the backend did not seal the memfd it mapped");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );

    const LOST: u64 = 0x80_0000;
    let lost = resources::unsealable_ram(MIB);
    c.dma_map(LOST, MIB as u64, Some(lost.fd()), 0, RW).unwrap();
    resources::shrink(&lost, 0x1000).unwrap();
    // Reads from the vanished pages, then writes into them.
    dma(&mut c, LOST + 0x2000, DMA_BUF_ADDR, 256, false);
    dma(&mut c, DMA_BUF_ADDR, LOST + 0x3000, 256, true);
    // Even the page that is still there: the whole region is gone from use.
    dma(&mut c, DMA_BUF_ADDR, LOST, 16, true);
    assert!(be.log().contains("took a DMA region's memory away"));
    assert!(be.log().contains("edu DMA failed"));
    // The region can still be unmapped, and the sealed one still works.
    c.dma_unmap(LOST, MIB as u64, 0).unwrap();
    let mut sealed = sealable;
    sealed.bytes_mut()[..4].copy_from_slice(&[1, 2, 3, 4]);
    dma(&mut c, RAM, DMA_BUF_ADDR, 4, false);
    dma(&mut c, DMA_BUF_ADDR, RAM + 0x100, 4, true);
    assert_eq!(&sealed.bytes()[0x100..0x104], &[1, 2, 3, 4]);
    // The client leaves with the faulted memory still mapped, too.
    let again = resources::unsealable_ram(MIB);
    c.dma_map(LOST, MIB as u64, Some(again.fd()), 0, RW)
        .unwrap();
    resources::shrink(&again, 0).unwrap();
    dma(&mut c, LOST, DMA_BUF_ADDR, 8, false);
    drop(c);
    still_sound(be, fds);
}

/// Interrupt "eventfds" that are pipes or sockets are refused at SET_IRQS;
/// an eventfd whose counter is full is taken and signalled without blocking.
#[test]
fn interrupt_fds_that_would_block() {
    let (be, fds, mut c) = start_enabled();
    let trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
    let (_r, w) = resources::full_pipe();
    let (s, _peer) = resources::full_socket();
    let file = resources::unsealable_ram(4096);
    for (index, fd) in [(0, raw(&w)), (1, raw(&s)), (1, file.fd())] {
        assert_eq!(
            errno_of(c.set_irqs(index, trigger, 0, 1, &[fd], &[])),
            libc::EINVAL as u32
        );
    }
    // INTx's unmask fd too.
    let unmask = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK;
    assert_eq!(
        errno_of(c.set_irqs(0, unmask, 0, 1, &[raw(&w)], &[])),
        libc::EINVAL as u32
    );
    // A saturated eventfd on INTx and on MSI: interrupts fire and nothing blocks.
    let full_intx = resources::saturated_eventfd();
    let full_msi = resources::saturated_eventfd();
    c.set_irqs(0, trigger, 0, 1, &[raw(&full_intx)], &[])
        .unwrap();
    for _ in 0..3 {
        c.write_u32(BAR0, reg::IRQ_RAISE, 0x10).unwrap();
        c.write_u32(BAR0, reg::IRQ_ACK, 0x10).unwrap();
        c.unmask_irq(0, 0).unwrap();
    }
    c.set_irqs(1, trigger, 0, 1, &[raw(&full_msi)], &[])
        .unwrap();
    c.region_write(CONFIG, 0x42, &0x0081u16.to_le_bytes())
        .unwrap();
    for _ in 0..100 {
        c.write_u32(BAR0, reg::IRQ_RAISE, 0x20).unwrap();
    }
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    // The counter was full all along: nothing was added, nothing lost.
    let mut count = 0u64;
    // SAFETY: reads 8 bytes into a local u64 from our eventfd (non-blocking
    // now: the backend set O_NONBLOCK on the shared file).
    let n = unsafe { libc::read(full_msi.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    assert_eq!((n, count), (8, u64::MAX - 1));
    // Once drained, the next interrupt arrives.
    c.write_u32(BAR0, reg::IRQ_RAISE, 0x20).unwrap();
    // SAFETY: as above.
    let n = unsafe { libc::read(full_msi.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
    assert_eq!((n, count), (8, 1));
    assert!(be.log().contains("interrupt eventfd not signalled"));
    drop(c);
    still_sound(be, fds);
}

/// Guest RAM served by message, recording the largest request the backend sent.
#[derive(Clone, Default)]
struct RecordingRam {
    bytes: Arc<Mutex<Vec<u8>>>,
    largest: Arc<Mutex<usize>>,
}

impl DmaTarget for RecordingRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), u32> {
        let mut l = self.largest.lock().unwrap();
        *l = (*l).max(buf.len());
        let at = (gpa - RAM) as usize;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[at..at + buf.len()]);
        Ok(())
    }
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), u32> {
        let mut l = self.largest.lock().unwrap();
        *l = (*l).max(data.len());
        let at = (gpa - RAM) as usize;
        self.bytes.lock().unwrap()[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// A client that takes at most 1 KiB of data per message gets DMA_READ and
/// DMA_WRITE requests of at most 1 KiB; one that takes none is refused.
#[test]
fn server_initiated_dma_respects_the_clients_max_data_xfer_size() {
    let (be, fds) = start();
    let stream = std::os::unix::net::UnixStream::connect(&be.socket).unwrap();
    let mut zero = Client::from_stream(stream).unwrap();
    assert_eq!(
        errno_of(zero.negotiate(&Capabilities::new(16, 0, 64, false))),
        libc::EINVAL as u32
    );
    drop(zero);

    let stream = std::os::unix::net::UnixStream::connect(&be.socket).unwrap();
    let mut c = Client::from_stream(stream).unwrap();
    c.negotiate(&Capabilities::new(1, 1024, 64, false)).unwrap();
    enable(&mut c);
    let ram = RecordingRam::default();
    *ram.bytes.lock().unwrap() = (0..MIB).map(|i| (i * 7) as u8).collect();
    c.set_dma_target(Box::new(ram.clone()), DmaLayout::Spec);
    c.dma_map(RAM, MIB as u64, None, 0, RW).unwrap();
    dma(&mut c, RAM + 0x1000, DMA_BUF_ADDR, 4096, false);
    dma(&mut c, DMA_BUF_ADDR, RAM + 0x8000, 4096, true);
    let bytes = ram.bytes.lock().unwrap().clone();
    assert_eq!(&bytes[0x8000..0x9000], &bytes[0x1000..0x2000]);
    let largest = *ram.largest.lock().unwrap();
    assert!(largest <= 1024, "a DMA request carried {largest} bytes");
    assert!(largest > 0);
    drop(c);
    still_sound(be, fds);
}

/// A client that sends requests and never reads a reply: the backend blocks
/// on its full socket, and SIGTERM still ends it within 1 s.
#[test]
fn a_client_that_never_reads_cannot_keep_the_backend_from_ending() {
    let (mut be, _) = start();
    let stream = std::os::unix::net::UnixStream::connect(&be.socket).unwrap();
    let mut c = Client::from_stream(stream.try_clone().unwrap()).unwrap();
    c.negotiate(&Capabilities::new(16, 1 << 20, 64, false))
        .unwrap();
    // 4 KiB region reads: each reply is bigger than its request, so the
    // backend's replies fill our receive buffer long before its requests
    // fill ours.
    stream.set_nonblocking(true).unwrap();
    let access = RegionAccess {
        offset: 0,
        region: BAR0,
        count: 4096,
    };
    let mut sent = 0u32;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        let h = Header {
            msg_id: sent as u16,
            command: Command::RegionRead as u16,
            size: (HEADER_SIZE + std::mem::size_of::<RegionAccess>()) as u32,
            flags: 0,
            error: 0,
        };
        let mut msg = h.as_bytes().to_vec();
        msg.extend_from_slice(access.as_bytes());
        match std::io::Write::write(&mut &stream, &msg) {
            Ok(n) if n == msg.len() => sent += 1,
            _ => break,
        }
    }
    assert!(sent > 16, "only {sent} requests went out");
    std::thread::sleep(Duration::from_millis(200));
    assert!(be.alive());
    let took = terminate(&mut be.child);
    eprintln!("{sent} unread requests; SIGTERM took {took:?}");
    assert!(took < Duration::from_secs(1), "SIGTERM took {took:?}");
}
