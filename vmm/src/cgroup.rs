//! Host resource limits of a VM process: cgroups.
//!
//! An image's `Limits` section ([`ResourceLimits`]) says how much CPU, memory
//! and how many tasks the VMM process of a VM may use. [`apply`] puts the
//! calling process, with all its threads (vCPUs included), into a cgroup named
//! `relive/<name>` that carries those limits, creating it when needed; a restore
//! reuses the name, so an existing cgroup, even one with live processes in it,
//! is reused as it is. [`read_limits`] reads back what is in force for a process.
//!
//! # Where the cgroup lives
//!
//! The layout comes from `/proc/self/mountinfo` (`cgroup2` mounts, and `cgroup`
//! mounts with their controllers in the super options) and the process's place
//! in each hierarchy from `/proc/<pid>/cgroup`. The cgroup is created *below the
//! cgroup the process already runs in* (the supervisor's, which a VMM inherits),
//! so whatever limits the host put on relive as a whole still hold, and relive
//! only writes inside its own part of the tree:
//! `<mount>/<current cgroup>/relive/<name>`. For a process in the root cgroup
//! that is e.g. `/sys/fs/cgroup/memory/relive/<name>`. A process that already
//! sits in some `relive/<other>` (a standby VMM taking an image) is moved to the
//! sibling `relive/<name>`, not nested deeper.
//!
//! # cgroup v2 or v1
//!
//! Only the controllers whose limit is `Some` are needed; a limit of `None`
//! leaves that controller, and the process's place in its hierarchy, alone.
//! With no limit at all nothing is created and the process is not moved.
//!
//! - **v2** is used when the process's cgroup in the unified hierarchy offers
//!   every needed controller (its `cgroup.controllers`). relive then enables
//!   them for its children (`+cpu +memory +pids` in `cgroup.subtree_control`,
//!   of the current cgroup and of `relive/`), creates `relive/<name>`, writes
//!   the limits and the pid into `cgroup.procs`. v2 forbids enabling
//!   controllers for children of a non-root cgroup that holds processes
//!   itself; run the supervisor in a leaf below a delegated cgroup whose
//!   `subtree_control` already has the controllers, or at the root.
//! - **v1** is used otherwise: each needed controller must be mounted as a v1
//!   hierarchy (`/sys/fs/cgroup/<controller>`); in every hierarchy used (one
//!   per mount, co-mounted controllers share one) relive creates
//!   `relive/<name>`, writes the limits and then the pid into `cgroup.procs`.
//!
//! All limits are written in every hierarchy before the process is moved into
//! any of them, so a limit the kernel refuses leaves the process where it was.
//!
//! # What each limit maps to
//!
//! | limit | v2 | v1 |
//! | --- | --- | --- |
//! | `cpu_percent` (of one core) | `cpu.max` = `<percent * 1000> 100000` | `cpu.cfs_period_us` = `100000`, then `cpu.cfs_quota_us` = `percent * 1000` |
//! | `memory_bytes` | `memory.max` | `memory.limit_in_bytes` |
//! | `pids` | `pids.max` | `pids.max` |
//!
//! The kernel rounds memory limits down to whole pages; swap is not limited.
//!
//! # Reading back
//!
//! [`read_limits`] reports the limit in force for each controller: the
//! tightest one along the path from the process's cgroup up to the top of the
//! mounted hierarchy (a parent's limit holds for its children too), `None`
//! where no level limits it or the controller is not available at all.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::snapshot::ResourceLimits;

/// The directory, below a process's current cgroup, that holds relive's cgroups.
const GROUP_DIR: &str = "relive";
/// CPU bandwidth period in microseconds; the quota is `percent * 1000` of it.
pub const CPU_PERIOD_US: u64 = 100_000;
/// Longest accepted cgroup name.
pub const MAX_NAME_LEN: usize = 64;
/// Where the mount table is read from.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// v1 reports "no memory limit" as the largest page multiple below `i64::MAX`;
/// anything at or above this (page sizes up to 64 KiB) means unlimited.
const V1_MEMORY_UNLIMITED: u64 = 0x7fff_ffff_ffff_0000;
/// How often creating `relive/<name>` is tried when a concurrent cleanup
/// removes an empty `relive/` in between.
const CREATE_ATTEMPTS: usize = 3;

/// Which cgroup hierarchy limits were applied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One v1 hierarchy per controller (`/sys/fs/cgroup/<controller>`).
    V1,
    /// The unified v2 hierarchy.
    V2,
}

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedCgroup {
    /// The hierarchy version used.
    pub version: CgroupVersion,
    /// The cgroup directory in each hierarchy used (one for v2; empty when no
    /// limit was set).
    pub dirs: Vec<PathBuf>,
}

/// Why limits could not be applied or read.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The cgroup name is unusable.
    #[error("invalid cgroup name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The host offers no cgroup hierarchy with a needed controller.
    #[error("cgroups are not available: {reason}")]
    Unavailable {
        /// What is missing.
        reason: String,
    },
    /// The mount table could not be read.
    #[error("cannot read the mount table: {}", path.display())]
    Mounts {
        /// The file read.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A process's cgroup memberships could not be read.
    #[error("cannot read the cgroups of process {pid}: {}", path.display())]
    ProcessCgroups {
        /// The process.
        pid: u32,
        /// The file read.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup was refused for lack of permission.
    #[error(
        "cgroups are not writable here (relive needs root or a delegated cgroup): cannot create {}",
        path.display()
    )]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup failed.
    #[error("cannot create the cgroup {}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Controllers could not be listed or enabled for child cgroups (v2).
    #[error("cannot enable the {controllers} controllers for child cgroups: {}", path.display())]
    EnableControllers {
        /// The controllers, space separated.
        controllers: String,
        /// The `cgroup.controllers` or `cgroup.subtree_control` file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A limit was refused.
    #[error("cannot set the {what}: {}", path.display())]
    SetLimit {
        /// Which limit ("memory limit", ...).
        what: &'static str,
        /// The file written.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The process could not be moved into the cgroup.
    #[error("cannot move process {pid} into the cgroup: {}", path.display())]
    Move {
        /// The process.
        pid: u32,
        /// The `cgroup.procs` file written.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A limit could not be read.
    #[error("cannot read the {what}: {}", path.display())]
    ReadLimit {
        /// Which limit.
        what: &'static str,
        /// The file read.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A cgroup file held something unexpected.
    #[error("unexpected content in {}: {content:?}", path.display())]
    Parse {
        /// The file read.
        path: PathBuf,
        /// What it held.
        content: String,
    },
}

/// Puts the calling process (all its threads) into the cgroup `relive/<name>`
/// with `limits`, creating it; see the module documentation for where it lives,
/// the v2/v1 choice and the files written. A limit of `None` leaves its
/// controller alone.
pub fn apply(name: &str, limits: &ResourceLimits) -> Result<AppliedCgroup, CgroupError> {
    apply_to(std::process::id(), name, limits)
}

/// [`apply`] for any process `pid` (all its threads); tests use it on a child.
pub(crate) fn apply_to(
    pid: u32,
    name: &str,
    limits: &ResourceLimits,
) -> Result<AppliedCgroup, CgroupError> {
    validate_name(name)?;
    let needed = needed(limits);
    let layout = Layout::read();
    let procs = ProcCgroups::read(pid);
    if needed.is_empty() {
        // Nothing to limit: touch nothing, not even on a host without cgroups.
        let version = match (layout, procs) {
            (Ok(layout), Ok(procs)) => preferred_version(&layout, &procs),
            _ => CgroupVersion::V1,
        };
        return Ok(AppliedCgroup {
            version,
            dirs: Vec::new(),
        });
    }
    let plan = plan(&layout?, &procs?, &needed)?;
    execute(&plan, pid, name, limits)
}

/// Reads back the limits in force for process `pid` (from `/proc/<pid>/cgroup`
/// and the cgroup files): per controller the tightest limit from its cgroup up
/// to the top of the mounted hierarchy.
pub fn read_limits(pid: u32) -> Result<ResourceLimits, CgroupError> {
    read_limits_in(&Layout::read()?, &ProcCgroups::read(pid)?)
}

/// Checks that `name` is usable as one cgroup directory name.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("it is longer than 64 bytes")
    } else if name.contains('/') {
        Some("it contains '/'")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A controller relive sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Controller {
    Cpu,
    Memory,
    Pids,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Cpu, Controller::Memory, Controller::Pids];

    /// The kernel's name of the controller.
    fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    /// The limit it enforces, for messages.
    fn what(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu quota",
            Controller::Memory => "memory limit",
            Controller::Pids => "pids limit",
        }
    }
}

/// The controllers whose limit is set.
fn needed(limits: &ResourceLimits) -> Vec<Controller> {
    let mut needed = Vec::new();
    if limits.cpu_percent.is_some() {
        needed.push(Controller::Cpu);
    }
    if limits.memory_bytes.is_some() {
        needed.push(Controller::Memory);
    }
    if limits.pids.is_some() {
        needed.push(Controller::Pids);
    }
    needed
}

/// The files to write, in order, for `controller`'s limit.
fn limit_files(
    version: CgroupVersion,
    controller: Controller,
    limits: &ResourceLimits,
) -> Vec<(&'static str, String)> {
    match (controller, version) {
        (Controller::Cpu, version) => match limits.cpu_percent {
            Some(percent) => {
                let quota = u64::from(percent) * CPU_PERIOD_US / 100;
                match version {
                    CgroupVersion::V2 => vec![("cpu.max", format!("{quota} {CPU_PERIOD_US}"))],
                    CgroupVersion::V1 => vec![
                        ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                        ("cpu.cfs_quota_us", quota.to_string()),
                    ],
                }
            }
            None => Vec::new(),
        },
        (Controller::Memory, CgroupVersion::V2) => limits
            .memory_bytes
            .map(|bytes| vec![("memory.max", bytes.to_string())])
            .unwrap_or_default(),
        (Controller::Memory, CgroupVersion::V1) => limits
            .memory_bytes
            .map(|bytes| vec![("memory.limit_in_bytes", bytes.to_string())])
            .unwrap_or_default(),
        (Controller::Pids, _) => limits
            .pids
            .map(|pids| vec![("pids.max", pids.to_string())])
            .unwrap_or_default(),
    }
}

/// One cgroup filesystem mount.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    /// The cgroup path inside the hierarchy that is mounted (usually `/`).
    root: String,
    /// Where it is mounted.
    point: PathBuf,
    /// v1 with its super options (the controllers among them), or v2.
    kind: MountKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MountKind {
    V1(Vec<String>),
    V2,
}

/// The cgroup mounts of this mount namespace.
#[derive(Debug, Clone, Default)]
struct Layout {
    mounts: Vec<Mount>,
}

impl Layout {
    fn read() -> Result<Self, CgroupError> {
        let text = fs::read_to_string(MOUNTINFO).map_err(|source| CgroupError::Mounts {
            path: PathBuf::from(MOUNTINFO),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses `/proc/<pid>/mountinfo`: `id parent dev root point options
    /// [optional...] - fstype source super-options`.
    fn parse(text: &str) -> Self {
        let mounts = text
            .lines()
            .filter_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let left: Vec<&str> = left.split(' ').collect();
                let mut right = right.split(' ');
                let fstype = right.next()?;
                let super_options = right.nth(1).unwrap_or("");
                let kind = match fstype {
                    "cgroup2" => MountKind::V2,
                    "cgroup" => {
                        MountKind::V1(super_options.split(',').map(str::to_owned).collect())
                    }
                    _ => return None,
                };
                Some(Mount {
                    root: unescape(left.get(3)?),
                    point: PathBuf::from(unescape(left.get(4)?)),
                    kind,
                })
            })
            .collect();
        Self { mounts }
    }

    /// The v1 mounts of `controller`'s hierarchy.
    fn v1(&self, controller: Controller) -> impl Iterator<Item = &Mount> {
        self.mounts.iter().filter(move |m| match &m.kind {
            MountKind::V1(options) => options.iter().any(|o| o == controller.name()),
            MountKind::V2 => false,
        })
    }

    /// The v2 mounts.
    fn v2(&self) -> impl Iterator<Item = &Mount> {
        self.mounts.iter().filter(|m| m.kind == MountKind::V2)
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A process's cgroups, from `/proc/<pid>/cgroup`.
#[derive(Debug, Clone, Default)]
struct ProcCgroups {
    /// v1 lines: the hierarchy's controllers (and `name=` options) and the path.
    v1: Vec<(Vec<String>, String)>,
    /// The v2 line's path.
    v2: Option<String>,
}

impl ProcCgroups {
    fn read(pid: u32) -> Result<Self, CgroupError> {
        let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Self::parse(&text)),
            Err(source) => Err(CgroupError::ProcessCgroups { pid, path, source }),
        }
    }

    /// Parses lines `id:controllers:path`; v2's is `0::path`.
    fn parse(text: &str) -> Self {
        let mut procs = Self::default();
        for line in text.lines() {
            let mut fields = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            if id == "0" && controllers.is_empty() {
                procs.v2 = Some(path.to_owned());
            } else {
                let controllers = controllers.split(',').map(str::to_owned).collect();
                procs.v1.push((controllers, path.to_owned()));
            }
        }
        procs
    }

    /// The path in `controller`'s v1 hierarchy.
    fn v1(&self, controller: Controller) -> Option<&str> {
        self.v1
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == controller.name()))
            .map(|(_, path)| path.as_str())
    }
}

/// A cgroup located in the filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Located {
    /// The mount point of its hierarchy.
    mount: PathBuf,
    /// Its directory.
    dir: PathBuf,
}

/// Finds the directory of cgroup `path` under one of `mounts`.
fn locate<'a>(mounts: impl IntoIterator<Item = &'a Mount>, path: &str) -> Option<Located> {
    mounts.into_iter().find_map(|mount| {
        let rest = if mount.root == "/" {
            Some(path)
        } else if path == mount.root {
            Some("")
        } else {
            path.strip_prefix(mount.root.as_str())
                .filter(|rest| rest.starts_with('/'))
        }?;
        let rest = rest.trim_start_matches('/');
        let dir = if rest.is_empty() {
            mount.point.clone()
        } else {
            mount.point.join(rest)
        };
        Some(Located {
            mount: mount.point.clone(),
            dir,
        })
    })
}

/// The cgroup relive's directory goes under: `path` itself, or its
/// grandparent when `path` is already some `relive/<name>`.
fn base_of(path: &str) -> &str {
    let stripped = path.rsplit_once('/').and_then(|(parent, last)| {
        let (grand, dir) = parent.rsplit_once('/')?;
        (dir == GROUP_DIR && validate_name(last).is_ok()).then_some(grand)
    });
    match stripped {
        Some("") => "/",
        Some(grand) => grand,
        None => path,
    }
}

/// The process's base cgroup in the v2 hierarchy, when v2 is mounted.
fn v2_base(layout: &Layout, procs: &ProcCgroups) -> Option<PathBuf> {
    let path = procs.v2.as_deref()?;
    locate(layout.v2(), base_of(path)).map(|l| l.dir)
}

/// Whether the v2 cgroup `dir` offers every one of `controllers` (`false`
/// when its `cgroup.controllers` cannot be read: then v1 is tried).
fn v2_offers(dir: &Path, controllers: &[Controller]) -> bool {
    read_controllers(&dir.join("cgroup.controllers"), controllers).is_ok_and(|offered| {
        controllers
            .iter()
            .all(|c| offered.iter().any(|o| o == c.name()))
    })
}

/// Reads a v2 controller list file (`cgroup.controllers`, `cgroup.subtree_control`).
fn read_controllers(path: &Path, controllers: &[Controller]) -> Result<Vec<String>, CgroupError> {
    let text = fs::read_to_string(path).map_err(|source| CgroupError::EnableControllers {
        controllers: names(controllers),
        path: path.to_owned(),
        source,
    })?;
    Ok(text.split_whitespace().map(str::to_owned).collect())
}

/// `controllers`' names, space separated.
fn names(controllers: &[Controller]) -> String {
    controllers
        .iter()
        .map(|c| c.name())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The version [`apply`] would use for all three limits.
fn preferred_version(layout: &Layout, procs: &ProcCgroups) -> CgroupVersion {
    match v2_base(layout, procs) {
        Some(dir) if v2_offers(&dir, &Controller::ALL) => CgroupVersion::V2,
        _ => CgroupVersion::V1,
    }
}

/// Where and how limits are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    version: CgroupVersion,
    /// One entry per hierarchy: the base cgroup directory and its controllers
    /// among the needed ones.
    hierarchies: Vec<(PathBuf, Vec<Controller>)>,
}

/// Chooses v2 or v1 for the `needed` controllers and locates the base cgroups.
fn plan(layout: &Layout, procs: &ProcCgroups, needed: &[Controller]) -> Result<Plan, CgroupError> {
    if layout.mounts.is_empty() {
        return Err(CgroupError::Unavailable {
            reason: format!("no cgroup filesystem is mounted (see {MOUNTINFO})"),
        });
    }
    if let Some(base) = v2_base(layout, procs) {
        if v2_offers(&base, needed) {
            return Ok(Plan {
                version: CgroupVersion::V2,
                hierarchies: vec![(base, needed.to_vec())],
            });
        }
    }
    let mut hierarchies: Vec<(PathBuf, PathBuf, Vec<Controller>)> = Vec::new();
    for &controller in needed {
        let located = procs
            .v1(controller)
            .and_then(|path| locate(layout.v1(controller), base_of(path)))
            .ok_or_else(|| CgroupError::Unavailable {
                reason: format!(
                    "the {} controller is neither enabled in cgroup v2 nor mounted as a cgroup v1 hierarchy",
                    controller.name()
                ),
            })?;
        match hierarchies
            .iter_mut()
            .find(|(mount, _, _)| *mount == located.mount)
        {
            Some((_, _, controllers)) => controllers.push(controller),
            None => hierarchies.push((located.mount, located.dir, vec![controller])),
        }
    }
    Ok(Plan {
        version: CgroupVersion::V1,
        hierarchies: hierarchies
            .into_iter()
            .map(|(_, base, controllers)| (base, controllers))
            .collect(),
    })
}

/// Creates the cgroups of `plan`, writes the limits, then moves `pid` in.
fn execute(
    plan: &Plan,
    pid: u32,
    name: &str,
    limits: &ResourceLimits,
) -> Result<AppliedCgroup, CgroupError> {
    let mut dirs = Vec::with_capacity(plan.hierarchies.len());
    for (base, controllers) in &plan.hierarchies {
        let dir = create(plan.version, base, name, controllers)?;
        for &controller in controllers {
            for (file, value) in limit_files(plan.version, controller, limits) {
                let path = dir.join(file);
                write_file(&path, &value).map_err(|source| CgroupError::SetLimit {
                    what: controller.what(),
                    path,
                    source,
                })?;
            }
        }
        dirs.push(dir);
    }
    for dir in &dirs {
        let path = dir.join("cgroup.procs");
        write_file(&path, &pid.to_string()).map_err(|source| CgroupError::Move {
            pid,
            path,
            source,
        })?;
    }
    Ok(AppliedCgroup {
        version: plan.version,
        dirs,
    })
}

/// Creates `<base>/relive/<name>` (v2: with `controllers` enabled on the way
/// down) and returns its path; an existing one is fine.
fn create(
    version: CgroupVersion,
    base: &Path,
    name: &str,
    controllers: &[Controller],
) -> Result<PathBuf, CgroupError> {
    let group = base.join(GROUP_DIR);
    let dir = group.join(name);
    let mut attempt = 1;
    loop {
        if version == CgroupVersion::V2 {
            enable_controllers(base, controllers)?;
        }
        make_dir(&group)?;
        if version == CgroupVersion::V2 {
            enable_controllers(&group, controllers)?;
        }
        match fs::create_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < CREATE_ATTEMPTS => {
                // A concurrent cleanup removed the empty `relive/`: redo it.
                attempt += 1;
            }
            result => return check_created(result, dir),
        }
    }
}

/// Creates directory `path`; an existing one is fine.
fn make_dir(path: &Path) -> Result<(), CgroupError> {
    check_created(fs::create_dir(path), path.to_owned()).map(|_| ())
}

/// Turns the result of creating `path` into its path or the right error.
fn check_created(result: io::Result<()>, path: PathBuf) -> Result<PathBuf, CgroupError> {
    match result {
        Ok(()) => Ok(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(path),
        Err(source)
            if matches!(
                source.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Err(CgroupError::NotWritable { path, source })
        }
        Err(source) => Err(CgroupError::Create { path, source }),
    }
}

/// Enables `controllers` for the children of v2 cgroup `dir`, writing only
/// those not enabled yet.
fn enable_controllers(dir: &Path, controllers: &[Controller]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = read_controllers(&path, controllers)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.iter().any(|e| e == c.name()))
        .map(|c| format!("+{}", c.name()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write_file(&path, &missing.join(" ")).map_err(|source| CgroupError::EnableControllers {
        controllers: names(controllers),
        path,
        source,
    })
}

/// Writes `value` to an existing cgroup file in one `write`, so the kernel's
/// verdict comes back as the error.
fn write_file(path: &Path, value: &str) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// [`read_limits`] on a given layout.
fn read_limits_in(layout: &Layout, procs: &ProcCgroups) -> Result<ResourceLimits, CgroupError> {
    Ok(ResourceLimits {
        cpu_percent: in_force(layout, procs, Controller::Cpu)?
            .map(|percent| u32::try_from(percent).unwrap_or(u32::MAX)),
        memory_bytes: in_force(layout, procs, Controller::Memory)?,
        pids: in_force(layout, procs, Controller::Pids)?,
    })
}

/// The tightest `controller` limit from the process's cgroup up to the top of
/// its mounted hierarchy (cpu in percent).
fn in_force(
    layout: &Layout,
    procs: &ProcCgroups,
    controller: Controller,
) -> Result<Option<u64>, CgroupError> {
    let v1 = procs
        .v1(controller)
        .and_then(|path| locate(layout.v1(controller), path));
    let (version, located) = match v1 {
        Some(located) => (CgroupVersion::V1, located),
        None => match procs.v2.as_deref().and_then(|p| locate(layout.v2(), p)) {
            Some(located) => (CgroupVersion::V2, located),
            None => return Ok(None),
        },
    };
    let mut tightest: Option<u64> = None;
    let mut dir = located.dir.as_path();
    loop {
        if let Some(limit) = read_level(version, controller, dir)? {
            tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
        }
        match dir.parent() {
            Some(parent) if dir != located.mount && dir.starts_with(&located.mount) => {
                dir = parent;
            }
            _ => return Ok(tightest),
        }
    }
}

/// The `controller` limit set in cgroup `dir` itself (cpu in percent).
fn read_level(
    version: CgroupVersion,
    controller: Controller,
    dir: &Path,
) -> Result<Option<u64>, CgroupError> {
    let what = controller.what();
    match (controller, version) {
        (Controller::Cpu, CgroupVersion::V1) => {
            let quota_path = dir.join("cpu.cfs_quota_us");
            let Some(quota) = read_file(&quota_path, what)? else {
                return Ok(None);
            };
            let quota: i64 = parse(&quota_path, &quota)?;
            let Ok(quota) = u64::try_from(quota) else {
                return Ok(None); // -1: no quota
            };
            let period_path = dir.join("cpu.cfs_period_us");
            let period = read_file(&period_path, what)?.unwrap_or_default();
            let period: u64 = parse(&period_path, &period)?;
            Ok(Some(percent(quota, period, &period_path)?))
        }
        (Controller::Cpu, CgroupVersion::V2) => {
            let path = dir.join("cpu.max");
            let Some(text) = read_file(&path, what)? else {
                return Ok(None);
            };
            let mut fields = text.split_whitespace();
            match (fields.next(), fields.next()) {
                (Some("max"), _) => Ok(None),
                (Some(quota), Some(period)) => {
                    let quota: u64 = parse(&path, quota)?;
                    let period: u64 = parse(&path, period)?;
                    Ok(Some(percent(quota, period, &path)?))
                }
                _ => Err(parse_error(&path, &text)),
            }
        }
        (Controller::Memory, CgroupVersion::V1) => {
            let path = dir.join("memory.limit_in_bytes");
            match read_file(&path, what)? {
                Some(text) => {
                    let bytes: u64 = parse(&path, &text)?;
                    Ok((bytes < V1_MEMORY_UNLIMITED).then_some(bytes))
                }
                None => Ok(None),
            }
        }
        (Controller::Memory, CgroupVersion::V2) => read_max(&dir.join("memory.max"), what),
        (Controller::Pids, _) => read_max(&dir.join("pids.max"), what),
    }
}

/// Reads a v2-style limit: a number, or `max` for none.
fn read_max(path: &Path, what: &'static str) -> Result<Option<u64>, CgroupError> {
    match read_file(path, what)? {
        Some(text) if text.trim() == "max" => Ok(None),
        Some(text) => parse(path, &text).map(Some),
        None => Ok(None),
    }
}

/// `quota` of `period` in percent of one core, rounded to the nearest.
fn percent(quota: u64, period: u64, path: &Path) -> Result<u64, CgroupError> {
    if period == 0 {
        return Err(parse_error(path, "0"));
    }
    let percent = (u128::from(quota) * 100 + u128::from(period) / 2) / u128::from(period);
    Ok(u64::try_from(percent).unwrap_or(u64::MAX))
}

/// Reads a cgroup file; `None` when this cgroup does not have it.
fn read_file(path: &Path, what: &'static str) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::ReadLimit {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

/// Parses a number from a cgroup file.
fn parse<T: std::str::FromStr>(path: &Path, text: &str) -> Result<T, CgroupError> {
    text.trim().parse().map_err(|_| parse_error(path, text))
}

fn parse_error(path: &Path, text: &str) -> CgroupError {
    CgroupError::Parse {
        path: path.to_owned(),
        content: text.trim().to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test fails by panicking on an unexpected error.
mod tests {
    use std::process::{Child, Command, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Environment variable naming the cgroup for [`apply_child`].
    const CHILD_NAME_ENV: &str = "RELIVE_CGROUP_TEST_NAME";
    /// What [`apply_child`] prints before each cgroup directory it was put in.
    const CHILD_DIR_PREFIX: &str = "relive-cgroup-dir=";

    fn limits() -> ResourceLimits {
        ResourceLimits {
            cpu_percent: Some(50),
            memory_bytes: Some(64 << 20),
            pids: Some(32),
        }
    }

    /// A cgroup name unique to this test process and call.
    fn unique_name(tag: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        format!("test-{}-{tag}-{n}", std::process::id())
    }

    /// Whether this host lets us create cgroups with all three controllers
    /// under our own cgroups: probes by creating and removing a directory in
    /// each hierarchy apply would use.
    fn cgroups_usable() -> Result<(), String> {
        let layout = Layout::read().map_err(|e| e.to_string())?;
        let procs = ProcCgroups::read(std::process::id()).map_err(|e| e.to_string())?;
        let plan = plan(&layout, &procs, &Controller::ALL).map_err(|e| e.to_string())?;
        for (base, _) in &plan.hierarchies {
            let probe = base.join(unique_name("probe"));
            fs::create_dir(&probe)
                .map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
            fs::remove_dir(&probe)
                .map_err(|e| format!("cannot remove {}: {e}", probe.display()))?;
        }
        Ok(())
    }

    /// Whether to run a test that needs a writable cgroup filesystem; prints
    /// why not, and fails instead when `RELIVE_REQUIRE_KVM=1`.
    fn require_cgroups(test: &str) -> bool {
        match cgroups_usable() {
            Ok(()) => true,
            Err(reason) => {
                assert!(
                    std::env::var("RELIVE_REQUIRE_KVM").as_deref() != Ok("1"),
                    "{test}: cgroups are not writable here: {reason} (RELIVE_REQUIRE_KVM=1 forbids skipping)"
                );
                eprintln!("skipping {test}: cgroups are not writable here: {reason}");
                false
            }
        }
    }

    /// Child processes and cgroup directories of a test: on drop the children
    /// are killed and reaped, then the directories removed (and `relive/`
    /// when it is left empty), even when the test failed.
    #[derive(Default)]
    struct Cleanup {
        children: Vec<Child>,
        dirs: Vec<PathBuf>,
    }

    impl Cleanup {
        /// Starts a `sleep` child and returns its pid.
        fn spawn(&mut self) -> u32 {
            let child = Command::new("sleep")
                .arg("30")
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            let pid = child.id();
            self.children.push(child);
            pid
        }
    }

    impl Drop for Cleanup {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for dir in &self.dirs {
                let _ = fs::remove_dir(dir);
            }
            for dir in &self.dirs {
                if let Some(group) = dir.parent() {
                    // Fails while another test or VM still has a cgroup there.
                    let _ = fs::remove_dir(group);
                }
            }
        }
    }

    fn cgroup_text(pid: u32) -> String {
        fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap()
    }

    /// The line of `/proc/<pid>/cgroup` text for `controller` (v1) or the v2 line.
    fn line_for(text: &str, version: CgroupVersion, controller: Controller) -> &str {
        text.lines()
            .find(|line| {
                let mut fields = line.splitn(3, ':');
                let (id, controllers) = (fields.next(), fields.next().unwrap_or(""));
                match version {
                    CgroupVersion::V2 => id == Some("0") && controllers.is_empty(),
                    CgroupVersion::V1 => controllers.split(',').any(|c| c == controller.name()),
                }
            })
            .unwrap()
    }

    #[test]
    fn apply_to_sets_every_limit_and_read_limits_reads_them_back() {
        if !require_cgroups("apply_to_sets_every_limit_and_read_limits_reads_them_back") {
            return;
        }
        let mut cleanup = Cleanup::default();
        let pid = cleanup.spawn();
        let name = unique_name("all");
        let applied = apply_to(pid, &name, &limits()).unwrap();
        cleanup.dirs.extend(applied.dirs.iter().cloned());

        assert!(!applied.dirs.is_empty());
        for dir in &applied.dirs {
            assert!(dir.ends_with(Path::new(GROUP_DIR).join(&name)), "{dir:?}");
        }
        assert_eq!(read_limits(pid).unwrap(), limits());
        let text = cgroup_text(pid);
        for controller in Controller::ALL {
            let line = line_for(&text, applied.version, controller);
            assert!(line.ends_with(&format!("/{GROUP_DIR}/{name}")), "{line}");
        }
        let file = |name: &str| {
            let found: Vec<String> = applied
                .dirs
                .iter()
                .filter_map(|dir| fs::read_to_string(dir.join(name)).ok())
                .collect();
            assert_eq!(found.len(), 1, "{name} in {:?}", applied.dirs);
            found[0].trim().to_owned()
        };
        assert_eq!(file("pids.max"), "32");
        match applied.version {
            CgroupVersion::V1 => {
                assert_eq!(applied.dirs.len(), 3, "cpu, memory and pids hierarchies");
                assert_eq!(file("cpu.cfs_period_us"), "100000");
                assert_eq!(file("cpu.cfs_quota_us"), "50000");
                assert_eq!(file("memory.limit_in_bytes"), (64u64 << 20).to_string());
            }
            CgroupVersion::V2 => {
                assert_eq!(applied.dirs.len(), 1);
                assert_eq!(file("cpu.max"), "50000 100000");
                assert_eq!(file("memory.max"), (64u64 << 20).to_string());
            }
        }
    }

    #[test]
    fn none_limits_leave_their_controllers_alone() {
        if !require_cgroups("none_limits_leave_their_controllers_alone") {
            return;
        }
        let mut cleanup = Cleanup::default();
        let pid = cleanup.spawn();
        let before_text = cgroup_text(pid);
        let before = read_limits(pid).unwrap();

        // No limit at all: nothing is created, the process stays where it is.
        let applied = apply_to(pid, &unique_name("none"), &ResourceLimits::default()).unwrap();
        assert!(applied.dirs.is_empty());
        assert_eq!(cgroup_text(pid), before_text);

        let only_pids = ResourceLimits {
            pids: Some(16),
            ..ResourceLimits::default()
        };
        let applied = apply_to(pid, &unique_name("pids"), &only_pids).unwrap();
        cleanup.dirs.extend(applied.dirs.iter().cloned());
        assert_eq!(applied.dirs.len(), 1);

        let after = read_limits(pid).unwrap();
        assert_eq!(after.pids, Some(16));
        assert_eq!(after.cpu_percent, before.cpu_percent);
        assert_eq!(after.memory_bytes, before.memory_bytes);
        if applied.version == CgroupVersion::V1 {
            let after_text = cgroup_text(pid);
            for controller in [Controller::Cpu, Controller::Memory] {
                assert_eq!(
                    line_for(&after_text, CgroupVersion::V1, controller),
                    line_for(&before_text, CgroupVersion::V1, controller),
                );
            }
            let dir = &applied.dirs[0];
            assert!(!dir.join("cpu.cfs_quota_us").exists());
            assert!(!dir.join("memory.limit_in_bytes").exists());
        }
    }

    #[test]
    fn a_name_in_use_by_a_live_process_is_reused() {
        if !require_cgroups("a_name_in_use_by_a_live_process_is_reused") {
            return;
        }
        let mut cleanup = Cleanup::default();
        let first = cleanup.spawn();
        let second = cleanup.spawn();
        let name = unique_name("reuse");
        let applied = apply_to(first, &name, &limits()).unwrap();
        cleanup.dirs.extend(applied.dirs.iter().cloned());
        let again = apply_to(second, &name, &limits()).unwrap();
        assert_eq!(again, applied);
        assert_eq!(read_limits(first).unwrap(), limits());
        assert_eq!(read_limits(second).unwrap(), limits());
        for dir in &applied.dirs {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap();
            let pids: Vec<&str> = procs.lines().collect();
            assert!(pids.contains(&first.to_string().as_str()), "{pids:?}");
            assert!(pids.contains(&second.to_string().as_str()), "{pids:?}");
        }
    }

    #[test]
    fn apply_moves_every_thread_of_the_calling_process() {
        if !require_cgroups("apply_moves_every_thread_of_the_calling_process") {
            return;
        }
        // `apply` moves its caller: run it in a child copy of this test binary,
        // never in the harness itself.
        let mut cleanup = Cleanup::default();
        let name = unique_name("self");
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cgroup::tests::apply_child", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_NAME_ENV, &name)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        cleanup.dirs.extend(
            stdout
                .lines()
                // libtest prints the test's name on the same line as the first.
                .filter_map(|line| line.split_once(CHILD_DIR_PREFIX))
                .map(|(_, dir)| dir)
                .map(PathBuf::from),
        );
        assert!(
            output.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(stdout.contains("1 passed"), "{stdout}");
        assert!(!cleanup.dirs.is_empty(), "{stdout}");
    }

    /// Run by [`apply_moves_every_thread_of_the_calling_process`] in a child
    /// process; does nothing elsewhere.
    #[test]
    #[ignore = "a helper that apply_moves_every_thread_of_the_calling_process runs in a child"]
    fn apply_child() {
        let Ok(name) = std::env::var(CHILD_NAME_ENV) else {
            return;
        };
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let extra = std::thread::spawn(move || stopped.recv());
        let applied = apply(&name, &limits()).unwrap();
        for dir in &applied.dirs {
            println!("{CHILD_DIR_PREFIX}{}", dir.display());
        }
        assert_eq!(read_limits(std::process::id()).unwrap(), limits());
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let mut threads = 0;
        for task in fs::read_dir("/proc/self/task").unwrap() {
            let task = task.unwrap().path();
            assert_eq!(fs::read_to_string(task.join("cgroup")).unwrap(), own);
            threads += 1;
        }
        assert!(threads >= 2, "{threads} threads");
        assert!(own.contains(&format!("/{GROUP_DIR}/{name}\n")), "{own}");
        stop.send(()).unwrap();
        extra.join().unwrap().unwrap();
    }

    #[test]
    fn invalid_names_are_refused() {
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for name in [
            "", "a/b", "..", ".", ".hidden", "../x", "a b", "a\nb", &long,
        ] {
            // A pid that cannot exist: were the name accepted, nothing moves.
            let err = apply_to(u32::MAX, name, &limits()).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidName { .. }),
                "{name:?}: {err}"
            );
            assert!(validate_name(name).is_err(), "{name:?}");
        }
        for name in ["vm1", "web-01.a_b", &"x".repeat(MAX_NAME_LEN)] {
            assert!(validate_name(name).is_ok(), "{name:?}");
        }
        let err = apply_to(u32::MAX, "a/b", &limits()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid cgroup name \"a/b\": it contains '/'"
        );
    }

    const MOUNTINFO_HERE: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:9 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 /lxc/c1 /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn mountinfo_and_proc_cgroup_are_parsed() {
        let layout = Layout::parse(MOUNTINFO_HERE);
        assert_eq!(layout.mounts.len(), 7, "the tmpfs is no cgroup");
        let memory: Vec<&Mount> = layout.v1(Controller::Memory).collect();
        assert_eq!(memory.len(), 1);
        assert_eq!(memory[0].point, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(
            layout.v1(Controller::Pids).next().unwrap().point,
            Path::new("/sys/fs/cgroup/pids")
        );
        let v2: Vec<&Mount> = layout.v2().collect();
        assert_eq!(v2.len(), 2);
        assert_eq!(v2[1].root, "/lxc/c1");
        assert_eq!(v2[1].point, Path::new("/mnt/my cgroup"));

        let procs = ProcCgroups::parse("9:name=systemd:/\n4:memory:/a/b\n1:cpu,cpuacct:/\n0::/x\n");
        assert_eq!(procs.v1(Controller::Memory), Some("/a/b"));
        assert_eq!(procs.v1(Controller::Cpu), Some("/"));
        assert_eq!(procs.v1(Controller::Pids), None);
        assert_eq!(procs.v2.as_deref(), Some("/x"));

        assert_eq!(
            locate(layout.v1(Controller::Memory), "/a/b").unwrap(),
            Located {
                mount: PathBuf::from("/sys/fs/cgroup/memory"),
                dir: PathBuf::from("/sys/fs/cgroup/memory/a/b"),
            }
        );
        let nested = &v2[1..];
        assert_eq!(
            locate(nested.iter().copied(), "/lxc/c1/vm").unwrap().dir,
            Path::new("/mnt/my cgroup/vm")
        );
        assert_eq!(
            locate(nested.iter().copied(), "/lxc/c1").unwrap().dir,
            Path::new("/mnt/my cgroup")
        );
        assert!(locate(nested.iter().copied(), "/lxc/c10").is_none());
    }

    #[test]
    fn a_process_already_in_a_relive_cgroup_moves_to_a_sibling() {
        assert_eq!(base_of("/"), "/");
        assert_eq!(base_of("/svc"), "/svc");
        assert_eq!(base_of("/relive/vm1"), "/");
        assert_eq!(base_of("/svc/relive/vm1"), "/svc");
        assert_eq!(base_of("/svc/relive"), "/svc/relive");
        assert_eq!(base_of("/svc/other/vm1"), "/svc/other/vm1");
    }

    #[test]
    fn no_cgroup_mount_is_a_clear_error() {
        let err = plan(
            &Layout::default(),
            &ProcCgroups::default(),
            &[Controller::Pids],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cgroups are not available: no cgroup filesystem is mounted (see /proc/self/mountinfo)"
        );
        let layout = Layout::parse(MOUNTINFO_HERE);
        let procs = ProcCgroups::parse("1:cpu:/\n0::/\n");
        let err = plan(&layout, &procs, &[Controller::Memory]).unwrap_err();
        assert!(
            err.to_string().contains("the memory controller is neither"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_the_limit_and_the_file_and_chain_the_errno() {
        let err = CgroupError::SetLimit {
            what: Controller::Memory.what(),
            path: PathBuf::from("/sys/fs/cgroup/memory/relive/x/memory.limit_in_bytes"),
            source: io::Error::from_raw_os_error(libc::EACCES),
        };
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(
            format!("{err}: {source}"),
            "cannot set the memory limit: /sys/fs/cgroup/memory/relive/x/memory.limit_in_bytes: \
             Permission denied (os error 13)"
        );
    }

    /// A scratch directory standing in for a cgroup filesystem, removed on drop.
    struct FakeFs(PathBuf);

    impl FakeFs {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("relive-{}", unique_name(tag)));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// Creates `files` (empty unless given) in directory `rel`.
        fn cgroup(&self, rel: &str, files: &[(&str, &str)]) -> PathBuf {
            let dir = self.0.join(rel);
            fs::create_dir_all(&dir).unwrap();
            for (file, content) in files {
                fs::write(dir.join(file), content).unwrap();
            }
            dir
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.0.join(rel)).unwrap()
        }
    }

    impl Drop for FakeFs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const LIMIT_FILES_V2: [(&str, &str); 5] = [
        ("cgroup.controllers", "cpu memory pids"),
        ("cgroup.subtree_control", ""),
        ("cpu.max", ""),
        ("memory.max", ""),
        ("pids.max", ""),
    ];

    #[test]
    fn v2_is_used_when_it_offers_the_controllers() {
        let fake = FakeFs::new("v2");
        fake.cgroup(
            "",
            &[
                ("cgroup.controllers", "cpuset cpu io memory pids"),
                ("cgroup.subtree_control", "cpu"),
            ],
        );
        fake.cgroup(
            "relive",
            &[
                ("cgroup.controllers", "cpu memory pids"),
                ("cgroup.subtree_control", ""),
            ],
        );
        fake.cgroup("relive/vm1", &LIMIT_FILES_V2);
        fake.cgroup("relive/vm1", &[("cgroup.procs", "")]);
        let layout = Layout::parse(&format!(
            "41 31 0:38 / {} rw - cgroup2 cgroup2 rw\n50 31 0:39 / /x rw - cgroup cgroup rw,name=systemd\n",
            fake.0.display()
        ));
        // A process in an older relive cgroup goes to the sibling.
        let procs = ProcCgroups::parse("1:name=systemd:/\n0::/relive/old\n");
        let limits = ResourceLimits {
            memory_bytes: None,
            ..limits()
        };
        let plan = plan(&layout, &procs, &needed(&limits)).unwrap();
        let applied = execute(&plan, 1234, "vm1", &limits).unwrap();
        assert_eq!(
            applied,
            AppliedCgroup {
                version: CgroupVersion::V2,
                dirs: vec![fake.0.join("relive/vm1")],
            }
        );
        assert_eq!(
            fake.read("cgroup.subtree_control"),
            "+pids",
            "cpu was enabled"
        );
        assert_eq!(fake.read("relive/cgroup.subtree_control"), "+cpu +pids");
        assert_eq!(fake.read("relive/vm1/cpu.max"), "50000 100000");
        assert_eq!(fake.read("relive/vm1/memory.max"), "", "None is left alone");
        assert_eq!(fake.read("relive/vm1/pids.max"), "32");
        assert_eq!(fake.read("relive/vm1/cgroup.procs"), "1234");

        fs::write(fake.0.join("relive/vm1/memory.max"), "max\n").unwrap();
        fs::write(fake.0.join("relive/cpu.max"), "25000 100000\n").unwrap();
        let procs = ProcCgroups::parse("0::/relive/vm1\n");
        assert_eq!(
            read_limits_in(&layout, &procs).unwrap(),
            ResourceLimits {
                cpu_percent: Some(25),
                memory_bytes: None,
                pids: Some(32),
            },
            "the parent's tighter cpu quota is the one in force"
        );
    }

    #[test]
    fn v1_is_used_when_v2_lacks_a_controller() {
        let fake = FakeFs::new("v1");
        fake.cgroup("unified", &[("cgroup.controllers", "hugetlb")]);
        let v1_files = [
            ("cpu.cfs_period_us", ""),
            ("cpu.cfs_quota_us", ""),
            ("memory.limit_in_bytes", ""),
            ("pids.max", ""),
            ("cgroup.procs", ""),
        ];
        fake.cgroup("cpu,cpuacct/relive/vm1", &v1_files);
        fake.cgroup("memory/svc/relive/vm1", &v1_files);
        fake.cgroup("pids/relive/vm1", &v1_files);
        let root = fake.0.display();
        let layout = Layout::parse(&format!(
            "1 0 0:1 / {root}/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             2 0 0:2 / {root}/memory rw - cgroup cgroup rw,memory\n\
             3 0 0:3 / {root}/pids rw - cgroup cgroup rw,pids\n\
             4 0 0:4 / {root}/unified rw - cgroup2 cgroup2 rw\n"
        ));
        let procs = ProcCgroups::parse("3:pids:/\n2:memory:/svc\n1:cpu,cpuacct:/\n0::/\n");
        let plan = plan(&layout, &procs, &Controller::ALL).unwrap();
        let applied = execute(&plan, 77, "vm1", &limits()).unwrap();
        assert_eq!(applied.version, CgroupVersion::V1);
        assert_eq!(
            applied.dirs,
            vec![
                fake.0.join("cpu,cpuacct/relive/vm1"),
                fake.0.join("memory/svc/relive/vm1"),
                fake.0.join("pids/relive/vm1"),
            ]
        );
        assert_eq!(
            fake.read("cpu,cpuacct/relive/vm1/cpu.cfs_period_us"),
            "100000"
        );
        assert_eq!(
            fake.read("cpu,cpuacct/relive/vm1/cpu.cfs_quota_us"),
            "50000"
        );
        assert_eq!(
            fake.read("memory/svc/relive/vm1/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(fake.read("pids/relive/vm1/pids.max"), "32");
        for dir in &applied.dirs {
            assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "77");
        }
        assert_eq!(
            fake.read("memory/svc/relive/vm1/cpu.cfs_quota_us"),
            "",
            "not touched"
        );

        let procs = ProcCgroups::parse(
            "3:pids:/relive/vm1\n2:memory:/svc/relive/vm1\n1:cpu,cpuacct:/relive/vm1\n",
        );
        fs::write(
            fake.0.join("memory/svc/memory.limit_in_bytes"),
            "9223372036854771712",
        )
        .unwrap();
        assert_eq!(read_limits_in(&layout, &procs).unwrap(), limits());
    }
}
