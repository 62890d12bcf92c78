//! The migration data stream: how a device's state image (a
//! [`crate::state`] blob) travels from the source to the destination in the
//! bounded pieces MIG_DATA_READ / MIG_DATA_WRITE carry.
//!
//! The source may send the image more than once (PRE_COPY sends an early
//! image while the device runs, STOP_COPY the final one), so the stream is a
//! list of edits to an image the destination builds up, and each later image
//! is sent as the chunks that differ from the one before:
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `UMMIGST1`, once at the start |
//!
//! then records, each a 24-byte head and a payload:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | kind, u32 LE: 1 SIZE, 2 DATA, 3 END |
//! | 4 | reserved, 0 |
//! | 8 | offset, u64 LE |
//! | 8 | payload length, u64 LE |
//!
//! - SIZE: the image is `offset` bytes long from here on (grown with zeros or
//!   cut); no payload.
//! - DATA: the payload replaces image bytes `offset..offset+length`.
//! - END: the image is complete and `offset` bytes long; the payload is 8
//!   bytes, [`checksum`] of the whole image. Nothing may follow.
//!
//! The destination reads the stream as hostile: records are parsed as the
//! bytes arrive (a record may be split across writes at any byte), nothing is
//! allocated beyond the image size limit it was given, a DATA outside the
//! image, an unknown kind, a bad checksum or bytes after END are errors.

use std::collections::VecDeque;

/// The first bytes of every stream.
pub const MAGIC: [u8; 8] = *b"UMMIGST1";
const HEAD: usize = 24;
const KIND_SIZE: u32 = 1;
const KIND_DATA: u32 = 2;
const KIND_END: u32 = 3;
/// The granularity at which a later image is compared with the one sent.
pub const CHUNK: usize = 64 * 1024;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("not a umdev migration stream (bad magic)")]
    BadMagic,
    #[error("unknown migration record kind {0}")]
    UnknownKind(u32),
    #[error("migration record with reserved field {0:#x}")]
    Reserved(u32),
    #[error("migration image of {size} bytes is over the limit of {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("migration DATA at {offset:#x}+{len:#x} lies outside the {size}-byte image")]
    OutsideImage { offset: u64, len: u64, size: u64 },
    #[error("migration {0} record with a payload of the wrong length")]
    PayloadLength(&'static str),
    #[error("migration image checksum mismatch")]
    Checksum,
    #[error("migration END says {said} bytes, the image has {have}")]
    EndSize { said: u64, have: u64 },
    #[error("migration data after the END record")]
    AfterEnd,
    #[error("migration stream incomplete (no END record yet)")]
    Incomplete,
}

/// FNV-1a over the image's little-endian u64 words (a zero-padded tail
/// word), then its length: cheap enough for a downtime path, and enough to
/// catch a stream that lost or reordered data.
pub fn checksum(image: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = image.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap_or_default())).wrapping_mul(PRIME);
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut tail = [0u8; 8];
        tail[..rest.len()].copy_from_slice(rest);
        h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(PRIME);
    }
    (h ^ image.len() as u64).wrapping_mul(PRIME)
}

fn head(kind: u32, offset: u64, len: u64) -> [u8; HEAD] {
    let mut h = [0u8; HEAD];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

/// The source's side: queues images as records and hands out the bytes.
#[derive(Debug, Default)]
pub struct StreamWriter {
    /// The image the destination has once it took everything queued.
    sent: Vec<u8>,
    out: VecDeque<u8>,
    started: bool,
    ended: bool,
}

impl StreamWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `image`: all of it the first time, then the chunks that differ
    /// from the image queued before. Returns the bytes queued.
    pub fn queue_image(&mut self, image: Vec<u8>) -> usize {
        let before = self.out.len();
        if !self.started {
            self.out.extend(MAGIC);
            self.started = true;
        }
        if image.len() != self.sent.len() {
            self.out.extend(head(KIND_SIZE, image.len() as u64, 0));
        }
        // What the destination holds at each offset: the old image, then the
        // zeros a grown image starts with.
        let mut at = 0;
        while at < image.len() {
            let len = CHUNK.min(image.len() - at);
            let new = &image[at..at + len];
            let kept = self.sent.len().saturating_sub(at).min(len);
            let old = self.sent.get(at..at + kept).unwrap_or_default();
            let same = old == &new[..kept] && new[kept..].iter().all(|&b| b == 0);
            if !same {
                self.out.extend(head(KIND_DATA, at as u64, len as u64));
                self.out.extend(new);
            }
            at += len;
        }
        self.sent = image;
        self.out.len() - before
    }

    /// Queues the END record: the destination may restore after it.
    pub fn finish(&mut self) {
        if self.ended {
            return;
        }
        if !self.started {
            self.queue_image(Vec::new());
        }
        self.out.extend(head(KIND_END, self.sent.len() as u64, 8));
        self.out.extend(checksum(&self.sent).to_le_bytes());
        self.ended = true;
    }

    /// Bytes queued and not yet read.
    pub fn pending(&self) -> usize {
        self.out.len()
    }

    /// Whether the END record is queued.
    pub fn is_finished(&self) -> bool {
        self.ended
    }

    /// Takes up to `max` queued bytes.
    pub fn read(&mut self, max: usize) -> Vec<u8> {
        let n = max.min(self.out.len());
        self.out.drain(..n).collect()
    }
}

enum ReadState {
    Magic,
    Head,
    Data { offset: usize, left: usize },
    End { said: u64 },
    Done,
    Failed(StreamError),
}

/// The destination's side: takes the stream in pieces and builds the image.
pub struct StreamReader {
    image: Vec<u8>,
    limit: u64,
    /// A magic, head or END payload being gathered across pieces.
    partial: Vec<u8>,
    state: ReadState,
}

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("image_len", &self.image.len())
            .field("complete", &self.is_complete())
            .finish_non_exhaustive()
    }
}

impl StreamReader {
    /// A reader that refuses images over `limit` bytes.
    pub fn new(limit: u64) -> Self {
        StreamReader {
            image: Vec::new(),
            limit,
            partial: Vec::new(),
            state: ReadState::Magic,
        }
    }

    /// Takes the next piece of the stream. After an error every later call
    /// fails with the same error.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), StreamError> {
        while !bytes.is_empty() {
            if let Err(e) = self.step(&mut bytes) {
                self.state = ReadState::Failed(e.clone());
                return Err(e);
            }
        }
        match &self.state {
            ReadState::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Gathers up to `want` bytes into `partial`; true when complete.
    fn gather(&mut self, bytes: &mut &[u8], want: usize) -> bool {
        let take = (want - self.partial.len()).min(bytes.len());
        self.partial.extend_from_slice(&bytes[..take]);
        *bytes = &bytes[take..];
        self.partial.len() == want
    }

    fn step(&mut self, bytes: &mut &[u8]) -> Result<(), StreamError> {
        match self.state {
            ReadState::Failed(ref e) => Err(e.clone()),
            ReadState::Done => Err(StreamError::AfterEnd),
            ReadState::Magic => {
                if self.gather(bytes, MAGIC.len()) {
                    if self.partial[..] != MAGIC {
                        return Err(StreamError::BadMagic);
                    }
                    self.partial.clear();
                    self.state = ReadState::Head;
                }
                Ok(())
            }
            ReadState::Head => {
                if !self.gather(bytes, HEAD) {
                    return Ok(());
                }
                let h = std::mem::take(&mut self.partial);
                let word = |r: std::ops::Range<usize>| {
                    let mut b = [0u8; 8];
                    b[..r.len()].copy_from_slice(&h[r]);
                    u64::from_le_bytes(b)
                };
                let (kind, reserved) = (word(0..4) as u32, word(4..8) as u32);
                let (offset, len) = (word(8..16), word(16..24));
                if reserved != 0 {
                    return Err(StreamError::Reserved(reserved));
                }
                self.state = match kind {
                    KIND_SIZE => {
                        if len != 0 {
                            return Err(StreamError::PayloadLength("SIZE"));
                        }
                        if offset > self.limit {
                            return Err(StreamError::TooLarge {
                                size: offset,
                                limit: self.limit,
                            });
                        }
                        // Within the limit, which fits memory we agreed to spend.
                        self.image.resize(offset as usize, 0);
                        ReadState::Head
                    }
                    KIND_DATA => {
                        let size = self.image.len() as u64;
                        if offset.checked_add(len).is_none_or(|end| end > size) {
                            return Err(StreamError::OutsideImage { offset, len, size });
                        }
                        if len == 0 {
                            ReadState::Head
                        } else {
                            ReadState::Data {
                                offset: offset as usize,
                                left: len as usize,
                            }
                        }
                    }
                    KIND_END => {
                        if len != 8 {
                            return Err(StreamError::PayloadLength("END"));
                        }
                        ReadState::End { said: offset }
                    }
                    other => return Err(StreamError::UnknownKind(other)),
                };
                Ok(())
            }
            ReadState::Data { offset, left } => {
                let take = left.min(bytes.len());
                self.image[offset..offset + take].copy_from_slice(&bytes[..take]);
                *bytes = &bytes[take..];
                self.state = if take == left {
                    ReadState::Head
                } else {
                    ReadState::Data {
                        offset: offset + take,
                        left: left - take,
                    }
                };
                Ok(())
            }
            ReadState::End { said } => {
                if !self.gather(bytes, 8) {
                    return Ok(());
                }
                let sum = u64::from_le_bytes(self.partial[..8].try_into().unwrap_or_default());
                self.partial.clear();
                let have = self.image.len() as u64;
                if said != have {
                    return Err(StreamError::EndSize { said, have });
                }
                if sum != checksum(&self.image) {
                    return Err(StreamError::Checksum);
                }
                self.state = ReadState::Done;
                Ok(())
            }
        }
    }

    /// Whether the END record arrived and checked out.
    pub fn is_complete(&self) -> bool {
        matches!(self.state, ReadState::Done)
    }

    /// The stream's error, if it failed.
    pub fn error(&self) -> Option<&StreamError> {
        match &self.state {
            ReadState::Failed(e) => Some(e),
            _ => None,
        }
    }

    /// The complete image.
    pub fn image(&self) -> Result<&[u8], StreamError> {
        match &self.state {
            ReadState::Done => Ok(&self.image),
            ReadState::Failed(e) => Err(e.clone()),
            _ => Err(StreamError::Incomplete),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn transfer(w: &mut StreamWriter, r: &mut StreamReader, piece: usize) {
        while w.pending() > 0 {
            r.feed(&w.read(piece)).unwrap();
        }
    }

    #[test]
    fn an_image_and_its_later_version_arrive_whole_in_any_pieces() {
        for piece in [1, 7, 24, 4096, 1 << 20] {
            let first = pattern(3 * CHUNK + 100, 1);
            let mut second = first.clone();
            second[CHUNK + 5] ^= 0xff;
            second.extend_from_slice(&[7; 300]);
            let mut w = StreamWriter::new();
            let mut r = StreamReader::new(1 << 24);
            w.queue_image(first.clone());
            transfer(&mut w, &mut r, piece);
            assert_eq!(r.image(), Err(StreamError::Incomplete));
            let delta = w.queue_image(second.clone());
            assert!(delta < 2 * CHUNK + 200, "only the changed chunks: {delta}");
            w.finish();
            transfer(&mut w, &mut r, piece);
            assert_eq!(r.image().unwrap(), &second[..]);
        }
    }

    #[test]
    fn a_shrunk_image_and_zero_chunks_are_sent_as_sizes() {
        let mut w = StreamWriter::new();
        let mut r = StreamReader::new(1 << 24);
        let mut big = vec![0u8; 4 * CHUNK];
        big[0] = 1;
        let queued = w.queue_image(big);
        assert!(queued < CHUNK + 100, "zero chunks are not sent: {queued}");
        w.queue_image(vec![2; 10]);
        w.finish();
        transfer(&mut w, &mut r, 5);
        assert_eq!(r.image().unwrap(), &[2; 10]);
    }

    fn stream_of(image: &[u8]) -> Vec<u8> {
        let mut w = StreamWriter::new();
        w.queue_image(image.to_vec());
        w.finish();
        w.read(usize::MAX)
    }

    #[test]
    fn hostile_streams_are_errors() {
        let good = stream_of(&pattern(1000, 3));
        let fed = |bytes: &[u8], limit: u64| {
            let mut r = StreamReader::new(limit);
            let res = r.feed(bytes);
            (res, r.is_complete())
        };
        assert_eq!(fed(&good, 1 << 20), (Ok(()), true));
        assert_eq!(fed(b"UMMIGSTX", 1 << 20).0, Err(StreamError::BadMagic));
        assert!(matches!(
            fed(&good, 999).0,
            Err(StreamError::TooLarge { size: 1000, .. })
        ));
        // Every truncation is incomplete, never an error or a panic.
        for cut in 0..good.len() {
            let (res, done) = fed(&good[..cut], 1 << 20);
            assert!(res.is_ok() && !done, "cut at {cut}");
        }
        // Every single-byte corruption is an error or a wrong-but-complete image
        // caught by the checksum; never a panic.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x41;
            let (res, done) = fed(&bad, 1 << 20);
            assert!(res.is_err() || !done, "corruption at {at} went unnoticed");
        }
        let mut after = good.clone();
        after.push(0);
        assert_eq!(fed(&after, 1 << 20).0, Err(StreamError::AfterEnd));
        let mut outside = MAGIC.to_vec();
        outside.extend(head(KIND_SIZE, 16, 0));
        outside.extend(head(KIND_DATA, 8, u64::MAX));
        assert!(matches!(
            fed(&outside, 1 << 20).0,
            Err(StreamError::OutsideImage { .. })
        ));
        let mut unknown = MAGIC.to_vec();
        unknown.extend(head(9, 0, 0));
        assert_eq!(fed(&unknown, 1 << 20).0, Err(StreamError::UnknownKind(9)));
    }

    #[test]
    fn an_empty_image_round_trips() {
        let mut r = StreamReader::new(0);
        r.feed(&stream_of(&[])).unwrap();
        assert_eq!(r.image().unwrap(), &[] as &[u8]);
    }
}
