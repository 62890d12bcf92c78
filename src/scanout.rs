//! Scanout pictures, shared by the display device models: an XRGB8888
//! framebuffer (bytes B, G, R, X per pixel) as an RGB PNG, and writing one
//! atomically. Pure functions with no device knowledge.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Largest width or height of a picture (a model may accept less).
pub const MAX_DIM: u32 = 16384;

#[derive(Debug, thiserror::Error)]
pub enum ScanoutError {
    #[error("picture of {width}x{height} pixels: each side must be 1..={MAX_DIM}")]
    Dimensions { width: u32, height: u32 },
    #[error("stride of {stride} bytes is less than 4 x width ({width})")]
    Stride { stride: usize, width: u32 },
    #[error("framebuffer of {len} bytes is shorter than the {needed} bytes the picture needs")]
    ShortBuffer { len: usize, needed: usize },
    #[error("PNG encoding: {0}")]
    Encode(#[from] png::EncodingError),
    #[error("PNG decoding: {0}")]
    Decode(#[from] png::DecodingError),
    /// A well-formed PNG of another pixel format than [`encode_png`] writes.
    #[error("PNG decoding: {color:?} {depth:?}, not 8-bit RGB")]
    NotRgb8 {
        color: png::ColorType,
        depth: png::BitDepth,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Bytes of `xrgb` the picture reads: every line's `stride` but the last, whose
/// pixels only are needed. Checks the dimensions and the stride.
pub fn required_len(width: u32, height: u32, stride: usize) -> Result<usize, ScanoutError> {
    if !(1..=MAX_DIM).contains(&width) || !(1..=MAX_DIM).contains(&height) {
        return Err(ScanoutError::Dimensions { width, height });
    }
    let line = 4 * width as usize;
    if stride < line {
        return Err(ScanoutError::Stride { stride, width });
    }
    // stride * (height - 1) + line; height <= MAX_DIM, but stride is the caller's.
    stride
        .checked_mul(height as usize - 1)
        .and_then(|n| n.checked_add(line))
        .ok_or(ScanoutError::ShortBuffer {
            len: 0,
            needed: usize::MAX,
        })
}

/// Encodes the `width` x `height` XRGB8888 picture in `xrgb` (`stride` bytes per
/// line) as an 8-bit RGB PNG.
pub fn encode_png(
    width: u32,
    height: u32,
    stride: usize,
    xrgb: &[u8],
) -> Result<Vec<u8>, ScanoutError> {
    let needed = required_len(width, height, stride).map_err(|e| match e {
        ScanoutError::ShortBuffer { needed, .. } => ScanoutError::ShortBuffer {
            len: xrgb.len(),
            needed,
        },
        e => e,
    })?;
    if xrgb.len() < needed {
        return Err(ScanoutError::ShortBuffer {
            len: xrgb.len(),
            needed,
        });
    }
    let (w, h) = (width as usize, height as usize);
    let mut rgb = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        let line = &xrgb[y * stride..y * stride + 4 * w];
        for px in line.chunks_exact(4) {
            rgb.extend_from_slice(&[px[2], px[1], px[0]]);
        }
    }
    let mut out = Vec::with_capacity(rgb.len() / 4 + 1024);
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&rgb)?;
        writer.finish()?;
    }
    Ok(out)
}

/// A decoded scanout picture: 8-bit RGB, `3 * width` bytes per line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbPicture {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// Decodes a PNG as [`encode_png`] writes it (8-bit RGB); anything else is an
/// error, never a panic.
pub fn decode_png(bytes: &[u8]) -> Result<RgbPicture, ScanoutError> {
    let mut reader = png::Decoder::new(bytes).read_info()?;
    let (color, depth) = reader.output_color_type();
    if color != png::ColorType::Rgb || depth != png::BitDepth::Eight {
        return Err(ScanoutError::NotRgb8 { color, depth });
    }
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    Ok(RgbPicture {
        width: info.width,
        height: info.height,
        rgb: buf,
    })
}

/// Encodes the picture (as [`encode_png`]) and writes it to `path` atomically: a
/// temporary file beside it, then a rename, so a reader sees the old picture or
/// the new one, never part of one.
pub fn write_png(
    path: &Path,
    width: u32,
    height: u32,
    stride: usize,
    xrgb: &[u8],
) -> Result<(), ScanoutError> {
    let png = encode_png(width, height, stride, xrgb)?;
    write_atomically(path, &png)
}

/// Writes `bytes` to a temporary file in `path`'s directory, then renames it to
/// `path`. The temporary file is removed if anything fails.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ScanoutError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);

    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScanoutError::Io { path, source }
    };
    let name = path.file_name().ok_or_else(|| ScanoutError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = path.with_file_name(tmp_name);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a PNG: (width, height, color type, RGB bytes).
    fn decode(bytes: &[u8]) -> (u32, u32, png::ColorType, Vec<u8>) {
        let decoder = png::Decoder::new(bytes);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    /// A picture whose every pixel differs: (x, y) -> B = x, G = y, R = x ^ y, X = 0xee.
    fn picture(width: u32, height: u32, stride: usize) -> Vec<u8> {
        let mut fb = vec![0x5a; stride * height as usize];
        for y in 0..height as usize {
            for x in 0..width as usize {
                let at = y * stride + 4 * x;
                fb[at..at + 4].copy_from_slice(&[x as u8, y as u8, (x ^ y) as u8, 0xee]);
            }
        }
        fb
    }

    fn expected_rgb(width: u32, height: u32) -> Vec<u8> {
        let mut rgb = Vec::new();
        for y in 0..height as usize {
            for x in 0..width as usize {
                rgb.extend_from_slice(&[(x ^ y) as u8, y as u8, x as u8]);
            }
        }
        rgb
    }

    #[test]
    fn round_trip_with_padded_stride() {
        let (w, h, stride) = (37, 19, 4 * 37 + 12);
        let fb = picture(w, h, stride);
        let png = encode_png(w, h, stride, &fb).unwrap();
        let (dw, dh, color, rgb) = decode(&png);
        assert_eq!((dw, dh, color), (w, h, png::ColorType::Rgb));
        assert_eq!(rgb, expected_rgb(w, h));
    }

    #[test]
    fn tight_stride_and_short_last_line() {
        let (w, h) = (16, 4);
        let fb = picture(w, h, 64);
        assert_eq!(
            decode(&encode_png(w, h, 64, &fb).unwrap()).3,
            expected_rgb(w, h)
        );
        // The last line needs only its pixels, not a whole stride.
        let stride = 100;
        let mut fb = picture(w, h, stride);
        fb.truncate(stride * 3 + 64);
        assert_eq!(required_len(w, h, stride).unwrap(), fb.len());
        assert_eq!(
            decode(&encode_png(w, h, stride, &fb).unwrap()).3,
            expected_rgb(w, h)
        );
        fb.pop();
        assert!(matches!(
            encode_png(w, h, stride, &fb),
            Err(ScanoutError::ShortBuffer { len, needed }) if len + 1 == needed
        ));
    }

    #[test]
    fn decode_png_round_trips_and_refuses_garbage() {
        let (w, h, stride) = (5, 3, 4 * 5 + 4);
        let fb = picture(w, h, stride);
        let png = encode_png(w, h, stride, &fb).unwrap();
        let pic = decode_png(&png).unwrap();
        assert_eq!((pic.width, pic.height), (w, h));
        assert_eq!(pic.rgb, expected_rgb(w, h));
        assert!(matches!(
            decode_png(b"not a png"),
            Err(ScanoutError::Decode(_))
        ));
        assert!(matches!(
            decode_png(&png[..png.len() / 2]),
            Err(ScanoutError::Decode(_))
        ));
        // A valid PNG of another format: the color type and depth are told.
        let mut gray = Vec::new();
        {
            let mut encoder = png::Encoder::new(&mut gray, 2, 1);
            encoder.set_color(png::ColorType::Grayscale);
            encoder.set_depth(png::BitDepth::Sixteen);
            let mut writer = encoder.write_header().unwrap();
            writer.write_image_data(&[0; 4]).unwrap();
        }
        let err = decode_png(&gray).unwrap_err();
        assert!(matches!(
            err,
            ScanoutError::NotRgb8 {
                color: png::ColorType::Grayscale,
                depth: png::BitDepth::Sixteen,
            }
        ));
        assert_eq!(
            err.to_string(),
            "PNG decoding: Grayscale Sixteen, not 8-bit RGB"
        );
        // The png crate's error is the source, not a copy of its text.
        let err = decode_png(b"not a png").unwrap_err();
        assert!(std::error::Error::source(&err).is_some_and(|s| s.is::<png::DecodingError>()));
    }

    #[test]
    fn one_pixel_and_largest_sizes() {
        let png = encode_png(1, 1, 4, &[1, 2, 3, 4]).unwrap();
        assert_eq!(decode(&png).3, [3, 2, 1]);
        let fb = vec![0u8; 4 * 4096];
        let (w, h, _, rgb) = decode(&encode_png(4096, 1, 4 * 4096, &fb).unwrap());
        assert_eq!((w, h, rgb.len()), (4096, 1, 3 * 4096));
        let (w, h, _, _) = decode(&encode_png(1, 4096, 4, &fb).unwrap());
        assert_eq!((w, h), (1, 4096));
    }

    #[test]
    fn bad_sizes_are_errors_not_panics() {
        let fb = vec![0u8; 1 << 16];
        for (w, h) in [
            (0, 1),
            (1, 0),
            (MAX_DIM + 1, 1),
            (1, MAX_DIM + 1),
            (u32::MAX, u32::MAX),
        ] {
            assert!(
                matches!(
                    encode_png(w, h, 1 << 20, &fb),
                    Err(ScanoutError::Dimensions { .. })
                ),
                "{w}x{h}"
            );
        }
        assert!(matches!(
            encode_png(8, 1, 31, &fb),
            Err(ScanoutError::Stride {
                stride: 31,
                width: 8
            })
        ));
        assert!(matches!(
            encode_png(8, 8, usize::MAX, &fb),
            Err(ScanoutError::ShortBuffer { .. })
        ));
        assert!(matches!(
            encode_png(8, 4096, usize::MAX / 2, &fb),
            Err(ScanoutError::ShortBuffer { .. })
        ));
        assert!(matches!(
            encode_png(8, 8, 32, &[]),
            Err(ScanoutError::ShortBuffer {
                len: 0,
                needed: 256
            })
        ));
    }

    fn temp_dir() -> PathBuf {
        crate::test_util::temp_dir("scanout")
    }

    #[test]
    fn write_png_replaces_atomically_and_leaves_no_temp() {
        let dir = temp_dir();
        let path = dir.join("scanout.png");
        let fb = picture(8, 8, 32);
        write_png(&path, 8, 8, 32, &fb).unwrap();
        assert_eq!(decode(&std::fs::read(&path).unwrap()).3, expected_rgb(8, 8));
        // A second picture replaces the first.
        let fb2 = vec![0xff; 32 * 4];
        write_png(&path, 8, 4, 32, &fb2).unwrap();
        let (w, h, _, rgb) = decode(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (8, 4));
        assert!(rgb.iter().all(|&b| b == 0xff));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["scanout.png"]);
        // Errors: a bad picture writes nothing; a missing directory is an Io error
        // that leaves nothing behind.
        assert!(write_png(&dir.join("x.png"), 0, 1, 4, &fb).is_err());
        let missing = dir.join("no-such-dir").join("x.png");
        assert!(matches!(
            write_png(&missing, 8, 8, 32, &fb),
            Err(ScanoutError::Io { .. })
        ));
        assert!(matches!(
            write_png(Path::new("/"), 8, 8, 32, &fb),
            Err(ScanoutError::Io { .. })
        ));
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
