//! `umdev-vgpu-parent`: one process that owns the vGPU engine and serves
//! several VMs' vGPU instances (`umdev_vgpu::parent`), managed with `umdevctl`
//! through `<state-dir>/control.sock`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use umdev_vgpu::parent::types::Capacity;
use umdev_vgpu::parent::{self, Parent, ParentConfig};

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Where the sockets go: <uuid>.sock per instance, control.sock (one
    /// parent per directory: it holds parent.lock there).
    #[arg(long, default_value = "/run/umdev-vgpu")]
    state_dir: PathBuf,
    /// Persistent instance definitions (JSON), made again at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// VRAM shared out to instances, in MiB.
    #[arg(long, default_value_t = 256)]
    vram_mib: u64,
    /// Hardware contexts shared out.
    #[arg(long, default_value_t = 16)]
    contexts: u64,
    /// GGTT entries shared out.
    #[arg(long, default_value_t = 524288)]
    ggtt_entries: u64,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (every family
    /// labelled with its instance's UUID).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Each instance writes its scanout to DIR/<uuid>.png at every FENCE
    /// and when the parent gets SIGUSR1 (for tests and debugging: a PNG
    /// encode per FENCE).
    #[arg(long, value_name = "DIR")]
    scanout_dir: Option<PathBuf>,
    /// Do not confine the running parent with its seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
    // --vnc: each instance serves its scanout over VNC, the instance in slot
    // n (the lowest free one) at PORT + n, or PATH.n beside PATH (PATH itself
    // for slot 0); with port 0, each at a port the kernel picks. `umdevctl
    // list` shows where.
    #[command(
        flatten,
        next_help_heading = "VNC: every instance its own server, slot n at PORT+n (PATH.n; port 0: any)"
    )]
    vnc: umdev::vnc::VncArgs,
}

fn main() -> ExitCode {
    // Blocked before any thread starts: they all inherit it, one waits for them.
    umdev::cli::block_termination_signals();
    umdev::cli::block_sigusr1();
    umdev::cli::init_logging();
    let args = Args::parse();
    let vnc = match args.vnc.config("umdev-vgpu") {
        Ok(v) => v,
        Err(e) => {
            eprintln!("umdev-vgpu-parent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if vnc.is_some() {
        // Instances made later start their VNC servers under the filter
        // (their listeners: LISTENERS_AND_MEMFDS, below).
        umdev::sandbox::allow_extra(umdev::vnc::SYSCALLS);
    }
    let config = ParentConfig {
        state_dir: args.state_dir.clone(),
        config_file: args.config.clone(),
        capacity: Capacity {
            vram_mib: args.vram_mib,
            contexts: args.contexts,
            ggtt_entries: args.ggtt_entries,
        },
        scanout_dir: args.scanout_dir.clone(),
        vnc,
    };
    let parent = match Parent::new(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("umdev-vgpu-parent: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(addr) = args.metrics {
        if let Err(e) = umdev::metrics::serve(addr) {
            eprintln!("umdev-vgpu-parent: {e}");
            return ExitCode::FAILURE;
        }
    }
    let control = parent.control_path();
    let listener = match parent.listen_control() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("umdev-vgpu-parent: {e}");
            return ExitCode::FAILURE;
        }
    };
    match parent.create_persistent() {
        Ok(n) => tracing::info!(instances = n, "persistent instances made"),
        Err(e) => {
            eprintln!("umdev-vgpu-parent: {e}");
            return ExitCode::FAILURE;
        }
    }
    // From here on: the single-device filter, plus making instances (sockets,
    // VRAM memfds) and writing the config file.
    umdev::sandbox::allow_extra(umdev::sandbox::LISTENERS_AND_MEMFDS);
    umdev::sandbox::allow_extra(umdev::sandbox::FILE_OUTPUT);
    if let Err(e) = umdev::sandbox::confine(!args.no_seccomp) {
        eprintln!("umdev-vgpu-parent: {e}");
        return ExitCode::FAILURE;
    }
    // Ready (Type=notify): the control socket listens, the persistent
    // instances serve, the filter is in place (socket and sendto are allowed).
    if let Err(e) = parent::notify::notify("READY=1") {
        tracing::warn!("{e}");
    }
    tracing::info!(control = %control.display(), "parent ready");
    let pictures = parent.clone();
    umdev::cli::on_sigusr1(move || pictures.dump_scanouts());
    std::thread::scope(|s| {
        s.spawn(|| {
            let sig = umdev::cli::wait_for_termination_signal();
            tracing::info!(sig, "stopping");
            parent::shutdown_listener(&listener);
        });
        parent.serve_control(&listener);
    });
    parent.shutdown();
    let _ = std::fs::remove_file(&control);
    ExitCode::SUCCESS
}
