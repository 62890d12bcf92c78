//! The vGPU's counters for `--metrics`: submissions audited, fences, faults
//! by reason, shadow updates, engine busy time, scanout pictures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use umdev::metrics::{MetricsSource, MetricsWriter};

use super::regs::*;
use super::Shared;

/// Fault reasons by their SPEC.md number (index 0 unused).
const FAULT_NAMES: [&str; 12] = [
    "none",
    "not_present",
    "read_only",
    "bad_table",
    "bad_target",
    "ring_write",
    "malformed",
    "nesting",
    "budget",
    "bad_ring",
    "dma_error",
    "no_root",
];

const _: () = assert!(FAULT_NO_ROOT as usize == FAULT_NAMES.len() - 1);

#[derive(Debug, Default)]
pub(crate) struct VgpuStats {
    pub submissions: AtomicU64,
    pub segments_audited: AtomicU64,
    pub fences: AtomicU64,
    faults: [AtomicU64; 12],
    pub shadow_updates: AtomicU64,
    pub engine_busy_ns: AtomicU64,
    pub scanout_pictures: AtomicU64,
}

impl VgpuStats {
    pub fn fault(&self, reason: u8) {
        if let Some(c) = self.faults.get(usize::from(reason)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn busy(&self, d: Duration) {
        self.engine_busy_ns
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// The counters of a vGPU that may be gone (then nothing is written).
pub(crate) struct VgpuMetrics(pub Weak<Shared>);

impl MetricsSource for VgpuMetrics {
    fn write_metrics(&self, w: &mut MetricsWriter) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let s = &shared.stats;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        w.counter(
            "umdev_vgpu_submissions_total",
            "Doorbells the engine ran (one or more audited segments each).",
            n(&s.submissions),
        );
        w.counter(
            "umdev_vgpu_audits_total",
            "Command segments audited and admitted.",
            n(&s.segments_audited),
        );
        w.counter(
            "umdev_vgpu_fences_total",
            "FENCE commands retired.",
            n(&s.fences),
        );
        let faults: Vec<(&str, u64)> = FAULT_NAMES
            .iter()
            .zip(&s.faults)
            .skip(1)
            .map(|(&name, c)| (name, n(c)))
            .collect();
        w.counters(
            "umdev_vgpu_faults_total",
            "Context faults, by reason.",
            "reason",
            &faults,
        );
        w.counter(
            "umdev_vgpu_shadow_updates_total",
            "Guest page-table writes applied to the shadow (track_write).",
            n(&s.shadow_updates),
        );
        w.seconds(
            "umdev_vgpu_engine_busy_seconds_total",
            "Time the engine spent running submissions.",
            Duration::from_nanos(n(&s.engine_busy_ns)),
        );
        w.counter(
            "umdev_vgpu_scanout_pictures_total",
            "Scanout PNGs written (--scanout-png).",
            n(&s.scanout_pictures),
        );
    }
}
