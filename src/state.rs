//! Device state snapshots: what a device (framework and model) saves for
//! migration and restores on the other side.
//!
//! The layout is plain and documented rather than a serializer's: a blob is
//! the magic `UMDEVST1`, then sections, each
//!
//! | bytes | field |
//! |---|---|
//! | 4 | tag (ASCII, e.g. `PCIF`) |
//! | 4 | version of that section's layout, u32 LE |
//! | 8 | length of the body, u64 LE |
//! | length | body |
//!
//! A body is a sequence of little-endian integers and length-prefixed byte
//! strings (u64 length, then the bytes) in an order each section documents.
//!
//! A blob comes from outside the process (a migration stream), so it is read
//! as hostile: every read is bounded by what is left, a length is never
//! trusted for an allocation before the bytes are there, and a short, long or
//! unknown blob is a [`StateError`], never a panic.

/// The first bytes of every state blob.
pub const MAGIC: [u8; 8] = *b"UMDEVST1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a umdev state blob (bad magic)")]
    BadMagic,
    #[error("state blob truncated at byte {at}: {need} more bytes needed")]
    Truncated { at: usize, need: u64 },
    #[error("expected state section {want:?}, found {found:?}")]
    WrongSection { want: String, found: String },
    #[error("state section {tag:?} has layout version {version}, this build reads up to {max}")]
    Version { tag: String, version: u32, max: u32 },
    #[error("{0} bytes left over at the end of a state section")]
    Trailing(usize),
    #[error("invalid state: {0}")]
    Invalid(&'static str),
    #[error("this device cannot save or restore its state")]
    Unsupported,
}

/// Builds a state blob.
#[derive(Debug)]
pub struct StateWriter {
    buf: Vec<u8>,
}

impl Default for StateWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl StateWriter {
    /// A blob with its magic.
    pub fn new() -> Self {
        StateWriter {
            buf: MAGIC.to_vec(),
        }
    }

    /// Writes section `tag` at layout `version`, its body written by `body`.
    pub fn section(&mut self, tag: &[u8; 4], version: u32, body: impl FnOnce(&mut SectionWriter)) {
        let mut s = SectionWriter { buf: Vec::new() };
        body(&mut s);
        self.buf.extend_from_slice(tag);
        self.buf.extend_from_slice(&version.to_le_bytes());
        self.buf
            .extend_from_slice(&(s.buf.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(&s.buf);
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// The body of one section.
#[derive(Debug)]
pub struct SectionWriter {
    buf: Vec<u8>,
}

impl SectionWriter {
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn bool(&mut self, v: bool) {
        self.buf.push(u8::from(v));
    }
    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, v: &[u8]) {
        self.u64(v.len() as u64);
        self.buf.extend_from_slice(v);
    }
}

/// Reads a state blob, section by section, in the order they were written.
#[derive(Debug)]
pub struct StateReader<'a> {
    rest: SectionReader<'a>,
}

impl<'a> StateReader<'a> {
    /// Checks the magic.
    pub fn new(blob: &'a [u8]) -> Result<Self, StateError> {
        if blob.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(StateError::BadMagic);
        }
        Ok(StateReader {
            rest: SectionReader {
                data: blob,
                at: MAGIC.len(),
            },
        })
    }

    /// The next section, which must be `tag` at a layout version up to
    /// `max_version`: its version and a reader for its body.
    pub fn section(
        &mut self,
        tag: &[u8; 4],
        max_version: u32,
    ) -> Result<(u32, SectionReader<'a>), StateError> {
        let found = self.rest.take(4)?;
        if found != tag {
            return Err(StateError::WrongSection {
                want: String::from_utf8_lossy(tag).into(),
                found: String::from_utf8_lossy(found).into(),
            });
        }
        let version = self.rest.u32()?;
        if version == 0 || version > max_version {
            return Err(StateError::Version {
                tag: String::from_utf8_lossy(tag).into(),
                version,
                max: max_version,
            });
        }
        let len = self.rest.u64()?;
        let start = self.rest.at;
        let body = self.rest.take_u64(len)?;
        Ok((
            version,
            SectionReader {
                data: &self.rest.data[..start + body.len()],
                at: start,
            },
        ))
    }

    /// Every section was read: nothing may follow.
    pub fn finish(self) -> Result<(), StateError> {
        self.rest.finish()
    }
}

/// Reads the body of one section.
#[derive(Debug)]
pub struct SectionReader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> SectionReader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StateError> {
        self.take_u64(n as u64)
    }

    fn take_u64(&mut self, n: u64) -> Result<&'a [u8], StateError> {
        let left = (self.data.len() - self.at) as u64;
        if n > left {
            return Err(StateError::Truncated {
                at: self.at,
                need: n - left,
            });
        }
        let bytes = &self.data[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], StateError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, StateError> {
        Ok(self.take(1)?[0])
    }
    pub fn bool(&mut self) -> Result<bool, StateError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(StateError::Invalid("a boolean that is neither 0 nor 1")),
        }
    }
    pub fn u16(&mut self) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub fn u32(&mut self) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub fn u64(&mut self) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// A length-prefixed byte string (borrowed from the blob: nothing is
    /// allocated for a length the blob does not hold).
    pub fn bytes(&mut self) -> Result<&'a [u8], StateError> {
        let len = self.u64()?;
        self.take_u64(len)
    }
    /// A count of items that each take at least `min_item_bytes`: refused if
    /// the rest of the section cannot hold that many (so a hostile count
    /// never sizes an allocation).
    pub fn count(&mut self, min_item_bytes: usize) -> Result<usize, StateError> {
        let n = self.u64()?;
        let left = (self.data.len() - self.at) as u64;
        if n.saturating_mul(min_item_bytes.max(1) as u64) > left {
            return Err(StateError::Truncated {
                at: self.at,
                need: n.saturating_mul(min_item_bytes.max(1) as u64) - left,
            });
        }
        Ok(n as usize)
    }

    /// The whole body was read: nothing may be left.
    pub fn finish(self) -> Result<(), StateError> {
        match self.data.len() - self.at {
            0 => Ok(()),
            n => Err(StateError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> Vec<u8> {
        let mut w = StateWriter::new();
        w.section(b"TEST", 2, |s| {
            s.u8(7);
            s.bool(true);
            s.u16(0x1234);
            s.u32(0xdead_beef);
            s.u64(u64::MAX);
            s.bytes(b"hello");
            s.u64(2);
            s.u32(1);
            s.u32(2);
        });
        w.section(b"NEXT", 1, |s| s.u8(1));
        w.finish()
    }

    #[test]
    fn round_trip() {
        let b = blob();
        let mut r = StateReader::new(&b).unwrap();
        let (v, mut s) = r.section(b"TEST", 3).unwrap();
        assert_eq!(v, 2);
        assert_eq!(s.u8().unwrap(), 7);
        assert!(s.bool().unwrap());
        assert_eq!(s.u16().unwrap(), 0x1234);
        assert_eq!(s.u32().unwrap(), 0xdead_beef);
        assert_eq!(s.u64().unwrap(), u64::MAX);
        assert_eq!(s.bytes().unwrap(), b"hello");
        let n = s.count(4).unwrap();
        let items: Vec<u32> = (0..n).map(|_| s.u32().unwrap()).collect();
        assert_eq!(items, [1, 2]);
        s.finish().unwrap();
        let (_, mut s) = r.section(b"NEXT", 1).unwrap();
        assert_eq!(s.u8().unwrap(), 1);
        s.finish().unwrap();
        r.finish().unwrap();
    }

    /// Every truncation and every flipped byte of a blob is an error or a
    /// different value, never a panic.
    #[test]
    fn hostile_blobs_are_errors() {
        let b = blob();
        let read = |b: &[u8]| -> Result<(), StateError> {
            let mut r = StateReader::new(b)?;
            let (_, mut s) = r.section(b"TEST", 3)?;
            s.u8()?;
            s.bool()?;
            s.u16()?;
            s.u32()?;
            s.u64()?;
            s.bytes()?;
            let n = s.count(4)?;
            for _ in 0..n {
                s.u32()?;
            }
            s.finish()?;
            let (_, mut s) = r.section(b"NEXT", 1)?;
            s.u8()?;
            s.finish()?;
            r.finish()
        };
        read(&b).unwrap();
        for len in 0..b.len() {
            assert!(read(&b[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..b.len() {
            for bit in 0..8 {
                let mut c = b.clone();
                c[i] ^= 1 << bit;
                let _ = read(&c);
            }
        }
        let mut long = b.clone();
        long.push(0);
        assert_eq!(read(&long), Err(StateError::Trailing(1)));
        assert_eq!(
            StateReader::new(b"UMDEVST0").unwrap_err(),
            StateError::BadMagic
        );
        let mut r = StateReader::new(&b).unwrap();
        assert!(matches!(
            r.section(b"TEST", 1),
            Err(StateError::Version { version: 2, .. })
        ));
    }
}
