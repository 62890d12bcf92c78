//! An EDID 1.4 base block describing one display mode, for GET_EDID when the
//! front-end has no EDID of its own to give.

/// Manufacturer "UMD" in EDID's 5-bit letter code.
const MANUFACTURER: [u8; 2] = [0x55, 0xa4];

/// A 128-byte EDID whose preferred (detailed) timing is `width` x `height` at
/// 60 Hz. Sides past what EDID encodes (4095) are clamped.
pub fn edid_for_mode(width: u32, height: u32) -> [u8; 128] {
    let (w, h) = (width.clamp(1, 4095), height.clamp(1, 4095));
    let mut e = [0u8; 128];
    e[..8].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    e[8..10].copy_from_slice(&MANUFACTURER);
    e[10] = 1; // product code
    e[17] = 36; // model year 2026
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0x80; // digital input
    e[21] = 34; // screen size, cm
    e[22] = 21;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB default, preferred timing is native
                  // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    for t in e[38..54].chunks_exact_mut(2) {
        t.copy_from_slice(&[1, 1]); // unused standard timings
    }

    // Detailed timing: reduced blanking, 60 Hz.
    let (hblank, vblank) = (160u32, 30u32);
    let clock_10khz = (w + hblank) * (h + vblank) * 60 / 10_000;
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&(clock_10khz.clamp(1, 0xffff) as u16).to_le_bytes());
    d[2] = w as u8;
    d[3] = hblank as u8;
    d[4] = ((w >> 8) << 4) as u8 | (hblank >> 8) as u8;
    d[5] = h as u8;
    d[6] = vblank as u8;
    d[7] = ((h >> 8) << 4) as u8 | (vblank >> 8) as u8;
    d[8] = 48; // hsync offset
    d[9] = 32; // hsync width
    d[10] = 0x36; // vsync offset 3, width 6
    d[12] = 0x54; // image size 340 x 210 mm
    d[13] = 0xd2;
    d[14] = 0x10;
    d[17] = 0x1e; // digital separate sync, both positive

    // Display name.
    let name = &mut e[72..90];
    name[3] = 0xfc;
    let text = b"umdev-gpu\n   ";
    name[5..18].copy_from_slice(text);

    // Range limits: 50-75 Hz, 30-160 kHz, 600 MHz.
    let range = &mut e[90..108];
    range[3] = 0xfd;
    range[5..18].copy_from_slice(&[
        50, 75, 30, 160, 60, 0, 0x0a, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    ]);

    // Dummy descriptor.
    e[108 + 3] = 0x10;

    let sum = e[..127].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_header_and_mode() {
        let e = edid_for_mode(1280, 800);
        assert_eq!(e.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        assert_eq!(&e[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        let d = &e[54..72];
        assert_eq!(u32::from(d[2]) | u32::from(d[4] >> 4) << 8, 1280);
        assert_eq!(u32::from(d[5]) | u32::from(d[7] >> 4) << 8, 800);
        let big = edid_for_mode(100_000, 0);
        assert_eq!(big.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
    }
}
