//! Confinement: `umdev-edu` runs under its seccomp filter by default (every
//! thread), does all of its work that way, dies with a clear message on a call
//! outside the allow-list, and runs as an unprivileged user holding nothing but
//! its socket, the client's memory fds and interrupt eventfds.

use umdev_testkit as common;

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{wait_for, Backend, MemfdRam};
use umdev::vfio_user::wire::*;
use umdev::vfio_user::Client;
use umdev_edu::{reg, DMA_BUF_ADDR, DMA_CMD_RUN, DMA_CMD_TO_RAM, ID_VALUE};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BAR0: u32 = 0;
const RW: u32 = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;

/// Memory decoding and bus mastering on, as a guest driver would.
fn enable(c: &mut Client) {
    c.enable_device().unwrap();
}

/// `field:` of /proc/PID/task/TID/status for every thread of `pid`.
fn thread_status(pid: u32, field: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        for line in status.lines() {
            if let Some(v) = line.strip_prefix(field) {
                out.push(v.trim().to_string());
            }
        }
    }
    out
}

/// Exercises everything the backend does after start-up, including starting a
/// thread (the INTx resample watcher), and checks the device still answers.
fn full_session(c: &mut Client, ram: &MemfdRam) {
    enable(c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    c.dma_map(0x10_0000, ram.size as u64, Some(ram.fd()), 0, RW)
        .unwrap();
    c.write_u64(BAR0, reg::DMA_SRC, DMA_BUF_ADDR).unwrap();
    c.write_u64(BAR0, reg::DMA_DST, 0x10_0100).unwrap();
    c.write_u64(BAR0, reg::DMA_COUNT, 64).unwrap();
    c.write_u64(BAR0, reg::DMA_CMD, DMA_CMD_RUN | DMA_CMD_TO_RAM)
        .unwrap();
    wait_for(Duration::from_secs(5), || {
        (c.read_u64(BAR0, reg::DMA_CMD).unwrap() & DMA_CMD_RUN == 0).then_some(())
    });
    // Fd-less memory, reached only by DMA messages.
    c.dma_map(0x80_0000, 0x1000, None, 0, RW).unwrap();
    // INTx with an unmask eventfd: the session's event loop serves it.
    let intx = EventFd::new(EFD_NONBLOCK).unwrap();
    let resample = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(0, 0, &[intx.as_raw_fd()]).unwrap();
    c.set_irqs(
        0,
        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
        0,
        1,
        &[resample.as_raw_fd()],
        &[],
    )
    .unwrap();
    c.write_u32(BAR0, reg::IRQ_RAISE, 1).unwrap();
    wait_for(Duration::from_secs(5), || intx.read().ok());
    resample.write(1).unwrap();
    wait_for(Duration::from_secs(5), || intx.read().ok());
    c.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL).unwrap();
    c.reset().unwrap();
    enable(c);
    c.write_u32(BAR0, reg::LIVENESS, 0x55).unwrap();
    assert_eq!(c.read_u32(BAR0, reg::LIVENESS).unwrap(), !0x55);
}

#[test]
fn backend_runs_confined_by_default() {
    let mut be = Backend::edu();
    let pid = be.child.id();
    let ram = MemfdRam::new(0x10_0000);
    for _ in 0..2 {
        let mut c = be.connect();
        full_session(&mut c, &ram);
        // One thread serves the connection and this client's INTx unmask
        // eventfd (the session's event loop), and it is confined.
        let seccomp = thread_status(pid, "Seccomp:");
        assert_eq!(seccomp.len(), 1, "threads: {seccomp:?}");
        assert!(seccomp.iter().all(|s| s == "2"), "{seccomp:?}");
        assert!(thread_status(pid, "NoNewPrivs:").iter().all(|s| s == "1"));
    }
    assert!(be.alive(), "backend died:\n{}", be.log());
    assert!(be.log().contains("seccomp filter installed"));
    // SIGTERM still ends it cleanly, socket file removed, under the filter.
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let status = wait_for(Duration::from_secs(10), || be.child.try_wait().unwrap());
    assert!(status.success(), "{status:?}\n{}", be.log());
    assert!(!be.socket.exists());
}

#[test]
fn no_seccomp_leaves_the_backend_unconfined() {
    let be = Backend::start("umdev-edu", &["--no-seccomp"]);
    let mut c = be.connect();
    enable(&mut c);
    assert_eq!(c.read_u32(BAR0, reg::ID).unwrap(), ID_VALUE);
    let seccomp = thread_status(be.child.id(), "Seccomp:");
    assert!(seccomp.iter().all(|s| s == "0"), "{seccomp:?}");
    assert!(be.log().contains("seccomp filter disabled"));
}

const CHILD_ENV: &str = "UMDEV_SANDBOX_CHILD";

/// Runs only as the child of `a_denied_call_ends_the_process_with_a_message`:
/// confines this test process, checks what must keep working, then makes a
/// call outside the allow-list.
#[test]
fn sandbox_child() {
    let Ok(what) = std::env::var(CHILD_ENV) else {
        return;
    };
    umdev::sandbox::confine(true).unwrap();
    // Threads still start (clone3 answers ENOSYS, the C library uses clone).
    let t = std::thread::spawn(|| 6 * 7);
    println!("thread {}", t.join().unwrap());
    // prctl beyond thread names fails softly.
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    let err = std::io::Error::last_os_error().raw_os_error();
    println!("prctl {rc} {err:?}");
    // Opening files fails softly.
    let open = std::fs::File::open("/proc/self/status").map_err(|e| e.raw_os_error());
    println!("open {:?}", open.err());
    let _ = std::io::Write::flush(&mut std::io::stdout());
    match what.as_str() {
        // SAFETY: plain system calls with integer arguments; the filter ends
        // the process at the call.
        "socket" => unsafe {
            libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        },
        "execve" => {
            let _ = Command::new("/bin/true").status();
        }
        "fork" => unsafe {
            // SAFETY: as above; a fork the filter refuses returns nowhere.
            libc::fork();
        },
        _ => {}
    }
    println!("still alive");
}

#[test]
fn a_denied_call_ends_the_process_with_a_message() {
    for what in ["socket", "execve", "fork"] {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, what)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        use std::os::unix::process::ExitStatusExt;
        // A call made with every signal blocked (posix_spawn's clone) cannot run
        // the handler: the kernel ends the process with SIGSYS itself.
        let by_signal = out.status.signal() == Some(libc::SIGSYS);
        assert!(
            out.status.code() == Some(umdev::sandbox::DENIED_EXIT_STATUS) || by_signal,
            "{what}: {:?}\n{stdout}\n{stderr}",
            out.status
        );
        assert!(stdout.contains("thread 42"), "{what}: {stdout}");
        assert!(
            stdout.contains(&format!("prctl -1 Some({})", libc::EPERM)),
            "{what}: {stdout}"
        );
        assert!(
            stdout.contains(&format!("open Some(Some({}))", libc::EACCES)),
            "{what}: {stdout}"
        );
        assert!(!stdout.contains("still alive"), "{what}: {stdout}");
        assert!(
            by_signal
                || stderr.contains("umdev: seccomp: system call") && stderr.contains("denied"),
            "{what}: {stderr}"
        );
    }
}

/// Starts umdev-edu as `nobody` with only `fd` (as its fd 3), /dev/null and a
/// log file, and no environment: whatever else this test process has open
/// (cargo's jobserver pipe, other tests' descriptors) is closed before exec.
fn spawn_unprivileged(fd: RawFd, dir: &Path, log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    // A copy in the (world-readable) test directory: the checkout itself may sit
    // where `nobody` cannot reach it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("umdev-edu");
    std::fs::copy(common::workspace_bin("umdev-edu"), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = Command::new(&bin);
    cmd.args(["--fd", "3"])
        .env_clear()
        .env("RUST_LOG", "info")
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    common::pass_as_fd3(&mut cmd, fd, true);
    // Another test thread forking while the copy was open for writing makes
    // exec fail with ETXTBSY until that child has exec'd: retry briefly.
    for _ in 0..50 {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
    panic!("{} stayed busy", bin.display());
}

/// What each open fd of `pid` is.
fn fd_links(pid: u32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(e.path()).ok()?;
            Some((n, link.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn runs_as_an_unprivileged_user_with_only_its_socket_and_memory() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: changing to another user needs root");
        return;
    }
    let dir = common::TempDir::new();
    let log = dir.path().join("backend.log");
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut child = spawn_unprivileged(theirs.as_raw_fd(), dir.path(), &log);
    drop(theirs);
    let pid = child.id();
    let mut c = common::client_on(ours);
    let ram = MemfdRam::new(0x10_0000);
    full_session(&mut c, &ram);
    c.dma_map(0x10_0000, 0x10_0000, Some(ram.fd()), 0, RW)
        .unwrap();
    let msi = EventFd::new(EFD_NONBLOCK).unwrap();
    c.set_irq_eventfds(1, 0, &[msi.as_raw_fd()]).unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "65534 65534 65534 65534");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534");
    assert_eq!(field("Groups:"), "");
    assert_eq!(field("CapEff:"), "0000000000000000");
    assert_eq!(field("CapPrm:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2");
    // Its fds: stdio, the socket, the client's memory and interrupt eventfds,
    // and the session's epoll once a helper fd (INTx unmask) came.
    let fds = fd_links(pid);
    let log_path = log.to_string_lossy().into_owned();
    for (n, link) in &fds {
        let expected = match n {
            0 | 1 => link == "/dev/null",
            2 => *link == log_path,
            _ => {
                link.starts_with("socket:[")
                    || link.starts_with("/memfd:guest-ram")
                    || link == "anon_inode:[eventfd]"
                    || link == "anon_inode:[eventpoll]"
            }
        };
        assert!(expected, "fd {n} -> {link}; all: {fds:?}");
    }
    // One connection (the writer half is a dup of the same socket).
    let mut sockets: Vec<&String> = fds
        .iter()
        .filter(|(_, l)| l.starts_with("socket:"))
        .map(|(_, l)| l)
        .collect();
    sockets.dedup();
    assert_eq!(sockets.len(), 1, "{fds:?}");
    assert!(fds.iter().any(|(_, l)| l.starts_with("/memfd:guest-ram")));
    drop(c);
    let status = wait_for(Duration::from_secs(10), || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}\n{}", log_text());
}
