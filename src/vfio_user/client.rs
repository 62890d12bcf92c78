//! A vfio-user client: what our tests, tools and benchmarks use to play the VMM.
//!
//! Requests are synchronous. While it waits for a reply the client also answers
//! the server's own DMA_READ/DMA_WRITE requests from a [`DmaTarget`], as a VMM
//! must; [`Client::serve_requests`] does the same when the client is otherwise idle.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::caps::Capabilities;
use super::socket::{FrameError, MessageReader, MessageWriter};
use super::wire::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("framing: {0}")]
    Frame(#[from] FrameError),
    #[error("server answered command {command} with errno {errno}")]
    Server { command: u16, errno: u32 },
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
}

/// What a server sent that the protocol does not allow.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("short VERSION reply")]
    ShortVersion,
    #[error("server capabilities: {0}")]
    Capabilities(#[from] super::caps::CapsError),
    #[error("reply to message {got} while waiting for {want}")]
    WrongReply { got: u16, want: u16 },
    #[error("unexpected reply to message {0}")]
    UnexpectedReply(u16),
    #[error("region info argsz keeps growing")]
    RegionInfoGrowing,
    #[error("REGION_READ reply of {got} bytes for {want}")]
    ReadSize { want: usize, got: usize },
    #[error("reply payload of {len} bytes is too short for {what}")]
    ShortPayload { len: usize, what: &'static str },
    #[error("region capability chain loops")]
    CapabilityLoop,
}

impl ClientError {
    /// The errno of an error reply, if this is one.
    pub fn errno(&self) -> Option<u32> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// Guest memory the client serves to the server's DMA_READ/DMA_WRITE requests.
/// Errors are errnos sent back in the error reply (QEMU answers ENODEV while bus
/// mastering is off, for example).
pub trait DmaTarget: Send {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), u32>;
    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), u32>;
}

/// A reply as received.
pub struct Reply {
    pub header: Header,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// What DEVICE_GET_REGION_INFO told us about a region.
#[derive(Debug)]
pub struct RegionDetails {
    pub info: RegionInfo,
    pub sparse_areas: Vec<SparseMmapArea>,
    pub fd: Option<OwnedFd>,
}

pub struct Client {
    reader: MessageReader,
    writer: MessageWriter,
    next_id: u16,
    server_version: Version,
    server_caps: Option<Capabilities>,
    dma: DmaService,
    /// Server-initiated requests answered so far.
    pub dma_requests_served: u64,
}

/// What answers the server's DMA_READ/DMA_WRITE requests.
#[derive(Default)]
struct DmaService {
    target: Option<Box<dyn DmaTarget>>,
    layout: DmaLayout,
    /// Body of DMA_READ replies, reused from one request to the next.
    body: Vec<u8>,
}

/// Largest message the client keeps in memory.
const MAX_PAYLOAD: usize = 64 << 20;

impl Client {
    /// Connects to `path` and negotiates the version with default capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let stream = UnixStream::connect(path).map_err(ClientError::Connect)?;
        let mut c = Self::from_stream(stream)?;
        c.negotiate(&Capabilities::new(16, 1 << 20, 65535, true))?;
        Ok(c)
    }

    /// Connects announcing the umdev extensions named (e.g.
    /// [`CAP_UMDEV_DIRTY_BITMAP`]); returns the client and the extensions the
    /// server agreed to.
    pub fn connect_with_extensions(
        path: impl AsRef<Path>,
        extensions: &[&str],
    ) -> Result<(Self, Vec<String>)> {
        let stream = UnixStream::connect(path).map_err(ClientError::Connect)?;
        let mut c = Self::from_stream(stream)?;
        let mut ours = Capabilities::new(16, 1 << 20, 65535, true);
        if let Some(obj) = ours.raw.as_object_mut() {
            for &e in extensions {
                obj.insert(e.into(), serde_json::json!({ "version": 1 }));
            }
        }
        let theirs = c.negotiate(&ours)?;
        let agreed = extensions
            .iter()
            .filter(|e| theirs.raw.get(**e).is_some())
            .map(|e| e.to_string())
            .collect();
        Ok((c, agreed))
    }

    /// Wraps a connected stream without sending anything.
    pub fn from_stream(stream: UnixStream) -> Result<Self> {
        Ok(Client {
            writer: MessageWriter::new(stream.try_clone()?),
            reader: MessageReader::new(stream, MAX_PAYLOAD),
            next_id: 0,
            server_version: Version::default(),
            server_caps: None,
            dma: DmaService::default(),
            dma_requests_served: 0,
        })
    }

    /// VERSION with our capabilities; returns the server's.
    pub fn negotiate(&mut self, ours: &Capabilities) -> Result<Capabilities> {
        let v = Version {
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
        };
        let json = ours.to_json_bytes();
        let reply = self.request(Command::Version, &[v.as_bytes(), &json], &[])?;
        let version = Version::read_from(&reply.payload).ok_or(ProtocolError::ShortVersion)?;
        let caps = Capabilities::parse(&reply.payload[4..]).map_err(ProtocolError::Capabilities)?;
        self.server_version = version;
        self.server_caps = Some(caps.clone());
        Ok(caps)
    }

    pub fn server_version(&self) -> Version {
        self.server_version
    }

    pub fn server_caps(&self) -> Option<&Capabilities> {
        self.server_caps.as_ref()
    }

    /// Memory that answers the server's DMA requests, and the layout they use.
    pub fn set_dma_target(&mut self, target: Box<dyn DmaTarget>, layout: DmaLayout) {
        self.dma.target = Some(target);
        self.dma.layout = layout;
    }

    pub fn stream(&self) -> &UnixStream {
        self.reader.stream()
    }

    fn alloc_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends a message as given, for tests of malformed input. Returns its id.
    pub fn send_raw(&mut self, header: Header, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
        self.writer.send(&header, parts, fds)?;
        Ok(())
    }

    /// Sends a command; with `no_reply` the server is told not to answer.
    pub fn send(
        &mut self,
        command: Command,
        parts: &[&[u8]],
        fds: &[RawFd],
        no_reply: bool,
    ) -> Result<u16> {
        let id = self.alloc_id();
        let size = HEADER_SIZE + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = Header {
            msg_id: id,
            command: command as u16,
            size: size as u32,
            flags: FLAGS_TYPE_COMMAND | if no_reply { FLAGS_NO_REPLY } else { 0 },
            error: 0,
        };
        self.writer.send(&header, parts, fds)?;
        Ok(id)
    }

    /// Sends any command number with any payload and waits for the reply: for
    /// tests of unknown and malformed commands.
    pub fn request_raw(&mut self, command: u16, payload: &[u8]) -> Result<Reply> {
        let id = self.alloc_id();
        self.send_numbered(id, command, payload, &[])?;
        self.wait_reply(id)
    }

    /// Sends a command and waits for its reply (serving DMA requests meanwhile).
    pub fn request(&mut self, command: Command, parts: &[&[u8]], fds: &[RawFd]) -> Result<Reply> {
        let id = self.send(command, parts, fds, false)?;
        self.wait_reply(id)
    }

    /// Waits for the reply to message `id`. An error reply becomes `Err(Server)`.
    pub fn wait_reply(&mut self, id: u16) -> Result<Reply> {
        self.wait_reply_with(id, |header, payload, fds| {
            Ok(Reply {
                header,
                payload: payload.to_vec(),
                fds,
            })
        })
    }

    /// Waits for the reply to message `id` and hands it to `take` while it is
    /// still in the reader's buffer (no copy, no allocation). Server requests that
    /// arrive first are served.
    pub fn wait_reply_with<T>(
        &mut self,
        id: u16,
        take: impl FnOnce(Header, &[u8], Vec<OwnedFd>) -> Result<T>,
    ) -> Result<T> {
        loop {
            let msg = self.reader.read_message()?;
            let header = msg.header;
            if header.is_reply() {
                if header.msg_id != id {
                    return Err(ProtocolError::WrongReply {
                        got: header.msg_id,
                        want: id,
                    }
                    .into());
                }
                if header.is_error() {
                    return Err(ClientError::Server {
                        command: header.command,
                        errno: header.error,
                    });
                }
                return take(header, msg.payload, msg.fds);
            }
            self.dma_requests_served += 1;
            self.dma.serve(&self.writer, &header, msg.payload)?;
        }
    }

    /// Reads the next message whatever it is, without serving it (for tests that
    /// script the interleaving of requests and replies themselves).
    pub fn next_message(&mut self) -> Result<Reply> {
        let msg = self.reader.read_message()?;
        Ok(Reply {
            header: msg.header,
            payload: msg.payload.to_vec(),
            fds: msg.fds,
        })
    }

    /// Answers one server-initiated request obtained from [`Client::next_message`].
    pub fn answer(&mut self, request: &Reply) -> Result<()> {
        self.dma_requests_served += 1;
        self.dma
            .serve(&self.writer, &request.header, &request.payload)
    }

    /// Answers server-initiated requests arriving within `timeout`; returns how
    /// many were served. Returns early once `until` says so.
    pub fn serve_requests(
        &mut self,
        timeout: Duration,
        mut until: impl FnMut(&Self) -> bool,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        let mut served = 0;
        while !until(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            // Bytes already in the reader never make the socket readable again.
            if !self.reader.has_buffered()
                && !poll_readable(self.reader.stream().as_raw_fd(), left)?
            {
                break;
            }
            self.serve_one()?;
            served += 1;
        }
        Ok(served)
    }

    /// Answers server-initiated requests until `fd` (an interrupt eventfd, say)
    /// becomes readable; `Ok(false)` if it did not within `timeout`. `fd` is only
    /// polled, not read.
    pub fn serve_until_readable(&mut self, fd: RawFd, timeout: Duration) -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.reader.has_buffered() {
                self.serve_one()?;
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.reader.stream().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = left.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: polls two pollfds that live on our stack for the call.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            if pfds[0].revents != 0 {
                return Ok(true);
            }
            if pfds[1].revents != 0 {
                self.serve_one()?;
            } else if left.is_zero() {
                return Ok(false);
            }
        }
    }

    /// Reads one message, which must be a server request, and answers it.
    fn serve_one(&mut self) -> Result<()> {
        let msg = self.reader.read_message()?;
        let header = msg.header;
        if header.is_reply() {
            return Err(ProtocolError::UnexpectedReply(header.msg_id).into());
        }
        self.dma_requests_served += 1;
        self.dma.serve(&self.writer, &header, msg.payload)
    }

    // ---- typed commands ----------------------------------------------------

    pub fn device_info(&mut self) -> Result<DeviceInfo> {
        let ask = DeviceInfo {
            argsz: std::mem::size_of::<DeviceInfo>() as u32,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetInfo, &[ask.as_bytes()], &[])?;
        parse(&r.payload)
    }

    /// Region info, asking again with a larger argsz when capabilities need it.
    pub fn region_info(&mut self, index: u32) -> Result<RegionDetails> {
        let mut argsz = std::mem::size_of::<RegionInfo>() as u32;
        for _ in 0..2 {
            let ask = RegionInfo {
                argsz,
                index,
                ..Default::default()
            };
            let mut r = self.request(Command::DeviceGetRegionInfo, &[ask.as_bytes()], &[])?;
            let info: RegionInfo = parse(&r.payload)?;
            if info.argsz > argsz {
                argsz = info.argsz;
                continue;
            }
            let sparse_areas = parse_sparse_areas(&info, &r.payload)?;
            return Ok(RegionDetails {
                info,
                sparse_areas,
                fd: r.fds.pop(),
            });
        }
        Err(ProtocolError::RegionInfoGrowing.into())
    }

    pub fn region_io_fds(&mut self, index: u32) -> Result<RegionIoFds> {
        let ask = RegionIoFds {
            argsz: std::mem::size_of::<RegionIoFds>() as u32,
            index,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetRegionIoFds, &[ask.as_bytes()], &[])?;
        parse(&r.payload)
    }

    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo> {
        let ask = IrqInfo {
            argsz: std::mem::size_of::<IrqInfo>() as u32,
            index,
            ..Default::default()
        };
        let r = self.request(Command::DeviceGetIrqInfo, &[ask.as_bytes()], &[])?;
        parse(&r.payload)
    }

    /// SET_IRQS; `bools` is the DATA_BOOL payload (empty otherwise).
    pub fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: &[RawFd],
        bools: &[u8],
    ) -> Result<()> {
        let set = IrqSet {
            argsz: (std::mem::size_of::<IrqSet>() + bools.len()) as u32,
            flags,
            index,
            start,
            count,
        };
        self.request(Command::DeviceSetIrqs, &[set.as_bytes(), bools], fds)?;
        Ok(())
    }

    /// Memory (and I/O) decoding and bus mastering on in the PCI command
    /// register, as a guest driver does at probe.
    pub fn enable_device(&mut self) -> Result<()> {
        self.region_write(PCI_CONFIG_REGION_INDEX, 0x04, &0x0006u16.to_le_bytes())
    }

    /// SET_IRQS TRIGGER with eventfds: `fds` become the eventfds of vectors
    /// `start..` of IRQ index `index`.
    pub fn set_irq_eventfds(&mut self, index: u32, start: u32, fds: &[RawFd]) -> Result<()> {
        let flags = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER;
        self.set_irqs(index, flags, start, fds.len() as u32, fds, &[])
    }

    /// SET_IRQS UNMASK of one vector (as QEMU unmasks INTx after an EOI).
    pub fn unmask_irq(&mut self, index: u32, vector: u32) -> Result<()> {
        let flags = IRQ_SET_DATA_NONE | IRQ_SET_ACTION_UNMASK;
        self.set_irqs(index, flags, vector, 1, &[], &[])
    }

    pub fn region_read(&mut self, region: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut data = vec![0; len];
        self.region_read_into(region, offset, &mut data)?;
        Ok(data)
    }

    /// REGION_READ of `buf.len()` bytes into `buf`, without allocating.
    pub fn region_read_into(&mut self, region: u32, offset: u64, buf: &mut [u8]) -> Result<()> {
        let access = RegionAccess {
            offset,
            region,
            count: buf.len() as u32,
        };
        let id = self.send(Command::RegionRead, &[access.as_bytes()], &[], false)?;
        self.wait_reply_with(id, |_, payload, _| {
            let echo: RegionAccess = parse(payload)?;
            let data = &payload[std::mem::size_of::<RegionAccess>()..];
            if echo.count as usize != buf.len() || data.len() != buf.len() {
                return Err(ProtocolError::ReadSize {
                    want: buf.len(),
                    got: data.len(),
                }
                .into());
            }
            buf.copy_from_slice(data);
            Ok(())
        })
    }

    pub fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let access = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        let id = self.send(Command::RegionWrite, &[access.as_bytes(), data], &[], false)?;
        self.wait_reply_with(id, |_, _, _| Ok(()))
    }

    /// A posted write (no reply), as QEMU sends MMIO writes.
    pub fn region_write_posted(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<()> {
        let access = RegionAccess {
            offset,
            region,
            count: data.len() as u32,
        };
        self.send(Command::RegionWrite, &[access.as_bytes(), data], &[], true)?;
        Ok(())
    }

    /// REGION_WRITE_MULTI of (region, offset, up to 8 bytes) entries.
    pub fn region_write_multi(
        &mut self,
        writes: &[(u32, u64, &[u8])],
        no_reply: bool,
    ) -> Result<()> {
        let mut body = WriteMultiHeader {
            wr_cnt: writes.len() as u64,
        }
        .as_bytes()
        .to_vec();
        for &(region, offset, data) in writes {
            let mut entry = WriteMultiEntry {
                offset,
                region,
                count: data.len() as u32,
                data: [0; WRITE_MULTI_DATA],
            };
            let n = data.len().min(WRITE_MULTI_DATA);
            entry.data[..n].copy_from_slice(&data[..n]);
            body.extend_from_slice(entry.as_bytes());
        }
        if no_reply {
            self.send(Command::RegionWriteMulti, &[&body], &[], true)?;
        } else {
            self.request(Command::RegionWriteMulti, &[&body], &[])?;
        }
        Ok(())
    }

    pub fn read_u32(&mut self, region: u32, offset: u64) -> Result<u32> {
        let b = self.region_read(region, offset, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn write_u32(&mut self, region: u32, offset: u64, value: u32) -> Result<()> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    pub fn read_u64(&mut self, region: u32, offset: u64) -> Result<u64> {
        let b = self.region_read(region, offset, 8)?;
        Ok(u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }

    pub fn write_u64(&mut self, region: u32, offset: u64, value: u64) -> Result<()> {
        self.region_write(region, offset, &value.to_le_bytes())
    }

    /// DMA_MAP of `[gpa, gpa+size)`, backed by `fd` at `offset` when given.
    pub fn dma_map(
        &mut self,
        gpa: u64,
        size: u64,
        fd: Option<RawFd>,
        offset: u64,
        flags: u32,
    ) -> Result<()> {
        let m = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags,
            offset,
            address: gpa,
            size,
        };
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.request(Command::DmaMap, &[m.as_bytes()], &fds)?;
        Ok(())
    }

    pub fn dma_unmap(&mut self, gpa: u64, size: u64, flags: u32) -> Result<DmaUnmap> {
        let u = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags,
            address: gpa,
            size,
        };
        let r = self.request(Command::DmaUnmap, &[u.as_bytes()], &[])?;
        parse(&r.payload)
    }

    /// umdev extension: shares a dirty bitmap (memfd `fd` at `offset`) for the
    /// DMA region `[gpa, gpa+size)`.
    pub fn share_dirty_bitmap(
        &mut self,
        gpa: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
    ) -> Result<()> {
        let m = UmdevDirtyBitmap {
            argsz: std::mem::size_of::<UmdevDirtyBitmap>() as u32,
            flags: 0,
            address: gpa,
            size,
            offset,
        };
        self.request_with_fd(UMDEV_CMD_DIRTY_BITMAP, m.as_bytes(), fd)
    }

    /// umdev extension: shares a userfaultfd registered in write-protect mode on
    /// our mapping of DMA region `[gpa, gpa+size)`, which starts at `vmm_address`.
    pub fn share_uffd(&mut self, gpa: u64, size: u64, vmm_address: u64, uffd: RawFd) -> Result<()> {
        let m = UmdevUffd {
            argsz: std::mem::size_of::<UmdevUffd>() as u32,
            flags: 0,
            address: gpa,
            size,
            vmm_address,
        };
        self.request_with_fd(UMDEV_CMD_UFFD, m.as_bytes(), uffd)
    }

    /// A umdev extension request carrying one fd; the reply's payload is an echo.
    fn request_with_fd(&mut self, command: u16, payload: &[u8], fd: RawFd) -> Result<()> {
        let id = self.alloc_id();
        self.send_numbered(id, command, payload, &[fd])?;
        self.wait_reply(id)?;
        Ok(())
    }

    fn send_numbered(
        &mut self,
        id: u16,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<()> {
        let header = Header {
            msg_id: id,
            command,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        };
        self.writer.send(&header, &[payload], fds)?;
        Ok(())
    }

    pub fn reset(&mut self) -> Result<()> {
        self.request(Command::DeviceReset, &[], &[])?;
        Ok(())
    }
}

impl DmaService {
    /// Answers one server-initiated request (DMA_READ/DMA_WRITE) from the target.
    fn serve(&mut self, writer: &MessageWriter, header: &Header, payload: &[u8]) -> Result<()> {
        let (layout, body) = (self.layout, &mut self.body);
        body.clear();
        let result = match (Command::from_raw(header.command), self.target.as_mut()) {
            (_, None) => Err(libc::ENODEV as u32),
            (Some(Command::DmaRead), Some(target)) => match layout.parse(payload) {
                Some((addr, count)) if count <= MAX_PAYLOAD as u64 => {
                    let count = count as usize;
                    let at = layout.data_offset();
                    body.resize(DmaLayout::payload_len(count), 0);
                    body[..at].copy_from_slice(&layout.fixed_part(addr, count as u64)[..at]);
                    body[at + count..].fill(0);
                    target.read(addr, &mut body[at..at + count])
                }
                _ => Err(libc::EINVAL as u32),
            },
            (Some(Command::DmaWrite), Some(target)) => match layout.parse(payload) {
                Some((addr, count)) => {
                    let at = layout.data_offset();
                    match at
                        .checked_add(count as usize)
                        .and_then(|end| payload.get(at..end))
                    {
                        Some(data) => target.write(addr, data),
                        None => Err(libc::EINVAL as u32),
                    }
                }
                None => Err(libc::EINVAL as u32),
            },
            _ => Err(libc::ENOSYS as u32),
        };
        if header.no_reply() {
            return Ok(());
        }
        let (flags, error, body) = match result {
            Ok(()) => (FLAGS_TYPE_REPLY, 0, &body[..]),
            Err(errno) => (FLAGS_TYPE_REPLY | FLAGS_ERROR, errno, &[][..]),
        };
        let reply = Header {
            msg_id: header.msg_id,
            command: header.command,
            size: (HEADER_SIZE + body.len()) as u32,
            flags,
            error,
        };
        writer.send(&reply, &[body], &[])?;
        Ok(())
    }
}

fn parse<T: WireStruct>(payload: &[u8]) -> Result<T> {
    T::read_from(payload).ok_or_else(|| {
        ProtocolError::ShortPayload {
            len: payload.len(),
            what: std::any::type_name::<T>(),
        }
        .into()
    })
}

/// Collects the sparse mmap areas from a region-info reply's capability chain.
fn parse_sparse_areas(info: &RegionInfo, payload: &[u8]) -> Result<Vec<SparseMmapArea>> {
    let mut areas = Vec::new();
    if info.flags & REGION_INFO_FLAG_CAPS == 0 {
        return Ok(areas);
    }
    let mut next = info.cap_offset as usize;
    let mut hops = 0;
    while next != 0 {
        hops += 1;
        if hops > 16 {
            return Err(ProtocolError::CapabilityLoop.into());
        }
        let cap: CapHeader = parse(payload.get(next..).unwrap_or(&[]))?;
        if cap.id == REGION_INFO_CAP_SPARSE_MMAP {
            let body = &payload[next + 8..];
            let head: SparseMmapHeader = parse(body)?;
            for i in 0..head.nr_areas as usize {
                areas.push(parse(body.get(8 + 16 * i..).unwrap_or(&[]))?);
            }
        }
        next = cap.next as usize;
    }
    Ok(areas)
}

/// Waits until `fd` is readable or `timeout` passes.
fn poll_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: polls one pollfd that lives on our stack for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(n > 0)
}
