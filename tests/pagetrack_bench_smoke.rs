//! `umdev-pagetrack-bench --quick` runs to the end and prints every figure (no
//! timing is asserted: figures are read, not tested).

use umdev_testkit as common;

#[test]
fn pagetrack_bench_quick_run() {
    let out = std::process::Command::new(common::workspace_bin("umdev-pagetrack-bench"))
        .args(["--quick", "--pages", "1024"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for figure in [
        "scan sync",
        "notifier",
        "bitmap sync, 0.1% dirty",
        "bitmap sync, 10% dirty",
        "uffd first write",
    ] {
        assert!(text.contains(figure), "missing {figure:?} in:\n{text}");
    }
}
