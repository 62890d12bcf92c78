//! Migration over the socket, against the real `umdev-edu` binary: every arc
//! of the VFIO migration v2 state machine and every refused one, hostile
//! MIG_DATA streams, DMA logging down to the exact pages, and a device moved
//! mid-workload from one process to another.

mod edu_dma;

use umdev_testkit as common;

use common::{Backend, MemfdRam, SharedRam};
use umdev::memory::LogRange;
use umdev::migration::fsm::{ALL_STATES, MIGRATION_FLAGS};
use umdev::migration::MigrationState::{self, *};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::{migrate, Client};
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_CMD_IRQ, DMA_CMD_RUN, DMA_CMD_TO_RAM};

const BAR0: u32 = 0;
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
const RAM: u64 = 0x10_0000;
const RAM_SIZE: usize = 1 << 20;

fn errno<T>(r: Result<T, umdev::vfio_user::client::ClientError>) -> u32 {
    match r {
        Ok(_) => panic!("expected an error reply"),
        Err(e) => e
            .errno()
            .unwrap_or_else(|| panic!("not an error reply: {e}")),
    }
}

fn state(c: &mut Client) -> MigrationState {
    MigrationState::from_raw(c.migration_state().unwrap()).unwrap()
}

fn set(c: &mut Client, s: MigrationState) -> Result<(), umdev::vfio_user::client::ClientError> {
    c.set_migration_state(s as u32)
}

/// A device with RAM mapped and bus mastering on.
fn connected(be: &Backend, ram: &MemfdRam) -> Client {
    let mut c = be.connect();
    c.dma_map(RAM, RAM_SIZE as u64, Some(ram.fd()), 0, RW)
        .unwrap();
    c.enable_device().unwrap();
    c
}

/// edu's DMA from its buffer into RAM at `gpa`.
fn dma_to_ram(c: &mut Client, gpa: u64, len: u64) {
    edu_dma::run(c, DMA_BUF_ADDR, gpa, len, DMA_CMD_RUN | DMA_CMD_TO_RAM);
}

fn dma_from_ram(c: &mut Client, gpa: u64, len: u64) {
    edu_dma::run(c, gpa, DMA_BUF_ADDR, len, DMA_CMD_RUN);
}

#[test]
fn features_are_probed_and_checked_as_linux_does() {
    let be = Backend::edu();
    let mut c = be.connect();
    assert_eq!(c.migration_flags().unwrap(), MIGRATION_FLAGS);
    assert_eq!(state(&mut c), Running);
    assert!(c.probe_feature(FEATURE_MIGRATION, FEATURE_GET).unwrap());
    assert!(!c.probe_feature(FEATURE_MIGRATION, FEATURE_SET).unwrap());
    assert!(c
        .probe_feature(FEATURE_MIG_DEVICE_STATE, FEATURE_GET | FEATURE_SET)
        .unwrap());
    assert!(c
        .probe_feature(FEATURE_DMA_LOGGING_START, FEATURE_SET)
        .unwrap());
    assert!(c
        .probe_feature(FEATURE_DMA_LOGGING_REPORT, FEATURE_GET)
        .unwrap());
    assert!(c.mig_data_size().unwrap() > 4096);
    // GET and SET together without PROBE, unknown flag bits, unknown features,
    // neither GET nor SET, and no room for the answer.
    let both = FEATURE_MIG_DEVICE_STATE | FEATURE_GET | FEATURE_SET;
    assert_eq!(
        errno(c.device_feature(both, &[0; 8], 8)),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.device_feature(1 << 20 | FEATURE_MIGRATION | FEATURE_GET, &[], 8)),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.device_feature(0x77 | FEATURE_GET, &[], 8)),
        libc::ENOTTY as u32
    );
    assert_eq!(
        errno(c.device_feature(FEATURE_MIGRATION, &[], 8)),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.device_feature(FEATURE_MIGRATION | FEATURE_GET, &[], 4)),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.device_feature(FEATURE_MIG_DEVICE_STATE | FEATURE_SET, &[2, 0], 8)),
        libc::EINVAL as u32
    );
    // A payload shorter than the feature head.
    assert_eq!(
        errno(c.request(Command::DeviceFeature, &[&[8, 0, 0]], &[])),
        libc::EINVAL as u32
    );
    // The stream is still in step.
    assert_eq!(state(&mut c), Running);
}

/// A complete stream of this device's own state, to resume from.
fn own_stream(c: &mut Client) -> Vec<u8> {
    set(c, StopCopy).unwrap();
    let data = c.mig_data_read_all().unwrap();
    c.reset().unwrap();
    data
}

/// Puts the device in `s` from RUNNING (a RESUMING device has `stream`).
fn go_to(c: &mut Client, s: MigrationState, stream: &[u8]) {
    c.reset().unwrap();
    assert_eq!(state(c), Running);
    set(c, s).unwrap();
    if s == Resuming {
        c.mig_data_write_all(stream).unwrap();
    }
    assert_eq!(state(c), s);
}

#[test]
fn every_arc_is_taken_and_every_refused_one_changes_nothing() {
    let be = Backend::edu();
    let mut c = be.connect();
    let stream = own_stream(&mut c);
    let states = &ALL_STATES[1..];
    let mut taken = 0;
    for &from in states {
        for &to in states {
            go_to(&mut c, from, &stream);
            let blocked = from == StopCopy && matches!(to, PreCopy | PreCopyP2p);
            match set(&mut c, to) {
                Ok(()) => {
                    assert!(!blocked, "{from:?} -> {to:?} must be refused");
                    assert_eq!(state(&mut c), to, "{from:?} -> {to:?}");
                    taken += 1;
                }
                Err(e) => {
                    assert!(blocked, "{from:?} -> {to:?} refused: {e}");
                    assert_eq!(e.errno(), Some(libc::EINVAL as u32));
                    assert_eq!(state(&mut c), from, "a refused arc changes nothing");
                }
            }
        }
        // ERROR and numbers that are no state are never targets.
        go_to(&mut c, from, &stream);
        for bad in [Error as u32, 8, u32::MAX] {
            assert_eq!(errno(c.set_migration_state(bad)), libc::EINVAL as u32);
            assert_eq!(state(&mut c), from);
        }
    }
    assert_eq!(taken, states.len() * states.len() - 2);
}

#[test]
fn a_stopped_device_takes_no_bar_access_but_config_space_works() {
    let be = Backend::edu();
    let ram = MemfdRam::new(RAM_SIZE);
    let mut c = connected(&be, &ram);
    c.write_u32(BAR0, reg::LIVENESS, 0x55).unwrap();
    for s in [Stop, StopCopy, Resuming] {
        go_to(&mut c, s, &[]);
        assert_eq!(errno(c.read_u32(BAR0, reg::LIVENESS)), libc::EBUSY as u32);
        assert_eq!(
            errno(c.write_u32(BAR0, reg::LIVENESS, 1)),
            libc::EBUSY as u32
        );
        assert_eq!(
            c.region_read(CONFIG, 0, 2).unwrap(),
            0x1234u16.to_le_bytes()
        );
    }
    // Through RUNNING_P2P and PRE_COPY the device runs.
    for s in [RunningP2p, PreCopy, PreCopyP2p] {
        go_to(&mut c, s, &[]);
        c.enable_device().unwrap();
        c.write_u32(BAR0, reg::LIVENESS, 7).unwrap();
        assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !7);
    }
}

#[test]
fn hostile_and_truncated_streams_leave_the_destination_resuming_or_in_error() {
    let be = Backend::edu();
    let mut c = be.connect();
    let stream = own_stream(&mut c);
    // Data commands in the wrong states.
    assert_eq!(errno(c.mig_data_read(64)), libc::EINVAL as u32);
    assert_eq!(errno(c.mig_data_write(&stream[..8])), libc::EINVAL as u32);

    // Truncated: the arc to STOP fails, the device keeps RESUMING and takes
    // the rest.
    go_to(&mut c, Resuming, &stream[..stream.len() / 2]);
    assert_eq!(errno(set(&mut c, Stop)), libc::EINVAL as u32);
    assert_eq!(state(&mut c), Resuming);
    c.mig_data_write_all(&stream[stream.len() / 2..]).unwrap();
    set(&mut c, Running).unwrap();

    // Garbage: an error reply, the device in ERROR until reset.
    go_to(&mut c, Resuming, b"UMMIGST1");
    assert_eq!(errno(c.mig_data_write(&[0xff; 64])), libc::EINVAL as u32);
    assert_eq!(state(&mut c), Error);
    assert_eq!(errno(set(&mut c, Running)), libc::EINVAL as u32);
    c.reset().unwrap();
    assert_eq!(state(&mut c), Running);

    // A well-formed stream whose image is not an edu state: refused at STOP,
    // the device in ERROR, its registers as they were.
    c.write_u32(BAR0, reg::LIVENESS, 0x99).unwrap();
    let mut foreign = umdev::migration::StreamWriter::new();
    foreign.queue_image(b"UMDEVST1 but nothing after".to_vec());
    foreign.finish();
    set(&mut c, Resuming).unwrap();
    c.mig_data_write_all(&foreign.read(usize::MAX)).unwrap();
    assert_eq!(errno(set(&mut c, Stop)), libc::EINVAL as u32);
    assert_eq!(state(&mut c), Error);
    c.reset().unwrap();

    // MIG_DATA heads that lie about their size.
    set(&mut c, Resuming).unwrap();
    let head = MigData {
        argsz: 8,
        size: 100,
    };
    assert_eq!(
        errno(c.request(Command::MigDataWrite, &[head.as_bytes(), &[0; 10]], &[])),
        libc::EINVAL as u32
    );
    go_to(&mut c, StopCopy, &[]);
    let huge = MigData {
        argsz: u32::MAX,
        size: u32::MAX,
    };
    assert_eq!(
        errno(c.request(Command::MigDataRead, &[huge.as_bytes()], &[])),
        libc::E2BIG as u32
    );
    let small = MigData { argsz: 8, size: 64 };
    assert_eq!(
        errno(c.request(Command::MigDataRead, &[small.as_bytes()], &[])),
        libc::EINVAL as u32
    );
    assert_eq!(
        errno(c.request(Command::MigDataRead, &[&[1, 2]], &[])),
        libc::EINVAL as u32
    );
    // The stream is still whole after all that.
    assert_eq!(c.mig_data_read_all().unwrap(), stream);
    // A read past the end says size 0 in a reply padded to the size asked
    // for (libvfio-user's client takes nothing shorter).
    let ask = MigData {
        argsz: 8 + 64,
        size: 64,
    };
    let r = c
        .request(Command::MigDataRead, &[ask.as_bytes()], &[])
        .unwrap();
    assert_eq!(r.payload.len(), 8 + 64);
    let head = MigData::read_from(&r.payload).unwrap();
    assert_eq!((head.argsz, head.size), (8, 0));
}

fn bits(bitmap: &[u64]) -> Vec<u64> {
    let mut v = Vec::new();
    for (w, &word) in bitmap.iter().enumerate() {
        for b in 0..64 {
            if word & 1 << b != 0 {
                v.push(w as u64 * 64 + b);
            }
        }
    }
    v
}

#[test]
fn dma_logging_reports_exactly_the_pages_the_device_wrote() {
    let be = Backend::edu();
    let ram = MemfdRam::new(RAM_SIZE);
    let mut c = connected(&be, &ram);
    // Writes before logging starts are not reported.
    dma_to_ram(&mut c, RAM + 0x9000, 16);
    assert_eq!(
        errno(c.dma_logging_report(RAM, RAM_SIZE as u64, 4096)),
        libc::EINVAL as u32
    );
    let half = RAM_SIZE as u64 / 2;
    let ranges = [LogRange {
        iova: RAM,
        length: half,
    }];
    assert_eq!(c.dma_logging_start(4096, &ranges).unwrap(), 4096);
    assert_eq!(
        errno(c.dma_logging_start(4096, &ranges)),
        libc::EBUSY as u32
    );
    dma_to_ram(&mut c, RAM + 0x3000, 256);
    dma_to_ram(&mut c, RAM + 0x5ff0, 32); // straddles pages 5 and 6
    dma_to_ram(&mut c, RAM + half + 0x1000, 8); // outside the logged range
    dma_from_ram(&mut c, RAM + 0x7000, 64); // a read dirties nothing
    let bm = c.dma_logging_report(RAM, RAM_SIZE as u64, 4096).unwrap();
    assert_eq!(bits(&bm), vec![3, 5, 6]);
    // Reported pages are clear until written again.
    assert!(bits(&c.dma_logging_report(RAM, RAM_SIZE as u64, 4096).unwrap()).is_empty());
    dma_to_ram(&mut c, RAM + 0x11000, 4);
    assert_eq!(
        bits(&c.dma_logging_report(RAM, half, 0x10000).unwrap()),
        vec![1]
    );
    // Hostile reports: a page size that is no power of two, too small, an
    // empty or wrapping range, a bitmap larger than a message.
    for (iova, len, page) in [
        (RAM, 4096, 3 * 4096),
        (RAM, 4096, 512),
        (RAM, 0, 4096),
        (u64::MAX, 2, 4096),
    ] {
        assert_eq!(
            errno(c.dma_logging_report(iova, len, page)),
            libc::EINVAL as u32,
            "{iova:#x}+{len:#x}/{page}"
        );
    }
    let ask = DmaLoggingReport {
        iova: 0,
        length: 1 << 62,
        page_size: 4096,
    };
    assert!(c
        .device_feature(FEATURE_DMA_LOGGING_REPORT | FEATURE_GET, ask.as_bytes(), 64)
        .is_err());
    c.dma_logging_stop().unwrap();
    assert_eq!(errno(c.dma_logging_stop()), libc::EINVAL as u32);
    // Overlapping or unaligned ranges are refused.
    let overlapping = [
        LogRange {
            iova: RAM,
            length: 0x2000,
        },
        LogRange {
            iova: RAM + 0x1000,
            length: 0x1000,
        },
    ];
    assert_eq!(
        errno(c.dma_logging_start(4096, &overlapping)),
        libc::EINVAL as u32
    );
    let unaligned = [LogRange {
        iova: RAM + 1,
        length: 0x1000,
    }];
    assert_eq!(
        errno(c.dma_logging_start(4096, &unaligned)),
        libc::EINVAL as u32
    );
}

#[test]
fn dma_logging_sees_writes_by_message_too() {
    let be = Backend::edu();
    let mut c = be.connect();
    let ram = SharedRam::new(0x20_0000, 0x10000);
    c.set_dma_target(Box::new(ram.clone()), DmaLayout::Spec);
    c.dma_map(0x20_0000, 0x10000, None, 0, RW).unwrap();
    c.enable_device().unwrap();
    c.dma_logging_start(4096, &[]).unwrap();
    dma_to_ram(&mut c, 0x20_0000 + 0x2000, 64);
    assert_eq!(
        bits(&c.dma_logging_report(0x20_0000, 0x10000, 4096).unwrap()),
        vec![2]
    );
}

/// The workload: a factorial, a DMA RAM -> buffer, an interrupt; then the
/// buffer back to RAM elsewhere and another factorial.
fn first_half(c: &mut Client) {
    c.write_u32(BAR0, reg::LIVENESS, 0x1234_5678).unwrap();
    c.write_u32(BAR0, reg::FACTORIAL, 10).unwrap();
    dma_from_ram(c, RAM + 0x1000, 256);
    c.write_u32(BAR0, reg::IRQ_RAISE, 0x40).unwrap();
    // A DMA left running when the migration starts.
    edu_dma::program(c, DMA_BUF_ADDR, RAM + 0x4000, 128);
    edu_dma::start_posted(c, DMA_CMD_RUN | DMA_CMD_TO_RAM);
}

fn second_half(c: &mut Client) -> Vec<u32> {
    edu_dma::wait(c);
    let cmd = DMA_CMD_RUN | DMA_CMD_TO_RAM | DMA_CMD_IRQ;
    edu_dma::run(c, DMA_BUF_ADDR + 16, RAM + 0x3000, 128, cmd);
    c.write_u32(BAR0, reg::FACTORIAL, 7).unwrap();
    [reg::LIVENESS, reg::FACTORIAL, reg::STATUS, reg::IRQ_STATUS]
        .iter()
        .map(|&r| c.read_u32(BAR0, r).unwrap())
        .collect()
}

fn fill(ram: &mut MemfdRam) {
    for (i, b) in ram.bytes_mut()[0x1000..0x1100].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(13) ^ 0x3c;
    }
}

#[test]
fn edu_moves_mid_workload_to_another_process_and_finishes_the_same() {
    // The reference: the whole workload on one device.
    let be = Backend::edu();
    let mut ram = MemfdRam::new(RAM_SIZE);
    fill(&mut ram);
    let mut c = connected(&be, &ram);
    first_half(&mut c);
    let want_regs = second_half(&mut c);
    let want_ram = ram.bytes().to_vec();

    // The same, migrated between the halves.
    let (src_be, dst_be) = (Backend::edu(), Backend::edu());
    let mut src_ram = MemfdRam::new(RAM_SIZE);
    fill(&mut src_ram);
    let mut dst_ram = MemfdRam::new(RAM_SIZE);
    let mut src = connected(&src_be, &src_ram);
    let mut dst = connected(&dst_be, &dst_ram);
    first_half(&mut src);
    let report = migrate(
        &mut src,
        &mut dst,
        &[(RAM, RAM_SIZE as u64)],
        &mut |gpa, len| {
            let at = (gpa - RAM) as usize;
            let len = len as usize;
            dst_ram.bytes_mut()[at..at + len].copy_from_slice(&src_ram.bytes()[at..at + len]);
        },
    )
    .unwrap();
    assert!(
        report.precopy_bytes > 0 && report.stop_copy_bytes > 0,
        "{report:?}"
    );
    assert_eq!(state(&mut src), Stop);
    assert_eq!(state(&mut dst), Running);
    let regs = second_half(&mut dst);
    assert_eq!(regs, want_regs);
    assert_eq!(dst_ram.bytes(), &want_ram[..]);
}

/// QEMU 11.1's vfio-user-pci never asks about migration and migrates the VM
/// without the device's state: the backend says so when a guest driver
/// enables the device on such a client, once; not to a client that asked.
#[test]
fn a_client_that_never_asks_about_migration_is_warned_of_once() {
    const WARNING: &str = "has not asked about migration";
    let be = Backend::edu();
    let mut c = be.connect();
    c.enable_device().unwrap();
    c.enable_device().unwrap();
    c.read_u32(BAR0, reg::ID).unwrap();
    assert_eq!(be.log().matches(WARNING).count(), 1, "{}", be.log());
    drop(c);
    let be = Backend::edu();
    let mut c = be.connect();
    c.migration_flags().unwrap();
    c.enable_device().unwrap();
    c.read_u32(BAR0, reg::ID).unwrap();
    assert_eq!(be.log().matches(WARNING).count(), 0, "{}", be.log());
}
