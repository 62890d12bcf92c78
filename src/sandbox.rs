//! Confinement of a running backend: a seccomp filter that allows only the
//! system calls the backend makes after start-up.
//!
//! [`confine`] is called by [`cli::run`](crate::cli::run) once the socket is bound
//! (or inherited) and the threads that exist at start-up are running; it applies
//! to every thread of the process at once (`SECCOMP_FILTER_FLAG_TSYNC`), and to
//! every thread started later. `--no-seccomp` turns it off.
//!
//! What a denied call does:
//! - most: the process logs `seccomp: system call N denied` on stderr and exits
//!   with status 159 (128 + SIGSYS) — a backend doing something it never does is
//!   treated as compromised;
//! - `clone3`: fails with ENOSYS, so that the C library falls back to `clone`,
//!   whose flags the filter can check (threads only, never a new process);
//! - `prctl` other than naming a thread: fails with EPERM;
//! - opening a file: fails with EACCES (unless the model asked for
//!   [`FILE_OUTPUT`]).
//!
//! The allow-list, in [`ALLOWED`], was taken from `strace -f` of the backend
//! under the whole test suite (sessions, fd and message DMA, interrupts, INTx
//! resample threads, reconnects, signals); docs/robustness.md lists it with the
//! reason for each call. A device model that needs more registers them with
//! [`allow_extra`] before `cli::run`.

use std::io;

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCondition, SeccompFilter, SeccompRule};
use tracing::info;

/// Exit status of a process that made a denied system call (128 + SIGSYS).
pub const DENIED_EXIT_STATUS: i32 = 128 + libc::SIGSYS;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("seccomp filters are not implemented for this architecture; run with --no-seccomp")]
    UnsupportedArch,
    #[error("installing the SIGSYS handler: {0}")]
    Handler(io::Error),
    #[error("building the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Apply(#[source] seccompiler::Error),
    #[error(transparent)]
    Guard(#[from] crate::memory::guard::GuardError),
}

/// System calls every backend thread may make after start-up.
///
/// The filter tests them in this order, so the calls of the message path come
/// first: every trapped guest access is one `recvmsg` and one `sendto`, an
/// interrupt one `write`. (Kernels since 5.11 skip the program for calls it
/// allows whatever their arguments, but older ones run it on every call.)
pub const ALLOWED: &[(&str, libc::c_long)] = &[
    // Socket traffic: framing, SCM_RIGHTS, the next client, ending a session.
    ("recvmsg", libc::SYS_recvmsg),
    ("sendto", libc::SYS_sendto),
    ("write", libc::SYS_write),
    ("sendmsg", libc::SYS_sendmsg),
    ("read", libc::SYS_read),
    ("futex", libc::SYS_futex),
    ("readv", libc::SYS_readv),
    ("writev", libc::SYS_writev),
    ("recvfrom", libc::SYS_recvfrom),
    ("accept4", libc::SYS_accept4),
    ("shutdown", libc::SYS_shutdown),
    ("close", libc::SYS_close),
    // DMA regions: size checks, sealing, mapping; the allocator.
    ("fstat", libc::SYS_fstat),
    ("fstatfs", libc::SYS_fstatfs),
    ("newfstatat", libc::SYS_newfstatat),
    ("statx", libc::SYS_statx),
    ("fcntl", libc::SYS_fcntl),
    ("lseek", libc::SYS_lseek),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mprotect", libc::SYS_mprotect),
    ("madvise", libc::SYS_madvise),
    ("mremap", libc::SYS_mremap),
    ("brk", libc::SYS_brk),
    // Backend memory a model owns (zeroing VRAM ranges of a memfd).
    ("fallocate", libc::SYS_fallocate),
    // Interrupts: eventfds; the session's event loop over helper fds.
    ("eventfd2", libc::SYS_eventfd2),
    ("ppoll", libc::SYS_ppoll),
    ("epoll_create1", libc::SYS_epoll_create1),
    ("epoll_ctl", libc::SYS_epoll_ctl),
    ("epoll_pwait", libc::SYS_epoll_pwait),
    #[cfg(target_arch = "x86_64")]
    ("epoll_wait", libc::SYS_epoll_wait),
    // Threads: locks, waits, time, thread start and exit (futex is above).
    ("sched_yield", libc::SYS_sched_yield),
    ("nanosleep", libc::SYS_nanosleep),
    ("clock_nanosleep", libc::SYS_clock_nanosleep),
    ("clock_gettime", libc::SYS_clock_gettime),
    ("getrandom", libc::SYS_getrandom),
    ("set_robust_list", libc::SYS_set_robust_list),
    ("sched_getaffinity", libc::SYS_sched_getaffinity),
    ("rseq", libc::SYS_rseq),
    ("sigaltstack", libc::SYS_sigaltstack),
    ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
    ("rt_sigreturn", libc::SYS_rt_sigreturn),
    ("rt_sigtimedwait", libc::SYS_rt_sigtimedwait),
    ("restart_syscall", libc::SYS_restart_syscall),
    ("gettid", libc::SYS_gettid),
    ("getpid", libc::SYS_getpid),
    ("exit", libc::SYS_exit),
    ("exit_group", libc::SYS_exit_group),
    // Removing the socket file when the backend ends.
    ("unlinkat", libc::SYS_unlinkat),
    // Checking that an fd the client sent is a userfaultfd (/proc/self/fd).
    ("readlinkat", libc::SYS_readlinkat),
    #[cfg(target_arch = "x86_64")]
    ("poll", libc::SYS_poll),
    #[cfg(target_arch = "x86_64")]
    ("unlink", libc::SYS_unlink),
    #[cfg(target_arch = "x86_64")]
    ("readlink", libc::SYS_readlink),
];

/// For a model that writes files after start-up (the vGPU's `--scanout-png`):
/// creating, renaming and removing files. Pass to [`allow_extra`].
pub const FILE_OUTPUT: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
];

/// For a process that makes listening sockets and memfds after start-up (the
/// vGPU parent, which creates instances on request): socket, bind, listen,
/// getsockname (the port a listener on port 0 got: an instance's VNC
/// server), setsockopt (a control client's timeouts), memfd_create and
/// ftruncate (an instance's VRAM). Pass to [`allow_extra`].
pub const LISTENERS_AND_MEMFDS: &[libc::c_long] = &[
    libc::SYS_socket,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_setsockopt,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

static EXTRA: std::sync::Mutex<Vec<libc::c_long>> = std::sync::Mutex::new(Vec::new());

/// Adds system calls to the filter [`confine`] installs later: for a device
/// model (or one of its options) that needs more than [`ALLOWED`]. Call from
/// `main` before [`cli::run`](crate::cli::run).
pub fn allow_extra(syscalls: &[libc::c_long]) {
    EXTRA
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend_from_slice(syscalls);
}

/// The one ioctl the backend makes: write-protecting pages of the VMM's
/// mapping through a userfaultfd it was handed (`UFFDIO_WRITEPROTECT`).
const UFFDIO_WRITEPROTECT: u32 = 0xc018_aa06;

/// Allowed with a condition on their arguments (see [`build_program`]).
pub const CONDITIONAL: &[&str] = &[
    "clone (CLONE_THREAD set: threads only)",
    "clone3 (ENOSYS: the C library falls back to clone)",
    "prctl (PR_SET_NAME / PR_GET_NAME; anything else EPERM)",
    "tgkill (this process only: abort, thread signals)",
    "ioctl (UFFDIO_WRITEPROTECT only)",
    "openat, open (EACCES unless allowed with FILE_OUTPUT)",
];

/// The filters, built with `seccompiler` (rust-vmm's, as Cloud Hypervisor and
/// Firecracker use), in the order they are installed. A filter has one
/// verdict for its matches, so the soft refusals are filters of their own,
/// stacked with the allow-list: the kernel runs every filter and keeps the
/// strictest verdict (kill > trap > errno > allow), so a call the allow-list
/// traps stays trapped, and one it allows but a refusal matches fails with
/// that refusal's errno.
///
/// - clone3 fails with ENOSYS (its flags are behind a pointer; the C library
///   falls back to clone, whose flags the allow-list checks);
/// - open/openat fail with EACCES (the C library's malloc reads
///   /proc/sys/vm/overcommit_memory when it first shrinks a heap, and copes),
///   unless `extra` allows them;
/// - the allow-list: [`ALLOWED`], `extra`, and the conditional calls (clone
///   with CLONE_THREAD, tgkill to this process, ioctl UFFDIO_WRITEPROTECT;
///   clone3, prctl, open/openat and seccomp itself unconditionally, for the
///   other filters and for installing the last one); anything else traps
///   (SIGSYS: logged, the process ends);
/// - last, prctl other than PR_SET_NAME / PR_GET_NAME fails with EPERM.
///
/// seccomp(2) stays allowed: a filter added later can only refuse more.
pub fn build_filters(extra: &[libc::c_long]) -> Result<Vec<BpfProgram>, SandboxError> {
    use seccompiler::SeccompCmpArgLen::Dword;
    use seccompiler::SeccompCmpOp::{Eq, MaskedEq, Ne};
    let cond = |arg: u8, op, value: u64| SeccompCondition::new(arg, Dword, op, value);
    let rule = |conds: Vec<Result<SeccompCondition, seccompiler::BackendError>>| {
        SeccompRule::new(conds.into_iter().collect::<Result<Vec<_>, _>>()?)
    };
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u64;
    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = ALLOWED
        .iter()
        .map(|&(_, nr)| nr)
        .chain(extra.iter().copied())
        .map(|nr| (nr, Vec::new()))
        .collect();
    let thread = libc::CLONE_THREAD as u64;
    allow.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(0, MaskedEq(thread), thread)])?],
    );
    allow.insert(libc::SYS_tgkill, vec![rule(vec![cond(0, Eq, pid)])?]);
    allow.insert(
        libc::SYS_ioctl,
        vec![rule(vec![cond(1, Eq, u64::from(UFFDIO_WRITEPROTECT))])?],
    );
    for &nr in SOFTLY_REFUSED.iter().chain(OPENS) {
        allow.entry(nr).or_default();
    }
    let filter = |rules: BTreeMap<i64, Vec<SeccompRule>>, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, TARGET_ARCH)
            .and_then(BpfProgram::try_from)
            .map_err(SandboxError::Filter)
    };
    let errno = |e: i32| SeccompAction::Errno(e as u32);
    let mut filters = vec![filter(
        [(libc::SYS_clone3, Vec::new())].into(),
        SeccompAction::Allow,
        errno(libc::ENOSYS),
    )?];
    let opens: BTreeMap<i64, Vec<SeccompRule>> = OPENS
        .iter()
        .filter(|nr| !extra.contains(nr))
        .map(|&nr| (nr, Vec::new()))
        .collect();
    if !opens.is_empty() {
        filters.push(filter(opens, SeccompAction::Allow, errno(libc::EACCES))?);
    }
    filters.push(filter(allow, SeccompAction::Trap, SeccompAction::Allow)?);
    let other_prctl = rule(vec![
        cond(0, Ne, libc::PR_SET_NAME as u64),
        cond(0, Ne, libc::PR_GET_NAME as u64),
    ])?;
    filters.push(filter(
        [(libc::SYS_prctl, vec![other_prctl])].into(),
        SeccompAction::Allow,
        errno(libc::EPERM),
    )?);
    Ok(filters)
}

/// Allowed by the allow-list, refused softly by the filters stacked on it
/// (seccomp: installing the last filter).
const SOFTLY_REFUSED: [libc::c_long; 3] = [libc::SYS_clone3, libc::SYS_prctl, libc::SYS_seccomp];

#[cfg(target_arch = "x86_64")]
const OPENS: &[libc::c_long] = &[libc::SYS_openat, libc::SYS_open];
#[cfg(not(target_arch = "x86_64"))]
const OPENS: &[libc::c_long] = &[libc::SYS_openat];

#[cfg(target_arch = "x86_64")]
const TARGET_ARCH: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET_ARCH: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// Writes "seccomp: system call N denied" and ends the process: a denied call
/// means the backend does something it never does.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel hands the handler a valid siginfo_t. For SIGSYS from
    // seccomp the union holds { void *call_addr; int syscall; unsigned arch; }
    // right after the three ints and their padding, i.e. the syscall at byte 24.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24).cast::<i32>()) };
    let mut msg = [0u8; 128];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"umdev: seccomp: system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" denied; exiting (run with --no-seccomp to allow it)\n");
    // SAFETY: write(2) and exit_group are async-signal-safe and allowed by the
    // filter; the buffer is live.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::syscall(libc::SYS_exit_group, DENIED_EXIT_STATUS);
    }
}

/// Installs the filter for every thread of the process: the default allow-list
/// plus `extra` system calls a device model needs.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub fn confine_with(extra: &[libc::c_long]) -> Result<(), SandboxError> {
    let programs = build_filters(extra)?;
    // The SIGBUS guard of peer memory needs rt_sigaction, which the filter refuses.
    crate::memory::guard::install()?;
    // glibc installs its internal signal handlers (rt_sigaction, refused by the
    // filter) when the process starts its first thread. A backend may start
    // its first thread only under the filter (edu has none until a client asks
    // for an INTx unmask eventfd), so one thread is started and joined here.
    std::thread::Builder::new()
        .name("pre-seccomp".into())
        .spawn(|| ())
        .and_then(|t| t.join().map_err(|_| io::Error::other("thread panicked")))
        .map_err(SandboxError::Handler)?;
    // SAFETY: sigaction with a zeroed struct, our handler and SA_SIGINFO; the
    // handler only uses async-signal-safe calls.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Handler(io::Error::last_os_error()));
        }
    }
    // Every thread of the process at once (TSYNC), in the order built.
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(SandboxError::Apply)?;
    }
    Ok(())
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub fn confine_with(_extra: &[libc::c_long]) -> Result<(), SandboxError> {
    Err(SandboxError::UnsupportedArch)
}

/// Installs the default filter, unless `enabled` is false.
pub fn confine(enabled: bool) -> Result<(), SandboxError> {
    if !enabled {
        info!("seccomp filter disabled (--no-seccomp)");
        return Ok(());
    }
    let extra = EXTRA.lock().unwrap_or_else(|p| p.into_inner()).clone();
    confine_with(&extra)?;
    info!(
        extra = extra.len(),
        syscalls = ALLOWED.len() + CONDITIONAL.len(),
        "seccomp filter installed for all threads"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build_and_leave_out_what_must_never_run() {
        let filters = build_filters(&[]).unwrap();
        assert_eq!(filters.len(), 4);
        assert!(filters.iter().all(|p| p.len() < 4096));
        let with_files = build_filters(FILE_OUTPUT).unwrap();
        assert_eq!(with_files.len(), 3, "open/openat no longer refused");
        // No forbidden call sneaked into the list.
        for bad in [
            libc::SYS_execve,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_process_vm_writev,
        ] {
            assert!(ALLOWED.iter().all(|&(_, nr)| nr != bad), "{bad}");
        }
    }
}
