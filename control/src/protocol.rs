//! The control socket protocol: one JSON object per line, each way.
//!
//! ```text
//! {"cmd":"status"}                    -> {"reply":"status", ...VmStatus fields}
//! {"cmd":"shutdown"}                  -> {"reply":"ok"} and the VMM exits with status 3
//! {"cmd":"agent","line":"status"}     -> {"reply":"ok"} once the line is queued for the guest
//! {"cmd":"watch"}                     -> {"reply":"ok"}, then {"reply":"agent","line":"hb seq=1 ..."} ...
//!                                        and, when the VM ends, {"reply":"exit", ...ExitRecord fields}
//! {"cmd":"pause"} / {"cmd":"resume"}  -> {"reply":"ok"}
//! {"cmd":"restore","image":"PATH"}    -> {"reply":"restored","image_id":"..","path":"..","restore_us":..} (standby VMMs only)
//! {"cmd":"checkpoint","kind":"full"}  -> {"reply":"checkpoint","image_id":"..","kind":"full","path":"..","bytes":..,"pause_us":..,"total_us":..}
//! ```
//!
//! Any request can be answered `{"reply":"error","kind":"...","error":"..."}`:
//! `kind` ([`ErrorKind`]) is what a program acts on, `error` is the text for
//! people (the error and its causes, made once, at the socket). Unknown
//! commands and malformed JSON get such an error and the connection stays
//! open.
//!
//! Compatibility: new commands are new `cmd` values; clients ignore reply
//! fields they do not know, and an error kind they do not know reads as
//! [`ErrorKind::Other`].
//!
//! Replies on one connection come in the order of the requests, one each
//! (`watch` turns the connection into a stream). A client that gives up
//! waiting for a reply must close the connection: the late reply would
//! otherwise be read as the answer to its next request
//! ([`crate::ControlClient`] does so).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::exit::ExitRecord;
use crate::status::VmStatus;

/// Longest request line the server reads.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// How long the server waits for its VM to answer one request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// VM state and counters.
    Status,
    /// Stop the VM.
    Shutdown,
    /// Send one line to the guest's agent channel.
    Agent {
        /// The line, without newline.
        line: String,
    },
    /// Stream what the guest says on the agent channel, then why the VM ended.
    Watch,
    /// Stop every vCPU (the guest's time stands still).
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Standby VMMs only: take this image and run its guest.
    Restore {
        /// The image file (a layer is merged with its chain first).
        image: String,
    },
    /// Write a consistency image into the VM's image directory.
    Checkpoint {
        /// `full` (default) or `incremental`.
        #[serde(default)]
        kind: CheckpointKind,
    },
    /// Arm (or renew) the VMM's fencing deadline: unless another `fence`
    /// comes within `within_ms`, the VMM ends its VM with the exit `fenced`
    /// (status 17). A renewal only moves the deadline later; `within_ms: 0`
    /// disarms it. Cluster mode's supervisor
    /// renews it with each renewal of its host's lease, so a VMM whose
    /// supervisor is gone (not only its host) stops before another host can
    /// take its VM over.
    Fence {
        /// Milliseconds from now.
        within_ms: u64,
    },
    /// Make the VMM do something it must not be able to do, to prove (in
    /// tests and drills) that its confinement holds.
    InjectFault {
        /// What.
        fault: Fault,
    },
}

/// A fault [`Request::InjectFault`] provokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The event loop thread opens an IPv4 socket, which no VMM thread may:
    /// under seccomp the VMM ends with the `seccomp` exit (15); without, the
    /// socket is closed again and the reply says the call was allowed.
    ForbiddenSyscall,
    /// The event loop thread opens the host's `/etc/hostname` for reading:
    /// a jailed VMM's root does not hold it, so the reply is
    /// [`Response::Drill`] with `held: true`; an unjailed VMM reads it
    /// (`held: false`).
    ReadHostFile,
}

impl Request {
    /// The command's wire name, for messages.
    pub const fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Shutdown => "shutdown",
            Request::Agent { .. } => "agent",
            Request::Watch => "watch",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Restore { .. } => "restore",
            Request::Checkpoint { .. } => "checkpoint",
            Request::Fence { .. } => "fence",
            Request::InjectFault { .. } => "inject-fault",
        }
    }
}

/// What a checkpoint writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// Every page the guest touched.
    #[default]
    Full,
    /// Only pages dirtied since the last image, as a layer on it (the VMM
    /// writes a full image when it has nothing to layer on: see
    /// [`crate::ChainStatus`]).
    Incremental,
}

impl CheckpointKind {
    /// The stable name (as on the wire).
    pub const fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Full => "full",
            CheckpointKind::Incremental => "incremental",
        }
    }
}

/// The answer to `checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    /// The image id (32 hex digits).
    pub image_id: String,
    /// What was written (an incremental request without a parent writes full).
    pub kind: CheckpointKind,
    /// The committed image file.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
    /// How long the vCPUs stood still, in microseconds.
    pub pause_us: u64,
    /// The whole checkpoint, in microseconds.
    pub total_us: u64,
    /// How the memory was copied.
    #[serde(default)]
    pub copy: CopyStats,
}

/// How a checkpoint copied guest memory. A live checkpoint copies pages
/// while the guest runs, in rounds (round 0: every page it must hold; each
/// next round: the pages the guest wrote during the previous one), then
/// stops the guest for the last pages it wrote. A stop-and-copy checkpoint
/// (the warm boot image) has no rounds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyStats {
    /// Rounds while the guest ran (round 0 included).
    pub rounds: u32,
    /// Pages copied while the guest ran, all rounds.
    pub copied_pages: u64,
    /// Of those, copies of a page copied before in the same checkpoint.
    pub recopied_pages: u64,
    /// Pages copied while the guest was stopped.
    pub final_pages: u64,
}

/// The answer to `restore` on a standby VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The image the guest now runs from.
    pub image_id: String,
    /// Its file.
    pub path: String,
    /// From the request reaching the VMM to the vCPUs running, in microseconds.
    pub restore_us: u64,
}

/// What kind of failure an error reply reports: what a client acts on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request is not protocol (bad JSON, unknown command, too long).
    BadRequest,
    /// The request does not fit the VMM's state: a standby has no guest
    /// yet, a running VMM takes no image, a VM without `--images` writes none.
    WrongState,
    /// The image cannot be used: unreadable, corrupt, of another format
    /// version, or of a VM of another shape than this standby.
    ImageRefused,
    /// The agent line cannot be sent (too long, not one line).
    AgentRefused,
    /// The vCPUs did not all stop in time; the VM runs on, unchanged.
    PauseTimeout,
    /// Writing the image failed (disk full, I/O error): nothing was
    /// committed, and the next checkpoint is full.
    ImageWrite,
    /// A KVM call failed while capturing or loading state.
    Kvm,
    /// The VM did not answer within the server's deadline.
    Timeout,
    /// Anything else (and kinds this build does not know).
    #[default]
    #[serde(other)]
    Other,
}

impl ErrorKind {
    /// The stable name (as on the wire), for logs and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::WrongState => "wrong-state",
            ErrorKind::ImageRefused => "image-refused",
            ErrorKind::AgentRefused => "agent-refused",
            ErrorKind::PauseTimeout => "pause-timeout",
            ErrorKind::ImageWrite => "image-write",
            ErrorKind::Kvm => "kvm",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An answer on the control socket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// What kind of failure, for programs.
        #[serde(default)]
        kind: ErrorKind,
        /// The error and its causes, for people.
        error: String,
    },
    /// The answer to `status`.
    Status(Box<VmStatus>),
    /// The outcome of an [`Request::InjectFault`] drill that the VMM
    /// survives.
    Drill {
        /// Whether the confinement held (the forbidden thing failed).
        held: bool,
        /// What happened, for people.
        detail: String,
    },
    /// A line the guest sent (during `watch`).
    Agent {
        /// The line.
        line: String,
    },
    /// The VM ended (the last message of a `watch`).
    Exit(ExitRecord),
    /// The answer to `checkpoint`.
    Checkpoint(CheckpointReport),
    /// The answer to `restore`.
    Restored(RestoreReport),
    /// During `watch`: the VMM stops the vCPUs for a checkpoint now. No
    /// heartbeat comes until the matching [`Response::Resumed`]: the guest
    /// is not hung, it was asked to stand still.
    Paused {
        /// Why (`checkpoint`).
        reason: String,
    },
    /// During `watch`: the vCPUs run again after a [`Response::Paused`].
    Resumed {
        /// Why they had stopped.
        reason: String,
        /// How long they stood still, in microseconds.
        paused_us: u64,
    },
}

impl Response {
    /// An error reply: `error` is `err` and its causes on one line.
    pub fn error(kind: ErrorKind, err: &dyn std::error::Error) -> Self {
        Response::Error {
            kind,
            error: crate::error_chain(err),
        }
    }

    /// The reply as one line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|e| {
            format!(r#"{{"reply":"error","kind":"other","error":"cannot encode the reply: {e}"}}"#)
                .into_bytes()
        });
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::ExitReason;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let cases = [
            (Request::Status, r#"{"cmd":"status"}"#),
            (Request::Shutdown, r#"{"cmd":"shutdown"}"#),
            (Request::Watch, r#"{"cmd":"watch"}"#),
            (
                Request::Agent {
                    line: "panic".into(),
                },
                r#"{"cmd":"agent","line":"panic"}"#,
            ),
            (
                Request::Checkpoint {
                    kind: CheckpointKind::Incremental,
                },
                r#"{"cmd":"checkpoint","kind":"incremental"}"#,
            ),
        ];
        for (request, wire) in cases {
            assert_eq!(serde_json::to_string(&request).unwrap(), wire);
            assert_eq!(serde_json::from_str::<Request>(wire).unwrap(), request);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"checkpoint"}"#).unwrap(),
            Request::Checkpoint {
                kind: CheckpointKind::Full
            }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"agent","line":"a","x":1}"#).is_err());
    }

    #[test]
    fn responses_have_a_stable_wire_form() {
        assert_eq!(
            serde_json::to_string(&Response::Ok).unwrap(),
            r#"{"reply":"ok"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Agent { line: "hb".into() }).unwrap(),
            r#"{"reply":"agent","line":"hb"}"#
        );
        let err = Response::Error {
            kind: ErrorKind::PauseTimeout,
            error: "vcpu1 did not stop".into(),
        };
        let wire = serde_json::to_string(&err).unwrap();
        assert_eq!(
            wire,
            r#"{"reply":"error","kind":"pause-timeout","error":"vcpu1 did not stop"}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&wire).unwrap(), err);
        let exit = Response::Exit(ExitRecord::new(ExitReason::Panic, 7, "pvpanic"));
        let wire = String::from_utf8(exit.to_line()).unwrap();
        assert!(wire.starts_with(r#"{"reply":"exit","event":"vm-exit","reason":"panic""#));
        assert!(wire.ends_with('\n'));
        assert_eq!(serde_json::from_str::<Response>(&wire).unwrap(), exit);
    }

    #[test]
    fn error_kinds_from_other_builds_are_read_not_refused() {
        let old: Response = serde_json::from_str(r#"{"reply":"error","error":"x"}"#).unwrap();
        assert_eq!(
            old,
            Response::Error {
                kind: ErrorKind::Other,
                error: "x".into()
            }
        );
        let newer: Response =
            serde_json::from_str(r#"{"reply":"error","kind":"quantum-flux","error":"x"}"#).unwrap();
        assert!(matches!(
            newer,
            Response::Error {
                kind: ErrorKind::Other,
                ..
            }
        ));
    }
}
