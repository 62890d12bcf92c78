//! The vGPU's scanout limits. Encoding, decoding and writing pictures is
//! [`umdev::scanout`], shared with the other display models.

pub use umdev::scanout::{
    decode_png, encode_png, write_atomically, write_png, RgbPicture, ScanoutError,
};

/// Largest width or height the scanout registers accept (SPEC.md:
/// FB_WIDTH/FB_HEIGHT 1-4096).
pub const MAX_DIM: u32 = 4096;

/// Bytes of framebuffer a `width` x `height` scanout with `stride` bytes per
/// line reads (every line's stride but the last, whose pixels only are
/// needed), within the vGPU's limits.
pub fn required_len(width: u32, height: u32, stride: usize) -> Result<usize, ScanoutError> {
    if !(1..=MAX_DIM).contains(&width) || !(1..=MAX_DIM).contains(&height) {
        return Err(ScanoutError::Dimensions { width, height });
    }
    umdev::scanout::required_len(width, height, stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_the_specs() {
        assert_eq!(required_len(4096, 1, 4 * 4096).unwrap(), 4 * 4096);
        assert!(matches!(
            required_len(4097, 1, 4 * 4097),
            Err(ScanoutError::Dimensions { .. })
        ));
        assert!(matches!(
            required_len(8, 8, 31),
            Err(ScanoutError::Stride { .. })
        ));
    }
}
