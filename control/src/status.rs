//! What a VMM reports about its VM: `status`, the resource limits it runs
//! under, and what its guest last said on the agent channel.

use serde::{Deserialize, Serialize};

/// State of the VM as `status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// A standby VMM: everything built, no guest yet; waits for `restore`.
    Standby,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Running or paused.
    pub state: RunState,
    /// Milliseconds since the vCPUs started.
    pub uptime_ms: u64,
    /// When the vCPU threads were started (booted or restored), as
    /// CLOCK_MONOTONIC nanoseconds: with a timestamp taken before spawning the
    /// VMM, this gives process start to vCPUs running.
    pub vcpus_started_monotonic_ns: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Returns from KVM_RUN to the VMM, all vCPUs.
    pub vcpu_exits: u64,
    /// Of those, port I/O exits.
    pub io_exits: u64,
    /// Configured guest memory in MiB.
    pub mem_mib: u64,
    /// Guest memory resident in host RAM.
    pub guest_resident_bytes: u64,
    /// Process id of the VMM.
    pub pid: u32,
    /// Kernel the VM booted.
    pub kernel: String,
    /// Agent channel.
    pub agent: AgentStatus,
    /// The VM's name.
    pub name: Option<String>,
    /// Resource limits the VM runs under (as configured or restored).
    pub limits: ResourceLimits,
    /// The boot image this VM wrote, if any.
    pub boot_image: Option<String>,
    /// The image chain the VMM's store builds on: what the next checkpoint
    /// will be. The VMM owns this state; clients read it, never mirror it.
    #[serde(default)]
    pub chain: ChainStatus,
}

/// The VMM's view of its image chain (see [`VmStatus::chain`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainStatus {
    /// The newest image this VMM wrote or was restored from.
    pub last_image: Option<String>,
    /// Whether the next checkpoint is full whatever is asked (no image to
    /// layer on in this store, a boot-image start, or a failed checkpoint).
    pub next_full: bool,
    /// Layers written on the current full image.
    pub layers: usize,
}

/// The agent channel part of `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// Whether the guest has said `ready`.
    pub ready: bool,
    /// Lines received from the guest.
    pub lines: u64,
    /// Lines dropped by the rate limit.
    pub dropped_lines: u64,
    /// Lines cut at the length limit.
    pub truncated_lines: u64,
    /// The last line the guest sent.
    pub last_line: Option<String>,
    /// Milliseconds since the last line.
    pub last_line_age_ms: Option<u64>,
    /// Milliseconds since the last heartbeat (`hb ...`).
    pub last_heartbeat_age_ms: Option<u64>,
    /// When the guest said `ready`, as CLOCK_MONOTONIC nanoseconds (comparable
    /// with any other process's clock on this host).
    pub ready_monotonic_ns: Option<u64>,
}

/// Host resource limits that travel with an image, applied to the VMM
/// process's cgroup `relive/<name>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceLimits {
    /// CPU quota in percent of one core.
    pub cpu_percent: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks.
    pub pids: Option<u64>,
}

/// What the guest last reported on the agent channel (recorded in every
/// image as its `AppStatus` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    /// Whether it had said `ready`.
    pub ready: bool,
    /// Its last heartbeat line.
    pub last_heartbeat: Option<String>,
    /// Its last line of any kind.
    pub last_line: Option<String>,
    /// It asked for the `restored` notice after a restore (its `ready` line
    /// said `notices=restored`, as `relive-agent`'s does).
    #[serde(default)]
    pub wants_restored: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_without_chain_from_an_older_vmm_still_decodes() {
        let status = VmStatus {
            state: RunState::Running,
            uptime_ms: 1,
            vcpus_started_monotonic_ns: 2,
            vcpus: 1,
            vcpu_exits: 3,
            io_exits: 4,
            mem_mib: 64,
            guest_resident_bytes: 5,
            pid: 6,
            kernel: "bundled".into(),
            agent: AgentStatus {
                ready: true,
                lines: 7,
                dropped_lines: 0,
                truncated_lines: 0,
                last_line: None,
                last_line_age_ms: None,
                last_heartbeat_age_ms: None,
                ready_monotonic_ns: None,
            },
            name: None,
            limits: ResourceLimits::default(),
            boot_image: None,
            chain: ChainStatus {
                last_image: Some("ab".into()),
                next_full: true,
                layers: 2,
            },
        };
        let mut json = serde_json::to_value(&status).unwrap();
        let back: VmStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, status);
        json.as_object_mut().unwrap().remove("chain");
        let old: VmStatus = serde_json::from_value(json).unwrap();
        assert_eq!(old.chain, ChainStatus::default());
    }
}
