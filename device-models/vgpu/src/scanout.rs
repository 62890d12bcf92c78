//! The vGPU's scanout limits. Encoding, decoding and writing pictures is
//! [`umdev::scanout`], shared with the other display models.

pub use umdev::scanout::{
    decode_png, encode_png, write_atomically, write_png, RgbPicture, ScanoutError,
};

/// Largest width or height the scanout registers accept (SPEC.md:
/// FB_WIDTH/FB_HEIGHT 1-4096).
pub const MAX_DIM: u32 = 4096;

/// The full GGTT's address space, in bytes (a vGPU with fewer GGTT entries has
/// less): the framebuffer must lie inside it.
pub const APERTURE: u64 = crate::regs::GGTT_ENTRIES * crate::regs::PAGE_SIZE;

/// Checks a scanout's geometry before anything is allocated for it (SPEC.md,
/// scanout registers): sides 1-4096, a stride that is a multiple of 4 and at
/// least 4 x width, and every byte it reads (`stride x (height-1) + 4 x width`
/// from FB_ADDR) inside the GGTT `aperture` (bytes). Returns the bytes of a captured
/// picture, which holds the visible pixels only (4 x width x height, at most
/// 64 MiB whatever the stride).
pub fn check_geometry(
    aperture: u64,
    fb_addr: u64,
    width: u32,
    height: u32,
    stride: u32,
) -> Result<usize, ScanoutError> {
    let stride = stride as usize;
    if !stride.is_multiple_of(4) {
        return Err(ScanoutError::Stride { stride, width });
    }
    let reads = required_len(width, height, stride)? as u64;
    let room = aperture.saturating_sub(fb_addr);
    if reads > room {
        return Err(ScanoutError::ShortBuffer {
            len: room as usize,
            needed: reads as usize,
        });
    }
    Ok(4 * width as usize * height as usize)
}

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

    /// Guest-chosen strides cannot make the backend allocate more than the
    /// visible picture, nor read past the aperture.
    #[test]
    fn geometry_is_bounded_by_the_aperture_and_the_picture() {
        assert_eq!(
            check_geometry(APERTURE, 0, 4096, 4096, 4 * 4096).unwrap(),
            64 << 20
        );
        assert_eq!(
            check_geometry(APERTURE, 0, 16, 4096, 64 << 10).unwrap(),
            16 * 4 * 4096
        );
        assert!(matches!(
            check_geometry(APERTURE, 0, 4096, 4096, u32::MAX - 3),
            Err(ScanoutError::ShortBuffer { .. })
        ));
        assert!(matches!(
            check_geometry(APERTURE, APERTURE - 4096, 1024, 2, 4096),
            Err(ScanoutError::ShortBuffer { .. })
        ));
        assert!(matches!(
            check_geometry(APERTURE, u64::MAX, 1, 1, 4),
            Err(ScanoutError::ShortBuffer { .. })
        ));
        assert!(matches!(
            check_geometry(APERTURE, 0, 8, 8, 34),
            Err(ScanoutError::Stride { .. })
        ));
    }
}
