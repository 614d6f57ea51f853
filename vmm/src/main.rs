//! `relive-vmm`: runs one microVM per process, and talks to running ones.
//!
//! ```text
//! relive-vmm run [--kernel PATH|bundled] [--initrd PATH] [--cmdline STR]
//!                [--mem-mib N] [--vcpus N] [--console PATH] [--control SOCKET]
//! relive-vmm restore --image PATH [--console PATH] [--control SOCKET] [--images DIR]
//! relive-vmm standby [--mem-mib N] [--vcpus N] --control SOCKET [--console PATH] [--images DIR]
//! relive-vmm images list|verify|inspect DIR [--json]
//! relive-vmm ctl SOCKET status|shutdown|agent LINE|watch|pause|resume|checkpoint|restore IMAGE [--json]
//! ```
//!
//! `run` exits with the status of the VM's exit reason (see `relive_vmm::exit`)
//! and prints one JSON line with the reason on stderr.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relive_control::exit::STATUS_VMM_ERROR;
use relive_control::{
    CheckpointKind, ControlClient, Fault, Request, Response, VmStatus, WatchEvent,
};
use relive_vmm::boot::{BootConfig, KernelSource, DEFAULT_LINUX_CMDLINE};
use relive_vmm::snapshot::ResourceLimits;
use relive_vmm::vm::{BootImageMode, ConsoleOutput, Vm, VmConfig};

/// `println!` for client output: a reader that went away (`ctl ... | head`)
/// is not an error worth a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser, Debug)]
#[command(
    name = "relive-vmm",
    version,
    about = "relive's KVM microVM monitor: one process per VM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a VM and run it until it stops.
    Run(RunArgs),
    /// Start a VM from a failover image: the guest resumes where the image was taken.
    Restore(RestoreArgs),
    /// Build a VM without a guest and wait for `ctl SOCKET restore IMAGE`:
    /// failover without building a VM on the critical path.
    Standby(StandbyArgs),
    /// Look at an image directory: list, verify or inspect failover images.
    Images {
        /// Print JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: ImagesAction,
    },
    /// Talk to a running VMM over its control socket.
    Ctl {
        /// The VMM's control socket.
        socket: PathBuf,
        /// Print raw JSON replies.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kernel: an ELF vmlinux or bzImage path, or `bundled` for the bundled guest.
    #[arg(long, default_value = "bundled")]
    kernel: String,
    /// Initial ramdisk.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line [default: `relive.hb_ms=100` for the bundled guest,
    /// `console=ttyS0 reboot=k panic=1 nomodule` for a Linux kernel].
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs (1 to the host's cores).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The VM's name (its cgroup is relive/<name> when limits are set).
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    limits: LimitArgs,
    /// Write a boot image into --images: `recipe` (kernel, cmdline, config;
    /// restoring it boots afresh) or `warm` (a snapshot taken when the guest
    /// first says ready; restoring it is a clean start without the boot).
    #[arg(long, value_parser = parse_boot_image)]
    boot_image: Option<BootImageMode>,
    #[command(flatten)]
    host: HostArgs,
}

/// Host resource limits of the VMM process (its cgroup relive/<name>).
#[derive(clap::Args, Debug)]
struct LimitArgs {
    /// CPU limit in percent of one core (cgroup cpu quota).
    #[arg(long)]
    cpu_percent: Option<u32>,
    /// Memory limit of the VMM process in MiB (cgroup memory limit).
    #[arg(long)]
    memory_limit_mib: Option<u64>,
    /// Most tasks (threads) the VMM process may have (cgroup pids limit).
    #[arg(long)]
    pids_max: Option<u64>,
}

impl LimitArgs {
    fn limits(&self) -> ResourceLimits {
        ResourceLimits {
            cpu_percent: self.cpu_percent,
            memory_bytes: self.memory_limit_mib.map(|m| m << 20),
            pids: self.pids_max,
        }
    }
}

#[derive(clap::Args, Debug)]
struct StandbyArgs {
    /// Guest memory in MiB (must match the images it will take).
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs (must match the images it will take).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The name of the VM it will run [default: the one in the image].
    #[arg(long)]
    name: Option<String>,
    /// The limits of the images it will take: a jailed standby applies
    /// them before its jail (it cannot change its cgroup later).
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    /// The image file to start from.
    #[arg(long)]
    image: PathBuf,
    /// The VM's name [default: the one recorded in the image]; the image's
    /// resource limits are re-applied to the cgroup relive/<name>.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    host: HostArgs,
}

/// Where a running VM's console, control socket and images go.
#[derive(clap::Args, Debug)]
struct HostArgs {
    /// Write the console (COM1) to this file instead of stdout.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Serve the control socket at this path.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Write checkpoints (consistency images) into this directory.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Consistency images to keep in --images (a full image and its layers count once).
    #[arg(long, default_value_t = relive_vmm::vm::DEFAULT_KEEP_IMAGES, value_parser = clap::value_parser!(usize))]
    keep_images: usize,
    /// Run without the seccomp filters (every thread may make any system
    /// call): for debugging only.
    #[arg(long)]
    no_seccomp: bool,
    /// Run jailed, as UID:GID (not root): own mount, pid, network, IPC and
    /// UTS namespaces, a root holding only the image directory, the console
    /// log and the kernel to boot, no capabilities, no_new_privs. Needs root.
    #[arg(long, value_name = "UID:GID", value_parser = parse_jail_ids)]
    jail: Option<(u32, u32)>,
    /// With --jail: report the jailed VMM's pid on NOTIFY_SOCKET
    /// (`MAINPID=`) and exit instead of waiting for it (for a supervisor
    /// that is a child subreaper).
    #[arg(long, requires = "jail")]
    jail_detach: bool,
    /// Allow more vCPUs than this host has cores (up to KVM's limit): the
    /// vCPUs then share cores.
    #[arg(long)]
    overcommit_vcpus: bool,
}

fn parse_jail_ids(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not UID:GID (e.g. 65534:65534)"))?;
    let id = |what: &str, v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{what} {v:?} in {s:?} is not a number: give UID:GID"))
    };
    Ok((id("uid", uid)?, id("gid", gid)?))
}

impl HostArgs {
    /// Compiles the threads' seccomp filters (each thread installs its own
    /// as it starts), or says loudly that there are none.
    fn confine(&self) -> anyhow::Result<()> {
        if self.no_seccomp {
            eprintln!(
                "relive-vmm: WARNING: --no-seccomp: this VMM runs WITHOUT seccomp filters; a guest \
                 that escapes into it may make any system call. Use it for debugging only."
            );
            return Ok(());
        }
        relive_vmm::seccomp::prepare()?;
        Ok(())
    }

    /// Enters the jail when `--jail` asks for one (see
    /// `relive_vmm::jail`): the image directory and console log stay
    /// writable, `read_only` paths (a kernel, an initrd, an image elsewhere)
    /// readable; `limits` go on the cgroup `relive/<name>` first.
    fn jail(
        &self,
        read_only: Vec<PathBuf>,
        limits: Option<(String, ResourceLimits)>,
    ) -> anyhow::Result<()> {
        use relive_vmm::jail::{Access, Bind, JailSpec};
        let Some((uid, gid)) = self.jail else {
            return Ok(());
        };
        let mut binds = Vec::new();
        if let Some(dir) = &self.images {
            binds.push(Bind {
                path: absolute(dir)?,
                access: Access::Owned,
                dir: true,
            });
        }
        if let Some(console) = &self.console {
            binds.push(Bind {
                path: absolute(console)?,
                access: Access::Owned,
                dir: false,
            });
        }
        for path in read_only {
            let path = absolute(&path)?;
            if binds.iter().any(|b| path.starts_with(&b.path)) {
                continue;
            }
            let dir = path.is_dir();
            binds.push(Bind {
                path,
                access: Access::ReadOnly,
                dir,
            });
        }
        let control = self.control.as_deref().map(absolute).transpose()?;
        relive_vmm::jail::enter(&JailSpec {
            uid,
            gid,
            binds,
            control,
            limits,
            detach: self.jail_detach,
        })?;
        Ok(())
    }

    fn console(&self) -> ConsoleOutput {
        match &self.console {
            Some(path) => ConsoleOutput::File(path.clone()),
            None => ConsoleOutput::Stdout,
        }
    }
}

#[derive(Subcommand, Debug)]
enum ImagesAction {
    /// Every image in DIR, oldest first, with kind, parent, size and status
    /// (headers and section checksums only).
    List {
        /// The image directory.
        dir: PathBuf,
    },
    /// Like list, but also reads every image's memory and checks layer chains;
    /// exits 1 if any image is bad.
    Verify {
        /// The image directory.
        dir: PathBuf,
        /// Also record each image's own verdict beside it (what a failover
        /// trusts; VMMs record one for every image they commit).
        #[arg(long)]
        record: bool,
    },
    /// One image in detail: header, sections, memory, config and the guest's
    /// last status. A directory means its latest good image.
    Inspect {
        /// An image file or an image directory.
        path: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CtlAction {
    /// State, uptime, vCPU exits, guest memory resident, agent channel.
    Status,
    /// Stop the VM (the VMM exits with status 3).
    Shutdown,
    /// Send one command line to the guest's agent channel.
    Agent {
        /// The line, e.g. `status`, `panic`, `hang`.
        line: String,
    },
    /// Print what the guest says on the agent channel, one line each, until interrupted.
    Watch,
    /// Stop every vCPU.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Standby VMMs: take IMAGE and run its guest.
    Restore {
        /// The image file.
        image: PathBuf,
    },
    /// Write a consistency image into the VM's --images directory.
    Checkpoint {
        /// `full` or `incremental`.
        #[arg(default_value = "full")]
        kind: String,
    },
    /// Arm the fencing deadline: unless renewed within MS milliseconds the
    /// VMM ends its VM (status 17, `fenced`); 0 disarms it.
    Fence {
        /// Milliseconds from now.
        ms: u64,
    },
    /// Drill: make the VMM do what its confinement forbids.
    InjectFault {
        /// `forbidden-syscall`: the event loop opens an IPv4 socket; a VMM
        /// under its seccomp filters ends with status 15 (`seccomp`).
        /// `read-host-file`: the event loop reads /etc/hostname, which a
        /// jailed VMM cannot see.
        fault: String,
    },
}

fn main() -> ExitCode {
    relive_vmm::seccomp::single_malloc_arena();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELIVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a log file (the supervisor's VMM logs,
        // a systemd journal) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Restore(args) => restore(args),
        Command::Standby(args) => standby(args),
        Command::Images { json, action } => images(json, action),
        Command::Ctl {
            socket,
            json,
            action,
        } => ctl(socket, json, action),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("relive-vmm: error: {e:#}");
            ExitCode::from(STATUS_VMM_ERROR as u8)
        }
    }
}

/// `path` from the root (a jail keeps paths as they are on the host).
fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}

/// The kernel and initrd files a boot reads.
fn boot_files(kernel: &KernelSource, initrd: Option<&PathBuf>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let KernelSource::File(path) = kernel {
        files.push(path.clone());
    }
    files.extend(initrd.cloned());
    files
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    args.host.confine()?;
    let kernel = KernelSource::parse(&args.kernel);
    let limits = args.limits.limits();
    args.host.jail(
        boot_files(&kernel, args.initrd.as_ref()),
        Some((
            args.name
                .clone()
                .unwrap_or_else(|| format!("vmm-{}", std::process::id())),
            limits.clone(),
        )),
    )?;
    let cmdline = args.cmdline.unwrap_or_else(|| match kernel {
        KernelSource::Bundled => format!("relive.hb_ms={}", relive_images::guest::DEFAULT_HB_MS),
        KernelSource::File(_) => DEFAULT_LINUX_CMDLINE.to_string(),
    });
    let vcpus = vcpu_count(args.vcpus)?;
    let cfg = VmConfig {
        boot: BootConfig {
            kernel,
            initrd: args.initrd,
            cmdline,
            vcpus,
        },
        mem_mib: args.mem_mib,
        console: args.host.console(),
        control: args.host.control,
        images: args.host.images,
        keep_images: args.host.keep_images,
        limits,
        name: args.name,
        boot_image: args.boot_image,
        overcommit_vcpus: args.host.overcommit_vcpus,
    };
    if cfg.boot_image.is_some() && cfg.images.is_none() {
        anyhow::bail!("--boot-image needs --images DIR: that is where the boot image goes");
    }
    let vm = Vm::build(cfg)?;
    let record = vm.run()?;
    eprintln!("{}", record.to_json());
    Ok(ExitCode::from(record.status as u8))
}

fn parse_boot_image(s: &str) -> Result<BootImageMode, String> {
    match s {
        "recipe" => Ok(BootImageMode::Recipe),
        "warm" => Ok(BootImageMode::Warm),
        other => Err(format!(
            "{other:?} is not a boot image kind: use recipe or warm"
        )),
    }
}

fn vcpu_count(vcpus: u32) -> anyhow::Result<u8> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    u8::try_from(vcpus).map_err(|_| {
        anyhow::anyhow!("--vcpus {vcpus} is out of range: use 1 to {cores} (this host's cores)")
    })
}

fn standby(args: StandbyArgs) -> anyhow::Result<ExitCode> {
    args.host.confine()?;
    if args.host.control.is_none() {
        anyhow::bail!("a standby VMM needs --control SOCKET: that is where its image comes from");
    }
    let limits = args.limits.limits();
    let cgroup = args.name.clone().map(|name| (name, limits));
    args.host.jail(Vec::new(), cgroup)?;
    let cfg = VmConfig {
        boot: BootConfig {
            kernel: KernelSource::Bundled,
            initrd: None,
            cmdline: String::new(),
            vcpus: vcpu_count(args.vcpus)?,
        },
        mem_mib: args.mem_mib,
        console: args.host.console(),
        control: args.host.control,
        images: args.host.images,
        keep_images: args.host.keep_images,
        limits: Default::default(),
        name: args.name,
        boot_image: None,
        overcommit_vcpus: args.host.overcommit_vcpus,
    };
    let vm = Vm::standby(cfg)?;
    let record = vm.run()?;
    eprintln!("{}", record.to_json());
    Ok(ExitCode::from(record.status as u8))
}

fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    args.host.confine()?;
    if args.host.jail.is_some() {
        // What the jail must keep, read before it: the image (its
        // directory: a layer's chain is beside it), a recipe's kernel, and
        // the limits to put on the cgroup while that is still possible.
        let (config, limits) = relive_vmm::snapshot::load_config(&args.image)?;
        let image_dir = absolute(&args.image)?
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let mut read_only = vec![image_dir];
        read_only.extend(boot_files(
            &KernelSource::parse(&config.kernel),
            config.initrd.as_ref(),
        ));
        let name = args.name.clone().or(config.name.clone());
        args.host.jail(read_only, name.map(|name| (name, limits)))?;
    }
    let vm = Vm::restore(
        &args.image,
        args.host.console(),
        args.host.control,
        args.host.images,
        args.host.keep_images,
        args.name,
        args.host.overcommit_vcpus,
    )?;
    let record = vm.run()?;
    eprintln!("{}", record.to_json());
    Ok(ExitCode::from(record.status as u8))
}

fn images(json: bool, action: ImagesAction) -> anyhow::Result<ExitCode> {
    use relive_images::format::{ImageReader, SectionKind};
    use relive_images::store::{ImageStatus, ImageStore};
    let open = |dir: &std::path::Path| {
        if !dir.is_dir() {
            anyhow::bail!("{} is not an image directory", dir.display());
        }
        Ok(ImageStore::open(dir, usize::MAX)?)
    };
    match action {
        ImagesAction::List { dir } => {
            let entries = open(&dir)?.list()?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                outln!("{}", relive_images::store::ImageEntry::HEADINGS);
                for entry in &entries {
                    outln!("{entry}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ImagesAction::Verify { dir, record } => {
            let store = open(&dir)?;
            if record {
                for entry in store.list()? {
                    store.verify(&entry.path)?;
                }
            }
            let entries = store.verify_all()?;
            let bad = entries
                .iter()
                .filter(|e| matches!(e.status, ImageStatus::Bad(_)))
                .count();
            if json {
                outln!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                outln!("{}", relive_images::store::ImageEntry::HEADINGS);
                for entry in &entries {
                    outln!("{entry}");
                }
                outln!("{} images, {bad} bad", entries.len());
            }
            Ok(if bad == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(STATUS_VMM_ERROR as u8)
            })
        }
        ImagesAction::Inspect { path } => {
            let reader = if path.is_dir() {
                let selection = open(&path)?.latest_good()?;
                for skipped in &selection.skipped {
                    eprintln!(
                        "relive-vmm: skipped {}: {}",
                        skipped.path.display(),
                        skipped.reason
                    );
                }
                selection.image.ok_or_else(|| {
                    anyhow::anyhow!("{} holds no good consistency image", path.display())
                })?
            } else {
                ImageReader::open(&path)?
            };
            let memory_ok = reader.verify_memory().map_err(|e| e.to_string());
            let json_section = |kind| {
                reader
                    .section(kind)
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            };
            let regions: Vec<serde_json::Value> = reader
                .memory_map()
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "guest_addr": m.guest_addr,
                        "len": m.len,
                        "present_pages": m.present_pages(),
                        "runs": m.present.len(),
                    })
                })
                .collect();
            if json {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "path": reader.path(),
                        "header": reader.header(),
                        "memory": regions,
                        "memory_verified": memory_ok.is_ok(),
                        "memory_error": memory_ok.as_ref().err(),
                        "config": json_section(SectionKind::Config),
                        "limits": json_section(SectionKind::Limits),
                        "app_status": json_section(SectionKind::AppStatus),
                    }))?
                );
            } else {
                outln!("{}", reader.path().display());
                outln!("{}", reader.header());
                for m in reader.memory_map() {
                    outln!(
                        "memory {:#x}+{} MiB: {} pages present in {} runs",
                        m.guest_addr,
                        m.len >> 20,
                        m.present_pages(),
                        m.present.len()
                    );
                }
                match &memory_ok {
                    Ok(()) => outln!("memory checksum ok"),
                    Err(e) => outln!("memory checksum BAD: {e}"),
                }
                for kind in [
                    SectionKind::Config,
                    SectionKind::Limits,
                    SectionKind::AppStatus,
                ] {
                    if let Some(value) = json_section(kind) {
                        outln!("{}: {value}", kind.name());
                    }
                }
            }
            Ok(if memory_ok.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(STATUS_VMM_ERROR as u8)
            })
        }
    }
}

/// How long `ctl` waits for a VMM's answer: a VMM that accepted the
/// connection and never answers must not hold an operator's shell for ever.
/// A checkpoint or a restore writes or reads a whole image: longer.
const CTL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const CTL_IMAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

fn ctl(socket: PathBuf, json: bool, action: CtlAction) -> anyhow::Result<ExitCode> {
    let timeout = match &action {
        CtlAction::Watch => None,
        CtlAction::Checkpoint { .. } | CtlAction::Restore { .. } => Some(CTL_IMAGE_TIMEOUT),
        _ => Some(CTL_TIMEOUT),
    };
    let mut client = ControlClient::connect(&socket)?.with_timeout(timeout);
    let request = match &action {
        CtlAction::Status => Request::Status,
        CtlAction::Shutdown => Request::Shutdown,
        CtlAction::Agent { line } => Request::Agent { line: line.clone() },
        CtlAction::Watch => Request::Watch,
        CtlAction::Pause => Request::Pause,
        CtlAction::Restore { image } => Request::Restore {
            image: std::fs::canonicalize(image)
                .unwrap_or_else(|_| image.clone())
                .display()
                .to_string(),
        },
        CtlAction::Resume => Request::Resume,
        CtlAction::Checkpoint { kind } => Request::Checkpoint {
            kind: match kind.as_str() {
                "full" => CheckpointKind::Full,
                "incremental" => CheckpointKind::Incremental,
                other => {
                    anyhow::bail!("checkpoint kind {other:?} is unknown: use full or incremental")
                }
            },
        },
        CtlAction::Fence { ms } => Request::Fence { within_ms: *ms },
        CtlAction::InjectFault { fault } => Request::InjectFault {
            fault: match fault.as_str() {
                "forbidden-syscall" => Fault::ForbiddenSyscall,
                "read-host-file" => Fault::ReadHostFile,
                other => anyhow::bail!(
                    "fault {other:?} is unknown: use forbidden-syscall or read-host-file"
                ),
            },
        },
    };
    if let CtlAction::Watch = action {
        let mut watch = client.watch()?;
        let mut out = std::io::stdout().lock();
        while let Some(event) = watch.next_event()? {
            let text = match event {
                WatchEvent::Line(line) if !json => line,
                WatchEvent::Line(line) => serde_json::to_string(&Response::Agent { line })
                    .context("cannot encode reply")?,
                // The VM ended: its exit record, as the VMM prints it on stderr.
                WatchEvent::Exit(record) if !json => record.to_json(),
                WatchEvent::Exit(record) => {
                    serde_json::to_string(&Response::Exit(record)).context("cannot encode reply")?
                }
                // Pause notices are for programs: JSON only.
                WatchEvent::Paused { .. } | WatchEvent::Resumed { .. } if !json => continue,
                WatchEvent::Paused { reason } => {
                    serde_json::to_string(&Response::Paused { reason })
                        .context("cannot encode reply")?
                }
                WatchEvent::Resumed { reason, paused_us } => {
                    serde_json::to_string(&Response::Resumed { reason, paused_us })
                        .context("cannot encode reply")?
                }
            };
            // A reader that went away (`watch | head`) ends the watch quietly.
            if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
                break;
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let response = match client.request(&request) {
        // The drill's expected end: the VMM is gone without a reply.
        Err(relive_control::ClientError::Closed { .. })
            if matches!(action, CtlAction::InjectFault { .. }) =>
        {
            outln!(
                "the VMM ended without answering, as its seccomp filter makes it: its exit \
                 record (reason seccomp, status 15) is on its stderr"
            );
            return Ok(ExitCode::SUCCESS);
        }
        other => other?,
    };
    match action {
        CtlAction::Watch => {}
        CtlAction::Status if !json => {
            if let Response::Status(status) = &response {
                print_status(status);
            }
        }
        CtlAction::Restore { .. } if !json => {
            if let Response::Restored(r) = &response {
                outln!(
                    "restored image {} in {:.3} ms\n{}",
                    r.image_id,
                    r.restore_us as f64 / 1000.0,
                    r.path
                );
            }
        }
        CtlAction::Checkpoint { .. } if !json => {
            if let Response::Checkpoint(r) = &response {
                outln!(
                    "{} image {} ({} bytes), paused {:.3} ms, total {:.3} ms\n{}",
                    r.kind.as_str(),
                    r.image_id,
                    r.bytes,
                    r.pause_us as f64 / 1000.0,
                    r.total_us as f64 / 1000.0,
                    r.path
                );
            }
        }
        CtlAction::InjectFault { .. } if !json => {
            if let Response::Drill { held, detail } = &response {
                let verdict = if *held { "held" } else { "DID NOT HOLD" };
                outln!("confinement {verdict}: {detail}");
            }
        }
        _ if json => outln!(
            "{}",
            serde_json::to_string(&response).context("cannot encode reply")?
        ),
        _ => outln!("ok"),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(s: &VmStatus) {
    let age = |v: Option<u64>| v.map_or("-".to_string(), |ms| format!("{ms} ms ago"));
    outln!(
        "state          {}",
        serde_json::to_string(&s.state)
            .unwrap_or_default()
            .trim_matches('"')
    );
    outln!("pid            {}", s.pid);
    outln!("kernel         {}", s.kernel);
    outln!("uptime         {:.3} s", s.uptime_ms as f64 / 1000.0);
    outln!("vcpus          {}", s.vcpus);
    outln!("vcpu exits     {} ({} port I/O)", s.vcpu_exits, s.io_exits);
    outln!(
        "memory         {} MiB, {:.1} MiB resident",
        s.mem_mib,
        s.guest_resident_bytes as f64 / (1 << 20) as f64
    );
    if let Some(name) = &s.name {
        outln!("name           {name}");
    }
    let l = &s.limits;
    if l.cpu_percent.is_some() || l.memory_bytes.is_some() || l.pids.is_some() {
        let show = |v: Option<u64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v}{unit}"));
        outln!(
            "limits         cpu {} memory {} pids {}",
            show(l.cpu_percent.map(u64::from), "%"),
            show(l.memory_bytes.map(|b| b >> 20), " MiB"),
            show(l.pids, "")
        );
    }
    outln!(
        "agent ready    {}",
        if s.agent.ready { "yes" } else { "no" }
    );
    outln!(
        "agent lines    {} ({} dropped, {} truncated)",
        s.agent.lines,
        s.agent.dropped_lines,
        s.agent.truncated_lines
    );
    outln!("last heartbeat {}", age(s.agent.last_heartbeat_age_ms));
    outln!(
        "last line      {}",
        s.agent.last_line.as_deref().unwrap_or("-")
    );
}
