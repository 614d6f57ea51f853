//! Why a VM stopped, as a type, and the process exit status of each reason.
//!
//! `relive-vmm` ends with exactly one of these statuses and prints one JSON
//! line on stderr, for example:
//!
//! ```text
//! {"event":"vm-exit","reason":"panic","status":11,"uptime_ms":5123,"detail":"pvpanic: guest panicked"}
//! ```
//!
//! | status | reason         | meaning                                              |
//! |--------|----------------|------------------------------------------------------|
//! | 0      | `exit`         | the guest powered off                                 |
//! | 1      | -              | the VMM failed (bad input, setup error): see stderr   |
//! | 2      | -              | command-line usage error                              |
//! | 3      | `shutdown`     | the host asked the VMM to stop (control socket, SIGTERM, SIGINT) |
//! | 10     | `reset`        | the guest asked for a reset (i8042, KVM system event) |
//! | 11     | `panic`        | the guest panicked (pvpanic, KVM crash event)         |
//! | 12     | `triple-fault` | the guest triple-faulted (KVM_EXIT_SHUTDOWN)          |
//! | 13     | `kvm-error`    | KVM could not run the guest (internal error, failed entry, unexpected exit) |
//! | 14     | `vcpu-stuck`   | a vCPU stopped answering the VMM: it ended the VM rather than leave it half paused |
//! | 15     | `seccomp`      | a VMM thread made a system call its seccomp filter forbids (written by the SIGSYS handler; no watch hears it) |
//! | 16     | `app-exit`     | the guest powered off after its agent reported that the app ended (`app exited code=C` or `signal=S` on the agent channel); the record's `app` says how |
//! | 17     | `fenced`       | the fencing deadline a `fence` request armed passed without a renewal (cluster mode: the supervisor, or its host's etcd lease, is gone): the VMM ended the VM before another host could take it over |
//!
//! The same record is the last message on every `watch` connection of the
//! control socket ([`crate::Response::Exit`]), so a supervisor learns why its
//! VMM ended without reading its log.

use serde::{Deserialize, Serialize};

/// Why the VM stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExitReason {
    /// The guest powered off.
    Exit,
    /// The host asked the VMM to stop.
    Shutdown,
    /// The guest asked for a reset.
    Reset,
    /// The guest panicked.
    Panic,
    /// The guest triple-faulted.
    TripleFault,
    /// KVM could not run the guest.
    KvmError,
    /// A vCPU thread stopped answering the VMM (a pause or resume was not
    /// acknowledged in time): the VM cannot be kept consistent.
    VcpuStuck,
    /// A VMM thread made a system call outside its seccomp allow-list.
    Seccomp,
    /// The guest powered off because its app ended ([`ExitRecord::app`]).
    AppExit,
    /// The fencing deadline passed without a renewal.
    Fenced,
}

/// Status of a VMM that failed before or outside the guest.
pub const STATUS_VMM_ERROR: i32 = 1;

impl ExitReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [ExitReason; 10] = [
        ExitReason::Exit,
        ExitReason::Shutdown,
        ExitReason::Reset,
        ExitReason::Panic,
        ExitReason::TripleFault,
        ExitReason::KvmError,
        ExitReason::VcpuStuck,
        ExitReason::Seccomp,
        ExitReason::AppExit,
        ExitReason::Fenced,
    ];

    /// The process exit status for this reason.
    pub const fn status(self) -> i32 {
        match self {
            ExitReason::Exit => 0,
            ExitReason::Shutdown => 3,
            ExitReason::Reset => 10,
            ExitReason::Panic => 11,
            ExitReason::TripleFault => 12,
            ExitReason::KvmError => 13,
            ExitReason::VcpuStuck => 14,
            ExitReason::Seccomp => 15,
            ExitReason::AppExit => 16,
            ExitReason::Fenced => 17,
        }
    }

    /// The reason for an exit status, if it is one of ours.
    pub fn from_status(status: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.status() == status)
    }

    /// The reason's stable name (as in the JSON line).
    pub const fn as_str(self) -> &'static str {
        match self {
            ExitReason::Exit => "exit",
            ExitReason::Shutdown => "shutdown",
            ExitReason::Reset => "reset",
            ExitReason::Panic => "panic",
            ExitReason::TripleFault => "triple-fault",
            ExitReason::KvmError => "kvm-error",
            ExitReason::VcpuStuck => "vcpu-stuck",
            ExitReason::Seccomp => "seccomp",
            ExitReason::AppExit => "app-exit",
            ExitReason::Fenced => "fenced",
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The JSON line printed on stderr when the VM stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Always `vm-exit`.
    pub event: String,
    /// Why.
    pub reason: ExitReason,
    /// The process exit status.
    pub status: i32,
    /// Milliseconds since the VM started running.
    pub uptime_ms: u64,
    /// Human detail (which device, which KVM exit).
    pub detail: String,
    /// How the app ended, for [`ExitReason::AppExit`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppExit>,
}

/// How a container app ended, as its agent reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppExit {
    /// It exited with this status.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl AppExit {
    /// Parses the agent's `app exited code=C` or `app exited signal=S`.
    pub fn parse(line: &str) -> Option<AppExit> {
        let rest = line.strip_prefix("app exited ")?;
        let word = rest.split_whitespace().next()?;
        if let Some(code) = word.strip_prefix("code=") {
            return code.parse().ok().map(AppExit::Code);
        }
        word.strip_prefix("signal=")?
            .parse()
            .ok()
            .map(AppExit::Signal)
    }

    /// Whether the app succeeded (exit status 0).
    pub const fn succeeded(self) -> bool {
        matches!(self, AppExit::Code(0))
    }
}

impl std::fmt::Display for AppExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AppExit::Code(c) => write!(f, "exit code {c}"),
            AppExit::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

impl ExitRecord {
    /// A record for `reason`.
    pub fn new(reason: ExitReason, uptime_ms: u64, detail: impl Into<String>) -> Self {
        ExitRecord {
            event: "vm-exit".to_string(),
            reason,
            status: reason.status(),
            uptime_ms,
            detail: detail.into(),
            app: None,
        }
    }

    /// The record as one JSON line (no newline).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| {
            format!(
                r#"{{"event":"vm-exit","reason":"{}","status":{}}}"#,
                self.reason, self.status
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for r in ExitReason::ALL {
            assert!(seen.insert(r.status()), "duplicate status for {r}");
            assert_ne!(r.status(), STATUS_VMM_ERROR);
            assert_ne!(r.status(), 2);
            assert_eq!(ExitReason::from_status(r.status()), Some(r));
        }
    }

    #[test]
    fn app_exits_parse_from_the_agent_line_and_round_trip() {
        assert_eq!(AppExit::parse("app exited code=3"), Some(AppExit::Code(3)));
        assert_eq!(
            AppExit::parse("app exited signal=9"),
            Some(AppExit::Signal(9))
        );
        assert_eq!(AppExit::parse("app exited error=spawn detail=x"), None);
        assert_eq!(AppExit::parse("out 3 app exited code=1"), None);
        let mut record = ExitRecord::new(ExitReason::AppExit, 7, "the app ended");
        record.app = Some(AppExit::Code(3));
        let line = record.to_json();
        assert!(line.contains(r#""app":{"code":3}"#), "{line}");
        assert_eq!(serde_json::from_str::<ExitRecord>(&line).unwrap(), record);
        // A record without `app` (older VMMs) still reads.
        let old = r#"{"event":"vm-exit","reason":"exit","status":0,"uptime_ms":1,"detail":"x"}"#;
        assert_eq!(serde_json::from_str::<ExitRecord>(old).unwrap().app, None);
    }

    #[test]
    fn record_is_one_json_line_with_the_reason() {
        let line = ExitRecord::new(ExitReason::TripleFault, 42, "KVM_EXIT_SHUTDOWN").to_json();
        assert!(!line.contains('\n'));
        let back: ExitRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back.reason, ExitReason::TripleFault);
        assert_eq!(back.status, 12);
        assert!(line.contains(r#""reason":"triple-fault""#));
    }
}
