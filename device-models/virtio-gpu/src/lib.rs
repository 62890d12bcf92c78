//! `umdev-virtio-gpu`: a virtio-gpu 2D device (virtio spec §5.7) served over
//! vhost-user. QEMU's `-device vhost-user-gpu-pci` shows its scanouts: the
//! picture travels to QEMU on the vhost-user-gpu display channel.
//!
//! - [`protocol`]: the control/cursor queue wire format, decoded from bytes;
//! - [`resources`]: 2D resources, their guest backing, transfers;
//! - [`display`]: the display channel (QEMU) behind a small trait;
//! - [`edid`]: an EDID for when the display has none;
//! - [`VirtioGpu`]: the device, a [`umdev::vhost_user::VirtioDevice`].

pub mod display;
pub mod edid;
pub mod protocol;
pub mod resources;
mod state;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{debug, error, info, warn};
use umdev::vhost_user::{
    backend::EVENT_IDX_FEATURE, RequestReader, RequestWriter, VhostMemory, VirtioDevice,
};
use vhost::vhost_user::GpuBackend;

use display::{DisplayOutput, FrontendDisplay, CURSOR_SIZE};
use protocol::{resp, Command, CtrlHdr, DisplayMode, Rect};
use resources::{Backing, Resource2d, ResourceError};

/// Queue indices.
pub const CONTROL_QUEUE: u16 = 0;
pub const CURSOR_QUEUE: u16 = 1;

/// What the device is built with (command line options).
#[derive(Debug, Clone)]
pub struct GpuConfig {
    /// Scanouts (1-16).
    pub num_scanouts: u32,
    /// Mode reported when the display has none to give.
    pub default_mode: (u32, u32),
    /// Host memory all resources together may take.
    pub max_hostmem: u64,
    /// Most resources alive at once.
    pub max_resources: usize,
    /// Where to write scanout 0's picture after each flush that touches it.
    pub scanout_png: Option<PathBuf>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            num_scanouts: 1,
            default_mode: (1024, 768),
            max_hostmem: 256 << 20,
            max_resources: 4096,
            scanout_png: None,
        }
    }
}

/// Counters, for tests and logs.
#[derive(Debug, Default)]
pub struct GpuStats {
    pub commands: AtomicU64,
    pub errors: AtomicU64,
    pub flushes: AtomicU64,
    pub pngs: AtomicU64,
    pub display_errors: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Scanout {
    /// 0: disabled.
    resource_id: u32,
    rect: Rect,
}

#[derive(Debug, Default)]
struct GpuState {
    resources: BTreeMap<u32, Resource2d>,
    hostmem: u64,
    scanouts: Vec<Scanout>,
}

/// The virtio-gpu device.
pub struct VirtioGpu {
    config: GpuConfig,
    state: Mutex<GpuState>,
    display: Mutex<Option<Box<dyn DisplayOutput>>>,
    pub stats: GpuStats,
}

type CmdResult = Result<Vec<u8>, u32>;

impl VirtioGpu {
    pub fn new(config: GpuConfig) -> Self {
        let config = GpuConfig {
            num_scanouts: config.num_scanouts.clamp(1, protocol::MAX_SCANOUTS as u32),
            ..config
        };
        let state = GpuState {
            scanouts: vec![Scanout::default(); config.num_scanouts as usize],
            ..GpuState::default()
        };
        VirtioGpu {
            config,
            state: Mutex::new(state),
            display: Mutex::new(None),
            stats: GpuStats::default(),
        }
    }

    /// Shows the scanouts on `display` from now on (tests use their own).
    pub fn set_display(&self, display: Box<dyn DisplayOutput>) {
        *self.display.lock().unwrap_or_else(|p| p.into_inner()) = Some(display);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GpuState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the display, if there is one; a failing display is logged
    /// and counted, never the guest's problem.
    fn with_display<R>(
        &self,
        f: impl FnOnce(&dyn DisplayOutput) -> std::io::Result<R>,
    ) -> Option<R> {
        let display = self.display.lock().unwrap_or_else(|p| p.into_inner());
        let d = display.as_deref()?;
        match f(d) {
            Ok(r) => Some(r),
            Err(e) => {
                if self.stats.display_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("display: {e} (further display errors are counted, not logged)");
                }
                None
            }
        }
    }

    fn default_modes(&self) -> Vec<DisplayMode> {
        let (width, height) = self.config.default_mode;
        (0..self.config.num_scanouts)
            .map(|_| DisplayMode {
                rect: Rect {
                    x: 0,
                    y: 0,
                    width,
                    height,
                },
                enabled: true,
            })
            .collect()
    }

    /// Handles one control-queue request given as the bytes the driver wrote;
    /// returns the response bytes. Public so the decoder and the command
    /// handlers can be fuzzed without a socket.
    pub fn process_control(&self, mem: &VhostMemory, request: &[u8]) -> Vec<u8> {
        self.stats.commands.fetch_add(1, Ordering::Relaxed);
        let (hdr, command) = match protocol::decode(request) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                warn!("control request: {e}");
                let hdr = protocol::decode_header(request).unwrap_or_default();
                return protocol::response_header(&hdr, e.response());
            }
        };
        debug!(?command, "control");
        match self.execute(mem, &hdr, command) {
            Ok(response) => response,
            Err(code) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                protocol::response_header(&hdr, code)
            }
        }
    }

    fn execute(&self, mem: &VhostMemory, hdr: &CtrlHdr, command: Command) -> CmdResult {
        let ok = || Ok(protocol::response_header(hdr, resp::OK_NODATA));
        let logged = |e: ResourceError| {
            warn!("{e}");
            e.response()
        };
        match command {
            Command::GetDisplayInfo => {
                let mut modes = self
                    .with_display(|d| Ok(d.display_info()))
                    .flatten()
                    .unwrap_or_else(|| self.default_modes());
                modes.truncate(self.config.num_scanouts as usize);
                Ok(protocol::display_info_response(hdr, &modes))
            }
            Command::GetEdid { scanout_id } => {
                if scanout_id >= self.config.num_scanouts {
                    return Err(resp::ERR_INVALID_PARAMETER);
                }
                let edid = self
                    .with_display(|d| Ok(d.edid(scanout_id)))
                    .flatten()
                    .unwrap_or_else(|| {
                        let (w, h) = self.config.default_mode;
                        edid::edid_for_mode(w, h).to_vec()
                    });
                Ok(protocol::edid_response(hdr, &edid))
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => {
                self.create_2d(resource_id, format, width, height)
                    .map_err(logged)?;
                ok()
            }
            Command::ResourceUnref { resource_id } => {
                self.unref(resource_id).map_err(logged)?;
                ok()
            }
            Command::SetScanout {
                rect,
                scanout_id,
                resource_id,
            } => {
                self.set_scanout(scanout_id, resource_id, rect)?;
                ok()
            }
            Command::ResourceFlush { rect, resource_id } => {
                self.flush(resource_id, rect).map_err(logged)?;
                ok()
            }
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => {
                self.with_resource(resource_id, |res| {
                    res.transfer_to_host(mem, resource_id, rect, offset)
                })
                .map_err(logged)?;
                ok()
            }
            Command::AttachBacking {
                resource_id,
                entries,
            } => {
                self.with_resource(resource_id, |res| {
                    if res.backing.is_some() {
                        return Err(ResourceError::AlreadyBacked(resource_id));
                    }
                    res.backing = Some(Backing::new(mem, entries)?);
                    Ok(())
                })
                .map_err(logged)?;
                ok()
            }
            Command::DetachBacking { resource_id } => {
                self.with_resource(resource_id, |res| {
                    res.backing
                        .take()
                        .map(drop)
                        .ok_or(ResourceError::NoBacking(resource_id))
                })
                .map_err(logged)?;
                ok()
            }
            Command::Cursor { .. } => {
                warn!("cursor command on the control queue");
                Err(resp::ERR_UNSPEC)
            }
            Command::Unsupported(type_) => {
                warn!("command {type_:#x} is not supported (2D device)");
                Err(resp::ERR_UNSPEC)
            }
        }
    }

    /// Runs `f` on resource `id` under the state lock.
    fn with_resource<R>(
        &self,
        id: u32,
        f: impl FnOnce(&mut Resource2d) -> Result<R, ResourceError>,
    ) -> Result<R, ResourceError> {
        let mut state = self.state();
        let res = state
            .resources
            .get_mut(&id)
            .ok_or(ResourceError::NoSuchResource(id))?;
        f(res)
    }

    fn create_2d(
        &self,
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    ) -> Result<(), ResourceError> {
        let mut state = self.state();
        if resource_id == 0 || state.resources.contains_key(&resource_id) {
            return Err(ResourceError::BadResourceId(resource_id));
        }
        if !resources::is_supported_format(format) {
            return Err(ResourceError::BadFormat(format));
        }
        if width == 0
            || height == 0
            || width > umdev::scanout::MAX_DIM
            || height > umdev::scanout::MAX_DIM
        {
            return Err(ResourceError::BadSize { width, height });
        }
        if state.resources.len() >= self.config.max_resources {
            return Err(ResourceError::TooManyResources(self.config.max_resources));
        }
        let size = Resource2d::host_size(width, height);
        if state.hostmem + size > self.config.max_hostmem {
            return Err(ResourceError::OutOfMemory(state.hostmem + size));
        }
        let mut pixels = Vec::new();
        if pixels.try_reserve_exact(size as usize).is_err() {
            return Err(ResourceError::OutOfMemory(size));
        }
        pixels.resize(size as usize, 0);
        state.hostmem += size;
        state.resources.insert(
            resource_id,
            Resource2d {
                format,
                width,
                height,
                pixels,
                backing: None,
            },
        );
        Ok(())
    }

    fn unref(&self, resource_id: u32) -> Result<(), ResourceError> {
        let mut state = self.state();
        let res = state
            .resources
            .remove(&resource_id)
            .ok_or(ResourceError::NoSuchResource(resource_id))?;
        state.hostmem -= Resource2d::host_size(res.width, res.height);
        // A scanout never shows a resource that is gone.
        for (id, scanout) in state.scanouts.iter_mut().enumerate() {
            if scanout.resource_id == resource_id {
                *scanout = Scanout::default();
                self.with_display(|d| d.set_scanout(id as u32, 0, 0));
            }
        }
        Ok(())
    }

    fn set_scanout(&self, scanout_id: u32, resource_id: u32, rect: Rect) -> Result<(), u32> {
        let mut state = self.state();
        let Some(&current) = state.scanouts.get(scanout_id as usize) else {
            warn!(scanout_id, "SET_SCANOUT: no such scanout");
            return Err(resp::ERR_INVALID_SCANOUT_ID);
        };
        if resource_id == 0 {
            if current.resource_id != 0 {
                state.scanouts[scanout_id as usize] = Scanout::default();
                self.with_display(|d| d.set_scanout(scanout_id, 0, 0));
            }
            return Ok(());
        }
        let res = state.resources.get(&resource_id).ok_or_else(|| {
            warn!(resource_id, "SET_SCANOUT: no such resource");
            resp::ERR_INVALID_RESOURCE_ID
        })?;
        if rect.is_empty() || !rect.fits_in(res.width, res.height) {
            warn!(?rect, "SET_SCANOUT: rectangle outside the resource");
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let picture = res.read_bgra(rect);
        state.scanouts[scanout_id as usize] = Scanout { resource_id, rect };
        drop(state);
        // QEMU replaces its surface on the next update: send the whole picture.
        self.with_display(|d| {
            d.set_scanout(scanout_id, rect.width, rect.height)?;
            d.update(scanout_id, Rect { x: 0, y: 0, ..rect }, &picture)
        });
        info!(scanout_id, resource_id, ?rect, "scanout set");
        Ok(())
    }

    fn flush(&self, resource_id: u32, rect: Rect) -> Result<(), ResourceError> {
        let state = self.state();
        let res = state
            .resources
            .get(&resource_id)
            .ok_or(ResourceError::NoSuchResource(resource_id))?;
        if !rect.fits_in(res.width, res.height) {
            return Err(ResourceError::RectOutside {
                rect,
                width: res.width,
                height: res.height,
            });
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        for (id, scanout) in state.scanouts.iter().enumerate() {
            if scanout.resource_id != resource_id {
                continue;
            }
            let overlap = rect.intersect(&scanout.rect);
            if overlap.is_empty() {
                continue;
            }
            let pixels = res.read_bgra(overlap);
            let on_scanout = Rect {
                x: overlap.x - scanout.rect.x,
                y: overlap.y - scanout.rect.y,
                ..overlap
            };
            self.with_display(|d| d.update(id as u32, on_scanout, &pixels));
            if id == 0 {
                if let Some(path) = &self.config.scanout_png {
                    let picture = res.read_bgra(scanout.rect);
                    let (w, h) = (scanout.rect.width, scanout.rect.height);
                    match umdev::scanout::write_png(path, w, h, 4 * w as usize, &picture) {
                        Ok(()) => {
                            self.stats.pngs.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => warn!("scanout PNG: {e}"),
                    }
                }
            }
        }
        Ok(())
    }

    /// Handles one cursor-queue request (no response is written).
    pub fn process_cursor(&self, request: &[u8]) {
        let Ok((
            _,
            Command::Cursor {
                move_only,
                pos,
                resource_id,
                hot_x,
                hot_y,
            },
        )) = protocol::decode(request)
        else {
            warn!("cursor queue: not a cursor command");
            return;
        };
        if pos.scanout_id >= self.config.num_scanouts {
            warn!(pos.scanout_id, "cursor on a scanout that does not exist");
            return;
        }
        if move_only {
            self.with_display(|d| d.move_cursor(pos.scanout_id, pos.x, pos.y));
            return;
        }
        if resource_id == 0 {
            self.with_display(|d| d.cursor(pos.scanout_id, pos.x, pos.y, (0, 0), None));
            return;
        }
        let image = {
            let state = self.state();
            match state.resources.get(&resource_id) {
                Some(r) if r.width == CURSOR_SIZE && r.height == CURSOR_SIZE => r.read_bgra(Rect {
                    x: 0,
                    y: 0,
                    width: CURSOR_SIZE,
                    height: CURSOR_SIZE,
                }),
                _ => {
                    warn!(
                        resource_id,
                        "cursor image must be an existing 64x64 resource"
                    );
                    return;
                }
            }
        };
        self.with_display(|d| d.cursor(pos.scanout_id, pos.x, pos.y, (hot_x, hot_y), Some(&image)));
    }

    /// The picture scanout `scanout_id` shows now (width, height, B/G/R/A
    /// bytes), if it is on.
    pub fn scanout_picture(&self, scanout_id: u32) -> Option<(u32, u32, Vec<u8>)> {
        let state = self.state();
        let s = state.scanouts.get(scanout_id as usize)?;
        let res = state.resources.get(&s.resource_id)?;
        Some((s.rect.width, s.rect.height, res.read_bgra(s.rect)))
    }

    /// Scanout `scanout_id` as a live view's frame source (`--vnc`).
    pub fn display(self: &Arc<Self>, scanout_id: u32) -> Arc<dyn umdev::vnc::FrameSource> {
        Arc::new(ScanoutView {
            gpu: Arc::downgrade(self),
            scanout_id,
        })
    }

    /// Host memory the resources take now.
    pub fn hostmem(&self) -> u64 {
        self.state().hostmem
    }
}

/// Reads the readable part of a request, up to the longest request there is.
fn read_request(reader: &mut RequestReader<'_>) -> std::io::Result<Vec<u8>> {
    let len = reader.available_bytes().min(protocol::MAX_REQUEST_SIZE);
    let mut bytes = vec![0; len];
    reader.read_exact(&mut bytes)?;
    Ok(bytes)
}

impl VirtioDevice for VirtioGpu {
    fn name(&self) -> &str {
        "umdev-virtio-gpu"
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn features(&self) -> u64 {
        protocol::VIRTIO_GPU_F_EDID | EVENT_IDX_FEATURE
    }

    fn read_config(&self, offset: u32, len: u32) -> Vec<u8> {
        // struct virtio_gpu_config: events_read, events_clear, num_scanouts,
        // num_capsets. QEMU manages the events and the scanout count itself.
        let mut config = [0u8; 16];
        config[8..12].copy_from_slice(&self.config.num_scanouts.to_le_bytes());
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(len as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        out.resize(len as usize, 0);
        out
    }

    fn write_config(&self, _offset: u32, _data: &[u8]) -> std::io::Result<()> {
        // events_clear: no events are raised by the backend.
        Ok(())
    }

    fn handle_request(
        &self,
        queue: u16,
        mem: &VhostMemory,
        request: &mut RequestReader<'_>,
        reply: &mut RequestWriter<'_>,
    ) -> u32 {
        let bytes = match read_request(request) {
            Ok(b) => b,
            Err(e) => {
                warn!(queue, "reading a request: {e}");
                Vec::new()
            }
        };
        if queue == CURSOR_QUEUE {
            self.process_cursor(&bytes);
            return 0;
        }
        let response = self.process_control(mem, &bytes);
        let n = response.len().min(reply.available_bytes());
        if n < response.len() {
            warn!(
                have = reply.available_bytes(),
                need = response.len(),
                "response buffer too small: response cut"
            );
        }
        match reply.write_all(&response[..n]) {
            Ok(()) => n as u32,
            Err(e) => {
                warn!("writing a response: {e}");
                0
            }
        }
    }

    fn save(&self) -> Result<Vec<u8>, umdev::state::StateError> {
        Ok(state::save(self))
    }

    fn restore(&self, blob: &[u8]) -> Result<(), umdev::state::StateError> {
        state::restore(self, blob)
    }

    fn reset(&self) {
        let mut state = self.state();
        let scanouts = state.scanouts.len();
        *state = GpuState {
            scanouts: vec![Scanout::default(); scanouts],
            ..GpuState::default()
        };
        debug!("device reset: resources and scanouts dropped");
    }

    fn set_gpu_socket(&self, gpu: GpuBackend) -> std::io::Result<()> {
        // The previous display goes first: its socket must not be taken for
        // the new one (`gpu_socket::adopt` looks for the only display socket).
        *self.display.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match umdev::vhost_user::gpu_socket::adopt(gpu) {
            Ok(sock) => {
                info!("display channel from the front-end");
                self.set_display(Box::new(FrontendDisplay::new(sock)));
                Ok(())
            }
            Err(e) => {
                // Not an error reply: the crate ends the connection at the
                // first one, and the device works without a display.
                error!("display channel refused: {e}; the device goes without a display");
                Ok(())
            }
        }
    }
}

/// One scanout of a [`VirtioGpu`], as a VNC frame source.
struct ScanoutView {
    gpu: std::sync::Weak<VirtioGpu>,
    scanout_id: u32,
}

impl umdev::vnc::FrameSource for ScanoutView {
    fn capture(&self) -> Option<umdev::vnc::Frame> {
        let (width, height, pixels) = self.gpu.upgrade()?.scanout_picture(self.scanout_id)?;
        Some(umdev::vnc::Frame {
            width,
            height,
            pixels,
        })
    }
}
