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
}

/// Status of a VMM that failed before or outside the guest.
pub const STATUS_VMM_ERROR: i32 = 1;

impl ExitReason {
    /// Every reason, for documentation and tests.
    pub const ALL: [ExitReason; 8] = [
        ExitReason::Exit,
        ExitReason::Shutdown,
        ExitReason::Reset,
        ExitReason::Panic,
        ExitReason::TripleFault,
        ExitReason::KvmError,
        ExitReason::VcpuStuck,
        ExitReason::Seccomp,
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
    fn record_is_one_json_line_with_the_reason() {
        let line = ExitRecord::new(ExitReason::TripleFault, 42, "KVM_EXIT_SHUTDOWN").to_json();
        assert!(!line.contains('\n'));
        let back: ExitRecord = serde_json::from_str(&line).unwrap();
        assert_eq!(back.reason, ExitReason::TripleFault);
        assert_eq!(back.status, 12);
        assert!(line.contains(r#""reason":"triple-fault""#));
    }
}
