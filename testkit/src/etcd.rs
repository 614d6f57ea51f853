//! A real etcd for the cluster tests, and a proxy that can cut a host off it.
//!
//! [`Etcd::start`] runs Debian's `etcd` (from `etcd-server`, which
//! `scripts/setup.sh` installs) as a one-member cluster on loopback ports,
//! its data in a directory the caller gives; it is killed at drop.
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
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let log_file = std::fs::File::create(&log).expect("create etcd.log");
        let child = Command::new(bin)
            .args(["--name", "n0"])
            .arg("--data-dir")
            .arg(dir.join("etcd-data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("n0={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn etcd");
        let etcd = Etcd {
            child,
            client: SocketAddr::from(([127, 0, 0, 1], client)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(etcd.client).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen within 20 s:\n{}",
                etcd.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
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
