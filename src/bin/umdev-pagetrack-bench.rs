//! `umdev-pagetrack-bench`: the cost of write tracking, each figure beside a
//! baseline measured in the same run.
//!
//! - scan: a sync over N unchanged tracked pages, against a plain memcmp of the
//!   same bytes;
//! - dirty bitmap: a sync over N tracked pages with 0.1 %, 1 % and 10 % of them
//!   dirty, against the full scan;
//! - userfaultfd: the latency of a guest's first write to a write-protected page
//!   (fault, resolution by the tracker's thread, wake-up), against an ordinary write;
//! - notifier: the cost per reported entry, against the empty sync.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use umdev::benchmark::{median, us};

use clap::Parser;
use umdev::memory::{DmaRegion, GuestMemory, MappedMemfd};
use umdev::pagetrack::{
    write_entries, DirtyBitmap, Gfn, PageTrackNotifier, PageTracker, Policy, SourceKind,
    UffdRegistration, PAGE_SIZE,
};

/// Measures the page-track engine.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Tracked pages.
    #[arg(long, default_value_t = 65536)]
    pages: usize,
    /// Repetitions per figure (the median is printed).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// A short run for CI smoke tests.
    #[arg(long)]
    quick: bool,
}

const GPA: u64 = 0x1_0000_0000;

/// Guest RAM: a memfd, mapped here as the VMM would map it.
struct Ram(MappedMemfd);

impl Ram {
    fn new(len: usize) -> Ram {
        Ram(MappedMemfd::new("bench-ram", len).expect("memfd"))
    }

    fn write_u64(&self, offset: usize, value: u64) {
        assert!(offset + 8 <= self.0.len() && offset.is_multiple_of(8));
        // SAFETY: an aligned 8-byte store inside our live mapping.
        unsafe { std::ptr::write_volatile(self.0.as_ptr().add(offset) as *mut u64, value) }
    }
}

fn guest_memory(ram: &Ram) -> GuestMemory {
    let memory = GuestMemory::new(16);
    let fd = OwnedFd::from(ram.0.file().try_clone().expect("dup memfd"));
    let region = DmaRegion::mapped(GPA, ram.0.len() as u64, fd, 0, true, true).expect("map region");
    memory
        .with_regions(|r| r.insert(region))
        .expect("insert region");
    memory
}

fn time(reps: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn track_all(tracker: &PageTracker, pages: usize) {
    for i in 0..pages as u64 {
        tracker.track(GPA / PAGE_SIZE + i).expect("track");
    }
}

struct Counting(AtomicU64);

/// Counts the 8-byte entries reported.
impl PageTrackNotifier for Counting {
    fn track_write(&self, gpa: u64, new: &[u8]) {
        self.0
            .fetch_add(write_entries(gpa, new).count() as u64, Ordering::Relaxed);
    }
    fn track_remove_region(&self, _gfn: Gfn, _nr: u64) {}
}

fn main() {
    umdev::cli::init_logging();
    let mut args = Args::parse();
    if args.quick {
        args.pages = args.pages.min(4096);
        args.reps = args.reps.min(3);
    }
    let pages = args.pages.max(1000);
    let reps = args.reps.max(1);
    let bytes = pages * PAGE_SIZE as usize;
    println!(
        "umdev-pagetrack-bench: {pages} pages ({} MiB), median of {reps}",
        bytes >> 20
    );
    println!(
        "{:<44} {:>14} {:>14} {:>8}",
        "figure", "value", "baseline", "ratio"
    );
    let row = |name: &str, v: String, b: String, ratio: f64| {
        let ratio = if ratio.is_finite() {
            format!("{ratio:.2}")
        } else {
            "-".into()
        };
        println!("{name:<44} {v:>14} {b:>14} {ratio:>8}");
    };

    // Scan against memcmp of the same bytes.
    let ram = Ram::new(bytes);
    let a = vec![0x5au8; bytes];
    let b = vec![0x5au8; bytes];
    let memcmp = time(reps, || {
        assert!(std::hint::black_box(&a) == std::hint::black_box(&b))
    });
    drop((a, b));
    let scan = PageTracker::with_source(guest_memory(&ram), SourceKind::Scan, Policy::Strict);
    let track_time = time(1, || track_all(&scan, pages));
    let scan_sync = time(reps, || {
        scan.sync();
    });
    let gbps = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    row(
        "scan sync, unchanged pages (GB/s vs memcmp)",
        format!("{:.2} GB/s", gbps(scan_sync)),
        format!("{:.2} GB/s", gbps(memcmp)),
        memcmp.as_secs_f64() / scan_sync.as_secs_f64(),
    );
    row(
        "track() per page (snapshot copy)",
        format!("{:.2} us", us(track_time) / pages as f64),
        "-".into(),
        f64::NAN,
    );

    // Notifier cost per entry: every entry of 1 % of the pages changes.
    let counting = Arc::new(Counting(AtomicU64::new(0)));
    let _registration = scan.register(counting.clone());
    let changed_pages = (pages / 100).max(1);
    let mut value = 0u64;
    let per_entry = median(
        (0..reps)
            .map(|_| {
                value += 1;
                for p in 0..changed_pages {
                    for e in 0..512 {
                        ram.write_u64(p * PAGE_SIZE as usize + e * 8, value);
                    }
                }
                let t = Instant::now();
                scan.sync();
                t.elapsed().saturating_sub(scan_sync) / (changed_pages as u32 * 512)
            })
            .collect(),
    );
    row(
        "notifier + diff cost per changed entry",
        format!("{:.1} ns", per_entry.as_secs_f64() * 1e9),
        format!("{:.1} ns/page", us(scan_sync) * 1e3 / pages as f64),
        f64::NAN,
    );
    drop(scan);

    // Dirty bitmap at 0.1 %, 1 %, 10 % dirty, against the full scan.
    // The bitmap, mapped shared as the VMM would.
    let bitmap_map = MappedMemfd::new(
        "bench-bitmap",
        DirtyBitmap::bytes_for(bytes as u64) as usize,
    )
    .expect("memfd");
    let bitmap_file = bitmap_map.file().try_clone().expect("dup");
    let bm = PageTracker::with_source(guest_memory(&ram), SourceKind::DirtyBitmap, Policy::Strict);
    bm.add_dirty_bitmap(DirtyBitmap::new(GPA, bytes as u64, bitmap_file, 0).expect("bitmap"))
        .expect("register bitmap");
    track_all(&bm, pages);
    for pct in [0.1f64, 1.0, 10.0] {
        let dirty = ((pages as f64 * pct / 100.0) as usize).max(1);
        let stride = pages / dirty;
        let d = median(
            (0..reps)
                .map(|r| {
                    for i in 0..dirty {
                        let page = i * stride;
                        ram.write_u64(page * PAGE_SIZE as usize, r as u64 + 1);
                        let word = bitmap_map.as_ptr() as *const AtomicU64;
                        // SAFETY: word `page / 64` lies inside the bitmap mapping.
                        unsafe { &*word.add(page / 64) }
                            .fetch_or(1 << (page % 64), Ordering::Release);
                    }
                    let t = Instant::now();
                    bm.sync();
                    t.elapsed()
                })
                .collect(),
        );
        row(
            &format!("bitmap sync, {pct}% dirty (vs full scan)"),
            format!("{:.1} us", us(d)),
            format!("{:.1} us", us(scan_sync)),
            scan_sync.as_secs_f64() / d.as_secs_f64(),
        );
    }
    drop(bm);

    // userfaultfd: first-write latency to a protected page.
    match uffd_latency(&ram, reps, pages.min(2000)) {
        Ok((protected, plain)) => row(
            "uffd first write to a protected page",
            format!("{:.1} us", us(protected)),
            format!("{:.3} us", us(plain)),
            protected.as_secs_f64() / plain.as_secs_f64().max(1e-9),
        ),
        Err(e) => println!("uffd first write: not measured ({e})"),
    }
}

/// Median latency of a write to a write-protected tracked page, and of a write to
/// the same page once it is writable.
fn uffd_latency(ram: &Ram, reps: usize, pages: usize) -> Result<(Duration, Duration), String> {
    let uffd = umdev::pagetrack::register_write_protect(ram.0.as_ptr() as u64, ram.0.len() as u64)
        .map_err(|e| format!("userfaultfd: {e}"))?;
    let tracker =
        PageTracker::with_source(guest_memory(ram), SourceKind::Userfault, Policy::Strict);
    tracker
        .add_uffd(
            UffdRegistration::new(GPA, ram.0.len() as u64, ram.0.as_ptr() as u64, uffd)
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
    // No session here: a thread of our own serves the fault reader, as a
    // session's event loop would.
    let stop = vmm_sys_util::eventfd::EventFd::new(0).map_err(|e| e.to_string())?;
    let stop_loop = stop.try_clone().map_err(|e| e.to_string())?;
    let sets = vec![tracker.event_set().clone()];
    let server = std::thread::spawn(move || umdev::event::serve(sets, &stop_loop));
    let mut first = Vec::new();
    let mut second = Vec::new();
    for _ in 0..reps {
        track_all(&tracker, pages);
        for p in 0..pages {
            let off = p * PAGE_SIZE as usize + 64;
            let t = Instant::now();
            ram.write_u64(off, t.elapsed().as_nanos() as u64 | 1);
            first.push(t.elapsed());
            let t = Instant::now();
            ram.write_u64(off + 8, 2);
            second.push(t.elapsed());
        }
        for p in 0..pages as u64 {
            let _ = tracker.untrack(GPA / PAGE_SIZE + p);
        }
    }
    let _ = stop.write(1);
    let _ = server.join();
    Ok((median(first), median(second)))
}
