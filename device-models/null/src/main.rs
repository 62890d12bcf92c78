//! `umdev-null`: the null device over vfio-user.

use clap::Parser;
use umdev::cli::{self, ServerArgs};

/// Serves the null device (device-models/null) over vfio-user.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    cli::serve_pci(&args.server, umdev_null::new_function)
}
