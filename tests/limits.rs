//! Limits a client cannot push the backend past. Each ends in an error reply (or,
//! for server-initiated DMA, a device-side fault), the stream stays in step, and
//! nothing leaks. docs/robustness.md has the table.

use umdev_testkit as common;

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{wait_for, Backend, InProcessServer, MemfdRam, SharedRam};
use umdev::memory::{GuestMemory, MemoryError};
use umdev::pci::{BarDef, BarIndex, DeviceContext, PciDevice, PciDeviceDescription, PciFunction};
use umdev::vfio_user::client::{ClientError, Reply};
use umdev::vfio_user::dma::MAX_PENDING_REQUESTS;
use umdev::vfio_user::socket::MAX_FDS_PER_MESSAGE;
use umdev::vfio_user::wire::*;
use umdev::vfio_user::{Client, Server, ServerConfig};
use umdev_edu::{reg, ID_VALUE};
use vmm_sys_util::eventfd::EventFd;

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

fn errno<T>(r: Result<T, ClientError>) -> Option<u32> {
    r.err().and_then(|e| e.errno())
}

/// Memory decoding and bus mastering on, as a guest driver would.
fn enable(c: &mut Client) {
    c.enable_device().unwrap();
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

// ---- message size ---------------------------------------------------------

#[test]
fn oversized_message_is_drained_and_refused_with_e2big() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    let max = c.server_caps().unwrap().max_data_xfer_size as usize;
    // A REGION_WRITE carrying more than max_data_xfer_size + 4 KiB of metadata.
    let access = RegionAccess {
        offset: 0,
        region: BAR0,
        count: (max + 8192) as u32,
    };
    let data = vec![0x5au8; max + 8192];
    let id = c
        .send(
            Command::RegionWrite,
            &[access.as_bytes(), &data],
            &[],
            false,
        )
        .unwrap();
    assert_eq!(errno(c.wait_reply(id)), Some(libc::E2BIG as u32));
    // REGION_READ asking for more than the limit.
    assert_eq!(
        errno(c.region_read(BAR0, 0, max + 1)),
        Some(libc::E2BIG as u32)
    );
    // In step, and the payload reached nothing.
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), 0);
}

#[test]
fn a_client_announcing_a_huge_message_only_stalls_itself() {
    let mut be = Backend::edu();
    {
        let mut c = be.connect();
        // 4 GiB announced, 1 MiB sent, then the client goes away.
        let header = Header {
            msg_id: 7,
            command: Command::RegionWrite as u16,
            size: u32::MAX,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        };
        c.send_raw(header, &[&vec![0u8; 1 << 20]], &[]).unwrap();
    }
    // The next client is served at once.
    let mut c = be.connect();
    enable(&mut c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    assert!(be.alive());
}

// ---- fds per message ------------------------------------------------------

/// Sends one command with `fds` attached, bypassing the client's own limit.
fn send_with_fds(
    stream: &UnixStream,
    msg_id: u16,
    command: Command,
    payload: &[u8],
    fds: &[RawFd],
) {
    let header = Header {
        msg_id,
        command: command as u16,
        size: (HEADER_SIZE + payload.len()) as u32,
        flags: FLAGS_TYPE_COMMAND,
        error: 0,
    };
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(payload);
    let data_len = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_mut_ptr().cast(),
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr points at live buffers for the call; the control buffer is
    // aligned (u64) and large enough for one SCM_RIGHTS header with `fds`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), data_len);
        let n = libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL);
        assert_eq!(
            n as usize,
            bytes.len(),
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn fds_beyond_the_limit_are_refused_and_none_is_kept() {
    let be = Backend::edu();
    let pid = be.child.id();
    let ram = MemfdRam::new(0x10_0000);
    let mut c = be.connect();
    enable(&mut c);
    let baseline = open_fds(pid);
    let stream = c.stream().try_clone().unwrap();
    let map = DmaMap {
        argsz: 32,
        flags: RW,
        offset: 0,
        address: 0x10_0000,
        size: 0x10_0000,
    };
    // 17 to 64 fds: the kernel truncates at our 16-fd control buffer
    // (MSG_CTRUNC), the server closes what it got and answers EINVAL.
    for (i, n) in [MAX_FDS_PER_MESSAGE + 1, 40, 64].into_iter().enumerate() {
        let fds = vec![ram.fd(); n];
        let id = 100 + i as u16;
        send_with_fds(&stream, id, Command::DmaMap, map.as_bytes(), &fds);
        assert_eq!(
            errno(c.wait_reply(id)),
            Some(libc::EINVAL as u32),
            "{n} fds"
        );
    }
    // Within the limit but more than the command takes: refused, all closed.
    for (id, n) in [(200u16, 2usize), (201, MAX_FDS_PER_MESSAGE)] {
        let fds = vec![ram.fd(); n];
        send_with_fds(&stream, id, Command::DmaMap, map.as_bytes(), &fds);
        assert_eq!(
            errno(c.wait_reply(id)),
            Some(libc::EINVAL as u32),
            "{n} fds"
        );
    }
    // A SET_IRQS for one vector with 16 eventfds.
    let e = EventFd::new(0).unwrap();
    let set = IrqSet {
        argsz: 20,
        flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
        index: 0,
        start: 0,
        count: 1,
    };
    send_with_fds(
        &stream,
        300,
        Command::DeviceSetIrqs,
        set.as_bytes(),
        &[e.as_raw_fd(); MAX_FDS_PER_MESSAGE],
    );
    assert_eq!(errno(c.wait_reply(300)), Some(libc::EINVAL as u32));
    assert_eq!(open_fds(pid), baseline, "the backend kept refused fds");
    // And a proper map still works.
    c.dma_map(0x10_0000, 0x10_0000, Some(ram.fd()), 0, RW)
        .unwrap();
    assert_eq!(open_fds(pid), baseline + 1);
    c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    assert_eq!(open_fds(pid), baseline);
}

// ---- interrupts -----------------------------------------------------------

#[test]
fn irq_ranges_are_checked_before_anything_is_sized_by_them() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    let e = EventFd::new(0).unwrap();
    let refused = |c: &mut Client, index, flags, start, count, fds: &[RawFd], bools: &[u8]| {
        let started = Instant::now();
        let r = errno(c.set_irqs(index, flags, start, count, fds, bools));
        assert!(started.elapsed() < Duration::from_secs(2), "slow refusal");
        assert_eq!(
            r,
            Some(libc::EINVAL as u32),
            "{index} {flags:#x} {start} {count}"
        );
    };
    let efd = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
    // Found by fuzzing: a 2^32-1 vector count with no fds once sized a 16 GiB
    // table before the range was checked.
    refused(&mut c, 0, efd, 0, u32::MAX, &[], &[]);
    refused(&mut c, 2, efd, 0, u32::MAX, &[], &[]);
    refused(&mut c, 1, efd, 1, u32::MAX, &[], &[]);
    // Past the vectors of the index (edu: 1 INTx, 1 MSI, no MSI-X).
    refused(&mut c, 1, efd, 0, 2, &[], &[]);
    refused(&mut c, 2, efd, 0, 1, &[e.as_raw_fd()], &[]);
    refused(&mut c, 5, efd, 0, 1, &[e.as_raw_fd()], &[]);
    // DATA_BOOL with fewer bytes than vectors.
    refused(
        &mut c,
        0,
        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
        0,
        1,
        &[],
        &[],
    );
    refused(
        &mut c,
        0,
        IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_TRIGGER,
        0,
        u32::MAX,
        &[],
        &[1; 64],
    );
    // The counts the server reports are what it accepts.
    for (index, want) in [(0u32, 1u32), (1, 1), (2, 0), (3, 1), (4, 1)] {
        assert_eq!(c.irq_info(index).unwrap().count, want, "index {index}");
    }
    c.set_irqs(1, efd, 0, 1, &[e.as_raw_fd()], &[]).unwrap();
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
}

#[test]
fn write_multi_batches_are_bounded() {
    let be = Backend::edu();
    let mut c = be.connect();
    enable(&mut c);
    let v = 1u32.to_le_bytes();
    let too_many: Vec<(u32, u64, &[u8])> = (0..=WRITE_MULTI_MAX)
        .map(|_| (BAR0, reg::LIVENESS, &v[..]))
        .collect();
    assert_eq!(
        errno(c.region_write_multi(&too_many, false)),
        Some(libc::EINVAL as u32)
    );
    // wr_cnt larger than the entries present.
    let body = WriteMultiHeader { wr_cnt: 3 }.as_bytes().to_vec();
    assert_eq!(
        errno(c.request_raw(Command::RegionWriteMulti as u16, &body)),
        Some(libc::EINVAL as u32)
    );
    assert_eq!(
        c.read_u32(BAR0, reg::LIVENESS).unwrap(),
        0,
        "nothing applied"
    );
    c.region_write_multi(&too_many[..WRITE_MULTI_MAX], false)
        .unwrap();
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !1);
}

// ---- in-process server for the DMA limits --------------------------------

/// BAR0 offset 0: start `value` device threads, each reading 8 bytes of guest
/// memory at 0x1000 * (1 + i); their results land in `results`.
struct DmaStorm {
    ctx: DeviceContext,
    results: Arc<Mutex<Vec<Result<(), String>>>>,
}

impl PciDevice for DmaStorm {
    fn bar_read(&mut self, _bar: BarIndex, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        for i in 0..u64::from(data[0]) {
            let memory = self.ctx.memory.clone();
            let results = self.results.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8];
                let r = memory
                    .read(0x1000 * (1 + i), &mut buf)
                    .map_err(|e: MemoryError| e.to_string());
                results.lock().unwrap().push(r);
            });
        }
    }
    fn reset(&mut self) {}
}

struct InProcess {
    /// First, so that it stops before the rest goes.
    _server: InProcessServer,
    client: Client,
    results: Arc<Mutex<Vec<Result<(), String>>>>,
}

fn in_process(config: ServerConfig, max_regions: usize) -> InProcess {
    let results = Arc::new(Mutex::new(Vec::new()));
    let r = results.clone();
    let description = PciDeviceDescription {
        bars: PciDeviceDescription::only_bar0(BarDef::memory32(0x1000, false)),
        ..PciDeviceDescription::default()
    };
    let function = PciFunction::new(description, GuestMemory::new(max_regions), move |ctx| {
        Box::new(DmaStorm { ctx, results: r })
    })
    .unwrap();
    let server = InProcessServer::start(Server::new(function, config));
    let client = Client::connect(&server.path).unwrap();
    InProcess {
        _server: server,
        client,
        results,
    }
}

#[test]
fn dma_regions_are_bounded_by_max_dma_maps() {
    let config = ServerConfig {
        max_dma_maps: 8,
        ..ServerConfig::default()
    };
    let mut p = in_process(config, 8);
    let c = &mut p.client;
    assert_eq!(c.server_caps().unwrap().max_dma_maps, 8);
    let ram = MemfdRam::new(0x10_0000);
    for i in 0..8u64 {
        let fd = (i % 2 == 0).then(|| ram.fd());
        c.dma_map(0x10_0000 * (i + 1), 0x1000, fd, 0, RW).unwrap();
    }
    let full = c.dma_map(0x100_0000, 0x1000, None, 0, RW).unwrap_err();
    assert_eq!(full.errno(), Some(libc::ENOSPC as u32));
    let full = c
        .dma_map(0x100_0000, 0x1000, Some(ram.fd()), 0, RW)
        .unwrap_err();
    assert_eq!(full.errno(), Some(libc::ENOSPC as u32));
    c.dma_unmap(0x10_0000, 0x1000, 0).unwrap();
    c.dma_map(0x100_0000, 0x1000, Some(ram.fd()), 0, RW)
        .unwrap();
}

#[test]
fn binaries_announce_their_dma_map_limit() {
    let be = Backend::edu();
    let c = be.connect();
    let caps = c.server_caps().unwrap();
    assert_eq!(caps.max_dma_maps, ServerConfig::default().max_dma_maps);
    assert_eq!(caps.max_msg_fds as usize, MAX_FDS_PER_MESSAGE);
    assert_eq!(
        caps.max_data_xfer_size,
        ServerConfig::default().max_data_xfer_size
    );
}

/// Reads messages until `n` server DMA_READ requests came; returns them.
fn collect_requests(c: &mut Client, n: usize) -> Vec<Reply> {
    c.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut requests = Vec::new();
    while requests.len() < n {
        let m = c.next_message().expect("a DMA request");
        if m.header.is_reply() {
            continue; // the reply to our REGION_WRITE
        }
        assert_eq!(m.header.command, Command::DmaRead as u16);
        requests.push(m);
    }
    requests
}

#[test]
fn server_initiated_requests_in_flight_are_bounded() {
    let mut p = in_process(ServerConfig::default(), 16);
    let results = p.results.clone();
    let c = &mut p.client;
    enable(c);
    c.dma_map(0x1000, 0x10_0000, None, 0, RW).unwrap();
    let storm = 100usize;
    let access = RegionAccess {
        offset: 0,
        region: BAR0,
        count: 1,
    };
    c.send(
        Command::RegionWrite,
        &[access.as_bytes(), &[storm as u8]],
        &[],
        true,
    )
    .unwrap();
    // Everything past the limit fails at once on the device side.
    wait_for(Duration::from_secs(10), || {
        (results.lock().unwrap().len() >= storm - MAX_PENDING_REQUESTS).then_some(())
    });
    let requests = collect_requests(c, MAX_PENDING_REQUESTS);
    {
        let r = results.lock().unwrap();
        assert_eq!(r.len(), storm - MAX_PENDING_REQUESTS);
        assert!(r.iter().all(|r| r
            .as_ref()
            .is_err_and(|e| e.contains("too many DMA requests in flight"))));
    }
    // No 65th request is on the wire.
    c.stream()
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(c.next_message().is_err(), "more requests than the limit");
    // Answered, the 64 complete.
    c.set_dma_target(Box::new(SharedRam::new(0, 0x20_0000)), DmaLayout::default());
    for req in &requests {
        c.answer(req).unwrap();
    }
    wait_for(Duration::from_secs(10), || {
        (results.lock().unwrap().len() == storm).then_some(())
    });
    let ok = results.lock().unwrap().iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, MAX_PENDING_REQUESTS);
}

#[test]
fn an_unanswered_dma_request_faults_the_device_after_the_timeout() {
    let config = ServerConfig {
        dma_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let mut p = in_process(config, 16);
    let results = p.results.clone();
    let c = &mut p.client;
    enable(c);
    c.dma_map(0x1000, 0x1000, None, 0, RW).unwrap();
    let access = RegionAccess {
        offset: 0,
        region: BAR0,
        count: 1,
    };
    let started = Instant::now();
    c.send(Command::RegionWrite, &[access.as_bytes(), &[1]], &[], true)
        .unwrap();
    let request = collect_requests(c, 1).remove(0);
    wait_for(Duration::from_secs(5), || {
        (!results.lock().unwrap().is_empty()).then_some(())
    });
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    let r = results.lock().unwrap()[0].clone();
    assert!(r.is_err_and(|e| e.contains("no reply")));
    // A late answer is dropped; the session goes on.
    c.set_dma_target(Box::new(SharedRam::new(0, 0x2000)), DmaLayout::default());
    c.answer(&request).unwrap();
    assert_eq!(c.read_u32(CONFIG, 0).unwrap(), 0);
}

// ---- one client at a time ---------------------------------------------------

#[test]
fn a_second_client_waits_until_the_first_leaves() {
    let be = Backend::edu();
    let mut first = be.connect();
    enable(&mut first);
    let mut second = UnixStream::connect(&be.socket).unwrap();
    let v = Version { major: 0, minor: 1 };
    let caps = b"{\"capabilities\":{}}\0";
    let header = Header {
        msg_id: 0,
        command: Command::Version as u16,
        size: (HEADER_SIZE + 4 + caps.len()) as u32,
        flags: FLAGS_TYPE_COMMAND,
        error: 0,
    };
    second.write_all(header.as_bytes()).unwrap();
    second.write_all(v.as_bytes()).unwrap();
    second.write_all(caps).unwrap();
    second
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert!(
        std::io::Read::read(&mut second, &mut buf).is_err(),
        "second client served while the first is connected"
    );
    // The first is undisturbed.
    assert_eq!(first.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    drop(first);
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    std::io::Read::read_exact(&mut second, &mut buf).unwrap();
    let reply = Header::read_from(&buf).unwrap();
    assert!(reply.is_reply() && !reply.is_error());
}
