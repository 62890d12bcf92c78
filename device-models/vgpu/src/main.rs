//! `umdev-vgpu`: the umdev mediated GPU (SPEC.md) as a vfio-user backend.

use std::path::PathBuf;

use clap::Parser;
use umdev::cli::{self, ServerArgs};
use umdev::memory::GuestMemory;
use umdev::pagetrack::{Policy, SourceKind};
use umdev_vgpu::{regs, VgpuConfig};

/// Serves a umdev vGPU over vfio-user.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// VRAM size in MiB (a power of two).
    #[arg(long, default_value_t = regs::DEFAULT_VRAM_MIB)]
    vram_mib: u32,
    /// Write the scanout picture here after every FENCE and on SIGUSR1.
    #[arg(long)]
    scanout_png: Option<PathBuf>,
    /// How guest page-table writes are detected: scan, dirty-bitmap or uffd.
    #[arg(long, default_value = "scan")]
    page_track: SourceKind,
    /// uffd policy: strict, out-of-sync or adaptive.
    #[arg(long, default_value = "adaptive")]
    policy: String,
    #[arg(long, value_parser = parse_hex16)]
    vendor_id: Option<u16>,
    #[arg(long, value_parser = parse_hex16)]
    device_id: Option<u16>,
    #[arg(long, value_parser = parse_hex16)]
    subsystem_vendor_id: Option<u16>,
    #[arg(long, value_parser = parse_hex16)]
    subsystem_id: Option<u16>,
    #[command(flatten)]
    vnc: umdev::vnc::VncArgs,
}

fn parse_hex16(s: &str) -> Result<u16, std::num::ParseIntError> {
    u16::from_str_radix(s.trim_start_matches("0x"), 16)
}

fn main() -> std::process::ExitCode {
    cli::block_termination_signals();
    cli::block_sigusr1();
    cli::init_logging();
    let args = Args::parse();
    let policy = match args.policy.as_str() {
        "strict" => Policy::Strict,
        "out-of-sync" => Policy::OutOfSync { threshold: 4 },
        "adaptive" => Policy::default(),
        other => {
            eprintln!("umdev-vgpu: unknown policy {other:?} (strict, out-of-sync, adaptive)");
            return std::process::ExitCode::FAILURE;
        }
    };
    let mut config = VgpuConfig {
        vram_mib: args.vram_mib,
        scanout_png: args.scanout_png.clone(),
        page_track: args.page_track,
        policy,
        ..VgpuConfig::default()
    };
    if let Some(v) = args.vendor_id {
        config.ids.vendor_id = v;
    }
    if let Some(v) = args.device_id {
        config.ids.device_id = v;
    }
    if let Some(v) = args.subsystem_vendor_id {
        config.ids.subsystem_vendor_id = v;
    }
    if let Some(v) = args.subsystem_id {
        config.ids.subsystem_id = v;
    }
    let memory = GuestMemory::new(umdev::vfio_user::ServerConfig::default().max_dma_maps as usize);
    let (function, handle) = match umdev_vgpu::new_function(memory, config) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // Bound before the sandbox; serves until the process ends.
    let _vnc = match args
        .vnc
        .start("umdev-vgpu", vec![std::sync::Arc::new(handle.clone())])
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    cli::on_sigusr1(move || handle.dump_scanout());
    if let Some(kind) = Some(args.page_track).filter(|k| *k != SourceKind::Scan) {
        tracing::info!(?kind, "page tracking source");
    }
    if args.scanout_png.is_some() {
        // Scanout pictures are files written after start-up (seccomp).
        umdev::sandbox::allow_extra(umdev::sandbox::FILE_OUTPUT);
    }
    match cli::run(&args.server, function) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
