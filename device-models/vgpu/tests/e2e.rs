//! End-to-end test of the umdev vGPU: a Linux guest under QEMU 11.1 (TCG) drives
//! `umdev-vgpu` through `vfio-user-pci` from userspace (tests/guest-driver,
//! src/vgpu.rs): page tables in its locked pages, a ring, a PTE rewrite with TLB
//! invalidation, a leaf pointing outside guest RAM, then a picture drawn with
//! FILL/BLIT/COPY into VRAM and scanned out through the GGTT. The backend's
//! `--scanout-png` picture must equal `umdev_vgpu::picture::render()` pixel for
//! pixel (the same recipe the guest drew from).
//!
//! Set-up, skipping and environment: the shared harness (tests/common/e2e.rs;
//! `UMDEV_E2E=1` turns a missing set-up into a failure), plus
//! `UMDEV_E2E_VGPU_ARGS`: extra arguments for umdev-vgpu. Output goes to
//! `target/e2e/tests/<test>/` (guest serial log, QEMU log, backend log, the
//! scanout PNG, and on a mismatch the expected PNG); the logs are printed on
//! failure.

use umdev_testkit as common;

use std::fs;

use common::e2e::{self, Backend, Diag, GuestOpts};
use umdev_vgpu::{picture, scanout};

/// The differing pixels of two RGB pictures of the same size: count and the
/// first few as text.
fn pixel_diff(got: &[u8], want: &[u8], width: u32) -> (usize, Vec<String>) {
    let mut count = 0;
    let mut first = Vec::new();
    for (i, (g, w)) in got.chunks_exact(3).zip(want.chunks_exact(3)).enumerate() {
        if g != w {
            count += 1;
            if first.len() < 10 {
                let (x, y) = (i as u32 % width, i as u32 / width);
                first.push(format!("({x},{y}): got {g:02x?} want {w:02x?}"));
            }
        }
    }
    (count, first)
}

#[test]
fn vgpu_picture_under_qemu() {
    let test = "vgpu_picture_under_qemu";
    let Some(env) = e2e::env(test) else { return };
    let bin =
        e2e::workspace_binary(env, "umdev-vgpu", "umdev-vgpu").unwrap_or_else(|e| panic!("{e}"));
    let diag = Diag::default();
    let dir = e2e::test_dir(env, test);
    let png = dir.join("scanout.png");
    // The backend, with its default seccomp filter.
    let mut args = vec!["--scanout-png".to_string(), png.display().to_string()];
    args.extend(
        std::env::var("UMDEV_E2E_VGPU_ARGS")
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned),
    );
    let backend = Backend::start(
        &bin,
        &args,
        &e2e::socket_path(test),
        &dir.join("backend.log"),
        &diag,
    );
    let results = e2e::run_guest(
        env,
        &dir,
        "vgpu",
        &GuestOpts {
            memfd: true,
            append: "UMDEV_DEV=1234:5547",
            backend: Some(&backend),
            ..GuestOpts::default()
        },
        &diag,
    );
    drop(backend);
    for name in [
        "vgpu_context",
        "vgpu_store_fence",
        "vgpu_pte_remap",
        "vgpu_bad_target",
        "vgpu_after_fault",
        "vgpu_scanout",
        "vgpu_picture",
    ] {
        let pass = format!("PASS {name} ");
        assert!(
            results.lines().any(|l| l.starts_with(&pass)),
            "no PASS {name} from the guest:\n{results}"
        );
    }

    // The scanout picture, pixel for pixel.
    let bytes = fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    let got = scanout::decode_png(&bytes).expect("decode the scanout PNG");
    let fb = picture::render();
    let want = picture::to_rgb(&fb);
    assert_eq!(
        (got.width, got.height),
        (picture::WIDTH, picture::HEIGHT),
        "scanout size"
    );
    let (count, first) = pixel_diff(&got.rgb, &want, picture::WIDTH);
    if count != 0 {
        let expected = dir.join("expected.png");
        let _ = scanout::write_png(
            &expected,
            picture::WIDTH,
            picture::HEIGHT,
            picture::STRIDE as usize,
            &fb,
        );
        panic!(
            "{count} pixels of {} differ from {}:\n{}",
            png.display(),
            expected.display(),
            first.join("\n")
        );
    }
    e2e::note(&format!(
        "{test}: scanout {}x{} matches the expected picture",
        got.width, got.height
    ));
    drop(diag);
}

#[test]
fn pixel_diff_finds_each_differing_pixel() {
    let want = vec![0u8; 3 * 4];
    let mut got = want.clone();
    got[3 * 3 + 2] = 1;
    let (count, first) = pixel_diff(&got, &want, 2);
    assert_eq!(count, 1);
    assert!(first[0].starts_with("(1,1)"), "{first:?}");
    assert_eq!(pixel_diff(&want, &want, 2).0, 0);
}
