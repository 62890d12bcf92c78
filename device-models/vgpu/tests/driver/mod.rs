//! A test "guest driver + VMM" for the vGPU: starts the real `umdev-vgpu` binary
//! on a private socket, plays the VMM (memfd guest RAM shared by DMA_MAP, the
//! page-track source's side: a shared dirty bitmap or a userfaultfd registered on
//! our own mapping, interrupt eventfds) and the guest driver (page tables built
//! in guest RAM, a command ring, doorbells, fences, faults, GGTT, VRAM), all as
//! SPEC.md describes the hardware.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use regs::*;
pub use umdev_vgpu::regs;

/// Where guest RAM starts (not 0, so that base mistakes show).
pub const RAM_GPA: u64 = 0x4000_0000;
pub const PAGE: u64 = 4096;
/// A GPU virtual address every context maps writable for its fences.
pub const FENCE_VA: u64 = 0x7fff_ffff_f000;
/// How long a wait may take before the test fails (2 shared cores, debug builds).
pub const TIMEOUT: Duration = Duration::from_secs(20);
const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const BAR0: u32 = 0;
const BAR2: u32 = 2;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// How the backend detects guest writes to the page tables it shadows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageTrack {
    Scan,
    DirtyBitmap,
    Uffd,
}

impl PageTrack {
    pub const ALL: [PageTrack; 3] = [PageTrack::Scan, PageTrack::DirtyBitmap, PageTrack::Uffd];

    pub fn arg(self) -> &'static str {
        match self {
            PageTrack::Scan => "scan",
            PageTrack::DirtyBitmap => "dirty-bitmap",
            PageTrack::Uffd => "uffd",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub page_track: PageTrack,
    pub ram_mib: usize,
    /// `--vram-mib`; None leaves the default.
    pub vram_mib: Option<u32>,
    /// Pass `--scanout-png <tempdir>/scanout.png`.
    pub scanout_png: bool,
    /// Enable MSI-X (else interrupts go to INTx).
    pub msix: bool,
    /// Share guest RAM and the dirty bitmap in memfds nobody can seal, so the
    /// "VMM" can shrink them under the backend.
    pub unsealable: bool,
    pub extra_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            page_track: PageTrack::Scan,
            ram_mib: 32,
            vram_mib: None,
            scanout_png: false,
            msix: true,
            unsealable: false,
            extra_args: Vec::new(),
        }
    }
}

impl Options {
    pub fn with_source(page_track: PageTrack) -> Self {
        Options {
            page_track,
            ..Default::default()
        }
    }
}

// ---- process and temporary directory ---------------------------------------

pub use umdev_testkit::TempDir;

/// The `umdev-vgpu` process (`UMDEV_VGPU_BIN` runs another binary or a
/// wrapper such as strace instead), logging at `info` unless `RUST_LOG` says.
pub use umdev_testkit::Backend;

pub fn start_backend(dir: TempDir, args: &[String]) -> Backend {
    let bin = std::env::var_os("UMDEV_VGPU_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_umdev-vgpu")));
    Backend::spawn(&bin, dir, "vgpu.sock", args, "info")
}

/// Connects and negotiates `extensions` (the backend listens once spawned).
fn connect_negotiated(backend: &Backend, extensions: &[&str]) -> (Client, Vec<String>) {
    Client::connect_with_extensions(&backend.socket, extensions)
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", backend.log()))
}

// ---- guest memory ----------------------------------------------------------

/// A shared memfd mapped here: guest RAM, a dirty bitmap.
pub struct Memfd {
    map: umdev::memory::MappedMemfd,
    pub size: usize,
}

impl Memfd {
    pub fn new(size: usize) -> Memfd {
        let map = umdev::memory::MappedMemfd::new("vgpu-test", size).expect("memfd");
        Memfd { map, size }
    }

    /// A memfd that cannot be sealed (see `Options::unsealable`).
    pub fn unsealable(size: usize) -> Memfd {
        let map = umdev::memory::MappedMemfd::unsealable("vgpu-test", size).expect("memfd");
        Memfd { map, size }
    }

    /// The "VMM" shrinks the file to `len` bytes; this side must not touch
    /// the pages past it any more.
    pub fn shrink(&self, len: u64) -> std::io::Result<()> {
        self.map.file().set_len(len)
    }

    fn ptr(&self) -> *mut u8 {
        self.map.as_ptr()
    }

    pub fn fd(&self) -> RawFd {
        self.map.fd()
    }

    pub fn addr(&self) -> u64 {
        self.ptr() as u64
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.size),
            "access [{offset:#x}, +{len:#x}) outside the {:#x}-byte memfd",
            self.size
        );
    }

    pub fn read(&self, offset: usize, buf: &mut [u8]) {
        self.check(offset, buf.len());
        // SAFETY: in bounds of our live mapping; the backend may write concurrently,
        // tests read only what the device has finished with.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr().add(offset), buf.as_mut_ptr(), buf.len())
        }
    }

    pub fn write(&self, offset: usize, data: &[u8]) {
        self.check(offset, data.len());
        // SAFETY: in bounds of our live mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr().add(offset), data.len()) }
    }

    /// One aligned 4-byte store (never torn).
    pub fn write_u32(&self, offset: usize, v: u32) {
        self.check(offset, 4);
        assert_eq!(offset % 4, 0);
        // SAFETY: aligned, in bounds.
        unsafe { std::ptr::write_volatile(self.ptr().add(offset) as *mut u32, v.to_le()) }
    }

    /// One aligned 8-byte store (never torn).
    pub fn write_u64(&self, offset: usize, v: u64) {
        self.check(offset, 8);
        assert_eq!(offset % 8, 0);
        // SAFETY: aligned, in bounds.
        unsafe { std::ptr::write_volatile(self.ptr().add(offset) as *mut u64, v.to_le()) }
    }

    pub fn read_u32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        assert_eq!(offset % 4, 0);
        // SAFETY: aligned, in bounds.
        u32::from_le(unsafe { std::ptr::read_volatile(self.ptr().add(offset) as *const u32) })
    }

    pub fn read_u64(&self, offset: usize) -> u64 {
        self.check(offset, 8);
        assert_eq!(offset % 8, 0);
        // SAFETY: aligned, in bounds.
        u64::from_le(unsafe { std::ptr::read_volatile(self.ptr().add(offset) as *const u64) })
    }

    /// The 8-byte word at `offset` as an atomic (dirty bitmaps).
    fn atomic_u64(&self, offset: usize) -> &AtomicU64 {
        self.check(offset, 8);
        assert_eq!(offset % 8, 0);
        // SAFETY: aligned, in bounds, and lives as long as &self.
        unsafe { &*(self.ptr().add(offset) as *const AtomicU64) }
    }
}

/// Guest RAM at [`RAM_GPA`]: every write the "guest" makes goes through here so
/// that the VMM side (the dirty bitmap) sees it.
pub struct GuestRam {
    pub mem: Memfd,
    pub base: u64,
    pub bitmap: Option<Memfd>,
}

impl GuestRam {
    pub fn size(&self) -> u64 {
        self.mem.size as u64
    }

    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.base && gpa.saturating_add(len) <= self.base + self.size()
    }

    fn offset(&self, gpa: u64, len: usize) -> usize {
        assert!(
            self.contains(gpa, len as u64),
            "gpa {gpa:#x}+{len:#x} is outside guest RAM"
        );
        (gpa - self.base) as usize
    }

    /// The VMM marks pages the guest wrote, after the write landed.
    fn mark_dirty(&self, gpa: u64, len: usize) {
        let Some(b) = &self.bitmap else { return };
        if len == 0 {
            return;
        }
        let first = (gpa - self.base) / PAGE;
        let last = (gpa - self.base + len as u64 - 1) / PAGE;
        for page in first..=last {
            b.atomic_u64((page / 64 * 8) as usize)
                .fetch_or(1 << (page % 64), Ordering::Release);
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let at = self.offset(gpa, data.len());
        self.mem.write(at, data);
        self.mark_dirty(gpa, data.len());
    }

    pub fn write_u32(&self, gpa: u64, v: u32) {
        let at = self.offset(gpa, 4);
        self.mem.write_u32(at, v);
        self.mark_dirty(gpa, 4);
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        let at = self.offset(gpa, 8);
        self.mem.write_u64(at, v);
        self.mark_dirty(gpa, 8);
    }

    pub fn write_dwords(&self, gpa: u64, dwords: &[u32]) {
        let bytes: Vec<u8> = dwords.iter().flat_map(|d| d.to_le_bytes()).collect();
        self.write(gpa, &bytes);
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        self.write(gpa, &vec![byte; len]);
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let at = self.offset(gpa, len);
        let mut buf = vec![0; len];
        self.mem.read(at, &mut buf);
        buf
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        self.mem.read_u32(self.offset(gpa, 4))
    }

    pub fn read_u64(&self, gpa: u64) -> u64 {
        self.mem.read_u64(self.offset(gpa, 8))
    }
}

/// A bump allocator of guest pages (never freed; memfd pages start zeroed).
pub struct PageAllocator {
    next: u64,
    end: u64,
}

impl PageAllocator {
    pub fn new(start: u64, end: u64) -> Self {
        PageAllocator { next: start, end }
    }

    /// `n` contiguous pages, `align` pages aligned.
    pub fn pages_aligned(&mut self, n: u64, align: u64) -> u64 {
        let a = align.max(1) * PAGE;
        let at = self.next.div_ceil(a) * a;
        assert!(at + n * PAGE <= self.end, "guest RAM exhausted");
        self.next = at + n * PAGE;
        at
    }

    pub fn pages(&mut self, n: u64) -> u64 {
        self.pages_aligned(n, 1)
    }

    pub fn page(&mut self) -> u64 {
        self.pages(1)
    }
}

// ---- guest memory without an fd ---------------------------------------------

/// Guest memory the VMM does not share: the backend reaches it only by
/// DMA_READ/DMA_WRITE messages, which the client answers from here.
pub type MessageRam = umdev_testkit::SharedRam;

// ---- VRAM ------------------------------------------------------------------

enum Vram {
    /// BAR2's region fd mapped here.
    Mapped { ptr: *mut u8, len: usize },
    /// Reached by REGION_READ/REGION_WRITE.
    Trapped,
}

impl Drop for Vram {
    fn drop(&mut self) {
        if let Vram::Mapped { ptr, len } = *self {
            // SAFETY: exactly the mapping made in Vgpu::map_vram.
            unsafe { libc::munmap(ptr.cast(), len) };
        }
    }
}

// ---- faults ----------------------------------------------------------------

/// A context fault as the registers tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub reason: u8,
    pub addr: u64,
    pub head: u32,
    pub status: u32,
}

pub fn fault_name(reason: u8) -> &'static str {
    match reason {
        FAULT_NOT_PRESENT => "NOT_PRESENT",
        FAULT_READ_ONLY => "READ_ONLY",
        FAULT_BAD_TABLE => "BAD_TABLE",
        FAULT_BAD_TARGET => "BAD_TARGET",
        FAULT_RING_WRITE => "RING_WRITE",
        FAULT_MALFORMED => "MALFORMED",
        FAULT_NESTING => "NESTING",
        FAULT_BUDGET => "BUDGET",
        FAULT_BAD_RING => "BAD_RING",
        FAULT_DMA_ERROR => "DMA_ERROR",
        FAULT_NO_ROOT => "NO_ROOT",
        _ => "?",
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fault {} ({}) at {:#x}, head {:#x}, status {:#x}",
            self.reason,
            fault_name(self.reason),
            self.addr,
            self.head,
            self.status
        )
    }
}

// ---- the device --------------------------------------------------------------

/// The device, the VMM and the guest driver in one.
pub struct Vgpu {
    pub client: Client,
    pub ram: GuestRam,
    pub alloc: PageAllocator,
    /// One eventfd per MSI-X vector.
    pub msix: Vec<EventFd>,
    /// The INTx eventfd.
    pub intx: EventFd,
    vram: Vram,
    pub vram_size: u64,
    pub opts: Options,
    /// Write page-table entries as two 4-byte halves (low first).
    pub split_pte_writes: bool,
    /// Where `--scanout-png` writes.
    pub scanout_png: Option<PathBuf>,
    pub backend: Backend,
}

impl Vgpu {
    pub fn start() -> Vgpu {
        Self::start_with(Options::default())
    }

    pub fn start_source(source: PageTrack) -> Vgpu {
        Self::start_with(Options::with_source(source))
    }

    /// A vGPU writing scanout 0 to a PNG after each frame, and that PNG's path.
    pub fn start_scanout_png() -> (Vgpu, PathBuf) {
        let gpu = Self::start_with(Options {
            scanout_png: true,
            ..Default::default()
        });
        let png = gpu.scanout_png.clone().unwrap();
        (gpu, png)
    }

    pub fn start_with(opts: Options) -> Vgpu {
        let mut args = vec!["--page-track".to_string(), opts.page_track.arg().into()];
        if let Some(mib) = opts.vram_mib {
            args.extend(["--vram-mib".into(), mib.to_string()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        // Extra backend arguments for every test (e.g. `--no-seccomp`).
        if let Ok(extra) = std::env::var("UMDEV_VGPU_TEST_ARGS") {
            args.extend(extra.split_whitespace().map(String::from));
        }
        let dir = TempDir::new();
        let scanout_png = opts.scanout_png.then(|| dir.path().join("scanout.png"));
        if let Some(p) = &scanout_png {
            args.extend(["--scanout-png".into(), p.display().to_string()]);
        }
        let backend = start_backend(dir, &args);

        let wanted: &[&str] = match opts.page_track {
            PageTrack::Scan => &[],
            PageTrack::DirtyBitmap => &[CAP_UMDEV_DIRTY_BITMAP],
            PageTrack::Uffd => &[CAP_UMDEV_UFFD_WP],
        };
        let (mut client, agreed) = connect_negotiated(&backend, wanted);
        assert_eq!(
            agreed.len(),
            wanted.len(),
            "the backend agreed to {agreed:?} of {wanted:?}"
        );

        let ram_size = opts.ram_mib << 20;
        let new_memfd = if opts.unsealable {
            Memfd::unsealable
        } else {
            Memfd::new
        };
        let mem = new_memfd(ram_size);
        client
            .dma_map(RAM_GPA, ram_size as u64, Some(mem.fd()), 0, RW)
            .expect("DMA_MAP guest RAM");
        let mut bitmap = None;
        match opts.page_track {
            PageTrack::Scan => {}
            PageTrack::DirtyBitmap => {
                let pages = ram_size as u64 / PAGE;
                let bytes = pages.div_ceil(64) * 8;
                let b = new_memfd(bytes.div_ceil(PAGE) as usize * PAGE as usize);
                client
                    .share_dirty_bitmap(RAM_GPA, ram_size as u64, b.fd(), 0)
                    .expect("share dirty bitmap");
                bitmap = Some(b);
            }
            PageTrack::Uffd => {
                let uffd = umdev::pagetrack::register_write_protect(mem.addr(), ram_size as u64)
                    .expect("userfaultfd in write-protect mode");
                client
                    .share_uffd(RAM_GPA, ram_size as u64, mem.addr(), uffd.as_raw_fd())
                    .expect("share userfaultfd");
                // Our copy is dropped here: the backend's keeps the registration,
                // and if the backend dies the kernel releases write-protected
                // pages instead of blocking our writes forever.
                drop(uffd);
            }
        }
        let ram = GuestRam {
            mem,
            base: RAM_GPA,
            bitmap,
        };

        let msix: Vec<EventFd> = (0..MSIX_VECTORS)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let intx = EventFd::new(EFD_NONBLOCK).unwrap();
        let vram_size = client.region_info(BAR2).expect("BAR2 info").info.size;
        let mut gpu = Vgpu {
            client,
            // Page 0 of RAM stays unused (a zero gpa in a table is never ours).
            alloc: PageAllocator::new(RAM_GPA + PAGE, RAM_GPA + ram_size as u64),
            ram,
            msix,
            intx,
            vram: Vram::Trapped,
            vram_size,
            opts,
            split_pte_writes: false,
            scanout_png,
            backend,
        };
        gpu.map_vram();
        gpu.init();
        gpu
    }

    /// What a driver does at probe: memory decoding and bus mastering on, MSI-X
    /// (or INTx) wired to eventfds, every interrupt source enabled.
    /// DMA_MAP of guest RAM `[offset, offset + len)` at `RAM_GPA + offset`
    /// (its memfd at that offset), as a VMM maps it (again).
    pub fn map_ram(&mut self, offset: u64, len: u64) {
        let fd = self.ram.mem.fd();
        self.client
            .dma_map(RAM_GPA + offset, len, Some(fd), offset, RW)
            .unwrap();
    }

    pub fn init(&mut self) {
        self.set_command(0x0006);
        let raw: Vec<RawFd> = self.msix.iter().map(|e| e.as_raw_fd()).collect();
        self.client
            .set_irqs(
                PCI_MSIX_IRQ_INDEX,
                IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                0,
                raw.len() as u32,
                &raw,
                &[],
            )
            .expect("SET_IRQS MSI-X");
        self.client
            .set_irq_eventfds(PCI_INTX_IRQ_INDEX, 0, &[self.intx.as_raw_fd()])
            .expect("SET_IRQS INTx");
        if self.opts.msix {
            self.msix_control(0x8000);
        }
        self.write_reg(REG_IRQ_ENABLE, 0x10f);
    }

    /// PCI command register (one 2-byte access, as QEMU does).
    pub fn set_command(&mut self, value: u16) {
        self.client
            .region_write(CONFIG, 4, &value.to_le_bytes())
            .expect("config write");
    }

    /// Offset of capability `id` in config space.
    pub fn capability(&mut self, id: u8) -> Option<u64> {
        let cfg = self.client.region_read(CONFIG, 0, 256).unwrap();
        let mut at = cfg[0x34] as usize;
        let mut hops = 0;
        while at != 0 && hops < 16 {
            if cfg[at] == id {
                return Some(at as u64);
            }
            at = cfg[at + 1] as usize;
            hops += 1;
        }
        None
    }

    /// MSI-X Message Control (bit 15 enable, bit 14 function mask).
    pub fn msix_control(&mut self, value: u16) {
        let at = self.capability(0x11).expect("MSI-X capability");
        self.client
            .region_write(CONFIG, at + 2, &value.to_le_bytes())
            .expect("MSI-X control");
    }

    fn map_vram(&mut self) {
        let details = self.client.region_info(BAR2).expect("BAR2 info");
        let whole = details.sparse_areas.is_empty()
            || details
                .sparse_areas
                .iter()
                .any(|a| a.offset == 0 && a.size >= details.info.size);
        let (Some(fd), true, true) = (
            details.fd.as_ref(),
            details.info.flags & REGION_INFO_FLAG_MMAP != 0,
            whole,
        ) else {
            self.vram = Vram::Trapped;
            return;
        };
        let len = details.info.size as usize;
        // SAFETY: maps the region the server offers for mmap; unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                details.info.offset as libc::off_t,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap VRAM: {}",
            std::io::Error::last_os_error()
        );
        self.vram = Vram::Mapped {
            ptr: ptr.cast(),
            len,
        };
    }

    pub fn vram_is_mapped(&self) -> bool {
        matches!(self.vram, Vram::Mapped { .. })
    }

    pub fn vram_write(&mut self, offset: u64, data: &[u8]) {
        assert!(offset + data.len() as u64 <= self.vram_size, "outside VRAM");
        match self.vram {
            Vram::Mapped { ptr, .. } => {
                // SAFETY: in bounds of the live VRAM mapping (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        ptr.add(offset as usize),
                        data.len(),
                    )
                }
            }
            Vram::Trapped => {
                for (i, chunk) in data.chunks(64 << 10).enumerate() {
                    self.client
                        .region_write(BAR2, offset + (i << 16) as u64, chunk)
                        .expect("VRAM write");
                }
            }
        }
    }

    pub fn vram_read(&mut self, offset: u64, len: usize) -> Vec<u8> {
        assert!(offset + len as u64 <= self.vram_size, "outside VRAM");
        let mut buf = vec![0; len];
        match self.vram {
            Vram::Mapped { ptr, .. } => {
                // SAFETY: in bounds of the live VRAM mapping (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(ptr.add(offset as usize), buf.as_mut_ptr(), len)
                }
            }
            Vram::Trapped => {
                for (i, chunk) in buf.chunks_mut(64 << 10).enumerate() {
                    self.client
                        .region_read_into(BAR2, offset + (i << 16) as u64, chunk)
                        .expect("VRAM read");
                }
            }
        }
        buf
    }

    // ---- registers ----

    pub fn read_reg(&mut self, offset: u64) -> u32 {
        self.client.read_u32(BAR0, offset).expect("BAR0 read")
    }

    pub fn write_reg(&mut self, offset: u64, value: u32) {
        self.client
            .write_u32(BAR0, offset, value)
            .expect("BAR0 write")
    }

    pub fn read_reg64(&mut self, offset: u64) -> u64 {
        self.client.read_u64(BAR0, offset).expect("BAR0 read")
    }

    /// A 64-bit register: one 8-byte access, or two 4-byte ones (low first).
    pub fn write_reg64(&mut self, offset: u64, value: u64, halves: bool) {
        if halves {
            self.write_reg(offset, value as u32);
            self.write_reg(offset + 4, (value >> 32) as u32);
        } else {
            self.client
                .write_u64(BAR0, offset, value)
                .expect("BAR0 write");
        }
    }

    pub fn ctx_read(&mut self, ctx: usize, reg: u64) -> u32 {
        self.read_reg(ctx_reg(ctx, reg))
    }

    pub fn ctx_write(&mut self, ctx: usize, reg: u64, value: u32) {
        self.write_reg(ctx_reg(ctx, reg), value)
    }

    pub fn ctx_read64(&mut self, ctx: usize, reg: u64) -> u64 {
        self.read_reg64(ctx_reg(ctx, reg))
    }

    pub fn ctx_write64(&mut self, ctx: usize, reg: u64, value: u64) {
        self.write_reg64(ctx_reg(ctx, reg), value, false)
    }

    /// Scanout 0 shows the `w` x `h` XRGB8888 framebuffer at GGTT address
    /// `fb` (written as two 4-byte halves with `halves`), `stride` bytes a line.
    pub fn show_xrgb8888(&mut self, fb: u64, halves: bool, w: u32, h: u32, stride: u32) {
        self.write_reg64(SCANOUT_BASE + SCANOUT_FB_ADDR, fb, halves);
        self.scanout_write(SCANOUT_FB_WIDTH, w);
        self.scanout_write(SCANOUT_FB_HEIGHT, h);
        self.scanout_write(SCANOUT_FB_STRIDE, stride);
        self.scanout_write(SCANOUT_FB_FORMAT, FB_FORMAT_XRGB8888);
        self.scanout_write(SCANOUT_FB_ENABLE, 1);
    }

    pub fn scanout_write(&mut self, reg: u64, value: u32) {
        self.write_reg(SCANOUT_BASE + reg, value)
    }

    /// The context's fault, if it has one.
    pub fn fault(&mut self, ctx: usize) -> Option<Fault> {
        let status = self.ctx_read(ctx, CTX_STATUS);
        if status & CTX_STATUS_FAULTED == 0 {
            return None;
        }
        Some(Fault {
            reason: (status >> 8) as u8,
            addr: self.ctx_read64(ctx, CTX_FAULT_ADDR),
            head: self.ctx_read(ctx, CTX_RING_HEAD),
            status,
        })
    }

    /// CTX_CONTROL: keep enabled, clear the fault (RING_HEAD jumps to RING_TAIL).
    pub fn clear_fault(&mut self, ctx: usize) {
        self.ctx_write(
            ctx,
            CTX_CONTROL,
            CTX_CONTROL_ENABLE | CTX_CONTROL_CLEAR_FAULT,
        );
    }

    /// IRQ_STATUS, then write-1-clear what was set.
    pub fn ack_irqs(&mut self) -> u32 {
        let s = self.read_reg(REG_IRQ_STATUS);
        if s != 0 {
            self.write_reg(REG_IRQ_STATUS, s);
        }
        s
    }

    /// A register dump for failure messages.
    pub fn dump(&mut self, ctx: usize) -> String {
        format!(
            "ctx {ctx}: status {:#x} head {:#x} tail {:#x} fault_addr {:#x} fence {} root {:#x} ring {:#x}/{:#x}; irq_status {:#x} global_error {}",
            self.ctx_read(ctx, CTX_STATUS),
            self.ctx_read(ctx, CTX_RING_HEAD),
            self.ctx_read(ctx, CTX_RING_TAIL),
            self.ctx_read64(ctx, CTX_FAULT_ADDR),
            self.ctx_read(ctx, CTX_FENCE_SEQNO),
            self.ctx_read64(ctx, CTX_PT_ROOT),
            self.ctx_read64(ctx, CTX_RING_BASE),
            self.ctx_read(ctx, CTX_RING_SIZE),
            self.read_reg(REG_IRQ_STATUS),
            self.read_reg(REG_GLOBAL_ERROR),
        )
    }

    // ---- interrupts ----

    /// Waits for MSI-X `vector` (or INTx with `None`) to fire; consumes the count.
    pub fn wait_irq(&mut self, vector: Option<usize>, timeout: Duration) -> bool {
        let fd = match vector {
            Some(v) => self.msix[v].as_raw_fd(),
            None => self.intx.as_raw_fd(),
        };
        let fired = self
            .client
            .serve_until_readable(fd, timeout)
            .expect("waiting for an interrupt");
        if fired {
            let _ = self.take_irq(vector);
        }
        fired
    }

    /// How often the vector fired since last asked (0 if not), without waiting.
    pub fn take_irq(&mut self, vector: Option<usize>) -> u64 {
        let e = match vector {
            Some(v) => &self.msix[v],
            None => &self.intx,
        };
        e.read().unwrap_or(0)
    }

    pub fn drain_irqs(&mut self) {
        for v in 0..self.msix.len() {
            let _ = self.msix[v].read();
        }
        let _ = self.intx.read();
    }

    // ---- GGTT ----

    pub fn ggtt_write(&mut self, index: u64, entry: u64) {
        self.write_reg64(GGTT_OFFSET + 8 * index, entry, false)
    }

    pub fn ggtt_write_halves(&mut self, index: u64, entry: u64) {
        self.write_reg64(GGTT_OFFSET + 8 * index, entry, true)
    }

    pub fn ggtt_read(&mut self, index: u64) -> u64 {
        self.read_reg64(GGTT_OFFSET + 8 * index)
    }

    // ---- page-table entries in guest memory ----

    /// Writes a page-table entry: one 8-byte store, or two 4-byte ones (low half
    /// first) with `split_pte_writes`.
    pub fn write_pte(&mut self, slot_gpa: u64, value: u64) {
        if self.split_pte_writes {
            self.ram.write_u32(slot_gpa, value as u32);
            self.ram.write_u32(slot_gpa + 4, (value >> 32) as u32);
        } else {
            self.ram.write_u64(slot_gpa, value);
        }
    }

    // ---- contexts ----

    /// Programs context `n` with page tables `root` and a ring; enables it.
    pub fn program_context(&mut self, n: usize, root: u64, ring_base: u64, ring_size: u32) {
        self.ctx_write64(n, CTX_PT_ROOT, root);
        self.ctx_write64(n, CTX_RING_BASE, ring_base);
        self.ctx_write(n, CTX_RING_SIZE, ring_size);
        self.ctx_write(n, CTX_MSIX_VECTOR, n as u32);
        self.ctx_write(n, CTX_CONTROL, CTX_CONTROL_ENABLE);
    }

    /// A fresh context `n`: its own page tables (with the fence page mapped), a
    /// ring of `ring_size` bytes, enabled.
    pub fn context_with_ring(&mut self, n: usize, ring_size: u32) -> Ctx {
        let pt = PageTables::new(self);
        let ring_pages = (ring_size as u64).div_ceil(PAGE);
        let ring_base = self.alloc.pages(ring_pages);
        let fence_gpa = self.alloc.page();
        pt.map(self, FENCE_VA, Target::Ram(fence_gpa), true);
        self.program_context(n, pt.root, ring_base, ring_size);
        let head = self.ctx_read(n, CTX_RING_HEAD);
        Ctx {
            n,
            pt,
            ring: Ring {
                ctx: n,
                base: ring_base,
                size: ring_size,
                tail: head,
                head,
            },
            fence_gpa,
            seq: self.ctx_read(n, CTX_FENCE_SEQNO),
        }
    }

    pub fn context(&mut self, n: usize) -> Ctx {
        self.context_with_ring(n, RING_SIZE_MIN)
    }

    /// Polls until context `ctx` has retired fence `seq` (Ok) or faulted (Err).
    pub fn wait_fence(&mut self, ctx: usize, seq: u32, timeout: Duration) -> Result<(), Fault> {
        let deadline = Instant::now() + timeout;
        let mut sleep = Duration::from_micros(50);
        loop {
            let done = self.ctx_read(ctx, CTX_FENCE_SEQNO);
            if (done.wrapping_sub(seq) as i32) >= 0 {
                return Ok(());
            }
            if let Some(f) = self.fault(ctx) {
                return Err(f);
            }
            if Instant::now() > deadline {
                let d = self.dump(ctx);
                panic!("fence {seq} of context {ctx} not retired within {timeout:?}: {d}");
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(5));
        }
    }

    /// Polls until context `ctx` is idle (HEAD == TAIL, not busy) or faulted.
    pub fn wait_idle(&mut self, ctx: usize, timeout: Duration) -> Result<(), Fault> {
        let deadline = Instant::now() + timeout;
        let mut sleep = Duration::from_micros(50);
        loop {
            if let Some(f) = self.fault(ctx) {
                return Err(f);
            }
            let status = self.ctx_read(ctx, CTX_STATUS);
            let head = self.ctx_read(ctx, CTX_RING_HEAD);
            let tail = self.ctx_read(ctx, CTX_RING_TAIL);
            if head == tail && status & CTX_STATUS_BUSY == 0 {
                // A fault may have landed between the reads.
                return match self.fault(ctx) {
                    Some(f) => Err(f),
                    None => Ok(()),
                };
            }
            if Instant::now() > deadline {
                let d = self.dump(ctx);
                panic!("context {ctx} not idle within {timeout:?}: {d}");
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(5));
        }
    }

    /// Polls until context `ctx` faults; panics if it goes idle without one.
    pub fn wait_fault(&mut self, ctx: usize) -> Fault {
        match self.wait_idle(ctx, TIMEOUT) {
            Err(f) => f,
            Ok(()) => {
                // Idle may be seen just before the fault is posted: look again.
                std::thread::sleep(Duration::from_millis(20));
                match self.fault(ctx) {
                    Some(f) => f,
                    None => {
                        let d = self.dump(ctx);
                        panic!("context {ctx} went idle without a fault: {d}")
                    }
                }
            }
        }
    }

    /// DMA_MAP of `size` bytes at `gpa` without an fd, answered from the
    /// returned memory (one such region per client).
    pub fn map_message_ram(&mut self, gpa: u64, size: usize) -> MessageRam {
        let ram = MessageRam {
            base: gpa,
            bytes: std::sync::Arc::new(std::sync::Mutex::new(vec![0; size])),
        };
        self.client
            .set_dma_target(Box::new(ram.clone()), DmaLayout::default());
        self.client
            .dma_map(gpa, size as u64, None, 0, RW)
            .expect("DMA_MAP without fd");
        ram
    }

    /// The VMM leaves and a new one connects (scan source only: the other
    /// sources' shares would have to be made again).
    pub fn reconnect(&mut self) {
        assert_eq!(
            self.opts.page_track,
            PageTrack::Scan,
            "reconnect with scan only"
        );
        let _ = self.client.stream().shutdown(std::net::Shutdown::Both);
        self.client = connect_negotiated(&self.backend, &[]).0;
        self.client
            .dma_map(RAM_GPA, self.ram.size(), Some(self.ram.mem.fd()), 0, RW)
            .expect("DMA_MAP guest RAM");
        self.map_vram();
        self.init();
    }

    /// Device reset by DEVICE_RESET (PCI config too: the command register is
    /// cleared), then memory decoding on again so the registers can be read.
    /// `init` does the rest of the driver's probe.
    pub fn device_reset(&mut self) {
        self.client.reset().expect("DEVICE_RESET");
        self.drain_irqs();
        self.set_command(0x0006);
    }
}

// ---- page tables -------------------------------------------------------------

pub use umdev_vgpu::shadow::Target;

/// A leaf entry for `target`.
pub fn pte(target: Target, writable: bool) -> u64 {
    match target {
        Target::Ram(a) => cmd::pte(a, false, writable),
        Target::Vram(a) => cmd::pte(a, true, writable),
    }
}

/// A GGTT entry for `target`.
pub fn ggtt_entry(target: Target, writable: bool) -> u64 {
    pte(target, writable)
}

/// Tables are made in guest RAM from the allocator's pages and linked with
/// the driver's PTE writes (split in halves when it is asked to).
impl umdev_vgpu::pagetable::TableMemory for Vgpu {
    fn read_u64(&mut self, gpa: u64) -> u64 {
        self.ram.read_u64(gpa)
    }
    fn write_u64(&mut self, gpa: u64, value: u64) {
        self.write_pte(gpa, value)
    }
    fn new_table(&mut self) -> u64 {
        self.alloc.page()
    }
}

/// Four-level page tables in guest RAM, walked and written there directly.
#[derive(Clone, Copy, Debug)]
pub struct PageTables {
    pub root: u64,
}

impl PageTables {
    pub fn new(gpu: &mut Vgpu) -> PageTables {
        PageTables {
            root: gpu.alloc.page(),
        }
    }

    /// Guest-physical address of the level-`level` entry for `va`, creating the
    /// tables above it as needed.
    pub fn slot(&self, gpu: &mut Vgpu, va: u64, level: u8) -> u64 {
        assert!(va < VA_LIMIT);
        umdev_vgpu::pagetable::entry_slot(gpu, self.root, va, level)
    }

    /// The entry at `level` for `va` (0 where a table above is missing).
    pub fn entry(&self, gpu: &Vgpu, va: u64, level: u8) -> u64 {
        let mut table = self.root;
        for l in (level + 1..=PT_LEVELS).rev() {
            let e = gpu.ram.read_u64(table + 8 * pt_index(va, l) as u64);
            if e & PTE_PRESENT == 0 || !gpu.ram.contains(e & PTE_ADDR_MASK, PAGE) {
                return 0;
            }
            table = e & PTE_ADDR_MASK;
        }
        gpu.ram.read_u64(table + 8 * pt_index(va, level) as u64)
    }

    /// Sets the level-`level` entry for `va` to `value` (raw).
    pub fn set_entry(&self, gpu: &mut Vgpu, va: u64, level: u8, value: u64) {
        let slot = self.slot(gpu, va, level);
        gpu.write_pte(slot, value);
    }

    pub fn map(&self, gpu: &mut Vgpu, va: u64, target: Target, writable: bool) {
        self.set_entry(gpu, va, 1, pte(target, writable));
    }

    pub fn map_range(&self, gpu: &mut Vgpu, va: u64, target: Target, pages: u64, writable: bool) {
        for i in 0..pages {
            self.map(gpu, va + i * PAGE, target.offset(i * PAGE), writable);
        }
    }

    pub fn unmap(&self, gpu: &mut Vgpu, va: u64) {
        self.set_entry(gpu, va, 1, 0);
    }

    /// Allocates `pages` of guest RAM and maps them at `va`; returns their gpa.
    pub fn map_new(&self, gpu: &mut Vgpu, va: u64, pages: u64, writable: bool) -> u64 {
        let gpa = gpu.alloc.pages(pages);
        self.map_range(gpu, va, Target::Ram(gpa), pages, writable);
        gpa
    }
}

// ---- commands ----------------------------------------------------------------

/// Command encoders (SPEC.md "Command stream"): the device crate's own.
pub use umdev_vgpu::encode as cmd;

/// Concatenates commands.
pub fn stream(cmds: &[Vec<u32>]) -> Vec<u32> {
    cmds.concat()
}

// ---- the ring ------------------------------------------------------------------

/// A context's command ring: the driver writes at `tail`, the doorbell publishes it.
#[derive(Clone, Debug)]
pub struct Ring {
    pub ctx: usize,
    pub base: u64,
    pub size: u32,
    /// Where the next dword goes (byte offset, not yet published).
    pub tail: u32,
    /// Last RING_HEAD seen.
    pub head: u32,
}

impl Ring {
    fn used(&self) -> u32 {
        self.tail.wrapping_sub(self.head) & (self.size - 1)
    }

    /// Ring offset where the next command will start.
    pub fn offset(&self) -> u32 {
        self.tail
    }

    /// Writes dwords at the tail, wrapping at the end (a command may straddle
    /// it). Waits for the engine when the ring is full (HEAD == TAIL is empty, so
    /// at most size - 4 bytes are in flight).
    pub fn emit(&mut self, gpu: &mut Vgpu, dwords: &[u32]) {
        let need = 4 * dwords.len() as u32;
        assert!(need < self.size, "command larger than the ring");
        let deadline = Instant::now() + TIMEOUT;
        while self.used() + need > self.size - 4 {
            self.head = gpu.ctx_read(self.ctx, CTX_RING_HEAD);
            if self.used() + need <= self.size - 4 {
                break;
            }
            if let Some(f) = gpu.fault(self.ctx) {
                panic!("ring full and context {} faulted: {f}", self.ctx);
            }
            assert!(Instant::now() < deadline, "ring never drained");
            std::thread::sleep(Duration::from_millis(1));
        }
        for &d in dwords {
            gpu.ram.write_u32(self.base + self.tail as u64, d);
            self.tail = (self.tail + 4) & (self.size - 1);
        }
    }

    /// The doorbell: RING_TAIL = tail.
    pub fn doorbell(&mut self, gpu: &mut Vgpu) {
        gpu.ctx_write(self.ctx, CTX_RING_TAIL, self.tail);
    }

    /// Forgets what was written since the last doorbell (after a clear-fault the
    /// device's HEAD is TAIL anyway).
    pub fn resync(&mut self, gpu: &mut Vgpu) {
        self.head = gpu.ctx_read(self.ctx, CTX_RING_HEAD);
        self.tail = gpu.ctx_read(self.ctx, CTX_RING_TAIL);
    }
}

/// A context as the driver keeps it.
pub struct Ctx {
    pub n: usize,
    pub pt: PageTables,
    pub ring: Ring,
    /// Guest page behind [`FENCE_VA`].
    pub fence_gpa: u64,
    /// Last fence sequence number emitted.
    pub seq: u32,
}

impl Ctx {
    /// Emits commands and rings the doorbell; does not wait.
    pub fn submit(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>]) {
        for c in cmds {
            self.ring.emit(gpu, c);
        }
        self.ring.doorbell(gpu);
    }

    /// Emits `cmds` then a FENCE, rings the doorbell and waits for the fence (Ok)
    /// or a fault (Err).
    pub fn run(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>]) -> Result<(), Fault> {
        self.run_irq(gpu, cmds, false)
    }

    pub fn run_irq(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>], irq: bool) -> Result<(), Fault> {
        let seq = self.next_fence(gpu, cmds, irq);
        gpu.wait_fence(self.n, seq, TIMEOUT)
    }

    /// Emits `cmds` + a FENCE and rings the doorbell; returns the fence's seqno.
    pub fn next_fence(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>], irq: bool) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut all = cmds.to_vec();
        all.push(cmd::fence(FENCE_VA, self.seq, irq));
        self.submit(gpu, &all);
        self.seq
    }

    /// `run` that must succeed.
    pub fn run_ok(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>]) {
        if let Err(f) = self.run(gpu, cmds) {
            let d = gpu.dump(self.n);
            panic!("context {}: unexpected {f}; {d}", self.n);
        }
    }

    /// Submits `cmds` (no fence) and waits for the fault they must cause.
    pub fn run_fault(&mut self, gpu: &mut Vgpu, cmds: &[Vec<u32>]) -> Fault {
        let start = self.ring.tail;
        self.submit(gpu, cmds);
        let f = gpu.wait_fault(self.n);
        assert_eq!(
            f.head, start,
            "RING_HEAD stays at the start of the faulting submission ({f})"
        );
        f
    }

    /// Clears the context's fault; the ring continues from the device's TAIL.
    pub fn clear_fault(&mut self, gpu: &mut Vgpu) {
        gpu.clear_fault(self.n);
        self.ring.resync(gpu);
    }

    /// The fence value the last FENCE wrote to memory.
    pub fn fence_in_memory(&self, gpu: &Vgpu) -> u32 {
        gpu.ram.read_u32(self.fence_gpa)
    }
}

/// Writes a batch buffer of `cmds` at `gpa` (mapped by the test at some VA).
pub fn write_batch(gpu: &mut Vgpu, gpa: u64, cmds: &[Vec<u32>]) {
    gpu.ram.write_dwords(gpa, &stream(cmds));
}

/// Little-endian dwords of a byte slice.
pub fn dwords_of(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `len` bytes of `pattern` repeated (little-endian).
pub fn pattern_bytes(pattern: u32, len: usize) -> Vec<u8> {
    pattern
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

// ---- the test picture ------------------------------------------------------------

/// Where the test picture is drawn: the framebuffer in VRAM from offset 0,
/// the staged image in RAM, a scratch line.
pub const PICTURE: umdev_vgpu::picture::DrawTargets = umdev_vgpu::picture::DrawTargets {
    fb_va: 0x1_0000_0000,
    image_va: 0x1_0040_0000,
    scratch_va: 0x1_0080_0000,
};

/// Maps [`PICTURE`]'s targets in `ctx` and stages the image.
pub fn prepare_picture(gpu: &mut Vgpu, ctx: &Ctx) {
    use umdev_vgpu::picture;
    let fb_pages = (picture::FB_BYTES as u64).div_ceil(PAGE);
    ctx.pt
        .map_range(gpu, PICTURE.fb_va, Target::Vram(0), fb_pages, true);
    let image = picture::image_bytes();
    let pages = (image.len() as u64).div_ceil(PAGE);
    let image_gpa = ctx.pt.map_new(gpu, PICTURE.image_va, pages, false);
    gpu.ram.write(image_gpa, &image);
    ctx.pt.map_new(gpu, PICTURE.scratch_va, 1, true);
}

/// Submits `ops`, one submission with its fence each; their seqnos.
pub fn draw(ctx: &mut Ctx, gpu: &mut Vgpu, ops: &[umdev_vgpu::picture::Op]) -> Vec<u32> {
    ops.iter()
        .map(|op| {
            let cmds = umdev_vgpu::picture::commands(&[*op], PICTURE);
            ctx.next_fence(gpu, &[cmds], false)
        })
        .collect()
}
