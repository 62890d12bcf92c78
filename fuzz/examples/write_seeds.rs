//! Writes the hand-made seeds into `fuzz/corpus/<target>/seed-<name>`:
//! `cargo run --manifest-path fuzz/Cargo.toml --no-default-features --example write_seeds`
use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let sets = [
        ("vfio_user_session", umdev_fuzz::seeds::session_seeds()),
        ("vfio_user_messages", umdev_fuzz::seeds::message_seeds()),
        ("pci_config", umdev_fuzz::seeds::pci_config_seeds()),
        (
            "vgpu_page_tables",
            umdev_fuzz::seeds::vgpu_page_table_seeds(),
        ),
        ("vgpu_audit", umdev_fuzz::seeds::vgpu_audit_seeds()),
        ("virtio_gpu", umdev_fuzz::virtio_gpu::virtio_gpu_seeds()),
        ("device_state", umdev_fuzz::device_state::seeds()),
        ("migration_stream", umdev_fuzz::migration::seeds()),
        ("vnc_viewer", umdev_fuzz::vnc::seeds()),
        ("metrics_request", umdev_fuzz::metrics::seeds()),
        ("vgpu_control", umdev_fuzz::vgpu_control::seeds()),
    ];
    for (target, seeds) in sets {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}
