//! umdev guest-side test driver.
//!
//! Runs inside a tiny Linux guest (as PID 1, or exec'd by the initramfs's
//! `/init` script) and drives a QEMU "edu"-compatible PCI device entirely from
//! userspace: sysfs `enable`, `config` and `resource0`, DMA buffers from
//! mlock'd pages whose physical addresses come from `/proc/self/pagemap`.
//!
//! Output protocol (one line each, on stdout = the serial console):
//!   `INFO <text>`            informative, differs between runs (addresses, BDF)
//!   `PASS <name> <value>`    a test passed; `<value>` is deterministic, so the
//!                            PASS/FAIL lines of two devices can be diffed
//!   `FAIL <name> <detail>`   a test failed
//!   `DONE passed=<n> failed=<m>`  the last line; absent if the guest died
//! Then the guest powers off (when this program is PID 1).
//!
//! Settings come from the environment (the kernel passes unknown `key=value`
//! command-line parameters to init as environment variables):
//!   `UMDEV_DEV=vvvv:dddd`   PCI vendor:device to look for (default 1234:11e8)
//!                           (1234:5547, the umdev vGPU: its tests, src/vgpu.rs)
//!   `UMDEV_TESTS=a,b*,...`  run only these tests (`b*`: names starting with b);
//!                           device set-up (enable, bus master) always runs
//!   `UMDEV_ROUNDS=n`        rounds of the irq-then-DMA test (default 8)
//!   `UMDEV_GONE_TIMEOUT=s`  how long `device_gone_all_ones` waits (default 60)
//!   `UMDEV_GONE_PAUSE_MS=n` its pause between checks (default 500)
//!   `UMDEV_NO_POWEROFF=1`   do not power off at the end
//!   `UMDEV_MODE=fb`         no PCI device tests: draw a known picture on a
//!                           virtio-gpu's /dev/fb0 instead (src/fb.rs)
//!
//! `device_gone_all_ones` runs only when UMDEV_TESTS names it exactly: it
//! exercises the device, prints `INFO device_gone: idle ...; kill the backend
//! now`, then reads the ID register once per pause and passes when the BAR
//! reads all-ones (the backend was killed and QEMU kept running).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, AtomicPtr, Ordering};
use std::time::{Duration, Instant};

mod fb;
mod vgpu;

const PAGE: usize = 4096;

/// edu registers (BAR0).
mod reg {
    pub const ID: usize = 0x00;
    pub const LIVENESS: usize = 0x04;
    pub const FACTORIAL: usize = 0x08;
    pub const STATUS: usize = 0x20;
    pub const IRQ_STATUS: usize = 0x24;
    pub const IRQ_RAISE: usize = 0x60;
    pub const IRQ_ACK: usize = 0x64;
    pub const DMA_SRC: usize = 0x80;
    pub const DMA_DST: usize = 0x88;
    pub const DMA_CNT: usize = 0x90;
    pub const DMA_CMD: usize = 0x98;
}
const STATUS_COMPUTING: u32 = 0x01;
const STATUS_IRQFACT: u32 = 0x80;
const IRQ_FACT: u32 = 0x001;
const IRQ_DMA: u32 = 0x100;
const DMA_RUN: u64 = 0x1;
const DMA_TO_RAM: u64 = 0x2;
const DMA_IRQ: u64 = 0x4;
/// The device's DMA buffer, as seen in the DMA address registers.
const DEV_BUF: u64 = 0x40000;
const DEV_BUF_SIZE: usize = 4096;
/// edu's default DMA mask is 28 bits: buffers must lie below 256 MiB.
const DMA_LIMIT: u64 = 1 << 28;

// ------------------------------------------------------------------ output --

struct Report {
    passed: u32,
    failed: u32,
    filter: Option<Vec<String>>,
    /// Set once the device is gone: later tests are not run.
    stopped: bool,
}

impl Report {
    fn wants(&self, name: &str) -> bool {
        match &self.filter {
            None => true,
            Some(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == p,
            }),
        }
    }

    fn result(&mut self, name: &str, r: Result<String, String>) {
        match r {
            Ok(v) => {
                self.passed += 1;
                emit(&format!("PASS {name} {v}"));
            }
            Err(e) => {
                self.failed += 1;
                emit(&format!("FAIL {name} {e}"));
            }
        }
    }

    /// Runs `f` as test `name` only if UMDEV_TESTS names it exactly (tests
    /// that need the harness's help, such as killing the backend).
    fn run_explicit(&mut self, name: &str, f: impl FnOnce() -> Result<String, String>) {
        let named = self
            .filter
            .as_ref()
            .is_some_and(|patterns| patterns.iter().any(|p| p == name));
        if named {
            self.run(name, f);
        }
    }

    /// Runs `f` as test `name` if selected.
    fn run(&mut self, name: &str, f: impl FnOnce() -> Result<String, String>) {
        if self.stopped || !self.wants(name) {
            return;
        }
        let r = f();
        let failed = r.is_err();
        self.result(name, r);
        if failed && device_gone() {
            self.result(
                "device_gone",
                Err("BAR0 reads all-ones; remaining tests skipped".into()),
            );
            self.stopped = true;
        }
    }
}

/// One line per write(2), so kernel messages on the same console do not split it.
fn emit(line: &str) {
    let mut s = String::with_capacity(line.len() + 1);
    s.push_str(line);
    s.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

fn info(line: &str) {
    emit(&format!("INFO {line}"));
}

// ------------------------------------------------------------ environment --

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn mount(src: &str, target: &str, fstype: &str) {
    let _ = fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(src).unwrap(),
        CString::new(target).unwrap(),
        CString::new(fstype).unwrap(),
    );
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let e = errno();
        if e.raw_os_error() != Some(libc::EBUSY) {
            info(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

/// Makes sure proc, sysfs and devtmpfs are mounted and fds 0-2 are the console.
fn prepare_environment() {
    if !Path::new("/proc/self").exists() {
        mount("proc", "/proc", "proc");
    }
    if !Path::new("/sys/bus").exists() {
        mount("sysfs", "/sys", "sysfs");
    }
    if !Path::new("/dev/null").exists() {
        mount("devtmpfs", "/dev", "devtmpfs");
    }
    // SAFETY: fcntl on a possibly closed fd only reports EBADF.
    let stdout_ok = unsafe { libc::fcntl(1, libc::F_GETFD) } >= 0;
    if !stdout_ok {
        let path = CString::new("/dev/console").unwrap();
        // SAFETY: plain open/dup2 on our own descriptors.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if fd >= 0 {
                for target in 0..3 {
                    if fd != target {
                        libc::dup2(fd, target);
                    }
                }
                if fd > 2 {
                    libc::close(fd);
                }
            }
        }
    }
    // mlock'd pages may still be migrated by compaction unless this is 0; our
    // DMA addresses must stay valid.
    let _ = fs::write("/proc/sys/vm/compact_unevictable_allowed", "0");
}

fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory-safety preconditions.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    // reboot failed (not permitted?): exit instead.
    std::process::exit(1)
}

// -------------------------------------------------------------------- PCI --

fn read_hex(path: &Path) -> Result<u64, String> {
    let s = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = s.trim().trim_start_matches("0x");
    u64::from_str_radix(t, 16).map_err(|e| format!("{}: {e}", path.display()))
}

fn find_device(vendor: u16, device: u16) -> Result<PathBuf, String> {
    let dir = Path::new("/sys/bus/pci/devices");
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    entries.sort();
    let mut seen = Vec::new();
    for p in entries {
        let v = read_hex(&p.join("vendor"))?;
        let d = read_hex(&p.join("device"))?;
        seen.push(format!("{v:04x}:{d:04x}"));
        if v == u64::from(vendor) && d == u64::from(device) {
            return Ok(p);
        }
    }
    Err(format!(
        "no {vendor:04x}:{device:04x} among [{}]",
        seen.join(" ")
    ))
}

struct PciConfig {
    file: File,
}

impl PciConfig {
    fn open(dev: &Path) -> Result<Self, String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dev.join("config"))
            .map_err(|e| format!("open config: {e}"))?;
        Ok(Self { file })
    }
    fn read<const N: usize>(&self, off: u64) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        let n = self
            .file
            .read_at(&mut b, off)
            .map_err(|e| format!("config read: {e}"))?;
        if n != N {
            return Err(format!("config read at {off:#x}: short ({n})"));
        }
        Ok(b)
    }
    /// Vendor, device, revision and class code.
    fn ids(&self) -> Result<(u16, u16, u8, u32), String> {
        Ok((
            self.read16(0x00)?,
            self.read16(0x02)?,
            self.read8(0x08)?,
            self.read32(0x08)? >> 8,
        ))
    }
    fn read8(&self, off: u64) -> Result<u8, String> {
        Ok(self.read::<1>(off)?[0])
    }
    fn read16(&self, off: u64) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.read::<2>(off)?))
    }
    fn read32(&self, off: u64) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.read::<4>(off)?))
    }
    /// One 2-byte write, as a kernel driver's pci_write_config_word would do.
    fn write16(&self, off: u64, v: u16) -> Result<(), String> {
        let n = self
            .file
            .write_at(&v.to_le_bytes(), off)
            .map_err(|e| format!("config write: {e}"))?;
        if n != 2 {
            return Err(format!("config write at {off:#x}: short ({n})"));
        }
        Ok(())
    }
}

/// A BAR mapped through sysfs `resource<index>`.
struct Bar {
    base: *mut u8,
    len: usize,
}

impl Bar {
    fn map(dev: &Path, index: u32) -> Result<Self, String> {
        let path = dev.join(format!("resource{index}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_sync()
            .open(&path)
            .map_err(|e| format!("open {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("stat {}: {e}", path.display()))?
            .len() as usize;
        if len == 0 {
            return Err(format!("{} has size 0", path.display()));
        }
        // SAFETY: mapping a device file; the kernel validates length and offset.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap {}: {}", path.display(), errno()));
        }
        Ok(Self {
            base: p.cast(),
            len,
        })
    }
}

/// Memory the device reaches too (a BAR's mapping, a locked DMA page), read
/// and written with single, naturally aligned volatile accesses.
///
/// # Safety
/// `span` is a live mapping of that many bytes for as long as `self` lives.
unsafe trait Volatile {
    /// Start and length of the mapping.
    fn span(&self) -> (*mut u8, usize);

    /// The `T` at `off`.
    fn load<T: Copy>(&self, off: usize) -> T {
        let at = self.at::<T>(off);
        // SAFETY: in bounds of the live mapping and aligned (`at` checked).
        unsafe { std::ptr::read_volatile(at) }
    }

    /// Stores `v` at `off`.
    fn store<T: Copy>(&self, off: usize, v: T) {
        let at = self.at::<T>(off);
        // SAFETY: as in `load`.
        unsafe { std::ptr::write_volatile(at, v) }
    }

    /// Where the `T` at `off` is, checked to lie in the mapping, aligned.
    fn at<T>(&self, off: usize) -> *mut T {
        let (base, len) = self.span();
        let size = std::mem::size_of::<T>();
        assert!(off + size <= len && off.is_multiple_of(size), "{off:#x}");
        base.wrapping_add(off).cast()
    }
}

// SAFETY: `base` is a mapping of `len` bytes, never unmapped.
unsafe impl Volatile for Bar {
    fn span(&self) -> (*mut u8, usize) {
        (self.base, self.len)
    }
}

trait SyncOpen {
    fn custom_flags_sync(&mut self) -> &mut Self;
}
impl SyncOpen for OpenOptions {
    fn custom_flags_sync(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_SYNC)
    }
}

// -------------------------------------------------------------- DMA pages --

/// A locked page with a known guest-physical address.
struct DmaPage {
    virt: *mut u8,
    phys: u64,
}

impl DmaPage {
    fn fill(&self, f: impl Fn(usize) -> u8) {
        for i in 0..PAGE {
            // SAFETY: the page is ours, mapped and locked.
            unsafe { std::ptr::write_volatile(self.virt.add(i), f(i)) }
        }
        fence(Ordering::SeqCst);
    }
    fn get(&self, i: usize) -> u8 {
        self.load(i)
    }
    fn bytes(&self, start: usize, len: usize) -> Vec<u8> {
        fence(Ordering::SeqCst);
        (start..start + len).map(|i| self.get(i)).collect()
    }
}

// SAFETY: `virt` is a locked page, never unmapped.
unsafe impl Volatile for DmaPage {
    fn span(&self) -> (*mut u8, usize) {
        (self.virt, PAGE)
    }
}

/// Allocates locked pages and keeps those below `limit`.
fn dma_pages(want: usize, limit: u64) -> Result<Vec<DmaPage>, String> {
    let mut pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("open pagemap: {e}"))?;
    let mut got = Vec::new();
    let mut tries = 0usize;
    let chunk = 256; // pages per allocation (1 MiB)
    while got.len() < want {
        tries += 1;
        if tries > 64 {
            return Err(format!(
                "only {} of {want} locked pages below {limit:#x}",
                got.len()
            ));
        }
        let len = chunk * PAGE;
        // SAFETY: anonymous private mapping; populated and locked by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", errno()));
        }
        // SAFETY: the range was just mapped.
        if unsafe { libc::mlock(p, len) } != 0 {
            return Err(format!("mlock: {}", errno()));
        }
        let base = p as *mut u8;
        for i in 0..chunk {
            // SAFETY: within the mapping just made.
            let virt = unsafe { base.add(i * PAGE) };
            // SAFETY: a byte of our own locked mapping; written so the page is
            // really backed.
            unsafe { std::ptr::write_volatile(virt, 0x5a) };
            let entry = pagemap_entry(&mut pagemap, virt as u64)?;
            if entry >> 63 == 0 {
                return Err(format!("page {virt:p} not present after mlock"));
            }
            let pfn = entry & ((1u64 << 55) - 1);
            if pfn == 0 {
                return Err("pagemap gives PFN 0: not running as root (CAP_SYS_ADMIN)?".into());
            }
            let phys = pfn * PAGE as u64;
            if phys + PAGE as u64 <= limit && got.len() < want {
                got.push(DmaPage { virt, phys });
            }
        }
    }
    Ok(got)
}

fn pagemap_entry(pagemap: &mut File, virt: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    pagemap
        .read_exact_at(&mut b, (virt / PAGE as u64) * 8)
        .map_err(|e| format!("read pagemap: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

// ------------------------------------------------------------------ tests --

fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> Option<u64>,
) -> Result<u64, String> {
    let start = Instant::now();
    for i in 0u64.. {
        if let Some(v) = done() {
            return Ok(v);
        }
        if i % 64 == 63 && device_gone() {
            return Err(format!("device gone while waiting for {what}"));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "timeout after {} ms waiting for {what}",
                timeout.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    unreachable!()
}

/// The ID register of the mapped BAR, once mapped.
static ID_REG: AtomicPtr<u32> = AtomicPtr::new(std::ptr::null_mut());

/// A device that went away (vfio-user server exited) reads all-ones.
fn device_gone() -> bool {
    let p = ID_REG.load(Ordering::Relaxed);
    // SAFETY: p is null or points into the BAR mapping, which is never unmapped.
    !p.is_null() && unsafe { std::ptr::read_volatile(p) } == u32::MAX
}

fn factorial_u32(n: u32) -> u32 {
    (1..=n).fold(1u32, |a, b| a.wrapping_mul(b))
}

/// FNV-1a, to print DMA contents compactly.
fn fnv1a(b: &[u8]) -> u32 {
    b.iter().fold(0x811c9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x01000193)
    })
}

/// A deterministic byte pattern for round `seed`.
fn pattern(seed: u32) -> impl Fn(usize) -> u8 {
    move |i| {
        let x = (i as u32)
            .wrapping_mul(2654435761)
            .wrapping_add(seed.wrapping_mul(40503));
        (x >> 13) as u8 ^ (i as u8)
    }
}

struct Edu<'a> {
    bar: &'a Bar,
}

const FACT_TIMEOUT: Duration = Duration::from_secs(5);
const DMA_TIMEOUT: Duration = Duration::from_secs(10);

impl Edu<'_> {
    fn factorial(&self, n: u32) -> Result<u32, String> {
        let b = self.bar;
        b.store::<u32>(reg::FACTORIAL, n);
        wait_until("factorial (status bit 0)", FACT_TIMEOUT, || {
            (b.load::<u32>(reg::STATUS) & STATUS_COMPUTING == 0).then_some(0)
        })?;
        Ok(b.load::<u32>(reg::FACTORIAL))
    }

    fn dma_program(&self, src: u64, dst: u64, cnt: u64) {
        let b = self.bar;
        b.store::<u64>(reg::DMA_SRC, src);
        b.store::<u64>(reg::DMA_DST, dst);
        b.store::<u64>(reg::DMA_CNT, cnt);
    }

    fn dma_wait(&self) -> Result<(), String> {
        let b = self.bar;
        wait_until("DMA completion (cmd bit 0)", DMA_TIMEOUT, || {
            (b.load::<u64>(reg::DMA_CMD) & DMA_RUN == 0).then_some(0)
        })?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// RAM -> device buffer.
    fn dma_to_dev(&self, src: u64, dev_off: u64, cnt: u64, extra: u64) -> Result<(), String> {
        fence(Ordering::SeqCst);
        self.dma_program(src, DEV_BUF + dev_off, cnt);
        self.bar.store::<u64>(reg::DMA_CMD, DMA_RUN | extra);
        self.dma_wait()
    }

    /// Device buffer -> RAM.
    fn dma_to_ram(&self, dev_off: u64, dst: u64, cnt: u64, extra: u64) -> Result<(), String> {
        fence(Ordering::SeqCst);
        self.dma_program(DEV_BUF + dev_off, dst, cnt);
        self.bar
            .store::<u64>(reg::DMA_CMD, DMA_RUN | DMA_TO_RAM | extra);
        self.dma_wait()
    }

    fn irq_status(&self) -> u32 {
        self.bar.load::<u32>(reg::IRQ_STATUS)
    }

    /// Waits until interrupt status bit(s) `bit` are up: the whole status.
    fn wait_irq(&self, what: &str, bit: u32) -> Result<u32, String> {
        let s = wait_until(what, FACT_TIMEOUT, || {
            let s = self.irq_status();
            (s & bit != 0).then_some(u64::from(s))
        })?;
        Ok(s as u32)
    }

    fn ack_all(&self) {
        let s = self.irq_status();
        if s != 0 {
            self.bar.store::<u32>(reg::IRQ_ACK, s);
        }
    }
}

fn compare(name: &str, got: &[u8], want: &[u8]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{name}: length {} != {}", got.len(), want.len()));
    }
    if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
        let bad = (0..got.len()).filter(|&i| got[i] != want[i]).count();
        return Err(format!(
            "{name}: {bad} bytes differ, first at {i:#x}: got {:#04x} want {:#04x}",
            got[i], want[i]
        ));
    }
    Ok(())
}

fn run_edu_tests(rep: &mut Report, dev: &Path) -> Result<(), String> {
    // --- PCI config space and enabling.
    let cfg = PciConfig::open(dev)?;
    rep.run("config_ids", || {
        let (vid, did, rev, class) = cfg.ids()?;
        let pin = cfg.read8(0x3d)?;
        Ok(format!(
            "{vid:04x}:{did:04x} rev={rev:#04x} class={class:#08x} pin={pin}"
        ))
    });

    // Enabling is set-up for everything after it, so it runs even when the
    // test of the same name is not selected.
    fs::write(dev.join("enable"), "1").map_err(|e| format!("write enable: {e}"))?;
    let enabled = (|| {
        let cmd = cfg.read16(0x04)?;
        cfg.write16(0x04, cmd | 0x0004)?;
        let after = cfg.read16(0x04)?;
        if after & 0x0006 != 0x0006 {
            return Err(format!(
                "command register {cmd:#06x} -> {after:#06x}: memory/bus master not set"
            ));
        }
        Ok(format!("mem+bm={:#06x}", after & 0x0006))
    })();
    rep.run("enable_bus_master", || enabled);

    let bar = Bar::map(dev, 0)?;
    info(&format!("BAR0 mapped, {:#x} bytes", bar.len));
    rep.run("bar0_size", || Ok(format!("{:#x}", bar.len)));
    ID_REG.store(bar.base.cast::<u32>(), Ordering::Relaxed);
    let edu = Edu { bar: &bar };
    // Leave no interrupt from an earlier user pending.
    edu.ack_all();

    // --- Registers.
    rep.run("id", || {
        let v = bar.load::<u32>(reg::ID);
        if v & 0xffff != 0x00ed {
            return Err(format!("{v:#010x}: low half is not 0x00ed"));
        }
        Ok(format!("{v:#010x}"))
    });

    for x in [0x12345678u32, 0, 0xffff_ffff, 0xdead_beef, 0x0000_0001] {
        rep.run(&format!("liveness_{x:08x}"), || {
            bar.store::<u32>(reg::LIVENESS, x);
            let v = bar.load::<u32>(reg::LIVENESS);
            if v != !x {
                return Err(format!(
                    "wrote {x:#010x}, read {v:#010x}, want {:#010x}",
                    !x
                ));
            }
            Ok(format!("{v:#010x}"))
        });
    }

    // edu.c answers non-4-byte accesses below 0x80 with all-ones, but QEMU's
    // memory core rejects them before they reach the built-in device (reads 0);
    // a vfio-user device sees them. Informative only, so not a diffed test.
    info(&format!(
        "narrow (2-byte) read of ID: {:#06x}",
        bar.load::<u16>(reg::ID)
    ));

    for n in [0u32, 1, 5, 10, 12, 13] {
        rep.run(&format!("factorial_{n}"), || {
            let v = edu.factorial(n)?;
            let want = factorial_u32(n);
            if v != want {
                return Err(format!("{n}! = {v} ({v:#x}), want {want}"));
            }
            Ok(format!("{v}"))
        });
    }

    rep.run("status_idle", || {
        let s = bar.load::<u32>(reg::STATUS);
        if s & STATUS_COMPUTING != 0 {
            return Err(format!("status {s:#x} still computing"));
        }
        Ok(format!("{s:#x}"))
    });

    rep.run("irq_raise_ack", || {
        let mut seen = Vec::new();
        let before = edu.irq_status();
        if before != 0 {
            return Err(format!("irq status {before:#x} before raise"));
        }
        bar.store::<u32>(reg::IRQ_RAISE, 0x0001_0000);
        seen.push(edu.irq_status());
        bar.store::<u32>(reg::IRQ_RAISE, 0x0000_0004);
        seen.push(edu.irq_status());
        bar.store::<u32>(reg::IRQ_ACK, 0x0001_0000);
        seen.push(edu.irq_status());
        bar.store::<u32>(reg::IRQ_ACK, 0x0000_0004);
        seen.push(edu.irq_status());
        let want = [0x0001_0000, 0x0001_0004, 0x0000_0004, 0];
        let shown: Vec<String> = seen.iter().map(|v| format!("{v:#x}")).collect();
        if seen != want {
            return Err(format!(
                "irq status sequence {}, want 0x10000,0x10004,0x4,0x0",
                shown.join(",")
            ));
        }
        Ok(shown.join(","))
    });

    rep.run("factorial_irq", || {
        bar.store::<u32>(reg::STATUS, STATUS_IRQFACT);
        let s = bar.load::<u32>(reg::STATUS);
        if s & STATUS_IRQFACT == 0 {
            return Err(format!(
                "status {s:#x}: irq-after-factorial bit did not stick"
            ));
        }
        let v = edu.factorial(6)?;
        // The irq is raised just after the computing bit clears.
        let irq = edu.wait_irq("factorial irq in 0x24", IRQ_FACT)?;
        bar.store::<u32>(reg::IRQ_ACK, IRQ_FACT);
        let after = edu.irq_status();
        bar.store::<u32>(reg::STATUS, 0);
        let s2 = bar.load::<u32>(reg::STATUS);
        if v != 720 || irq != IRQ_FACT || after != 0 || s2 & STATUS_IRQFACT != 0 {
            return Err(format!(
                "6!={v} irq={irq:#x} after_ack={after:#x} status={s2:#x}"
            ));
        }
        Ok(format!(
            "6!={v} irq={irq:#x} after_ack={after:#x} status={s2:#x}"
        ))
    });

    // --- DMA.
    let pages = match dma_pages(8, DMA_LIMIT) {
        Ok(p) => p,
        Err(e) => {
            rep.result("dma_pages", Err(e));
            return Ok(());
        }
    };
    info(&format!(
        "DMA pages at {}",
        pages
            .iter()
            .map(|p| format!("{:#x}", p.phys))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let (src, dst, dst2) = (&pages[0], &pages[1], &pages[2]);

    rep.run("dma_regs", || {
        // Registers are readable back while no transfer runs.
        edu.dma_program(0x1234_5000, DEV_BUF + 0x10, 0x20);
        let v = (
            bar.load::<u64>(reg::DMA_SRC),
            bar.load::<u64>(reg::DMA_DST),
            bar.load::<u64>(reg::DMA_CNT),
        );
        if v != (0x1234_5000, DEV_BUF + 0x10, 0x20) {
            return Err(format!(
                "read back src={:#x} dst={:#x} cnt={:#x}",
                v.0, v.1, v.2
            ));
        }
        Ok(format!("src={:#x} dst={:#x} cnt={:#x}", v.0, v.1, v.2))
    });

    rep.run("dma_ram_to_dev_to_ram", || {
        src.fill(pattern(1));
        dst.fill(|_| 0xaa);
        edu.dma_to_dev(src.phys, 0, DEV_BUF_SIZE as u64, 0)?;
        edu.dma_to_ram(0, dst.phys, DEV_BUF_SIZE as u64, 0)?;
        let want = src.bytes(0, PAGE);
        let got = dst.bytes(0, PAGE);
        compare("page", &got, &want)?;
        Ok(format!("cnt={DEV_BUF_SIZE:#x} fnv={:#010x}", fnv1a(&got)))
    });

    rep.run("dma_partial_offsets", || {
        // Write 0x200 bytes at device offset 0x300, read 0x100 of them back
        // from offset 0x380 into the middle of a page filled with 0x55.
        src.fill(pattern(2));
        dst2.fill(|_| 0x55);
        edu.dma_to_dev(src.phys + 0x40, 0x300, 0x200, 0)?;
        edu.dma_to_ram(0x380, dst2.phys + 0x800, 0x100, 0)?;
        let got = dst2.bytes(0, PAGE);
        let mut want = vec![0x55u8; PAGE];
        want[0x800..0x900].copy_from_slice(&src.bytes(0x40 + 0x80, 0x100));
        compare("page", &got, &want)?;
        Ok(format!("fnv={:#010x}", fnv1a(&got)))
    });

    rep.run("dma_irq", || {
        src.fill(pattern(3));
        dst.fill(|_| 0);
        edu.dma_to_dev(src.phys, 0, 0x400, DMA_IRQ)?;
        let s1 = edu.wait_irq("DMA irq", IRQ_DMA)?;
        bar.store::<u32>(reg::IRQ_ACK, IRQ_DMA);
        let a1 = edu.irq_status();
        edu.dma_to_ram(0, dst.phys, 0x400, DMA_IRQ)?;
        let s2 = edu.wait_irq("DMA irq", IRQ_DMA)?;
        bar.store::<u32>(reg::IRQ_ACK, IRQ_DMA);
        let a2 = edu.irq_status();
        compare("data", &dst.bytes(0, 0x400), &src.bytes(0, 0x400))?;
        let summary = format!("to_dev irq={s1:#x} ack={a1:#x} to_ram irq={s2:#x} ack={a2:#x}");
        if s1 != IRQ_DMA || s2 != IRQ_DMA || a1 != 0 || a2 != 0 {
            return Err(summary);
        }
        Ok(summary)
    });

    let rounds: u32 = std::env::var("UMDEV_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    rep.run("irq_then_dma", || {
        // An interrupt raised immediately before a DMA starts, both
        // directions, with and without the DMA-completion irq.
        let mut sums = Vec::new();
        for r in 0..rounds {
            let to_ram = r % 2 == 0;
            let extra = if r % 4 >= 2 { DMA_IRQ } else { 0 };
            let raise = 0x1000u32 << (r % 4);
            let page = &pages[3 + (r as usize % 4)];
            if to_ram {
                // Load the device buffer first (no irq involved).
                src.fill(pattern(100 + r));
                edu.dma_to_dev(src.phys, 0, DEV_BUF_SIZE as u64, 0)?;
                page.fill(|_| 0xcc);
                fence(Ordering::SeqCst);
                edu.dma_program(DEV_BUF, page.phys, DEV_BUF_SIZE as u64);
                bar.store::<u32>(reg::IRQ_RAISE, raise);
                bar.store::<u64>(reg::DMA_CMD, DMA_RUN | DMA_TO_RAM | extra);
            } else {
                page.fill(pattern(100 + r));
                fence(Ordering::SeqCst);
                edu.dma_program(page.phys, DEV_BUF, DEV_BUF_SIZE as u64);
                bar.store::<u32>(reg::IRQ_RAISE, raise);
                bar.store::<u64>(reg::DMA_CMD, DMA_RUN | extra);
            }
            edu.dma_wait().map_err(|e| format!("round {r}: {e}"))?;
            let want_irq = raise | if extra != 0 { IRQ_DMA } else { 0 };
            let irq = if extra != 0 {
                edu.wait_irq("DMA irq", IRQ_DMA)
                    .map_err(|e| format!("round {r}: {e}"))?
            } else {
                edu.irq_status()
            };
            bar.store::<u32>(reg::IRQ_ACK, irq);
            let after = edu.irq_status();
            if irq != want_irq || after != 0 {
                return Err(format!(
                    "round {r}: irq status {irq:#x} (want {want_irq:#x}), after ack {after:#x}"
                ));
            }
            let got = if to_ram {
                page.bytes(0, PAGE)
            } else {
                // Read the device buffer back into another page.
                dst.fill(|_| 0);
                edu.dma_to_ram(0, dst.phys, DEV_BUF_SIZE as u64, 0)?;
                dst.bytes(0, PAGE)
            };
            let want: Vec<u8> = (0..PAGE).map(pattern(100 + r)).collect();
            compare(&format!("round {r} data"), &got, &want)?;
            sums.push(format!("{:08x}", fnv1a(&got)));
        }
        Ok(format!("rounds={rounds} fnv={}", sums.join(",")))
    });

    rep.run("final_irq_status", || {
        let s = edu.irq_status();
        if s != 0 {
            edu.ack_all();
            return Err(format!("{s:#x} left pending"));
        }
        Ok(format!("{s:#x}"))
    });

    // Only when named in UMDEV_TESTS: wait for the device to go away (the
    // vfio-user server killed under a running guest).
    rep.run_explicit("device_gone_all_ones", || wait_device_gone(&bar));
    // Only when named: what the guest meets across a live migration.
    rep.run_explicit("migrated", || watch_across_migration(&bar, &cfg));
    Ok(())
}

/// Marker printed once the device is in use, so a harness can live-migrate
/// the VM.
const MIGRATE_MARKER: &str = "migration: device in use; migrate the VM now";

/// The device as the guest sees it: registers through the BAR, the command
/// register and BAR0 through config space.
fn observe_edu(bar: &Bar, cfg: &PciConfig) -> String {
    let cfg16 = |at| cfg.read16(at).map_or("?".into(), |v| format!("{v:#06x}"));
    let cfg32 = |at| cfg.read32(at).map_or("?".into(), |v| format!("{v:#010x}"));
    format!(
        "id={:#010x} factorial={:#010x} liveness={:#010x} command={} bar0={}",
        bar.load::<u32>(reg::ID),
        bar.load::<u32>(reg::FACTORIAL),
        bar.load::<u32>(reg::LIVENESS),
        cfg16(0x04),
        cfg32(0x10),
    )
}

/// Puts the device in use (a factorial, a liveness value), prints
/// [`MIGRATE_MARKER`], then looks at the device every 200 ms and prints
/// each change, until it changed and then stayed the same for 2 s (or
/// `UMDEV_MIGRATE_TIMEOUT` seconds, default 90, passed). The result says
/// what the guest saw before and after.
fn watch_across_migration(bar: &Bar, cfg: &PciConfig) -> Result<String, String> {
    let timeout = std::env::var("UMDEV_MIGRATE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    bar.store::<u32>(reg::FACTORIAL, 5);
    let start = Instant::now();
    while bar.load::<u32>(reg::STATUS) & 1 != 0 {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("factorial never finished".into());
        }
    }
    bar.store::<u32>(reg::LIVENESS, 0x5a5a_0001);
    let before = observe_edu(bar, cfg);
    info(&format!("migration: before {before}"));
    info(MIGRATE_MARKER);
    let start = Instant::now();
    let (mut last, mut changed, mut stable) = (before.clone(), false, 0);
    while start.elapsed() < Duration::from_secs(timeout) {
        std::thread::sleep(Duration::from_millis(200));
        let now = observe_edu(bar, cfg);
        if now != last {
            info(&format!(
                "migration: at {} ms the guest sees {now}",
                start.elapsed().as_millis()
            ));
            (last, changed, stable) = (now, true, 0);
        } else if changed {
            stable += 1;
            if stable >= 10 {
                return Ok(format!("before: {before}; after: {last}"));
            }
        }
    }
    Err(format!(
        "nothing changed in {timeout} s (was the VM migrated?): {before}"
    ))
}

/// Marker printed once the device has been exercised and the guest has gone
/// idle, so a harness can kill the backend mid-run.
const GONE_MARKER: &str = "device_gone: idle between accesses; kill the backend now";

/// Exercises the device (ID reads, liveness round trips), prints
/// [`GONE_MARKER`], then checks the ID register once per pause until the BAR
/// reads all-ones, i.e. the vfio-user server went away and QEMU kept running.
///
/// The device is not accessed during the pauses on purpose: QEMU 11.1 aborts
/// (`error_setv: Assertion '*errp == NULL'`) when the server dies while one of
/// QEMU's requests sits unread in the server's socket (its read then fails
/// with ECONNRESET and the error is set twice). Between accesses the server's
/// death reads as EOF, which QEMU survives.
fn wait_device_gone(bar: &Bar) -> Result<String, String> {
    let env_u64 = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let timeout = Duration::from_secs(env_u64("UMDEV_GONE_TIMEOUT", 60));
    let pause = Duration::from_millis(env_u64("UMDEV_GONE_PAUSE_MS", 500));
    // Busy phase: the device works.
    for i in 0..50u32 {
        let id = bar.load::<u32>(reg::ID);
        if id & 0xffff != 0x00ed {
            return Err(format!("ID {id:#010x} in round trip {i}, before the kill"));
        }
        // Never 0, so the expected read-back is never all-ones itself.
        let x = i.wrapping_mul(0x9e37_79b9) | 1;
        bar.store::<u32>(reg::LIVENESS, x);
        let v = bar.load::<u32>(reg::LIVENESS);
        if v != !x {
            return Err(format!(
                "liveness: wrote {x:#010x}, read {v:#010x} in round trip {i}, before the kill"
            ));
        }
    }
    info(GONE_MARKER);
    let start = Instant::now();
    let mut checks = 0u64;
    loop {
        std::thread::sleep(pause);
        checks += 1;
        let id = bar.load::<u32>(reg::ID);
        if id == u32::MAX {
            break;
        }
        if id & 0xffff != 0x00ed {
            return Err(format!("ID {id:#010x} in check {checks}"));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "device still answers after {} s ({checks} checks)",
                timeout.as_secs()
            ));
        }
    }
    // Gone: every further access reads all-ones too, and does not hang.
    let ids: Vec<u32> = (0..4).map(|_| bar.load::<u32>(reg::ID)).collect();
    bar.store::<u32>(reg::LIVENESS, 0x1234_5678);
    let live = bar.load::<u32>(reg::LIVENESS);
    let status = bar.load::<u32>(reg::STATUS);
    info(&format!(
        "device_gone: all-ones at check {checks}, {} ms after the marker",
        start.elapsed().as_millis()
    ));
    let summary = format!("id=0xffffffff liveness={live:#010x} status={status:#010x}");
    if ids.iter().any(|&v| v != u32::MAX) || live != u32::MAX || status != u32::MAX {
        return Err(format!("{summary}; ID reads after: {ids:#x?}"));
    }
    Ok(summary)
}

fn parse_dev(s: &str) -> Option<(u16, u16)> {
    let (v, d) = s.split_once(':')?;
    Some((
        u16::from_str_radix(v, 16).ok()?,
        u16::from_str_radix(d, 16).ok()?,
    ))
}

fn main() {
    let pid1 = std::process::id() == 1;
    prepare_environment();
    let no_poweroff = std::env::var("UMDEV_NO_POWEROFF").is_ok_and(|v| v == "1");

    let mut uname = String::new();
    if let Ok(mut f) = File::open("/proc/version") {
        let _ = f.read_to_string(&mut uname);
    }
    info(&format!(
        "umdev-guest-driver {} pid={} {}",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        uname.trim()
    ));

    let devspec = std::env::var("UMDEV_DEV").unwrap_or_else(|_| "1234:11e8".into());
    let filter = std::env::var("UMDEV_TESTS")
        .ok()
        .filter(|s| !s.is_empty() && s != "all")
        .map(|s| s.split(',').map(str::to_owned).collect());
    let mut rep = Report {
        passed: 0,
        failed: 0,
        filter,
        stopped: false,
    };

    let started = Instant::now();
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<(), String> {
            if fb::selected() {
                return fb::run(&mut rep);
            }
            let (vendor, device) =
                parse_dev(&devspec).ok_or_else(|| format!("bad UMDEV_DEV={devspec}"))?;
            let dev = find_device(vendor, device)?;
            info(&format!(
                "device {vendor:04x}:{device:04x} at {}",
                dev.display()
            ));
            rep.result("find_device", Ok(format!("{vendor:04x}:{device:04x}")));
            if (vendor, device) == vgpu::IDS {
                vgpu::run_tests(&mut rep, &dev)
            } else {
                run_edu_tests(&mut rep, &dev)
            }
        }));
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => rep.result("setup", Err(e)),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            rep.result("panic", Err(msg));
        }
    }
    info(&format!("tests took {} ms", started.elapsed().as_millis()));
    emit(&format!("DONE passed={} failed={}", rep.passed, rep.failed));
    fb::hold();
    if pid1 && !no_poweroff {
        power_off();
    }
    std::process::exit(if rep.failed == 0 { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorial_wraps_like_edu() {
        assert_eq!(factorial_u32(0), 1);
        assert_eq!(factorial_u32(5), 120);
        assert_eq!(factorial_u32(12), 479_001_600);
        assert_eq!(factorial_u32(13), 1_932_053_504); // 13! mod 2^32
    }

    #[test]
    fn parses_device_ids() {
        assert_eq!(parse_dev("1234:11e8"), Some((0x1234, 0x11e8)));
        assert_eq!(parse_dev("1234"), None);
        assert_eq!(parse_dev("xyz:1"), None);
    }

    #[test]
    fn pattern_is_deterministic_and_varies() {
        let a: Vec<u8> = (0..PAGE).map(pattern(1)).collect();
        let b: Vec<u8> = (0..PAGE).map(pattern(1)).collect();
        let c: Vec<u8> = (0..PAGE).map(pattern(2)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(fnv1a(b""), 0x811c9dc5);
        assert_eq!(fnv1a(b"a"), 0xe40c292c);
    }

    #[test]
    fn compare_reports_first_difference() {
        assert!(compare("x", &[1, 2, 3], &[1, 2, 3]).is_ok());
        let e = compare("x", &[1, 9, 3], &[1, 2, 3]).unwrap_err();
        assert!(e.contains("first at 0x1"), "{e}");
    }
}
