//! Checks beyond what serde sees.

use super::*;

/// One step of a key path: `vms`, `[1]`, `name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

/// A key path like `vms[1].policy.max_failures`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct KeyPath(pub(super) Vec<Seg>);

impl KeyPath {
    fn key(&self, key: &str) -> KeyPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        KeyPath(segs)
    }

    fn index(&self, index: usize) -> KeyPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        KeyPath(segs)
    }
}

pub(super) fn root(key: &str) -> KeyPath {
    KeyPath::default().key(key)
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Parses a path as serde_yaml writes it (`vms[0].limits`).
pub(super) fn parse_key_path(text: &str) -> Option<Vec<Seg>> {
    let mut segs = Vec::new();
    for part in text.split('.') {
        let (name, indexes) = part.split_once('[').map_or((part, ""), |(n, i)| (n, i));
        if !name.is_empty() {
            segs.push(Seg::Key(name.to_string()));
        }
        if !indexes.is_empty() {
            for index in indexes.trim_end_matches(']').split("][") {
                segs.push(Seg::Index(index.parse().ok()?));
            }
        }
    }
    (!segs.is_empty()).then_some(segs)
}

pub(super) struct Checker<'a> {
    pub(super) file: PathBuf,
    pub(super) source: &'a str,
    pub(super) base: PathBuf,
    pub(super) host: Host,
}

impl Checker<'_> {
    fn fail(&self, kind: ConfigErrorKind, key: &KeyPath, message: String) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            location: locate(self.source, &key.0),
            key: key.to_string(),
            kind,
            message,
            source: None,
        }
    }

    /// `path` relative to the fleet file's directory, without `.` components
    /// (so paths read cleanly in logs and events; `..` is kept, since
    /// collapsing it lexically is wrong across symlinks).
    fn resolve(&self, path: &str) -> PathBuf {
        self.base.join(path).components().collect()
    }

    pub(super) fn check(
        &self,
        raw: RawFleet,
        absolute: PathBuf,
    ) -> Result<FleetConfig, ConfigError> {
        use ConfigErrorKind::*;
        let state_dir = match raw.state_dir.as_deref() {
            Some("") => {
                let m = "state_dir is empty: give a directory, like ./relive-state".into();
                return Err(self.fail(BadValue, &root("state_dir"), m));
            }
            Some(dir) => self.resolve(dir),
            None => self.base.join("relive-state"),
        };
        if state_dir.exists() && !state_dir.is_dir() {
            let m = format!(
                "{} exists and is not a directory: choose another state_dir",
                state_dir.display()
            );
            return Err(self.fail(BadValue, &root("state_dir"), m));
        }
        let api = self.check_api(raw.api, &state_dir, raw.state_dir.is_some())?;
        let metrics = match raw.metrics {
            None => None,
            Some(m) => {
                let key = root("metrics").key("listen");
                let listen = self.loopback(&key, &m.listen)?;
                if api.tcp == Some(listen) && listen.port() != 0 {
                    let m = format!(
                        "{listen} is also api.tcp: the metrics listener needs a port of its own \
                         (or leave metrics out: /metrics is served on the API listeners too)"
                    );
                    return Err(self.fail(BadListener, &key, m));
                }
                Some(MetricsConfig { listen })
            }
        };
        let jail = self.check_jail(&root("jail"), raw.jail.as_ref(), None)?;
        let cluster = match raw.cluster {
            None => None,
            Some(c) => Some(self.check_cluster(c)?),
        };
        let defaults_raw = raw.defaults.unwrap_or_default();
        let defaults = defaults_raw.over(&Policy::default());
        if let Err(problem) = defaults.check() {
            let key = problem
                .keys
                .iter()
                .find(|k| defaults_raw.sets(k))
                .map_or_else(|| root("defaults"), |k| root("defaults").key(k));
            return Err(self.fail(BadPolicy, &key, problem.message));
        }
        let raw_vms = raw.vms.unwrap_or_default();
        if raw_vms.is_empty() {
            let m = "no VMs: list at least one VM under `vms:`".into();
            return Err(self.fail(NoVms, &root("vms"), m));
        }
        let mut first_index: HashMap<&str, usize> = HashMap::new();
        let mut vms = Vec::with_capacity(raw_vms.len());
        for (i, vm) in raw_vms.iter().enumerate() {
            let at = root("vms").index(i);
            check_name(&vm.name).map_err(|m| self.fail(BadName, &at.key("name"), m))?;
            if let Some(&first) = first_index.get(vm.name.as_str()) {
                let first_key = root("vms").index(first).key("name");
                let first_at = locate(self.source, &first_key.0)
                    .map_or_else(|| format!("{first_key}"), |l| format!("line {}", l.line));
                let m = format!(
                    "duplicate VM name \"{}\" (first at {first_at}): give every VM its own name",
                    vm.name
                );
                return Err(self.fail(DuplicateName, &at.key("name"), m));
            }
            first_index.insert(&vm.name, i);
            let mut spec = self.check_vm(
                &at,
                vm,
                &defaults_raw,
                &defaults,
                &state_dir,
                raw.container_kernel.as_deref(),
            )?;
            spec.jail = self.check_jail(&at.key("jail"), vm.jail.as_ref(), Some(jail))?;
            vms.push(spec);
        }
        Ok(FleetConfig {
            path: absolute,
            state_dir,
            api,
            metrics,
            jail,
            cluster,
            vms,
            shared: String::new(),
        })
    }

    fn check_cluster(&self, raw: RawCluster) -> Result<ClusterConfig, ConfigError> {
        use ConfigErrorKind::*;
        let at = root("cluster");
        if raw.etcd.is_empty() {
            let m = "no etcd endpoints: list etcd's client URLs, like \
                     [http://10.0.0.1:2379, http://10.0.0.2:2379, http://10.0.0.3:2379]"
                .into();
            return Err(self.fail(BadValue, &at.key("etcd"), m));
        }
        for (i, endpoint) in raw.etcd.iter().enumerate() {
            let bare = endpoint
                .strip_prefix("http://")
                .or_else(|| endpoint.strip_prefix("https://"))
                .unwrap_or(endpoint);
            let port = bare
                .rsplit_once(':')
                .map(|(host, port)| (host, port.parse::<u16>()));
            if !matches!(port, Some((host, Ok(p))) if !host.is_empty() && p != 0) {
                let m = format!(
                    "\"{endpoint}\" is not an etcd client URL: write it like \
                     http://10.0.0.1:2379"
                );
                return Err(self.fail(BadValue, &at.key("etcd").index(i), m));
            }
        }
        check_name(&raw.host).map_err(|m| self.fail(BadName, &at.key("host"), m))?;
        let advertise = match raw.advertise.as_deref() {
            None => None,
            Some(text) => Some(text.parse::<SocketAddr>().map_err(|_| {
                let m =
                    format!("\"{text}\" is not an address and port: write it like 10.0.0.1:7070");
                self.fail(BadValue, &at.key("advertise"), m)
            })?),
        };
        let token = self.token(&at, raw.token, raw.token_file, BadValue)?;
        if advertise.is_some() && token.is_none() {
            let m = "a cluster listener needs a bearer token shared by every host: add \
                     `token:` (at least 16 characters, e.g. from `openssl rand -hex 32`) or \
                     `token_file:`"
                .into();
            return Err(self.fail(BadValue, &at.key("advertise"), m));
        }
        let prefix = raw.prefix.unwrap_or_else(|| "/relive".into());
        if !prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.chars().any(|c| c.is_control() || c == ' ')
        {
            let m = format!(
                "\"{prefix}\" is not a key prefix: start it with / and end it without one, \
                 like /relive or /relive/prod"
            );
            return Err(self.fail(BadValue, &at.key("prefix"), m));
        }
        let d = |v: Option<DurationValue>, default: Duration| v.map_or(default, |v| v.0);
        let config = ClusterConfig {
            etcd: raw.etcd,
            host: raw.host,
            advertise,
            prefix,
            lease_ttl: d(raw.lease_ttl, DEFAULT_LEASE_TTL),
            keepalive_interval: d(raw.keepalive_interval, DEFAULT_KEEPALIVE_INTERVAL),
            request_timeout: d(raw.request_timeout, DEFAULT_REQUEST_TIMEOUT),
            fence_margin: d(raw.fence_margin, DEFAULT_FENCE_MARGIN),
            failover_grace: d(raw.failover_grace, DEFAULT_FAILOVER_GRACE),
            token: token.map(|(t, _)| Token(t)),
            replicas: raw.replicas.unwrap_or(1),
        };
        let ttl = config.lease_ttl;
        if ttl < Duration::from_secs(2) || ttl.subsec_nanos() != 0 {
            let m = format!(
                "{}: etcd grants leases in whole seconds, at least 2s: use e.g. 10s",
                format_duration(ttl)
            );
            return Err(self.fail(BadValue, &at.key("lease_ttl"), m));
        }
        for (key, value) in [
            ("keepalive_interval", config.keepalive_interval),
            ("request_timeout", config.request_timeout),
            ("fence_margin", config.fence_margin),
        ] {
            if value.is_zero() {
                let m = "must be more than 0s".into();
                return Err(self.fail(BadValue, &at.key(key), m));
            }
        }
        let budget = ttl.saturating_sub(config.fence_margin);
        let needed = config.keepalive_interval + 2 * config.request_timeout;
        if config.fence_margin >= ttl || needed > budget {
            let m = format!(
                "keepalive_interval {} + 2 × request_timeout {} must be at most lease_ttl {} − \
                 fence_margin {} (a host must get to retry a renewal before it fences itself): \
                 lengthen lease_ttl or shorten the others",
                format_duration(config.keepalive_interval),
                format_duration(config.request_timeout),
                format_duration(ttl),
                format_duration(config.fence_margin),
            );
            return Err(self.fail(BadValue, &at.key("lease_ttl"), m));
        }
        Ok(config)
    }

    /// The jail at `key` (the fleet's, or a VM's own); a VM without one
    /// takes `inherited`, the fleet's.
    fn check_jail(
        &self,
        key: &KeyPath,
        raw: Option<&RawJail>,
        inherited: Option<Jail>,
    ) -> Result<Jail, ConfigError> {
        use ConfigErrorKind::*;
        let root_user = self.host.root;
        let ids = match (raw, inherited) {
            (None, Some(jail)) => return Ok(jail),
            (None, None) if root_user => (DEFAULT_JAIL_ID, DEFAULT_JAIL_ID),
            (None, None) | (Some(RawJail::Enabled(false)), _) => return Ok(Jail::Off),
            (Some(RawJail::Enabled(true)), _) => (DEFAULT_JAIL_ID, DEFAULT_JAIL_ID),
            (Some(RawJail::Ids(ids)), _) => (ids.uid, ids.gid),
        };
        if ids.0 == 0 || ids.1 == 0 {
            let m = format!(
                "uid {} gid {}: a jail as root is no jail: give a dedicated non-root uid and gid",
                ids.0, ids.1
            );
            return Err(self.fail(BadValue, key, m));
        }
        if !root_user {
            let m = "jailing VMMs needs the supervisor to run as root (namespaces, mounts,                      changing uid): run relive up as root, or set `jail: false`"
                .into();
            return Err(self.fail(BadValue, key, m));
        }
        Ok(Jail::As {
            uid: ids.0,
            gid: ids.1,
        })
    }

    fn check_api(
        &self,
        raw: Option<RawApi>,
        state_dir: &Path,
        state_dir_set: bool,
    ) -> Result<ApiConfig, ConfigError> {
        use ConfigErrorKind::*;
        let api = root("api");
        let raw = raw.unwrap_or(RawApi {
            socket: None,
            tcp: None,
            token: None,
            token_file: None,
        });
        let (socket, socket_key) = match raw.socket.as_deref() {
            Some("") => {
                let m = "the socket path is empty: give a path, or leave the key out for \
                         <state_dir>/api.sock"
                    .into();
                return Err(self.fail(BadValue, &api.key("socket"), m));
            }
            Some(s) => (self.resolve(s), api.key("socket")),
            None if state_dir_set => (state_dir.join("api.sock"), root("state_dir")),
            None => (state_dir.join("api.sock"), api.clone()),
        };
        let len = socket.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            let m = format!(
                "the API socket {} is {len} bytes long, but Unix socket paths must be at most \
                 {MAX_SOCKET_PATH}: choose a shorter state_dir or set api.socket",
                socket.display()
            );
            return Err(self.fail(BadListener, &socket_key, m));
        }
        let tcp = match raw.tcp.as_deref() {
            None => None,
            Some(t) => Some(self.loopback(&api.key("tcp"), t)?),
        };
        let token = self.token(&api, raw.token, raw.token_file, BadListener)?;
        if tcp.is_some() && token.is_none() {
            let m = "a TCP listener needs a bearer token: add `token:` (at least 16 characters, \
                     e.g. from `openssl rand -hex 32`) or `token_file:`"
                .into();
            return Err(self.fail(BadListener, &api.key("tcp"), m));
        }
        Ok(ApiConfig {
            socket,
            tcp,
            token: token.map(|(t, _)| Token(t)),
        })
    }

    /// The bearer token of the section at `at`: `token`, or the first line
    /// of `token_file` (not both), checked; a bad one is an error of `kind`.
    fn token(
        &self,
        at: &KeyPath,
        token: Option<String>,
        token_file: Option<String>,
        kind: ConfigErrorKind,
    ) -> Result<Option<(String, KeyPath)>, ConfigError> {
        use ConfigErrorKind::MissingFile;
        let token = match (token, token_file) {
            (Some(_), Some(_)) => {
                let m = "token and token_file are both set: keep one".into();
                return Err(self.fail(kind, &at.key("token_file"), m));
            }
            (Some(t), None) => Some((t, at.key("token"))),
            (None, Some(f)) => {
                let key = at.key("token_file");
                let path = self.resolve(&f);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    let mut err = self.fail(MissingFile, &key, missing_file_message(&path, &e));
                    if e.kind() != io::ErrorKind::NotFound {
                        err.source = Some(e);
                    }
                    err
                })?;
                Some((text.trim_end_matches(['\n', '\r']).to_string(), key))
            }
            (None, None) => None,
        };
        if let Some((token, key)) = &token {
            check_token(token).map_err(|m| self.fail(kind, key, m))?;
        }
        Ok(token)
    }

    /// Parses a loopback `ADDRESS:PORT` (`localhost:PORT` means 127.0.0.1).
    fn loopback(&self, key: &KeyPath, text: &str) -> Result<SocketAddr, ConfigError> {
        use ConfigErrorKind::BadListener;
        let addr = match text.strip_prefix("localhost:") {
            Some(port) => port
                .parse::<u16>()
                .ok()
                .map(|p| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p)),
            None => text.parse::<SocketAddr>().ok(),
        };
        let Some(addr) = addr else {
            let m = format!(
                "\"{text}\" is not an address and port: write it like 127.0.0.1:7070 or \
                 [::1]:7070"
            );
            return Err(self.fail(BadListener, key, m));
        };
        if !addr.ip().is_loopback() {
            let m = format!(
                "{addr} is not a loopback address: relive listens on loopback only (127.0.0.1 \
                 or ::1); reach it from other hosts through an SSH tunnel or a reverse proxy"
            );
            return Err(self.fail(BadListener, key, m));
        }
        Ok(addr)
    }

    fn check_vm(
        &self,
        at: &KeyPath,
        vm: &RawVm,
        defaults_raw: &RawPolicy,
        defaults: &Policy,
        state_dir: &Path,
        container_kernel: Option<&str>,
    ) -> Result<VmSpec, ConfigError> {
        use ConfigErrorKind::*;
        let app = self.check_app(at, vm)?;
        let kernel = match (vm.kernel.as_deref(), &app) {
            (Some(_), Some(_)) => {
                let m = "a VM runs either a kernel or a container image: remove `kernel` (an \
                         image VM boots the fleet's container_kernel) or `image`"
                    .into();
                return Err(self.fail(BadValue, &at.key("kernel"), m));
            }
            (Some("bundled"), None) => KernelSpec::Bundled,
            (Some(path), None) => {
                KernelSpec::Path(self.existing_file(&at.key("kernel"), path, "kernel")?)
            }
            (None, Some(_)) => self.container_kernel(at, container_kernel)?,
            (None, None) => {
                let m = "missing required key \"kernel\": add `kernel: bundled` for relive's own \
                         guest, the path of an ELF vmlinux or bzImage, or `image:` with a \
                         container image built by `relive image build`"
                    .into();
                return Err(self.fail(MissingKey, &at.key("kernel"), m));
            }
        };
        let initrd = match (vm.initrd.as_deref(), &app) {
            (Some(_), Some(_)) => {
                let m = "an image VM's initrd is its image: remove `initrd`".into();
                return Err(self.fail(BadValue, &at.key("initrd"), m));
            }
            (None, Some(app)) => Some(app.image.clone()),
            (None, None) => None,
            (Some(path), None) => Some(self.existing_file(&at.key("initrd"), path, "initrd")?),
        };
        let cmdline = match &app {
            Some(app) => Some(container_cmdline(app, vm.cmdline.as_deref())),
            None => vm.cmdline.clone(),
        };
        if let Some(cmdline) = &cmdline {
            let key = at.key("cmdline");
            if cmdline.len() > MAX_CMDLINE_LEN {
                let m = if app.is_some() {
                    format!(
                        "the kernel command line, with the app's command and env (hex-encoded \
                         on it for the agent), is {} bytes long, at most {MAX_CMDLINE_LEN} fit: \
                         shorten `cmdline`, `command` or `env`, or build them into the image \
                         (relive image build --entrypoint/--cmd/--env)",
                        cmdline.len()
                    )
                } else {
                    format!(
                        "the command line is {} bytes long, at most {MAX_CMDLINE_LEN} fit: \
                         shorten it",
                        cmdline.len()
                    )
                };
                let key = if vm.cmdline.is_some() {
                    key
                } else {
                    at.key("image")
                };
                return Err(self.fail(BadValue, &key, m));
            }
            if cmdline.chars().any(char::is_control) {
                let m = "the command line contains control characters (a newline?): write it on \
                         one line, in quotes"
                    .into();
                return Err(self.fail(BadValue, &key, m));
            }
        }
        let vcpus = vm.vcpus.unwrap_or(1);
        if vcpus == 0 || usize::from(vcpus) > self.host.cores {
            let m = format!(
                "{vcpus} vCPUs: use 1 to {} (the cores of this host)",
                self.host.cores
            );
            return Err(self.fail(BadValue, &at.key("vcpus"), m));
        }
        let memory_mib = vm.memory_mib.unwrap_or(128);
        if memory_mib < MIN_MEMORY_MIB {
            let m = format!("{memory_mib} MiB is too little: give a VM at least {MIN_MEMORY_MIB}");
            return Err(self.fail(BadValue, &at.key("memory_mib"), m));
        }
        if memory_mib > self.host.memory_mib {
            let m = format!(
                "{memory_mib} MiB is more than this host's {} MiB of RAM: give the VM less",
                self.host.memory_mib
            );
            return Err(self.fail(BadValue, &at.key("memory_mib"), m));
        }
        let limits = match &vm.limits {
            None => Limits::default(),
            Some(l) => self.check_limits(&at.key("limits"), l, vcpus, memory_mib)?,
        };
        let own = vm.policy.as_ref();
        let policy = own.map_or_else(|| defaults.clone(), |p| p.over(defaults));
        // Blame the VM's own key if it sets one, else the defaults'.
        let blame = |keys: &[&str]| -> KeyPath {
            if let Some(k) = keys.iter().find(|k| own.is_some_and(|p| p.sets(k))) {
                at.key("policy").key(k)
            } else if let Some(k) = keys.iter().find(|k| defaults_raw.sets(k)) {
                root("defaults").key(k)
            } else {
                at.key("policy")
            }
        };
        if let Err(problem) = policy.check() {
            return Err(self.fail(BadPolicy, &blame(problem.keys), problem.message));
        }
        if kernel == KernelSpec::Bundled || app.is_some() {
            let hb_ms = bundled_heartbeat_ms(vm.cmdline.as_deref().unwrap_or(""))
                .map_err(|m| self.fail(BadValue, &at.key("cmdline"), m))?;
            let default_hb_ms = if app.is_some() {
                AGENT_DEFAULT_HB_MS
            } else {
                relive_images::guest::DEFAULT_HB_MS
            };
            let interval = Duration::from_millis(hb_ms.unwrap_or(default_hb_ms));
            if policy.heartbeat_timeout < interval.saturating_mul(2) {
                let key = if own.is_some_and(|p| p.sets("heartbeat_timeout")) || hb_ms.is_none() {
                    blame(&["heartbeat_timeout"])
                } else {
                    at.key("cmdline")
                };
                let m = format!(
                    "heartbeat_timeout ({}) is less than twice the guest's heartbeat interval \
                     (relive.hb_ms={}), so one late heartbeat would read as a hang: raise \
                     heartbeat_timeout to at least {} or lower relive.hb_ms",
                    format_duration(policy.heartbeat_timeout),
                    interval.as_millis(),
                    format_duration(interval.saturating_mul(2))
                );
                return Err(self.fail(BadPolicy, &key, m));
            }
        }
        Ok(VmSpec {
            name: vm.name.clone(),
            kernel,
            initrd,
            cmdline,
            vcpus,
            memory_mib,
            limits,
            policy,
            images_dir: state_dir.join(&vm.name).join("images"),
            jail: Jail::Off,
            app,
        })
    }

    /// A container VM's `image`, `command`, `env` and `restart`; `None` for
    /// a kernel VM (which may set none of them but `image`'s absence).
    fn check_app(&self, at: &KeyPath, vm: &RawVm) -> Result<Option<AppSpec>, ConfigError> {
        use ConfigErrorKind::*;
        let Some(image) = vm.image.as_deref() else {
            for (key, set) in [
                ("command", vm.command.is_some()),
                ("env", vm.env.is_some()),
                ("restart", vm.restart.is_some()),
            ] {
                if set {
                    let m = format!(
                        "`{key}` is for container VMs: add `image:` (built by `relive image \
                         build`), or remove `{key}`"
                    );
                    return Err(self.fail(BadValue, &at.key(key), m));
                }
            }
            return Ok(None);
        };
        let image = self.existing_file(&at.key("image"), image, "image")?;
        let command = match &vm.command {
            Some(c) if c.is_empty() || c[0].is_empty() => {
                let m = "an empty command runs nothing: give the program and its arguments, \
                         like [\"/bin/sh\", \"-c\", \"echo hi\"], or remove `command` to run \
                         the image's"
                    .into();
                return Err(self.fail(BadValue, &at.key("command"), m));
            }
            other => other.clone(),
        };
        let mut env = Vec::new();
        for (name, value) in vm.env.iter().flatten() {
            if name.is_empty() || name.contains('=') || name.chars().any(char::is_control) {
                let m = format!(
                    "{name:?} is not an environment variable name: use letters, digits and \
                     `_`, without `=`"
                );
                return Err(self.fail(BadValue, &at.key("env").key(name), m));
            }
            env.push(format!("{name}={value}"));
        }
        let restart = match vm.restart.as_deref() {
            None | Some("on-failure") => Restart::OnFailure,
            Some("always") => Restart::Always,
            Some("never") => Restart::Never,
            Some(other) => {
                let m = format!(
                    "{other:?} is not a restart policy: use on-failure (the default), always \
                     or never"
                );
                return Err(self.fail(BadValue, &at.key("restart"), m));
            }
        };
        Ok(Some(AppSpec {
            image,
            command,
            env,
            restart,
        }))
    }

    /// The fleet's `container_kernel`, which must exist once a VM needs it.
    fn container_kernel(
        &self,
        at: &KeyPath,
        configured: Option<&str>,
    ) -> Result<KernelSpec, ConfigError> {
        use ConfigErrorKind::MissingFile;
        let Some(path) = configured else {
            let default = Path::new(DEFAULT_CONTAINER_KERNEL);
            if default.is_file() {
                return Ok(KernelSpec::Path(default.to_path_buf()));
            }
            let m = format!(
                "this image VM needs a Linux kernel, and {DEFAULT_CONTAINER_KERNEL} (the default \
                 container_kernel) is missing: run scripts/setup.sh as root (it installs \
                 Debian's cloud kernel there), or set `container_kernel:` to an ELF vmlinux or \
                 bzImage"
            );
            return Err(self.fail(MissingFile, &at.key("image"), m));
        };
        Ok(KernelSpec::Path(self.existing_file(
            &root("container_kernel"),
            path,
            "container kernel",
        )?))
    }

    fn check_limits(
        &self,
        at: &KeyPath,
        raw: &RawLimits,
        vcpus: u8,
        memory_mib: u64,
    ) -> Result<Limits, ConfigError> {
        use ConfigErrorKind::BadValue;
        let most_cpu = 100 * u32::try_from(self.host.cores).unwrap_or(u32::MAX / 100);
        if let Some(cpu) = raw.cpu_percent {
            if cpu == 0 || cpu > most_cpu {
                let m = format!(
                    "{cpu}% is not a CPU quota here: it is a percentage of one core, 1 to \
                     {most_cpu} on this host of {} cores",
                    self.host.cores
                );
                return Err(self.fail(BadValue, &at.key("cpu_percent"), m));
            }
        }
        if let Some(limit) = raw.memory_mib {
            if limit <= memory_mib {
                let m = format!(
                    "a limit of {limit} MiB does not hold the guest's {memory_mib} MiB and the \
                     VMM itself: use at least {}",
                    memory_mib + 64
                );
                return Err(self.fail(BadValue, &at.key("memory_mib"), m));
            }
        }
        if let Some(pids) = raw.pids {
            let least = u64::from(vcpus) + VMM_OWN_TASKS;
            if pids < least {
                let m = format!(
                    "{pids} tasks are too few: the VMM runs one thread per vCPU plus up to \
                     {VMM_OWN_TASKS} of its own; use at least {least}"
                );
                return Err(self.fail(BadValue, &at.key("pids"), m));
            }
        }
        Ok(Limits {
            cpu_percent: raw.cpu_percent,
            memory_mib: raw.memory_mib,
            pids: raw.pids,
        })
    }

    /// Resolves `path` and checks that it is an existing regular file.
    fn existing_file(&self, key: &KeyPath, path: &str, what: &str) -> Result<PathBuf, ConfigError> {
        use ConfigErrorKind::MissingFile;
        if path.is_empty() {
            let m = match what {
                "kernel" => "no kernel given: write `bundled` for relive's own guest, or the \
                             path of an ELF vmlinux or bzImage"
                    .to_string(),
                _ => format!("no {what} path given: give one, or leave the key out"),
            };
            return Err(self.fail(MissingFile, key, m));
        }
        let resolved = self.resolve(path);
        match std::fs::metadata(&resolved) {
            Ok(meta) if meta.is_file() => Ok(resolved),
            Ok(_) => {
                let m = format!("{} is not a file: give the {what} file", resolved.display());
                Err(self.fail(MissingFile, key, m))
            }
            Err(e) => {
                let mut err = self.fail(MissingFile, key, missing_file_message(&resolved, &e));
                if e.kind() != io::ErrorKind::NotFound {
                    err.source = Some(e);
                }
                Err(err)
            }
        }
    }
}

pub(super) fn missing_file_message(path: &Path, error: &io::Error) -> String {
    let shown = path.display();
    if error.kind() != io::ErrorKind::NotFound {
        return format!("cannot read {shown}: check its permissions");
    }
    let tilde = path.components().any(|c| c.as_os_str() == "~");
    if tilde {
        format!("{shown} does not exist: relive does not expand ~, write the full path")
    } else {
        format!(
            "{shown} does not exist: fix the path (relative paths start at the fleet file's \
             directory)"
        )
    }
}

/// Checks a VM name: `[a-z0-9-]`, 1 to 48 characters, starting and ending
/// with a letter or digit (it names directories, cgroups and CLI arguments).
pub(super) fn check_name(name: &str) -> Result<(), String> {
    let rule = "use 1 to 48 characters from a-z, 0-9 and -, starting and ending with a letter \
                or digit";
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(allowed)
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid VM name \"{name}\": {rule}"))
    }
}

/// Checks a bearer token: long enough, and sendable in an HTTP header.
pub(super) fn check_token(token: &str) -> Result<(), String> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "the token is too short to be secret: use at least {MIN_TOKEN_LEN} characters, e.g. \
             from `openssl rand -hex 32`"
        ));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err("the token may only hold printable ASCII characters without spaces".into());
    }
    Ok(())
}

/// The bundled guest's heartbeat interval set on `cmdline` (`relive.hb_ms=N`),
/// if any.
pub(super) fn bundled_heartbeat_ms(cmdline: &str) -> Result<Option<u64>, String> {
    let Some(value) = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("relive.hb_ms="))
        .next_back()
    else {
        return Ok(None);
    };
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Some(ms)),
        _ => Err(format!(
            "relive.hb_ms={value} is not a heartbeat interval: write a whole number of \
             milliseconds, like relive.hb_ms=100"
        )),
    }
}

/// An image VM's kernel command line: relive's own ([`CONTAINER_CMDLINE`]),
/// the app's command and env for the agent (`relive.run=HEX`, the hex of a
/// JSON object `{"command": [...], "env": [...]}`, when either is set), then
/// the VM's own `cmdline`.
pub(super) fn container_cmdline(app: &AppSpec, own: Option<&str>) -> String {
    let mut line = CONTAINER_CMDLINE.to_string();
    if app.command.is_some() || !app.env.is_empty() {
        let run = serde_json::json!({ "command": app.command, "env": app.env });
        line.push_str(" relive.run=");
        for byte in run.to_string().bytes() {
            line.push_str(&format!("{byte:02x}"));
        }
    }
    if let Some(own) = own.filter(|o| !o.trim().is_empty()) {
        line.push(' ');
        line.push_str(own.trim());
    }
    line
}
