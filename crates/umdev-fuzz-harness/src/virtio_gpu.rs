//! The virtio-gpu device's queues (`device-models/virtio-gpu`): the request
//! decoder and every command handler, over guest memory the input fills.
//!
//! The input is a sequence of records `[kind: u8][len: u16 LE][len bytes]` (a
//! truncated record ends the input):
//! - kind 0: a control-queue request (the bytes the driver wrote);
//! - kind 1: a cursor-queue request;
//! - kind 2: guest memory: the first 4 bytes are an offset into guest RAM, the
//!   rest is written there (backing for transfers);
//! - kind 3: a device reset (driver reset or front-end gone).
//!
//! Checked: no panic, no hang; every control response is a whole header whose
//! type is OK_* or ERR_* and echoes the fence the request asked for;
//! GET_DISPLAY_INFO and GET_EDID answers have their full size; the resources'
//! host memory never passes the device's limit.

use umdev::vhost_user::{LogBitmap, VhostMemory};
use umdev_virtio_gpu::protocol::{self, cmd, resp, FLAG_FENCE, HDR_SIZE};
use umdev_virtio_gpu::{GpuConfig, VirtioGpu};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: one region at [`RAM_BASE`].
pub const RAM_BASE: u64 = 0x1_0000;
pub const RAM_SIZE: u64 = 0x4_0000;
/// Host memory all resources may take (small, so the limit is reached).
pub const HOSTMEM: u64 = 1 << 20;

/// What a run did, for tests that check the seeds reach the handlers.
#[derive(Debug, Default)]
pub struct Outcome {
    pub requests: usize,
    pub ok: usize,
    pub errors: usize,
    pub flushes: u64,
}

fn memory() -> VhostMemory {
    GuestMemoryMmap::<LogBitmap>::from_ranges(&[(GuestAddress(RAM_BASE), RAM_SIZE as usize)])
        .expect("guest RAM")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Runs one input; see the module documentation.
pub fn run(data: &[u8]) -> Outcome {
    let mem = memory();
    let gpu = VirtioGpu::new(GpuConfig {
        num_scanouts: 2,
        max_hostmem: HOSTMEM,
        max_resources: 64,
        ..GpuConfig::default()
    });
    let mut out = Outcome::default();
    let mut rest = data;
    while rest.len() >= 3 {
        let kind = rest[0] & 3;
        let len = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        let Some(body) = rest.get(3..3 + len) else {
            break;
        };
        rest = &rest[3 + len..];
        match kind {
            0 => {
                out.requests += 1;
                let response = gpu.process_control(&mem, body);
                check_response(body, &response);
                if u32_at(&response, 0) < resp::ERR_UNSPEC {
                    out.ok += 1;
                } else {
                    out.errors += 1;
                }
            }
            1 => gpu.process_cursor(body),
            2 if body.len() >= 4 => {
                let offset = u64::from(u32_at(body, 0)) % RAM_SIZE;
                let bytes = &body[4..];
                let n = bytes.len().min((RAM_SIZE - offset) as usize);
                mem.write_slice(&bytes[..n], GuestAddress(RAM_BASE + offset))
                    .expect("inside guest RAM");
            }
            3 => umdev::vhost_user::VirtioDevice::reset(&gpu),
            _ => {}
        }
        assert!(gpu.hostmem() <= HOSTMEM, "host memory past the limit");
    }
    out.flushes = gpu.stats.flushes.load(std::sync::atomic::Ordering::Relaxed);
    out
}

fn check_response(request: &[u8], response: &[u8]) {
    assert!(response.len() >= HDR_SIZE, "response shorter than a header");
    let type_ = u32_at(response, 0);
    assert!(
        (resp::OK_NODATA..=resp::OK_EDID).contains(&type_)
            || (resp::ERR_UNSPEC..=resp::ERR_INVALID_PARAMETER).contains(&type_),
        "response type {type_:#x}"
    );
    if let Some(hdr) = protocol::decode_header(request) {
        if hdr.flags & FLAG_FENCE != 0 {
            assert_ne!(u32_at(response, 4) & FLAG_FENCE, 0, "fence not echoed");
            assert_eq!(&response[8..16], &hdr.fence_id.to_le_bytes(), "fence id");
        }
        match type_ {
            resp::OK_DISPLAY_INFO => assert_eq!(response.len(), HDR_SIZE + 16 * 24),
            resp::OK_EDID => assert_eq!(response.len(), HDR_SIZE + 8 + 1024),
            resp::OK_NODATA => assert_eq!(response.len(), HDR_SIZE),
            _ => {}
        }
    }
}

/// A request: header (with a fence when `fence` is set) and body words.
fn request(type_: u32, fence: bool, body: &[u32]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&type_.to_le_bytes());
    v.extend_from_slice(&(if fence { FLAG_FENCE } else { 0 }).to_le_bytes());
    v.extend_from_slice(&(if fence { 0x1234u64 } else { 0 }).to_le_bytes());
    v.extend_from_slice(&[0; 8]);
    for w in body {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

fn record(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&(body.len() as u16).to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// Hand-made seeds: a picture drawn and flushed on two scanouts, the queries,
/// the cursor, and the error paths.
pub fn virtio_gpu_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let base = RAM_BASE as u32;
    let mut pixels = vec![0u8, 0, 0, 0];
    pixels.extend((0..1024u32).map(|i| (i * 7) as u8));
    let draw = [
        record(2, &pixels),
        record(0, &request(cmd::RESOURCE_CREATE_2D, false, &[1, 2, 16, 16])),
        record(
            0,
            &request(
                cmd::RESOURCE_ATTACH_BACKING,
                false,
                &[1, 2, base, 0, 512, 0, base + 512, 0, 512, 0],
            ),
        ),
        record(
            0,
            &request(cmd::TRANSFER_TO_HOST_2D, false, &[0, 0, 16, 16, 0, 0, 1, 0]),
        ),
        record(0, &request(cmd::SET_SCANOUT, false, &[0, 0, 16, 16, 0, 1])),
        record(0, &request(cmd::SET_SCANOUT, false, &[4, 4, 8, 8, 1, 1])),
        record(
            0,
            &request(cmd::RESOURCE_FLUSH, true, &[2, 2, 10, 10, 1, 0]),
        ),
        record(0, &request(cmd::RESOURCE_DETACH_BACKING, false, &[1, 0])),
        record(0, &request(cmd::RESOURCE_UNREF, false, &[1, 0])),
    ]
    .concat();
    let queries = [
        record(0, &request(cmd::GET_DISPLAY_INFO, true, &[])),
        record(0, &request(cmd::GET_EDID, false, &[0, 0])),
        record(0, &request(cmd::GET_EDID, false, &[7, 0])),
        record(0, &request(cmd::GET_CAPSET_INFO, false, &[0, 0])),
    ]
    .concat();
    let cursor = [
        record(0, &request(cmd::RESOURCE_CREATE_2D, false, &[5, 1, 64, 64])),
        record(
            1,
            &request(cmd::UPDATE_CURSOR, false, &[0, 10, 10, 0, 5, 1, 1, 0]),
        ),
        record(
            1,
            &request(cmd::MOVE_CURSOR, false, &[1, 20, 20, 0, 0, 0, 0, 0]),
        ),
        record(3, &[]),
        record(
            1,
            &request(cmd::UPDATE_CURSOR, false, &[0, 10, 10, 0, 5, 1, 1, 0]),
        ),
    ]
    .concat();
    let errors = [
        record(
            0,
            &request(cmd::RESOURCE_CREATE_2D, false, &[1, 2, 1024, 1024]),
        ),
        record(0, &request(cmd::RESOURCE_CREATE_2D, false, &[2, 99, 4, 4])),
        record(0, &request(cmd::RESOURCE_CREATE_2D, false, &[3, 2, 4, 4])),
        record(
            0,
            &request(
                cmd::RESOURCE_ATTACH_BACKING,
                false,
                &[3, 1, 0xffff_f000, 0, 4096, 0],
            ),
        ),
        record(
            0,
            &request(cmd::RESOURCE_ATTACH_BACKING, false, &[3, 20000]),
        ),
        record(
            0,
            &request(cmd::TRANSFER_TO_HOST_2D, false, &[0, 0, 4, 4, 0, 0, 3, 0]),
        ),
        record(0, &request(cmd::RESOURCE_FLUSH, false, &[0, 0, 5, 5, 3, 0])),
        record(0, &request(cmd::SET_SCANOUT, false, &[0, 0, 4, 4, 9, 3])),
        record(0, &request(0x9999, false, &[])),
        record(0, &[1, 2, 3]),
    ]
    .concat();
    vec![
        ("draw", draw),
        ("queries", queries),
        ("cursor", cursor),
        ("errors", errors),
    ]
}
