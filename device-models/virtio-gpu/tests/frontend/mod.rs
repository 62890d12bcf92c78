//! Test front-end for `umdev-virtio-gpu`: plays QEMU (the vhost crate's
//! `Frontend` over a real UNIX socket, memfd guest memory, the
//! VHOST_USER_GPU_SET_SOCKET display channel) and the guest driver (split
//! virtqueues in that memory).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{FrontendReq, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion, VolatileMemory,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

pub const MEM_SIZE: u64 = 16 << 20;
pub const QUEUE_SIZE: u16 = 64;
/// Guest memory layout: rings, then a scratch area for requests.
const RING_BASE: u64 = 0x1000;
const RING_STRIDE: u64 = 0x4000;
pub const SCRATCH: u64 = 0x10000;
pub const SCRATCH_END: u64 = 0x80000;
/// Where tests put pixel backing.
pub const BACKING_BASE: u64 = 0x100000;

/// The `umdev-virtio-gpu` process in `dir` (a fresh [`TempDir`]), writing
/// `dir/scanout.png`.
pub struct Backend {
    pub process: umdev_testkit::Backend,
    pub socket: PathBuf,
    pub png: PathBuf,
}

impl Backend {
    pub fn start(dir: umdev_testkit::TempDir, extra: &[&str]) -> Backend {
        let png = dir.path().join("scanout.png");
        let mut args = vec!["--scanout-png", png.to_str().expect("UTF-8 path")];
        args.extend_from_slice(extra);
        let process = umdev_testkit::Backend::spawn(
            std::path::Path::new(env!("CARGO_BIN_EXE_umdev-virtio-gpu")),
            dir,
            "gpu.sock",
            &args,
            "debug",
        );
        Backend {
            socket: process.socket.clone(),
            process,
            png,
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.process.alive()
    }

    pub fn log_text(&self) -> String {
        self.process.log()
    }
}

/// What the display channel received.
#[derive(Debug, Default)]
pub struct DisplayState {
    pub scanouts: Vec<(u32, u32, u32)>,
    /// Scanout 0's picture as composed from UPDATE messages (B, G, R, X).
    pub width: u32,
    pub height: u32,
    pub picture: Vec<u8>,
    pub updates: usize,
    pub cursor_updates: Vec<(u32, u32, u32, u32, u32, Vec<u8>)>,
    pub cursor_moves: Vec<(u32, u32, u32, bool)>,
    pub unknown: Vec<u32>,
}

/// The display side (QEMU's) of the vhost-user-gpu channel.
pub struct Display {
    pub state: Arc<Mutex<DisplayState>>,
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

impl Display {
    /// Serves `sock` on a thread, as QEMU would, reporting `mode` for scanout 0.
    pub fn serve(mut sock: UnixStream, mode: (u32, u32)) -> Display {
        let state = Arc::new(Mutex::new(DisplayState::default()));
        let st = state.clone();
        std::thread::spawn(move || {
            let mut hdr = [0u8; 12];
            while sock.read_exact(&mut hdr).is_ok() {
                let (request, size) = (read_u32(&hdr, 0), read_u32(&hdr, 8) as usize);
                let mut payload = vec![0; size];
                if sock.read_exact(&mut payload).is_err() {
                    break;
                }
                let reply = |sock: &mut UnixStream, body: &[u8]| {
                    let mut m = Vec::new();
                    m.extend_from_slice(&request.to_le_bytes());
                    m.extend_from_slice(&4u32.to_le_bytes());
                    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
                    m.extend_from_slice(body);
                    let _ = sock.write_all(&m);
                };
                let mut s = st.lock().unwrap();
                match request {
                    1 => reply(&mut sock, &1u64.to_le_bytes()), // EDID
                    2 => {}
                    3 => {
                        let mut info = vec![0u8; 24 + 16 * 24];
                        info[0..4].copy_from_slice(&0x1101u32.to_le_bytes());
                        info[24 + 8..24 + 12].copy_from_slice(&mode.0.to_le_bytes());
                        info[24 + 12..24 + 16].copy_from_slice(&mode.1.to_le_bytes());
                        info[24 + 16..24 + 20].copy_from_slice(&1u32.to_le_bytes());
                        reply(&mut sock, &info);
                    }
                    11 => {
                        let mut edid = vec![0u8; 24 + 8 + 1024];
                        edid[0..4].copy_from_slice(&0x1104u32.to_le_bytes());
                        edid[24..28].copy_from_slice(&128u32.to_le_bytes());
                        edid[32..40].copy_from_slice(&[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
                        edid[40] = 0x42; // marks "from the display"
                        reply(&mut sock, &edid);
                    }
                    7 => {
                        let (id, w, h) = (
                            read_u32(&payload, 0),
                            read_u32(&payload, 4),
                            read_u32(&payload, 8),
                        );
                        s.scanouts.push((id, w, h));
                        if id == 0 {
                            s.width = w;
                            s.height = h;
                            s.picture = vec![0; (w * h * 4) as usize];
                        }
                    }
                    8 => {
                        s.updates += 1;
                        let (id, x, y, w, h) = (
                            read_u32(&payload, 0),
                            read_u32(&payload, 4),
                            read_u32(&payload, 8),
                            read_u32(&payload, 12),
                            read_u32(&payload, 16),
                        );
                        let data = &payload[20..];
                        assert_eq!(data.len(), (w * h * 4) as usize, "UPDATE size");
                        if id == 0 {
                            assert!(x + w <= s.width && y + h <= s.height, "UPDATE outside");
                            let stride = (s.width * 4) as usize;
                            for row in 0..h as usize {
                                let at = (y as usize + row) * stride + x as usize * 4;
                                let src = row * w as usize * 4;
                                let line = &mut s.picture[at..at + w as usize * 4];
                                line.copy_from_slice(&data[src..src + w as usize * 4]);
                                // x8r8g8b8: the X byte means nothing (QEMU ignores it).
                                line.iter_mut().skip(3).step_by(4).for_each(|x| *x = 0);
                            }
                        }
                    }
                    4 | 5 => s.cursor_moves.push((
                        read_u32(&payload, 0),
                        read_u32(&payload, 4),
                        read_u32(&payload, 8),
                        request == 4,
                    )),
                    6 => s.cursor_updates.push((
                        read_u32(&payload, 0),
                        read_u32(&payload, 4),
                        read_u32(&payload, 8),
                        read_u32(&payload, 12),
                        read_u32(&payload, 16),
                        payload[20..].to_vec(),
                    )),
                    other => s.unknown.push(other),
                }
            }
        });
        Display { state }
    }

    /// Waits until `f` holds of the display state.
    pub fn wait_for(&self, what: &str, f: impl Fn(&DisplayState) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(&self.state.lock().unwrap_or_else(|p| p.into_inner())) {
            if Instant::now() >= deadline {
                let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                panic!(
                    "display: timed out waiting for {what}: scanouts {:?}, {}x{}, {} updates, \
                     cursor {} updates {} moves, unknown {:?}",
                    s.scanouts,
                    s.width,
                    s.height,
                    s.updates,
                    s.cursor_updates.len(),
                    s.cursor_moves.len(),
                    s.unknown
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_avail: u16,
    last_used: u16,
    kick: EventFd,
    _call: EventFd,
}

/// A connected front-end with guest memory and two queues.
pub struct Gpu {
    pub frontend: Frontend,
    raw: UnixStream,
    pub mem: GuestMemoryMmap,
    /// The guest memory's memfd (tests truncate it).
    pub mem_file: std::fs::File,
    rings: Vec<Ring>,
    scratch: u64,
    pub features: u64,
    pub display: Option<Display>,
}

pub struct LogArea {
    pub file: std::fs::File,
    pub map: MmapRegion,
}

impl LogArea {
    /// Indices of pages marked dirty.
    pub fn dirty_pages(&self) -> Vec<u64> {
        let bytes = self.map.get_slice(0, self.map.size()).unwrap();
        let mut pages = Vec::new();
        for i in 0..self.map.size() {
            let b: u8 = bytes.read_obj(i).unwrap();
            for bit in 0..8 {
                if b & (1 << bit) != 0 {
                    pages.push((i * 8 + bit) as u64);
                }
            }
        }
        pages
    }

    pub fn clear(&self) {
        self.map
            .get_slice(0, self.map.size())
            .unwrap()
            .write_slice(&vec![0; self.map.size()], 0)
            .unwrap();
    }
}

/// Options of [`Gpu::connect`].
pub struct Options {
    pub display_mode: Option<(u32, u32)>,
    pub event_idx: bool,
    /// Guest memory in a memfd made without `MFD_ALLOW_SEALING`, which the
    /// backend cannot seal against shrinking (QEMU's `seal=off`).
    pub unsealable_memory: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            display_mode: Some((640, 480)),
            event_idx: true,
            unsealable_memory: false,
        }
    }
}

/// A vhost-user connection past SET_OWNER, feature and protocol-feature
/// negotiation, before any memory: for tests that send their own tables.
pub fn connect_bare(socket: &Path) -> Frontend {
    let raw = UnixStream::connect(socket).unwrap();
    let mut f = Frontend::from_stream(raw, 2);
    f.set_owner().unwrap();
    let features = f.get_features().unwrap();
    let proto = f.get_protocol_features().unwrap();
    f.set_protocol_features(proto).unwrap();
    f.set_features(features & !VhostUserVirtioFeatures::LOG_ALL.bits())
        .unwrap();
    f
}

impl Gpu {
    pub fn connect(socket: &Path, opts: Options) -> Gpu {
        let raw = UnixStream::connect(socket).unwrap();
        let frontend = Frontend::from_stream(raw.try_clone().unwrap(), 2);
        let mem_file = if opts.unsealable_memory {
            umdev::memory::memfd_with("guest-ram", MEM_SIZE, 0).unwrap()
        } else {
            umdev::memory::memfd("guest-ram", MEM_SIZE).unwrap()
        };
        let region = MmapRegion::from_file(
            FileOffset::new(mem_file.try_clone().unwrap(), 0),
            MEM_SIZE as usize,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        let mut gpu = Gpu {
            frontend,
            raw,
            mem,
            mem_file,
            rings: Vec::new(),
            scratch: SCRATCH,
            features: 0,
            display: None,
        };
        gpu.negotiate(opts);
        gpu
    }

    fn negotiate(&mut self, opts: Options) {
        let f = &mut self.frontend;
        f.set_owner().unwrap();
        let offered = f.get_features().unwrap();
        assert_ne!(
            offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let proto = f.get_protocol_features().unwrap();
        for needed in [
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::LOG_SHMFD,
            VhostUserProtocolFeatures::REPLY_ACK,
        ] {
            assert!(
                proto.contains(needed),
                "protocol feature {needed:?} missing"
            );
        }
        f.set_protocol_features(proto).unwrap();
        let mut features = offered & !VhostUserVirtioFeatures::LOG_ALL.bits();
        if !opts.event_idx {
            features &= !(1 << 29);
        }
        f.set_features(features).unwrap();
        self.features = features;
        if let Some(mode) = opts.display_mode {
            let (ours, theirs) = UnixStream::pair().unwrap();
            self.display = Some(Display::serve(ours, mode));
            self.set_gpu_socket(&theirs);
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE,
            userspace_addr: self.mem.get_host_address(GuestAddress(0)).unwrap() as u64,
            mmap_offset: 0,
            mmap_handle: self.mem_file.as_raw_fd(),
        };
        self.frontend.set_mem_table(&[region]).unwrap();
        for q in 0..2u64 {
            let base = RING_BASE + q * RING_STRIDE;
            let ring = Ring {
                desc: base,
                avail: base + 16 * QUEUE_SIZE as u64,
                used: base + 0x2000,
                next_avail: 0,
                last_used: 0,
                kick: EventFd::new(0).unwrap(),
                _call: EventFd::new(0).unwrap(),
            };
            self.start_ring(q as usize, &ring, 0);
            self.rings.push(ring);
        }
    }

    fn start_ring(&mut self, q: usize, ring: &Ring, base: u16) {
        // vhost-user ring addresses are the front-end's virtual addresses.
        let hva = |gpa: u64| self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
        let (desc, used, avail) = (hva(ring.desc), hva(ring.used), hva(ring.avail));
        let f = &mut self.frontend;
        f.set_vring_num(q, QUEUE_SIZE).unwrap();
        f.set_vring_base(q, base).unwrap();
        f.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            },
        )
        .unwrap();
        f.set_vring_kick(q, &ring.kick).unwrap();
        f.set_vring_call(q, &ring._call).unwrap();
        f.set_vring_enable(q, true).unwrap();
    }

    /// What QEMU does when the driver resets the device and comes back:
    /// stops the rings and restarts them from 0 on fresh ring memory.
    pub fn restart_rings(&mut self) {
        for q in 0..2 {
            self.frontend.get_vring_base(q).unwrap();
            let mut ring = std::mem::replace(
                &mut self.rings[q],
                Ring {
                    desc: 0,
                    avail: 0,
                    used: 0,
                    next_avail: 0,
                    last_used: 0,
                    kick: EventFd::new(0).unwrap(),
                    _call: EventFd::new(0).unwrap(),
                },
            );
            let zero = vec![0u8; 0x3000];
            self.mem
                .write_slice(&zero, GuestAddress(ring.desc))
                .unwrap();
            ring.next_avail = 0;
            ring.last_used = 0;
            self.start_ring(q, &ring, 0);
            self.rings[q] = ring;
        }
    }

    /// Sends VHOST_USER_GPU_SET_SOCKET with `sock` (the vhost crate's front-end
    /// has no call for it).
    pub fn set_gpu_socket(&self, sock: &UnixStream) {
        let mut hdr = [0u8; 12];
        hdr[0..4].copy_from_slice(&(FrontendReq::GPU_SET_SOCKET as u32).to_le_bytes());
        hdr[4..8].copy_from_slice(&1u32.to_le_bytes());
        self.raw.send_with_fd(&hdr[..], sock.as_raw_fd()).unwrap();
    }

    /// Shares a dirty log and turns logging on (SET_LOG_BASE, then
    /// SET_FEATURES with LOG_ALL, as QEMU does when migration starts).
    pub fn start_logging(&mut self) -> LogArea {
        let size = (MEM_SIZE / 4096 / 8) as usize;
        let file = umdev::memory::memfd("dirty-log", size as u64).unwrap();
        let map =
            MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size).unwrap();
        self.frontend
            .set_log_base(
                0,
                Some(VhostUserDirtyLogRegion {
                    mmap_size: size as u64,
                    mmap_offset: 0,
                    mmap_handle: file.as_raw_fd(),
                }),
            )
            .unwrap();
        self.set_logging(true);
        LogArea { file, map }
    }

    pub fn set_logging(&mut self, on: bool) {
        let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
        let features = if on {
            self.features | log_all
        } else {
            self.features & !log_all
        };
        self.frontend.set_features(features).unwrap();
        // SET_FEATURES has no reply; QEMU waits for the backend to have
        // taken a logging change (REPLY_ACK or a GET_FEATURES round trip)
        // before it relies on it, and so does this front-end.
        self.frontend.get_features().unwrap();
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let at = self.scratch;
        self.scratch = (self.scratch + len as u64 + 63) & !63;
        assert!(self.scratch <= SCRATCH_END, "scratch area full");
        at
    }

    /// Places a chain of `readable` buffers then writable buffers of
    /// `writable` lengths on queue `q`, kicks, and waits for it to be used.
    /// Returns the used length and the writable buffers' contents.
    pub fn submit(
        &mut self,
        q: usize,
        readable: &[&[u8]],
        writable: &[u32],
    ) -> (u32, Vec<Vec<u8>>) {
        self.scratch = SCRATCH;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        for r in readable {
            let at = self.alloc(r.len());
            self.mem.write_slice(r, GuestAddress(at)).unwrap();
            descs.push((at, r.len() as u32, 0));
        }
        for &w in writable {
            let at = self.alloc(w as usize);
            self.mem
                .write_slice(&vec![0xee; w as usize], GuestAddress(at))
                .unwrap();
            descs.push((at, w, VRING_DESC_F_WRITE as u16));
        }
        let raw: Vec<(u64, u32, u16)> = descs.clone();
        let used = self.submit_raw(q, &raw);
        let outs = descs
            .iter()
            .filter(|d| d.2 & VRING_DESC_F_WRITE as u16 != 0)
            .map(|&(addr, len, _)| {
                let mut b = vec![0; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                b
            })
            .collect();
        (used, outs)
    }

    /// Places descriptors (address, length, WRITE flag) as one chain and waits
    /// for the device to use it; returns the used length.
    pub fn submit_raw(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u32 {
        self.write_chain(q, descs);
        self.publish(q, 0)
    }

    /// Writes descriptors (address, length, WRITE flag) as one chain on
    /// queue `q`. One chain in flight at a time: its descriptors start at 0.
    fn write_chain(&self, q: usize, descs: &[(u64, u32, u16)]) {
        let ring = &self.rings[q];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let d = ring.desc + i as u64 * 16;
            let next = if i + 1 < descs.len() {
                VRING_DESC_F_NEXT as u16
            } else {
                0
            };
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem
                .write_obj(flags | next, GuestAddress(d + 12))
                .unwrap();
            self.mem
                .write_obj(i as u16 + 1, GuestAddress(d + 14))
                .unwrap();
        }
    }

    /// Makes `head` available on queue `q` and kicks, without waiting.
    pub fn publish_nowait(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = ring.avail + 4 + 2 * (ring.next_avail % QUEUE_SIZE) as u64;
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        ring.next_avail = ring.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(ring.next_avail, GuestAddress(ring.avail + 2))
            .unwrap();
        ring.kick.write(1).unwrap();
    }

    /// Kicks queue `q` without touching guest memory (which may be gone).
    pub fn kick(&self, q: usize) {
        self.rings[q].kick.write(1).unwrap();
    }

    /// The used index of queue `q` as the device last wrote it.
    pub fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// Places descriptors as one chain (as [`submit_raw`](Self::submit_raw))
    /// and kicks, without waiting for it to be used.
    pub fn submit_raw_nowait(&mut self, q: usize, descs: &[(u64, u32, u16)]) {
        self.write_chain(q, descs);
        self.publish_nowait(q, 0);
    }

    /// Writes a request and a `resp_len`-byte response buffer in the scratch
    /// area and submits them on the control queue without waiting.
    pub fn control_nowait(&mut self, request: &[u8], resp_len: u32) {
        self.scratch = SCRATCH;
        let req_at = self.alloc(request.len());
        self.mem.write_slice(request, GuestAddress(req_at)).unwrap();
        let resp_at = self.alloc(resp_len as usize);
        self.submit_raw_nowait(
            0,
            &[
                (req_at, request.len() as u32, 0),
                (resp_at, resp_len, VRING_DESC_F_WRITE as u16),
            ],
        );
    }

    /// Makes `head` available on queue `q` and waits until it is used.
    pub fn publish(&mut self, q: usize, head: u16) -> u32 {
        self.publish_nowait(q, head);
        let ring = &mut self.rings[q];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let used_idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
            if used_idx != ring.last_used {
                let elem = ring.used + 4 + 8 * (ring.last_used % QUEUE_SIZE) as u64;
                let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
                ring.last_used = ring.last_used.wrapping_add(1);
                return len;
            }
            assert!(Instant::now() < deadline, "queue {q}: request never used");
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sends a control request and returns its response (the writable buffer
    /// is `resp_len` bytes).
    pub fn control(&mut self, request: &[u8], resp_len: u32) -> Vec<u8> {
        let (used, mut outs) = self.submit(0, &[request], &[resp_len]);
        let mut r = outs.remove(0);
        r.truncate(used as usize);
        r
    }

    /// GET_DISPLAY_INFO, answered with OK_DISPLAY_INFO: the response.
    pub fn display_info(&mut self) -> Vec<u8> {
        let r = self.control(&req::cmd(0x0100, &[]), 408);
        assert_eq!(resp_type(&r), 0x1101);
        r
    }

    /// Sends a control request that must be answered OK_NODATA.
    pub fn ok(&mut self, request: &[u8]) {
        let r = self.control(request, 24);
        assert_eq!(resp_type(&r), OK_NODATA, "request {:x?}", &request[..4]);
    }

    pub fn cursor(&mut self, request: &[u8]) {
        let (used, _) = self.submit(1, &[request], &[]);
        assert_eq!(used, 0);
    }
}

/// virtio-gpu request builders.
pub mod req {
    pub const FLAG_FENCE: u32 = 1;

    pub fn with_hdr(type_: u32, flags: u32, fence: u64, body: &[u32]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&type_.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&fence.to_le_bytes());
        v.extend_from_slice(&[0; 8]);
        for w in body {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v
    }

    pub fn cmd(type_: u32, body: &[u32]) -> Vec<u8> {
        with_hdr(type_, 0, 0, body)
    }

    pub fn create_2d(id: u32, format: u32, w: u32, h: u32) -> Vec<u8> {
        cmd(0x0101, &[id, format, w, h])
    }

    pub fn attach(id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
        let mut body = vec![id, entries.len() as u32];
        for &(addr, len) in entries {
            body.extend_from_slice(&[addr as u32, (addr >> 32) as u32, len, 0]);
        }
        cmd(0x0106, &body)
    }

    pub fn transfer(id: u32, rect: [u32; 4], offset: u64) -> Vec<u8> {
        cmd(
            0x0105,
            &[
                rect[0],
                rect[1],
                rect[2],
                rect[3],
                offset as u32,
                (offset >> 32) as u32,
                id,
                0,
            ],
        )
    }

    pub fn set_scanout(scanout: u32, id: u32, rect: [u32; 4]) -> Vec<u8> {
        cmd(0x0103, &[rect[0], rect[1], rect[2], rect[3], scanout, id])
    }

    pub fn flush(id: u32, rect: [u32; 4]) -> Vec<u8> {
        cmd(0x0104, &[rect[0], rect[1], rect[2], rect[3], id, 0])
    }

    pub fn unref(id: u32) -> Vec<u8> {
        cmd(0x0102, &[id, 0])
    }

    pub fn detach(id: u32) -> Vec<u8> {
        cmd(0x0107, &[id, 0])
    }

    pub fn cursor(
        move_only: bool,
        scanout: u32,
        x: u32,
        y: u32,
        id: u32,
        hot: (u32, u32),
    ) -> Vec<u8> {
        cmd(
            if move_only { 0x0301 } else { 0x0300 },
            &[scanout, x, y, 0, id, hot.0, hot.1, 0],
        )
    }
}

/// Response type of a response.
pub fn resp_type(r: &[u8]) -> u32 {
    assert!(r.len() >= 24, "response of {} bytes", r.len());
    read_u32(r, 0)
}

pub const OK_NODATA: u32 = 0x1100;
