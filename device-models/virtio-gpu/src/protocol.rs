//! The virtio-gpu control and cursor queue wire format (virtio spec 1.3, §5.7),
//! 2D subset: plain structs, a decoder from the bytes a driver wrote, and an
//! encoder for responses. No device state here, so it can be fuzzed alone.

/// Control header flag: the driver wants this request fenced.
pub const FLAG_FENCE: u32 = 1 << 0;
/// Control header flag: `ring_idx` is valid.
pub const FLAG_INFO_RING_IDX: u32 = 1 << 1;

/// Feature bit: the device answers GET_EDID.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;

/// Size of `struct virtio_gpu_ctrl_hdr`.
pub const HDR_SIZE: usize = 24;
/// Most scanouts the protocol can describe.
pub const MAX_SCANOUTS: usize = 16;
/// Most backing entries one ATTACH_BACKING may carry (QEMU's limit).
pub const MAX_BACKING_ENTRIES: u32 = 16384;
/// The longest request the decoder reads: ATTACH_BACKING with the most entries.
pub const MAX_REQUEST_SIZE: usize = HDR_SIZE + 8 + 16 * MAX_BACKING_ENTRIES as usize;
/// Size of the EDID blob in a GET_EDID response.
pub const EDID_BLOB_SIZE: usize = 1024;

/// Command types (`enum virtio_gpu_ctrl_type`).
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    pub const GET_CAPSET: u32 = 0x0109;
    pub const GET_EDID: u32 = 0x010a;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types.
pub mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `struct virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    pub type_: u32,
    pub flags: u32,
    pub fence_id: u64,
    pub ctx_id: u32,
    pub ring_idx: u8,
}

/// `struct virtio_gpu_rect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// Whether the rectangle lies inside a `width` x `height` surface (no
    /// overflow: coordinates are u32, sums are taken in u64).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        u64::from(self.x) + u64::from(self.width) <= u64::from(width)
            && u64::from(self.y) + u64::from(self.height) <= u64::from(height)
    }

    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// The overlap of two rectangles (empty if they do not overlap).
    pub fn intersect(&self, other: &Rect) -> Rect {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = (u64::from(self.x) + u64::from(self.width))
            .min(u64::from(other.x) + u64::from(other.width));
        let y1 = (u64::from(self.y) + u64::from(self.height))
            .min(u64::from(other.y) + u64::from(other.height));
        if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
            return Rect::default();
        }
        Rect {
            x: x0,
            y: y0,
            width: (x1 - u64::from(x0)) as u32,
            height: (y1 - u64::from(y0)) as u32,
        }
    }
}

/// One `struct virtio_gpu_mem_entry`: a guest-physical range of backing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub length: u32,
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout_id: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout_id: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    AttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    DetachBacking {
        resource_id: u32,
    },
    /// UPDATE_CURSOR (`move_only` false) or MOVE_CURSOR (true).
    Cursor {
        move_only: bool,
        pos: CursorPos,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    /// A command the device knows but does not implement (3D, blobs, capsets).
    Unsupported(u32),
}

/// Why a request could not be decoded; each maps to an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("request of {got} bytes is shorter than the {need} its type needs")]
    Short { got: usize, need: usize },
    #[error("unknown command type {0:#x}")]
    UnknownType(u32),
    #[error("ATTACH_BACKING with {0} entries (at most {MAX_BACKING_ENTRIES})")]
    TooManyEntries(u32),
}

impl DecodeError {
    /// The response type a driver gets for this error.
    pub fn response(&self) -> u32 {
        match self {
            DecodeError::TooManyEntries(_) => resp::ERR_INVALID_PARAMETER,
            _ => resp::ERR_UNSPEC,
        }
    }
}

/// Little-endian field reader over a request; every read is bounds-checked.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl Fields<'_> {
    fn u32(&self, at: usize) -> u32 {
        let b = &self.bytes[at..at + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    fn u64(&self, at: usize) -> u64 {
        u64::from(self.u32(at)) | u64::from(self.u32(at + 4)) << 32
    }

    fn rect(&self, at: usize) -> Rect {
        Rect {
            x: self.u32(at),
            y: self.u32(at + 4),
            width: self.u32(at + 8),
            height: self.u32(at + 12),
        }
    }
}

/// Decodes the header of a request (`None` if it is shorter than a header).
pub fn decode_header(bytes: &[u8]) -> Option<CtrlHdr> {
    if bytes.len() < HDR_SIZE {
        return None;
    }
    let f = Fields { bytes };
    Some(CtrlHdr {
        type_: f.u32(0),
        flags: f.u32(4),
        fence_id: f.u64(8),
        ctx_id: f.u32(16),
        ring_idx: bytes[20],
    })
}

/// Size of the fixed part of each command (header included).
fn fixed_size(type_: u32) -> Option<usize> {
    Some(match type_ {
        cmd::GET_DISPLAY_INFO => HDR_SIZE,
        cmd::GET_EDID => HDR_SIZE + 8,
        cmd::RESOURCE_CREATE_2D => HDR_SIZE + 16,
        cmd::RESOURCE_UNREF => HDR_SIZE + 8,
        cmd::SET_SCANOUT => HDR_SIZE + 24,
        cmd::RESOURCE_FLUSH => HDR_SIZE + 24,
        cmd::TRANSFER_TO_HOST_2D => HDR_SIZE + 32,
        cmd::RESOURCE_ATTACH_BACKING => HDR_SIZE + 8,
        cmd::RESOURCE_DETACH_BACKING => HDR_SIZE + 8,
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => HDR_SIZE + 32,
        cmd::GET_CAPSET_INFO | cmd::GET_CAPSET => HDR_SIZE,
        // Blob, UUID and 3D commands: known, answered as unsupported.
        0x010b..=0x02ff => HDR_SIZE,
        _ => return None,
    })
}

/// Decodes a whole request (header and body) as the driver wrote it.
pub fn decode(bytes: &[u8]) -> Result<(CtrlHdr, Command), DecodeError> {
    let hdr = decode_header(bytes).ok_or(DecodeError::Short {
        got: bytes.len(),
        need: HDR_SIZE,
    })?;
    let need = fixed_size(hdr.type_).ok_or(DecodeError::UnknownType(hdr.type_))?;
    if bytes.len() < need {
        return Err(DecodeError::Short {
            got: bytes.len(),
            need,
        });
    }
    let f = Fields { bytes };
    let b = HDR_SIZE;
    let command = match hdr.type_ {
        cmd::GET_DISPLAY_INFO => Command::GetDisplayInfo,
        cmd::GET_EDID => Command::GetEdid {
            scanout_id: f.u32(b),
        },
        cmd::RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource_id: f.u32(b),
            format: f.u32(b + 4),
            width: f.u32(b + 8),
            height: f.u32(b + 12),
        },
        cmd::RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: f.u32(b),
        },
        cmd::SET_SCANOUT => Command::SetScanout {
            rect: f.rect(b),
            scanout_id: f.u32(b + 16),
            resource_id: f.u32(b + 20),
        },
        cmd::RESOURCE_FLUSH => Command::ResourceFlush {
            rect: f.rect(b),
            resource_id: f.u32(b + 16),
        },
        cmd::TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: f.rect(b),
            offset: f.u64(b + 16),
            resource_id: f.u32(b + 24),
        },
        cmd::RESOURCE_ATTACH_BACKING => {
            let resource_id = f.u32(b);
            let nr_entries = f.u32(b + 4);
            if nr_entries > MAX_BACKING_ENTRIES {
                return Err(DecodeError::TooManyEntries(nr_entries));
            }
            let need = need + 16 * nr_entries as usize;
            if bytes.len() < need {
                return Err(DecodeError::Short {
                    got: bytes.len(),
                    need,
                });
            }
            let entries = (0..nr_entries as usize)
                .map(|i| {
                    let at = b + 8 + 16 * i;
                    MemEntry {
                        addr: f.u64(at),
                        length: f.u32(at + 8),
                    }
                })
                .collect();
            Command::AttachBacking {
                resource_id,
                entries,
            }
        }
        cmd::RESOURCE_DETACH_BACKING => Command::DetachBacking {
            resource_id: f.u32(b),
        },
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => Command::Cursor {
            move_only: hdr.type_ == cmd::MOVE_CURSOR,
            pos: CursorPos {
                scanout_id: f.u32(b),
                x: f.u32(b + 4),
                y: f.u32(b + 8),
            },
            resource_id: f.u32(b + 16),
            hot_x: f.u32(b + 20),
            hot_y: f.u32(b + 24),
        },
        other => Command::Unsupported(other),
    };
    Ok((hdr, command))
}

/// A response header for request `req`: the fence flag, fence id, context and
/// ring index are echoed so the driver can match a fenced reply.
pub fn response_header(req: &CtrlHdr, type_: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HDR_SIZE);
    push_header(&mut out, req, type_);
    out
}

fn push_header(out: &mut Vec<u8>, req: &CtrlHdr, type_: u32) {
    let flags = req.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX);
    out.extend_from_slice(&type_.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&req.fence_id.to_le_bytes());
    out.extend_from_slice(&req.ctx_id.to_le_bytes());
    let ring_idx = if flags & FLAG_INFO_RING_IDX != 0 {
        req.ring_idx
    } else {
        0
    };
    out.extend_from_slice(&[ring_idx, 0, 0, 0]);
}

/// One scanout as GET_DISPLAY_INFO reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayMode {
    pub rect: Rect,
    pub enabled: bool,
}

/// `struct virtio_gpu_resp_display_info`.
pub fn display_info_response(req: &CtrlHdr, modes: &[DisplayMode]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HDR_SIZE + MAX_SCANOUTS * 24);
    push_header(&mut out, req, resp::OK_DISPLAY_INFO);
    for i in 0..MAX_SCANOUTS {
        let m = modes.get(i).copied().unwrap_or_default();
        for v in [
            m.rect.x,
            m.rect.y,
            m.rect.width,
            m.rect.height,
            u32::from(m.enabled),
            0,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// `struct virtio_gpu_resp_edid` (the blob is cut to [`EDID_BLOB_SIZE`]).
pub fn edid_response(req: &CtrlHdr, edid: &[u8]) -> Vec<u8> {
    let len = edid.len().min(EDID_BLOB_SIZE);
    let mut out = Vec::with_capacity(HDR_SIZE + 8 + EDID_BLOB_SIZE);
    push_header(&mut out, req, resp::OK_EDID);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&edid[..len]);
    out.resize(HDR_SIZE + 8 + EDID_BLOB_SIZE, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(type_: u32, body: &[u32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&type_.to_le_bytes());
        v.extend_from_slice(&FLAG_FENCE.to_le_bytes());
        v.extend_from_slice(&7u64.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        for w in body {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    #[test]
    fn decodes_each_2d_command() {
        let (h, c) = decode(&request(cmd::RESOURCE_CREATE_2D, &[5, 2, 640, 480])).unwrap();
        assert_eq!(h.fence_id, 7);
        assert_eq!(
            c,
            Command::ResourceCreate2d {
                resource_id: 5,
                format: 2,
                width: 640,
                height: 480
            }
        );
        let (_, c) = decode(&request(
            cmd::TRANSFER_TO_HOST_2D,
            &[1, 2, 3, 4, 0x10, 0x1, 9, 0],
        ))
        .unwrap();
        assert_eq!(
            c,
            Command::TransferToHost2d {
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 3,
                    height: 4
                },
                offset: 0x1_0000_0010,
                resource_id: 9
            }
        );
        let (_, c) = decode(&request(
            cmd::RESOURCE_ATTACH_BACKING,
            &[3, 2, 0x1000, 0, 4096, 0, 0x3000, 0, 100, 0],
        ))
        .unwrap();
        assert_eq!(
            c,
            Command::AttachBacking {
                resource_id: 3,
                entries: vec![
                    MemEntry {
                        addr: 0x1000,
                        length: 4096
                    },
                    MemEntry {
                        addr: 0x3000,
                        length: 100
                    }
                ]
            }
        );
    }

    #[test]
    fn short_unknown_and_oversized_requests_are_errors() {
        assert!(matches!(decode(&[0; 10]), Err(DecodeError::Short { .. })));
        assert!(matches!(
            decode(&request(cmd::SET_SCANOUT, &[0, 0, 1])),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(
            decode(&request(0x9999, &[])),
            Err(DecodeError::UnknownType(0x9999))
        );
        assert_eq!(
            decode(&request(cmd::RESOURCE_ATTACH_BACKING, &[1, u32::MAX])),
            Err(DecodeError::TooManyEntries(u32::MAX))
        );
        // Entries promised but not present.
        assert!(matches!(
            decode(&request(cmd::RESOURCE_ATTACH_BACKING, &[1, 3, 0, 0])),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn response_echoes_fence() {
        let (h, _) = decode(&request(cmd::GET_DISPLAY_INFO, &[])).unwrap();
        let r = response_header(&h, resp::OK_NODATA);
        assert_eq!(r.len(), HDR_SIZE);
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), FLAG_FENCE);
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7);
        let d = display_info_response(&h, &[]);
        assert_eq!(d.len(), 24 + 16 * 24);
        assert_eq!(edid_response(&h, &[1; 2000]).len(), 24 + 8 + 1024);
    }

    #[test]
    fn rect_fit_and_intersection_do_not_overflow() {
        let r = Rect {
            x: u32::MAX,
            y: 0,
            width: 2,
            height: 1,
        };
        assert!(!r.fits_in(u32::MAX, 1));
        let a = Rect {
            x: 10,
            y: 10,
            width: 10,
            height: 10,
        };
        let b = Rect {
            x: 15,
            y: 0,
            width: 100,
            height: 12,
        };
        assert_eq!(
            a.intersect(&b),
            Rect {
                x: 15,
                y: 10,
                width: 5,
                height: 2
            }
        );
        assert!(a.intersect(&r).is_empty());
    }
}
