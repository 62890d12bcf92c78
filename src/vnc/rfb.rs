//! The RFB protocol (RFC 6143, "The Remote Framebuffer Protocol", version 3.8,
//! with 3.3 and 3.7 clients accepted): the wire structs and messages a server
//! reads and writes, and nothing else.
//!
//! Everything a viewer sends is read through [`read_client_message`] and the
//! handshake readers, which never trust a length beyond its bound: a message
//! type this server does not know (its length unknown) is an error, so is a
//! pixel format it cannot serve, a cut-text longer than [`MAX_CUT_TEXT`].

use std::io::{self, Read, Write};

/// The version this server offers.
pub const PROTOCOL_VERSION: &[u8; 12] = b"RFB 003.008\n";
/// Security types.
pub const SECURITY_NONE: u8 = 1;
pub const SECURITY_VNC_AUTH: u8 = 2;
/// Encodings.
pub const ENCODING_RAW: i32 = 0;
pub const ENCODING_ZRLE: i32 = 16;
pub const ENCODING_DESKTOP_SIZE: i32 = -223;
/// The longest ClientCutText a viewer may send (the text is skipped).
pub const MAX_CUT_TEXT: u32 = 1 << 20;
/// Encodings kept from one SetEncodings (the rest are read and dropped).
pub const MAX_ENCODINGS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum RfbError {
    #[error("viewer connection: {0}")]
    Io(#[from] io::Error),
    #[error("not an RFB protocol version: {0:?}")]
    Version(String),
    #[error("the viewer chose security type {0}, which was not offered")]
    Security(u8),
    #[error("VNC authentication failed")]
    AuthFailed,
    #[error("unknown client message type {0}")]
    UnknownMessage(u8),
    #[error("pixel format not served: {0}")]
    PixelFormat(&'static str),
    #[error("ClientCutText of {0} bytes (at most {MAX_CUT_TEXT})")]
    CutTextTooLong(u32),
}

/// The protocol minor version agreed with a viewer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V3_3,
    V3_7,
    V3_8,
}

/// Reads the viewer's ProtocolVersion: "RFB 003.00x\n". Minor versions the
/// spec does not name count as 3.3 (as it says); 8 and above as 3.8.
pub fn read_version(r: &mut impl Read) -> Result<Version, RfbError> {
    let mut v = [0u8; 12];
    r.read_exact(&mut v)?;
    let text = String::from_utf8_lossy(&v).into_owned();
    let digits = |s: &[u8]| {
        s.iter().try_fold(0u32, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
        })
    };
    let (Some(major), Some(minor)) = (digits(&v[4..7]), digits(&v[8..11])) else {
        return Err(RfbError::Version(text));
    };
    if &v[..4] != b"RFB " || v[7] != b'.' || v[11] != b'\n' || major != 3 {
        return Err(RfbError::Version(text));
    }
    Ok(match minor {
        7 => Version::V3_7,
        m if m >= 8 => Version::V3_8,
        _ => Version::V3_3,
    })
}

/// PIXEL_FORMAT (16 bytes on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub true_colour: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// The server's own: XRGB8888, little-endian (bytes B, G, R, X).
    pub const XRGB8888: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// 16-bit 5-6-5, little-endian (what low-bandwidth viewers ask for).
    pub const RGB565: PixelFormat = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: false,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = u8::from(self.true_colour);
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> PixelFormat {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16_at(4),
            green_max: u16_at(6),
            blue_max: u16_at(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        }
    }

    /// Whether this server can send pixels in this format: true colour at
    /// 8, 16 or 32 bits per pixel, every channel inside the pixel.
    pub fn check(&self) -> Result<(), RfbError> {
        if !self.true_colour {
            return Err(RfbError::PixelFormat("colour maps are not served"));
        }
        if !matches!(self.bits_per_pixel, 8 | 16 | 32) {
            return Err(RfbError::PixelFormat("bits per pixel must be 8, 16 or 32"));
        }
        let bits = u32::from(self.bits_per_pixel);
        for (max, shift) in [
            (self.red_max, self.red_shift),
            (self.green_max, self.green_shift),
            (self.blue_max, self.blue_shift),
        ] {
            let width = 16 - max.leading_zeros();
            // A shift of the whole pixel or more is outside it, even for a
            // channel of no bits (max 0).
            if u32::from(shift) >= bits || u32::from(shift) + width > bits {
                return Err(RfbError::PixelFormat("a channel lies outside the pixel"));
            }
        }
        Ok(())
    }

    /// Bytes per pixel.
    pub fn bytes(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// One XRGB8888 pixel (memory bytes B, G, R, X) in this format, as a value.
    #[inline]
    pub fn value(&self, bgrx: &[u8]) -> u32 {
        // `check` keeps shifts inside the pixel; a wider one gives 0, not a panic.
        let scale = |c: u8, max: u16, shift: u8| {
            ((u32::from(c) * u32::from(max) + 127) / 255)
                .checked_shl(u32::from(shift))
                .unwrap_or(0)
        };
        scale(bgrx[2], self.red_max, self.red_shift)
            | scale(bgrx[1], self.green_max, self.green_shift)
            | scale(bgrx[0], self.blue_max, self.blue_shift)
    }

    /// Appends `value` as `n` bytes in this format's byte order.
    #[inline]
    pub fn put(&self, out: &mut Vec<u8>, value: u32, n: usize) {
        let le = value.to_le_bytes();
        if self.big_endian {
            out.extend(le[..n].iter().rev());
        } else {
            out.extend_from_slice(&le[..n]);
        }
    }
}

/// What ServerInit tells a viewer.
pub fn server_init(width: u16, height: u16, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(24 + name.len());
    b.extend_from_slice(&width.to_be_bytes());
    b.extend_from_slice(&height.to_be_bytes());
    b.extend_from_slice(&PixelFormat::XRGB8888.to_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// A FramebufferUpdateRequest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateRequest {
    pub incremental: bool,
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
}

/// A message from the viewer.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage {
    SetPixelFormat(PixelFormat),
    /// The first [`MAX_ENCODINGS`] encodings, in the viewer's order.
    SetEncodings(Vec<i32>),
    UpdateRequest(UpdateRequest),
    /// Keys and pointer are read and dropped: the devices have no input.
    Key,
    Pointer,
    CutText,
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads one client-to-server message.
pub fn read_client_message(r: &mut impl Read) -> Result<ClientMessage, RfbError> {
    let [kind] = read_array::<1>(r)?;
    Ok(match kind {
        0 => {
            let b = read_array::<19>(r)?;
            let pf: [u8; 16] = b[3..].try_into().unwrap_or([0; 16]);
            ClientMessage::SetPixelFormat(PixelFormat::from_bytes(&pf))
        }
        2 => {
            let b = read_array::<3>(r)?;
            let count = usize::from(u16::from_be_bytes([b[1], b[2]]));
            let mut encodings = Vec::with_capacity(count.min(MAX_ENCODINGS));
            for _ in 0..count {
                let e = i32::from_be_bytes(read_array::<4>(r)?);
                if encodings.len() < MAX_ENCODINGS {
                    encodings.push(e);
                }
            }
            ClientMessage::SetEncodings(encodings)
        }
        3 => {
            let b = read_array::<9>(r)?;
            let at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
            ClientMessage::UpdateRequest(UpdateRequest {
                incremental: b[0] != 0,
                x: at(1),
                y: at(3),
                width: at(5),
                height: at(7),
            })
        }
        4 => {
            read_array::<7>(r)?;
            ClientMessage::Key
        }
        5 => {
            read_array::<5>(r)?;
            ClientMessage::Pointer
        }
        6 => {
            let b = read_array::<7>(r)?;
            let len = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
            if len > MAX_CUT_TEXT {
                return Err(RfbError::CutTextTooLong(len));
            }
            io::copy(&mut r.take(u64::from(len)), &mut io::sink())?;
            ClientMessage::CutText
        }
        other => return Err(RfbError::UnknownMessage(other)),
    })
}

/// A rectangle of a FramebufferUpdate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub x: u16,
    pub y: u16,
    pub width: u16,
    pub height: u16,
}

/// Appends a rectangle header.
pub fn put_rect_header(out: &mut Vec<u8>, r: Rect, encoding: i32) {
    for v in [r.x, r.y, r.width, r.height] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// Starts a FramebufferUpdate of `rects` rectangles.
pub fn put_update_header(out: &mut Vec<u8>, rects: u16) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
}

/// Writes a failure reason (u32 length and text), as 3.8's SecurityResult
/// and a zero-type security list carry it.
pub fn write_reason(w: &mut impl Write, reason: &str) -> io::Result<()> {
    w.write_all(&(reason.len() as u32).to_be_bytes())?;
    w.write_all(reason.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        let v = |s: &[u8]| read_version(&mut &s[..]);
        assert_eq!(v(b"RFB 003.008\n").unwrap(), Version::V3_8);
        assert_eq!(v(b"RFB 003.889\n").unwrap(), Version::V3_8);
        assert_eq!(v(b"RFB 003.007\n").unwrap(), Version::V3_7);
        assert_eq!(v(b"RFB 003.005\n").unwrap(), Version::V3_3);
        for bad in [
            &b"RFB 004.000\n"[..],
            b"GET / HTTP/1",
            b"RFB 003.0x8\n",
            b"RFB 003",
        ] {
            assert!(v(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn client_messages_and_their_bounds() {
        let mut pf = vec![0u8, 0, 0, 0];
        pf.extend(PixelFormat::XRGB8888.to_bytes());
        assert_eq!(
            read_client_message(&mut &pf[..]).unwrap(),
            ClientMessage::SetPixelFormat(PixelFormat::XRGB8888)
        );
        // 65535 encodings: read through, the first 64 kept.
        let mut enc = vec![2u8, 0, 0xff, 0xff];
        for i in 0..0xffffu32 {
            enc.extend((i as i32).to_be_bytes());
        }
        enc.extend([3u8, 1, 0, 1, 0, 2, 0, 3, 0, 4]);
        let mut r = &enc[..];
        match read_client_message(&mut r).unwrap() {
            ClientMessage::SetEncodings(e) => assert_eq!(e.len(), MAX_ENCODINGS),
            m => panic!("{m:?}"),
        }
        assert_eq!(
            read_client_message(&mut r).unwrap(),
            ClientMessage::UpdateRequest(UpdateRequest {
                incremental: true,
                x: 1,
                y: 2,
                width: 3,
                height: 4
            })
        );
        let huge_cut = [6u8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_client_message(&mut &huge_cut[..]),
            Err(RfbError::CutTextTooLong(_))
        ));
        assert!(matches!(
            read_client_message(&mut &[150u8][..]),
            Err(RfbError::UnknownMessage(150))
        ));
        assert!(read_client_message(&mut &[3u8, 0][..]).is_err());
    }

    #[test]
    fn pixel_formats() {
        let pf = PixelFormat::XRGB8888;
        pf.check().unwrap();
        assert_eq!(pf.value(&[0x11, 0x22, 0x33, 0]), 0x33_2211);
        let rgb565 = PixelFormat {
            big_endian: true,
            ..PixelFormat::RGB565
        };
        rgb565.check().unwrap();
        let v = rgb565.value(&[0xff, 0, 0xff, 0]);
        assert_eq!(v, 0xf81f);
        let mut out = Vec::new();
        rgb565.put(&mut out, v, 2);
        assert_eq!(out, [0xf8, 0x1f]);
        let outside = PixelFormat {
            red_shift: 30,
            ..pf
        };
        assert!(outside.check().is_err());
        // A channel of no bits shifted by the whole pixel (found by fuzzing:
        // it passed the check and the shift overflowed).
        let empty_far = PixelFormat {
            red_max: 0,
            red_shift: 32,
            ..pf
        };
        assert!(empty_far.check().is_err());
        assert_eq!(empty_far.value(&[0, 0, 0xff, 0]), 0);
        assert!(PixelFormat {
            true_colour: false,
            ..pf
        }
        .check()
        .is_err());
        assert!(PixelFormat {
            bits_per_pixel: 24,
            ..pf
        }
        .check()
        .is_err());
    }
}
