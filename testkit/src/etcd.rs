//! A real etcd for the cluster tests, and a proxy that can cut a host off it.
//!
//! [`Etcd::start`] runs Debian's `etcd` (from `etcd-server`, which
//! `scripts/setup.sh` installs) as a one-member cluster on loopback ports,
//! its data in a directory the caller gives; it is killed at drop.
//! [`EtcdCluster::start`] runs a cluster of several members (peers on
//! loopback, clients on an address the caller gives, e.g. the bridge of
//! [`crate::hosts::Network`]) whose members can be killed and restarted one
//! by one: a member lost, quorum lost, quorum back.
//! [`Proxy`] forwards TCP to it and can hold every byte in both directions
//! without closing anything: a host behind it sees its etcd connection
//! stall with no error, as on a network that drops packets.

#![allow(clippy::expect_used)] // test support: a step that cannot be taken fails the test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One etcd member on loopback, killed at drop.
pub struct Etcd {
    child: Child,
    /// Its client address.
    pub client: SocketAddr,
    log: PathBuf,
}

/// The `etcd` binary, or `None` with the reason printed where it is not
/// installed (a failure under `RELIVE_REQUIRE_TOOLS=1`, which CI sets).
pub fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("etcd"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = "etcd is not installed (Debian's etcd-server; scripts/setup.sh installs it)";
        assert!(
            std::env::var_os("RELIVE_REQUIRE_TOOLS").is_none(),
            "RELIVE_REQUIRE_TOOLS=1: {why}"
        );
        eprintln!("skipped: {why}");
    }
    found
}

/// A loopback port nobody listens on now.
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd with its data and log in `dir` and waits until it
    /// serves; `None` where etcd is not installed.
    pub fn start(dir: &Path) -> Option<Etcd> {
        let bin = etcd_binary()?;
        let (client, peer) = (
            free_port().expect("a free port"),
            free_port().expect("a free port"),
        );
        let client = SocketAddr::from(([127, 0, 0, 1], client));
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = spawn_member(
            &bin,
            "n0",
            dir,
            client,
            &peer_url,
            &format!("n0={peer_url}"),
            "new",
        );
        etcd.wait_listening(Duration::from_secs(20));
        Some(etcd)
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.client)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_listening(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while TcpStream::connect(self.client).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen on {} within {within:?}:\n{}",
                self.client,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Spawns one etcd member, its data in `dir/etcd-<name>` (`dir/etcd-data`
/// for `n0`, as before clusters) and its log appended to `dir/etcd-<name>.log`.
fn spawn_member(
    bin: &Path,
    name: &str,
    dir: &Path,
    client: SocketAddr,
    peer_url: &str,
    initial_cluster: &str,
    state: &str,
) -> Etcd {
    let client_url = format!("http://{client}");
    let (data, log) = if name == "n0" && state == "new" && !initial_cluster.contains(',') {
        (dir.join("etcd-data"), dir.join("etcd.log"))
    } else {
        (
            dir.join(format!("etcd-{name}")),
            dir.join(format!("etcd-{name}.log")),
        )
    };
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .expect("create the etcd log");
    let child = Command::new(bin)
        .args(["--name", name])
        .arg("--data-dir")
        .arg(data)
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", peer_url])
        .args(["--initial-advertise-peer-urls", peer_url])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-state", state])
        .args(["--initial-cluster-token", "relive-test"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("spawn etcd");
    Etcd { child, client, log }
}

/// An etcd cluster of several members; each is killed at drop.
pub struct EtcdCluster {
    bin: PathBuf,
    dir: PathBuf,
    /// Each member's name, client address and peer URL.
    members: Vec<(String, SocketAddr, String)>,
    /// The running members (`None`: killed).
    running: Vec<Option<Etcd>>,
}

impl EtcdCluster {
    /// Starts `size` members, their data and logs in `dir`, clients on
    /// `client_ip` (free ports), peers on loopback, and waits until the
    /// cluster has a leader and serves; `None` where etcd is not installed.
    pub fn start(dir: &Path, size: usize, client_ip: std::net::Ipv4Addr) -> Option<EtcdCluster> {
        let bin = etcd_binary()?;
        let members: Vec<(String, SocketAddr, String)> = (0..size)
            .map(|i| {
                let client = SocketAddr::from((client_ip, free_port().expect("a free port")));
                let peer = format!("http://127.0.0.1:{}", free_port().expect("a free port"));
                (format!("n{i}"), client, peer)
            })
            .collect();
        let mut cluster = EtcdCluster {
            bin,
            dir: dir.to_path_buf(),
            running: members.iter().map(|_| None).collect(),
            members,
        };
        for i in 0..size {
            cluster.spawn(i, "new");
        }
        cluster.wait_healthy(Duration::from_secs(30));
        Some(cluster)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|(name, _, peer)| format!("{name}={peer}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let (name, client, peer) = self.members[i].clone();
        let member = spawn_member(
            &self.bin,
            &name,
            &self.dir,
            client,
            &peer,
            &self.initial_cluster(),
            state,
        );
        self.running[i] = Some(member);
    }

    /// Every member's client URL (killed ones too: clients fail over).
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|(_, client, _)| format!("http://{client}"))
            .collect()
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut member) = self.running[i].take() {
            let _ = member.child.kill();
            let _ = member.child.wait();
        }
    }

    /// Starts member `i` again on its data (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) {
        assert!(self.running[i].is_none(), "etcd member {i} runs already");
        self.spawn(i, "existing");
    }

    /// Waits until every running member answers `/health` with a leader
    /// elected (etcd answers `{"health":"true"}` only then).
    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for member in self.running.iter().flatten() {
            member.wait_listening(within);
            while !healthy(member.client) {
                assert!(
                    Instant::now() < deadline,
                    "etcd at {} not healthy within {within:?}:\n{}",
                    member.client,
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// What every member logged (the last 40 lines of each).
    pub fn log(&self) -> String {
        self.members
            .iter()
            .map(|(name, _, _)| {
                let text = std::fs::read_to_string(self.dir.join(format!("etcd-{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- etcd {name} ---\n{}",
                    lines[lines.len().saturating_sub(40)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Whether the etcd member at `client` says it is healthy: its `/health`
/// endpoint, read with a one-shot HTTP/1.0 request.
fn healthy(client: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&client, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains(r#""health":"true""#)
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy whose forwarding can be held (see the module docs).
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards connections to `to`.
    pub fn start(to: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (held, stopped) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                let inbound = match listener.accept() {
                    Ok((inbound, _)) => inbound,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = inbound.set_nonblocking(false);
                let Ok(outbound) = TcpStream::connect(to) else {
                    continue;
                };
                for (from, into) in [
                    (inbound.try_clone(), outbound.try_clone()),
                    (outbound.try_clone(), inbound.try_clone()),
                ] {
                    if let (Ok(from), Ok(into)) = (from, into) {
                        let held = held.clone();
                        std::thread::spawn(move || forward(from, into, &held));
                    }
                }
            }
        });
        Ok(Proxy { addr, cut, stop })
    }

    /// Holds (`true`) or releases (`false`) every byte in both directions.
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn forward(mut from: TcpStream, mut into: TcpStream, cut: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Read while the link is up or down; held while it is down.
        while cut.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if into.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}
