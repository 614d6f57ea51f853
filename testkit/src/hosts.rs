//! Several "hosts" on one machine for the cluster tests: each a network
//! namespace with a veth link to a bridge in the test's own namespace, and a
//! cgroup (v2) of its own, so that a test can cut a host's network (its link
//! down) or kill the host whole (`cgroup.kill`: its supervisor and every
//! VMM it started, at once, as a power loss would).
//!
//! [`Network::new`] makes the bridge (`10.<a>.<b>.1/24`) and one namespace
//! per host (`10.<a>.<b>.<10 + i>`); [`Host::place`] makes a [`Command`]
//! start inside a host (its namespace and its cgroup, entered between fork
//! and exec). Everything is removed at drop: the cgroups' processes are
//! killed, the namespaces, links and bridge deleted. Needs root, `ip` (from
//! `iproute2`) and a cgroup2 hierarchy with `cgroup.kill` (Linux 5.14);
//! where one is missing the tests skip with the reason, and fail under
//! `RELIVE_REQUIRE_TOOLS=1` (CI).

#![allow(clippy::expect_used)] // test support: a step that cannot be taken fails the test

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One host: a network namespace and a cgroup.
pub struct Host {
    /// The host's name (as given to [`Network::new`]).
    pub name: String,
    /// Its address on the bridge.
    pub ip: Ipv4Addr,
    /// The namespace's name (`ip netns`).
    pub netns: String,
    /// The bridge-side end of its link: down cuts the host off.
    link: String,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    /// The namespace, open (entered with setns before exec).
    netns_fd: File,
    /// Its `cgroup.procs`, open for writing (the child writes itself in).
    procs_fd: File,
}

/// The bridge and the hosts on it.
pub struct Network {
    bridge: String,
    /// The bridge's address: where services of the test's own namespace
    /// (etcd) listen for the hosts.
    pub gateway: Ipv4Addr,
    /// The hosts, in the order given.
    pub hosts: Vec<Arc<Host>>,
    cgroup: PathBuf,
}

/// Runs `ip ARGS...`, asserting success.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cgroup2 mount (the unified hierarchy, or a pure v2 `/sys/fs/cgroup`).
fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, at, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(at))
        })
        .next()
}

/// Why hosts cannot be made here, if they cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the multi-host tests need root (network namespaces, cgroups)".into());
    }
    if Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        return Some(
            "`ip` is not installed (Debian's iproute2; scripts/setup.sh installs it)".into(),
        );
    }
    if cgroup2_root().is_none() {
        return Some("no cgroup2 hierarchy is mounted".into());
    }
    None
}

impl Network {
    /// Makes a bridge and one host per name; `None`, with the reason
    /// printed, where this machine cannot (a failure under
    /// `RELIVE_REQUIRE_TOOLS=1`).
    pub fn new(names: &[&str]) -> Option<Network> {
        if let Some(why) = unsupported() {
            assert!(
                std::env::var_os("RELIVE_REQUIRE_TOOLS").is_none(),
                "RELIVE_REQUIRE_TOOLS=1: {why}"
            );
            eprintln!("skipped: {why}");
            return None;
        }
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A /24 of its own per network: by process and by network.
        let (a, b) = (100 + (pid % 100) as u8, (n % 250) as u8);
        let tag = format!("{}{n}", pid % 100_000);
        let bridge = format!("rlb{tag}");
        let gateway = Ipv4Addr::new(10, a, b, 1);
        // A leftover of an earlier run with the same pid goes first.
        let _ = Command::new("ip")
            .args(["link", "del", &bridge])
            .stderr(Stdio::null())
            .status();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        let root = cgroup2_root().expect("checked by unsupported()");
        let cgroup = root.join(format!("relive-test-{pid}-{n}"));
        let mut network = Network {
            bridge,
            gateway,
            hosts: Vec::new(),
            cgroup: cgroup.clone(),
        };
        std::fs::create_dir_all(&cgroup).expect("create the test's cgroup");
        for (i, name) in names.iter().enumerate() {
            let netns = format!("relive-{pid}-{n}-{i}");
            let link = format!("rl{tag}h{i}");
            let inside = format!("rl{tag}g{i}");
            let host_ip = Ipv4Addr::new(10, a, b, 10 + i as u8);
            let _ = Command::new("ip")
                .args(["netns", "del", &netns])
                .stderr(Stdio::null())
                .status();
            ip(&["netns", "add", &netns]);
            ip(&[
                "link", "add", &link, "type", "veth", "peer", "name", &inside,
            ]);
            ip(&["link", "set", &inside, "netns", &netns]);
            ip(&["link", "set", &link, "master", &network.bridge]);
            ip(&["link", "set", &link, "up"]);
            let exec = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &netns, "ip"];
                all.extend_from_slice(args);
                ip(&all);
            };
            exec(&["link", "set", "lo", "up"]);
            exec(&["link", "set", &inside, "name", "eth0"]);
            exec(&["addr", "add", &format!("{host_ip}/24"), "dev", "eth0"]);
            exec(&["link", "set", "eth0", "up"]);
            let dir = cgroup.join(format!("host-{i}"));
            std::fs::create_dir_all(&dir).expect("create a host's cgroup");
            let host = Host {
                name: (*name).to_string(),
                ip: host_ip,
                netns_fd: File::open(Path::new("/run/netns").join(&netns))
                    .expect("open the host's namespace"),
                procs_fd: std::fs::OpenOptions::new()
                    .write(true)
                    .open(dir.join("cgroup.procs"))
                    .expect("open the host's cgroup.procs"),
                netns,
                link,
                cgroup: dir,
            };
            network.hosts.push(Arc::new(host));
        }
        // Every host reaches the bridge's address before anything starts.
        for host in &network.hosts {
            ip(&[
                "netns",
                "exec",
                &host.netns,
                "ip",
                "route",
                "get",
                &gateway.to_string(),
            ]);
        }
        Some(network)
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> Arc<Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
            .clone()
    }
}

/// Removes an empty cgroup directory, waiting a little for the kernel to
/// let go of its last tasks (a killed process not yet reaped by its
/// parent keeps it busy).
fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for host in &self.hosts {
            host.kill();
            remove_cgroup(&host.cgroup);
            let _ = Command::new("ip")
                .args(["netns", "del", &host.netns])
                .status();
        }
        remove_cgroup(&self.cgroup);
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

impl Host {
    /// Makes `cmd` start inside this host: in its network namespace and
    /// its cgroup (so every process it starts is the host's too).
    pub fn place(&self, cmd: &mut Command) {
        let (netns, procs) = (self.netns_fd.as_raw_fd(), self.procs_fd.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls on
        // descriptors opened before the fork (they stay open: `self` lives
        // in the parent).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Cuts the host's network (`true`: its link down) or restores it.
    pub fn cut(&self, cut: bool) {
        ip(&["link", "set", &self.link, if cut { "down" } else { "up" }]);
    }

    /// The processes in the host's cgroup.
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Kills every process of the host at once (`cgroup.kill`) and waits
    /// until none is left.
    pub fn kill(&self) {
        if std::fs::write(self.cgroup.join("cgroup.kill"), "1").is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.pids().is_empty() {
            assert!(
                Instant::now() < deadline,
                "host {}: processes {:?} still alive 10 s after cgroup.kill",
                self.name,
                self.pids()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
