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

/// `umdev-vgpu-parent` on `dir/run`, with `dir/vgpu.json` as its config file
/// when `config`, the test's capacity and `extra`; its log in `dir/parent.log`
/// (appended: a restarted parent adds to it).
fn spawn_parent(dir: &Path, config: bool, extra: &[&str], notify: Option<&Path>) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("parent.log"))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_umdev-vgpu-parent"));
    cmd.arg("--state-dir").arg(dir.join("run"));
    if config {
        cmd.arg("--config").arg(dir.join("vgpu.json"));
    }
    if !extra.contains(&"--vram-mib") {
        cmd.args(["--vram-mib", "96"]);
    }
    cmd.args(["--contexts", "6", "--ggtt-entries", "262144"])
        .args(extra)
        .env("RUST_LOG", "debug")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
    cmd.spawn().expect("start umdev-vgpu-parent")
}

impl Parent {
    fn start(dir: &Path) -> Parent {
        Parent::start_with(dir, &[])
    }

    fn start_with(dir: &Path, extra: &[&str]) -> Parent {
        Parent::wait(dir, spawn_parent(dir, true, extra, None))
    }

    /// Waits until `child`'s control socket listens.
    fn wait(dir: &Path, child: Child) -> Parent {
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
        v.as_array()
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

    let big = p.json(&["create", "--type", "vgpu-64m"]);
    assert_eq!(big["type"], "vgpu-64m");
    assert_eq!(big["active"], true);
    let big = PathBuf::from(big["socket"].as_str().unwrap());
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
    let list = list.as_array().unwrap().clone();
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
    let uuid = p.json(&["list"])[0]["uuid"].as_str().unwrap().to_owned();
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

/// A control connection the parent serves: one it turns away (busy) is
/// answered at once, so a connection with nothing to read after 200 ms is
/// served; tried again for up to 5 s.
fn served_client(p: &Parent) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = UnixStream::connect(p.control()).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut c, &mut b) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                c.set_read_timeout(None).unwrap();
                return c;
            }
            _ => assert!(Instant::now() < deadline, "the parent stays busy"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_control_socket_answers_garbage_and_is_not_held_by_a_silent_client() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    // A client that never says anything does not hold up the others.
    let mut silent = UnixStream::connect(p.control()).unwrap();
    let t = Instant::now();
    assert!(p.ok(&["types"]).contains("vgpu-64m"));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());

    let mut s = UnixStream::connect(p.control()).unwrap();
    for bad in [
        &b"hello\n"[..],
        b"{\"cmd\":\"explode\"}\n",
        b"{\"cmd\":\"create\"}\n",
        b"{\"cmd\":\"create\",\"type\":\"vgpu-16m\",\"weight\":-1}\n",
        b"{\"cmd\":\"remove\",\"uuid\":\"../../etc/passwd\"}\n",
        b"\xff\xff\n",
        b"[1,2,3]\n",
        b"\n",
        b"\0\0\0\0\n",
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
    // The same connection still works after all that, pipelined requests too.
    let v = raw(&mut s, b"{\"cmd\":\"types\"}\n");
    assert_eq!(v["types"]["types"].as_array().unwrap().len(), 2);
    s.write_all(b"{\"cmd\":\"list\"}\n{\"cmd\":\"types\"}\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for want in ["list", "types"] {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(v[want].is_object(), "{want}: {v}");
    }

    drop((s, r));

    // More stalled clients than the parent serves at once (16: the silent
    // one, 14 more, one dripping a byte at a time, then 3 it turns away):
    // umdevctl still gets its answer (a busy parent is retried), and they
    // are all dropped within the deadline.
    // The dripping one first, and served: a parent still releasing the
    // connection just dropped (and umdevctl's) may turn one away meanwhile.
    let mut drip = served_client(&p);
    let mut stalled: Vec<UnixStream> = (0..14)
        .map(|_| UnixStream::connect(p.control()).unwrap())
        .collect();
    stalled.extend((0..3).map(|_| UnixStream::connect(p.control()).unwrap()));
    let dripping = std::thread::spawn(move || {
        let t = Instant::now();
        for _ in 0..40 {
            if drip.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let mut rest = String::new();
        let _ = drip.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = std::io::Read::read_to_string(&mut drip, &mut rest);
        (t.elapsed(), rest)
    });
    let t = Instant::now();
    assert!(p.ok(&["list"]).is_empty());
    assert!(t.elapsed() < Duration::from_secs(9), "{:?}", t.elapsed());
    let (took, said) = dripping.join().unwrap();
    assert!(took < Duration::from_secs(8), "the drip was held {took:?}");
    assert!(
        said.contains("no whole request line within 5 s"),
        "{said:?}"
    );
    // The first silent client was told and closed, well before 10 s.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut said = String::new();
    std::io::Read::read_to_string(&mut silent, &mut said).unwrap();
    assert!(said.contains("no whole request line"), "{said:?}");
    drop(stalled);
    // Nothing reachable: a clear sentence and a failure.
    let out = Command::new(env!("CARGO_BIN_EXE_umdevctl"))
        .args(["--control", "/nonexistent/control.sock", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the parent"));
    assert!(p.ok(&["types"]).contains("vgpu-16m"));
}

/// Each instance takes one VMM at a time (the next waits until it leaves),
/// and a VMM leaving one instance disturbs neither the other instance nor
/// its own: the next VMM finds a working device.
#[test]
fn one_vmm_at_a_time_and_one_leaving_disturbs_no_one() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    let a = PathBuf::from(p.ok(&["create", "--type", "vgpu-64m"]).trim());
    let b = PathBuf::from(p.ok(&["create", "--type", "vgpu-16m"]).trim());
    let (mut vmm_a, _, _) = probe(&a);
    let (vmm_b1, id, vram) = probe(&b);
    assert_eq!((id, vram), (ID_VALUE, 16 << 20));

    let (tx, rx) = std::sync::mpsc::channel();
    let b2 = b.clone();
    let waiter = std::thread::spawn(move || {
        let (c, id, vram) = probe(&b2);
        tx.send((id, vram)).unwrap();
        c
    });
    // B has its VMM: the second waits.
    assert!(rx.recv_timeout(Duration::from_millis(500)).is_err());
    assert_eq!(
        vmm_a.region_read(0, REG_ID, 4).unwrap(),
        ID_VALUE.to_le_bytes()
    );
    drop(vmm_b1);
    let (id, vram) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the next VMM is served once the first has left");
    assert_eq!((id, vram), (ID_VALUE, 16 << 20));
    let mut vmm_b2 = waiter.join().unwrap();
    assert_eq!(
        vmm_b2.region_read(0, REG_ID, 4).unwrap(),
        ID_VALUE.to_le_bytes()
    );
    // A never noticed; its BAR2 is still its type's.
    assert_eq!(
        vmm_a.region_read(0, REG_ID, 4).unwrap(),
        ID_VALUE.to_le_bytes()
    );
    assert_eq!(vmm_a.region_info(2).unwrap().info.size, 64 << 20);
    let list = p.json(&["list"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .all(|i| i["attached"] == true && i["active"] == true),
        "{list:?}"
    );
    // A VMM that leaves A without a word (its socket just closes) frees A only.
    drop(vmm_a);
    let (_again, id, _) = probe(&a);
    assert_eq!(id, ID_VALUE);
    assert_eq!(
        vmm_b2.region_read(0, REG_ID, 4).unwrap(),
        ID_VALUE.to_le_bytes()
    );
}

/// `--persist` needs a config file; a persistent definition that no longer
/// fits (the parent restarted with less VRAM) is kept, listed and written
/// back, refuses a create of its UUID, takes a weight, and `remove` drops it.
#[test]
fn persistence_needs_a_config_file_and_keeps_what_does_not_fit() {
    let dir = TempDir::new();
    let p = Parent::wait(dir.path(), spawn_parent(dir.path(), false, &[], None));
    p.refused(
        &["create", "--type", "vgpu-16m", "--persist"],
        "no config file",
    );
    assert!(
        p.ok(&["list"]).is_empty(),
        "nothing made by a refused create"
    );
    p.stop();

    let p = Parent::start(dir.path());
    p.ok(&["create", "--type", "vgpu-64m", "--uuid", U1, "--persist"]);
    p.stop();
    let p = Parent::start_with(dir.path(), &["--vram-mib", "32"]);
    let list = p.json(&["list"]);
    let one = &list.as_array().unwrap()[0];
    assert_eq!(one["uuid"], U1);
    assert_eq!(one["active"], false);
    let problem = one["problem"].as_str().unwrap();
    assert!(
        problem.contains("not made at start") && problem.contains("does not fit"),
        "{problem}"
    );
    assert!(p.ok(&["list"]).contains("inactive persistent"));
    assert_eq!(
        p.available(),
        vec![("vgpu-16m".to_string(), 2), ("vgpu-64m".to_string(), 0)]
    );
    p.refused(
        &["create", "--type", "vgpu-16m", "--uuid", U1],
        "defined but was not made at start",
    );
    let other = p.json(&["create", "--type", "vgpu-16m", "--persist"]);
    let other = other["uuid"].as_str().unwrap().to_owned();
    p.ok(&["set-weight", U1, "7"]);
    let config = std::fs::read_to_string(dir.path().join("vgpu.json")).unwrap();
    let file: serde_json::Value = serde_json::from_str(&config).unwrap();
    let defs = file["instances"].as_array().unwrap();
    assert_eq!(defs.len(), 2, "{config}");
    let kept = defs.iter().find(|d| d["uuid"] == U1).unwrap();
    assert_eq!(
        (&kept["type"], &kept["weight"]),
        (&"vgpu-64m".into(), &7.into())
    );
    p.ok(&["remove", U1]);
    let config = std::fs::read_to_string(dir.path().join("vgpu.json")).unwrap();
    assert!(!config.contains(U1) && config.contains(&other), "{config}");
    assert_eq!(p.ok(&["list"]).lines().count(), 1);
}

/// One parent per state directory; a parent killed outright leaves sockets
/// behind, which the next one clears.
#[test]
fn one_parent_per_state_dir_and_stale_sockets_go() {
    let dir = TempDir::new();
    let p = Parent::start(dir.path());
    let socket = PathBuf::from(p.ok(&["create", "--type", "vgpu-16m"]).trim());
    let out = Command::new(env!("CARGO_BIN_EXE_umdev-vgpu-parent"))
        .arg("--state-dir")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another umdev-vgpu-parent is using"), "{err}");
    // The first is untouched.
    assert_eq!(p.ok(&["list"]).lines().count(), 1);
    let (_c, id, _) = probe(&socket);
    assert_eq!(id, ID_VALUE);
    drop(_c);

    let mut p = p;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert!(socket.exists() && p.control().exists());
    drop(p);
    let p = Parent::start(dir.path());
    assert!(!socket.exists(), "the stale instance socket is still there");
    assert!(p.ok(&["list"]).is_empty());
}

/// Under systemd (`Type=notify`): READY=1 once the control socket answers.
#[test]
fn readiness_is_notified() {
    let dir = TempDir::new();
    let notify = dir.path().join("notify");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = spawn_parent(dir.path(), true, &[], Some(&notify));
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).expect("READY=1 within 10 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means answering, with no wait.
    let mut s = UnixStream::connect(dir.path().join("run/control.sock")).unwrap();
    let v = raw(&mut s, b"{\"cmd\":\"list\"}\n");
    assert_eq!(v["list"]["instances"], serde_json::json!([]));
    drop(Parent::wait(dir.path(), child));
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

/// Draws the test picture into VRAM through the engine and shows it: GGTT
/// entries 0.. map VRAM 0.., the scanout reads from aperture address 0.
fn show_picture(gpu: &mut umdev_vgpu::remote::Gpu) {
    use umdev_vgpu::picture;
    use umdev_vgpu::regs::*;
    const FB_VA: u64 = 0x1000_0000;
    const IMAGE_VA: u64 = 0x2000_0000;
    const SCRATCH_VA: u64 = 0x3000_0000;
    let bar = MMIO_BAR as u32;
    let fb_pages = (picture::FB_BYTES as u64).div_ceil(PAGE_SIZE);
    for i in 0..fb_pages {
        gpu.map_vram(FB_VA + i * PAGE_SIZE, i * PAGE_SIZE);
        let entry = (i * PAGE_SIZE) | PTE_PRESENT | PTE_VRAM;
        gpu.client
            .write_u64(bar, GGTT_OFFSET + 8 * i, entry)
            .unwrap();
    }
    let image = picture::image_bytes();
    let at = gpu.map_new(IMAGE_VA, (image.len() as u64).div_ceil(PAGE_SIZE), false);
    for (i, px) in image.chunks_exact(4).enumerate() {
        let v = u32::from_le_bytes(px.try_into().unwrap());
        gpu.ram.write_u32(at + 4 * i as u64, v);
    }
    gpu.map_new(SCRATCH_VA, 1, true);
    let targets = picture::DrawTargets {
        fb_va: FB_VA,
        image_va: IMAGE_VA,
        scratch_va: SCRATCH_VA,
    };
    gpu.run(&picture::commands(picture::SCENE, targets))
        .unwrap();
    let sc = |r| SCANOUT_BASE + r;
    let c = &mut gpu.client;
    c.write_u64(bar, sc(SCANOUT_FB_ADDR), 0).unwrap();
    c.write_u32(bar, sc(SCANOUT_FB_WIDTH), picture::WIDTH)
        .unwrap();
    c.write_u32(bar, sc(SCANOUT_FB_HEIGHT), picture::HEIGHT)
        .unwrap();
    c.write_u32(bar, sc(SCANOUT_FB_STRIDE), picture::STRIDE)
        .unwrap();
    c.write_u32(bar, sc(SCANOUT_FB_FORMAT), FB_FORMAT_XRGB8888)
        .unwrap();
    c.write_u32(bar, sc(SCANOUT_FB_ENABLE), 1).unwrap();
}

/// With `--vnc`, every instance serves its own scanout: `list` says where
/// (two instances, two addresses); a viewer of the instance whose guest shows
/// the test picture sees it pixel for pixel, a viewer of the other does not;
/// removing the instance closes its server.
#[test]
fn each_instance_serves_its_own_vnc_view() {
    use umdev::vnc::client::VncClient;
    use umdev::vnc::rfb::{ENCODING_DESKTOP_SIZE, ENCODING_ZRLE};
    use umdev::vnc::Listen;
    use umdev_vgpu::picture;

    let dir = TempDir::new();
    let p = Parent::start_with(dir.path(), &["--vnc", "127.0.0.1:0"]);
    let sockets: Vec<String> = (0..2)
        .map(|_| p.ok(&["create", "--type", "vgpu-16m"]).trim().to_owned())
        .collect();
    let list = p.json(&["list"]);
    let view = |socket: &str| -> (String, Listen) {
        let i = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["socket"] == socket)
            .unwrap_or_else(|| panic!("{socket} not in {list}"));
        let at = i["vnc"].as_str().unwrap_or_else(|| panic!("no vnc in {i}"));
        (i["uuid"].as_str().unwrap().to_owned(), at.parse().unwrap())
    };
    let ((uuid_a, at_a), (_, at_b)) = (view(&sockets[0]), view(&sockets[1]));
    assert_ne!(at_a, at_b);
    assert!(p.ok(&["list"]).contains(" vnc=127.0.0.1:"));

    let mut gpu = umdev_vgpu::remote::Gpu::new(Path::new(&sockets[0]), 8).unwrap();
    show_picture(&mut gpu);
    let want: Vec<u8> = {
        let fb = picture::render();
        (0..picture::HEIGHT as usize)
            .flat_map(|y| {
                let at = y * picture::STRIDE as usize;
                fb[at..at + 4 * picture::WIDTH as usize].to_vec()
            })
            .collect()
    };
    let mut a = VncClient::connect(&at_a, None).unwrap();
    assert!(a.name.contains(&uuid_a), "{}", a.name);
    a.set_encodings(&[ENCODING_ZRLE, ENCODING_DESKTOP_SIZE])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        a.request(true).unwrap();
        a.read_update().unwrap();
        let size = (a.frame.width, a.frame.height);
        if size == (picture::WIDTH, picture::HEIGHT) && a.frame.pixels == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "instance A's viewer never showed its picture"
        );
    }
    let mut b = VncClient::connect(&at_b, None).unwrap();
    b.request(false).unwrap();
    b.read_update().unwrap();
    assert!(
        b.frame.pixels != want,
        "instance B's viewer shows A's picture"
    );

    drop(gpu);
    p.ok(&["remove", "--force", &uuid_a]);
    assert!(
        VncClient::connect(&at_a, None).is_err(),
        "A's VNC server outlived it"
    );
}

/// A VNC port another process holds is passed over: the instance takes the
/// next slot's port instead of failing.
#[test]
fn a_vnc_port_held_elsewhere_is_passed_over() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = TempDir::new();
    let p = Parent::start_with(dir.path(), &["--vnc", &format!("127.0.0.1:{port}")]);
    p.ok(&["create", "--type", "vgpu-16m"]);
    let list = p.json(&["list"]);
    let at = list[0]["vnc"].as_str().unwrap_or_else(|| panic!("{list}"));
    let got: u16 = at.strip_prefix("127.0.0.1:").unwrap().parse().unwrap();
    assert!(got > port, "{at}, with {port} held");
    drop(held);
}
