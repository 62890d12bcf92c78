//! Page tracking through a real backend: a device whose registers track, untrack
//! and sync gfns, served on a UNIX socket; our client plays the VMM, writing guest
//! memory (a memfd) and, per source, marking a shared dirty bitmap or letting its
//! userfaultfd take write faults.

use umdev_testkit as common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use common::{InProcessServer, MemfdRam};
use umdev::memory::GuestMemory;
use umdev::pagetrack::{
    DirtyBitmap, Gfn, NotifierRegistration, PageTrackNotifier, PageTracker, Policy, SourceKind,
};
use umdev::pci::{
    BarDef, BarIndex, DeviceContext, PciDevice, PciDeviceDescription, PciFunction, PciIds,
};
use umdev::vfio_user::errno::Errno;
use umdev::vfio_user::wire::*;
use umdev::vfio_user::{Client, Server, ServerConfig};

const REG_TRACK: u64 = 0x00;
const REG_UNTRACK: u64 = 0x08;
const REG_SYNC: u64 = 0x10;
const REG_ERROR: u64 = 0x18;
const RAM_GPA: u64 = 0x10_0000;
const RAM_SIZE: usize = 1 << 20;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// gpa and the new bytes (their length is the write's).
    Write(u64, Vec<u8>),
    Remove(Gfn, u64),
}

fn w(gpa: u64, new: impl AsRef<[u8]>) -> Event {
    Event::Write(gpa, new.as_ref().to_vec())
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl PageTrackNotifier for Recorder {
    fn track_write(&self, gpa: u64, new: &[u8]) {
        self.0.lock().unwrap().push(Event::Write(gpa, new.to_vec()));
    }
    fn track_remove_region(&self, gfn: Gfn, nr_pages: u64) {
        self.0.lock().unwrap().push(Event::Remove(gfn, nr_pages));
    }
}

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// BAR0: write a gfn to TRACK/UNTRACK, anything to SYNC; ERROR reads the last errno.
struct TrackDevice {
    tracker: PageTracker,
    error: u32,
    /// The recorder's registration, for as long as the device lives.
    _registration: NotifierRegistration,
}

impl PciDevice for TrackDevice {
    fn bar_read(&mut self, _bar: BarIndex, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == REG_ERROR {
            data[..4].copy_from_slice(&self.error.to_le_bytes());
        }
    }
    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8]) {
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let r = match offset {
            REG_TRACK => self.tracker.track(v),
            REG_UNTRACK => self.tracker.untrack(v),
            REG_SYNC => {
                self.tracker.sync();
                Ok(())
            }
            _ => Ok(()),
        };
        self.error = r.err().map_or(0, |e| e.errno() as u32);
    }
    fn reset(&mut self) {
        self.error = 0;
    }
}

struct Rig {
    /// First, so that it stops before the memory and the uffd go.
    _server: InProcessServer,
    client: Client,
    ram: MemfdRam,
    events: Arc<Recorder>,
    tracker: PageTracker,
    source: SourceKind,
    /// Shared dirty bitmap (dirty-bitmap source).
    bitmap: Option<MemfdRam>,
    _uffd: Option<OwnedFd>,
}

fn start(source: SourceKind, policy: Policy) -> Rig {
    let events = Arc::new(Recorder::default());
    let description = PciDeviceDescription {
        ids: PciIds {
            vendor_id: 0x1b36,
            device_id: 0x00fe,
            ..Default::default()
        },
        bars: PciDeviceDescription::only_bar0(BarDef::memory32(0x1000, false)),
        page_track_source: source,
        page_track_policy: policy,
        ..Default::default()
    };
    let recorder = events.clone();
    let mut tracker_out = None;
    let function = PciFunction::new(description, GuestMemory::new(64), |ctx: DeviceContext| {
        let registration = ctx.page_tracker.register(recorder);
        tracker_out = Some(ctx.page_tracker.clone());
        Box::new(TrackDevice {
            tracker: ctx.page_tracker,
            error: 0,
            _registration: registration,
        })
    })
    .unwrap();
    let server = InProcessServer::start(Server::new(function, ServerConfig::default()));
    let wanted: &[&str] = match source {
        SourceKind::DirtyBitmap => &[CAP_UMDEV_DIRTY_BITMAP],
        SourceKind::Userfault => &[CAP_UMDEV_UFFD_WP],
        SourceKind::Scan => &[],
    };
    let (mut client, agreed) = Client::connect_with_extensions(&server.path, wanted).unwrap();
    assert_eq!(agreed.len(), wanted.len(), "extension agreed");
    let ram = MemfdRam::new(RAM_SIZE);
    client
        .dma_map(RAM_GPA, RAM_SIZE as u64, Some(ram.fd()), 0, RW)
        .unwrap();
    client
        .region_write(PCI_CONFIG_REGION_INDEX, 4, &2u16.to_le_bytes())
        .unwrap();
    let mut bitmap = None;
    let mut uffd = None;
    match source {
        SourceKind::DirtyBitmap => {
            let b = MemfdRam::new(4096);
            client
                .share_dirty_bitmap(RAM_GPA, RAM_SIZE as u64, b.fd(), 0)
                .unwrap();
            bitmap = Some(b);
        }
        SourceKind::Userfault => {
            let fd = umdev::pagetrack::register_write_protect(
                ram.bytes().as_ptr() as u64,
                RAM_SIZE as u64,
            )
            .expect("userfaultfd in write-protect mode");
            client
                .share_uffd(
                    RAM_GPA,
                    RAM_SIZE as u64,
                    ram.bytes().as_ptr() as u64,
                    fd.as_raw_fd(),
                )
                .unwrap();
            uffd = Some(fd);
        }
        SourceKind::Scan => {}
    }
    Rig {
        _server: server,
        client,
        ram,
        events,
        tracker: tracker_out.unwrap(),
        source,
        bitmap,
        _uffd: uffd,
    }
}

impl Rig {
    fn gfn(&self, page: u64) -> Gfn {
        RAM_GPA / 4096 + page
    }
    fn track(&mut self, gfn: Gfn) -> u32 {
        self.client.write_u64(0, REG_TRACK, gfn).unwrap();
        self.client.read_u32(0, REG_ERROR).unwrap()
    }
    fn untrack(&mut self, gfn: Gfn) -> u32 {
        self.client.write_u64(0, REG_UNTRACK, gfn).unwrap();
        self.client.read_u32(0, REG_ERROR).unwrap()
    }
    fn sync(&mut self) {
        self.client.write_u64(0, REG_SYNC, 0).unwrap();
    }
    /// The guest writes `bytes` at `offset` of its RAM; the VMM marks the page
    /// dirty after the write has landed.
    fn guest_write(&mut self, offset: usize, bytes: &[u8]) {
        self.ram.bytes_mut()[offset..offset + bytes.len()].copy_from_slice(bytes);
        if let Some(b) = &mut self.bitmap {
            let page = offset / 4096;
            let word = &mut b.bytes_mut()[page / 64 * 8..page / 64 * 8 + 8];
            let v = u64::from_le_bytes(word.try_into().unwrap()) | 1 << (page % 64);
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

const SOURCES: [SourceKind; 3] = [
    SourceKind::Scan,
    SourceKind::DirtyBitmap,
    SourceKind::Userfault,
];

/// One write per entry per interval, pages in ascending order: every source must
/// report the same sequence.
fn workload(rig: &mut Rig) -> Vec<Event> {
    for page in [0, 1, 5] {
        assert_eq!(rig.track(rig.gfn(page)), 0);
    }
    let mut all = Vec::new();
    rig.guest_write(0x10, &0x1111_2222_3333_4444u64.to_le_bytes());
    rig.guest_write(0x1000 + 0x20, &0xaaaa_bbbbu32.to_le_bytes());
    rig.guest_write(0x1000 + 0x800, &[7; 16]);
    rig.guest_write(0x3000, &[9; 8]); // untracked page
    rig.guest_write(0x5000 + 0xff8, &u64::MAX.to_le_bytes());
    rig.sync();
    all.extend(rig.events.take());
    rig.guest_write(0x1000 + 0x24, &0xcccc_ddddu32.to_le_bytes());
    rig.sync();
    all.extend(rig.events.take());
    rig.sync();
    all.extend(rig.events.take());
    all
}

#[test]
fn every_source_reports_the_same_writes() {
    let expected = vec![
        w(RAM_GPA + 0x10, 0x1111_2222_3333_4444u64.to_le_bytes()),
        w(RAM_GPA + 0x1020, 0x0000_0000_aaaa_bbbbu64.to_le_bytes()),
        w(RAM_GPA + 0x1800, [7; 8]),
        w(RAM_GPA + 0x1808, [7; 8]),
        w(RAM_GPA + 0x5ff8, u64::MAX.to_le_bytes()),
        // The high half of the same entry, in the next interval: the whole entry.
        w(RAM_GPA + 0x1020, 0xcccc_dddd_aaaa_bbbbu64.to_le_bytes()),
    ];
    for (source, policy) in [
        (SourceKind::Scan, Policy::Strict),
        (SourceKind::DirtyBitmap, Policy::Strict),
        (SourceKind::Userfault, Policy::Strict),
        // Out of sync after the first fault: compared at sync points instead.
        (SourceKind::Userfault, Policy::OutOfSync { threshold: 1 }),
    ] {
        let mut rig = start(source, policy);
        assert_eq!(workload(&mut rig), expected, "source {source:?} {policy:?}");
        let c = rig.tracker.counters();
        assert_eq!(c.pages_tracked, 3);
        assert_eq!(c.source, Some(source));
        if source == SourceKind::Userfault {
            assert!(c.faults >= 3, "uffd faults {}", c.faults);
        }
        let _ = policy;
        if source == SourceKind::DirtyBitmap {
            // Hints narrow the comparison: a scan compares 3 pages at each of 3 syncs.
            assert!(
                c.pages_compared < 9,
                "{source:?} compared {}",
                c.pages_compared
            );
        }
    }
}

#[test]
fn halves_of_one_entry_merge_within_an_interval() {
    for source in SOURCES {
        let mut rig = start(source, Policy::OutOfSync { threshold: 1 });
        let g = rig.gfn(2);
        assert_eq!(rig.track(g), 0);
        rig.guest_write(0x2000 + 0x40, &0x5555_6666u32.to_le_bytes());
        rig.guest_write(0x2000 + 0x44, &0x7777_8888u32.to_le_bytes());
        rig.sync();
        assert_eq!(
            rig.events.take(),
            [w(RAM_GPA + 0x2040, 0x7777_8888_5555_6666u64.to_le_bytes())],
            "{source:?}"
        );
    }
}

#[test]
fn strict_uffd_reports_at_the_fault() {
    let mut rig = start(SourceKind::Userfault, Policy::Strict);
    let g = rig.gfn(3);
    assert_eq!(rig.track(g), 0);
    let mut at_fault = 0;
    for i in 1..=5u64 {
        rig.guest_write(0x3000 + 0x100, &i.to_le_bytes());
        // Reported without a sync: the fault thread compares once the write
        // lands. On a loaded machine the write may land after the handler's
        // spin gave up; then the page stays writable and dirty and the next
        // sync point reports it (documented in pagetrack): never lost.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let ev = loop {
            let ev = rig.events.take();
            if !ev.is_empty() {
                at_fault += 1;
                break ev;
            }
            if std::time::Instant::now() > deadline {
                rig.sync();
                break rig.events.take();
            }
            std::thread::yield_now();
        };
        assert_eq!(ev, [w(RAM_GPA + 0x3100, i.to_le_bytes())], "write {i}");
    }
    assert!(at_fault >= 1, "no write was reported at its fault");
    assert!(rig.tracker.counters().faults >= 5);
    rig.sync();
    assert!(rig.events.take().is_empty());
}

#[test]
fn a_write_racing_syncs_is_never_lost() {
    for source in SOURCES {
        let mut rig = start(source, Policy::default());
        let g = rig.gfn(4);
        assert_eq!(rig.track(g), 0);
        let ptr = rig.ram.bytes().as_ptr() as usize + 0x4000;
        let bitmap_ptr = rig.bitmap.as_ref().map(|b| b.bytes().as_ptr() as usize);
        let writer = std::thread::spawn(move || {
            for i in 1..=20_000u64 {
                // SAFETY: an aligned 8-byte store into our live memfd mapping (the
                // Rig outlives this thread: it is joined below).
                unsafe { std::ptr::write_volatile(ptr as *mut u64, i) };
                if let Some(b) = bitmap_ptr {
                    // SAFETY: word 0 of the live bitmap mapping, aligned.
                    let w = unsafe { &*(b as *const std::sync::atomic::AtomicU64) };
                    w.fetch_or(1 << 4, std::sync::atomic::Ordering::Release);
                }
            }
        });
        while !writer.is_finished() {
            rig.sync();
        }
        writer.join().unwrap();
        rig.sync();
        let last = rig.events.take().into_iter().rev().find_map(|e| match e {
            Event::Write(gpa, v) if gpa == RAM_GPA + 0x4000 => {
                Some(u64::from_le_bytes(v.try_into().unwrap()))
            }
            _ => None,
        });
        assert_eq!(
            last,
            Some(20_000),
            "{source:?}: the final value was reported; {:?}",
            rig.tracker.counters()
        );
    }
}

#[test]
fn refcounts_across_two_users() {
    let mut rig = start(SourceKind::Scan, Policy::default());
    let g = rig.gfn(6);
    assert_eq!(rig.track(g), 0);
    assert_eq!(rig.track(g), 0);
    assert_eq!(rig.tracker.refcount(g), 2);
    assert_eq!(rig.untrack(g), 0);
    rig.guest_write(0x6000, &[1; 8]);
    rig.sync();
    assert_eq!(
        rig.events.take().len(),
        1,
        "still tracked by the other user"
    );
    assert_eq!(rig.untrack(g), 0);
    rig.guest_write(0x6000, &[2; 8]);
    rig.sync();
    assert!(rig.events.take().is_empty(), "untracked");
    assert_eq!(rig.untrack(g), libc::ENOENT as u32, "underflow is an error");
}

#[test]
fn unmap_under_tracked_pages_removes_the_region_once() {
    for source in SOURCES {
        let mut rig = start(source, Policy::default());
        for page in [0, 7, 8] {
            assert_eq!(rig.track(rig.gfn(page)), 0);
        }
        rig.client.dma_unmap(RAM_GPA, RAM_SIZE as u64, 0).unwrap();
        assert_eq!(
            rig.events.take(),
            [Event::Remove(RAM_GPA / 4096, RAM_SIZE as u64 / 4096)],
            "{source:?}"
        );
        assert_eq!(rig.tracker.counters().pages_tracked, 0);
        // The same gfns mapped again start untracked.
        rig.client
            .dma_map(RAM_GPA, RAM_SIZE as u64, Some(rig.ram.fd()), 0, RW)
            .unwrap();
        assert!(!rig.tracker.is_tracked(rig.gfn(7)));
        rig.guest_write(0x7000, &[3; 8]);
        rig.sync();
        assert!(rig.events.take().is_empty());
        assert_eq!(rig.untrack(rig.gfn(7)), libc::ENOENT as u32);
    }
}

#[test]
fn hostile_tracking_requests_are_refused() {
    let mut rig = start(SourceKind::DirtyBitmap, Policy::default());
    // Outside all DMA regions, and a gfn whose address overflows.
    assert_eq!(rig.track(0x9_9999), libc::ENOENT as u32);
    assert_eq!(rig.track(u64::MAX), libc::ENOENT as u32);
    // A bitmap too small for its region.
    let small = MemfdRam::new(8);
    let err = rig
        .client
        .share_dirty_bitmap(RAM_GPA, RAM_SIZE as u64, small.fd(), 0)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    // A bitmap for memory that is not mapped.
    let b = MemfdRam::new(4096);
    let err = rig
        .client
        .share_dirty_bitmap(0x4000_0000, 0x1000, b.fd(), 0)
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    // This device tracks by bitmap: a uffd is not agreed, so it is an unknown command.
    let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let err = rig
        .client
        .share_uffd(RAM_GPA, RAM_SIZE as u64, 0x1000, e.as_raw_fd())
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOSYS as u32));

    let mut rig = start(SourceKind::Userfault, Policy::default());
    // A uffd of the wrong kind: an eventfd.
    let err = rig
        .client
        .share_uffd(RAM_GPA, RAM_SIZE as u64, 0x1000, e.as_raw_fd())
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL as u32));
    // A tracked-page limit holds.
    rig.tracker.set_max_pages(2);
    assert_eq!(rig.track(rig.gfn(0)), 0);
    assert_eq!(rig.track(rig.gfn(1)), 0);
    assert_eq!(rig.track(rig.gfn(2)), libc::ENOSPC as u32);
    assert_eq!(rig.source, SourceKind::Userfault);
    let _ = DirtyBitmap::bytes_for(RAM_SIZE as u64);
}

#[test]
fn reset_drops_all_tracking() {
    let mut rig = start(SourceKind::Scan, Policy::default());
    assert_eq!(rig.track(rig.gfn(1)), 0);
    rig.client.reset().unwrap();
    assert_eq!(rig.tracker.counters().pages_tracked, 0);
}

// ---- #18: the KVM API's removal and write semantics, per source -------------

const RAM2_GPA: u64 = 0x80_0000;
const RAM2_SIZE: usize = 64 << 10;

/// Waits up to 5 s for `n` events.
fn wait_events(rig: &Rig, n: usize) -> Vec<Event> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let len = rig.events.0.lock().unwrap().len();
        if len >= n || std::time::Instant::now() > deadline {
            return rig.events.take();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// KVM calls track_remove_region for every memslot deleted, to every notifier,
/// with tracked pages there or not: so does umdev for DMA_UNMAP of a region,
/// unmap-all and the client going away; tracked pages there are gone after.
#[test]
fn every_removal_of_guest_memory_reaches_the_notifiers() {
    let mut rig = start(SourceKind::Scan, Policy::default());
    let ram2 = MemfdRam::new(RAM2_SIZE);
    let map2 = |rig: &mut Rig| {
        rig.client
            .dma_map(RAM2_GPA, RAM2_SIZE as u64, Some(ram2.fd()), 0, RW)
            .unwrap()
    };
    let remove2 = Event::Remove(RAM2_GPA / 4096, RAM2_SIZE as u64 / 4096);
    let remove1 = Event::Remove(RAM_GPA / 4096, RAM_SIZE as u64 / 4096);
    // DMA_UNMAP of a region where nothing is tracked.
    map2(&mut rig);
    rig.client.dma_unmap(RAM2_GPA, RAM2_SIZE as u64, 0).unwrap();
    assert_eq!(rig.events.take(), std::slice::from_ref(&remove2));
    // Unmap-all: each region, tracked pages in one of them.
    map2(&mut rig);
    assert_eq!(rig.track(rig.gfn(3)), 0);
    assert_eq!(rig.track(RAM2_GPA / 4096 + 1), 0);
    rig.client.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    let mut got = rig.events.take();
    got.sort_by_key(|e| format!("{e:?}"));
    let mut want = vec![remove1.clone(), remove2.clone()];
    want.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(got, want);
    assert_eq!(rig.tracker.counters().pages_tracked, 0);
    // The client goes away with two regions mapped.
    rig.client
        .dma_map(RAM_GPA, RAM_SIZE as u64, Some(rig.ram.fd()), 0, RW)
        .unwrap();
    map2(&mut rig);
    assert_eq!(rig.track(rig.gfn(5)), 0);
    let Rig {
        _server,
        client,
        ram: _ram,
        events,
        tracker,
        ..
    } = rig;
    drop(client);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while events.0.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut got = events.take();
    got.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(got, want, "client loss");
    assert_eq!(tracker.counters().pages_tracked, 0);
}

/// Scan and dirty bitmap compare at sync points: they see the net change of
/// each 8-byte entry since the last one. A->B->A and a same-value rewrite are
/// invisible; A->B is one write of the entry's 8 new bytes.
#[test]
fn scan_and_bitmap_see_the_net_change_per_entry() {
    for source in [SourceKind::Scan, SourceKind::DirtyBitmap] {
        let mut rig = start(source, Policy::Strict);
        assert_eq!(rig.track(rig.gfn(2)), 0, "{source:?}");
        let (a, b) = (0xaaaa_u64.to_le_bytes(), 0xbbbb_u64.to_le_bytes());
        rig.guest_write(0x2100, &a);
        rig.sync();
        assert_eq!(rig.events.take(), [w(RAM_GPA + 0x2100, a)], "{source:?}");
        rig.guest_write(0x2100, &b);
        rig.guest_write(0x2100, &a);
        rig.sync();
        assert_eq!(rig.events.take(), [], "{source:?}: A->B->A is invisible");
        rig.guest_write(0x2100, &a);
        rig.sync();
        assert_eq!(rig.events.take(), [], "{source:?}: a rewrite is invisible");
        // Two bytes of the entry: reported as the whole entry, 8 bytes.
        rig.guest_write(0x2102, &[0x11, 0x22]);
        rig.sync();
        let mut e = a;
        e[2..4].copy_from_slice(&[0x11, 0x22]);
        assert_eq!(rig.events.take(), [w(RAM_GPA + 0x2100, e)], "{source:?}");
    }
}

/// The userfaultfd source in strict mode reports every write fault: a write to
/// a protected page faults, its report comes without a sync, and the page is
/// protected again before the report. A->B->A is two writes, a same-value
/// rewrite one (the entry as it is: the VMM's uffd gives exact fault
/// addresses). Writes that land while the page is writable for a fault just
/// resolved merge into that fault's report, so each write here waits for the
/// report of the one before, as a vCPU that traps on each would.
#[test]
fn strict_uffd_reports_every_write_fault() {
    let mut rig = start(SourceKind::Userfault, Policy::Strict);
    assert_eq!(rig.track(rig.gfn(3)), 0);
    let (a, b) = (0xaaaa_u64.to_le_bytes(), 0xbbbb_u64.to_le_bytes());
    let faults = rig.tracker.counters().faults;
    for (i, v) in [a, b, a, a].into_iter().enumerate() {
        rig.guest_write(0x3100, &v);
        assert_eq!(
            wait_events(&rig, 1),
            [w(RAM_GPA + 0x3100, v)],
            "write {i} reported at its fault"
        );
        assert_eq!(rig.tracker.counters().faults, faults + i as u64 + 1);
    }
    rig.sync();
    assert_eq!(rig.events.take(), [], "nothing left for the sync point");
}
