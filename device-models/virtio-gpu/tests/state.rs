//! virtio-gpu's state through the device contract, in process: resources,
//! their pixels and backing, and scanouts saved mid-workload, restored into a
//! fresh device, continued, with what the display receives the same as from a
//! device that never stopped; hostile blobs refused without a change.

use std::sync::{Arc, Mutex};

use umdev::vhost_user::{LogBitmap, VhostMemory, VirtioDevice};
use umdev_virtio_gpu::display::DisplayOutput;
use umdev_virtio_gpu::protocol::{cmd, resp, DisplayMode, Rect};
use umdev_virtio_gpu::{GpuConfig, VirtioGpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 0x10_0000;
const W: u32 = 64;
const H: u32 = 32;
const B8G8R8X8: u32 = 2;

/// One update a display was sent: scanout, rectangle, pixels.
type Update = (u32, Rect, Vec<u8>);

/// What a display was sent.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Update>>>);

impl DisplayOutput for Recorder {
    fn display_info(&self) -> Option<Vec<DisplayMode>> {
        None
    }
    fn edid(&self, _: u32) -> Option<Vec<u8>> {
        None
    }
    fn set_scanout(&self, _: u32, _: u32, _: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn update(&self, scanout: u32, rect: Rect, bgrx: &[u8]) -> std::io::Result<()> {
        self.0.lock().unwrap().push((scanout, rect, bgrx.to_vec()));
        Ok(())
    }
    fn cursor(
        &self,
        _: u32,
        _: u32,
        _: u32,
        _: (u32, u32),
        _: Option<&[u8]>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor(&self, _: u32, _: u32, _: u32) -> std::io::Result<()> {
        Ok(())
    }
}

fn memory() -> VhostMemory {
    GuestMemoryMmap::<LogBitmap>::from_ranges(&[(GuestAddress(RAM), 1 << 20)]).unwrap()
}

fn gpu() -> (VirtioGpu, Recorder) {
    let gpu = VirtioGpu::new(GpuConfig {
        num_scanouts: 1,
        ..GpuConfig::default()
    });
    let rec = Recorder::default();
    gpu.set_display(Box::new(rec.clone()));
    (gpu, rec)
}

fn request(type_: u32, body: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&type_.to_le_bytes());
    v.extend_from_slice(&[0; 20]);
    for w in body {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn ok(gpu: &VirtioGpu, mem: &VhostMemory, req: Vec<u8>) {
    let r = gpu.process_control(mem, &req);
    assert_eq!(
        u32::from_le_bytes(r[..4].try_into().unwrap()),
        resp::OK_NODATA,
        "request {:#x}",
        u32::from_le_bytes(req[..4].try_into().unwrap())
    );
}

fn transfer(gpu: &VirtioGpu, mem: &VhostMemory, rect: [u32; 4], offset: u64) {
    let mut body = rect.to_vec();
    body.extend([offset as u32, (offset >> 32) as u32, 1, 0]);
    ok(gpu, mem, request(cmd::TRANSFER_TO_HOST_2D, &body));
}

fn flush(gpu: &VirtioGpu, mem: &VhostMemory) {
    ok(gpu, mem, request(cmd::RESOURCE_FLUSH, &[0, 0, W, H, 1, 0]));
}

fn first_half(gpu: &VirtioGpu, mem: &VhostMemory) {
    let pixels: Vec<u8> = (0..W * H * 4).map(|i| (i * 7 % 251) as u8).collect();
    mem.write_slice(&pixels, GuestAddress(RAM)).unwrap();
    ok(
        gpu,
        mem,
        request(cmd::RESOURCE_CREATE_2D, &[1, B8G8R8X8, W, H]),
    );
    // Backing in two entries.
    let half = W * H * 2;
    let entries = [
        RAM as u32,
        (RAM >> 32) as u32,
        half,
        0,
        (RAM + u64::from(half)) as u32,
        0,
        half,
        0,
    ];
    let mut body = vec![1, 2];
    body.extend(entries);
    ok(gpu, mem, request(cmd::RESOURCE_ATTACH_BACKING, &body));
    transfer(gpu, mem, [0, 0, W, H], 0);
    ok(gpu, mem, request(cmd::SET_SCANOUT, &[0, 0, W, H, 0, 1]));
    flush(gpu, mem);
}

fn second_half(gpu: &VirtioGpu, mem: &VhostMemory) {
    // New pixels in part of guest memory, transferred and shown.
    mem.write_slice(&[0xee; 4 * 16], GuestAddress(RAM + 4 * u64::from(W) * 3))
        .unwrap();
    transfer(gpu, mem, [0, 3, 16, 1], 4 * u64::from(W) * 3);
    flush(gpu, mem);
}

#[test]
fn saved_mid_workload_and_continued_elsewhere_gives_the_same_picture() {
    let mem = memory();
    let (reference, ref_rec) = gpu();
    first_half(&reference, &mem);
    second_half(&reference, &mem);
    let want = ref_rec.0.lock().unwrap().last().cloned().unwrap();

    let mem = memory();
    let (source, _) = gpu();
    first_half(&source, &mem);
    let blob = source.save().unwrap();
    let (destination, rec) = gpu();
    destination.restore(&blob).unwrap();
    assert_eq!(destination.hostmem(), source.hostmem());
    second_half(&destination, &mem);
    let got = rec.0.lock().unwrap().last().cloned().unwrap();
    assert_eq!(got, want);
}

#[test]
fn hostile_blobs_are_refused_and_change_nothing() {
    let mem = memory();
    let (source, _) = gpu();
    first_half(&source, &mem);
    let blob = source.save().unwrap();
    let (target, _) = gpu();
    let before = target.save().unwrap();
    for len in (0..blob.len()).step_by(61) {
        assert!(target.restore(&blob[..len]).is_err(), "truncated to {len}");
    }
    for i in (0..200.min(blob.len())).step_by(3) {
        let mut bad = blob.clone();
        bad[i] ^= 0xa5;
        let _ = target.restore(&bad);
        target.restore(&before).unwrap();
    }
    assert_eq!(target.save().unwrap(), before);
    // A device with a smaller host-memory limit does not take it.
    let small = VirtioGpu::new(GpuConfig {
        num_scanouts: 1,
        max_hostmem: 4096,
        ..GpuConfig::default()
    });
    assert!(small.restore(&blob).is_err());
}

/// The same scanout through `--vnc`'s frame source: a viewer sees what the
/// display was sent, before and after the state moved to another device.
#[test]
fn a_vnc_viewer_sees_the_scanout_before_and_after_a_restore() {
    use umdev::vnc::{client::VncClient, Listen, VncConfig, VncServer};
    let mem = memory();
    let (gpu, rec) = gpu();
    let gpu = Arc::new(gpu);
    first_half(&gpu, &mem);
    let config = |name: &str| VncConfig {
        listen: Listen::Tcp("127.0.0.1:0".parse().unwrap()),
        password: None,
        fps: 60,
        name: name.into(),
    };
    let shown = |server: &VncServer, want: &[u8]| {
        let at = Listen::Tcp(server.local_addr().unwrap());
        let mut c = VncClient::connect(&at, None).unwrap();
        assert_eq!((c.frame.width, c.frame.height), (W, H));
        c.request(false).unwrap();
        c.read_update().unwrap();
        // The X byte is not carried.
        let strip = |p: &[u8]| {
            p.chunks(4)
                .flat_map(|c| [c[0], c[1], c[2]])
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&c.frame.pixels), strip(want));
    };
    let last = rec.0.lock().unwrap().last().unwrap().2.clone();
    let source = VncServer::start(config("source"), gpu.display(0)).unwrap();
    shown(&source, &last);
    let blob = gpu.save().unwrap();
    let (restored, _) = self::gpu();
    let restored = Arc::new(restored);
    restored.restore(&blob).unwrap();
    let destination = VncServer::start(config("destination"), restored.display(0)).unwrap();
    shown(&destination, &last);
}
