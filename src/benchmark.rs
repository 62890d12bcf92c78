//! What the benchmark binaries (`umdev-bench`, `umdev-pagetrack-bench`,
//! `umdev-vgpu-bench`) share: the machine line printed beside their figures,
//! the median of repetitions, durations in microseconds.

use std::time::Duration;

/// "CPU model, N CPUs, Linux release": the machine a table of figures was
/// measured on.
pub fn machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // SAFETY: sysconf only reads a system value.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{model}, {cpus} CPUs, Linux {kernel}")
}

/// The median of repeated timings (the upper one of an even count).
/// Panics on an empty list: a benchmark always runs at least once.
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// `d` in microseconds.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A device binary started for a benchmark run: killed, and its directory
/// removed, when dropped.
pub struct Device {
    pub child: std::process::Child,
    dir: std::path::PathBuf,
    /// Where it listens.
    pub socket: std::path::PathBuf,
}

impl Device {
    /// Runs `bin --socket-path DIR/SOCKET EXTRA...` as [`spawn`](Self::spawn)
    /// does, waiting until it listens on that socket.
    pub fn start(
        bin: &std::path::Path,
        extra: &[String],
        dir: std::path::PathBuf,
        socket: &str,
        prepare: impl FnOnce(&mut std::process::Command),
    ) -> Result<Device, String> {
        let mut args: Vec<std::ffi::OsString> =
            vec!["--socket-path".into(), dir.join(socket).into()];
        args.extend(extra.iter().map(Into::into));
        Device::spawn(bin, &args, dir, socket, prepare)
    }

    /// Runs `bin ARGS...` (stdin and stdout null, `RUST_LOG` warn unless set)
    /// with `dir` made for it, `prepare` having had its say on the command
    /// first (CPU affinity, say), and waits up to 10 s until it listens on
    /// `dir/listens` ([`crate::cli::wait_listening`]), so that a plain
    /// connect succeeds.
    pub fn spawn(
        bin: &std::path::Path,
        args: &[std::ffi::OsString],
        dir: std::path::PathBuf,
        listens: &str,
        prepare: impl FnOnce(&mut std::process::Command),
    ) -> Result<Device, String> {
        use std::process::Stdio;
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let socket = dir.join(listens);
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        prepare(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let mut device = Device { child, dir, socket };
        let socket = device.socket.clone();
        crate::cli::wait_listening(&socket, Some(&mut device.child), Duration::from_secs(10))
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        Ok(device)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
