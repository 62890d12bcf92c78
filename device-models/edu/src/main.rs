//! `umdev-edu`: QEMU's educational `edu` device as a vfio-user backend.

use clap::Parser;
use umdev::cli::{self, ServerArgs};
use umdev::memory::GuestMemory;

/// Serves an `edu` device (QEMU docs/specs/edu.rst) over vfio-user.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
    /// Bits of guest address the DMA engine drives (QEMU's edu: 28).
    #[arg(long, default_value_t = umdev_edu::DEFAULT_DMA_BITS, value_parser = clap::value_parser!(u32).range(12..=64))]
    dma_bits: u32,
}

fn main() -> std::process::ExitCode {
    cli::block_termination_signals();
    cli::init_logging();
    let args = Args::parse();
    let memory = GuestMemory::new(umdev::vfio_user::ServerConfig::default().max_dma_maps as usize);
    let function = match umdev_edu::new_function(memory, args.dma_bits) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli::run(&args.server, function) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
