//! `umdev-probe` against the real `umdev-edu`.

use umdev_testkit as common;

use common::{workspace_bin, Backend};

#[test]
fn probe_prints_what_a_client_sees() {
    let be = Backend::edu();
    let out = std::process::Command::new(workspace_bin("umdev-probe"))
        .arg("--socket-path")
        .arg(&be.socket)
        .arg("--hex")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "vfio-user 0.",
        "\"max_msg_fds\":16",
        "device: flags [PCI RESET], 9 regions, 5 irqs",
        "region 0 (BAR0): size 0x100000, flags [read write]",
        "region 7 (config): size 0x100",
        "irq 0 (INTx): count 1, flags [eventfd maskable automasked]",
        "config: 1234:11e8 (rev 10) class 00ff00",
        "Interrupt: pin A",
        "Capabilities: [40] MSI: Enable- Count=1/1 64bit+",
        "000: 34 12 e8 11",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
