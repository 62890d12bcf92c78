//! The vGPU parent and `umdevctl`, as real processes over real sockets: types
//! and their shrinking availability, create/list/remove/set-weight and their
//! errors, the partitioning (never over-committed), two instances serving two
//! vfio-user clients at once with their types' VRAM, remove refused while a
//! VMM is attached unless --force, persistence across a restart, and a
//! control socket that survives garbage, huge lines and silent clients.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use umdev::cli::wait_listening;
use umdev::vfio_user::Client;
use umdev_testkit::TempDir;
use umdev_vgpu::regs::{ID_VALUE, REG_ID};

/// A running `umdev-vgpu-parent` with 96 MiB, 6 contexts, 256 Ki GGTT entries.
struct Parent {
    child: Child,
    dir: PathBuf,
}

impl Parent {
    fn start(dir: &Path) -> Parent {
        Parent::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Parent {
        let log = std::fs::File::create(dir.join("parent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_umdev-vgpu-parent"))
            .arg("--state-dir")
            .arg(dir.join("run"))
            .arg("--config")
            .arg(dir.join("vgpu.json"))
            .args([
                "--vram-mib",
                "96",
                "--contexts",
                "6",
                "--ggtt-entries",
                "262144",
            ])
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start umdev-vgpu-parent");
        let mut p = Parent {
            child,
            dir: dir.to_owned(),
        };
        let control = p.control();
        if let Err(e) = wait_listening(&control, Some(&mut p.child), Duration::from_secs(10)) {
            panic!("the parent: {e}:\n{}", p.log());
        }
        p
    }

    fn control(&self) -> PathBuf {
        self.dir.join("run/control.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("parent.log")).unwrap_or_default()
    }

    /// `umdevctl --control ... <args>`: exit success, stdout, stderr.
    fn ctl(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_umdevctl"))
            .arg("--control")
            .arg(self.control())
            .args(args)
            .output()
            .expect("run umdevctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.ctl(args);
        assert!(ok, "umdevctl {args:?} failed: {err}\n{}", self.log());
        out
    }

    /// `umdevctl <args>` must fail with a message containing `want`.
    fn refused(&self, args: &[&str], want: &str) {
        let (ok, _, err) = self.ctl(args);
        assert!(!ok, "umdevctl {args:?} succeeded");
        assert!(
            err.contains(want),
            "umdevctl {args:?}: {err:?} lacks {want:?}"
        );
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn available(&self) -> Vec<(String, u64)> {
        let v = self.json(&["types"]);
        v["types"]["types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["name"].as_str().unwrap().to_owned(),
                    t["available"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn stop(mut self) {
        // SAFETY: sends SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the parent did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Parent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- parent.log\n{}", self.log());
        }
    }
}

/// A vfio-user client on `socket`: the ID register, and BAR2's size.
fn probe(socket: &Path) -> (Client, u32, u64) {
    let mut c = Client::connect(socket).expect("connect to the instance");
    c.enable_device().expect("memory decoding on");
    let id = c.region_read(0, REG_ID, 4).unwrap();
    let vram = c.region_info(2).unwrap().info.size;
    (c, u32::from_le_bytes(id.try_into().unwrap()), vram)
}

const U1: &str = "0b8f2a54-1c3d-4e5f-8a9b-0c1d2e3f4a5b";

#[test]
fn instances_are_made_listed_partitioned_and_removed() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    let want = |a: u64, b: u64| vec![("vgpu-16m".to_string(), a), ("vgpu-64m".to_string(), b)];
    assert_eq!(p.available(), want(6, 1));

    let big = PathBuf::from(p.ok(&["create", "--type", "vgpu-64m"]).trim());
    assert!(big.exists(), "{}", big.display());
    assert_eq!(p.available(), want(2, 0));
    p.refused(&["create", "--type", "vgpu-64m"], "does not fit");
    p.refused(&["create", "--type", "vgpu-1g"], "unknown type");
    p.refused(
        &["create", "--type", "vgpu-16m", "--uuid", "nope"],
        "not a UUID",
    );
    p.refused(
        &["create", "--type", "vgpu-16m", "--weight", "0"],
        "weights are 1 to 1000",
    );
    let small = PathBuf::from(
        p.ok(&[
            "create", "--type", "vgpu-16m", "--uuid", U1, "--weight", "3",
        ])
        .trim(),
    );
    assert_eq!(small.file_name().unwrap(), format!("{U1}.sock").as_str());
    p.refused(
        &["create", "--type", "vgpu-16m", "--uuid", U1],
        "exists already",
    );
    assert_eq!(p.available(), want(1, 0));

    let list = p.json(&["list"]);
    let list = list["list"]["instances"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    let mine = list.iter().find(|i| i["uuid"] == U1).unwrap();
    assert_eq!(mine["type"], "vgpu-16m");
    assert_eq!(mine["weight"], 3);
    p.ok(&["set-weight", U1, "5"]);
    assert!(p
        .ok(&["list"])
        .contains(&format!("{U1} vgpu-16m weight=5 idle")));

    // Two VMMs at once, each its own device with its type's VRAM.
    let (mut a, id_a, vram_a) = probe(&big);
    let (mut b, id_b, vram_b) = probe(&small);
    assert_eq!((id_a, id_b), (ID_VALUE, ID_VALUE));
    assert_eq!((vram_a, vram_b), (64 << 20, 16 << 20));
    assert!(p
        .ok(&["list"])
        .contains(&format!("{U1} vgpu-16m weight=5 attached")));

    // Attached: refused, then forced (the VMM is disconnected).
    p.refused(&["remove", U1], "VMM attached");
    p.ok(&["remove", U1, "--force"]);
    assert!(
        b.region_read(0, REG_ID, 4).is_err(),
        "the VMM was not disconnected"
    );
    assert!(!small.exists());
    // The other instance never noticed.
    assert_eq!(a.region_read(0, REG_ID, 4).unwrap(), ID_VALUE.to_le_bytes());
    p.refused(&["remove", U1], "no instance");
    assert_eq!(p.available(), want(2, 0));
    drop(a);
    let uuid = p.json(&["list"])["list"]["instances"][0]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    // The VMM has gone: a plain remove now works.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.ctl(&["remove", &uuid]).0 {
        assert!(Instant::now() < deadline, "remove after the VMM left");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(p.available(), want(6, 1));
}

#[test]
fn persistent_instances_come_back_after_a_restart() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    let socket = p.ok(&[
        "create",
        "--type",
        "vgpu-16m",
        "--uuid",
        U1,
        "--weight",
        "2",
        "--persist",
    ]);
    p.ok(&["create", "--type", "vgpu-16m"]);
    p.stop();
    let config = std::fs::read_to_string(dir.path().join("vgpu.json")).unwrap();
    assert!(config.contains(U1), "{config}");

    let p = Parent::start(dir.path());
    let list = p.ok(&["list"]);
    assert_eq!(list.lines().count(), 1, "only the persistent one: {list}");
    assert!(
        list.contains(&format!("{U1} vgpu-16m weight=2 idle persistent")),
        "{list}"
    );
    let (_c, id, vram) = probe(Path::new(socket.trim()));
    assert_eq!((id, vram), (ID_VALUE, 16 << 20));
    drop(_c);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p.ctl(&["remove", U1]).0 {
        assert!(Instant::now() < deadline, "remove after the VMM left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = std::fs::read_to_string(dir.path().join("vgpu.json")).unwrap();
    assert!(!config.contains(U1), "{config}");
}

/// One raw request line to the control socket and its response line.
fn raw(stream: &mut UnixStream, line: &[u8]) -> serde_json::Value {
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut answer)
        .unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
}

#[test]
fn the_control_socket_answers_garbage_and_is_not_held_by_a_silent_client() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    // A client that never says anything does not hold up the others.
    let _silent = UnixStream::connect(p.control()).unwrap();
    let t = Instant::now();
    assert!(p.ok(&["types"]).contains("vgpu-64m"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    let mut s = UnixStream::connect(p.control()).unwrap();
    for bad in [
        &b"hello\n"[..],
        b"{\"cmd\":\"explode\"}\n",
        b"{\"cmd\":\"create\"}\n",
        b"\xff\xff\n",
        b"[1,2,3]\n",
    ] {
        let v = raw(&mut s, bad);
        assert!(v["error"]["error"].is_string(), "{v}");
    }
    let mut huge = vec![b'x'; 100_000];
    huge.push(b'\n');
    let v = raw(&mut s, &huge);
    assert!(
        v["error"]["error"]
            .as_str()
            .unwrap()
            .contains("longer than"),
        "{v}"
    );
    // The same connection still works after all that.
    let v = raw(&mut s, b"{\"cmd\":\"types\"}\n");
    assert_eq!(v["types"]["types"].as_array().unwrap().len(), 2);
    // Nothing reachable: a clear sentence and a failure.
    let out = Command::new(env!("CARGO_BIN_EXE_umdevctl"))
        .args(["--control", "/nonexistent/control.sock", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the parent"));
}

#[test]
fn metrics_name_each_instance() {
    let dir = TempDir::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let p = Parent::start_with(dir.path(), &["--metrics", &addr]);
    let a = p.ok(&["create", "--type", "vgpu-16m", "--uuid", U1]);
    p.ok(&["create", "--type", "vgpu-16m"]);
    let (mut c, _, _) = probe(Path::new(a.trim()));
    c.region_read(0, REG_ID, 4).unwrap();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(
        text.matches("# TYPE umdev_region_reads_total counter")
            .count(),
        1,
        "{text}"
    );
    let instances: std::collections::BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("umdev_region_reads_total{instance=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    assert_eq!(instances.len(), 2, "{text}");
    assert!(instances.contains(U1));
    assert!(
        text.lines().any(|l| l.starts_with(&format!(
            "umdev_region_reads_total{{instance=\"{U1}\",region=\"bar0\"}} "
        )) && !l.ends_with(" 0")),
        "{text}"
    );
}
