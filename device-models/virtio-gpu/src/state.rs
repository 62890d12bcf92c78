//! virtio-gpu's state for migration (`umdev::state` layout), section `VGPU2D`
//! shortened to `VG2D`, version 1:
//!
//! | field | encoding |
//! |---|---|
//! | scanouts | count, then per scanout: resource_id u32, rect (x, y, width, height u32) |
//! | resources | count, then per resource: id, format, width, height (u32 each), pixels (bytes), whether backed (bool), and if so its entries (count, then addr u64 and length u32 each) |
//!
//! Virtqueue positions are not here: they are the front-end's (GET_VRING_BASE /
//! SET_VRING_BASE). Backing entries are taken as they were attached; every
//! transfer checks them against guest memory as it is then, so an entry that
//! points nowhere on the destination fails that transfer, never the device.
//! Everything else is checked as the commands that made it would have been:
//! ids, formats, sizes, the host-memory limit, scanouts naming existing
//! resources with rectangles inside them.

use std::collections::BTreeMap;

use umdev::state::{StateError, StateReader, StateWriter};

use crate::protocol::{MemEntry, Rect, MAX_BACKING_ENTRIES};
use crate::resources::{self, Backing, Resource2d};
use crate::{GpuState, Scanout, VirtioGpu};

const VERSION: u32 = 1;

pub(crate) fn save(gpu: &VirtioGpu) -> Vec<u8> {
    let state = gpu.state();
    let mut w = StateWriter::new();
    w.section(b"VG2D", VERSION, |s| {
        s.u64(state.scanouts.len() as u64);
        for sc in &state.scanouts {
            s.u32(sc.resource_id);
            for v in [sc.rect.x, sc.rect.y, sc.rect.width, sc.rect.height] {
                s.u32(v);
            }
        }
        s.u64(state.resources.len() as u64);
        for (&id, r) in &state.resources {
            for v in [id, r.format, r.width, r.height] {
                s.u32(v);
            }
            s.bytes(&r.pixels);
            s.bool(r.backing.is_some());
            if let Some(b) = &r.backing {
                s.u64(b.entries().len() as u64);
                for e in b.entries() {
                    s.u64(e.addr);
                    s.u32(e.length);
                }
            }
        }
    });
    w.finish()
}

pub(crate) fn restore(gpu: &VirtioGpu, blob: &[u8]) -> Result<(), StateError> {
    let bad = StateError::Invalid;
    let mut r = StateReader::new(blob)?;
    let (_, mut s) = r.section(b"VG2D", VERSION)?;
    let n = s.count(20)?;
    if n != gpu.config.num_scanouts as usize {
        return Err(bad("virtio-gpu with another number of scanouts"));
    }
    let mut scanouts = Vec::with_capacity(n);
    for _ in 0..n {
        let resource_id = s.u32()?;
        let rect = Rect {
            x: s.u32()?,
            y: s.u32()?,
            width: s.u32()?,
            height: s.u32()?,
        };
        scanouts.push(Scanout { resource_id, rect });
    }
    let n = s.count(25)?;
    if n > gpu.config.max_resources {
        return Err(bad("more resources than this device allows"));
    }
    let mut found = BTreeMap::new();
    let mut hostmem = 0u64;
    for _ in 0..n {
        let (id, format, width, height) = (s.u32()?, s.u32()?, s.u32()?, s.u32()?);
        if id == 0 || found.contains_key(&id) {
            return Err(bad("a resource id that is 0 or repeated"));
        }
        if !resources::is_supported_format(format) {
            return Err(bad("a resource format the device does not support"));
        }
        if width == 0
            || height == 0
            || width > umdev::scanout::MAX_DIM
            || height > umdev::scanout::MAX_DIM
        {
            return Err(bad("a resource size out of range"));
        }
        let size = Resource2d::host_size(width, height);
        hostmem += size;
        if hostmem > gpu.config.max_hostmem {
            return Err(bad("resources over this device's host-memory limit"));
        }
        let pixels = s.bytes()?;
        if pixels.len() as u64 != size {
            return Err(bad("resource pixels of the wrong size"));
        }
        let backing = if s.bool()? {
            let entries = s.count(12)?;
            if entries > MAX_BACKING_ENTRIES as usize {
                return Err(bad("too many backing entries"));
            }
            let mut list = Vec::with_capacity(entries);
            for _ in 0..entries {
                list.push(MemEntry {
                    addr: s.u64()?,
                    length: s.u32()?,
                });
            }
            Some(Backing::unchecked(list))
        } else {
            None
        };
        found.insert(
            id,
            Resource2d {
                format,
                width,
                height,
                pixels: pixels.to_vec(),
                backing,
            },
        );
    }
    s.finish()?;
    r.finish()?;
    for sc in &scanouts {
        if sc.resource_id == 0 {
            continue;
        }
        match found.get(&sc.resource_id) {
            Some(res) if sc.rect.fits_in(res.width, res.height) => {}
            _ => return Err(bad("a scanout showing no resource, or outside it")),
        }
    }
    *gpu.state() = GpuState {
        resources: found,
        hostmem,
        scanouts,
    };
    Ok(())
}
