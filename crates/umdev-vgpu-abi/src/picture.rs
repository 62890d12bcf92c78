//! The end-to-end test picture: a deterministic list of drawing operations that
//! the guest-side driver (tests/guest-driver/src/vgpu.rs) turns into vGPU
//! commands, and the framebuffer those operations must produce, computed here
//! without the device.
//!
//! The guest driver, which is built on its own, uses it from this crate as
//! the host-side tests do.

/// Framebuffer width in pixels.
pub const WIDTH: u32 = 320;
/// Framebuffer height in pixels.
pub const HEIGHT: u32 = 240;
/// Bytes per framebuffer line: padded beyond `4 * WIDTH` on purpose.
pub const STRIDE: u32 = 4 * WIDTH + 256;
/// Bytes of the framebuffer (every line with its padding).
pub const FB_BYTES: usize = STRIDE as usize * HEIGHT as usize;
/// The gradient image staged in guest RAM and blitted into the picture.
pub const IMAGE_WIDTH: u32 = 256;
pub const IMAGE_HEIGHT: u32 = 64;
/// Bytes per line of the staged image (tightly packed).
pub const IMAGE_PITCH: u32 = 4 * IMAGE_WIDTH;

/// One drawing operation. Colours are XRGB8888 values `0x00RRGGBB`, stored in
/// memory as bytes B, G, R, X.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// One FILL over the whole framebuffer, line padding included.
    Clear { color: u32 },
    /// A rectangle drawn with one FILL per line.
    Rect {
        x: u32,
        y: u32,
        w: u32,
        h: u32,
        color: u32,
    },
    /// A rectangle drawn by FILLing one line of `w` pixels in a scratch buffer
    /// and BLITting it with source pitch 0 to every line of the rectangle.
    RectBlit {
        x: u32,
        y: u32,
        w: u32,
        h: u32,
        color: u32,
    },
    /// The [`image`] (in guest RAM, [`IMAGE_PITCH`] bytes per line) BLITted to
    /// (x, y).
    Image { x: u32, y: u32 },
    /// One COPY of whole framebuffer lines `[src_y, src_y + lines)` (padding
    /// included, as contiguous bytes) to `[dst_y, dst_y + lines)`; the two
    /// ranges do not overlap.
    CopyLines { src_y: u32, dst_y: u32, lines: u32 },
}

/// The picture, in drawing order (later operations paint over earlier ones).
pub const SCENE: &[Op] = &[
    Op::Clear { color: 0x0020_2040 },
    Op::Image { x: 32, y: 16 },
    Op::Rect {
        x: 16,
        y: 100,
        w: 96,
        h: 60,
        color: 0x00ff_0000,
    },
    Op::RectBlit {
        x: 128,
        y: 110,
        w: 80,
        h: 80,
        color: 0x0000_ff00,
    },
    // Overlaps the green one.
    Op::Rect {
        x: 180,
        y: 150,
        w: 100,
        h: 50,
        color: 0x0000_00ff,
    },
    // A one-pixel-wide line and a square in the bottom-right corner: the last
    // pixel of the framebuffer.
    Op::Rect {
        x: 300,
        y: 0,
        w: 1,
        h: 240,
        color: 0x00ff_ffff,
    },
    Op::RectBlit {
        x: 304,
        y: 224,
        w: 16,
        h: 16,
        color: 0x00ff_ff00,
    },
    // Part of the gradient, copied as whole lines near the bottom.
    Op::CopyLines {
        src_y: 24,
        dst_y: 204,
        lines: 16,
    },
];

/// A second picture, for a second guest beside the first (issue #15: two VMs
/// on one parent, each drawing its own): the same kinds of operations, other
/// colours and places, so that one guest's picture on the other's scanout
/// shows.
pub const SCENE_B: &[Op] = &[
    Op::Clear { color: 0x0040_2010 },
    Op::Rect {
        x: 200,
        y: 20,
        w: 100,
        h: 40,
        color: 0x00ff_8000,
    },
    Op::Image { x: 8, y: 150 },
    Op::RectBlit {
        x: 20,
        y: 40,
        w: 120,
        h: 60,
        color: 0x0080_00ff,
    },
    Op::Rect {
        x: 0,
        y: 120,
        w: 320,
        h: 2,
        color: 0x0000_ffff,
    },
    Op::CopyLines {
        src_y: 40,
        dst_y: 70,
        lines: 20,
    },
];

/// Pixel (x, y) of the staged gradient image.
pub fn image(x: u32, y: u32) -> u32 {
    let r = x & 0xff;
    let g = (y * 4) & 0xff;
    let b = 255 - (x & 0xff);
    // A checker in the low bits so that off-by-one-line errors show.
    let checker = ((x / 8 + y / 8) & 1) * 0x10;
    (r << 16) | ((g ^ checker) << 8) | b
}

/// The staged image as bytes, [`IMAGE_PITCH`] per line.
pub fn image_bytes() -> Vec<u8> {
    let mut out = Vec::with_capacity((IMAGE_PITCH * IMAGE_HEIGHT) as usize);
    for y in 0..IMAGE_HEIGHT {
        for x in 0..IMAGE_WIDTH {
            out.extend_from_slice(&image(x, y).to_le_bytes());
        }
    }
    out
}

fn fill(fb: &mut [u8], at: usize, bytes: usize, color: u32) {
    for (i, b) in fb[at..at + bytes].iter_mut().enumerate() {
        *b = color.to_le_bytes()[i % 4];
    }
}

fn offset(x: u32, y: u32) -> usize {
    y as usize * STRIDE as usize + 4 * x as usize
}

/// The framebuffer ([`FB_BYTES`], [`STRIDE`] per line) after `ops` ran on a
/// zeroed one, with the device's semantics (FILL, COPY and BLIT move bytes).
pub fn render_ops(ops: &[Op]) -> Vec<u8> {
    let mut fb = vec![0u8; FB_BYTES];
    let image = image_bytes();
    for op in ops {
        match *op {
            Op::Clear { color } => fill(&mut fb, 0, FB_BYTES, color),
            Op::Rect { x, y, w, h, color } | Op::RectBlit { x, y, w, h, color } => {
                for line in y..y + h {
                    fill(&mut fb, offset(x, line), 4 * w as usize, color);
                }
            }
            Op::Image { x, y } => {
                for line in 0..IMAGE_HEIGHT {
                    let src = (line * IMAGE_PITCH) as usize;
                    let dst = offset(x, y + line);
                    fb[dst..dst + IMAGE_PITCH as usize]
                        .copy_from_slice(&image[src..src + IMAGE_PITCH as usize]);
                }
            }
            Op::CopyLines {
                src_y,
                dst_y,
                lines,
            } => {
                let len = lines as usize * STRIDE as usize;
                let (s, d) = (offset(0, src_y), offset(0, dst_y));
                fb.copy_within(s..s + len, d);
            }
        }
    }
    fb
}

/// Where [`commands`] draws, as GPU virtual addresses: the framebuffer
/// ([`FB_BYTES`]), the staged [`image_bytes`] and one writable scratch line.
#[derive(Clone, Copy, Debug)]
pub struct DrawTargets {
    pub fb_va: u64,
    pub image_va: u64,
    pub scratch_va: u64,
}

/// The vGPU commands that draw `ops` (what [`render_ops`] computes).
pub fn commands(ops: &[Op], t: DrawTargets) -> Vec<u32> {
    use crate::encode as cmd;
    let at = |x: u32, y: u32| t.fb_va + u64::from(y) * u64::from(STRIDE) + 4 * u64::from(x);
    let mut out = Vec::new();
    for op in ops {
        match *op {
            Op::Clear { color } => out.extend(cmd::fill(t.fb_va, FB_BYTES as u32, color)),
            Op::Rect { x, y, w, h, color } => {
                for line in y..y + h {
                    out.extend(cmd::fill(at(x, line), 4 * w, color));
                }
            }
            Op::RectBlit { x, y, w, h, color } => {
                out.extend(cmd::fill(t.scratch_va, 4 * w, color));
                out.extend(cmd::blit(t.scratch_va, 0, at(x, y), STRIDE, 4 * w, h));
            }
            Op::Image { x, y } => out.extend(cmd::blit(
                t.image_va,
                IMAGE_PITCH,
                at(x, y),
                STRIDE,
                IMAGE_PITCH,
                IMAGE_HEIGHT,
            )),
            Op::CopyLines {
                src_y,
                dst_y,
                lines,
            } => out.extend(cmd::copy(at(0, src_y), at(0, dst_y), lines * STRIDE)),
        }
    }
    out
}

/// The framebuffer [`SCENE`] must produce.
pub fn render() -> Vec<u8> {
    render_ops(SCENE)
}

/// A scene by name: `a` ([`SCENE`]) or `b` ([`SCENE_B`]).
pub fn scene(name: &str) -> Option<&'static [Op]> {
    match name {
        "a" => Some(SCENE),
        "b" => Some(SCENE_B),
        _ => None,
    }
}

/// The visible pixels of a framebuffer as 8-bit RGB, [`WIDTH`] x [`HEIGHT`]:
/// what the scanout PNG holds.
pub fn to_rgb(fb: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((WIDTH * HEIGHT * 3) as usize);
    for y in 0..HEIGHT {
        let line = &fb[offset(0, y)..offset(WIDTH, y)];
        for px in line.chunks_exact(4) {
            rgb.extend_from_slice(&[px[2], px[1], px[0]]);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rgb_at(rgb: &[u8], x: u32, y: u32) -> [u8; 3] {
        let i = 3 * (y * WIDTH + x) as usize;
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    }

    #[test]
    fn every_operation_stays_inside_the_framebuffer() {
        for op in SCENE.iter().chain(SCENE_B) {
            match *op {
                Op::Clear { .. } => {}
                Op::Rect { x, y, w, h, .. } | Op::RectBlit { x, y, w, h, .. } => {
                    assert!(
                        w > 0 && h > 0 && x + w <= WIDTH && y + h <= HEIGHT,
                        "{op:?}"
                    );
                }
                Op::Image { x, y } => {
                    assert!(x + IMAGE_WIDTH <= WIDTH && y + IMAGE_HEIGHT <= HEIGHT);
                }
                Op::CopyLines {
                    src_y,
                    dst_y,
                    lines,
                } => {
                    assert!(src_y + lines <= HEIGHT && dst_y + lines <= HEIGHT);
                    assert!(src_y + lines <= dst_y || dst_y + lines <= src_y, "overlap");
                }
            }
        }
    }

    #[test]
    fn picture_has_what_the_scene_says() {
        let fb = render();
        assert_eq!(fb.len(), FB_BYTES);
        let rgb = to_rgb(&fb);
        assert_eq!(rgb.len(), (WIDTH * HEIGHT * 3) as usize);
        assert_eq!(rgb_at(&rgb, 0, 0), [0x20, 0x20, 0x40]);
        assert_eq!(rgb_at(&rgb, 20, 110), [0xff, 0, 0]);
        assert_eq!(rgb_at(&rgb, 130, 112), [0, 0xff, 0]);
        // Blue painted over green.
        assert_eq!(rgb_at(&rgb, 190, 160), [0, 0, 0xff]);
        assert_eq!(rgb_at(&rgb, 300, 5), [0xff, 0xff, 0xff]);
        assert_eq!(rgb_at(&rgb, WIDTH - 1, HEIGHT - 1), [0xff, 0xff, 0]);
        let px = image(10, 3);
        let want = [(px >> 16) as u8, (px >> 8) as u8, px as u8];
        assert_eq!(rgb_at(&rgb, 42, 19), want);
        // The copied lines repeat image line 8 at framebuffer line 204.
        assert_eq!(rgb_at(&rgb, 42, 204), {
            let px = image(10, 8);
            [(px >> 16) as u8, (px >> 8) as u8, px as u8]
        });
        // Line padding was filled by the clear.
        assert_eq!(&fb[4 * WIDTH as usize..][..4], &[0x40, 0x20, 0x20, 0x00]);
    }

    #[test]
    fn the_second_picture_is_another() {
        let (a, b) = (to_rgb(&render()), to_rgb(&render_ops(SCENE_B)));
        let differ = a.chunks(3).zip(b.chunks(3)).filter(|(x, y)| x != y).count();
        assert!(differ > (WIDTH * HEIGHT / 2) as usize, "{differ}");
        assert_eq!(rgb_at(&b, 0, 0), [0x40, 0x20, 0x10]);
        assert_eq!(rgb_at(&b, 250, 30), [0xff, 0x80, 0]);
        // The purple lines copied below themselves.
        assert_eq!(rgb_at(&b, 30, 75), [0x80, 0, 0xff]);
        assert_eq!(scene("b"), Some(SCENE_B));
        assert_eq!(scene("c"), None);
    }
}
