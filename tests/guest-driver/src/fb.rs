//! `UMDEV_MODE=fb`: draw a known picture on a virtio-gpu's framebuffer.
//!
//! Loads the kernel modules the initramfs carries in `/lib/modules/umdev`
//! (virtio_gpu and its dependencies, `load.list` gives the order; see
//! scripts/setup-e2e.sh), waits for `/dev/fb0` (DRM fbdev emulation on the
//! virtio-gpu), takes the framebuffer console off it so nothing else draws,
//! writes the picture of `umdev-test-patterns` and makes the kernel send it to the
//! device (TRANSFER_TO_HOST_2D + RESOURCE_FLUSH), then reports
//! `PASS fb_pattern_written <W>x<H>`.
//!
//! After the `DONE` line the guest prints `pattern::MARKER` and holds the picture
//! (does not power off) for `UMDEV_FB_HOLD_SECS` (default 60), so the host
//! can take QEMU's screendump; the harness then ends QEMU itself (QMP `quit`).
//!
//! Settings: `UMDEV_FB_TIMEOUT` seconds to wait for `/dev/fb0` (default 60),
//! `UMDEV_FB_HOLD_SECS` (above), `UMDEV_FB_DEV` (default /dev/fb0).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{info, Report};

pub use umdev_test_patterns as pattern;

use pattern::MARKER;

const MODULE_DIR: &str = "/lib/modules/umdev";

/// Set once the picture is written: [`hold`] then waits for the host.
static WRITTEN: AtomicBool = AtomicBool::new(false);

/// Whether the kernel command line asked for this mode.
pub fn selected() -> bool {
    std::env::var("UMDEV_MODE").is_ok_and(|m| m == "fb")
}

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

// ------------------------------------------------------------ the ioctls --

const FBIOGET_VSCREENINFO: libc::c_ulong = 0x4600;
const FBIOGET_FSCREENINFO: libc::c_ulong = 0x4602;
const FBIOPAN_DISPLAY: libc::c_ulong = 0x4606;
const FBIOBLANK: libc::c_ulong = 0x4611;
const FB_BLANK_UNBLANK: libc::c_ulong = 0;

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Bitfield {
    offset: u32,
    length: u32,
    msb_right: u32,
}

/// `struct fb_var_screeninfo` (160 bytes).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct VarInfo {
    xres: u32,
    yres: u32,
    xres_virtual: u32,
    yres_virtual: u32,
    xoffset: u32,
    yoffset: u32,
    bits_per_pixel: u32,
    grayscale: u32,
    red: Bitfield,
    green: Bitfield,
    blue: Bitfield,
    transp: Bitfield,
    nonstd: u32,
    activate: u32,
    height: u32,
    width: u32,
    accel_flags: u32,
    timing: [u32; 11],
    reserved: [u32; 4],
}

/// `struct fb_fix_screeninfo` (80 bytes on 64-bit).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct FixInfo {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    type_: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

fn ioctl<T>(f: &File, req: libc::c_ulong, arg: *mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` points to a live, correctly sized struct for `req`.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), req, arg) };
    if rc < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

// ---------------------------------------------------------------- modules --

/// Loads the modules of `load.list` in order; already loaded ones are fine.
fn load_modules() -> Result<String, String> {
    let list_path = Path::new(MODULE_DIR).join("load.list");
    let list = fs::read_to_string(&list_path).map_err(|e| {
        format!(
            "{}: {e} (the initramfs has no modules: run scripts/setup-e2e.sh)",
            list_path.display()
        )
    })?;
    let mut loaded = Vec::new();
    for name in list.split_whitespace() {
        let path = Path::new(MODULE_DIR).join(format!("{name}.ko"));
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let params = CString::default();
        // SAFETY: finit_module(2) on an open file with an empty parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!(
                    "finit_module {name}: {e} (modules from another kernel than the guest's?)"
                ));
            }
        }
        loaded.push(name.to_owned());
    }
    Ok(loaded.join(","))
}

// ------------------------------------------------------------ framebuffer --

/// Waits for the framebuffer device; returns it and its driver's name.
fn wait_fb(dev: &str, timeout: Duration) -> Result<(File, String), String> {
    let start = Instant::now();
    let name_path = format!(
        "/sys/class/graphics/{}/name",
        Path::new(dev)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    loop {
        if let Ok(f) = OpenOptions::new().read(true).write(true).open(dev) {
            let name = fs::read_to_string(&name_path).unwrap_or_default();
            info(&format!(
                "fb: {dev} ({}) after {} ms",
                name.trim(),
                start.elapsed().as_millis()
            ));
            return Ok((f, name.trim().to_owned()));
        }
        if start.elapsed() > timeout {
            let graphics: Vec<String> = fs::read_dir("/sys/class/graphics")
                .map(|d| {
                    d.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            return Err(format!(
                "no {dev} after {} s (/sys/class/graphics: [{}]; is a virtio-gpu present?)",
                timeout.as_secs(),
                graphics.join(" ")
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Takes the framebuffer console off every framebuffer, so the console (its
/// cursor, blanking, redraws) never draws over the picture.
fn unbind_fbcon() {
    let Ok(dir) = fs::read_dir("/sys/class/vtconsole") else {
        return;
    };
    for e in dir.filter_map(|e| e.ok()) {
        let name = fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.contains("frame buffer") {
            match fs::write(e.path().join("bind"), "0") {
                Ok(()) => info(&format!(
                    "fb: unbound {} ({})",
                    e.file_name().to_string_lossy(),
                    name.trim()
                )),
                Err(err) => info(&format!("fb: cannot unbind {}: {err}", name.trim())),
            }
        }
    }
}

/// Encodes `rgb` in the framebuffer's pixel format (8-bit channels).
fn encode(var: &VarInfo, rgb: [u8; 3], out: &mut [u8]) {
    let v = (u32::from(rgb[0]) << var.red.offset)
        | (u32::from(rgb[1]) << var.green.offset)
        | (u32::from(rgb[2]) << var.blue.offset);
    let bytes = v.to_le_bytes();
    out.copy_from_slice(&bytes[..out.len()]);
}

/// "bpp=B r=OFFSET/LENGTH g=... b=...".
fn pixel_format(var: &VarInfo) -> String {
    format!(
        "bpp={} r={}/{} g={}/{} b={}/{}",
        var.bits_per_pixel,
        var.red.offset,
        var.red.length,
        var.green.offset,
        var.green.length,
        var.blue.offset,
        var.blue.length
    )
}

/// Writes the picture and pushes it to the device; returns "WxH".
fn draw() -> Result<String, String> {
    let dev = std::env::var("UMDEV_FB_DEV").unwrap_or_else(|_| "/dev/fb0".into());
    let (fb, name) = wait_fb(&dev, env_secs("UMDEV_FB_TIMEOUT", 60))?;
    unbind_fbcon();
    let mut var = VarInfo::default();
    let mut fix = FixInfo::default();
    ioctl(&fb, FBIOGET_VSCREENINFO, &mut var, "FBIOGET_VSCREENINFO")?;
    ioctl(&fb, FBIOGET_FSCREENINFO, &mut fix, "FBIOGET_FSCREENINFO")?;
    let id = String::from_utf8_lossy(&fix.id);
    info(&format!(
        "fb: {name} id={} {}x{} virtual {}x{} offset {},{} {} line_length={} smem_len={}",
        id.trim_end_matches('\0'),
        var.xres,
        var.yres,
        var.xres_virtual,
        var.yres_virtual,
        var.xoffset,
        var.yoffset,
        pixel_format(&var),
        fix.line_length,
        fix.smem_len
    ));
    if !matches!(var.bits_per_pixel, 24 | 32)
        || [var.red, var.green, var.blue]
            .iter()
            .any(|c| c.length != 8 || c.offset % 8 != 0 || c.msb_right != 0)
    {
        return Err(format!("unsupported pixel format: {}", pixel_format(&var)));
    }
    let bpp = (var.bits_per_pixel / 8) as usize;
    let (w, h) = (var.xres, var.yres);
    let line = fix.line_length as usize;
    if line < w as usize * bpp {
        return Err(format!("line_length {line} < {w} * {bpp}"));
    }
    // Console off this framebuffer's VT and screen unblanked (ignored when
    // the driver has no blanking).
    // SAFETY: FBIOBLANK takes its argument by value.
    unsafe { libc::ioctl(fb.as_raw_fd(), FBIOBLANK, FB_BLANK_UNBLANK) };

    // The visible rows, from the displayed offset, one write(2) per row: the
    // fbdev write path marks them damaged and the DRM helper's worker sends
    // them to the device (TRANSFER_TO_HOST_2D + RESOURCE_FLUSH).
    let mut row = vec![0u8; w as usize * bpp];
    let base = var.yoffset as usize * line + var.xoffset as usize * bpp;
    for y in 0..h {
        for (x, px) in row.chunks_exact_mut(bpp).enumerate() {
            encode(&var, pattern::rgb(x as u32, y), px);
        }
        let at = (base + y as usize * line) as u64;
        fb.write_all_at(&row, at)
            .map_err(|e| format!("write row {y} at {at:#x}: {e}"))?;
    }
    // A pan to the same offset commits the plane again: the whole
    // framebuffer is flushed once more, whatever the damage worker did.
    let mut pan = var;
    ioctl(&fb, FBIOPAN_DISPLAY, &mut pan, "FBIOPAN_DISPLAY")?;
    // The damage worker runs asynchronously; let it finish.
    std::thread::sleep(Duration::from_millis(500));

    // Read back what the framebuffer holds (catches a wrong offset/stride).
    let mut got = vec![0u8; w as usize * bpp];
    for y in [0, h / 2, h - 1] {
        for (x, px) in row.chunks_exact_mut(bpp).enumerate() {
            encode(&var, pattern::rgb(x as u32, y), px);
        }
        let at = (base + y as usize * line) as u64;
        fb.read_exact_at(&mut got, at)
            .map_err(|e| format!("read back row {y}: {e}"))?;
        if got != row {
            return Err(format!("row {y} reads back differently"));
        }
    }
    // Keep the device open while the host looks at it.
    std::mem::forget(fb);
    Ok(format!("{w}x{h}"))
}

/// The fb mode's checks, run instead of the edu tests.
pub fn run(rep: &mut Report) -> Result<(), String> {
    let started = Instant::now();
    let loaded = load_modules();
    let ok = loaded.is_ok();
    rep.result("fb_modules_loaded", loaded);
    if !ok {
        return Ok(());
    }
    info(&format!(
        "fb: modules loaded in {} ms",
        started.elapsed().as_millis()
    ));
    let r = draw();
    if r.is_ok() {
        WRITTEN.store(true, Ordering::SeqCst);
    }
    rep.result("fb_pattern_written", r);
    Ok(())
}

/// After DONE: when the picture was written, prints [`MARKER`] and waits
/// (for the host to take its screendump and end QEMU), at most
/// `UMDEV_FB_HOLD_SECS`.
pub fn hold() {
    if !WRITTEN.load(Ordering::SeqCst) {
        return;
    }
    let hold = env_secs("UMDEV_FB_HOLD_SECS", 60);
    info(MARKER);
    std::thread::sleep(hold);
    info(&format!(
        "fb: held the picture {} s; nobody ended QEMU",
        hold.as_secs()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes() {
        assert_eq!(std::mem::size_of::<VarInfo>(), 160);
        assert_eq!(std::mem::size_of::<FixInfo>(), 80);
    }

    #[test]
    fn encodes_xrgb8888() {
        let var = VarInfo {
            bits_per_pixel: 32,
            red: Bitfield {
                offset: 16,
                length: 8,
                msb_right: 0,
            },
            green: Bitfield {
                offset: 8,
                length: 8,
                msb_right: 0,
            },
            blue: Bitfield {
                offset: 0,
                length: 8,
                msb_right: 0,
            },
            ..VarInfo::default()
        };
        let mut px = [0u8; 4];
        encode(&var, [0x11, 0x22, 0x33], &mut px);
        assert_eq!(px, [0x33, 0x22, 0x11, 0x00]);
    }

    #[test]
    fn pattern_is_varied() {
        let p = pattern::rgb;
        assert_eq!(p(0, 0), [0xff, 0xff, 0xff]);
        assert_eq!(p(80, 0), [0xff, 0xff, 0x00]);
        assert_eq!(p(50, 50), [0x12, 0x34, 0x56]);
        assert_ne!(p(1, 200), p(2, 200));
        assert_ne!(p(1, 200), p(1, 201));
        assert_ne!(p(0, 500), p(16, 500));
    }
}
