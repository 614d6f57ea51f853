//! Agent-channel lines a guest sends: heartbeats and readiness.
//!
//! A heartbeat is `hb seq=S [counter=C] [hash=H] ...` (`H` in hex): `seq`
//! counts heartbeats, and the bundled guest adds its work counter and the
//! running hash of everything it did, so a restore can be checked to continue
//! exactly. Fields a guest does not send are `None`; unknown fields are ignored.

/// A heartbeat line, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sequence number of the heartbeat.
    pub seq: u64,
    /// Work counter (the bundled guest).
    pub counter: Option<u64>,
    /// Running hash of the work (the bundled guest).
    pub hash: Option<u64>,
}

impl Heartbeat {
    /// Parses `line`; `None` when it is not a heartbeat with a `seq`.
    pub fn parse(line: &str) -> Option<Heartbeat> {
        let fields = line.strip_prefix("hb ")?;
        let field = |key: &str| {
            fields
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        };
        Some(Heartbeat {
            seq: field("seq")?.parse().ok()?,
            counter: field("counter").and_then(|c| c.parse().ok()),
            hash: field("hash").and_then(|h| u64::from_str_radix(h, 16).ok()),
        })
    }
}

/// Whether `line` is a heartbeat (`hb ...`).
pub fn is_heartbeat(line: &str) -> bool {
    line.starts_with("hb ")
}

/// Whether a `ready` line asks for the host's notice `name`: its
/// `notices=a,b` field lists it (`relive-agent` says `notices=restored`).
pub fn wants_notice(ready_line: &str, name: &str) -> bool {
    ready_line
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("notices="))
        .any(|list| list.split(',').any(|n| n == name))
}

/// Whether `line` says the guest is ready (`ready` or `ready ...`).
pub fn is_ready(line: &str) -> bool {
    line == "ready" || line.starts_with("ready ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_parse_with_and_without_work_fields() {
        assert_eq!(
            Heartbeat::parse("hb seq=12 counter=345 hash=00ff extra=1"),
            Some(Heartbeat {
                seq: 12,
                counter: Some(345),
                hash: Some(255)
            })
        );
        assert_eq!(
            Heartbeat::parse("hb seq=3"),
            Some(Heartbeat {
                seq: 3,
                counter: None,
                hash: None
            })
        );
        assert_eq!(Heartbeat::parse("hb counter=1"), None);
        assert_eq!(Heartbeat::parse("ready"), None);
        assert_eq!(Heartbeat::parse("hbseq=1"), None);
        assert!(is_heartbeat("hb seq=1"));
        assert!(is_ready("ready") && is_ready("ready v1") && !is_ready("readyish"));
        assert!(wants_notice(
            "ready app=running pid=9 notices=restored",
            "restored"
        ));
        assert!(wants_notice("ready notices=x,restored", "restored"));
        assert!(!wants_notice("ready counter=1 hash=2", "restored"));
        assert!(!wants_notice("ready notices=restoredx", "restored"));
    }
}
