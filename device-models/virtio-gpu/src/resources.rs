//! 2D resources: host-side pixel storage, the guest pages that back them, and
//! TRANSFER_TO_HOST_2D between the two. Every size and offset the guest gives
//! is checked here, with sums taken in u64.
//!
//! Backing is read through the memory of the request being handled, never
//! through pointers kept from an earlier one. If the front-end takes that
//! memory away during a transfer, the reads return zeroes (the SIGBUS guard)
//! and the glue drops the request afterwards (`guarded_memory` in
//! `umdev::vhost_user`): at worst a resource holds zeroes nobody will see.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::protocol::{resp, MemEntry, Rect};

/// Pixel formats (`enum virtio_gpu_formats`); each names its bytes in memory
/// order, so `B8G8R8X8` is bytes B, G, R, X (DRM's XRGB8888 on little-endian).
pub mod format {
    pub use virtio_bindings::virtio_gpu::{
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM as A8B8G8R8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM as A8R8G8B8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM as B8G8R8A8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM as B8G8R8X8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM as R8G8B8A8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM as R8G8B8X8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM as X8B8G8R8_UNORM,
        virtio_gpu_formats_VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM as X8R8G8B8_UNORM,
    };
}

const BYTES_PER_PIXEL: u64 = 4;

/// Byte positions of (B, G, R, alpha) in a pixel of `format`; alpha `None` for
/// the X formats. `None` for formats the device does not know.
fn layout(format: u32) -> Option<([usize; 3], Option<usize>)> {
    use format::*;
    Some(match format {
        B8G8R8A8_UNORM => ([0, 1, 2], Some(3)),
        B8G8R8X8_UNORM => ([0, 1, 2], None),
        A8R8G8B8_UNORM => ([3, 2, 1], Some(0)),
        X8R8G8B8_UNORM => ([3, 2, 1], None),
        R8G8B8A8_UNORM => ([2, 1, 0], Some(3)),
        R8G8B8X8_UNORM => ([2, 1, 0], None),
        A8B8G8R8_UNORM => ([1, 2, 3], Some(0)),
        X8B8G8R8_UNORM => ([1, 2, 3], None),
        _ => return None,
    })
}

/// Whether the device accepts resources of `format`.
pub fn is_supported_format(format: u32) -> bool {
    layout(format).is_some()
}

/// Converts pixels of `format` to bytes B, G, R, A (pixman's a8r8g8b8 on
/// little-endian, which QEMU's display and cursor take); alpha is 0xff for the
/// X formats.
pub fn to_bgra(format: u32, src: &[u8], dst: &mut Vec<u8>) {
    let Some(([b, g, r], a)) = layout(format) else {
        return;
    };
    dst.reserve(src.len());
    for px in src.chunks_exact(4) {
        dst.extend_from_slice(&[px[b], px[g], px[r], a.map_or(0xff, |a| px[a])]);
    }
}

/// Why a resource operation failed; each maps to a virtio-gpu error response.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("resource {0} does not exist")]
    NoSuchResource(u32),
    #[error("resource id {0} is 0 or already in use")]
    BadResourceId(u32),
    #[error("format {0} is not supported")]
    BadFormat(u32),
    #[error("{width}x{height} is not a valid resource size")]
    BadSize { width: u32, height: u32 },
    #[error("{0} bytes of resources would pass the device's host memory limit")]
    OutOfMemory(u64),
    #[error("too many resources (at most {0})")]
    TooManyResources(usize),
    #[error("rectangle {rect:?} is not inside the {width}x{height} resource")]
    RectOutside { rect: Rect, width: u32, height: u32 },
    #[error("backing entry {index} ({addr:#x}+{length:#x}) is not guest memory")]
    BadBacking {
        index: usize,
        addr: u64,
        length: u32,
    },
    #[error("resource {0} has no backing")]
    NoBacking(u32),
    #[error("resource {0} already has backing")]
    AlreadyBacked(u32),
    #[error("transfer reads {end:#x} bytes into a backing of {len:#x}")]
    TransferOutside { end: u64, len: u64 },
    #[error("guest memory of the backing went away: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

impl ResourceError {
    /// The response type a driver gets for this error.
    pub fn response(&self) -> u32 {
        match self {
            ResourceError::NoSuchResource(_) | ResourceError::BadResourceId(_) => {
                resp::ERR_INVALID_RESOURCE_ID
            }
            ResourceError::OutOfMemory(_) | ResourceError::TooManyResources(_) => {
                resp::ERR_OUT_OF_MEMORY
            }
            ResourceError::Memory(_) | ResourceError::AlreadyBacked(_) => resp::ERR_UNSPEC,
            _ => resp::ERR_INVALID_PARAMETER,
        }
    }
}

/// The guest pages backing a resource: the entries in order, as one linear
/// byte range.
#[derive(Debug, Clone, Default)]
pub struct Backing {
    entries: Vec<MemEntry>,
    /// Linear offset at which each entry starts.
    starts: Vec<u64>,
    len: u64,
}

impl Backing {
    /// Validates each entry against guest memory as it is now (it is checked
    /// again at every transfer, since the front-end may replace memory).
    pub fn new<M: GuestMemoryBackend>(
        mem: &M,
        entries: Vec<MemEntry>,
    ) -> Result<Backing, ResourceError> {
        let mut starts = Vec::with_capacity(entries.len());
        let mut len = 0u64;
        for (index, e) in entries.iter().enumerate() {
            let bad = || ResourceError::BadBacking {
                index,
                addr: e.addr,
                length: e.length,
            };
            if e.length != 0 && !mem.check_range(GuestAddress(e.addr), e.length as usize) {
                return Err(bad());
            }
            starts.push(len);
            len += u64::from(e.length);
        }
        Ok(Backing {
            entries,
            starts,
            len,
        })
    }

    /// A backing restored from a snapshot: not checked against guest memory
    /// here (there may be none yet); every transfer checks its entries.
    pub fn unchecked(entries: Vec<MemEntry>) -> Backing {
        let mut starts = Vec::with_capacity(entries.len());
        let mut len = 0u64;
        for e in &entries {
            starts.push(len);
            len += u64::from(e.length);
        }
        Backing {
            entries,
            starts,
            len,
        }
    }

    pub fn entries(&self) -> &[MemEntry] {
        &self.entries
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads `buf.len()` bytes at linear `offset` of the backing.
    pub fn read_at<M: GuestMemoryBackend>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ResourceError> {
        let end = offset.saturating_add(buf.len() as u64);
        if end > self.len {
            return Err(ResourceError::TransferOutside { end, len: self.len });
        }
        if buf.is_empty() {
            // Nothing to read, and a backing of no entries has no entry to
            // start from.
            return Ok(());
        }
        // The entry holding `offset`: the last one starting at or before it.
        let mut index = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut within = offset - self.starts[index];
        let mut done = 0;
        while done < buf.len() {
            let e = self.entries[index];
            let take = ((u64::from(e.length) - within) as usize).min(buf.len() - done);
            if take > 0 {
                mem.read_slice(&mut buf[done..done + take], GuestAddress(e.addr + within))?;
            }
            done += take;
            index += 1;
            within = 0;
        }
        Ok(())
    }
}

/// A 2D resource: host pixels in the resource's own format, `width * 4` bytes
/// per line.
#[derive(Debug)]
pub struct Resource2d {
    pub format: u32,
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
    pub backing: Option<Backing>,
}

impl Resource2d {
    /// Bytes of host memory a `width` x `height` resource takes.
    pub fn host_size(width: u32, height: u32) -> u64 {
        u64::from(width) * u64::from(height) * BYTES_PER_PIXEL
    }

    pub fn stride(&self) -> usize {
        self.width as usize * BYTES_PER_PIXEL as usize
    }

    /// TRANSFER_TO_HOST_2D: copies `rect` from the backing into the host
    /// pixels. Line `i` of the rectangle is read at `offset + i * stride` of the
    /// backing (the layout Linux and QEMU use).
    pub fn transfer_to_host<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        resource_id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), ResourceError> {
        if !rect.fits_in(self.width, self.height) {
            return Err(ResourceError::RectOutside {
                rect,
                width: self.width,
                height: self.height,
            });
        }
        let backing = self
            .backing
            .as_ref()
            .ok_or(ResourceError::NoBacking(resource_id))?;
        let stride = self.stride();
        let line = rect.width as usize * BYTES_PER_PIXEL as usize;
        // Check the last line's end before touching anything, so a transfer is
        // applied whole or not at all (short of guest memory vanishing).
        if rect.height > 0 && line > 0 {
            let last = offset
                .checked_add((u64::from(rect.height) - 1) * stride as u64)
                .and_then(|o| o.checked_add(line as u64))
                .unwrap_or(u64::MAX);
            if last > backing.len() {
                return Err(ResourceError::TransferOutside {
                    end: last,
                    len: backing.len(),
                });
            }
        }
        for row in 0..rect.height as usize {
            let src = offset + (row * stride) as u64;
            let dst = (rect.y as usize + row) * stride + rect.x as usize * 4;
            backing.read_at(mem, src, &mut self.pixels[dst..dst + line])?;
        }
        Ok(())
    }

    /// The pixels of `rect` (inside the resource) as B, G, R, A bytes, `rect.width
    /// * 4` per line.
    pub fn read_bgra(&self, rect: Rect) -> Vec<u8> {
        let stride = self.stride();
        let line = rect.width as usize * 4;
        let mut out = Vec::with_capacity(line * rect.height as usize);
        for row in 0..rect.height as usize {
            let at = (rect.y as usize + row) * stride + rect.x as usize * 4;
            to_bgra(self.format, &self.pixels[at..at + line], &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x4000)]).unwrap()
    }

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// Backing entries from (address, length) pairs.
    fn entries(list: &[(u64, u32)]) -> Vec<MemEntry> {
        list.iter()
            .map(|&(addr, length)| MemEntry { addr, length })
            .collect()
    }

    #[test]
    fn backing_gathers_across_entries_and_rejects_outside() {
        let mem = memory();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x1ffe))
            .unwrap();
        mem.write_slice(&[9, 8], GuestAddress(0x3000)).unwrap();
        let b = Backing::new(&mem, entries(&[(0x1ffe, 2), (0x3000, 2)])).unwrap();
        let mut buf = [0; 3];
        b.read_at(&mem, 1, &mut buf).unwrap();
        assert_eq!(buf, [2, 9, 8]);
        assert!(b.read_at(&mem, 2, &mut buf).is_err());
        // Found by the virtio_gpu fuzz target: an empty read of an empty
        // backing (a zero-width transfer) underflowed the entry search.
        let empty = Backing::new(&mem, Vec::new()).unwrap();
        empty.read_at(&mem, 0, &mut []).unwrap();
        assert!(empty.read_at(&mem, 0, &mut [0]).is_err());
        assert!(matches!(
            Backing::new(&mem, entries(&[(0x4ff0, 0x100)])),
            Err(ResourceError::BadBacking { .. })
        ));
        assert!(Backing::new(&mem, entries(&[(u64::MAX, 2)])).is_err());
    }

    #[test]
    fn transfer_checks_rect_and_backing() {
        let mem = memory();
        let pixels: Vec<u8> = (0..64).collect();
        mem.write_slice(&pixels, GuestAddress(0x1000)).unwrap();
        let mut r = Resource2d {
            format: format::B8G8R8X8_UNORM,
            width: 4,
            height: 4,
            pixels: vec![0; 64],
            backing: None,
        };
        let all = rect(0, 0, 4, 4);
        assert!(matches!(
            r.transfer_to_host(&mem, 1, all, 0),
            Err(ResourceError::NoBacking(1))
        ));
        r.backing = Some(Backing::new(&mem, entries(&[(0x1000, 64)])).unwrap());
        let part = rect(1, 1, 2, 2);
        r.transfer_to_host(&mem, 1, part, 20).unwrap();
        assert_eq!(&r.pixels[20..28], &pixels[20..28]);
        assert_eq!(&r.pixels[36..44], &pixels[36..44]);
        assert_eq!(r.pixels[16], 0);
        assert!(r.transfer_to_host(&mem, 1, all, 4).is_err());
        let outside = rect(3, 0, 2, 1);
        assert!(matches!(
            r.transfer_to_host(&mem, 1, outside, 0),
            Err(ResourceError::RectOutside { .. })
        ));
        assert!(r.transfer_to_host(&mem, 1, all, u64::MAX - 3).is_err());
        // Backing that is no longer guest memory: vm-memory's error is the source.
        r.backing = Some(Backing::unchecked(entries(&[(0x8000, 64)])));
        let err = r.transfer_to_host(&mem, 1, all, 0).unwrap_err();
        assert!(
            matches!(
                err,
                ResourceError::Memory(vm_memory::GuestMemoryError::InvalidGuestAddress(
                    GuestAddress(0x8000)
                ))
            ),
            "{err:?}"
        );
        assert_eq!(err.response(), resp::ERR_UNSPEC);
        assert!(err
            .to_string()
            .starts_with("guest memory of the backing went away: "));
        assert!(
            std::error::Error::source(&err).is_some_and(|s| s.is::<vm_memory::GuestMemoryError>())
        );
    }

    #[test]
    fn formats_convert_to_bgra() {
        let mut out = Vec::new();
        to_bgra(format::R8G8B8A8_UNORM, &[1, 2, 3, 4], &mut out);
        to_bgra(format::X8R8G8B8_UNORM, &[9, 1, 2, 3], &mut out);
        to_bgra(format::A8B8G8R8_UNORM, &[7, 3, 2, 1], &mut out);
        assert_eq!(out, [3, 2, 1, 4, 3, 2, 1, 0xff, 3, 2, 1, 7]);
    }
}
