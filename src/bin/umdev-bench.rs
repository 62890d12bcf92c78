//! `umdev-bench`: what a trapped guest access costs through a vfio-user server,
//! next to the cost of the bare socket round trip underneath it.
//!
//! Every figure is measured twice, alternately, in several repetitions: once
//! against the server, once against the *floor*, a trivial echo thread on a
//! socketpair that exchanges the same byte counts (and fds) in the same pattern,
//! with the same system calls on the client side, pinned as the server is. The
//! median rate of each and their ratio are printed.
//!
//! By default the workspace's `umdev-edu` is started (pinned with
//! `sched_setaffinity` when `--pin`/`--server-pin` are given); `--socket-path`
//! points at any running vfio-user server instead, which this program cannot pin.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use umdev::benchmark::{machine, Device};

use clap::Parser;
use umdev::memory::GuestMemory;
use umdev::pci::{BarDef, BarIndex, PciDevice, PciDeviceDescription, PciFunction, PciIds};
use umdev::vfio_user::caps::Capabilities;
use umdev::vfio_user::client::{ClientError, DmaTarget};
use umdev::vfio_user::socket::{recv_with_fds, send_all, send_small, SMALL_MESSAGE};
use umdev::vfio_user::wire::{self, *};
use umdev::vfio_user::Server;
use umdev::vfio_user::{Client, ServerConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Round trips, posted writes, DMA map/unmap and server-initiated DMA of a
/// vfio-user server, each beside the socket floor.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Benchmark the vfio-user server listening here instead of starting
    /// umdev-edu. Only the client (and the floor) can be pinned then.
    #[arg(long)]
    socket_path: Option<PathBuf>,
    /// Device binary started when no --socket-path is given [default: umdev-edu
    /// next to this program].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Serve from a thread of this process instead: umdev's server with a small
    /// register-file device (no DMA engine), the floor's echo a thread too.
    #[arg(long, conflicts_with_all = ["socket_path", "server_bin"])]
    in_process: bool,
    /// Extra argument for the started server (repeat for several).
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// CPU for the client, and for the server and the floor's echo thread unless
    /// --server-pin says otherwise.
    #[arg(long, value_name = "CPU")]
    pin: Option<usize>,
    /// CPU for the server (and the floor's echo thread), e.g. to measure across CPUs.
    #[arg(long, value_name = "CPU")]
    server_pin: Option<usize>,
    /// Short run for CI: few repetitions and iterations (figures are rough).
    #[arg(long)]
    quick: bool,
    /// Repetitions per figure (medians are reported) [default: 11, quick: 3].
    #[arg(long)]
    reps: Option<usize>,
    /// Round trips per repetition [default: 10000, quick: 300].
    #[arg(long)]
    iterations: Option<u64>,
    /// Regions already mapped for the DMA map/unmap figures.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    regions: Vec<usize>,
    /// Region of the BAR figures.
    #[arg(long, default_value_t = 0)]
    bar: u32,
    /// BAR offset of the 4-byte accesses (edu: the liveness register).
    #[arg(long, default_value = "0x04", value_parser = parse_u64)]
    bar_offset4: u64,
    /// BAR offset of the 8-byte accesses (edu: the DMA source address).
    #[arg(long, default_value = "0x80", value_parser = parse_u64)]
    bar_offset8: u64,
    /// Skip the DMA engine figures (they need edu's registers; skipped anyway
    /// when the device is not 1234:11e8).
    #[arg(long)]
    no_dma_engine: bool,
    /// Layout of the server's DMA_READ/DMA_WRITE messages (spec or qemu-10).
    #[arg(long, default_value = "spec")]
    dma_layout: DmaLayout,
    /// Also print the table in Markdown.
    #[arg(long)]
    markdown: bool,
    /// Only measure the figures whose name contains this text.
    #[arg(long)]
    only: Option<String>,
    /// Where the floor's echo runs [default: process, as the server is one;
    /// thread with --in-process].
    #[arg(long, value_enum)]
    floor_echo: Option<EchoKind>,
    /// How the floor reads: into its buffer whatever is there, as a server
    /// must (buffer), or exactly the bytes it knows come next (exact).
    #[arg(long, value_enum, default_value = "buffer")]
    floor_read: FloorRead,
    /// Idle threads the floor's echo process starts before it echoes, sharing
    /// its fd table as a backend's threads do (umdev-edu has 3 threads: 2 here).
    /// 0, the default, is the single-threaded echo. See docs/performance.md.
    #[arg(long, default_value_t = 0)]
    floor_echo_threads: usize,
    /// Internal: run as the floor's echo process on this inherited socket fd.
    #[arg(long, hide = true)]
    echo_child: Option<RawFd>,
    /// Internal: the echo process's plan.
    #[arg(long, hide = true)]
    echo_plan: Option<String>,
}

fn parse_u64(s: &str) -> std::result::Result<u64, String> {
    let r = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e}"))
}

#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("vfio-user: {0}")]
    Client(#[from] ClientError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}

type Result<T> = std::result::Result<T, BenchError>;

// ---- pinning ---------------------------------------------------------------

fn cpu_set(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set, and
    // CPU_SET only sets a bit inside it (it checks the index against its size).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

/// Pins the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: sched_setaffinity on the calling thread (pid 0) with a set that
    // lives on our stack and whose size we pass.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(BenchError::Setup(format!(
            "pinning to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

// ---- the floor -------------------------------------------------------------

/// One step of a floor script, seen from the client: it sends `sends` (each one
/// write, some with an fd attached), then waits for `recv` bytes.
#[derive(Clone, Debug)]
struct Phase {
    sends: Vec<(usize, bool)>,
    recv: usize,
}

impl Phase {
    fn rt(send: usize, recv: usize) -> Phase {
        Phase {
            sends: vec![(send, false)],
            recv,
        }
    }
}

/// Where the floor's echo runs: a thread of this process (as an in-process
/// server would), or a process of its own (as a server process: every switch
/// between client and server then changes address space, which costs more).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum EchoKind {
    Thread,
    Process,
}

/// How the floor reads. A server cannot know where the next message ends before
/// its header is in, so it reads into its buffer whatever the socket holds, and
/// umdev does so; `buffer` makes the floor read the same way. `exact` lets the
/// floor read precisely the bytes its script says come next, which no vfio-user
/// server can do: a kernel read that asks for more than is queued walks the
/// queue once more, which costs about 3% of a round trip here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum FloorRead {
    Buffer,
    Exact,
}

enum Echo {
    Thread(JoinHandle<()>),
    Process(Child),
}

/// The socket floor: the client end of a socketpair whose other end is a
/// trivial echo playing the server's part of a script.
struct Floor {
    stream: UnixStream,
    script: Vec<Phase>,
    fd: RawFd,
    buf: Vec<u8>,
    exact: bool,
    echo: Option<Echo>,
}

/// Buffer the floor's two ends read into (umdev's reader starts with 64 KiB).
const READ_BUF: usize = 64 * 1024;

/// What the echo does per phase: read this many bytes, then write that many.
type EchoPlan = Vec<(usize, usize)>;

fn plan_to_arg(plan: &EchoPlan) -> String {
    let parts: Vec<String> = plan.iter().map(|(a, b)| format!("{a}:{b}")).collect();
    parts.join(",")
}

fn plan_from_arg(s: &str) -> Option<EchoPlan> {
    s.split(',')
        .map(|p| {
            let (a, b) = p.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect()
}

impl Floor {
    /// `fd` is attached to the sends that carry one.
    fn start(
        script: Vec<Phase>,
        kind: EchoKind,
        read: FloorRead,
        echo_cpu: Option<usize>,
        echo_threads: usize,
        fd: RawFd,
    ) -> Result<Floor> {
        let exact = read == FloorRead::Exact;
        let (client, server) = UnixStream::pair()?;
        let plan: EchoPlan = script
            .iter()
            .map(|p| (p.sends.iter().map(|s| s.0).sum(), p.recv))
            .collect();
        let echo = match kind {
            EchoKind::Thread => Echo::Thread(
                std::thread::Builder::new()
                    .name("floor-echo".into())
                    .spawn(move || {
                        if let Some(cpu) = echo_cpu {
                            if let Err(e) = pin_current_thread(cpu) {
                                eprintln!("floor echo: {e}");
                            }
                        }
                        echo_loop(server, &plan, exact);
                    })?,
            ),
            EchoKind::Process => {
                let raw = server.as_raw_fd();
                let mut cmd = std::process::Command::new(std::env::current_exe()?);
                cmd.arg("--echo-child")
                    .arg(raw.to_string())
                    .arg("--echo-plan")
                    .arg(plan_to_arg(&plan))
                    .stdin(Stdio::null());
                if let Some(cpu) = echo_cpu {
                    cmd.arg("--pin").arg(cpu.to_string());
                }
                if exact {
                    cmd.arg("--floor-read").arg("exact");
                }
                if echo_threads > 0 {
                    cmd.arg("--floor-echo-threads")
                        .arg(echo_threads.to_string());
                }
                // SAFETY: runs in the child between fork and exec and makes one
                // async-signal-safe system call: it clears close-on-exec on the
                // child's copy of the echo's socket so the new program inherits it.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::fcntl(raw, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn()?;
                drop(server);
                Echo::Process(child)
            }
        };
        let biggest = script
            .iter()
            .flat_map(|p| p.sends.iter().map(|s| s.0).chain([p.recv]))
            .max()
            .unwrap_or(0);
        Ok(Floor {
            stream: client,
            script,
            fd,
            buf: vec![0; biggest.max(READ_BUF)],
            exact,
            echo: Some(echo),
        })
    }

    /// Plays the script `rounds` times.
    fn run(&mut self, rounds: u64) -> Result<Duration> {
        let fd = self.stream.as_raw_fd();
        let t = Instant::now();
        for _ in 0..rounds {
            for phase in &self.script {
                // The system calls umdev's MessageWriter makes for the same message.
                for &(len, with_fd) in &phase.sends {
                    let fds: &[RawFd] = if with_fd { &[self.fd] } else { &[] };
                    send_message(fd, &self.buf[..len], fds)?;
                }
                let mut got = 0;
                while got < phase.recv {
                    let until = if self.exact {
                        phase.recv
                    } else {
                        self.buf.len()
                    };
                    let (n, _, _) = recv_with_fds(fd, &mut self.buf[got..until])?;
                    if n == 0 {
                        return Err(BenchError::Setup("floor echo went away".into()));
                    }
                    got += n;
                }
            }
        }
        Ok(t.elapsed())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        match self.echo.take() {
            Some(Echo::Thread(t)) => {
                let _ = t.join();
            }
            Some(Echo::Process(mut child)) => {
                let _ = child.wait();
            }
            None => {}
        }
    }
}

/// The server side of the floor: reads what each phase sends (closing any fds),
/// answers with the phase's reply bytes in one write.
fn echo_loop(mut stream: UnixStream, plan: &EchoPlan, exact: bool) {
    let mut buf = vec![0u8; READ_BUF];
    let reply_len = plan.iter().map(|p| p.1).max().unwrap_or(0);
    let reply = vec![0u8; reply_len];
    let fd = stream.as_raw_fd();
    // Bytes read beyond one phase count for the next.
    let mut carry = 0;
    loop {
        for &(want, recv) in plan {
            let mut got = carry;
            while got < want {
                let room = if exact { want - got } else { buf.len() }.min(buf.len());
                // Received fds are dropped (closed) right away.
                match recv_with_fds(fd, &mut buf[..room]) {
                    Ok((0, _, _)) | Err(_) => return,
                    Ok((n, _, _)) => got += n,
                }
            }
            carry = got - want;
            if recv > 0 && stream.write_all(&reply[..recv]).is_err() {
                return;
            }
        }
    }
}

// ---- figures ---------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Unit {
    /// Operations per second, with the time one takes.
    Ops,
    /// Bytes per second.
    Bytes,
}

struct Figure {
    name: String,
    unit: Unit,
    /// Median rate (per second) against the server, and against the floor.
    server: Option<f64>,
    floor: Option<f64>,
    /// Median over the repetitions of server rate / floor rate, each pair
    /// measured back to back.
    ratio: Option<f64>,
    note: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn fmt_rate(rate: Option<f64>, unit: Unit) -> String {
    let Some(r) = rate else {
        return "-".into();
    };
    match unit {
        Unit::Ops => {
            let per = 1e6 / r;
            if r >= 1e6 {
                format!("{:.2} M/s ({per:.3} us)", r / 1e6)
            } else {
                format!("{:.1} k/s ({per:.2} us)", r / 1e3)
            }
        }
        Unit::Bytes => format!("{:.1} MiB/s", r / (1 << 20) as f64),
    }
}

struct Bench {
    args: Args,
    reps: usize,
    iterations: u64,
    echo_cpu: Option<usize>,
    echo_kind: EchoKind,
    client: Client,
    /// Memory the DMA map figures share (one page per region).
    memfd: File,
    figures: Vec<Figure>,
}

/// What one repetition of a figure does against the server: `n` units of work,
/// returning the time they took.
type ServerRun<'a> = dyn FnMut(&mut Client, u64) -> Result<Duration> + 'a;

impl Bench {
    /// Measures one figure: `reps` alternating repetitions against the floor and
    /// the server, after one warm-up of each. `units` is how many units of the
    /// figure's rate one call covers for `n`; the floor plays its script `n` times.
    #[allow(clippy::too_many_arguments)]
    fn figure(
        &mut self,
        name: &str,
        unit: Unit,
        n: u64,
        units_per_n: f64,
        script: Option<Vec<Phase>>,
        run: &mut ServerRun<'_>,
        note: &str,
    ) -> Option<f64> {
        if let Some(only) = &self.args.only {
            if !name.contains(only.as_str()) {
                return None;
            }
        }
        let mut floor = match script
            .map(|s| {
                Floor::start(
                    s,
                    self.echo_kind,
                    self.args.floor_read,
                    self.echo_cpu,
                    self.args.floor_echo_threads,
                    self.memfd.as_raw_fd(),
                )
            })
            .transpose()
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("{name}: floor: {e}");
                None
            }
        };
        let warm = (n / 10).max(1);
        let mut failed = None;
        if let Err(e) = run(&mut self.client, warm) {
            failed = Some(e.to_string());
        }
        if let Some(f) = floor.as_mut() {
            let _ = f.run(warm);
        }
        let (mut srv, mut flr, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        let rate = |d: Duration| n as f64 * units_per_n / d.as_secs_f64();
        for rep in 0..self.reps {
            // Floor and server back to back, in alternating order, so load that
            // comes and goes hits both alike; their ratio is taken per pair.
            let (mut f_rate, mut s_rate) = (None, None);
            for turn in 0..2 {
                if (turn == 0) == (rep % 2 == 0) {
                    if let Some(f) = floor.as_mut() {
                        match f.run(n) {
                            Ok(d) => f_rate = Some(rate(d)),
                            Err(e) => eprintln!("{name}: floor: {e}"),
                        }
                    }
                } else if failed.is_none() {
                    match run(&mut self.client, n) {
                        Ok(d) => s_rate = Some(rate(d)),
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
            }
            flr.extend(f_rate);
            srv.extend(s_rate);
            if let (Some(f), Some(s)) = (f_rate, s_rate) {
                ratios.push(s / f);
            }
        }
        let mut note = note.to_string();
        if let Some(e) = failed {
            eprintln!("{name}: {e}");
            note = format!("failed: {e}");
            srv.clear();
            ratios.clear();
        }
        let fig = Figure {
            name: name.into(),
            unit,
            server: median(srv),
            floor: median(flr),
            ratio: median(ratios),
            note,
        };
        println!(
            "{:<44} {:>24} {:>24} {:>6}  {}",
            fig.name,
            fmt_rate(fig.server, unit),
            fmt_rate(fig.floor, unit),
            fig.ratio.map_or("-".into(), |r| format!("{r:.3}")),
            fig.note
        );
        let rate = fig.server;
        self.figures.push(fig);
        rate
    }
}

const CONFIG: u32 = PCI_CONFIG_REGION_INDEX;
const HDR: usize = HEADER_SIZE;
const ACCESS: usize = std::mem::size_of::<RegionAccess>();

/// Bytes of a REGION_READ of `count` bytes: (request, reply).
fn read_sizes(count: usize) -> (usize, usize) {
    (HDR + ACCESS, HDR + ACCESS + count)
}

/// Bytes of a REGION_WRITE of `count` bytes: (request, reply).
fn write_sizes(count: usize) -> (usize, usize) {
    (HDR + ACCESS + count, HDR + ACCESS)
}

/// A request encoded once, as a VMM's vCPU thread sends it; only its id changes.
fn encode(command: Command, no_reply: bool, parts: &[&[u8]]) -> Vec<u8> {
    let size = HDR + parts.iter().map(|p| p.len()).sum::<usize>();
    let header = Header {
        msg_id: 0,
        command: command as u16,
        size: size as u32,
        flags: FLAGS_TYPE_COMMAND | if no_reply { FLAGS_NO_REPLY } else { 0 },
        error: 0,
    };
    let mut bytes = header.as_bytes().to_vec();
    for p in parts {
        bytes.extend_from_slice(p);
    }
    bytes
}

/// Sends one message with the system call umdev's MessageWriter uses for it.
fn send_message(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> Result<()> {
    if fds.is_empty() && bytes.len() <= SMALL_MESSAGE {
        send_small(fd, bytes)?;
    } else {
        send_all(fd, &mut [IoSlice::new(bytes)], fds)?;
    }
    Ok(())
}

/// Reads the reply to message `id`, `expect` bytes long, into `buf` with
/// recvmsg (asking for the whole buffer, as umdev's reader and the floor do),
/// and checks it.
fn wire_reply(fd: RawFd, buf: &mut [u8], expect: usize, id: u16) -> Result<()> {
    let mut got = 0;
    loop {
        let (n, _, _) = recv_with_fds(fd, &mut buf[got..])?;
        if n == 0 {
            return Err(BenchError::Setup("server closed the connection".into()));
        }
        got += n;
        if got < HDR {
            continue;
        }
        let h = Header::read_from(buf).unwrap_or_default();
        if h.is_error() || !h.is_reply() || h.msg_id != id {
            return Err(BenchError::Setup(format!(
                "unexpected reply: id {} (want {id}), flags {:#x}, errno {}",
                h.msg_id, h.flags, h.error
            )));
        }
        if h.size as usize != expect || got > expect {
            return Err(BenchError::Setup(format!(
                "reply of {} bytes ({got} read), want {expect}",
                h.size
            )));
        }
        if got == expect {
            return Ok(());
        }
    }
}

/// `n` round trips of `request`, whose reply is `reply_len` bytes, sent and
/// received with the same system calls as the floor's client (no client-library
/// bookkeeping): the server's own cost against the floor's.
fn wire_round_trips(c: &Client, request: &[u8], reply_len: usize, n: u64) -> Result<Duration> {
    let fd = c.stream().as_raw_fd();
    let mut req = request.to_vec();
    let mut reply = vec![0u8; READ_BUF];
    let t = Instant::now();
    for i in 0..n {
        let id = i as u16;
        req[..2].copy_from_slice(&id.to_le_bytes());
        send_message(fd, &req, &[])?;
        wire_reply(fd, &mut reply, reply_len, id)?;
    }
    Ok(t.elapsed())
}

fn round_trips(b: &mut Bench) {
    let n = b.iterations;
    let bar = b.args.bar;
    let (o4, o8) = (b.args.bar_offset4, b.args.bar_offset8);
    // Values written back where they were read, so writes change nothing.
    let cfg4 = b.client.region_read(CONFIG, 0x3c, 4).unwrap_or(vec![0; 4]);
    let cfg8 = b.client.region_read(CONFIG, 0x10, 8).unwrap_or(vec![0; 8]);
    let bar4 = b.client.region_read(bar, o4, 4).unwrap_or(vec![0; 4]);
    let bar8 = b.client.region_read(bar, o8, 8).unwrap_or(vec![0; 8]);
    let access = |region, offset, count: usize| RegionAccess {
        offset,
        region,
        count: count as u32,
    };
    let mut rows: Vec<(String, Vec<u8>, usize)> = Vec::new();
    for (region, offset, count) in [(CONFIG, 0, 4), (CONFIG, 0, 8), (bar, o4, 4), (bar, o8, 8)] {
        let req = encode(
            Command::RegionRead,
            false,
            &[access(region, offset, count).as_bytes()],
        );
        rows.push((
            format!("REGION_READ {count} B {}", where_(region, offset)),
            req,
            read_sizes(count).1,
        ));
    }
    for (region, offset, value) in [
        (CONFIG, 0x3c, cfg4),
        (CONFIG, 0x10, cfg8),
        (bar, o4, bar4),
        (bar, o8, bar8),
    ] {
        let req = encode(
            Command::RegionWrite,
            false,
            &[access(region, offset, value.len()).as_bytes(), &value],
        );
        rows.push((
            format!("REGION_WRITE {} B {}", value.len(), where_(region, offset)),
            req,
            write_sizes(value.len()).1,
        ));
    }
    for (name, req, reply_len) in rows {
        let script = vec![Phase::rt(req.len(), reply_len)];
        let mut run = |c: &mut Client, n: u64| wire_round_trips(c, &req, reply_len, n);
        b.figure(&name, Unit::Ops, n, 1.0, Some(script), &mut run, "");
    }
    // The same read through the client library, for what its bookkeeping costs.
    let (rq, rp) = read_sizes(4);
    let mut run = |c: &mut Client, n: u64| -> Result<Duration> {
        let mut data = [0u8; 4];
        let t = Instant::now();
        for _ in 0..n {
            c.region_read_into(CONFIG, 0, &mut data)?;
        }
        Ok(t.elapsed())
    };
    b.figure(
        "REGION_READ 4 B config space @0x0, umdev::Client",
        Unit::Ops,
        n,
        1.0,
        Some(vec![Phase::rt(rq, rp)]),
        &mut run,
        "client library on the client side",
    );
}

/// "config space @0x10" or "BAR0 @0x4".
fn where_(region: u32, offset: u64) -> String {
    if region == CONFIG {
        format!("config space @{offset:#x}")
    } else {
        format!("BAR{region} @{offset:#x}")
    }
}

/// Posted (no-reply) writes, then one read that drains them.
fn posted_writes(b: &mut Bench) {
    let bar = b.args.bar;
    let offset = b.args.bar_offset4;
    let batch: u64 = 1000;
    let rounds = (b.iterations / 10).max(1);
    let value = b.client.region_read(bar, offset, 4).unwrap_or(vec![0; 4]);
    let access = |count: usize| RegionAccess {
        offset,
        region: bar,
        count: count as u32,
    };
    let posted = encode(Command::RegionWrite, true, &[access(4).as_bytes(), &value]);
    let drain = encode(Command::RegionRead, false, &[access(4).as_bytes()]);
    let drain_reply = read_sizes(4).1;
    let mut sends = vec![(posted.len(), false); batch as usize];
    sends.push((drain.len(), false));
    let mut run = |c: &mut Client, n: u64| -> Result<Duration> {
        posted_then_drain(c, &posted, batch, &drain, drain_reply, n)
    };
    b.figure(
        &format!("posted REGION_WRITE 4 B BAR{bar} @{offset:#x}"),
        Unit::Ops,
        rounds,
        batch as f64,
        Some(vec![Phase {
            sends,
            recv: drain_reply,
        }]),
        &mut run,
        "1000 posted, then 1 read",
    );

    let offered = b.client.server_caps().is_some_and(|c| c.write_multiple);
    let entries = 16usize;
    let mut body = WriteMultiHeader {
        wr_cnt: entries as u64,
    }
    .as_bytes()
    .to_vec();
    for _ in 0..entries {
        let mut e = WriteMultiEntry {
            offset,
            region: bar,
            count: 4,
            data: [0; WRITE_MULTI_DATA],
        };
        e.data[..4].copy_from_slice(&value);
        body.extend_from_slice(e.as_bytes());
    }
    let messages: u64 = 100;
    let name = format!("posted REGION_WRITE_MULTI x{entries} 4 B BAR{bar}");
    if !offered {
        println!("{name:<44} not offered by the server (caps write_multiple)");
        return;
    }
    let multi = encode(Command::RegionWriteMulti, true, &[&body]);
    let mut sends = vec![(multi.len(), false); messages as usize];
    sends.push((drain.len(), false));
    let mut run = |c: &mut Client, n: u64| -> Result<Duration> {
        posted_then_drain(c, &multi, messages, &drain, drain_reply, n)
    };
    b.figure(
        &name,
        Unit::Ops,
        rounds,
        (messages as usize * entries) as f64,
        Some(vec![Phase {
            sends,
            recv: drain_reply,
        }]),
        &mut run,
        "100 messages, then 1 read",
    );
}

/// `n` times: `count` posted messages, then a read whose reply says the server
/// has handled them all.
fn posted_then_drain(
    c: &Client,
    posted: &[u8],
    count: u64,
    drain: &[u8],
    drain_reply: usize,
    n: u64,
) -> Result<Duration> {
    let fd = c.stream().as_raw_fd();
    let mut posted = posted.to_vec();
    let mut drain = drain.to_vec();
    let mut reply = vec![0u8; READ_BUF];
    let mut id = 0u16;
    let t = Instant::now();
    for _ in 0..n {
        for _ in 0..count {
            posted[..2].copy_from_slice(&id.to_le_bytes());
            send_message(fd, &posted, &[])?;
            id = id.wrapping_add(1);
        }
        drain[..2].copy_from_slice(&id.to_le_bytes());
        send_message(fd, &drain, &[])?;
        wire_reply(fd, &mut reply, drain_reply, id)?;
        id = id.wrapping_add(1);
    }
    Ok(t.elapsed())
}

const PAGE: u64 = 4096;
/// Where the DMA map figures place their regions.
const MAP_BASE: u64 = 1 << 32;

fn dma_maps(b: &mut Bench) -> Result<()> {
    let limit = b.client.server_caps().map_or(u32::MAX, |c| c.max_dma_maps) as usize;
    let mut counts: Vec<usize> = b.args.regions.clone();
    counts.sort_unstable();
    counts.dedup();
    let most = counts.last().copied().unwrap_or(0);
    b.memfd.set_len((most as u64 + 1) * PAGE)?;
    let fd = b.memfd.as_raw_fd();
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    let extra_gpa = MAP_BASE + (most as u64 + 16) * PAGE;
    let extra_offset = most as u64 * PAGE;
    let map_req = HDR + std::mem::size_of::<DmaMap>();
    let unmap = HDR + std::mem::size_of::<DmaUnmap>();
    let script = vec![
        Phase {
            sends: vec![(map_req, true)],
            recv: HDR,
        },
        Phase::rt(unmap, unmap),
    ];
    let n = (b.iterations / 10).max(20);
    let mut mapped = 0usize;
    let mut rates = Vec::new();
    for &count in &counts {
        let name = format!("DMA_MAP+DMA_UNMAP, {count} regions mapped");
        if count + 1 > limit {
            println!("{name:<44} skipped: server allows {limit} regions");
            continue;
        }
        let t = Instant::now();
        while mapped < count {
            let gpa = MAP_BASE + mapped as u64 * PAGE;
            b.client
                .dma_map(gpa, PAGE, Some(fd), mapped as u64 * PAGE, rw)?;
            mapped += 1;
        }
        let setup = t.elapsed();
        let mut run = |c: &mut Client, n: u64| -> Result<Duration> {
            let t = Instant::now();
            for _ in 0..n {
                c.dma_map(extra_gpa, PAGE, Some(fd), extra_offset, rw)?;
                c.dma_unmap(extra_gpa, PAGE, 0)?;
            }
            Ok(t.elapsed())
        };
        b.figure(
            &name,
            Unit::Ops,
            n,
            1.0,
            Some(script.clone()),
            &mut run,
            &format!("4 KiB memfd regions; set-up {:.2} s", setup.as_secs_f64()),
        );
        if let Some(f) = b.figures.last().filter(|f| f.name == name) {
            if let (Some(rate), Some(ratio)) = (f.server, f.ratio) {
                rates.push((count, rate, ratio));
            }
        }
    }
    if let (Some(first), Some(last)) = (rates.first(), rates.last()) {
        if rates.len() > 1 {
            // The second figure divides out load that changed between the two.
            println!(
                "  map+unmap at {} regions: {:.2}x the rate at {}; {:.2}x against the floor measured alongside",
                last.0,
                last.1 / first.1,
                first.0,
                last.2 / first.2
            );
        }
    }
    b.client.dma_unmap(0, 0, DMA_UNMAP_FLAG_ALL)?;
    Ok(())
}

// ---- server-initiated DMA through edu's DMA engine ---------------------------

mod edu {
    pub const DMA_SRC: u64 = 0x80;
    pub const DMA_DST: u64 = 0x88;
    pub const DMA_COUNT: u64 = 0x90;
    pub const DMA_CMD: u64 = 0x98;
    pub const CMD_RUN: u64 = 0x1;
    pub const CMD_TO_RAM: u64 = 0x2;
    pub const CMD_IRQ: u64 = 0x4;
    pub const BUF_ADDR: u64 = 0x40000;
    pub const BUF_SIZE: usize = 4096;
}

/// Guest RAM on the client side, served to the server's DMA_READ/DMA_WRITE.
struct ClientRam {
    base: u64,
    bytes: Vec<u8>,
}

impl ClientRam {
    /// Where `[gpa, gpa+len)` is in `bytes`; EFAULT if not all of it is.
    fn range(&self, gpa: u64, len: usize) -> std::result::Result<std::ops::Range<usize>, u32> {
        let efault = libc::EFAULT as u32;
        let at = gpa.checked_sub(self.base).ok_or(efault)? as usize;
        let end = at.checked_add(len).ok_or(efault)?;
        if end > self.bytes.len() {
            return Err(efault);
        }
        Ok(at..end)
    }
}

impl DmaTarget for ClientRam {
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> std::result::Result<(), u32> {
        let r = self.range(gpa, buf.len())?;
        buf.copy_from_slice(&self.bytes[r]);
        Ok(())
    }

    fn write(&mut self, gpa: u64, data: &[u8]) -> std::result::Result<(), u32> {
        let r = self.range(gpa, data.len())?;
        self.bytes[r].copy_from_slice(data);
        Ok(())
    }
}

/// Guest address of the fd-less region (below edu's 28-bit DMA mask).
const DMA_GPA: u64 = 0x0100_0000;
const MIB: usize = 1 << 20;

/// Enables MSI in config space and hands the server an eventfd for vector 0.
fn enable_msi(c: &mut Client) -> Result<EventFd> {
    let mut at = c.region_read(CONFIG, 0x34, 1)?[0] as u64;
    let mut hops = 0;
    while at != 0 {
        let cap = c.region_read(CONFIG, at, 2)?;
        if cap[0] == 0x05 {
            let ctl = c.region_read(CONFIG, at + 2, 2)?;
            let ctl = u16::from_le_bytes([ctl[0], ctl[1]]) | 1;
            c.region_write(CONFIG, at + 2, &ctl.to_le_bytes())?;
            let irq = EventFd::new(EFD_NONBLOCK)?;
            c.set_irq_eventfds(PCI_MSI_IRQ_INDEX, 0, &[irq.as_raw_fd()])?;
            return Ok(irq);
        }
        at = u64::from(cap[1]);
        hops += 1;
        if hops > 48 {
            break;
        }
    }
    Err(BenchError::Setup("no MSI capability".into()))
}

/// Points the device side of edu's DMA engine at its buffer for a direction.
fn edu_buffer_side(c: &mut Client, to_ram: bool) -> Result<()> {
    let reg = if to_ram { edu::DMA_SRC } else { edu::DMA_DST };
    c.write_u64(wire::PCI_BAR0_REGION_INDEX, reg, edu::BUF_ADDR)?;
    Ok(())
}

/// One edu DMA (of the count programmed) between `gpa` and the device buffer, waited for
/// through its MSI while the client serves the server's DMA message.
fn edu_dma(c: &mut Client, irq: &EventFd, gpa: u64, to_ram: bool) -> Result<()> {
    let bar = wire::PCI_BAR0_REGION_INDEX;
    // Posted, as QEMU sends MMIO writes; the RAM side is set for every DMA.
    let ram_side = if to_ram { edu::DMA_DST } else { edu::DMA_SRC };
    c.region_write_posted(bar, ram_side, &gpa.to_le_bytes())?;
    let mut cmd = edu::CMD_RUN | edu::CMD_IRQ;
    if to_ram {
        cmd |= edu::CMD_TO_RAM;
    }
    c.region_write_posted(bar, edu::DMA_CMD, &cmd.to_le_bytes())?;
    if !c.serve_until_readable(irq.as_raw_fd(), Duration::from_secs(10))? {
        return Err(BenchError::Setup("edu DMA: no interrupt in 10 s".into()));
    }
    irq.read()?;
    Ok(())
}

fn dma_engine(b: &mut Bench) -> Result<()> {
    let c = &mut b.client;
    let rw = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
    c.dma_map(DMA_GPA, MIB as u64, None, 0, rw)?;
    c.set_dma_target(
        Box::new(ClientRam {
            base: DMA_GPA,
            bytes: (0..MIB).map(|i| i as u8).collect(),
        }),
        b.args.dma_layout,
    );
    let irq = enable_msi(c)?;
    let bar = wire::PCI_BAR0_REGION_INDEX;
    c.write_u64(bar, edu::DMA_COUNT, edu::BUF_SIZE as u64)?;
    // Check the path once before timing it.
    for to_ram in [false, true] {
        edu_buffer_side(c, to_ram)?;
        let served = c.dma_requests_served;
        edu_dma(c, &irq, DMA_GPA, to_ram)?;
        if c.dma_requests_served == served {
            return Err(BenchError::Setup(
                "edu DMA completed without a DMA message: is the region fd-less?".into(),
            ));
        }
    }

    let k4 = edu::BUF_SIZE;
    let (wr, _) = write_sizes(8);
    let dma_req = HDR + 16;
    let dma_data = HDR + DmaLayout::payload_len(k4);
    // Client: two posted MMIO writes (address, command); server: the DMA request;
    // client: its reply; server: the completion (an eventfd for umdev, 8 bytes
    // on the socket for the floor).
    let from_ram = vec![
        Phase {
            sends: vec![(wr, false), (wr, false)],
            recv: dma_req,
        },
        Phase::rt(dma_data, 8),
    ];
    let to_ram = vec![
        Phase {
            sends: vec![(wr, false), (wr, false)],
            recv: dma_data,
        },
        Phase::rt(HDR, 8),
    ];
    let n4 = (b.iterations / 10).max(10);
    let n1m = (b.iterations / 2000).max(1);
    for (dir_to_ram, script, what) in [
        (false, from_ram, "DMA_READ (edu RAM to device)"),
        (true, to_ram, "DMA_WRITE (edu device to RAM)"),
    ] {
        edu_buffer_side(&mut b.client, dir_to_ram)?;
        let mut run4 = |c: &mut Client, n: u64| -> Result<Duration> {
            let t = Instant::now();
            for _ in 0..n {
                edu_dma(c, &irq, DMA_GPA, dir_to_ram)?;
            }
            Ok(t.elapsed())
        };
        b.figure(
            &format!("{what} 4 KiB"),
            Unit::Bytes,
            n4,
            k4 as f64,
            Some(script.clone()),
            &mut run4,
            "one edu DMA per 4 KiB",
        );
        let chunks = (MIB / k4) as u64;
        let mut run1m = |c: &mut Client, n: u64| -> Result<Duration> {
            let t = Instant::now();
            for _ in 0..n {
                for i in 0..chunks {
                    edu_dma(c, &irq, DMA_GPA + i * k4 as u64, dir_to_ram)?;
                }
            }
            Ok(t.elapsed())
        };
        let mut script1m = Vec::new();
        for _ in 0..chunks {
            script1m.extend(script.iter().cloned());
        }
        b.figure(
            &format!("{what} 1 MiB"),
            Unit::Bytes,
            n1m,
            MIB as f64,
            Some(script1m),
            &mut run1m,
            "256 edu DMAs of 4 KiB (edu's buffer)",
        );
    }
    b.client.dma_unmap(DMA_GPA, MIB as u64, 0)?;
    Ok(())
}

// ---- set-up ----------------------------------------------------------------

/// The device of `--in-process`: a 4 KiB BAR0 of plain registers that keep what
/// is written, no locks, no threads.
struct RegisterFile {
    regs: Box<[u8; 4096]>,
}

impl PciDevice for RegisterFile {
    fn bar_read(&mut self, _bar: BarIndex, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        data.copy_from_slice(&self.regs[at..at + data.len()]);
    }

    fn bar_write(&mut self, _bar: BarIndex, offset: u64, data: &[u8]) {
        let at = offset as usize;
        self.regs[at..at + data.len()].copy_from_slice(data);
    }

    fn reset(&mut self) {
        self.regs.fill(0);
    }
}

/// umdev's server on a thread of this process, serving one end of a socketpair.
struct InProcess {
    thread: Option<JoinHandle<()>>,
}

impl InProcess {
    fn start(cpu: Option<usize>) -> Result<(InProcess, Client)> {
        let description = PciDeviceDescription {
            ids: PciIds {
                vendor_id: 0x1234,
                device_id: 0xbe4c,
                class_code: 0x00ff00,
                ..Default::default()
            },
            bars: PciDeviceDescription::only_bar0(BarDef::memory32(4096, false)),
            ..Default::default()
        };
        let max_maps = ServerConfig::default().max_dma_maps as usize;
        let function = PciFunction::new(description, GuestMemory::new(max_maps), |_| {
            Box::new(RegisterFile {
                regs: Box::new([0; 4096]),
            })
        })
        .map_err(|e| BenchError::Setup(format!("in-process device: {e}")))?;
        let server = Server::new(function, ServerConfig::default());
        let (ours, theirs) = UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name("umdev-session".into())
            .spawn(move || {
                if let Some(cpu) = cpu {
                    if let Err(e) = pin_current_thread(cpu) {
                        eprintln!("in-process server: {e}");
                    }
                }
                if let Err(e) = server.serve_connection(theirs) {
                    eprintln!("in-process server: {e}");
                }
            })?;
        let mut client = Client::from_stream(ours)?;
        client.negotiate(&Capabilities::new(16, 1 << 20, 65535, true))?;
        Ok((
            InProcess {
                thread: Some(thread),
            },
            client,
        ))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the device binary for the run (its threads on `cpu`, if given).
fn start_server(bin: &Path, extra: &[String], cpu: Option<usize>) -> Result<Device> {
    let dir = std::env::temp_dir().join(format!("umdev-bench-{}", std::process::id()));
    Device::start(bin, extra, dir, "dev.sock", |cmd| {
        if let Some(cpu) = cpu {
            let set = cpu_set(cpu);
            // SAFETY: the closure runs in the child between fork and exec and
            // only makes one system call (sched_setaffinity on itself, with a
            // set copied into the closure), which is async-signal-safe. Every
            // thread the server starts inherits the mask.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    })
    .map_err(BenchError::Setup)
}

fn memfd() -> Result<File> {
    Ok(umdev::memory::memfd("umdev-bench", 0)?)
}

fn run(args: Args) -> Result<()> {
    let reps = args.reps.unwrap_or(if args.quick { 3 } else { 11 }).max(1);
    let iterations = args
        .iterations
        .unwrap_or(if args.quick { 300 } else { 10_000 })
        .max(10);
    let server_cpu = args.server_pin.or(args.pin);
    if cfg!(debug_assertions) {
        eprintln!("note: a debug build; figures from it say little (cargo build --release)");
    }
    let mut started = None;
    let mut in_process = None;
    let target = match &args.socket_path {
        _ if args.in_process => None,
        Some(p) => {
            let desc = format!(
                "external server at {} (not pinned by umdev-bench: pin it yourself, e.g. taskset)",
                p.display()
            );
            Some((p.clone(), desc))
        }
        None => {
            let bin = match &args.server_bin {
                Some(b) => b.clone(),
                None => std::env::current_exe()?.with_file_name("umdev-edu"),
            };
            let s = start_server(&bin, &args.server_arg, server_cpu)?;
            let socket = s.socket.clone();
            let desc = format!(
                "{}{} (pid {}, started here){}",
                bin.display(),
                args.server_arg
                    .iter()
                    .map(|a| format!(" {a}"))
                    .collect::<String>(),
                s.child.id(),
                server_cpu.map_or(String::new(), |c| format!(", pinned to CPU {c}"))
            );
            started = Some(s);
            Some((socket, desc))
        }
    };
    if let Some(cpu) = args.pin {
        pin_current_thread(cpu)?;
    }
    let (mut client, server_desc) = match target {
        Some((socket, desc)) => (Client::connect(&socket)?, desc),
        None => {
            let (server, client) = InProcess::start(server_cpu)?;
            in_process = Some(server);
            let desc = format!(
                "umdev's server on a thread of this process, register-file device{}",
                server_cpu.map_or(String::new(), |c| format!(", pinned to CPU {c}"))
            );
            (client, desc)
        }
    };
    let info = client.device_info()?;
    if info.num_regions <= CONFIG {
        return Err(BenchError::Setup("the device has no config region".into()));
    }
    let ids = client.region_read(CONFIG, 0, 4)?;
    let is_edu = ids == [0x34, 0x12, 0xe8, 0x11];
    // Memory decoding and bus mastering on, as a guest driver would.
    let cmd = client.region_read(CONFIG, 0x04, 2)?;
    let cmd = u16::from_le_bytes([cmd[0], cmd[1]]) | 0x6;
    client.region_write(CONFIG, 0x04, &cmd.to_le_bytes())?;

    println!("umdev-bench: {}", machine());
    println!(
        "build: {}; {reps} repetitions per figure (median), {iterations} round trips each{}",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        if args.quick { " (--quick)" } else { "" }
    );
    println!("server: {server_desc}");
    println!(
        "client: {}",
        args.pin
            .map_or("not pinned".into(), |c| format!("pinned to CPU {c}"))
    );
    let echo_kind = args.floor_echo.unwrap_or(if args.in_process {
        EchoKind::Thread
    } else {
        EchoKind::Process
    });
    println!(
        "floor: echo {} on a socketpair, same byte counts and fds, {}; {}",
        match (echo_kind, args.floor_echo_threads) {
            (EchoKind::Thread, _) => "thread (same process as the client)".to_string(),
            (EchoKind::Process, 0) => "process".to_string(),
            (EchoKind::Process, n) => format!("process with {n} idle threads"),
        },
        match args.floor_read {
            FloorRead::Buffer => "reads into its buffer as a server must",
            FloorRead::Exact => "reads exactly the bytes it expects (--floor-read exact)",
        },
        server_cpu.map_or("not pinned".into(), |c| format!("pinned to CPU {c}"))
    );
    println!();
    println!(
        "{:<44} {:>24} {:>24} {:>6}  note",
        "figure", "server", "floor", "ratio"
    );

    let mut b = Bench {
        echo_cpu: server_cpu,
        echo_kind,
        reps,
        iterations,
        client,
        memfd: memfd()?,
        figures: Vec::new(),
        args,
    };
    round_trips(&mut b);
    posted_writes(&mut b);
    if let Err(e) = dma_maps(&mut b) {
        println!("DMA map figures failed: {e}");
    }
    if b.args.no_dma_engine || !is_edu {
        println!("server-initiated DMA figures skipped (they need an edu device)");
    } else if let Err(e) = dma_engine(&mut b) {
        println!("server-initiated DMA figures failed: {e}");
    }
    if b.args.markdown {
        print_markdown(&b.figures);
    }
    drop(b);
    drop(in_process);
    drop(started);
    Ok(())
}

fn print_markdown(figures: &[Figure]) {
    println!();
    println!("| figure | umdev | floor | ratio | note |");
    println!("|---|---:|---:|---:|---|");
    for f in figures {
        println!(
            "| {} | {} | {} | {} | {} |",
            f.name,
            fmt_rate(f.server, f.unit),
            fmt_rate(f.floor, f.unit),
            f.ratio.map_or("-".into(), |r| format!("{r:.3}")),
            f.note
        );
    }
}

/// The floor's echo as a process of its own (`--echo-child`).
fn echo_child(
    fd: RawFd,
    plan: &str,
    read: FloorRead,
    cpu: Option<usize>,
    threads: usize,
) -> Result<()> {
    let plan =
        plan_from_arg(plan).ok_or_else(|| BenchError::Setup(format!("bad echo plan {plan:?}")))?;
    if fcntl_getfd(fd) < 0 {
        return Err(BenchError::Setup(format!("fd {fd} is not open")));
    }
    // SAFETY: the parent passed this fd (its socketpair end) to us alone, and we
    // checked it is open; nothing else in this process owns it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    if let Some(cpu) = cpu {
        pin_current_thread(cpu)?;
    }
    // Threads that only wait, as a backend's signal and device threads mostly
    // do; their presence alone makes the kernel's fd lookups take references
    // (the fd table is shared), which is most of what the default floor does
    // not pay and a multi-threaded server does.
    for _ in 0..threads {
        std::thread::Builder::new()
            .name("floor-idle".into())
            .spawn(|| loop {
                std::thread::park();
            })?;
    }
    echo_loop(stream, &plan, read == FloorRead::Exact);
    Ok(())
}

fn fcntl_getfd(fd: RawFd) -> i32 {
    // SAFETY: F_GETFD only queries the fd's flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(fd) = args.echo_child {
        let plan = args.echo_plan.clone().unwrap_or_default();
        return match echo_child(
            fd,
            &plan,
            args.floor_read,
            args.pin,
            args.floor_echo_threads,
        ) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("umdev-bench echo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("umdev-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
