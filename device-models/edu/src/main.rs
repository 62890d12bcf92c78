//! `umdev-edu`: QEMU's educational `edu` device as a vfio-user backend.

use clap::Parser;
use umdev::cli::{self, ServerArgs};

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
    let args = Args::parse();
    cli::serve_pci(&args.server, |memory| {
        umdev_edu::new_function(memory, args.dma_bits)
    })
}
