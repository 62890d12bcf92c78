//! A small VNC viewer: what the tests use to watch a device (and a second
//! client beside the ecosystem's). It speaks RFB 3.8 with None or VNC
//! authentication, asks for XRGB8888 (or any true-colour format it is
//! given), and decodes Raw, ZRLE (every subencoding) and DesktopSize.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use flate2::{Decompress, FlushDecompress};

use super::auth::VncPassword;
use super::rfb::*;
use super::{Frame, Listen};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("VNC connection: {0}")]
    Io(#[from] io::Error),
    #[error("VNC server: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, ClientError>;

fn bad<T>(what: impl Into<String>) -> Result<T> {
    Err(ClientError::Protocol(what.into()))
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// What one FramebufferUpdate held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UpdateSummary {
    pub rects: usize,
    pub resized: bool,
    /// Encodings of the pixel rectangles received.
    pub encodings: Vec<i32>,
}

pub struct VncClient {
    r: BufReader<Box<dyn Stream>>,
    w: Box<dyn Stream>,
    pub name: String,
    pub frame: Frame,
    pf: PixelFormat,
    z: Decompress,
}

impl VncClient {
    /// Connects and completes the handshake (`password` for VNC auth).
    pub fn connect(at: &Listen, password: Option<&str>) -> Result<VncClient> {
        let (r, w): (Box<dyn Stream>, Box<dyn Stream>) = match at {
            Listen::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
            Listen::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                (Box::new(s.try_clone()?), Box::new(s))
            }
        };
        let mut c = VncClient {
            r: BufReader::new(r),
            w,
            name: String::new(),
            frame: Frame {
                width: 0,
                height: 0,
                pixels: Vec::new(),
            },
            pf: PixelFormat::XRGB8888,
            z: Decompress::new(true),
        };
        c.handshake(password)?;
        Ok(c)
    }

    fn read_n<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }

    fn read_u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.read_n::<4>()?))
    }

    fn read_reason(&mut self) -> Result<String> {
        let len = self.read_u32()?.min(1 << 16) as usize;
        let mut b = vec![0; len];
        self.r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn handshake(&mut self, password: Option<&str>) -> Result<()> {
        let v = self.read_n::<12>()?;
        if &v[..4] != b"RFB " {
            return bad("no RFB version");
        }
        self.w.write_all(PROTOCOL_VERSION)?;
        let [n] = self.read_n::<1>()?;
        if n == 0 {
            return bad(format!("refused: {}", self.read_reason()?));
        }
        let mut types = vec![0; usize::from(n)];
        self.r.read_exact(&mut types)?;
        let chosen = if types.contains(&SECURITY_NONE) {
            SECURITY_NONE
        } else if types.contains(&SECURITY_VNC_AUTH) {
            SECURITY_VNC_AUTH
        } else {
            return bad(format!("no known security type in {types:?}"));
        };
        self.w.write_all(&[chosen])?;
        if chosen == SECURITY_VNC_AUTH {
            let challenge = self.read_n::<16>()?;
            let p = VncPassword::from_file_contents(password.unwrap_or("-"))
                .ok_or_else(|| ClientError::Protocol("empty password".into()))?;
            self.w.write_all(&p.response(&challenge))?;
        }
        if self.read_u32()? != 0 {
            return bad(format!("security failed: {}", self.read_reason()?));
        }
        self.w.write_all(&[1])?;
        let init = self.read_n::<20>()?;
        let (w, h) = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        let name_len = self.read_u32()?.min(1 << 16) as usize;
        let mut name = vec![0; name_len];
        self.r.read_exact(&mut name)?;
        self.name = String::from_utf8_lossy(&name).into_owned();
        self.resize(u32::from(w), u32::from(h));
        Ok(())
    }

    fn resize(&mut self, w: u32, h: u32) {
        self.frame = Frame {
            width: w,
            height: h,
            pixels: vec![0; 4 * w as usize * h as usize],
        };
    }

    /// SetPixelFormat: updates decode from then on.
    pub fn set_pixel_format(&mut self, pf: PixelFormat) -> Result<()> {
        let mut m = vec![0u8, 0, 0, 0];
        m.extend(pf.to_bytes());
        self.w.write_all(&m)?;
        self.pf = pf;
        Ok(())
    }

    pub fn set_encodings(&mut self, encodings: &[i32]) -> Result<()> {
        let mut m = vec![2u8, 0];
        m.extend((encodings.len() as u16).to_be_bytes());
        for e in encodings {
            m.extend(e.to_be_bytes());
        }
        self.w.write_all(&m)?;
        Ok(())
    }

    /// FramebufferUpdateRequest for the whole screen.
    pub fn request(&mut self, incremental: bool) -> Result<()> {
        let mut m = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
        m.extend((self.frame.width as u16).to_be_bytes());
        m.extend((self.frame.height as u16).to_be_bytes());
        self.w.write_all(&m)?;
        Ok(())
    }

    /// Sends raw bytes (tests of hostile viewers).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes)?;
        Ok(())
    }

    /// Reads the next FramebufferUpdate into [`frame`](Self::frame).
    pub fn read_update(&mut self) -> Result<UpdateSummary> {
        let [kind] = self.read_n::<1>()?;
        match kind {
            0 => {}
            2 => return self.read_update(), // Bell.
            3 => {
                self.read_n::<3>()?;
                let len = self.read_u32()?;
                io::copy(&mut (&mut self.r).take(u64::from(len)), &mut io::sink())?;
                return self.read_update();
            }
            k => return bad(format!("message type {k}")),
        }
        let h = self.read_n::<3>()?;
        let n = usize::from(u16::from_be_bytes([h[1], h[2]]));
        let mut summary = UpdateSummary {
            rects: n,
            ..UpdateSummary::default()
        };
        for _ in 0..n {
            let rh = self.read_n::<12>()?;
            let at = |i: usize| u16::from_be_bytes([rh[i], rh[i + 1]]);
            let r = Rect {
                x: at(0),
                y: at(2),
                width: at(4),
                height: at(6),
            };
            let encoding = i32::from_be_bytes([rh[8], rh[9], rh[10], rh[11]]);
            match encoding {
                ENCODING_DESKTOP_SIZE => {
                    self.resize(u32::from(r.width), u32::from(r.height));
                    summary.resized = true;
                    continue;
                }
                ENCODING_RAW | ENCODING_ZRLE => {}
                e => return bad(format!("encoding {e}")),
            }
            if u32::from(r.x) + u32::from(r.width) > self.frame.width
                || u32::from(r.y) + u32::from(r.height) > self.frame.height
            {
                return bad(format!("{r:?} outside the screen"));
            }
            summary.encodings.push(encoding);
            if encoding == ENCODING_RAW {
                let bytes = usize::from(r.width) * usize::from(r.height) * self.pf.bytes();
                let mut data = vec![0; bytes];
                self.r.read_exact(&mut data)?;
                let pixels: Vec<u32> = data
                    .chunks_exact(self.pf.bytes())
                    .map(|p| self.value_of(p))
                    .collect();
                self.paint(r, &pixels);
            } else {
                self.read_zrle(r)?;
            }
        }
        Ok(summary)
    }

    fn value_of(&self, bytes: &[u8]) -> u32 {
        let mut v = 0u32;
        for (i, &b) in bytes.iter().enumerate() {
            if self.pf.big_endian {
                v = (v << 8) | u32::from(b);
            } else {
                v |= u32::from(b) << (8 * i);
            }
        }
        v
    }

    /// Writes the pixels of `r` (values in the client's format, row by row)
    /// into the frame as XRGB8888.
    fn paint(&mut self, r: Rect, values: &[u32]) {
        let pf = self.pf;
        let channel = |v: u32, max: u16, shift: u8| -> u8 {
            let c = (v >> shift) & u32::from(max);
            (c * 255 / u32::from(max.max(1))) as u8
        };
        let stride = 4 * self.frame.width as usize;
        for (i, &v) in values.iter().enumerate() {
            let (x, y) = (
                usize::from(r.x) + i % usize::from(r.width),
                usize::from(r.y) + i / usize::from(r.width),
            );
            let at = y * stride + 4 * x;
            self.frame.pixels[at..at + 4].copy_from_slice(&[
                channel(v, pf.blue_max, pf.blue_shift),
                channel(v, pf.green_max, pf.green_shift),
                channel(v, pf.red_max, pf.red_shift),
                0,
            ]);
        }
    }

    fn read_zrle(&mut self, r: Rect) -> Result<()> {
        let len = self.read_u32()? as usize;
        if len > 64 << 20 {
            return bad("ZRLE rectangle over 64 MiB");
        }
        let mut data = vec![0; len];
        self.r.read_exact(&mut data)?;
        let mut plain = Vec::with_capacity(len * 4 + 4096);
        let mut input = &data[..];
        loop {
            let before = self.z.total_in();
            self.z
                .decompress_vec(input, &mut plain, FlushDecompress::Sync)
                .map_err(|e| ClientError::Protocol(format!("ZRLE zlib: {e}")))?;
            input = &input[(self.z.total_in() - before) as usize..];
            if input.is_empty() && plain.len() < plain.capacity() {
                break;
            }
            plain.reserve(plain.capacity().max(4096));
        }
        let cpixel = super::encode::cpixel_layout(&self.pf);
        let mut p = &plain[..];
        for ty in (r.y..r.y + r.height).step_by(64) {
            let th = 64.min(r.y + r.height - ty);
            for tx in (r.x..r.x + r.width).step_by(64) {
                let tw = 64.min(r.x + r.width - tx);
                let tile = Rect {
                    x: tx,
                    y: ty,
                    width: tw,
                    height: th,
                };
                let values = self.zrle_tile(&mut p, cpixel, tw, th)?;
                self.paint(tile, &values);
            }
        }
        Ok(())
    }

    fn zrle_tile(
        &self,
        p: &mut &[u8],
        (n, shift): (usize, u32),
        w: u16,
        h: u16,
    ) -> Result<Vec<u32>> {
        let count = usize::from(w) * usize::from(h);
        let take = |p: &mut &[u8], k: usize| -> Result<Vec<u8>> {
            if p.len() < k {
                return bad("ZRLE data ends inside a tile");
            }
            let (a, b) = p.split_at(k);
            *p = b;
            Ok(a.to_vec())
        };
        let px = |p: &mut &[u8]| -> Result<u32> { Ok(self.value_of(&take(p, n)?) << shift) };
        let sub = take(p, 1)?[0];
        let mut out = Vec::with_capacity(count);
        match sub {
            0 => {
                for _ in 0..count {
                    out.push(px(p)?);
                }
            }
            1 => out.resize(count, px(p)?),
            2..=16 => {
                let palette: Vec<u32> = (0..sub).map(|_| px(p)).collect::<Result<_>>()?;
                let bits = match sub {
                    2 => 1,
                    3..=4 => 2,
                    _ => 4,
                };
                for _ in 0..h {
                    let row = take(p, (usize::from(w) * bits).div_ceil(8))?;
                    for x in 0..usize::from(w) {
                        let bit = x * bits;
                        let idx = (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                        out.push(*palette.get(usize::from(idx)).unwrap_or(&0));
                    }
                }
            }
            128 | 130..=255 => {
                let palette: Vec<u32> = if sub == 128 {
                    Vec::new()
                } else {
                    (0..sub - 128).map(|_| px(p)).collect::<Result<_>>()?
                };
                while out.len() < count {
                    let (v, run) = if sub == 128 {
                        (px(p)?, run_length(p)?)
                    } else {
                        let i = take(p, 1)?[0];
                        let v = *palette.get(usize::from(i & 0x7f)).unwrap_or(&0);
                        (v, if i & 0x80 != 0 { run_length(p)? } else { 1 })
                    };
                    out.extend(std::iter::repeat_n(v, run.min(count - out.len())));
                }
            }
            s => return bad(format!("ZRLE subencoding {s}")),
        }
        Ok(out)
    }
}

fn run_length(p: &mut &[u8]) -> Result<usize> {
    let mut len = 1usize;
    loop {
        let Some((&b, rest)) = p.split_first() else {
            return bad("ZRLE run ends early");
        };
        *p = rest;
        len += usize::from(b);
        if b != 255 {
            return Ok(len);
        }
    }
}
