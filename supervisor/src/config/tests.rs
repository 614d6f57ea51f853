//! Unit tests of the fleet file's loading and checks.

use super::*;
use std::fs;

const HOST: Host = Host {
    cores: 2,
    memory_mib: 4096,
    root: true,
};

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("relive-config-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn parse_in(dir: &TempDir, yaml: &str) -> Result<FleetConfig, ConfigError> {
    let path = dir.write("fleet.yaml", yaml);
    parse_with(&fs::read_to_string(&path).unwrap(), &path, &HOST)
}

fn ok(yaml: &str) -> FleetConfig {
    let dir = TempDir::new();
    match parse_in(&dir, yaml) {
        Ok(config) => config,
        Err(e) => panic!("{e}"),
    }
}

/// Parses `yaml`, expecting an error of `kind` at `line` naming `key`;
/// returns its text.
fn bad(yaml: &str, kind: ConfigErrorKind, line: usize, key: &str) -> String {
    let dir = TempDir::new();
    let error = match parse_in(&dir, yaml) {
        Ok(_) => panic!("accepted:\n{yaml}"),
        Err(e) => e,
    };
    let text = error.to_string();
    assert_eq!(error.kind(), kind, "{text}");
    assert_eq!(error.key(), key, "{text}");
    assert_eq!(error.location().map(|l| l.line), Some(line), "{text}");
    assert!(text.contains(&format!("fleet.yaml:{line}:")), "{text}");
    assert!(text.contains(&format!(" {key}: ")), "{text}");
    text
}

const ONE: &str = "vms:\n  - name: a\n    kernel: bundled\n";

#[test]
fn durations_parse() {
    let ms = Duration::from_millis;
    for (text, want) in [
        ("0s", Duration::ZERO),
        ("500ms", ms(500)),
        ("30s", ms(30_000)),
        ("2m", ms(120_000)),
        ("1h", ms(3_600_000)),
        ("1m30s", ms(90_000)),
        ("1h2m3s4ms", ms(3_723_004)),
        ("8760h", MAX_DURATION),
    ] {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
        assert_eq!(parse_duration(&format_duration(want)), Ok(want));
    }
    for (text, why) in [
        ("", "empty"),
        ("5", "no unit"),
        ("5x", "not a duration"),
        ("1.5s", "whole numbers"),
        ("30s1m", "largest to smallest"),
        ("1s1s", "largest to smallest"),
        ("s", "not a duration"),
        ("-1s", "not a duration"),
        (" 1s", "not a duration"),
        ("8761h", "too long"),
        ("99999999999999999999h", "too long"),
    ] {
        let e = parse_duration(text).unwrap_err();
        assert!(e.contains(why), "{text}: {e}");
    }
    assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
    assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
    assert_eq!(format_duration(Duration::from_nanos(1_001)), "1us1ns");
}

#[test]
fn happy_path_applies_defaults_merges_overrides_and_resolves_paths() {
    let dir = TempDir::new();
    dir.write("kernels/vmlinux", "ELF");
    dir.write("kernels/initrd.img", "cpio");
    dir.write("token", "0123456789abcdef0123\n");
    let yaml = "\
# a fleet
state_dir: state
api:
  tcp: 127.0.0.1:7070
  token_file: token
metrics:
  listen: localhost:9464
defaults:
  checkpoint_interval: 2s
  max_failures: 5
vms:
  - name: web-1
    kernel: kernels/vmlinux
    initrd: ./kernels/initrd.img
    cmdline: \"console=ttyS0\"
    vcpus: 2
    memory_mib: 256
    limits: { cpu_percent: 50, memory_mib: 512, pids: 64 }
    policy:
      checkpoint_interval: 0s
      standby: true
  - name: db-1
    kernel: bundled
";
    let config = parse_in(&dir, yaml).unwrap();
    let base = std::path::absolute(&dir.0).unwrap();
    assert_eq!(config.path, base.join("fleet.yaml"));
    assert_eq!(config.state_dir, base.join("state"));
    assert_eq!(config.api.socket, base.join("state/api.sock"));
    assert_eq!(config.api.tcp, Some("127.0.0.1:7070".parse().unwrap()));
    let token = config.api.token.as_ref().unwrap();
    assert_eq!(token.secret(), "0123456789abcdef0123");
    assert!(token.matches("0123456789abcdef0123"));
    assert!(!token.matches("0123456789abcdef0124"));
    assert!(!format!("{config:?}").contains("0123456789abcdef0123"));
    assert_eq!(
        config.metrics,
        Some(MetricsConfig {
            listen: "127.0.0.1:9464".parse().unwrap()
        })
    );

    let web = &config.vms[0];
    assert_eq!(web.name, "web-1");
    assert_eq!(web.kernel, KernelSpec::Path(base.join("kernels/vmlinux")));
    assert_eq!(web.initrd, Some(base.join("./kernels/initrd.img")));
    assert_eq!(web.cmdline.as_deref(), Some("console=ttyS0"));
    assert_eq!((web.vcpus, web.memory_mib), (2, 256));
    assert_eq!(
        web.limits,
        Limits {
            cpu_percent: Some(50),
            memory_mib: Some(512),
            pids: Some(64)
        }
    );
    assert_eq!(
        web.policy,
        Policy {
            checkpoint_interval: Duration::ZERO,
            max_failures: 5,
            standby: true,
            ..Policy::default()
        }
    );
    assert_eq!(web.images_dir, base.join("state/web-1/images"));

    let db = &config.vms[1];
    assert_eq!(db.kernel, KernelSpec::Bundled);
    assert_eq!((db.vcpus, db.memory_mib), (1, 128));
    assert_eq!(db.initrd, None);
    assert_eq!(db.limits, Limits::default());
    assert_eq!(
        db.policy,
        Policy {
            checkpoint_interval: Duration::from_secs(2),
            max_failures: 5,
            ..Policy::default()
        }
    );
    assert_eq!(config.vm("db-1"), Some(db));
    assert_eq!(config.vm_dir("db-1"), base.join("state/db-1"));
}

#[test]
fn minimal_file_gets_every_default() {
    let config = ok(ONE);
    let base = config.path.parent().unwrap().to_path_buf();
    assert_eq!(config.state_dir, base.join("relive-state"));
    assert_eq!(config.api.socket, base.join("relive-state/api.sock"));
    assert_eq!((config.api.tcp, config.api.token.is_none()), (None, true));
    assert_eq!(config.metrics, None);
    assert_eq!(config.vms[0].policy, Policy::default());
}

#[test]
fn unknown_keys_are_refused_everywhere() {
    let text = bad(
        "vms:\n  - name: a\n    kernel: bundled\n    vcpu: 1\n",
        ConfigErrorKind::UnknownKey,
        4,
        "vms[0].vcpu",
    );
    assert!(text.contains("fleet.yaml:4:5: vms[0].vcpu:"), "{text}");
    assert!(text.contains("did you mean \"vcpus\"?"), "{text}");
    bad(
        "state_dir: x\nstatedir: y\nvms: []\n",
        ConfigErrorKind::UnknownKey,
        2,
        "statedir",
    );
    bad(
        "defaults:\n  max_failure: 3\nvms: []\n",
        ConfigErrorKind::UnknownKey,
        2,
        "defaults.max_failure",
    );
    bad(
        &format!("{ONE}    limits: {{ pid: 3 }}\n"),
        ConfigErrorKind::UnknownKey,
        4,
        "vms[0].limits.pid",
    );
    let text = bad(
        &format!("{ONE}    policy:\n      colour: blue\n"),
        ConfigErrorKind::UnknownKey,
        5,
        "vms[0].policy.colour",
    );
    assert!(text.contains("remove it or fix its spelling"), "{text}");
    bad(
        "api:\n  port: 1\nvms: []\n",
        ConfigErrorKind::UnknownKey,
        2,
        "api.port",
    );
}

#[test]
fn bad_durations_name_the_key_and_the_form() {
    let text = bad(
        &format!("defaults:\n  heartbeat_timeout: 2x\n{ONE}"),
        ConfigErrorKind::BadDuration,
        2,
        "defaults.heartbeat_timeout",
    );
    assert!(text.contains("fleet.yaml:2:3:"), "{text}");
    assert!(text.contains("\"2x\" is not a duration"), "{text}");
    let text = bad(
        &format!("{ONE}    policy:\n      ready_grace: 10\n"),
        ConfigErrorKind::BadDuration,
        5,
        "vms[0].policy.ready_grace",
    );
    assert!(text.contains("write 10s for seconds"), "{text}");
    bad(
        &format!("{ONE}    policy: {{ failure_window: 1.5m }}\n"),
        ConfigErrorKind::BadDuration,
        4,
        "vms[0].policy.failure_window",
    );
}

#[test]
fn bad_types_say_what_was_expected() {
    let text = bad(
        "vms:\n  - name: a\n    kernel: bundled\n    vcpus: two\n",
        ConfigErrorKind::BadType,
        4,
        "vms[0].vcpus",
    );
    assert!(
        text.contains("expected a whole number from 0 to 255"),
        "{text}"
    );
    assert!(text.contains("fleet.yaml:4:5:"), "{text}");
    let text = bad(
        &format!("defaults:\n  standby: yes\n{ONE}"),
        ConfigErrorKind::BadType,
        2,
        "defaults.standby",
    );
    assert!(text.contains("expected true or false"), "{text}");
    let text = bad("vms:\n  name: a\n", ConfigErrorKind::BadType, 1, "vms");
    assert!(text.contains("expected a list"), "{text}");
    let text = bad(
        "vms:\n  - name: a\n    kernel: bundled\n    vcpus: 300\n",
        ConfigErrorKind::BadValue,
        4,
        "vms[0].vcpus",
    );
    assert!(text.contains("300 is out of range"), "{text}");
    bad(
        &format!("{ONE}    memory_mib: -5\n"),
        ConfigErrorKind::BadType,
        4,
        "vms[0].memory_mib",
    );
    // More than the host has: refused at load, not failed four times at start.
    let text = bad(
        &format!("{ONE}    memory_mib: 8192\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].memory_mib",
    );
    assert!(text.contains("more than this host's 4096 MiB"), "{text}");
    // serde_yaml reads an empty value as an empty string.
    bad(
        "vms:\n  - name:\n    kernel: bundled\n",
        ConfigErrorKind::BadName,
        2,
        "vms[0].name",
    );
}

#[test]
fn missing_required_keys_are_named() {
    let text = bad(
        "vms:\n  - name: a\n    kernel: bundled\n  - name: b\n    vcpus: 1\n",
        ConfigErrorKind::MissingKey,
        4,
        "vms[1].kernel",
    );
    assert!(text.contains("add `kernel: bundled`"), "{text}");
    let dir = TempDir::new();
    let e = parse_in(&dir, "state_dir: x\n").unwrap_err();
    assert_eq!((e.kind(), e.key()), (ConfigErrorKind::NoVms, "vms"));
    assert!(e
        .to_string()
        .ends_with(": vms: no VMs: list at least one VM under `vms:`"));
    bad(
        &format!("metrics: {{}}\n{ONE}"),
        ConfigErrorKind::MissingKey,
        1,
        "metrics.listen",
    );
}

#[test]
fn no_vms_is_an_error() {
    let text = bad("vms: []\n", ConfigErrorKind::NoVms, 1, "vms");
    assert!(text.contains("list at least one VM"), "{text}");
    bad("state_dir: s\nvms:\n", ConfigErrorKind::NoVms, 2, "vms");
    let dir = TempDir::new();
    let e = parse_in(&dir, "# nothing yet\n\n").unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::NoVms);
    assert!(e
        .to_string()
        .contains("fleet.yaml: the fleet file is empty"));
}

#[test]
fn duplicate_names_point_at_the_second() {
    let yaml = "\
state_dir: s
vms:
  - name: demo-1
    kernel: bundled
  - name: demo-2
    kernel: bundled
  - name: demo-1
    kernel: bundled
";
    let text = bad(yaml, ConfigErrorKind::DuplicateName, 7, "vms[2].name");
    assert!(
        text.ends_with(
            "fleet.yaml:7:5: vms[2].name: duplicate VM name \"demo-1\" (first at line 3): \
                 give every VM its own name"
        ),
        "{text}"
    );
}

#[test]
fn duplicate_keys_are_refused() {
    bad(
        "vms:\n  - name: a\n    name: b\n    kernel: bundled\n",
        ConfigErrorKind::DuplicateKey,
        2,
        "vms[0].name",
    );
}

#[test]
fn invalid_names_are_refused() {
    for name in [
        "Web",
        "web_1",
        "-web",
        "web-",
        "\"\"",
        &"a".repeat(49),
        "wéb",
    ] {
        let yaml = format!("vms:\n  - kernel: bundled\n    name: {name}\n");
        let text = bad(&yaml, ConfigErrorKind::BadName, 3, "vms[0].name");
        assert!(text.contains("fleet.yaml:3:5:"), "{text}");
        assert!(text.contains("use 1 to 48 characters"), "{text}");
    }
    ok(&format!(
        "vms:\n  - kernel: bundled\n    name: {}\n",
        "a".repeat(48)
    ));
    ok("vms:\n  - kernel: bundled\n    name: 0\n");
}

#[test]
fn missing_kernel_and_initrd_files_are_named() {
    let dir = TempDir::new();
    let yaml = "vms:\n  - name: a\n    kernel: bundled\n  - name: b\n    kernel: /x/vmlinux\n";
    let e = parse_in(&dir, yaml).unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::MissingFile);
    assert_eq!(
        e.to_string(),
        format!(
            "{}:5:5: vms[1].kernel: /x/vmlinux does not exist: fix the path (relative paths \
                 start at the fleet file's directory)",
            dir.0.join("fleet.yaml").display()
        )
    );
    let text = bad(
        "vms:\n  - name: a\n    kernel: k/vmlinux\n",
        ConfigErrorKind::MissingFile,
        3,
        "vms[0].kernel",
    );
    assert!(text.contains("/k/vmlinux does not exist"), "{text}");
    let text = bad(
        &format!("{ONE}    initrd: ~/initrd.img\n"),
        ConfigErrorKind::MissingFile,
        4,
        "vms[0].initrd",
    );
    assert!(text.contains("does not expand ~"), "{text}");
    bad(
        "vms:\n  - name: a\n    kernel: \"\"\n",
        ConfigErrorKind::MissingFile,
        3,
        "vms[0].kernel",
    );
    let text = bad(
        "vms:\n  - name: a\n    kernel: .\n",
        ConfigErrorKind::MissingFile,
        3,
        "vms[0].kernel",
    );
    assert!(text.contains("is not a file"), "{text}");
}

#[test]
fn impossible_policies_name_the_key_that_set_them() {
    let text = bad(
        &format!("defaults:\n  max_failures: 0\n{ONE}"),
        ConfigErrorKind::BadPolicy,
        2,
        "defaults.max_failures",
    );
    assert!(text.contains("at least 1"), "{text}");
    bad(
        &format!("defaults:\n  keep_images: 0\n{ONE}"),
        ConfigErrorKind::BadPolicy,
        2,
        "defaults.keep_images",
    );
    bad(
        &format!("{ONE}    policy:\n      heartbeat_timeout: 0s\n"),
        ConfigErrorKind::BadPolicy,
        5,
        "vms[0].policy.heartbeat_timeout",
    );
    // The VM's own key is blamed even when the other half is a default.
    let text = bad(
        &format!("defaults:\n  failure_window: 30s\n{ONE}    policy:\n      ready_grace: 40s\n"),
        ConfigErrorKind::BadPolicy,
        7,
        "vms[0].policy.ready_grace",
    );
    assert!(text.contains("failure_window (30s) is shorter than ready_grace (40s)"));
    bad(
        &format!("{ONE}    policy: {{ restart_backoff: 30s }}\n"),
        ConfigErrorKind::BadPolicy,
        4,
        "vms[0].policy.restart_backoff",
    );
    bad(
        &format!("defaults:\n  checkpoint_interval: 50ms\n{ONE}"),
        ConfigErrorKind::BadPolicy,
        2,
        "defaults.checkpoint_interval",
    );
}

#[test]
fn heartbeat_timeout_must_outlast_the_bundled_guests_heartbeat() {
    let text = bad(
        &format!("{ONE}    policy:\n      heartbeat_timeout: 150ms\n"),
        ConfigErrorKind::BadPolicy,
        5,
        "vms[0].policy.heartbeat_timeout",
    );
    assert!(text.contains("at least 200ms"), "{text}");
    bad(
        &format!("{ONE}    cmdline: relive.hb_ms=1500\n"),
        ConfigErrorKind::BadPolicy,
        4,
        "vms[0].cmdline",
    );
    bad(
        &format!("{ONE}    cmdline: relive.hb_ms=fast\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].cmdline",
    );
    ok(&format!(
        "{ONE}    cmdline: relive.hb_ms=50\n    policy: {{ heartbeat_timeout: 100ms }}\n"
    ));
}

#[test]
fn vm_sizes_and_limits_are_checked() {
    bad(
        &format!("{ONE}    vcpus: 0\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].vcpus",
    );
    let text = bad(
        &format!("{ONE}    vcpus: 3\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].vcpus",
    );
    assert!(text.contains("use 1 to 2"), "{text}");
    bad(
        &format!("{ONE}    memory_mib: 8\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].memory_mib",
    );
    bad(
        &format!("{ONE}    limits:\n      cpu_percent: 201\n"),
        ConfigErrorKind::BadValue,
        5,
        "vms[0].limits.cpu_percent",
    );
    bad(
        &format!("{ONE}    limits: {{ memory_mib: 128 }}\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].limits.memory_mib",
    );
    bad(
        &format!("{ONE}    limits:\n      pids: 4\n"),
        ConfigErrorKind::BadValue,
        5,
        "vms[0].limits.pids",
    );
    bad(
        &format!("{ONE}    cmdline: \"a\\nb\"\n"),
        ConfigErrorKind::BadValue,
        4,
        "vms[0].cmdline",
    );
}

#[test]
fn api_listeners_are_loopback_with_a_token() {
    let token = "token: 0123456789abcdef";
    let text = bad(
        &format!("api:\n  tcp: 0.0.0.0:7070\n  {token}\n{ONE}"),
        ConfigErrorKind::BadListener,
        2,
        "api.tcp",
    );
    assert!(text.contains("not a loopback address"), "{text}");
    let text = bad(
        &format!("api:\n  tcp: 127.0.0.1:7070\n{ONE}"),
        ConfigErrorKind::BadListener,
        2,
        "api.tcp",
    );
    assert!(text.contains("needs a bearer token"), "{text}");
    bad(
        &format!("api:\n  tcp: 127.0.0.1\n  {token}\n{ONE}"),
        ConfigErrorKind::BadListener,
        2,
        "api.tcp",
    );
    bad(
        &format!("api:\n  tcp: 127.0.0.1:7070\n  token: short\n{ONE}"),
        ConfigErrorKind::BadListener,
        3,
        "api.token",
    );
    bad(
        &format!("api:\n  {token}\n  token_file: t\n{ONE}"),
        ConfigErrorKind::BadListener,
        3,
        "api.token_file",
    );
    bad(
        &format!("api:\n  tcp: 127.0.0.1:7070\n  token_file: nowhere\n{ONE}"),
        ConfigErrorKind::MissingFile,
        3,
        "api.token_file",
    );
    bad(
        &format!("metrics:\n  listen: 10.0.0.1:9464\n{ONE}"),
        ConfigErrorKind::BadListener,
        2,
        "metrics.listen",
    );
    bad(
        &format!(
            "api:\n  tcp: 127.0.0.1:7070\n  {token}\nmetrics:\n  listen: 127.0.0.1:7070\n{ONE}"
        ),
        ConfigErrorKind::BadListener,
        5,
        "metrics.listen",
    );
    let config = ok(&format!("api:\n  tcp: \"[::1]:0\"\n  {token}\n{ONE}"));
    assert_eq!(config.api.tcp, Some("[::1]:0".parse().unwrap()));
    let long = "d".repeat(100);
    bad(
        &format!("state_dir: {long}\n{ONE}"),
        ConfigErrorKind::BadListener,
        1,
        "state_dir",
    );
}

#[test]
fn syntax_errors_have_a_location() {
    let dir = TempDir::new();
    let e = parse_in(&dir, "vms: [\n").unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::Syntax);
    assert!(e.location().is_some(), "{e}");
    assert!(e.to_string().contains("fix the YAML syntax"), "{e}");
    let e = parse_in(&dir, "- a\n- b\n").unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::Syntax);
    assert!(e.to_string().contains("must be a mapping"), "{e}");
    let e = parse_in(&dir, &format!("{ONE}---\n{ONE}")).unwrap_err();
    assert!(e.to_string().contains("one fleet per file"), "{e}");
    let e = parse_in(&dir, "vms:\n\t- name: a\n").unwrap_err();
    assert_eq!(e.location().map(|l| l.line), Some(2), "{e}");
    assert!(e.to_string().contains("indent with spaces"), "{e}");
    let e = parse_in(&dir, "<<: {}\nvms: []\n").unwrap_err();
    assert!(
        e.to_string().contains("merge keys are not supported"),
        "{e}"
    );
}

#[test]
fn unreadable_file_chains_the_io_error() {
    let e = load(Path::new("/nonexistent/fleet.yaml")).unwrap_err();
    assert_eq!(e.kind(), ConfigErrorKind::Read);
    assert!(e
        .to_string()
        .starts_with("/nonexistent/fleet.yaml: cannot read the fleet file"));
    let source = std::error::Error::source(&e).unwrap();
    assert!(source.downcast_ref::<io::Error>().is_some());
}

fn at(source: &str, path: &str) -> Option<(usize, usize)> {
    locate(source, &parse_key_path(path).unwrap()).map(|l| (l.line, l.column))
}

#[test]
fn locator_finds_keys_in_block_and_flow_style() {
    let source = "\
# name: not this one
state_dir: s   # name: nor this
defaults:
  max_failures: 3
vms:
- name: a
  kernel: bundled
  limits: { cpu_percent: 50, pids: 64 }
-
  name: b # the second
  policy:
    standby: true
  \"kernel\": bundled
- { name: c, kernel: bundled }
";
    assert_eq!(at(source, "state_dir"), Some((2, 1)));
    assert_eq!(at(source, "defaults.max_failures"), Some((4, 3)));
    assert_eq!(at(source, "vms[0]"), Some((6, 3)));
    assert_eq!(at(source, "vms[0].name"), Some((6, 3)));
    assert_eq!(at(source, "vms[0].limits.pids"), Some((8, 30)));
    assert_eq!(at(source, "vms[1].name"), Some((10, 3)));
    assert_eq!(at(source, "vms[1].policy.standby"), Some((12, 5)));
    assert_eq!(at(source, "vms[1].kernel"), Some((13, 3)));
    assert_eq!(at(source, "vms[2].kernel"), Some((14, 14)));
    // Not written: the deepest ancestor.
    assert_eq!(at(source, "vms[1].cmdline"), Some((10, 3)));
    assert_eq!(at(source, "api.tcp"), None);
    assert_eq!(at(source, "vms[9].name"), Some((5, 1)));
}

#[test]
fn locator_keeps_nested_items_apart() {
    let source = "\
vms:
  - name: a   # 'quoted # not a comment' below
    cmdline: \"x # y\"
    policy:
      name: decoy
  - name: b
";
    assert_eq!(at(source, "vms[1].name"), Some((6, 5)));
    assert_eq!(at(source, "vms[0].name"), Some((2, 5)));
    assert_eq!(at(source, "vms[0].policy.name"), Some((5, 7)));
    assert_eq!(
        strip_comment("cmdline: \"x # y\" # z"),
        "cmdline: \"x # y\" "
    );
    assert_eq!(strip_comment("a: it's # c"), "a: it's ");
    assert_eq!(
        parse_key_path("vms[3].limits"),
        Some(vec![
            Seg::Key("vms".into()),
            Seg::Index(3),
            Seg::Key("limits".into()),
        ])
    );
}

fn repo_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)
}

#[test]
fn demo_fleet_loads() {
    let config = load(&repo_file("configs/demo.yaml")).unwrap();
    assert_eq!(config.vms.len(), 3);
    for vm in &config.vms {
        assert_eq!(vm.kernel, KernelSpec::Bundled);
        assert!(vm.policy.standby && vm.policy.warm_boot_image);
        assert_eq!(vm.policy.checkpoint_interval, Duration::from_secs(5));
    }
}

#[test]
fn example_fleet_loads() {
    // The example shows a kernel path of its own; put a file there.
    let dir = TempDir::new();
    let text = fs::read_to_string(repo_file("configs/fleet.example.yaml")).unwrap();
    let path = dir.write("fleet.yaml", &text);
    dir.write("kernels/vmlinux", "ELF");
    dir.write("secrets/api-token", "0123456789abcdef0123456789abcdef\n");
    dir.write(
        "secrets/cluster-token",
        "fedcba9876543210fedcba9876543210\n",
    );
    let config = match parse_with(&text, &path, &HOST) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    assert!(config.vms.len() >= 2);
    assert!(config.api.tcp.is_some() && config.metrics.is_some());
    assert_eq!(config.cluster, None);
    // Its commented cluster section, uncommented, loads too.
    let mut in_section = false;
    let uncommented: String = text
        .lines()
        .map(|l| {
            in_section = l.starts_with("# cluster:") || (in_section && l.starts_with("#   "));
            match l.strip_prefix("# ") {
                Some(rest) if in_section => format!("{rest}\n"),
                _ => format!("{l}\n"),
            }
        })
        .collect();
    let config = match parse_with(&uncommented, &path, &HOST) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    };
    let cluster = config.cluster.expect("the example's cluster section");
    assert_eq!((cluster.host.as_str(), cluster.etcd.len()), ("host-a", 3));
}

#[test]
fn jail_defaults_on_as_root_and_takes_ids_or_false() {
    assert_eq!(
        ok(ONE).jail,
        Jail::As {
            uid: DEFAULT_JAIL_ID,
            gid: DEFAULT_JAIL_ID
        }
    );
    let config = ok(&format!("jail: {{ uid: 1234, gid: 5678 }}\n{ONE}"));
    assert_eq!(
        config.jail,
        Jail::As {
            uid: 1234,
            gid: 5678
        }
    );
    assert_eq!(
        config.vms[0].jail, config.jail,
        "every VM follows the fleet"
    );
    assert_eq!(ok(&format!("jail: false\n{ONE}")).jail, Jail::Off);
    let text = bad(
        &format!("jail: {{ uid: 0, gid: 0 }}\n{ONE}"),
        ConfigErrorKind::BadValue,
        1,
        "jail",
    );
    assert!(text.contains("a jail as root is no jail"), "{text}");
    // A VM's own jail: a uid of its own, or none.
    let config = ok(
        "jail: { uid: 1234, gid: 5678 }\nvms:\n  - name: a\n    kernel: bundled\n    jail: { uid: 2001, gid: 2001 }\n  - name: b\n    kernel: bundled\n    jail: false\n  - name: c\n    kernel: bundled\n",
    );
    let jails: Vec<Jail> = config.vms.iter().map(|v| v.jail).collect();
    assert_eq!(
        jails,
        [
            Jail::As {
                uid: 2001,
                gid: 2001
            },
            Jail::Off,
            Jail::As {
                uid: 1234,
                gid: 5678
            }
        ]
    );
    let text = bad(
        "vms:\n  - name: a\n    kernel: bundled\n    jail: { uid: 0, gid: 9 }\n",
        ConfigErrorKind::BadValue,
        4,
        "vms[0].jail",
    );
    assert!(text.contains("a jail as root is no jail"), "{text}");
    // Not root: off by default, refused when asked for.
    let dir = TempDir::new();
    let user = Host {
        root: false,
        ..HOST
    };
    let path = dir.write("fleet.yaml", ONE);
    assert_eq!(parse_with(ONE, &path, &user).unwrap().jail, Jail::Off);
    let yaml = format!("jail: true\n{ONE}");
    let error = parse_with(&yaml, &path, &user).unwrap_err();
    assert_eq!(error.key(), "jail");
    assert!(
        error
            .to_string()
            .contains("needs the supervisor to run as root"),
        "{error}"
    );
}

#[test]
fn an_image_vm_boots_the_container_kernel_with_its_image_and_the_apps_command_and_env() {
    let dir = TempDir::new();
    dir.write("k/vmlinux", "ELF");
    dir.write("app.cpio", "cpio");
    let config = parse_in(
        &dir,
        r#"container_kernel: k/vmlinux
vms:
  - name: web
    image: app.cpio
    command: ["/bin/sh", "-c", "echo hi"]
    env: { MODE: test, B: "2" }
    restart: always
    cmdline: relive.hb_ms=500
  - name: job
    image: ./app.cpio
"#,
    )
    .unwrap();
    let base = &dir.0;
    let web = config.vm("web").unwrap();
    assert_eq!(web.kernel, KernelSpec::Path(base.join("k/vmlinux")));
    assert_eq!(web.initrd, Some(base.join("app.cpio")));
    let app = web.app.as_ref().unwrap();
    assert_eq!(app.restart, Restart::Always);
    assert_eq!(app.env, ["B=2", "MODE=test"]);
    let cmdline = web.cmdline.as_deref().unwrap();
    assert!(cmdline.starts_with(CONTAINER_CMDLINE), "{cmdline}");
    assert!(cmdline.ends_with(" relive.hb_ms=500"), "{cmdline}");
    // The agent's half of relive.run= (agent/src/main.rs) reads this JSON.
    let hex = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("relive.run="))
        .unwrap();
    let json: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&json).unwrap(),
        serde_json::json!({"command": ["/bin/sh", "-c", "echo hi"], "env": ["B=2", "MODE=test"]})
    );
    // Nothing to pass: no relive.run at all; the default restart.
    let job = config.vm("job").unwrap();
    assert_eq!(job.cmdline.as_deref(), Some(CONTAINER_CMDLINE));
    assert_eq!(job.app.as_ref().unwrap().restart, Restart::OnFailure);
}

#[test]
fn image_vm_mistakes_are_named() {
    let with = |yaml: &str| {
        let dir = TempDir::new();
        dir.write("k", "ELF");
        dir.write("app.cpio", "cpio");
        parse_in(
            &dir,
            &format!("container_kernel: k\nvms:\n  - name: a\n{yaml}"),
        )
        .map(|_| ())
        .unwrap_err()
    };
    for (yaml, key, kind, says) in [
        (
            "    image: app.cpio\n    kernel: bundled\n",
            "vms[0].kernel",
            ConfigErrorKind::BadValue,
            "either a kernel or a container image",
        ),
        (
            "    image: app.cpio\n    initrd: app.cpio\n",
            "vms[0].initrd",
            ConfigErrorKind::BadValue,
            "initrd is its image",
        ),
        (
            "    image: nope.cpio\n",
            "vms[0].image",
            ConfigErrorKind::MissingFile,
            "nope.cpio",
        ),
        (
            "    kernel: bundled\n    command: [x]\n",
            "vms[0].command",
            ConfigErrorKind::BadValue,
            "add `image:`",
        ),
        (
            "    image: app.cpio\n    command: []\n",
            "vms[0].command",
            ConfigErrorKind::BadValue,
            "runs nothing",
        ),
        (
            "    image: app.cpio\n    restart: sometimes\n",
            "vms[0].restart",
            ConfigErrorKind::BadValue,
            "on-failure (the default), always or never",
        ),
        (
            "    image: app.cpio\n    env: { \"A=B\": x }\n",
            "vms[0].env.A=B",
            ConfigErrorKind::BadValue,
            "not an environment variable name",
        ),
        (
            "    image: app.cpio\n    cmdline: relive.hb_ms=1500\n",
            "vms[0].cmdline",
            ConfigErrorKind::BadPolicy,
            "less than twice the guest's heartbeat interval",
        ),
        (
            "    vcpus: 1\n",
            "vms[0].kernel",
            ConfigErrorKind::MissingKey,
            "or `image:` with a container image",
        ),
    ] {
        let e = with(yaml);
        let text = e.to_string();
        assert_eq!((e.kind(), e.key()), (kind, key), "{yaml}: {text}");
        assert!(text.contains(says), "{yaml}: {text}");
    }
    // A command line too long for the kernel once command and env are on it.
    let long = format!(
        "    image: app.cpio\n    env: {{ A: \"{}\" }}\n",
        "x".repeat(1100)
    );
    let text = with(&long).to_string();
    assert!(
        text.contains("vms[0].image") && text.contains("at most 2047"),
        "{text}"
    );
}

#[test]
fn an_image_vm_without_a_container_kernel_says_how_to_get_one() {
    if Path::new(DEFAULT_CONTAINER_KERNEL).exists() {
        eprintln!("skipping: {DEFAULT_CONTAINER_KERNEL} exists on this host");
        return;
    }
    let dir = TempDir::new();
    dir.write("app.cpio", "cpio");
    let e = parse_in(&dir, "vms:\n  - name: a\n    image: app.cpio\n").unwrap_err();
    let text = e.to_string();
    assert_eq!(
        (e.kind(), e.key()),
        (ConfigErrorKind::MissingFile, "vms[0].image")
    );
    assert!(
        text.contains("scripts/setup.sh") && text.contains("container_kernel"),
        "{text}"
    );
}

#[test]
fn a_cluster_section_gets_its_defaults_and_none_means_a_single_host() {
    assert_eq!(ok(ONE).cluster, None);
    let config = ok(&format!(
        "cluster:\n  etcd: [http://10.0.0.1:2379, 10.0.0.2:2379]\n  host: host-a\n  advertise: 10.0.0.1:7070\n  token: cluster-token-0123456789\n{ONE}"
    ));
    let cluster = config.cluster.expect("a cluster section");
    assert_eq!(cluster.etcd, ["http://10.0.0.1:2379", "10.0.0.2:2379"]);
    assert_eq!(cluster.host, "host-a");
    assert_eq!(cluster.advertise, Some("10.0.0.1:7070".parse().unwrap()));
    assert_eq!(cluster.prefix, "/relive");
    assert_eq!(cluster.lease_ttl, DEFAULT_LEASE_TTL);
    assert_eq!(cluster.keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL);
    assert_eq!(cluster.request_timeout, DEFAULT_REQUEST_TIMEOUT);
    assert_eq!(cluster.fence_margin, DEFAULT_FENCE_MARGIN);
    assert_eq!(cluster.failover_grace, DEFAULT_FAILOVER_GRACE);
    assert_eq!(
        cluster.token.as_ref().map(Token::secret),
        Some("cluster-token-0123456789")
    );
    assert_eq!(cluster.replicas, 1);
    // The defaults keep Patroni's rule.
    assert!(
        DEFAULT_KEEPALIVE_INTERVAL + 2 * DEFAULT_REQUEST_TIMEOUT
            <= DEFAULT_LEASE_TTL - DEFAULT_FENCE_MARGIN
    );
}

#[test]
fn bad_cluster_sections_name_the_key_and_the_fix() {
    use ConfigErrorKind::*;
    let text = bad(
        &format!("cluster:\n  etcd: []\n  host: a\n{ONE}"),
        BadValue,
        2,
        "cluster.etcd",
    );
    assert!(text.contains("no etcd endpoints"), "{text}");
    let text = bad(
        &format!("cluster:\n  etcd: [http://10.0.0.1]\n  host: a\n{ONE}"),
        BadValue,
        2,
        "cluster.etcd[0]",
    );
    assert!(text.contains("http://10.0.0.1:2379"), "{text}");
    bad(
        &format!("cluster:\n  etcd: [e:2379]\n  host: Host_A\n{ONE}"),
        BadName,
        3,
        "cluster.host",
    );
    let text = bad(
        &format!("cluster:\n  etcd: [e:2379]\n  host: a\n  prefix: relive/\n{ONE}"),
        BadValue,
        4,
        "cluster.prefix",
    );
    assert!(text.contains("/relive/prod"), "{text}");
    let text = bad(
        &format!("cluster:\n  etcd: [e:2379]\n  host: a\n  lease_ttl: 1500ms\n{ONE}"),
        BadValue,
        4,
        "cluster.lease_ttl",
    );
    assert!(text.contains("whole seconds"), "{text}");
    let text = bad(
        &format!(
            "cluster:\n  etcd: [e:2379]\n  host: a\n  lease_ttl: 5s\n  keepalive_interval: 2s\n{ONE}"
        ),
        BadValue,
        4,
        "cluster.lease_ttl",
    );
    assert!(
        text.contains("must be at most lease_ttl 5s − fence_margin 2s"),
        "{text}"
    );
    let text = bad(
        &format!("cluster:\n  etcd: [e:2379]\n  host: a\n  advertise: 10.0.0.1:7070\n{ONE}"),
        BadValue,
        4,
        "cluster.advertise",
    );
    assert!(text.contains("bearer token shared by every host"), "{text}");
    bad(
        &format!("cluster:\n  etcd: [e:2379]\n  host: a\n  token: short\n{ONE}"),
        BadValue,
        4,
        "cluster.token",
    );
    bad(
        &format!("cluster:\n  etcd: [e:2379]\n{ONE}"),
        MissingKey,
        2,
        "cluster.host",
    );
}

#[test]
fn cluster_demo_files_load_as_three_hosts_of_one_fleet() {
    let hosts: Vec<FleetConfig> = ["a", "b", "c"]
        .iter()
        .map(|h| load(&repo_file(&format!("configs/cluster-demo/host-{h}.yaml"))).unwrap())
        .collect();
    let cluster = |c: &FleetConfig| c.cluster.clone().expect("a cluster section");
    let names: Vec<String> = hosts.iter().map(|c| cluster(c).host).collect();
    assert_eq!(names, ["host-a", "host-b", "host-c"]);
    let mut ports: Vec<_> = hosts.iter().map(|c| cluster(c).advertise).collect();
    ports.dedup();
    assert_eq!(ports.len(), 3, "each host listens on its own port");
    for c in &hosts {
        assert_eq!(cluster(c).etcd, cluster(&hosts[0]).etcd);
        assert_eq!(cluster(c).prefix, cluster(&hosts[0]).prefix);
        let vms: Vec<&str> = c.vms.iter().map(|vm| vm.name.as_str()).collect();
        assert_eq!(vms, ["web-1", "web-2", "web-3"]);
        assert_eq!(
            c.shared, hosts[0].shared,
            "the hosts share one fleet (etcd refuses a host whose fleet differs)"
        );
    }
    assert_ne!(hosts[0].state_dir, hosts[1].state_dir);
}

/// A fleet's shared part is what every host of a cluster must run alike:
/// `vms`, `defaults` and `container_kernel`, canonical (key order,
/// formatting and comments do not count), and nothing host-local.
#[test]
fn the_shared_part_of_a_fleet_is_its_vms_and_defaults_canonical() {
    let one = ok(&format!(
        "state_dir: /tmp/a\ndefaults:\n  heartbeat_timeout: 2s\n  ready_grace: 1s\n{ONE}"
    ));
    let same = ok(&format!(
        "# another host\nstate_dir: /tmp/b\ndefaults: {{ ready_grace: 1s, heartbeat_timeout: 2s }}\n{ONE}"
    ));
    assert_eq!(one.shared, same.shared);
    assert!(one.shared.contains("\"vms\""), "{}", one.shared);
    assert!(
        !one.shared.contains("/tmp/a"),
        "no host-local key: {}",
        one.shared
    );
    let other = ok(&format!(
        "state_dir: /tmp/a\ndefaults:\n  heartbeat_timeout: 3s\n  ready_grace: 1s\n{ONE}"
    ));
    assert_ne!(one.shared, other.shared);
}
