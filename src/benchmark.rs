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
