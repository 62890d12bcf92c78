//! The fuzz targets on stable Rust: every file of `fuzz/corpus/<target>/` (the
//! hand-made seeds) and `fuzz/regressions/<target>/` (inputs that once crashed or
//! hung a target) run through the same harness code that `cargo fuzz run`
//! drives, plus the seeds as built from the wire structs. See docs/robustness.md.

use umdev_fuzz_harness::{
    device_state, metrics, migration, pci_config, seeds, session, vgpu, virtio_gpu, vnc,
};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The corpus and regression files of `target`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            if e.path().is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort();
    files
}

/// Runs `harness` over every input of `target`, each within `limit`.
fn replay(target: &str, min_files: usize, limit: Duration, harness: fn(&[u8])) {
    let files = inputs(target);
    assert!(
        files.len() >= min_files,
        "{target}: {} inputs, expected at least {min_files}",
        files.len()
    );
    for file in &files {
        let data = std::fs::read(file).unwrap();
        let start = Instant::now();
        harness(&data);
        let took = start.elapsed();
        assert!(
            took < limit,
            "{}: took {took:?} (a hang under the fuzzer)",
            file.display()
        );
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn vfio_user_session_corpus() {
    replay("vfio_user_session", 5, Duration::from_secs(5), |d| {
        session::run_bytes(d);
    });
}

#[test]
fn vfio_user_messages_corpus() {
    replay("vfio_user_messages", 5, Duration::from_secs(5), |d| {
        session::run_messages(d);
    });
}

#[test]
fn pci_config_corpus() {
    replay("pci_config", 3, Duration::from_secs(5), pci_config::run);
}

#[test]
fn vgpu_page_tables_corpus() {
    replay("vgpu_page_tables", 3, Duration::from_secs(5), |d| {
        vgpu::run_page_tables(d);
    });
}

#[test]
fn vgpu_audit_corpus() {
    replay("vgpu_audit", 3, Duration::from_secs(5), |d| {
        vgpu::run_audit(d);
    });
}

#[test]
fn virtio_gpu_corpus() {
    replay("virtio_gpu", 4, Duration::from_secs(5), |d| {
        virtio_gpu::run(d);
    });
}

#[test]
fn virtio_gpu_seeds_reach_the_handlers() {
    for (name, input) in virtio_gpu::virtio_gpu_seeds() {
        let out = virtio_gpu::run(&input);
        match name {
            "draw" => {
                assert_eq!((out.ok, out.errors), (8, 0), "{name}: {out:?}");
                assert_eq!(out.flushes, 1, "{name}");
            }
            "errors" => assert_eq!(out.ok, 1, "{name}: {out:?}"),
            _ => assert!(out.requests > 0, "{name}: {out:?}"),
        }
    }
}

#[test]
fn vgpu_seeds_reach_what_they_are_for() {
    // The page-table seeds compare translations; the audit seeds audit steps
    // that are checked against the tables (not only faults).
    for (name, ops) in seeds::vgpu_page_table_seeds() {
        let env = vgpu::run_page_tables(&ops);
        assert!(
            env.checks >= 20,
            "{name}: {} translations checked",
            env.checks
        );
    }
    for (name, ops) in seeds::vgpu_audit_seeds() {
        let env = vgpu::run_audit(&ops);
        if name == "unmapped-window" {
            // Copying from RAM into pages whose region is away: bad target;
            // the same once it is back: audited.
            let reasons: Vec<u8> = env.faults.iter().map(|f| f.0).collect();
            assert_eq!(reasons, [4], "{name}: {:?}", env.faults);
            assert!(env.steps >= 1, "{name}: {} steps", env.steps);
        } else if name == "faults" {
            // Read-only, ring write, bad target, malformed header, command cut
            // by TAIL, nesting, misaligned store, batch end outside a batch.
            let reasons: Vec<u8> = env.faults.iter().map(|f| f.0).collect();
            assert_eq!(
                reasons,
                [2, 5, 4, 6, 6, 7, 6, 6],
                "{name}: {:?}",
                env.faults
            );
        } else {
            assert!(
                env.steps >= 3,
                "{name}: {} steps; faults {:?}",
                env.steps,
                env.faults
            );
            assert!(env.faults.is_empty(), "{name}: {:?}", env.faults);
        }
    }
}

#[test]
fn device_state_corpus() {
    replay("device_state", 4, Duration::from_secs(5), device_state::run);
}

/// Each seed is a valid blob of its model: it restores.
#[test]
fn device_state_seeds_restore() {
    for (name, input) in device_state::seeds() {
        device_state::run(&input);
        let _ = name;
    }
}

#[test]
fn migration_stream_corpus() {
    replay(
        "migration_stream",
        3,
        Duration::from_secs(5),
        migration::run,
    );
}

/// Each seed is a complete stream: it restores and migrates out again.
#[test]
fn migration_stream_seeds_restore() {
    for (_, input) in migration::seeds() {
        migration::run(&input);
    }
}

#[test]
fn metrics_request_corpus() {
    replay("metrics_request", 3, Duration::from_secs(5), metrics::run);
}

#[test]
fn vgpu_control_corpus() {
    replay(
        "vgpu_control",
        5,
        Duration::from_secs(5),
        umdev_fuzz_harness::vgpu_control::run,
    );
}

#[test]
fn vnc_viewer_corpus() {
    replay("vnc_viewer", 3, Duration::from_secs(5), vnc::run);
}

#[test]
fn seeds_as_built_are_valid_sessions() {
    // A fully valid structured seed is read to its end and answered.
    for (name, records) in seeds::message_seeds() {
        let out = session::run_messages(&records);
        let sent = session::messages_to_bytes(&records).len();
        assert_eq!(out.input_accepted, sent, "{name}: server stopped reading");
        assert!(out.clean_end, "{name}: session ended with an error");
        assert!(out.reply_bytes > 0, "{name}: no VERSION reply");
    }
    for (name, bytes) in seeds::session_seeds() {
        session::run_bytes(&bytes);
        let _ = name;
    }
    for (_, ops) in seeds::pci_config_seeds() {
        pci_config::run(&ops);
    }
}

#[test]
fn committed_seeds_match_the_builders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let sets = [
        ("vfio_user_session", seeds::session_seeds()),
        ("vfio_user_messages", seeds::message_seeds()),
        ("pci_config", seeds::pci_config_seeds()),
        ("vgpu_page_tables", seeds::vgpu_page_table_seeds()),
        ("vgpu_audit", seeds::vgpu_audit_seeds()),
        ("device_state", device_state::seeds()),
    ];
    for (target, list) in sets {
        for (name, bytes) in list {
            let path = root.join(target).join(format!("seed-{name}"));
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is stale: cargo run --manifest-path fuzz/Cargo.toml \
                 --no-default-features --example write_seeds",
                path.display()
            );
        }
    }
}
