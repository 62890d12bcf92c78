//! The DRM device through raw ioctls: dumb buffers and their mappings, KMS
//! (resources, framebuffers, SETCRTC, PAGE_FLIP and its event) and
//! umdev_vgpu.ko's own calls (umdev_vgpu_drm.h). Plain `#[repr(C)]` copies
//! of the kernel's structs; the ioctl numbers computed as `_IOC` does.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `_IOC(dir, 'd', nr, size)`.
pub const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'd' as u64) << 8) | nr
}
const fn iowr<T>(nr: u64) -> u64 {
    ioc(IOC_READ | IOC_WRITE, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u64) -> u64 {
    ioc(IOC_WRITE, nr, std::mem::size_of::<T>())
}
const fn ior<T>(nr: u64) -> u64 {
    ioc(IOC_READ, nr, std::mem::size_of::<T>())
}

#[repr(C)]
#[derive(Default, Debug)]
pub struct CreateDumb {
    pub height: u32,
    pub width: u32,
    pub bpp: u32,
    pub flags: u32,
    pub handle: u32,
    pub pitch: u32,
    pub size: u64,
}

#[repr(C)]
#[derive(Default)]
struct MapDumb {
    handle: u32,
    pad: u32,
    offset: u64,
}

#[repr(C)]
#[derive(Default)]
struct CardRes {
    fb_id_ptr: u64,
    crtc_id_ptr: u64,
    connector_id_ptr: u64,
    encoder_id_ptr: u64,
    count_fbs: u32,
    count_crtcs: u32,
    count_connectors: u32,
    count_encoders: u32,
    min_width: u32,
    max_width: u32,
    min_height: u32,
    max_height: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct ModeInfo {
    pub clock: u32,
    pub hdisplay: u16,
    pub hsync_start: u16,
    pub hsync_end: u16,
    pub htotal: u16,
    pub hskew: u16,
    pub vdisplay: u16,
    pub vsync_start: u16,
    pub vsync_end: u16,
    pub vtotal: u16,
    pub vscan: u16,
    pub vrefresh: u32,
    pub flags: u32,
    pub type_: u32,
    pub name: [u8; 32],
}

#[repr(C)]
#[derive(Default)]
struct Crtc {
    set_connectors_ptr: u64,
    count_connectors: u32,
    crtc_id: u32,
    fb_id: u32,
    x: u32,
    y: u32,
    gamma_size: u32,
    mode_valid: u32,
    mode: ModeInfo,
}

#[repr(C)]
#[derive(Default)]
struct FbCmd2 {
    fb_id: u32,
    width: u32,
    height: u32,
    pixel_format: u32,
    flags: u32,
    handles: [u32; 4],
    pitches: [u32; 4],
    offsets: [u32; 4],
    modifier: [u64; 4],
}

#[repr(C)]
#[derive(Default)]
struct PageFlip {
    crtc_id: u32,
    fb_id: u32,
    flags: u32,
    reserved: u32,
    user_data: u64,
}

// umdev_vgpu_drm.h
#[repr(C)]
#[derive(Default)]
struct VmBind {
    handle: u32,
    flags: u32,
    va: u64,
}

#[repr(C)]
#[derive(Default)]
struct VmUnbind {
    va: u64,
}

#[repr(C)]
#[derive(Default)]
struct Submit {
    batch_va: u64,
    seqno: u32,
    pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct Wait {
    seqno: u32,
    fault_reason: u32,
    timeout_ns: i64,
    fault_addr: u64,
}

#[repr(C)]
#[derive(Default, Debug)]
pub struct Info {
    pub context: u32,
    pub faults: u32,
    pub bindings: u32,
    pub tables: u32,
    pub submitted: u32,
    pub completed: u32,
}

#[repr(C)]
#[derive(Default)]
struct PokePte {
    va: u64,
    value: u64,
    level: u32,
    pad: u32,
}

pub const SET_MASTER: u64 = ioc(0, 0x1e, 0);
pub const DROP_MASTER: u64 = ioc(0, 0x1f, 0);
pub const CREATE_DUMB: u64 = iowr::<CreateDumb>(0xb2);
pub const MAP_DUMB: u64 = iowr::<MapDumb>(0xb3);
pub const GETRESOURCES: u64 = iowr::<CardRes>(0xa0);
pub const SETCRTC: u64 = iowr::<Crtc>(0xa2);
pub const ADDFB2: u64 = iowr::<FbCmd2>(0xb8);
pub const PAGE_FLIP: u64 = iowr::<PageFlip>(0xb0);
const COMMAND_BASE: u64 = 0x40;
pub const VGPU_VM_BIND: u64 = iow::<VmBind>(COMMAND_BASE);
pub const VGPU_VM_UNBIND: u64 = iow::<VmUnbind>(COMMAND_BASE + 1);
pub const VGPU_SUBMIT: u64 = iowr::<Submit>(COMMAND_BASE + 2);
pub const VGPU_WAIT: u64 = iowr::<Wait>(COMMAND_BASE + 3);
pub const VGPU_INFO: u64 = ior::<Info>(COMMAND_BASE + 4);
pub const VGPU_POKE_PTE: u64 = iow::<PokePte>(COMMAND_BASE + 5);

pub const BIND_WRITABLE: u32 = 1;
const PAGE_FLIP_EVENT: u32 = 1;
const EVENT_FLIP_COMPLETE: u32 = 2;
/// DRM_FORMAT_XRGB8888 ('XR24').
const FORMAT_XRGB8888: u32 = u32::from_le_bytes(*b"XR24");

/// How a WAIT ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WaitResult {
    Done,
    /// A fault stopped it: SPEC.md reason and address.
    Fault {
        reason: u32,
        addr: u64,
    },
}

/// An open DRM device.
pub struct Drm {
    fd: OwnedFd,
}

/// A dumb buffer mapped into this process.
pub struct Buffer {
    pub handle: u32,
    pub pitch: u32,
    pub size: usize,
    ptr: *mut u8,
}

impl Buffer {
    /// The buffer's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `size` bytes for as long as the buffer lives; the
        // GPU writes them only inside a submission the caller has waited for.
        unsafe { std::slice::from_raw_parts(self.ptr, self.size) }
    }

    pub fn write(&mut self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.size, "write past the buffer");
        // SAFETY: in bounds of the live mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `Drm::dumb`, used by no one after.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

impl Drm {
    pub fn open(path: &str) -> io::Result<Drm> {
        let c = CString::new(path).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: opens a path given as a C string; the fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Drm { fd })
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> io::Result<()> {
        loop {
            // SAFETY: `request` encodes the size of `T`, which is the kernel's
            // struct for it; `arg` is valid for reads and writes of it.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, arg as *mut T) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Becomes the DRM master (for KMS), waiting up to `timeout` for another
    /// opener that was master first to drop it.
    pub fn set_master(&self, timeout: Duration) -> io::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: an argument-less ioctl on our fd.
            if unsafe { libc::ioctl(self.fd.as_raw_fd(), SET_MASTER as _, 0) } == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if std::time::Instant::now() >= deadline {
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Gives up being the DRM master if this open made it one (a program
    /// that does not set modes leaves KMS to the one that does).
    pub fn drop_master(&self) {
        // SAFETY: an argument-less ioctl on our fd; failing (not master) is fine.
        unsafe { libc::ioctl(self.fd.as_raw_fd(), DROP_MASTER as _, 0) };
    }

    /// A `width` x `height` 32-bit dumb buffer, mapped.
    pub fn dumb(&self, width: u32, height: u32) -> io::Result<Buffer> {
        let mut c = CreateDumb {
            width,
            height,
            bpp: 32,
            ..CreateDumb::default()
        };
        self.ioctl(CREATE_DUMB, &mut c)?;
        let mut m = MapDumb {
            handle: c.handle,
            ..MapDumb::default()
        };
        self.ioctl(MAP_DUMB, &mut m)?;
        let size = c.size as usize;
        // SAFETY: maps the object at the fake offset the kernel gave; the
        // mapping is checked and owned by the returned Buffer.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                m.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Buffer {
            handle: c.handle,
            pitch: c.pitch,
            size,
            ptr: ptr.cast(),
        })
    }

    pub fn bind(&self, buffer: &Buffer, va: u64, writable: bool) -> io::Result<()> {
        let mut b = VmBind {
            handle: buffer.handle,
            flags: if writable { BIND_WRITABLE } else { 0 },
            va,
        };
        self.ioctl(VGPU_VM_BIND, &mut b)
    }

    pub fn unbind(&self, va: u64) -> io::Result<()> {
        self.ioctl(VGPU_VM_UNBIND, &mut VmUnbind { va })
    }

    /// Runs the batch at `batch_va`: its fence's sequence number.
    pub fn submit(&self, batch_va: u64) -> io::Result<u32> {
        let mut s = Submit {
            batch_va,
            ..Submit::default()
        };
        self.ioctl(VGPU_SUBMIT, &mut s)?;
        Ok(s.seqno)
    }

    pub fn wait(&self, seqno: u32, timeout: Duration) -> io::Result<WaitResult> {
        let mut w = Wait {
            seqno,
            timeout_ns: timeout.as_nanos() as i64,
            ..Wait::default()
        };
        match self.ioctl(VGPU_WAIT, &mut w) {
            Ok(()) => Ok(WaitResult::Done),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(WaitResult::Fault {
                reason: w.fault_reason,
                addr: w.fault_addr,
            }),
            Err(e) => Err(e),
        }
    }

    pub fn info(&self) -> io::Result<Info> {
        let mut i = Info::default();
        self.ioctl(VGPU_INFO, &mut i)?;
        Ok(i)
    }

    pub fn poke_pte(&self, va: u64, level: u32, value: u64) -> io::Result<()> {
        let mut p = PokePte {
            va,
            value,
            level,
            pad: 0,
        };
        self.ioctl(VGPU_POKE_PTE, &mut p)
    }

    /// The first CRTC and connector.
    pub fn first_output(&self) -> io::Result<(u32, u32)> {
        let mut r = CardRes::default();
        self.ioctl(GETRESOURCES, &mut r)?;
        let mut crtcs = vec![0u32; r.count_crtcs as usize];
        let mut connectors = vec![0u32; r.count_connectors as usize];
        let mut r2 = CardRes {
            crtc_id_ptr: crtcs.as_mut_ptr() as u64,
            connector_id_ptr: connectors.as_mut_ptr() as u64,
            count_crtcs: r.count_crtcs,
            count_connectors: r.count_connectors,
            ..CardRes::default()
        };
        self.ioctl(GETRESOURCES, &mut r2)?;
        match (crtcs.first(), connectors.first()) {
            (Some(&c), Some(&k)) => Ok((c, k)),
            _ => Err(io::Error::other("no CRTC or connector")),
        }
    }

    /// A framebuffer of `buffer` (XRGB8888).
    pub fn add_fb(&self, buffer: &Buffer, width: u32, height: u32) -> io::Result<u32> {
        let mut f = FbCmd2 {
            width,
            height,
            pixel_format: FORMAT_XRGB8888,
            ..FbCmd2::default()
        };
        f.handles[0] = buffer.handle;
        f.pitches[0] = buffer.pitch;
        self.ioctl(ADDFB2, &mut f)?;
        Ok(f.fb_id)
    }

    /// Shows `fb` on `crtc` through `connector` at a `width` x `height` mode.
    pub fn set_crtc(
        &self,
        crtc: u32,
        connector: u32,
        fb: u32,
        width: u16,
        height: u16,
    ) -> io::Result<()> {
        let mut connectors = [connector];
        let mut c = Crtc {
            set_connectors_ptr: connectors.as_mut_ptr() as u64,
            count_connectors: 1,
            crtc_id: crtc,
            fb_id: fb,
            mode_valid: 1,
            mode: mode(width, height),
            ..Crtc::default()
        };
        self.ioctl(SETCRTC, &mut c)
    }

    /// Flips `crtc` to `fb` and waits for the flip-complete event.
    pub fn page_flip(&self, crtc: u32, fb: u32, timeout: Duration) -> io::Result<()> {
        let mut p = PageFlip {
            crtc_id: crtc,
            fb_id: fb,
            flags: PAGE_FLIP_EVENT,
            user_data: 0x5547,
            ..PageFlip::default()
        };
        self.ioctl(PAGE_FLIP, &mut p)?;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return Err(io::Error::other("no flip-complete event"));
        }
        let mut buf = [0u8; 256];
        // SAFETY: reads into a local buffer of its size.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if got < 8 {
            return Err(io::Error::last_os_error());
        }
        let kind = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
        let user = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        if kind != EVENT_FLIP_COMPLETE || user != 0x5547 {
            return Err(io::Error::other(format!(
                "event {kind} user data {user:#x}"
            )));
        }
        Ok(())
    }
}

/// A `width` x `height` mode at about 60 Hz (a virtual display takes any).
fn mode(width: u16, height: u16) -> ModeInfo {
    let (htotal, vtotal) = (width + 24, height + 3);
    let mut m = ModeInfo {
        clock: (u32::from(htotal) * u32::from(vtotal) * 60).div_ceil(1000),
        hdisplay: width,
        hsync_start: width + 8,
        hsync_end: width + 16,
        htotal,
        vdisplay: height,
        vsync_start: height + 1,
        vsync_end: height + 2,
        vtotal,
        vrefresh: 60,
        ..ModeInfo::default()
    };
    let name = format!("{width}x{height}");
    m.name[..name.len()].copy_from_slice(name.as_bytes());
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(CREATE_DUMB, 0xc020_64b2);
        assert_eq!(MAP_DUMB, 0xc010_64b3);
        assert_eq!(ADDFB2, 0xc068_64b8);
        assert_eq!(SETCRTC, 0xc068_64a2);
        assert_eq!(PAGE_FLIP, 0xc018_64b0);
        assert_eq!(GETRESOURCES, 0xc040_64a0);
        // umdev_vgpu_drm.h: DRM_IOW(0x40, 16 bytes), DRM_IOWR(0x43, 24 bytes).
        assert_eq!(VGPU_VM_BIND, 0x4010_6440);
        assert_eq!(VGPU_WAIT, 0xc018_6443);
        assert_eq!(VGPU_INFO, 0x8018_6444);
        assert_eq!(std::mem::size_of::<ModeInfo>(), 68);
    }
}
