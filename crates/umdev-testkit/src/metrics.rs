//! Scraping a device's `--metrics` endpoint, as Prometheus or curl would.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends `request` to the endpoint on loopback `port`: the status line and
/// the body. A peer that closes (or resets) early gives what arrived.
pub fn http(port: u16, request: &[u8]) -> (String, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (String::new(), String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(request);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// `GET /metrics`: the exposition text (empty if the endpoint did not answer 200).
pub fn scrape(port: u16) -> String {
    let (status, body) = http(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
    if status == "HTTP/1.1 200 OK" {
        body
    } else {
        String::new()
    }
}

/// The value of `series` (name and labels, as written) in `text`, if there.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
}

/// Whether `text` has the family `name`.
pub fn has_family(text: &str, name: &str) -> bool {
    text.contains(&format!("# TYPE {name} "))
}

/// Every family a `umdev-vgpu --metrics --vnc` endpoint serves.
pub const VGPU_FAMILIES: &[&str] = &[
    "umdev_region_reads_total",
    "umdev_region_writes_total",
    "umdev_posted_writes_total",
    "umdev_dma_maps_total",
    "umdev_dma_unmaps_total",
    "umdev_dma_read_bytes_total",
    "umdev_dma_written_bytes_total",
    "umdev_dma_regions",
    "umdev_pagetrack_pages_tracked",
    "umdev_pagetrack_syncs_total",
    "umdev_pagetrack_pages_compared_total",
    "umdev_pagetrack_track_writes_total",
    "umdev_pagetrack_uffd_faults_total",
    "umdev_vgpu_submissions_total",
    "umdev_vgpu_audits_total",
    "umdev_vgpu_fences_total",
    "umdev_vgpu_faults_total",
    "umdev_vgpu_shadow_updates_total",
    "umdev_vgpu_engine_busy_seconds_total",
    "umdev_vgpu_scanout_pictures_total",
    "umdev_vnc_viewers",
    "umdev_vnc_viewers_total",
    "umdev_vnc_viewers_dropped_total",
    "umdev_vnc_sent_bytes_total",
    "umdev_vnc_updates_total",
    "umdev_vnc_frames_captured_total",
];
