//! What an on-call engineer relies on, tested with the tools they run:
//!
//! - `configs/alerts.yml` passes `promtool check rules`, and its unit tests
//!   (`configs/alerts.test.yml`) pass `promtool test rules`; every alert has
//!   a case where it fires and one where it does not (checked here by
//!   reading the test file, so a new alert without tests fails);
//! - `configs/prometheus.yml` (which loads the rules) passes
//!   `promtool check config`;
//! - `configs/relive.service` passes `systemd-analyze verify`;
//! - a real Prometheus (Debian's `prometheus` package), started by the test
//!   with the rules loaded, scrapes a real `relive up` running the demo
//!   fleet (`configs/demo.yaml`, its state moved into the test's directory
//!   and its metrics on a loopback port); after a forced failover the
//!   failover counter and duration histogram are in Prometheus' own query
//!   API, every alert rule is loaded and healthy, and every query of
//!   `configs/grafana-dashboard.json` evaluates without error and returns
//!   data.
//!
//! Tools that are missing are a printed skip, and a failure under
//! `RELIVE_REQUIRE_TOOLS=1` (CI: `scripts/setup.sh` installs them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers fail a test by panicking

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fleet::{wait_for, Fleet, STEP};
use common::{require_kvm, ChildGuard};
use relive_supervisor::client::Client;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn configs(name: &str) -> PathBuf {
    repo().join("configs").join(name)
}

/// The path of `tool`, or `None` after printing why the test is skipped
/// (a panic under `RELIVE_REQUIRE_TOOLS=1`).
fn tool(tool: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        let why = format!(
            "{tool} is not installed (Debian package {package}; scripts/setup.sh installs it)"
        );
        assert!(
            std::env::var("RELIVE_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "{why}, and RELIVE_REQUIRE_TOOLS=1"
        );
        eprintln!("skipped: {why}");
    }
    found
}

/// Runs a command; panics with its output unless it succeeds.
fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{text}",
        out.status
    );
    text
}

fn yaml(path: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The alert names of the rules file.
fn alert_names() -> Vec<String> {
    let rules = yaml(&configs("alerts.yml"));
    rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn alert_rules_pass_promtool_and_every_alert_is_tested_firing_and_not() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let out = run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(configs("alerts.yml")),
    );
    let alerts = alert_names();
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{out}"
    );
    run_ok(
        Command::new(&promtool)
            .arg("check")
            .arg("config")
            .arg(configs("prometheus.yml")),
    );
    run_ok(
        Command::new(&promtool)
            .arg("test")
            .arg("rules")
            .arg(configs("alerts.test.yml")),
    );

    // Each alert is evaluated at least once expecting it to fire and once
    // expecting silence.
    let tests = yaml(&configs("alerts.test.yml"));
    let cases: Vec<(String, bool)> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| {
            t["alert_rule_test"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .map(|c| {
            let fires = c["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty());
            (c["alertname"].as_str().unwrap_or("").to_string(), fires)
        })
        .collect();
    for alert in &alerts {
        for fires in [true, false] {
            assert!(
                cases.iter().any(|(a, f)| a == alert && *f == fires),
                "alert {alert} has no test case where it {}",
                if fires { "fires" } else { "stays silent" }
            );
        }
    }
    // The documented runbooks exist: each alert's runbook anchor is a
    // heading of the README's "Operating relive" section.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let rules = yaml(&configs("alerts.yml"));
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let runbook = rule["annotations"]["runbook"].as_str().unwrap_or("");
        let anchor = runbook.strip_prefix("README.md#").unwrap_or_else(|| {
            panic!(
                "{}: runbook {runbook:?} is not a README anchor",
                rule["alert"].as_str().unwrap_or("?")
            )
        });
        let heading_anchors: Vec<String> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("#### "))
            .map(|h| {
                h.to_lowercase()
                    .chars()
                    .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                    .map(|c| if c == ' ' { '-' } else { c })
                    .collect()
            })
            .collect();
        assert!(
            heading_anchors.iter().any(|h| h == anchor),
            "runbook anchor #{anchor} has no `#### ` heading in README.md (have {heading_anchors:?})"
        );
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let Some(analyze) = tool("systemd-analyze", "systemd") else {
        return;
    };
    // The unit names the installed binaries (/usr/local/bin); verify checks
    // that they exist, so a copy points at the ones just built.
    let dir = common::temp_dir();
    let unit = std::fs::read_to_string(configs("relive.service")).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_relive"));
    let bin_dir = bin.parent().unwrap();
    assert!(unit.contains("/usr/local/bin/relive "), "{unit}");
    let unit = unit.replace("/usr/local/bin/", &format!("{}/", bin_dir.display()));
    let path = dir.join("relive.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&path)
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about the unit itself; systemd-analyze also reports on units of
    // the host it loads alongside, which are not ours to fix.
    let ours: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("relive.service") || l.contains(&*path.to_string_lossy()))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {} ({}):\n{text}",
        path.display(),
        out.status
    );
}

/// Percent-encodes a query parameter (RFC 3986 unreserved characters kept).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server started by the test, with its data in `dir`.
struct Prometheus {
    _process: ChildGuard,
    client: Client,
    runtime: tokio::runtime::Runtime,
    log: PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` with `config` on a free loopback port. A port
    /// taken between choosing and binding is chosen again.
    fn start(binary: &Path, config: &Path, dir: &Path) -> Prometheus {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let log = dir.join("prometheus.log");
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut process = ChildGuard::spawn(
                Command::new(binary)
                    .arg(format!("--config.file={}", config.display()))
                    .arg(format!(
                        "--storage.tsdb.path={}",
                        dir.join("data").display()
                    ))
                    .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap()),
            );
            let client = Client::new(Some(format!("http://127.0.0.1:{port}")), None).unwrap();
            let deadline = Instant::now() + STEP;
            while Instant::now() < deadline {
                if process.try_wait().is_some() {
                    break; // the port was taken: choose another
                }
                if runtime.block_on(client.text("/-/ready")).is_ok() {
                    return Prometheus {
                        _process: process,
                        client,
                        runtime,
                        log,
                    };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                text.contains("address already in use"),
                "prometheus did not become ready:\n{text}"
            );
        }
        panic!("no free port for prometheus after 5 tries");
    }

    /// `GET path` of the HTTP API as JSON, asserting `status: success`.
    fn api(&self, path: &str) -> Value {
        let text = self
            .runtime
            .block_on(self.client.text(path))
            .unwrap_or_else(|e| panic!("prometheus {path}: {e}"));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], "success", "{path}: {v}");
        v
    }

    /// The result vector of an instant query (an error names the query).
    fn query(&self, query: &str) -> Vec<Value> {
        let v = self.api(&format!("/api/v1/query?query={}", encode(query)));
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The sum of an instant query's sample values.
    fn sum(&self, query: &str) -> f64 {
        self.query(query)
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum()
    }
}

/// The demo fleet file with its state in `state` and metrics on a loopback
/// port of the kernel's choosing.
fn demo_fleet(state: &Path) -> String {
    let demo = std::fs::read_to_string(configs("demo.yaml")).unwrap();
    let mut out = String::new();
    let mut replaced = false;
    for line in demo.lines() {
        if line.starts_with("state_dir:") {
            out.push_str(&format!("state_dir: {}\n", state.display()));
            replaced = true;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced, "configs/demo.yaml has no state_dir line");
    out.push_str("metrics:\n  listen: 127.0.0.1:0\n");
    out
}

/// Every PromQL expression of the dashboard, with Grafana's variables
/// replaced by what Grafana would send for "all VMs, the last 5 minutes".
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(configs("grafana-dashboard.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let expr = expr
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "5m")
                    .replace("$vm", ".*");
                assert!(!expr.contains('$'), "an unknown variable in {expr}");
                out.push((panel["title"].as_str().unwrap_or("?").to_string(), expr));
            }
        }
    }
    out
}

#[test]
fn prometheus_scrapes_the_demo_fleet_sees_a_failover_and_evaluates_every_dashboard_query() {
    if !require_kvm() {
        return;
    }
    let Some(prometheus) = tool("prometheus", "prometheus") else {
        return;
    };
    let mut fleet = Fleet::new(demo_fleet);
    fleet.start_supervisor();
    // `relive up` prints the address it bound.
    let scrape = wait_for("the metrics address on relive up's output", STEP, || {
        let out = std::fs::read_to_string(fleet.stdout_path()).ok()?;
        let line = out
            .lines()
            .find(|l| l.trim_start().starts_with("metrics"))?;
        let url = line.split_whitespace().nth(1)?;
        Some(
            url.strip_prefix("http://")?
                .strip_suffix("/metrics")?
                .to_string(),
        )
    });

    let dir = fleet.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    // The project's scrape config, pointed at this supervisor, scraping every
    // second, with the project's rules.
    let mut config = yaml(&configs("prometheus.yml"));
    config["global"]["scrape_interval"] = "1s".into();
    config["global"]["evaluation_interval"] = "1s".into();
    config["rule_files"] = vec![serde_yaml::Value::from(
        configs("alerts.yml").display().to_string(),
    )]
    .into();
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["job_name"], "relive");
    job["scrape_interval"] = "1s".into();
    job["scrape_timeout"] = "1s".into();
    job["static_configs"][0]["targets"] = vec![serde_yaml::Value::from(scrape.clone())].into();
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, serde_yaml::to_string(&config).unwrap()).unwrap();
    let prom = Prometheus::start(&prometheus, &config_path, &dir);

    // Every demo VM running, with a standby and a checkpoint, as Prometheus
    // sees it.
    let vms = ["demo-1", "demo-2", "demo-3"];
    for vm in vms {
        fleet.wait_healthy(vm, 1, true);
        fleet.wait_next_checkpoint(vm);
    }
    wait_for("Prometheus to see the fleet running", STEP, || {
        (prom.sum(r#"up{job="relive"}"#) == 1.0
            && prom.sum(r#"relive_vm_state{state="running"}"#) == 3.0
            && prom.sum("relive_standby_ready") == 3.0
            && prom.sum("relive_checkpoint_duration_seconds_count") >= 3.0)
            .then_some(())
    });
    let build = prom.query("relive_build_info");
    assert_eq!(build.len(), 1, "{build:?}");
    assert_eq!(build[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(prom.sum("process_resident_memory_bytes") > 0.0);

    // A forced failover, seen through Prometheus.
    let since = fleet.events().len();
    fleet.act(&["failover", "demo-1", "--to", "consistency"]);
    fleet.wait_failover("demo-1", since, "operator-failover");
    wait_for("the failover in Prometheus", STEP, || {
        (prom.sum(r#"relive_restores_total{vm="demo-1",image="consistency"}"#) >= 1.0
            && prom.sum(r#"increase(relive_failover_duration_seconds_count{vm="demo-1"}[1m])"#)
                > 0.0
            && prom.sum(r#"relive_vm_state{vm="demo-1",state="running"}"#) == 1.0)
            .then_some(())
    });
    let p = prom.sum(r#"histogram_quantile(0.5, sum by (le) (relive_failover_duration_seconds_bucket{vm="demo-1"}))"#);
    assert!(p > 0.0 && p < 5.0, "median failover {p} s");

    // The rules are loaded and healthy (they evaluated against real series).
    let rules = prom.api("/api/v1/rules");
    let loaded: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("").to_string(),
                r["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let mut names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut expected = alert_names();
    expected.sort();
    assert_eq!(
        names,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    wait_for("every rule evaluated and healthy", STEP, || {
        let rules = prom.api("/api/v1/rules");
        rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .all(|r| r["health"] == "ok")
            .then_some(())
    });
    // Nothing pages for a healthy demo fleet with one forced failover.
    let firing = prom.query(r#"ALERTS{alertstate="firing"}"#);
    assert!(firing.is_empty(), "alerts firing: {firing:?}");

    // Every dashboard query evaluates, and returns data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let mut empty = Vec::new();
    for (panel, expr) in &queries {
        if prom.query(expr).is_empty() {
            empty.push(format!("{panel}: {expr}"));
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n  {}\n  prometheus log: {}",
        empty.join("\n  "),
        prom.log.display()
    );
}
