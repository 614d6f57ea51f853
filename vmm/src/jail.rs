//! The jail: a VMM that drops, before it touches guest data, everything a
//! guest that escapes into it could use against the host.
//!
//! `relive-vmm run|restore|standby --jail UID:GID` enters it right after the
//! command line is read, while the process is still one thread:
//!
//! 1. **As root, on the host:** the resource limits known at start go on
//!    the VM's cgroup ([`crate::cgroup`]; the jail has no cgroup filesystem,
//!    so they cannot change later, see [`limits_fixed`]); the directories
//!    and files the VMM writes (the image directory and what is in it, the
//!    console log) are handed to `UID:GID`; the control socket is bound,
//!    the readiness socket connected and `/dev/kvm` opened, so the jail
//!    needs neither their directories nor the device.
//! 2. **New namespaces:** `unshare` of the mount, pid, network, IPC and UTS
//!    namespaces, then `fork`: the child is pid 1 of its own pid namespace
//!    (it sees no other process, and none can be signalled by number), has
//!    no network interface but a downed loopback, and its own mounts.
//! 3. **A minimal root:** the child mounts a private tmpfs (read-only once
//!    built) and bind-mounts into it, at their host paths, only what
//!    [`JailSpec::binds`] lists: the image directory (read-write), the
//!    console log (read-write), a kernel and initrd to boot (read-only),
//!    then `pivot_root`s into it and detaches the host's tree. No `/proc`,
//!    no `/dev`, no `/etc`: `/proc/self/smaps` (guest memory resident) is
//!    opened before the pivot ([`crate::memory::resident_bytes`]).
//! 4. **No privilege:** supplementary groups cleared, `setresgid` and
//!    `setresuid` to `GID` and `UID` (a non-root uid has no capabilities),
//!    the bounding and ambient capability sets emptied, `no_new_privs` set.
//!    The seccomp filters follow as each thread starts ([`crate::seccomp`]).
//!
//! # Who waits for the jailed VMM
//!
//! The process that was started stays outside the namespaces. Run from a
//! shell it waits for the jailed VMM, hands it the signals it gets (`INT`,
//! `QUIT`, `TERM`, `HUP`) and ends as it does (same exit status, or the same
//! signal); the VMM dies with it (`PR_SET_PDEATHSIG`). Started
//! by the supervisor (`--jail-detach`), it tells the supervisor the jailed
//! VMM's pid (`MAINPID=<pid>` on `NOTIFY_SOCKET`, as systemd's
//! `sd_notify` does for a forking service) and exits at once; the
//! supervisor is a child subreaper, so the VMM becomes its child: the pid
//! it watches, signals, records and adopts is the VMM's own, and there is
//! no extra process per VM.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, UnshareFlags};

use crate::snapshot::ResourceLimits;

/// Where each jailed VMM mounts its root tmpfs before it pivots into it: an
/// empty directory on the host, created when missing. Every VMM mounts its
/// own tmpfs there inside its own mount namespace, so they do not meet and
/// the host's view of the directory stays empty. Where it cannot be created
/// (a read-only `/run`, systemd's `ProtectSystem=strict`), any directory of
/// [`FALLBACK_MOUNT_POINTS`] does: mounting over a directory writes nothing
/// to it, and the host never sees the mount.
pub const ROOT_MOUNT_POINT: &str = "/run/relive-vmm-jail";

/// Existing directories that serve as the mount point when
/// [`ROOT_MOUNT_POINT`] cannot be created; never one that holds a path the
/// jail keeps (the tmpfs would hide it).
pub const FALLBACK_MOUNT_POINTS: [&str; 4] = ["/mnt", "/media", "/srv", "/opt"];

/// The directory to mount the jail's root on.
fn mount_point(binds: &[Bind]) -> Result<&'static Path, JailError> {
    let _ = std::fs::create_dir(ROOT_MOUNT_POINT);
    std::iter::once(ROOT_MOUNT_POINT)
        .chain(FALLBACK_MOUNT_POINTS)
        .map(Path::new)
        .find(|dir| dir.is_dir() && !binds.iter().any(|b| b.path.starts_with(dir)))
        .ok_or_else(|| JailError::Setup {
            what: "find a directory to mount the jail's root on (create it)",
            path: Some(PathBuf::from(ROOT_MOUNT_POINT)),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
}

/// How a bound path may be used inside the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (a kernel, an initrd, an image outside the image directory).
    ReadOnly,
    /// Read and write, and handed to the jail's uid and gid (the image
    /// directory, with what is in it; the console log).
    Owned,
}

/// A host path the jailed VMM keeps, at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The host path (a directory or a file); it must exist, except an
    /// `Owned` path, which is created (a directory when `dir`).
    pub path: PathBuf,
    /// How.
    pub access: Access,
    /// Whether `path` is a directory (created as one when missing).
    pub dir: bool,
}

/// Everything [`enter`] needs.
#[derive(Debug, Clone)]
pub struct JailSpec {
    /// The uid the VMM runs as (not 0).
    pub uid: u32,
    /// The gid the VMM runs as (not 0).
    pub gid: u32,
    /// What the jail keeps of the host's files.
    pub binds: Vec<Bind>,
    /// The control socket, bound before the jail.
    pub control: Option<PathBuf>,
    /// The cgroup name and the limits known at start, applied before the
    /// jail (the jail has no cgroup filesystem).
    pub limits: Option<(String, ResourceLimits)>,
    /// Started by a supervisor (a child subreaper): report the VMM's pid on
    /// `NOTIFY_SOCKET` and exit instead of waiting for it.
    pub detach: bool,
}

/// Entering the jail failed (nothing of the VM exists yet).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// Only root can create namespaces and mounts and change uid.
    #[error(
        "--jail needs root (it creates namespaces and mounts and changes uid): run relive-vmm as root, or without --jail"
    )]
    NotRoot,
    /// A jail uid or gid of 0 would be no jail.
    #[error(
        "--jail {uid}:{gid}: the jail's uid and gid must not be 0 (root); use a dedicated account"
    )]
    RootIds {
        /// The uid given.
        uid: u32,
        /// The gid given.
        gid: u32,
    },
    /// A system call of the jail's setup failed.
    #[error("cannot set up the jail: {what} {}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_default())]
    Setup {
        /// The step.
        what: &'static str,
        /// The path it was about, if any.
        path: Option<PathBuf>,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A path the jail keeps is missing.
    #[error("{} does not exist: the jail cannot keep it", path.display())]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The control socket could not be bound before the jail.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The limits could not be applied before the jail.
    #[error("cannot apply the VM's resource limits before the jail")]
    Cgroup(#[source] crate::cgroup::CgroupError),
}

fn setup(what: &'static str, path: Option<&Path>) -> impl FnOnce(io::Error) -> JailError {
    let path = path.map(Path::to_owned);
    move |source| JailError::Setup { what, path, source }
}

fn errno(e: rustix::io::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.raw_os_error())
}

/// What the jail is, once entered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jailed {
    /// The uid the VMM runs as.
    pub uid: u32,
    /// The gid it runs as.
    pub gid: u32,
    /// The limits applied before the jail (name, limits), if any.
    pub limits: Option<(String, ResourceLimits)>,
}

static JAILED: OnceLock<Jailed> = OnceLock::new();

/// `/dev/kvm`, opened before the jail (which has no `/dev`).
static KVM: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// This process's pid as the host sees it (in the jail's own pid
/// namespace, `getpid` says 1).
static HOST_PID: OnceLock<u32> = OnceLock::new();

/// The jail this VMM runs in, if any.
pub fn jailed() -> Option<&'static Jailed> {
    JAILED.get()
}

/// This VMM's pid on the host: what `status` reports and what the
/// supervisor watches, signals and records.
pub fn host_pid() -> u32 {
    HOST_PID.get().copied().unwrap_or_else(std::process::id)
}

/// A jailed VMM cannot move itself between cgroups or change their limits:
/// it keeps what was applied before the jail. Returns whether `limits` for
/// `name` are what is in force (`true`: nothing to do); `false` (logged)
/// when they differ, e.g. a standby started with other limits than the
/// image it takes. `None` when the VMM is not jailed (apply them).
pub fn limits_fixed(name: &str, limits: &ResourceLimits) -> Option<bool> {
    let jailed = jailed()?;
    let applied = jailed.limits.as_ref();
    let same = match applied {
        Some((n, l)) => n == name && l == limits,
        None => limits == &ResourceLimits::default(),
    };
    if !same {
        tracing::warn!(
            name,
            wanted = ?limits,
            applied = ?applied,
            "a jailed VMM keeps the cgroup limits it was started with; the image's take effect at its next start"
        );
    }
    Some(same)
}

/// A handle on KVM: the `/dev/kvm` opened before the jail when there is
/// one (each call gets its own descriptor), else a fresh open.
pub fn kvm() -> Result<kvm_ioctls::Kvm, kvm_ioctls::Error> {
    let kept = KVM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(OwnedFd::try_clone);
    match kept {
        Some(Ok(fd)) => {
            let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
            // SAFETY: `raw` is a descriptor of /dev/kvm that this process
            // owns (just duplicated) and hands to `Kvm`, which closes it.
            Ok(unsafe { kvm_ioctls::Kvm::from_raw_fd(raw) })
        }
        Some(Err(e)) => Err(vmm_sys_util::errno::Error::new(
            e.raw_os_error().unwrap_or(libc::EBADF),
        )),
        None => kvm_ioctls::Kvm::new(),
    }
}

/// Enters the jail (see the module documentation). Returns in the jailed
/// VMM; the process that was started either waits for it and exits as it
/// does, or (`detach`) exits at once. Must be called while the process has
/// one thread.
pub fn enter(spec: &JailSpec) -> Result<(), JailError> {
    if !rustix::process::geteuid().is_root() {
        return Err(JailError::NotRoot);
    }
    if spec.uid == 0 || spec.gid == 0 {
        return Err(JailError::RootIds {
            uid: spec.uid,
            gid: spec.gid,
        });
    }
    // 1. On the host, as root.
    for bind in &spec.binds {
        prepare_bind(bind, spec.uid, spec.gid)?;
    }
    if let Some((name, limits)) = &spec.limits {
        if limits != &ResourceLimits::default() {
            crate::cgroup::apply(name, limits).map_err(JailError::Cgroup)?;
        }
    }
    if let Some(path) = &spec.control {
        crate::control::prebind(path)?;
    }
    crate::vm::preconnect_notify();
    let kvm = File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(setup("open", Some(Path::new("/dev/kvm"))))?;
    *KVM.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(kvm.into());
    let root = mount_point(&spec.binds)?;

    // 2. New namespaces; the pid namespace takes the next child.
    // SAFETY: no FILES flag: the descriptor table stays shared (and there
    // is one thread anyway).
    unsafe {
        rustix::thread::unshare_unsafe(
            UnshareFlags::NEWNS
                | UnshareFlags::NEWPID
                | UnshareFlags::NEWNET
                | UnshareFlags::NEWIPC
                | UnshareFlags::NEWUTS,
        )
    }
    .map_err(|e| setup("unshare the namespaces", None)(errno(e)))?;
    // The child watches this process through it (it cannot name a parent
    // outside its pid namespace).
    let starter = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )
    .map_err(|e| setup("open a pidfd of the starter", None)(errno(e)))?;
    // The child goes on only once the starter has said `MAINPID` (or will
    // not): its `READY=1` must not overtake the message naming it.
    let (go_read, go_write) = pipe().map_err(setup("create a pipe", None))?;
    // SAFETY: the process has one thread (the caller's contract), so the
    // child's copy of every lock and allocator state is consistent.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(setup("fork into the pid namespace", None)(
            io::Error::last_os_error(),
        ));
    }
    if child > 0 {
        drop(go_read);
        outside(child, spec.detach, go_write);
    }
    drop(go_write);
    // EOF once the starter has reported the pid (or died).
    let _ = io::Read::read(&mut &go_read, &mut [0u8; 1]);
    drop(go_read);
    // 3. The minimal root. Until the pivot, /proc is still the host's, so
    // /proc/self names this process by its host pid.
    if let Some(pid) = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
    {
        let _ = HOST_PID.set(pid);
    }
    crate::memory::keep_smaps();
    build_root(root, &spec.binds)?;

    // 4. No privilege.
    drop_privileges(spec.uid, spec.gid)?;
    if !spec.detach {
        // Run from a shell: the VMM does not outlive the process waiting for
        // it. (Set after the uid change, which clears it; a starter that
        // died before is seen on its pidfd.)
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(|e| setup("set the parent death signal", None)(errno(e)))?;
        let mut poll = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&starter),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a zero timeout.
        if unsafe { libc::poll(&mut poll, 1, 0) } > 0 {
            std::process::exit(relive_control::exit::STATUS_VMM_ERROR);
        }
    }
    drop(starter);
    let _ = JAILED.set(Jailed {
        uid: spec.uid,
        gid: spec.gid,
        limits: spec.limits.clone(),
    });
    tracing::info!(uid = spec.uid, gid = spec.gid, "jailed");
    Ok(())
}

/// Creates an `Owned` path that is missing and hands it (and, for a
/// directory, what is in it) to the jail's ids; checks that the others exist.
fn prepare_bind(bind: &Bind, uid: u32, gid: u32) -> Result<(), JailError> {
    let path = &bind.path;
    if bind.access == Access::ReadOnly {
        return match path.try_exists() {
            Ok(true) => Ok(()),
            _ => Err(JailError::Missing { path: path.clone() }),
        };
    }
    if bind.dir {
        relive_images::private::create_dir_all(path).map_err(setup("create", Some(path)))?;
        chown_if(path, uid, gid)?;
        let entries = std::fs::read_dir(path).map_err(setup("read", Some(path)))?;
        for entry in entries.flatten() {
            chown_if(&entry.path(), uid, gid)?;
        }
    } else {
        relive_images::private::open_options()
            .create(true)
            .append(true)
            .open(path)
            .map_err(setup("create", Some(path)))?;
        chown_if(path, uid, gid)?;
    }
    Ok(())
}

/// Hands `path` to `uid:gid` unless it is theirs already (a symlink itself,
/// never its target).
fn chown_if(path: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let meta = std::fs::symlink_metadata(path).map_err(setup("stat", Some(path)))?;
    if meta.uid() == uid && meta.gid() == gid {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(setup("chown", Some(path)))
}

/// A pipe (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are new and owned here.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// The started process, outside the namespaces: reports the VMM's pid and
/// exits (`detach`), or waits for the VMM and ends as it did.
fn outside(child: libc::pid_t, detach: bool, go: File) -> ! {
    if detach {
        crate::vm::notify(&format!("MAINPID={child}\n"));
        drop(go);
        std::process::exit(0);
    }
    drop(go);
    // A signal for the VMM that reaches this process goes on to it (a
    // terminal's Ctrl-C reaches both: the VMM gets it twice, harmlessly).
    VMM_PID.store(child, std::sync::atomic::Ordering::Relaxed);
    for signal in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: `forward` only calls kill(2), which is async-signal-safe,
        // with a pid read from an atomic.
        unsafe { libc::signal(signal, forward as *const () as libc::sighandler_t) };
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer for the call.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            std::process::exit(relive_control::exit::STATUS_VMM_ERROR);
        }
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // SAFETY: restores the default action and re-raises the signal the
        // VMM died of, so whoever waits for this process sees the same end.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
    }
    std::process::exit(libc::WEXITSTATUS(status));
}

/// The jailed VMM, for [`forward`].
static VMM_PID: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The waiting starter's handler: hands the signal to the jailed VMM.
extern "C" fn forward(signal: libc::c_int) {
    let pid = VMM_PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes no pointer.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Builds the root tmpfs with the binds at their host paths, pivots into it
/// and detaches the host's tree.
fn build_root(root: &Path, binds: &[Bind]) -> Result<(), JailError> {
    let mnt = |what| move |e: rustix::io::Errno| setup(what, None)(errno(e));
    // Nothing mounted here may propagate back to the host.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(mnt("make the mounts private"))?;
    rustix::mount::mount(
        "tmpfs",
        root,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0755,size=1m,nr_inodes=1024",
    )
    .map_err(mnt("mount the root tmpfs"))?;
    // Parents before children: a bind under another must go on top of it.
    let mut binds: Vec<&Bind> = binds.iter().collect();
    binds.sort_by_key(|b| b.path.components().count());
    for bind in binds {
        let target = root.join(bind.path.strip_prefix("/").unwrap_or(&bind.path));
        let parent = target.parent().unwrap_or(root);
        std::fs::create_dir_all(parent).map_err(setup("create", Some(parent)))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
            .map_err(setup("chmod", Some(parent)))?;
        if bind.dir {
            std::fs::create_dir_all(&target).map_err(setup("create", Some(&target)))?;
        } else if !target.exists() {
            File::create(&target).map_err(setup("create", Some(&target)))?;
        }
        rustix::mount::mount_bind(&bind.path, &target)
            .map_err(|e| setup("bind-mount", Some(&bind.path))(errno(e)))?;
        let mut flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        if bind.access == Access::ReadOnly {
            flags |= MountFlags::RDONLY;
        }
        rustix::mount::mount_remount(&target, flags | MountFlags::BIND, c"")
            .map_err(|e| setup("restrict the bind mount", Some(&bind.path))(errno(e)))?;
    }
    std::env::set_current_dir(root).map_err(setup("enter", Some(root)))?;
    // pivot_root(".", "."): the old root ends up stacked under the new one
    // and is detached right away (no directory for it is needed).
    match rustix::process::pivot_root(".", ".") {
        Ok(()) => {
            rustix::mount::unmount(".", UnmountFlags::DETACH)
                .map_err(mnt("detach the host's root"))?;
        }
        Err(rustix::io::Errno::INVAL) => {
            // A host whose root is the initial ramfs (rootfs) cannot be
            // pivoted away from (the nested test tier's L1 is one): move
            // the new root over `/` and chroot into it, as runc does there.
            // The host's tree stays mounted below, out of reach: the VMM
            // has no CAP_SYS_CHROOT to climb out and no /proc to look.
            rustix::mount::mount_move(".", "/").map_err(mnt("move the root over /"))?;
            rustix::process::chroot(".").map_err(mnt("chroot"))?;
        }
        Err(e) => return Err(mnt("pivot_root")(e)),
    }
    std::env::set_current_dir("/").map_err(setup("enter", Some(Path::new("/"))))?;
    rustix::mount::mount_remount(
        "/",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"",
    )
    .map_err(mnt("make the root read-only"))?;
    Ok(())
}

/// Becomes `uid:gid` with no supplementary group, no capability in any set
/// and `no_new_privs`.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let sys = |what| move |e: rustix::io::Errno| setup(what, None)(errno(e));
    // The bounding set needs CAP_SETPCAP to shrink: before the uid changes.
    for cap in 0..=63u32 {
        // SAFETY: prctl(PR_CAPBSET_DROP) takes a capability number and no
        // pointer; numbers the kernel does not know fail with EINVAL, which
        // ends the loop's useful part and is ignored.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
            break;
        }
    }
    rustix::thread::clear_ambient_capability_set()
        .map_err(sys("clear the ambient capabilities"))?;
    rustix::thread::set_thread_groups(&[]).map_err(sys("clear the supplementary groups"))?;
    let gid = rustix::process::Gid::from_raw(gid);
    let uid = rustix::process::Uid::from_raw(uid);
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(sys("setresgid"))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(sys("setresuid"))?;
    // A non-root uid keeps no capability; make sure of it.
    let caps = rustix::thread::capabilities(None).map_err(sys("read the capabilities"))?;
    if caps.effective != CapabilitySet::empty() || caps.permitted != CapabilitySet::empty() {
        return Err(setup("drop the capabilities", None)(io::Error::other(
            "capabilities remain after setresuid",
        )));
    }
    rustix::thread::set_no_new_privs(true).map_err(sys("set no_new_privs"))?;
    Ok(())
}
