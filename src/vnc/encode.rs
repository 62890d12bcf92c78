//! What a frame becomes on the wire: the rectangles that changed since the
//! frame a viewer has ([`damage`]), and their pixels as Raw or ZRLE in the
//! viewer's pixel format.

use flate2::{Compress, Compression, FlushCompress};

use super::rfb::{PixelFormat, Rect};
use super::Frame;

/// The tile side damage is found at, and ZRLE's tile side.
pub const TILE: u32 = 64;

/// The rectangles of `new` that differ from `old` (same size), in tiles of
/// [`TILE`] pixels, runs of changed tiles in a tile row merged into one.
pub fn damage(old: &Frame, new: &Frame) -> Vec<Rect> {
    debug_assert!(old.width == new.width && old.height == new.height);
    let stride = 4 * new.width as usize;
    let mut rects = Vec::new();
    for ty in (0..new.height).step_by(TILE as usize) {
        let h = TILE.min(new.height - ty);
        let mut run: Option<(u32, u32)> = None;
        for tx in (0..new.width).step_by(TILE as usize) {
            let w = TILE.min(new.width - tx);
            let changed = (ty..ty + h).any(|y| {
                let at = y as usize * stride + 4 * tx as usize;
                old.pixels[at..at + 4 * w as usize] != new.pixels[at..at + 4 * w as usize]
            });
            match (changed, run) {
                (true, Some((start, width))) => run = Some((start, width + w)),
                (true, None) => run = Some((tx, w)),
                (false, Some((start, width))) => {
                    rects.push(rect(start, ty, width, h));
                    run = None;
                }
                (false, None) => {}
            }
        }
        if let Some((start, width)) = run {
            rects.push(rect(start, ty, width, h));
        }
    }
    rects
}

fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
    Rect {
        x: x as u16,
        y: y as u16,
        width: width as u16,
        height: height as u16,
    }
}

/// The part of `r` inside `area`, if any.
pub fn clip(r: Rect, area: Rect) -> Option<Rect> {
    let x0 = r.x.max(area.x);
    let y0 = r.y.max(area.y);
    let x1 = (u32::from(r.x) + u32::from(r.width)).min(u32::from(area.x) + u32::from(area.width));
    let y1 = (u32::from(r.y) + u32::from(r.height)).min(u32::from(area.y) + u32::from(area.height));
    (u32::from(x0) < x1 && u32::from(y0) < y1).then(|| Rect {
        x: x0,
        y: y0,
        width: (x1 - u32::from(x0)) as u16,
        height: (y1 - u32::from(y0)) as u16,
    })
}

/// The pixels of `r` in `pf`, row by row (Raw encoding).
pub fn raw(frame: &Frame, r: Rect, pf: &PixelFormat, out: &mut Vec<u8>) {
    let n = pf.bytes();
    let stride = 4 * frame.width as usize;
    out.reserve(usize::from(r.width) * usize::from(r.height) * n);
    for y in r.y..r.y + r.height {
        let at = usize::from(y) * stride + 4 * usize::from(r.x);
        for px in frame.pixels[at..at + 4 * usize::from(r.width)].chunks_exact(4) {
            pf.put(out, pf.value(px), n);
        }
    }
}

/// ZRLE's compact pixel: 3 bytes for a 32-bit true-colour format of depth
/// 24 or less whose channels all sit in the low or the high three bytes.
/// Returns its size and how far a pixel value is shifted down to fit it.
pub fn cpixel_layout(pf: &PixelFormat) -> (usize, u32) {
    let mask = |max: u16, shift: u8| u32::from(max) << shift;
    let all = mask(pf.red_max, pf.red_shift)
        | mask(pf.green_max, pf.green_shift)
        | mask(pf.blue_max, pf.blue_shift);
    if pf.bits_per_pixel == 32 && pf.depth <= 24 {
        if all & 0xff00_0000 == 0 {
            return (3, 0);
        }
        if all & 0xff == 0 {
            return (3, 8);
        }
    }
    (pf.bytes(), 0)
}

/// A viewer's ZRLE state: one zlib stream for the whole connection.
pub struct Zrle {
    z: Compress,
    tile: Vec<u8>,
}

impl Default for Zrle {
    fn default() -> Self {
        Zrle {
            z: Compress::new(Compression::fast(), true),
            tile: Vec::new(),
        }
    }
}

impl Zrle {
    /// Appends `r` ZRLE-encoded (u32 length, then zlib data): tiles of
    /// [`TILE`] pixels, each solid (one colour) or raw.
    pub fn encode(&mut self, frame: &Frame, r: Rect, pf: &PixelFormat, out: &mut Vec<u8>) {
        let (n, drop_low) = cpixel_layout(pf);
        let stride = 4 * frame.width as usize;
        let mut plain = Vec::new();
        for ty in (r.y..r.y + r.height).step_by(TILE as usize) {
            let th = (TILE as u16).min(r.y + r.height - ty);
            for tx in (r.x..r.x + r.width).step_by(TILE as usize) {
                let tw = (TILE as u16).min(r.x + r.width - tx);
                self.tile.clear();
                let mut first = None;
                let mut solid = true;
                for y in ty..ty + th {
                    let at = usize::from(y) * stride + 4 * usize::from(tx);
                    for px in frame.pixels[at..at + 4 * usize::from(tw)].chunks_exact(4) {
                        let v = pf.value(px) >> drop_low;
                        solid &= *first.get_or_insert(v) == v;
                        pf.put(&mut self.tile, v, n);
                    }
                }
                if solid {
                    plain.push(1);
                    plain.extend_from_slice(&self.tile[..n]);
                } else {
                    plain.push(0);
                    plain.extend_from_slice(&self.tile);
                }
            }
        }
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut input = &plain[..];
        loop {
            out.reserve(input.len() / 2 + 1024);
            let before_in = self.z.total_in();
            // Writing into a Vec's spare room cannot fail; a stream error
            // (impossible for a well-formed Compress) ends the loop.
            if self
                .z
                .compress_vec(input, out, FlushCompress::Sync)
                .is_err()
            {
                break;
            }
            let taken = (self.z.total_in() - before_in) as usize;
            input = &input[taken..];
            // Done once all input is in and the flush fit in the room we had.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) -> Frame {
        let mut pixels = Vec::new();
        for y in 0..h {
            for x in 0..w {
                pixels.extend(f(x, y));
            }
        }
        Frame {
            width: w,
            height: h,
            pixels,
        }
    }

    #[test]
    fn damage_is_the_changed_tiles_merged_per_row() {
        let a = frame(200, 130, |_, _| [1, 2, 3, 0]);
        assert!(damage(&a, &a).is_empty());
        let b = frame(200, 130, |x, y| {
            if (y == 3 && (x == 70 || x == 130)) || (x == 199 && y == 129) {
                [9, 9, 9, 0]
            } else {
                [1, 2, 3, 0]
            }
        });
        assert_eq!(
            damage(&a, &b),
            vec![rect(64, 0, 128, 64), rect(192, 128, 8, 2)]
        );
    }

    #[test]
    fn clipping() {
        let area = rect(10, 10, 20, 20);
        assert_eq!(clip(rect(0, 0, 15, 15), area), Some(rect(10, 10, 5, 5)));
        assert_eq!(clip(rect(30, 0, 5, 50), area), None);
    }

    #[test]
    fn zrle_decompresses_to_tiles() {
        let f = frame(70, 3, |x, _| {
            if x < 64 {
                [5, 6, 7, 0]
            } else {
                [x as u8, 0, 0, 0]
            }
        });
        let mut z = Zrle::default();
        let mut out = Vec::new();
        z.encode(&f, rect(0, 0, 70, 3), &PixelFormat::XRGB8888, &mut out);
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        let mut d = flate2::Decompress::new(true);
        let mut plain = Vec::with_capacity(4096);
        d.decompress_vec(&out[4..], &mut plain, flate2::FlushDecompress::Sync)
            .unwrap();
        // Tile 1 (64x3, one colour): solid; tile 2 (6x3): raw, 3-byte pixels.
        assert_eq!(&plain[..4], &[1, 5, 6, 7]);
        assert_eq!(plain[4], 0);
        assert_eq!(plain.len(), 4 + 1 + 6 * 3 * 3);
        assert_eq!(&plain[5..8], &[64, 0, 0]);
    }
}
