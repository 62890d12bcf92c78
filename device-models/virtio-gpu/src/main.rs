//! `umdev-virtio-gpu`: a virtio-gpu 2D device on a vhost-user socket, for
//! QEMU's `-device vhost-user-gpu-pci`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use umdev::cli;
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
}

fn parse_mode(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s.split_once('x').ok_or("expected WIDTHxHEIGHT")?;
    let w: u32 = w.parse().map_err(|e| format!("width: {e}"))?;
    let h: u32 = h.parse().map_err(|e| format!("height: {e}"))?;
    if !(1..=umdev::scanout::MAX_DIM).contains(&w) || !(1..=umdev::scanout::MAX_DIM).contains(&h) {
        return Err(format!("each side must be 1..={}", umdev::scanout::MAX_DIM));
    }
    Ok((w, h))
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
    match vhost_user::run(&args.socket, device) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
