//! Seccomp filters: each kind of VMM thread may make only the system calls
//! (and, for `ioctl`, only the request numbers) its work needs.
//!
//! A guest that escapes into the VMM lands in one of its threads; the
//! filter decides what it can do there. The allow-lists below were taken
//! from what each thread really calls (`strace -f` of a VMM booting,
//! checkpointing full and incremental, restoring, taking a standby
//! restore, serving agent traffic and shutting down:
//! `scripts/seccomp-trace.sh` prints them per thread) and are checked by
//! the test suite running every one of those operations under them
//! (`tests/confinement.rs`).
//!
//! # Threads and inheritance
//!
//! Filters are per thread, and a thread inherits its creator's filter: a
//! new filter only ever narrows. So each thread installs its own filter
//! first thing ([`install`]), and a thread that creates others keeps in its
//! own list what they need before they narrow (`clone3`, the stack
//! `mmap`, `prctl(PR_SET_NAME)`, `seccomp` itself):
//!
//! | kind | thread | creates |
//! | --- | --- | --- |
//! | [`ThreadKind::EventLoop`] | the main thread once the VM runs: devices, agent, control requests, standby restore, live checkpoint rounds | checkpoint writers, the image store thread |
//! | [`ThreadKind::Vcpu`] | `vcpuN`: KVM_RUN and the vCPU's state | - |
//! | [`ThreadKind::Control`] | `control` (accept) and `control-conn` (one per connection) | connection threads |
//! | [`ThreadKind::Checkpoint`] | `checkpoint`: writes a live image | - |
//! | [`ThreadKind::ImageStore`] | `image-store`: verification, merges, retention | - |
//!
//! The main thread installs its filter when setup is over (KVM VM, memory,
//! vCPUs, devices, the image to restore are in place) and before the guest
//! runs; everything before that runs unfiltered, as it must create what the
//! filters then forbid creating.
//!
//! # A violation
//!
//! A call outside the list raises `SIGSYS` (`SECCOMP_RET_TRAP`); the handler
//! writes the exit record (`reason: seccomp`, status 15, the thread kind and
//! the system call number in `detail`) to stderr and ends the process, so
//! the supervisor sees a typed exit and fails the VM over like any crash.
//! `--no-seccomp` turns the filters off, for debugging only.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The compiled program of each kind, once [`prepare`]d: until then (in
/// tests that run a VM inside the test process) [`install`] does nothing.
static PROGRAMS: OnceLock<Vec<(ThreadKind, BpfProgram)>> = OnceLock::new();

/// Keeps glibc's allocator from opening a file on a filtered thread.
///
/// glibc reads `/proc/sys/vm/overcommit_memory` (an `openat`) the first
/// time it shrinks the heap of a per-thread arena (`shrink_heap` calls
/// `check_may_shrink_heap`, which caches the answer in a static), in
/// whichever thread frees the memory that lets the arena's top chunk pass
/// the trim threshold. Under the filters that `openat` on a vCPU thread
/// ended the VMM with the `seccomp` exit naming system call 257 (seen once
/// in 16 runs of the nested tier's container scenario, seconds after a
/// restore, while the supervisor took checkpoints). With a single arena (the main one, trimmed with `brk`) there
/// is no per-thread heap to shrink. The VMM's threads allocate little
/// (guest memory is mapped apart), so sharing one arena costs nothing
/// measurable. Call it first thing in `main`, before any thread exists.
pub fn single_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // thread is spawned, so no allocation runs concurrently with it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Compiles every kind's filter and installs the SIGSYS handler; from then
/// on each thread kind confines itself at its start. The `relive-vmm`
/// binary calls this at start unless `--no-seccomp`.
pub fn prepare() -> Result<(), SeccompError> {
    install_sigsys_handler()?;
    let programs = ThreadKind::ALL
        .into_iter()
        .map(|kind| Ok((kind, program(kind)?)))
        .collect::<Result<Vec<_>, SeccompError>>()?;
    let _ = PROGRAMS.set(programs);
    Ok(())
}

/// Whether filters are in force for threads that start from now on.
pub fn enabled() -> bool {
    PROGRAMS.get().is_some()
}

/// The kinds of VMM threads, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread running the VM's event loop.
    EventLoop,
    /// A vCPU thread.
    Vcpu,
    /// The control socket's threads.
    Control,
    /// A live checkpoint's writer.
    Checkpoint,
    /// The image store's background thread.
    ImageStore,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::Control,
        ThreadKind::Checkpoint,
        ThreadKind::ImageStore,
    ];

    /// The kind's name, as in exit records.
    pub const fn as_str(self) -> &'static str {
        match self {
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Control => "control",
            ThreadKind::Checkpoint => "checkpoint",
            ThreadKind::ImageStore => "image-store",
        }
    }
}

/// Installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules could not be compiled.
    #[error("cannot build the seccomp filter of the {kind} threads")]
    Build {
        /// Which.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::BackendError,
    },
    /// The kernel refused it.
    #[error("cannot install the seccomp filter of the {kind} threads")]
    Install {
        /// Which.
        kind: &'static str,
        /// Why.
        #[source]
        source: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
}

thread_local! {
    /// The kind of filter this thread installed, for the SIGSYS handler.
    static KIND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unfiltered") };
}

/// Installs the filter of `kind` on the calling thread (nothing before
/// [`prepare`] or with `--no-seccomp`).
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    let Some((_, program)) = programs.iter().find(|(k, _)| *k == kind) else {
        return Ok(());
    };
    KIND.with(|k| k.set(kind.as_str()));
    seccompiler::apply_filter(program).map_err(|source| SeccompError::Install {
        kind: kind.as_str(),
        source,
    })
}

/// [`install`] for a thread that cannot hand an error back: a thread that
/// cannot be confined ends the VMM (status 1) rather than run unconfined.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("relive-vmm: error: {}", relive_control::error_chain(&e));
        std::process::exit(relive_control::exit::STATUS_VMM_ERROR);
    }
}

/// The BPF program of `kind`.
pub fn program(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let build = |source| SeccompError::Build {
        kind: kind.as_str(),
        source,
    };
    let filter = SeccompFilter::new(
        rules(kind).map_err(build)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(build)
}

/// A syscall allowed with any arguments.
fn any(nr: libc::c_long) -> (i64, Vec<SeccompRule>) {
    (nr, Vec::new())
}

/// A syscall allowed when argument `arg` is one of `values`.
fn arg_in(
    nr: libc::c_long,
    arg: u8,
    len: SeccompCmpArgLen,
    values: &[u64],
) -> Result<(i64, Vec<SeccompRule>), seccompiler::BackendError> {
    let rules = values
        .iter()
        .map(|&v| {
            SeccompRule::new(vec![SeccompCondition::new(
                arg,
                len.clone(),
                SeccompCmpOp::Eq,
                v,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((nr, rules))
}

/// `ioctl` with one of `requests`.
fn ioctls(requests: &[u64]) -> Result<(i64, Vec<SeccompRule>), seccompiler::BackendError> {
    arg_in(libc::SYS_ioctl, 1, SeccompCmpArgLen::Dword, requests)
}

/// `prctl` with one of `options`.
fn prctls(options: &[i32]) -> Result<(i64, Vec<SeccompRule>), seccompiler::BackendError> {
    let options: Vec<u64> = options.iter().map(|&o| o as u64).collect();
    arg_in(libc::SYS_prctl, 0, SeccompCmpArgLen::Dword, &options)
}

/// What every thread does: memory, locks, time, signals, its own end, and
/// writing its logs.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
];

/// What a thread that creates threads needs for it (the new thread runs
/// these before it installs its own filter).
const SPAWN: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_seccomp,
];

/// Files: images, verdicts, the console, logs.
const FILES: &[libc::c_long] = &[
    libc::SYS_openat,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_getdents64,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_fchmod,
];

/// `ioctl` requests, numbered as the kernel's uapi defines them
/// (`linux/kvm.h`), with the `vmm-sys-util` macros and `kvm-bindings`
/// types `kvm-ioctls` itself uses.
#[allow(non_snake_case)] // the macros name functions after the requests
mod ioctl {
    use kvm_bindings::*;
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
    ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
    ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
    ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);

    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
    ioctl_iowr_nr!(KVM_IRQ_LINE_STATUS, KVMIO, 0x67, kvm_irq_level);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);

    /// Terminal: is the console a terminal, its size.
    pub const TCGETS: u64 = libc::TCGETS;
    pub const TIOCGWINSZ: u64 = libc::TIOCGWINSZ;
    /// Sockets and pipes: nonblocking, close-on-exec.
    pub const FIONBIO: u64 = libc::FIONBIO;
    pub const FIOCLEX: u64 = libc::FIOCLEX;
}

/// The vCPU's own ioctls: running it, and its state at a checkpoint or a
/// restore.
fn vcpu_ioctls() -> Vec<u64> {
    use ioctl::*;
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_SET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_GET_TSC_KHZ(),
        KVM_SET_TSC_KHZ(),
        KVM_KVMCLOCK_CTRL(),
        // The TSC offset (KVM_VCPU_TSC_CTRL), read at a save, set at a
        // restore.
        KVM_GET_DEVICE_ATTR(),
        KVM_SET_DEVICE_ATTR(),
    ]
    .to_vec()
}

/// The VM's ioctls: memory slots, dirty log, interrupt lines, irqchip, PIT
/// and clock state; and the console's terminal.
fn vm_ioctls() -> Vec<u64> {
    use ioctl::*;
    let mut v: Vec<u64> = vec![
        KVM_SET_USER_MEMORY_REGION(),
        KVM_GET_DIRTY_LOG(),
        KVM_IRQ_LINE(),
        KVM_IRQ_LINE_STATUS(),
        KVM_GET_IRQCHIP(),
        KVM_SET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_SET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_SET_PIT2(),
        KVM_IRQFD(),
        KVM_CHECK_EXTENSION(),
    ];
    v.extend([TCGETS, TIOCGWINSZ, FIONBIO, FIOCLEX]);
    v
}

/// The event loop's own calls besides files and thread creation.
const EVENT_LOOP: &[libc::c_long] = &[
    libc::SYS_mincore,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_create1,
    libc::SYS_eventfd2,
    libc::SYS_tgkill,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// The control threads' calls besides thread creation.
const CONTROL: &[libc::c_long] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
];

/// The allow-list of `kind`.
fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut calls: Vec<libc::c_long> = COMMON.to_vec();
    let mut requests: Vec<u64> = Vec::new();
    let mut options: Vec<i32> = Vec::new();
    match kind {
        ThreadKind::Vcpu => requests = vcpu_ioctls(),
        ThreadKind::EventLoop => {
            calls.extend(SPAWN);
            calls.extend(FILES);
            calls.extend(EVENT_LOOP);
            requests = vm_ioctls();
            options = vec![libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS];
        }
        ThreadKind::Control => {
            calls.extend(SPAWN);
            calls.extend(CONTROL);
            requests = vec![ioctl::FIONBIO, ioctl::FIOCLEX];
            options = vec![libc::PR_SET_NAME, libc::PR_SET_NO_NEW_PRIVS];
        }
        ThreadKind::Checkpoint => {
            calls.extend(FILES);
            // The pre-copy rounds read the dirty log while the guest runs.
            requests = vec![ioctl::KVM_GET_DIRTY_LOG()];
        }
        ThreadKind::ImageStore => calls.extend(FILES),
    }
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = calls.into_iter().map(any).collect();
    if !requests.is_empty() {
        map.extend([ioctls(&requests)?]);
    }
    if !options.is_empty() {
        map.extend([prctls(&options)?]);
    }
    Ok(map)
}

/// Exit status of a VMM that broke its filter.
pub const STATUS: i32 = relive_control::ExitReason::Seccomp.status();

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
            .map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e.errno())));
    });
    result
}

/// Appends `n` in decimal to `buf` at `at`; returns the new end.
fn push_decimal(buf: &mut [u8], mut at: usize, n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    let mut n = n;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..len].iter().rev() {
        if at < buf.len() {
            buf[at] = *d;
            at += 1;
        }
    }
    at
}

fn push_str(buf: &mut [u8], mut at: usize, s: &[u8]) -> usize {
    for &b in s {
        if at < buf.len() {
            buf[at] = b;
            at += 1;
        }
    }
    at
}

/// The SIGSYS handler: the exit record, then the end of the process. Only
/// async-signal-safe work: no allocation, no lock, `write` and `_exit`.
extern "C" fn on_sigsys(_signal: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; for seccomp
    // traps (si_code SYS_SECCOMP) its union holds `_sigsys`: call address
    // (8 bytes at offset 16), syscall number (i32 at offset 24).
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let kind = KIND.with(std::cell::Cell::get);
    let mut buf = [0u8; 256];
    let mut at = push_str(
        &mut buf,
        0,
        b"{\"event\":\"vm-exit\",\"reason\":\"seccomp\",\"status\":",
    );
    at = push_decimal(&mut buf, at, STATUS as u64);
    at = push_str(&mut buf, at, b",\"uptime_ms\":0,\"detail\":\"the ");
    at = push_str(&mut buf, at, kind.as_bytes());
    at = push_str(&mut buf, at, b" thread made system call ");
    at = push_decimal(&mut buf, at, u64::from(nr.unsigned_abs()));
    at = push_str(&mut buf, at, b", which its seccomp filter forbids\"}\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..at]` is
    // initialized memory of this frame.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), at);
        libc::_exit(STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_to_a_program() {
        for kind in ThreadKind::ALL {
            let p = program(kind).unwrap();
            assert!(!p.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // Values from linux/kvm.h as the kernel defines them.
        assert_eq!(ioctl::KVM_RUN(), 0xae80);
        assert_eq!(ioctl::KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(ioctl::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(ioctl::KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(ioctl::KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(ioctl::KVM_KVMCLOCK_CTRL(), 0xaead);
    }

    #[test]
    fn the_record_is_an_exit_record() {
        let mut buf = [0u8; 64];
        let end = push_decimal(&mut buf, 0, 1234567);
        assert_eq!(&buf[..end], b"1234567");
        let end = push_decimal(&mut buf, 0, 0);
        assert_eq!(&buf[..end], b"0");
    }
}
