//! `relive`: the supervisor daemon (`relive up FLEET.yaml`) and its CLI.
//!
//! Every command but `up` talks to a running supervisor over its API (see
//! `relive_supervisor::client` for how it is found). Human tables by
//! default, `--json` for the raw answers.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relive_supervisor::client::Client;
use serde_json::Value;

/// `println!` that does not panic when the reader went away (`relive ... | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser, Debug)]
#[command(
    name = "relive",
    version,
    about = "relive keeps virtual machines alive"
)]
struct Cli {
    /// The supervisor's API: a socket path or http://HOST:PORT
    /// [default: $RELIVE_API, else the one the last `relive up` recorded].
    #[arg(long, global = true)]
    api: Option<String>,
    /// Bearer token for a TCP API [default: $RELIVE_TOKEN].
    #[arg(long, global = true)]
    token: Option<String>,
    /// Print JSON.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for the supervisor's answer (e.g. 30s, 10m); a
    /// followed stream waits this long for its start only.
    #[arg(long, global = true, value_parser = parse_timeout, default_value = "2m")]
    timeout: std::time::Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the supervisor for a fleet file, in the foreground.
    Up {
        /// The fleet file (YAML).
        fleet: PathBuf,
        /// The relive-vmm binary [default: beside this one, else on PATH].
        #[arg(long)]
        vmm_bin: Option<PathBuf>,
        /// Cluster mode: make this file's `vms`, `defaults` and
        /// `container_kernel` the cluster's, replacing the fleet in etcd at
        /// this revision (the one a refused start names).
        #[arg(long, value_name = "REVISION")]
        replace_fleet: Option<i64>,
    },
    /// Every VM: state, processes, failures, heartbeats.
    Status,
    /// One VM in detail.
    Show {
        /// The VM.
        vm: String,
    },
    /// Fail a VM over now.
    Failover {
        /// The VM.
        vm: String,
        /// `consistency` (latest good image), `boot`, or an image id.
        #[arg(long, default_value = "consistency")]
        to: String,
        /// Cluster mode: move the VM to this host instead (checkpoint,
        /// send the image, end it here, restore it there; see `relive
        /// hosts`). Asked of the VM's current host.
        #[arg(long, value_name = "HOST")]
        to_host: Option<String>,
    },
    /// Write a consistency image now.
    Checkpoint {
        /// The VM.
        vm: String,
    },
    /// Pause a VM's guest.
    Pause {
        /// The VM.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        vm: String,
    },
    /// Stop a VM; it stays down until `relive start`.
    Stop {
        /// The VM.
        vm: String,
    },
    /// Start a stopped or failed VM (clean start from its boot image).
    Start {
        /// The VM.
        vm: String,
    },
    /// Cluster mode: every host, its lease's time left, the VMs it owns.
    Hosts,
    /// State transitions, newest last.
    Events {
        /// Keep printing new events until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// How many past events to show.
        #[arg(short, default_value_t = 20)]
        n: usize,
    },
    /// A container VM's app output (stdout, and stderr on stderr), kept
    /// across failovers: a restore does not repeat what was shown.
    Logs {
        /// The VM.
        vm: String,
        /// Keep printing new output until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// How many past lines to show.
        #[arg(short, default_value_t = 100)]
        n: usize,
    },
    /// A VM's failover images.
    Images {
        /// The VM.
        vm: String,
    },
    /// The supervisor's Prometheus metrics.
    Metrics,
    /// Container images for microVMs (no supervisor needed).
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
}

#[derive(Subcommand, Debug)]
enum ImageAction {
    /// Flatten an image into an initramfs (newc cpio) that boots the app
    /// under relive's agent: an OCI layout directory, an OCI or `docker
    /// save` tarball, or a root directory (with --entrypoint). No registry
    /// is reached: `skopeo copy docker://IMAGE oci:DIR` or `docker save`
    /// first.
    Build {
        /// The image: OCI layout directory, tarball, or root directory.
        source: PathBuf,
        /// The archive to write.
        #[arg(long, short)]
        output: PathBuf,
        /// The guest agent binary installed as /init [default: the static
        /// build of scripts/build-agent.sh, else relive-agent beside this
        /// binary].
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Replace the image's entrypoint (a JSON array, or one word).
        #[arg(long)]
        entrypoint: Option<String>,
        /// Replace the image's cmd (a JSON array, or one word).
        #[arg(long)]
        cmd: Option<String>,
        /// Set an environment variable (KEY=VALUE; repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Replace the working directory.
        #[arg(long)]
        workdir: Option<String>,
        /// Replace the user (`uid`, `uid:gid`, `name`).
        #[arg(long)]
        user: Option<String>,
        /// `zstd` (fastest: ~6x gzip's speed here, and smaller), `gzip`
        /// or `none`; Debian's cloud kernel unpacks all three.
        #[arg(long, default_value = "zstd")]
        compress: String,
    },
}

/// A command line's `--entrypoint`/`--cmd`: a JSON array of strings, or one
/// word.
fn argv(flag: &str, value: &str) -> anyhow::Result<Vec<String>> {
    if value.trim_start().starts_with('[') {
        serde_json::from_str(value)
            .map_err(|e| anyhow::anyhow!("--{flag} {value:?} is not a JSON array of strings: {e}"))
    } else {
        Ok(vec![value.to_string()])
    }
}

/// The static agent `scripts/build-agent.sh` builds next to this binary's
/// build (`target/x86_64-unknown-linux-gnu/<profile or release>/relive-agent`),
/// else `relive-agent` beside this binary.
fn default_agent() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let dir = exe.as_deref().and_then(|e| e.parent());
    let static_build = dir.and_then(|d| {
        let builds = d.parent()?.join("x86_64-unknown-linux-gnu");
        [d.file_name()?, "release".as_ref()]
            .into_iter()
            .map(|profile| builds.join(profile).join("relive-agent"))
            .find(|p| p.exists())
    });
    static_build
        .or_else(|| dir.map(|d| d.join("relive-agent")))
        .unwrap_or_else(|| PathBuf::from("relive-agent"))
}

fn image_build(action: ImageAction, json: bool) -> anyhow::Result<()> {
    let ImageAction::Build {
        source,
        output,
        agent,
        entrypoint,
        cmd,
        env,
        workdir,
        user,
        compress,
    } = action;
    let compression = match compress.as_str() {
        "gzip" => relive_oci::Compression::Gzip,
        "zstd" => relive_oci::Compression::Zstd,
        "none" => relive_oci::Compression::None,
        other => anyhow::bail!("--compress {other:?}: use gzip, zstd or none"),
    };
    for var in &env {
        if !var.contains('=') {
            anyhow::bail!("--env {var:?} is not KEY=VALUE");
        }
    }
    let agent = agent.unwrap_or_else(default_agent);
    let options = relive_oci::BuildOptions {
        source,
        output: output.clone(),
        agent,
        overrides: relive_oci::Overrides {
            entrypoint: entrypoint
                .as_deref()
                .map(|e| argv("entrypoint", e))
                .transpose()?,
            cmd: cmd.as_deref().map(|c| argv("cmd", c)).transpose()?,
            env,
            working_dir: workdir,
            user,
        },
        compression,
    };
    let started = std::time::Instant::now();
    let report = relive_oci::build(&options)
        .map_err(|e| anyhow::anyhow!(relive_control::error_chain(&e)))?;
    let secs = started.elapsed().as_secs_f64();
    if json {
        outln!(
            "{}",
            serde_json::json!({
                "output": output,
                "input": report.kind,
                "layers": report.layers,
                "entries": report.entries,
                "content_bytes": report.content_bytes,
                "archive_bytes": report.archive_bytes,
                "seconds": secs,
                "run": report.run,
            })
        );
    } else {
        outln!(
            "{}: {} ({} layers), {} entries, {:.1} MiB of files -> {:.1} MiB in {:.2} s",
            output.display(),
            report.kind,
            report.layers,
            report.entries,
            report.content_bytes as f64 / (1 << 20) as f64,
            report.archive_bytes as f64 / (1 << 20) as f64,
            secs
        );
        outln!(
            "runs: {}",
            report
                .run
                .entrypoint
                .iter()
                .chain(&report.run.cmd)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELIVE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: a log file (the supervisor's VMM logs,
        // a systemd journal) gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relive: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relive: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn default_vmm_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("relive-vmm")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("relive-vmm"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Up {
        fleet,
        vmm_bin,
        replace_fleet,
    } = &cli.command
    {
        return up(
            fleet,
            vmm_bin.clone().unwrap_or_else(default_vmm_bin),
            *replace_fleet,
        )
        .await;
    }
    if let Command::Image { action } = cli.command {
        return image_build(action, cli.json);
    }
    let client = Client::new(cli.api.clone(), cli.token.clone())?.with_timeout(cli.timeout);
    let post = |vm: &str, what: &str| format!("/v1/vms/{vm}/{what}");
    let json = cli.json;
    match cli.command {
        Command::Up { .. } | Command::Image { .. } => unreachable!("handled above"),
        Command::Status => {
            let vms = client.json(hyper::Method::GET, "/v1/vms", None).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print_status(&vms);
            }
        }
        Command::Show { vm } => {
            let v = client
                .json(hyper::Method::GET, &format!("/v1/vms/{vm}"), None)
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&v)?);
            } else if let Some(fields) = v.as_object() {
                for (key, value) in fields {
                    let text = match value {
                        Value::String(s) => s.clone(),
                        Value::Null => "-".into(),
                        other => other.to_string(),
                    };
                    outln!("{key:<22} {text}");
                }
            }
        }
        Command::Failover { vm, to, to_host } => {
            let body = match to_host {
                Some(host) => serde_json::json!({ "to": to, "to_host": host }),
                None => serde_json::json!({ "to": to }),
            };
            let v = client
                .json(hyper::Method::POST, &post(&vm, "failover"), Some(body))
                .await?;
            print_ok(&v, json)?;
        }
        Command::Checkpoint { vm } => act(&client, &post(&vm, "checkpoint"), json).await?,
        Command::Pause { vm } => act(&client, &post(&vm, "pause"), json).await?,
        Command::Resume { vm } => act(&client, &post(&vm, "resume"), json).await?,
        Command::Stop { vm } => act(&client, &post(&vm, "stop"), json).await?,
        Command::Start { vm } => act(&client, &post(&vm, "start"), json).await?,
        Command::Hosts => {
            let hosts = client
                .json(hyper::Method::GET, "/v1/cluster/hosts", None)
                .await?;
            if json {
                outln!("{hosts}");
            } else {
                outln!(
                    "{:<16} {:>10} {:<22} {:>5} {:>19} VMS",
                    "HOST",
                    "LEASE LEFT",
                    "ADVERTISE",
                    "CORES",
                    "VM MEMORY / RAM"
                );
                for host in hosts.as_array().into_iter().flatten() {
                    let vms: Vec<&str> = host["vms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let name = host["host"].as_str().unwrap_or("?");
                    let gib = |mib: Option<u64>| {
                        mib.map_or("?".to_string(), |m| format!("{:.1}", m as f64 / 1024.0))
                    };
                    outln!(
                        "{:<16} {:>10} {:<22} {:>5} {:>19} {}",
                        if host["this"] == true {
                            format!("{name} (this)")
                        } else {
                            name.to_string()
                        },
                        format!("{} s", host["lease_left_s"].as_i64().unwrap_or(0)),
                        host["advertise"].as_str().unwrap_or("-"),
                        host["cores"].as_u64().unwrap_or(0),
                        format!(
                            "{} / {} GiB",
                            gib(host["vm_memory_mib"].as_u64()),
                            gib(host["memory_mib"].as_u64())
                        ),
                        if vms.is_empty() {
                            "-".to_string()
                        } else {
                            vms.join(", ")
                        },
                    );
                }
            }
        }
        Command::Events { follow, n } => {
            let past = client
                .json(hyper::Method::GET, &format!("/v1/events?n={n}"), None)
                .await?;
            for event in past.as_array().into_iter().flatten() {
                print_event(event, json);
            }
            if follow {
                client
                    .follow("/v1/events/follow", |line| {
                        match serde_json::from_str::<Value>(line) {
                            Ok(event) => print_event(&event, json),
                            Err(_) => outln!("{line}"),
                        }
                        std::io::stdout().flush().is_ok()
                    })
                    .await?;
            }
        }
        Command::Logs { vm, follow, n } => {
            let path = format!("/v1/vms/{vm}/logs?n={n}");
            if follow {
                client
                    .follow(&format!("{path}&follow=true"), |line| {
                        print_log_entry(line, json)
                    })
                    .await?;
            } else {
                let past = client.json(hyper::Method::GET, &path, None).await?;
                for entry in past.as_array().into_iter().flatten() {
                    print_log_entry(&entry.to_string(), json);
                }
            }
        }
        Command::Images { vm } => {
            let images = client
                .json(hyper::Method::GET, &format!("/v1/vms/{vm}/images"), None)
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&images)?);
            } else {
                outln!(
                    "{:<25} {:<33} {:<12} {:>12}  STATUS",
                    "CREATED",
                    "ID",
                    "KIND",
                    "ON DISK"
                );
                for image in images.as_array().into_iter().flatten() {
                    let status = match &image["status"] {
                        Value::Object(o) => o
                            .get("status")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                        other => other.as_str().unwrap_or("?").to_string(),
                    };
                    outln!(
                        "{:<25} {:<33} {:<12} {:>12}  {}",
                        image["created_unix_ms"]
                            .as_u64()
                            .map_or("-".to_string(), rfc3339_ms),
                        image["id"].as_str().unwrap_or("-"),
                        image["kind"]["kind"]
                            .as_str()
                            .or(image["kind"].as_str())
                            .unwrap_or("-"),
                        image["bytes_on_disk"].as_u64().unwrap_or(0),
                        status
                    );
                }
            }
        }
        Command::Metrics => outln!("{}", client.text("/metrics").await?),
    }
    Ok(())
}

async fn act(client: &Client, path: &str, json: bool) -> anyhow::Result<()> {
    let v = client.json(hyper::Method::POST, path, None).await?;
    print_ok(&v, json)
}

fn print_ok(v: &Value, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string(v)?);
    } else {
        outln!("{}", v["ok"].as_str().unwrap_or("ok"));
    }
    Ok(())
}

fn rfc3339_ms(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `--timeout`: a duration in the fleet file's form, more than zero.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match relive_supervisor::config::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than 0s".into()),
        Err(e) => Err(e),
    }
}

fn print_status(vms: &Value) {
    // Cluster mode: each VM's owner host.
    let hosts = vms
        .as_array()
        .into_iter()
        .flatten()
        .any(|vm| vm["host"].is_string());
    let host_of = |vm: &Value| {
        if hosts {
            format!("{:<12} ", vm["host"].as_str().unwrap_or("-"))
        } else {
            String::new()
        }
    };
    outln!(
        "{:<16} {}{:<22} {:>8} {:<9} {:>8} {:>8} {:>10}  LAST HEARTBEAT",
        "VM",
        if hosts { "HOST         " } else { "" },
        "STATE",
        "PID",
        "STANDBY",
        "FAILURES",
        "RESTORES",
        "HB AGE"
    );
    for vm in vms.as_array().into_iter().flatten() {
        outln!(
            "{:<16} {}{:<22} {:>8} {:<9} {:>8} {:>8} {:>10}  {}",
            vm["name"].as_str().unwrap_or("?"),
            host_of(vm),
            vm["state"].as_str().unwrap_or("?"),
            vm["pid"].as_u64().map_or("-".into(), |p| p.to_string()),
            vm["standby"].as_str().unwrap_or("-"),
            vm["recent_failures"].as_u64().unwrap_or(0),
            vm["restores"].as_u64().unwrap_or(0),
            vm["heartbeat_age_ms"]
                .as_u64()
                .map_or("-".into(), |ms| format!("{ms} ms")),
            vm["last_heartbeat"].as_str().unwrap_or("-"),
        );
    }
}

/// Prints one app log entry (a JSON line): its text on stdout (`out`) or
/// stderr (`err`; `relive` notes as `relive: ...`). Returns whether stdout
/// still takes output.
fn print_log_entry(line: &str, json: bool) -> bool {
    if json {
        outln!("{line}");
        return std::io::stdout().flush().is_ok();
    }
    let Ok(entry) = serde_json::from_str::<Value>(line) else {
        outln!("{line}");
        return std::io::stdout().flush().is_ok();
    };
    let text = entry["text"].as_str().unwrap_or("");
    match entry["stream"].as_str() {
        Some("err") => eprintln!("{text}"),
        Some("relive") => eprintln!("relive: {text}"),
        _ => outln!("{text}"),
    }
    std::io::stdout().flush().is_ok()
}

fn print_event(event: &Value, json: bool) {
    if json {
        outln!("{event}");
        return;
    }
    let mut line = format!(
        "{} {:<12} {} -> {} ({})",
        event["time"].as_str().unwrap_or("?"),
        event["vm"].as_str().unwrap_or("?"),
        event["from"].as_str().unwrap_or("?"),
        event["to"].as_str().unwrap_or("?"),
        event["reason"].as_str().unwrap_or("?"),
    );
    if let Some(path) = event["path"].as_str() {
        line.push_str(&format!(" via {path}"));
    }
    if let Some(total) = event["durations"]["total_ms"].as_f64() {
        line.push_str(&format!(" in {total:.2} ms"));
    }
    if let Some(id) = event["image_id"].as_str() {
        line.push_str(&format!(" image {id}"));
    }
    if let Some(detail) = event["detail"].as_str() {
        line.push_str(&format!(": {detail}"));
    }
    outln!("{line}");
}

async fn up(
    fleet: &std::path::Path,
    vmm_bin: PathBuf,
    replace_fleet: Option<i64>,
) -> anyhow::Result<()> {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        stop.cancel();
    });
    relive_supervisor::daemon::up(fleet, vmm_bin, replace_fleet, shutdown, |served| {
        outln!("relive: supervising {}", fleet.display());
        outln!("  API      unix:{}", served.socket.display());
        if let Some(tcp) = served.tcp {
            outln!("  API      http://{tcp} (bearer token)");
        }
        match served.metrics {
            Some(m) => outln!("  metrics  http://{m}/metrics"),
            None => outln!("  metrics  /metrics on the API"),
        }
        outln!("  events   {}", served.events.display());
        outln!("  try      relive status | relive events --follow | relive failover VM --to boot");
        let _ = std::io::stdout().flush();
    })
    .await?;
    Ok(())
}
