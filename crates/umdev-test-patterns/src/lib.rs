//! The picture the e2e guest draws on `/dev/fb0` (`UMDEV_MODE=fb`), as a
//! function of the pixel position only, so any resolution has one right
//! answer. Shared, unchanged, by the guest driver (`src/fb.rs`) and the host
//! test that compares QEMU's screendump and umdev's scanout PNG with it
//! (`device-models/virtio-gpu/tests/e2e.rs`): defined once, here.
//!
//! Top band: eight colour bars; middle band: a gradient whose every pixel in a
//! 256x256 tile differs (catches stride, offset and channel-order mistakes);
//! bottom band: a tinted checkerboard; on top, a few solid rectangles, one of
//! them crossing band boundaries. No dependencies, no `std` beyond core.

/// The guest prints this (in an INFO line) once the picture is on the
/// device's scanout, then holds it until the host has looked.
pub const MARKER: &str = "fb: pattern on the scanout; take the screendump now";

/// Height of the colour-bar band.
pub const BARS_HEIGHT: u32 = 160;
/// Height of the gradient band below it.
pub const GRADIENT_HEIGHT: u32 = 256;
/// Width of one colour bar.
pub const BAR_WIDTH: u32 = 80;

/// The colour bars, left to right (RGB).
pub const BARS: [[u8; 3]; 8] = [
    [0xff, 0xff, 0xff],
    [0xff, 0xff, 0x00],
    [0x00, 0xff, 0xff],
    [0x00, 0xff, 0x00],
    [0xff, 0x00, 0xff],
    [0xff, 0x00, 0x00],
    [0x00, 0x00, 0xff],
    [0x00, 0x00, 0x00],
];

/// Solid rectangles drawn over the bands: x, y, width, height, RGB.
pub const RECTS: [(u32, u32, u32, u32, [u8; 3]); 4] = [
    (40, 40, 120, 60, [0x12, 0x34, 0x56]),
    (300, 120, 200, 100, [0xfe, 0x80, 0x01]),
    (560, 440, 64, 64, [0x01, 0xfe, 0x80]),
    (17, 431, 33, 7, [0x80, 0x01, 0xfe]),
];

/// The colour (R, G, B) of pixel (x, y).
pub fn rgb(x: u32, y: u32) -> [u8; 3] {
    for &(rx, ry, rw, rh, c) in RECTS.iter() {
        if x >= rx && x < rx + rw && y >= ry && y < ry + rh {
            return c;
        }
    }
    if y < BARS_HEIGHT {
        BARS[((x / BAR_WIDTH) % 8) as usize]
    } else if y < BARS_HEIGHT + GRADIENT_HEIGHT {
        let gy = y - BARS_HEIGHT;
        [
            (x & 0xff) as u8,
            (gy & 0xff) as u8,
            (((x >> 8) * 0x40 + (gy >> 5) * 0x08) & 0xff) as u8,
        ]
    } else {
        let light = ((x / 16) + (y / 16)) % 2 == 1;
        let v: u8 = if light { 0xe0 } else { 0x20 };
        [
            v,
            v ^ (((x / 16) % 8) as u8 * 4),
            v ^ (((y / 16) % 8) as u8 * 4),
        ]
    }
}
