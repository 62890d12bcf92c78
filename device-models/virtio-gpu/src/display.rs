//! Where the picture goes: the vhost-user-gpu display channel to the front-end
//! (QEMU shows it), behind a small trait so the model does not care.

use std::io;
use std::sync::Mutex;

use tracing::{debug, warn};
use vhost::vhost_user::gpu_message::{
    VhostUserGpuCursorPos, VhostUserGpuCursorUpdate, VhostUserGpuEdidRequest, VhostUserGpuScanout,
    VhostUserGpuUpdate,
};
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::GpuBackend;

use crate::protocol::{DisplayMode, Rect, EDID_BLOB_SIZE, MAX_SCANOUTS};

/// `VHOST_USER_GPU_PROTOCOL_F_EDID` (bit 0, as QEMU sends it). The `vhost`
/// crate's `VhostUserGpuProtocolFeatures` has EDID as 0 and DMABUF2 as bit 0,
/// so it is not used.
pub const GPU_PROTOCOL_F_EDID: u64 = 1 << 0;

/// Cursor images are 64 x 64 pixels, B, G, R, A bytes.
pub const CURSOR_SIZE: u32 = 64;

/// A display that shows the device's scanouts.
pub trait DisplayOutput: Send {
    /// The display's preferred modes, if it has an opinion.
    fn display_info(&self) -> Option<Vec<DisplayMode>>;
    /// The display's EDID for `scanout`, if it has one.
    fn edid(&self, scanout: u32) -> Option<Vec<u8>>;
    /// Scanout `scanout` now shows a `width` x `height` picture (0 x 0: off).
    fn set_scanout(&self, scanout: u32, width: u32, height: u32) -> io::Result<()>;
    /// New pixels (B, G, R, X) for `rect` of the scanout's picture.
    fn update(&self, scanout: u32, rect: Rect, bgrx: &[u8]) -> io::Result<()>;
    /// A new cursor image (`image` of [`CURSOR_SIZE`]² B, G, R, A pixels) or
    /// `None` to hide it, at (`x`, `y`) of `scanout`.
    fn cursor(
        &self,
        scanout: u32,
        x: u32,
        y: u32,
        hot: (u32, u32),
        image: Option<&[u8]>,
    ) -> io::Result<()>;
    /// Moves the cursor.
    fn move_cursor(&self, scanout: u32, x: u32, y: u32) -> io::Result<()>;
}

/// The vhost-user-gpu channel QEMU hands over with VHOST_USER_GPU_SET_SOCKET.
///
/// Protocol features are negotiated on first use, not when the socket
/// arrives: QEMU sends SET_SOCKET from its main loop and keeps talking
/// vhost-user before it reads the display socket, so a reply awaited there
/// would deadlock both sides.
pub struct FrontendDisplay {
    gpu: GpuBackend,
    edid: Mutex<Option<bool>>,
}

impl FrontendDisplay {
    pub fn new(gpu: GpuBackend) -> Self {
        FrontendDisplay {
            gpu,
            edid: Mutex::new(None),
        }
    }

    /// Whether the front-end offers EDID (asked once).
    fn edid_supported(&self) -> bool {
        let mut known = self.edid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = *known {
            return v;
        }
        let offered = match self.gpu.get_protocol_features() {
            Ok(f) => f.value,
            Err(e) => {
                warn!("display: GET_PROTOCOL_FEATURES: {e}");
                0
            }
        };
        let ours = offered & GPU_PROTOCOL_F_EDID;
        if let Err(e) = self.gpu.set_protocol_features(&VhostUserU64::new(ours)) {
            warn!("display: SET_PROTOCOL_FEATURES: {e}");
        }
        debug!(offered, "display protocol features");
        *known = Some(ours != 0);
        ours != 0
    }
}

impl DisplayOutput for FrontendDisplay {
    fn display_info(&self) -> Option<Vec<DisplayMode>> {
        self.edid_supported();
        match self.gpu.get_display_info() {
            Ok(info) => Some(
                info.pmodes
                    .iter()
                    .take(MAX_SCANOUTS)
                    .map(|m| DisplayMode {
                        rect: Rect {
                            x: m.r.x,
                            y: m.r.y,
                            width: m.r.width,
                            height: m.r.height,
                        },
                        enabled: m.enabled != 0,
                    })
                    .collect(),
            ),
            Err(e) => {
                warn!("display: GET_DISPLAY_INFO: {e}");
                None
            }
        }
    }

    fn edid(&self, scanout: u32) -> Option<Vec<u8>> {
        if !self.edid_supported() {
            return None;
        }
        match self.gpu.get_edid(&VhostUserGpuEdidRequest {
            scanout_id: scanout,
        }) {
            Ok(resp) => {
                let len = (resp.size as usize).min(EDID_BLOB_SIZE);
                Some(resp.edid[..len].to_vec())
            }
            Err(e) => {
                warn!("display: GET_EDID: {e}");
                None
            }
        }
    }

    fn set_scanout(&self, scanout: u32, width: u32, height: u32) -> io::Result<()> {
        self.gpu.set_scanout(&VhostUserGpuScanout {
            scanout_id: scanout,
            width,
            height,
        })
    }

    fn update(&self, scanout: u32, rect: Rect, bgrx: &[u8]) -> io::Result<()> {
        self.gpu.update_scanout(
            &VhostUserGpuUpdate {
                scanout_id: scanout,
                x: rect.x,
                y: rect.y,
                width: rect.width,
                height: rect.height,
            },
            bgrx,
        )
    }

    fn cursor(
        &self,
        scanout: u32,
        x: u32,
        y: u32,
        hot: (u32, u32),
        image: Option<&[u8]>,
    ) -> io::Result<()> {
        let pos = VhostUserGpuCursorPos {
            scanout_id: scanout,
            x,
            y,
        };
        let Some(image) = image else {
            return self.gpu.cursor_pos_hide(&pos);
        };
        let mut data = [0u8; 4 * 64 * 64];
        let n = image.len().min(data.len());
        data[..n].copy_from_slice(&image[..n]);
        self.gpu.cursor_update(
            &VhostUserGpuCursorUpdate {
                pos,
                hot_x: hot.0,
                hot_y: hot.1,
            },
            &data,
        )
    }

    fn move_cursor(&self, scanout: u32, x: u32, y: u32) -> io::Result<()> {
        self.gpu.cursor_pos(&VhostUserGpuCursorPos {
            scanout_id: scanout,
            x,
            y,
        })
    }
}
