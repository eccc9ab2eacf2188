//! seccomp filters, one per kind of thread, each allowing only the system calls that thread
//! makes once it handles guest-controlled input (`ioctl`s by request number). They are
//! compiled once when the VM is built and installed by each thread itself, first thing, or
//! (the VMM thread) once set-up is done. A forbidden call raises SIGSYS, whose handler
//! prints one line naming the thread and the call and ends vireo with status 1.
//!
//! Threads inherit their creator's filter, so device workers are started by the spawner
//! thread (`workers.rs`), never by the vCPU that wrote DRIVER_OK, and the spawner's filter
//! allows everything its workers need.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What `--seccomp` asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Forbidden calls kill vireo (SIGSYS, one line, status 1).
    #[default]
    Enforce,
    /// Forbidden calls are allowed and logged by the kernel (audit log).
    Log,
    /// No filters.
    Off,
}

/// The kinds of vireo threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM runs: waits for the end, then tears down.
    Vmm,
    Vcpu,
    /// Writes the guest's console output to the terminal or file.
    Console,
    /// Feeds stdin to the guest's UART.
    SerialIn,
    /// Starts device workers on request.
    Spawner,
    BlockWorker,
    NetWorker,
    /// Short-lived set-up helpers (memory slot registration, PIT reinjection).
    Setup,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 8] = [
        Self::Vmm,
        Self::Vcpu,
        Self::Console,
        Self::SerialIn,
        Self::Spawner,
        Self::BlockWorker,
        Self::NetWorker,
        Self::Setup,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Console => "console",
            Self::SerialIn => "serial-in",
            Self::Spawner => "spawner",
            Self::BlockWorker => "virtio-blk",
            Self::NetWorker => "virtio-net",
            Self::Setup => "setup",
        }
    }
}

/// Errors building or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp filter for {thread} threads: {source}")]
    Build {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("seccomp filter for {thread} threads: {source}")]
    Compile {
        thread: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of a {thread} thread: {source}")]
    Apply {
        thread: &'static str,
        source: seccompiler::Error,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

// ioctl request numbers (include/uapi/linux/kvm.h, asm-generic/ioctls.h, if_tun.h).
const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: u64) -> u64 {
    (1 << 30) | (size << 16) | (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (KVMIO << 8) | nr
}
const KVM_RUN: u64 = io(0x80);
#[cfg(target_arch = "x86_64")]
const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>() as u64);
#[cfg(target_arch = "aarch64")]
const KVM_GET_ONE_REG: u64 = iow(
    0xab,
    std::mem::size_of::<kvm_bindings::kvm_one_reg>() as u64,
);
const KVM_SET_USER_MEMORY_REGION: u64 = iow(
    0x46,
    std::mem::size_of::<kvm_bindings::kvm_userspace_memory_region>() as u64,
);
const KVM_REINJECT_CONTROL: u64 = io(0x71);
// The split irqchip's I/O APIC model, on the vCPU that wrote its redirection table.
const KVM_SET_GSI_ROUTING: u64 = iow(
    0x6a,
    std::mem::size_of::<kvm_bindings::kvm_irq_routing>() as u64,
);
const KVM_IRQFD: u64 = iow(0x76, std::mem::size_of::<kvm_bindings::kvm_irqfd>() as u64);
const KVM_SIGNAL_MSI: u64 = iow(0xa5, std::mem::size_of::<kvm_bindings::kvm_msi>() as u64);
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

// System calls x86_64 still has beside their newer forms (aarch64 has only the newer ones:
// `clock_gettime`, `epoll_pwait`, `ppoll`), which glibc and std may use there.
#[cfg(target_arch = "x86_64")]
const LEGACY_TIME: &[i64] = &[libc::SYS_time];
#[cfg(target_arch = "x86_64")]
const LEGACY_EPOLL_WAIT: &[i64] = &[libc::SYS_epoll_wait];
#[cfg(target_arch = "x86_64")]
const LEGACY_POLL: &[i64] = &[libc::SYS_poll];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_TIME: &[i64] = &[];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_EPOLL_WAIT: &[i64] = &[];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY_POLL: &[i64] = &[];

/// Every thread: memory, locks, signals, time, its own end, and log lines on stderr.
fn common() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_futex,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_getrandom,
        libc::SYS_rseq,
        libc::SYS_set_robust_list,
    ];
    v.extend_from_slice(LEGACY_TIME);
    v
}

fn syscalls(kind: ThreadKind) -> Vec<i64> {
    use libc::*;
    let mut v = common();
    match kind {
        ThreadKind::Vmm => v.extend([SYS_read, SYS_ppoll, SYS_tgkill, SYS_fdatasync, SYS_fsync]),
        // Port I/O and MMIO go to register models; interrupts are eventfd writes; a device
        // reset joins its worker; activation creates the worker's kill eventfd and hands
        // the worker to the spawner.
        ThreadKind::Vcpu => v.extend([SYS_read, SYS_eventfd2]),
        ThreadKind::Console => {}
        ThreadKind::SerialIn => v.push(SYS_read),
        ThreadKind::Setup => {}
        ThreadKind::BlockWorker => v.extend(block_worker()),
        ThreadKind::NetWorker => v.extend(net_worker()),
        // New threads (each then installs its own, stricter filter).
        ThreadKind::Spawner => {
            v.extend([SYS_clone, SYS_clone3, SYS_prctl, SYS_seccomp]);
            v.extend(block_worker());
            v.extend(net_worker());
        }
    }
    if kind == ThreadKind::Vmm {
        v.extend_from_slice(LEGACY_POLL);
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// Epoll over eventfds, io_uring (or the synchronous engine's calls) on the image.
fn block_worker() -> Vec<i64> {
    use libc::*;
    let mut v = vec![
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_eventfd2,
        SYS_read,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_preadv,
        SYS_pwritev,
        SYS_fdatasync,
        SYS_fallocate,
    ];
    v.extend_from_slice(LEGACY_EPOLL_WAIT);
    v
}

/// Epoll over eventfds and the tap; frames with read/writev.
fn net_worker() -> Vec<i64> {
    use libc::*;
    let mut v = vec![
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_read,
        SYS_readv,
        SYS_writev,
    ];
    v.extend_from_slice(LEGACY_EPOLL_WAIT);
    v
}

/// The ioctl requests a kind may make (`ioctl` is absent from its list otherwise).
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    match kind {
        ThreadKind::Vcpu => {
            #[cfg(target_arch = "x86_64")]
            let regs = KVM_GET_REGS;
            #[cfg(target_arch = "aarch64")]
            let regs = KVM_GET_ONE_REG;
            // TUNSETOFFLOAD: a NIC's reset puts the tap back to plain frames.
            vec![
                KVM_RUN,
                regs,
                TUNSETOFFLOAD,
                KVM_SET_GSI_ROUTING,
                KVM_IRQFD,
                KVM_SIGNAL_MSI,
            ]
        }
        ThreadKind::Vmm => vec![TCGETS, TCSETS, TUNSETOFFLOAD],
        ThreadKind::NetWorker | ThreadKind::Spawner => vec![TUNSETOFFLOAD],
        ThreadKind::Setup => vec![KVM_SET_USER_MEMORY_REGION, KVM_REINJECT_CONTROL],
        _ => Vec::new(),
    }
}

fn target_arch() -> TargetArch {
    #[cfg(target_arch = "x86_64")]
    return TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
}

/// The BPF program of `kind`.
pub fn program(kind: ThreadKind, mode: SeccompMode) -> Result<BpfProgram, SeccompError> {
    let thread = kind.name();
    let build = |source| SeccompError::Build { thread, source };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in syscalls(kind) {
        rules.insert(nr, Vec::new());
    }
    // fcntl only to read or set descriptor flags and to duplicate (std checks a descriptor
    // is open before closing it in debug builds; EventFd::try_clone duplicates).
    let mut fcntl = Vec::new();
    for cmd in [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_DUPFD_CLOEXEC,
    ] {
        let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, cmd as u64)
            .map_err(build)?;
        fcntl.push(SeccompRule::new(vec![cond]).map_err(build)?);
    }
    rules.insert(libc::SYS_fcntl, fcntl);
    let requests = ioctls(kind);
    if !requests.is_empty() {
        let mut chain = Vec::new();
        for req in requests {
            let cond = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req)
                .map_err(build)?;
            chain.push(SeccompRule::new(vec![cond]).map_err(build)?);
        }
        rules.insert(libc::SYS_ioctl, chain);
    }
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter =
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()).map_err(build)?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { thread, source })
}

/// Every kind's program, compiled once.
pub struct Filters {
    mode: SeccompMode,
    programs: BTreeMap<ThreadKind, BpfProgram>,
}

thread_local! {
    /// What this thread is, for the SIGSYS line.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

impl Filters {
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = BTreeMap::new();
        if mode != SeccompMode::Off {
            install_sigsys_handler()?;
            for kind in ThreadKind::ALL {
                programs.insert(kind, program(kind, mode)?);
            }
        }
        Ok(Self { mode, programs })
    }

    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread.
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        KIND.with(|k| k.set(Some(kind)));
        match self.programs.get(&kind) {
            Some(p) => seccompiler::apply_filter(p).map_err(|source| SeccompError::Apply {
                thread: kind.name(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Installs `kind`'s filter, or ends vireo: a thread that cannot be filtered must not go
    /// on to handle guest input.
    pub fn apply_or_exit(&self, kind: ThreadKind) {
        if let Err(e) = self.apply(kind) {
            eprintln!("vireo: error: {e}");
            std::process::exit(1);
        }
    }
}

/// Names for the SIGSYS line (the others print as numbers).
fn syscall_name(nr: i64) -> Option<&'static str> {
    use libc::*;
    let known: &[(i64, &str)] = &[
        (SYS_execve, "execve"),
        (SYS_execveat, "execveat"),
        (SYS_openat, "openat"),
        (SYS_socket, "socket"),
        (SYS_connect, "connect"),
        (SYS_bind, "bind"),
        (SYS_clone, "clone"),
        (SYS_clone3, "clone3"),
        (SYS_ioctl, "ioctl"),
        (SYS_mount, "mount"),
        (SYS_ptrace, "ptrace"),
        (SYS_kill, "kill"),
        (SYS_unlinkat, "unlinkat"),
        (SYS_read, "read"),
        (SYS_readv, "readv"),
        (SYS_writev, "writev"),
        (SYS_preadv, "preadv"),
        (SYS_pwritev, "pwritev"),
        (SYS_pread64, "pread64"),
        (SYS_pwrite64, "pwrite64"),
        (SYS_fdatasync, "fdatasync"),
        (SYS_fsync, "fsync"),
        (SYS_fallocate, "fallocate"),
        (SYS_eventfd2, "eventfd2"),
        (SYS_epoll_create1, "epoll_create1"),
        (SYS_epoll_ctl, "epoll_ctl"),
        (SYS_epoll_pwait, "epoll_pwait"),
        (SYS_io_uring_setup, "io_uring_setup"),
        (SYS_io_uring_enter, "io_uring_enter"),
        (SYS_io_uring_register, "io_uring_register"),
        (SYS_ppoll, "ppoll"),
        (SYS_tgkill, "tgkill"),
        (SYS_fcntl, "fcntl"),
        (SYS_dup, "dup"),
        (SYS_statx, "statx"),
        (SYS_newfstatat, "newfstatat"),
        (SYS_getdents64, "getdents64"),
        (SYS_prctl, "prctl"),
        (SYS_seccomp, "seccomp"),
        (SYS_sendto, "sendto"),
        (SYS_recvfrom, "recvfrom"),
        (SYS_sendmsg, "sendmsg"),
        (SYS_recvmsg, "recvmsg"),
        (SYS_accept4, "accept4"),
        (SYS_listen, "listen"),
        (SYS_uname, "uname"),
        (SYS_wait4, "wait4"),
        #[cfg(target_arch = "x86_64")]
        (SYS_open, "open"),
        #[cfg(target_arch = "x86_64")]
        (SYS_fork, "fork"),
        #[cfg(target_arch = "x86_64")]
        (SYS_poll, "poll"),
        #[cfg(target_arch = "x86_64")]
        (SYS_epoll_wait, "epoll_wait"),
    ];
    known.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// A fixed buffer for building the SIGSYS line without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The number of the forbidden call: `si_syscall` of SIGSYS's siginfo (after si_signo,
/// si_errno, si_code and the 8-byte `si_call_addr`, include/uapi/asm-generic/siginfo.h).
///
/// # Safety
/// `info` must point at the siginfo the kernel passed to a SIGSYS handler.
unsafe fn sigsys_syscall(info: *const libc::siginfo_t) -> i32 {
    // SAFETY: per the caller; the field is inside the 128-byte siginfo.
    unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() }
}

extern "C" fn sigsys_handler(_sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a stack buffer, write(2), _exit(2).
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler.
    let nr = i64::from(unsafe { sigsys_syscall(info) });
    let thread = KIND
        .with(|k| k.get())
        .map(ThreadKind::name)
        .unwrap_or("unknown");
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    line.push(b"vireo: error: seccomp: a ");
    line.push(thread.as_bytes());
    line.push(b" thread made a forbidden system call: ");
    if let Some(name) = syscall_name(nr) {
        line.push(name.as_bytes());
        line.push(b" (");
        line.push_num(nr as u64);
        line.push(b")");
    } else {
        line.push_num(nr as u64);
    }
    line.push(b"\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(1);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with an SA_SIGINFO handler that only does async-signal-safe
    // work.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// Forks; the child installs `kind`'s filter, runs `allowed` (must survive), then
    /// `forbidden` (must die by the SIGSYS line). Returns the child's exit status and stderr.
    fn in_child(kind: ThreadKind, allowed: fn() -> bool, forbidden: fn()) -> (i32, String) {
        let filters = Filters::new(SeccompMode::Enforce).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe(2) into a local array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes system calls and exits; it never returns into the
        // test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain descriptor calls in the child.
            unsafe {
                libc::dup2(fds[1], 2);
                libc::close(fds[0]);
            }
            if filters.apply(kind).is_err() {
                // SAFETY: ending the child.
                unsafe { libc::_exit(3) };
            }
            if !allowed() {
                // SAFETY: ending the child.
                unsafe { libc::_exit(4) };
            }
            forbidden();
            // SAFETY: ending the child.
            unsafe { libc::_exit(5) };
        }
        // SAFETY: closing our copy of the write end.
        unsafe { libc::close(fds[1]) };
        let mut err = String::new();
        // SAFETY: we own the read end.
        let mut f = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let _ = f.read_to_string(&mut err);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        (libc::WEXITSTATUS(status), err)
    }

    fn execve() {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NUL-terminated arguments.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    }

    fn openat() {
        // SAFETY: a NUL-terminated path.
        unsafe { libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    }

    fn eventfd_write() -> bool {
        // SAFETY: plain descriptor calls.
        unsafe {
            let fd = libc::eventfd(0, 0);
            fd >= 0 && libc::write(fd, (&1u64 as *const u64).cast(), 8) == 8
        }
    }

    fn kvm_run_ioctl() -> bool {
        // An allowed request on a bad descriptor: refused by the kernel, not the filter.
        // SAFETY: ioctl on an invalid fd has no effect.
        unsafe { libc::ioctl(-1, KVM_RUN as _, 0) };
        std::io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
    }

    fn epoll() -> bool {
        // SAFETY: plain descriptor calls.
        unsafe { libc::epoll_create1(0) >= 0 }
    }

    fn assert_killed(kind: ThreadKind, allowed: fn() -> bool, forbidden: fn(), call: &str) {
        let (code, err) = in_child(kind, allowed, forbidden);
        assert_eq!(code, 1, "{kind:?}: exit {code}, stderr {err}");
        assert!(
            err.contains(&format!("a {} thread", kind.name())) && err.contains(call),
            "{kind:?}: {err}"
        );
    }

    #[test]
    fn each_thread_kind_allows_what_it_needs_and_dies_on_the_rest() {
        assert_killed(ThreadKind::Vcpu, kvm_run_ioctl, openat, "openat");
        assert_killed(ThreadKind::Vcpu, eventfd_write, execve, "execve");
        assert_killed(ThreadKind::Vmm, || true, execve, "execve");
        assert_killed(ThreadKind::Console, || true, openat, "openat");
        assert_killed(ThreadKind::SerialIn, || true, execve, "execve");
        assert_killed(ThreadKind::Spawner, epoll, execve, "execve");
        assert_killed(ThreadKind::BlockWorker, epoll, execve, "execve");
        assert_killed(ThreadKind::NetWorker, epoll, openat, "openat");
        assert_killed(ThreadKind::Setup, || true, execve, "execve");
    }

    #[test]
    fn an_ioctl_outside_the_list_is_refused() {
        fn tcgets() {
            let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS into a local buffer.
            unsafe { libc::ioctl(0, libc::TCGETS, t.as_mut_ptr()) };
        }
        assert_killed(ThreadKind::Vcpu, kvm_run_ioctl, tcgets, "ioctl");
    }

    #[test]
    fn every_kind_compiles_in_every_mode() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            for kind in ThreadKind::ALL {
                assert!(!program(kind, mode).unwrap().is_empty());
            }
        }
    }
}
