//! `umdev-virtio-gpu`: a virtio-gpu 2D device on a vhost-user socket, for
//! QEMU's `-device vhost-user-gpu-pci`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use umdev::cli;
use umdev::scanout::MAX_DIM;
use umdev::vhost_user::{self, VhostUserArgs};
use umdev_virtio_gpu::{GpuConfig, VirtioGpu};

/// Serves a virtio-gpu 2D device over vhost-user.
///
/// QEMU: -object memory-backend-memfd,id=mem,size=512M,share=on
/// -machine q35,memory-backend=mem -chardev socket,id=gpu,path=SOCKET
/// -device vhost-user-gpu-pci,chardev=gpu
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    socket: VhostUserArgs,
    /// Number of scanouts (displays), 1-16.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    scanouts: u32,
    /// Mode reported to the guest when the front-end has none, WIDTHxHEIGHT.
    #[arg(long, default_value = "1024x768", value_parser = parse_mode)]
    mode: (u32, u32),
    /// Host memory all resources together may take, in MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=16384))]
    max_hostmem_mib: u64,
    /// Write scanout 0's picture to this PNG file after each flush that shows on it.
    #[arg(long)]
    scanout_png: Option<PathBuf>,
    /// Each scanout over VNC: scanout N on the port after PORT+N-1, or on
    /// PATH.N.
    #[command(flatten)]
    vnc: umdev::vnc::VncArgs,
}

/// Why a `--mode` value is not a mode.
#[derive(Debug, thiserror::Error)]
enum ModeError {
    #[error("expected WIDTHxHEIGHT")]
    Format,
    #[error("width: {0}")]
    Width(#[source] std::num::ParseIntError),
    #[error("height: {0}")]
    Height(#[source] std::num::ParseIntError),
    #[error("{width}x{height}: each side must be 1..={MAX_DIM}")]
    Size { width: u32, height: u32 },
}

fn parse_mode(s: &str) -> Result<(u32, u32), ModeError> {
    let (w, h) = s.split_once('x').ok_or(ModeError::Format)?;
    let width: u32 = w.parse().map_err(ModeError::Width)?;
    let height: u32 = h.parse().map_err(ModeError::Height)?;
    if !(1..=MAX_DIM).contains(&width) || !(1..=MAX_DIM).contains(&height) {
        return Err(ModeError::Size { width, height });
    }
    Ok((width, height))
}

fn main() -> std::process::ExitCode {
    cli::block_termination_signals();
    cli::init_logging();
    let args = Args::parse();
    if args.scanout_png.is_some() {
        umdev::sandbox::allow_extra(umdev::sandbox::FILE_OUTPUT);
    }
    let device = Arc::new(VirtioGpu::new(GpuConfig {
        num_scanouts: args.scanouts,
        default_mode: args.mode,
        max_hostmem: args.max_hostmem_mib << 20,
        scanout_png: args.scanout_png,
        ..GpuConfig::default()
    }));
    let displays = (0..args.scanouts).map(|n| device.display(n)).collect();
    let _vnc = match args.vnc.start("umdev-virtio-gpu", displays) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match vhost_user::run(&args.socket, device) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_or_say_what_is_wrong() {
        assert_eq!(parse_mode("1024x768").unwrap(), (1024, 768));
        assert!(matches!(parse_mode("1024"), Err(ModeError::Format)));
        assert!(matches!(parse_mode("ax768"), Err(ModeError::Width(_))));
        let err = parse_mode("1024x-1").unwrap_err();
        assert!(matches!(err, ModeError::Height(_)));
        assert!(err.to_string().starts_with("height: "));
        let err = parse_mode("0x768").unwrap_err();
        assert!(matches!(
            err,
            ModeError::Size {
                width: 0,
                height: 768
            }
        ));
        assert_eq!(err.to_string(), "0x768: each side must be 1..=16384");
        assert!(parse_mode("16385x1").is_err());
        assert_eq!(parse_mode("16384x16384").unwrap(), (MAX_DIM, MAX_DIM));
    }
}
