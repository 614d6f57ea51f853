//! `relive-agent`: PID 1 of a container microVM (the `/init` that
//! `relive image build` installs).
//!
//! ```text
//! relive-agent [--config PATH] [--channel PATH | --channel-fd N]
//! ```
//!
//! As PID 1 it mounts what a container expects (`/proc`, `/sys`, `/dev`,
//! `/dev/pts`, `/dev/shm`, `/run`, `/tmp`), names the host (`relive`),
//! brings `lo` up, then runs the image's entrypoint and cmd
//! (`/.relive/config.json`, written by `relive image build`) with its
//! environment, working directory and user, reaps every process that ends
//! (orphans included), hands `SIGTERM`/`SIGINT` on to the app, and when the
//! app has ended and its output is drained, powers the VM off. Not PID 1
//! (tests), it exits with the app's status instead.
//!
//! # The agent channel (COM2, `/dev/ttyS1`, raw mode)
//!
//! The existing line protocol (`control/src/heartbeat.rs`), one line each,
//! at most 512 bytes (longer output is split):
//!
//! ```text
//! ready app=running pid=P notices=restored   once the app runs; asks
//!                                the VMM for `restored` after a restore
//! out N TEXT                     a line the app wrote on stdout
//! err N TEXT                     ... on stderr; N counts both, from 1
//! hb seq=S app=running|exited reaped=R   every hb_ms (config, default 1000)
//! app exited code=C | app exited signal=S
//! status app=... pid=P out=N reaped=R    the answer to `status`
//! ```
//!
//! Host commands: `status`, `signal N` (to the app), `stop` (`SIGTERM` to
//! the app), and the VMM's notice after every restore:
//!
//! ```text
//! restored time=NS entropy=HEX   host -> guest: the host's CLOCK_REALTIME
//!                                (ns) and 32 fresh random bytes
//! restored reseeded=B clock_step_ms=D   the agent's answer
//! ```
//!
//! On `restored` the agent mixes the bytes into the kernel's pool with
//! `RNDADDENTROPY` and forces a reseed of the CRNG (`RNDRESEEDCRNG`), so two
//! VMs restored from one image do not share their random numbers, and steps
//! `CLOCK_REALTIME` to the host's time (the guest's clock stood still while
//! it was an image): forward by any amount over 1 ms, back only when the
//! guest is over a second ahead (a smaller lead is the notice's own transit
//! time). `D` is the step, 0 when none was made.
//!
//! `N` lets the host show each output line once across a restore (the guest
//! resumes its count where the image was taken).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What the agent runs (`/.relive/config.json`, as `relive image build`
/// writes it).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct RunConfig {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<String>,
    working_dir: String,
    user: String,
    /// Heartbeat period in ms (default 1000).
    hb_ms: Option<u64>,
    /// The guest's hostname (default `relive`).
    hostname: Option<String>,
}

/// The longest line on the channel (the VMM's framing limit).
const MAX_LINE: usize = 512;

/// A signal for the app, set by the handler.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    PENDING.store(signal, Ordering::Relaxed);
}

enum Event {
    Out(&'static str, String),
    /// A stream of the app ended.
    Closed,
    Command(String),
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config_path = "/.relive/config.json".to_string();
    let mut channel_path = "/dev/ttyS1".to_string();
    let mut channel_fd: Option<i32> = None;
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--config", Some(v)) => config_path = v,
            ("--channel", Some(v)) => channel_path = v,
            ("--channel-fd", Some(v)) => channel_fd = v.parse().ok(),
            _ => {
                eprintln!("relive-agent: usage: relive-agent [--config PATH] [--channel PATH | --channel-fd N]");
                return ExitCode::from(2);
            }
        }
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        init_system();
    }
    let channel = match channel_fd {
        // SAFETY: the descriptor was handed to this process to own.
        Some(fd) => unsafe { std::fs::File::from_raw_fd(fd) },
        None => match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&channel_path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("relive-agent: cannot open the agent channel {channel_path}: {e}");
                return finish(pid1, 1);
            }
        },
    };
    raw_mode(&channel);
    let config: RunConfig = match std::fs::read(&config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(&channel, "app exited code=1 error=config");
            eprintln!("relive-agent: cannot read {config_path}: {e}");
            drain(&channel);
            return finish(pid1, 1);
        }
    };
    let mut config = config;
    if let Ok(cmdline) = std::fs::read_to_string("/proc/cmdline") {
        if let Err(e) = apply_cmdline(&mut config, &cmdline) {
            let _ = writeln!(&channel, "app exited code=1 error=cmdline detail={e}");
            eprintln!("relive-agent: the kernel command line: {e}");
            drain(&channel);
            return finish(pid1, 1);
        }
    }
    if pid1 {
        let name = config.hostname.as_deref().unwrap_or("relive");
        let _ = rustix::system::sethostname(name.as_bytes());
    }
    let last_out = channel.try_clone();
    let code = run(&config, channel);
    if let Ok(channel) = last_out {
        drain(&channel);
    }
    finish(pid1, code)
}

/// What the host set on the kernel command line (the fleet's `command`
/// and `env` for an `image:` VM):
///
/// - `relive.run=HEX`: the hex of a JSON object `{"command": [...] | null,
///   "env": ["NAME=value", ...]}`; `command` replaces the image's
///   entrypoint and cmd, `env` is added to the image's environment (a name
///   it has is replaced);
/// - `relive.hb_ms=N`: the heartbeat period, as for the bundled guest.
fn apply_cmdline(config: &mut RunConfig, cmdline: &str) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Run {
        command: Option<Vec<String>>,
        #[serde(default)]
        env: Vec<String>,
    }
    for word in cmdline.split_whitespace() {
        if let Some(hex) = word.strip_prefix("relive.run=") {
            let bytes = decode_hex(hex).ok_or("relive.run= is not hex")?;
            let run: Run = serde_json::from_slice(&bytes)
                .map_err(|e| format!("relive.run= is not the JSON relive writes: {e}"))?;
            if let Some(command) = run.command {
                config.entrypoint = command;
                config.cmd.clear();
            }
            for pair in run.env {
                let name = pair.split_once('=').map_or(pair.as_str(), |(n, _)| n);
                config
                    .env
                    .retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != name);
                config.env.push(pair);
            }
        } else if let Some(ms) = word.strip_prefix("relive.hb_ms=") {
            config.hb_ms = Some(
                ms.parse()
                    .map_err(|_| format!("relive.hb_ms={ms} is not a number"))?,
            );
        }
    }
    Ok(())
}

/// The bytes of an even-length hex string.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    if hex.len() % 2 != 0 {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Ends the agent: as PID 1 the VM powers off (the app's status went out on
/// the channel); otherwise the process exits with it.
fn finish(pid1: bool, code: i32) -> ExitCode {
    if pid1 {
        // SAFETY: sync(2) takes nothing.
        unsafe { libc::sync() };
        let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    }
    ExitCode::from(u8::try_from(code.clamp(0, 255)).unwrap_or(1))
}

/// Mounts what a container expects; each one that fails is said and skipped.
fn init_system() {
    let mounts: [(&str, &str, &str, u64, &str); 7] = [
        (
            "proc",
            "/proc",
            "proc",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            "",
        ),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620",
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=0755",
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            libc::MS_NOSUID | libc::MS_NODEV,
            "mode=1777",
        ),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| std::ffi::CString::new(s).unwrap_or_default();
        let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
        // SAFETY: four NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                source_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                flags,
                data_c.as_ptr().cast(),
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                eprintln!("relive-agent: cannot mount {fstype} on {target}: {e}");
            }
        }
    }
    loopback_up();
}

/// `ip link set lo up`, with one ioctl.
fn loopback_up() {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return;
    }
    // SAFETY: `ifr` is a zeroed ifreq; its name is "lo\0", its flags are
    // read then written by the two ioctls on a socket this function owns.
    unsafe {
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr) == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        libc::close(fd);
    }
}

/// Waits until the channel's output has left (the UART sent it): the host
/// must have the last lines before the VM powers off.
fn drain(channel: &std::fs::File) {
    // SAFETY: tcdrain(3) on the open channel; a file or pipe just fails.
    unsafe { libc::tcdrain(channel.as_raw_fd()) };
}

/// Puts a terminal channel in raw mode (no echo, no line editing); a file
/// or pipe is left alone.
fn raw_mode(channel: &std::fs::File) {
    let fd = channel.as_raw_fd();
    // SAFETY: `t` is filled by tcgetattr before it is used; the descriptor
    // is the open channel.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// `uid[:gid]` or `name[:group]` looked up in the image's `/etc/passwd`
/// and `/etc/group`; root when empty.
fn resolve_user(user: &str) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                Some((
                    f.get(2)?.parse().ok()?,
                    f.get(3).and_then(|g| g.parse().ok()),
                ))
            })?
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => (uid, None),
        Err(_) => {
            lookup("/etc/passwd", u).ok_or_else(|| format!("no user {u:?} in /etc/passwd"))?
        }
    };
    let gid = match g {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => lookup("/etc/group", g)
                .map(|(gid, _)| gid)
                .ok_or_else(|| format!("no group {g:?} in /etc/group"))?,
        },
    };
    Ok((uid, gid))
}

/// Sends one line (split at [`MAX_LINE`]) on the channel.
fn send(channel: &mut std::fs::File, line: &str) {
    let mut rest = line;
    loop {
        let mut cut = rest.len().min(MAX_LINE - 1);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        let _ = channel.write_all(head.as_bytes());
        let _ = channel.write_all(b"\n");
        if tail.is_empty() {
            break;
        }
        rest = tail;
    }
}

/// Runs the app to its end; returns its exit status (128 + signal).
fn run(config: &RunConfig, mut channel: std::fs::File) -> i32 {
    let argv: Vec<&String> = config.entrypoint.iter().chain(&config.cmd).collect();
    let Some((program, rest)) = argv.split_first() else {
        send(&mut channel, "app exited code=1 error=nothing-to-run");
        return 1;
    };
    let (uid, gid) = match resolve_user(&config.user) {
        Ok(ids) => ids,
        Err(e) => {
            send(
                &mut channel,
                &format!("app exited code=1 error=user detail={e}"),
            );
            return 1;
        }
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` only stores into an atomic.
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
    let mut command = Command::new(program);
    command
        .args(rest)
        .env_clear()
        .envs(config.env.iter().filter_map(|kv| kv.split_once('=')))
        .current_dir(if config.working_dir.is_empty() {
            "/"
        } else {
            &config.working_dir
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // std clears the supplementary groups when root sets a uid.
        .gid(gid)
        .uid(uid);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            send(
                &mut channel,
                &format!("app exited code=127 error=spawn detail={program}: {e}"),
            );
            return 127;
        }
    };
    let app = child.id() as i32;
    send(
        &mut channel,
        &format!("ready app=running pid={app} notices=restored"),
    );
    let (tx, rx) = mpsc::channel();
    for (kind, stream) in [
        (
            "out",
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        (
            "err",
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ] {
        let Some(stream) = stream else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::Out(kind, line)).is_err() {
                    return;
                }
            }
            let _ = tx.send(Event::Closed);
        });
    }
    if let Ok(input) = channel.try_clone() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(input).lines() {
                let Ok(line) = line else { break };
                if tx.send(Event::Command(line.trim().to_string())).is_err() {
                    return;
                }
            }
        });
    }
    drop(tx);
    let hb = Duration::from_millis(config.hb_ms.unwrap_or(1000).max(10));
    let mut next_hb = Instant::now() + hb;
    let (mut seq, mut out_seq, mut reaped, mut open_streams) = (0u64, 0u64, 0u64, 2);
    let mut status: Option<i32> = None;
    loop {
        let signal = PENDING.swap(0, Ordering::Relaxed);
        if signal != 0 && status.is_none() {
            // SAFETY: kill(2) to the app's pid, which this process reaps.
            unsafe { libc::kill(app, signal) };
        }
        // Every child that ended, the app's orphans included.
        loop {
            let mut raw = 0;
            // SAFETY: `raw` is a valid out-pointer.
            let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if pid == app {
                let es = std::process::ExitStatus::from_raw(raw);
                let (line, code) = match (es.code(), es.signal()) {
                    (Some(c), _) => (format!("app exited code={c}"), c),
                    (None, Some(s)) => (format!("app exited signal={s}"), 128 + s),
                    _ => ("app exited".to_string(), 1),
                };
                status = Some(code);
                // The app's last output first.
                while open_streams > 0 {
                    match rx.recv_timeout(Duration::from_millis(500)) {
                        Ok(Event::Out(kind, text)) => {
                            out_seq += 1;
                            send(&mut channel, &format!("{kind} {out_seq} {text}"));
                        }
                        Ok(Event::Closed) => open_streams -= 1,
                        Ok(Event::Command(_)) => {}
                        Err(_) => break,
                    }
                }
                send(&mut channel, &line);
            } else {
                reaped += 1;
            }
        }
        if let Some(code) = status {
            let _ = child.try_wait();
            return code;
        }
        match rx.recv_timeout(
            next_hb
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        ) {
            Ok(Event::Out(kind, text)) => {
                out_seq += 1;
                send(&mut channel, &format!("{kind} {out_seq} {text}"));
            }
            Ok(Event::Closed) => open_streams -= 1,
            Ok(Event::Command(cmd)) => {
                let mut words = cmd.split_whitespace();
                match (
                    words.next(),
                    words.next().and_then(|n| n.parse::<i32>().ok()),
                ) {
                    (Some("status"), _) => send(
                        &mut channel,
                        &format!("status app=running pid={app} out={out_seq} reaped={reaped}"),
                    ),
                    (Some("stop"), _) => PENDING.store(libc::SIGTERM, Ordering::Relaxed),
                    (Some("signal"), Some(n)) => PENDING.store(n, Ordering::Relaxed),
                    (Some("restored"), _) => send(&mut channel, &on_restored(&cmd)),
                    _ => {}
                }
            }
            Err(_) => {}
        }
        if Instant::now() >= next_hb {
            seq += 1;
            send(
                &mut channel,
                &format!("hb seq={seq} app=running reaped={reaped}"),
            );
            next_hb += hb;
        }
    }
}

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// How far ahead of the host the guest's clock may be before it is stepped
/// back: a smaller lead is the notice's own time in transit.
const BACK_STEP_NS: i128 = 1_000_000_000;
/// The smallest forward step made.
const FORWARD_STEP_NS: i128 = 1_000_000;

/// Acts on the host's `restored time=NS entropy=HEX` notice (module docs);
/// returns the answer line.
fn on_restored(notice: &str) -> String {
    let field = |name: &str| {
        notice
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
    };
    let entropy = field("entropy").and_then(decode_hex);
    let reseeded = match entropy {
        Some(bytes) if !bytes.is_empty() => match reseed(&bytes) {
            Ok(()) => bytes.len().to_string(),
            Err(e) => format!("0 error={}", e.to_string().replace(' ', "-")),
        },
        _ => "0 error=no-entropy".to_string(),
    };
    let step = match field("time").and_then(|t| t.parse::<i128>().ok()) {
        Some(host_ns) => match step_clock(host_ns) {
            Ok(step_ns) => format!("{}", step_ns / 1_000_000),
            Err(e) => format!("0 error={}", e.to_string().replace(' ', "-")),
        },
        None => "0 error=no-time".to_string(),
    };
    format!("restored reseeded={reseeded} clock_step_ms={step}")
}

/// Adds `bytes` to the kernel's entropy pool, crediting them, and reseeds
/// the CRNG from it.
fn reseed(bytes: &[u8]) -> std::io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u8> = Vec::with_capacity(8 + bytes.len() + 3);
    let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&len.saturating_mul(8).to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(bytes);
    info.resize(info.len().next_multiple_of(4), 0);
    // SAFETY: `info` is a rand_pool_info whose buf_size bytes follow its
    // header; the kernel reads only those. RNDRESEEDCRNG takes no argument.
    unsafe {
        if libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0
            || libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Steps `CLOCK_REALTIME` to `host_ns` when the guest is behind by more than
/// [`FORWARD_STEP_NS`] or ahead by more than [`BACK_STEP_NS`]; returns the
/// step in ns (0: none).
fn step_clock(host_ns: i128) -> std::io::Result<i128> {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Realtime);
    let guest_ns = i128::from(now.tv_sec) * 1_000_000_000 + i128::from(now.tv_nsec);
    let step = host_ns - guest_ns;
    if (-BACK_STEP_NS..=FORWARD_STEP_NS).contains(&step) {
        return Ok(0);
    }
    let to = rustix::time::Timespec {
        tv_sec: i64::try_from(host_ns / 1_000_000_000).unwrap_or(i64::MAX),
        tv_nsec: i64::try_from(host_ns % 1_000_000_000).unwrap_or(0),
    };
    rustix::time::clock_settime(rustix::time::ClockId::Realtime, to)?;
    Ok(step)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails by panicking
mod tests {
    use super::*;

    fn hex(text: &str) -> String {
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn the_command_line_replaces_the_command_and_adds_to_the_env() {
        let mut config = RunConfig {
            entrypoint: vec!["/app".into()],
            cmd: vec!["--serve".into()],
            env: vec!["PATH=/bin".into(), "MODE=prod".into()],
            ..RunConfig::default()
        };
        let run = hex(r#"{"command":["/bin/sh","-c","echo hi"],"env":["MODE=test","X=1"]}"#);
        let cmdline = format!("console=ttyS0 quiet relive.run={run} relive.hb_ms=250\n");
        apply_cmdline(&mut config, &cmdline).unwrap();
        assert_eq!(config.entrypoint, ["/bin/sh", "-c", "echo hi"]);
        assert!(config.cmd.is_empty());
        assert_eq!(config.env, ["PATH=/bin", "MODE=test", "X=1"]);
        assert_eq!(config.hb_ms, Some(250));

        // Only env: the image's command stays.
        let mut config = RunConfig {
            entrypoint: vec!["/app".into()],
            ..RunConfig::default()
        };
        let run = hex(r#"{"command":null,"env":["A=b"]}"#);
        apply_cmdline(&mut config, &format!("relive.run={run}")).unwrap();
        assert_eq!(
            (config.entrypoint.as_slice(), config.env.as_slice()),
            (&["/app".to_string()][..], &["A=b".to_string()][..])
        );

        for bad in ["relive.run=zz", "relive.run=7b", "relive.hb_ms=fast"] {
            assert!(
                apply_cmdline(&mut RunConfig::default(), bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_restored_notice_without_its_fields_is_answered_with_errors() {
        assert_eq!(
            on_restored("restored"),
            "restored reseeded=0 error=no-entropy clock_step_ms=0 error=no-time"
        );
    }
}
