//! A container app's output, kept across failovers: `relive logs VM`.
//!
//! The guest agent sends each line the app writes as `out N TEXT` or
//! `err N TEXT` on the agent channel, `N` counting both streams from 1 in
//! guest memory (`agent/src/main.rs`). The VM's task hands every such line
//! to its [`AppLog`], which appends it to `<state_dir>/<vm>/app.log` (owner
//! only, one JSON object per line, [`LogEntry`]) and tells followers.
//!
//! # Across a restore
//!
//! A consistency restore takes the guest back to the image: the agent's
//! count goes back with it, and the app runs again from there. Lines up to
//! the highest `N` already kept were shown; a restored guest's lines with
//! such an `N` are dropped, so what was shown is not shown twice, and a
//! `relive` entry marks the restore. A boot image starts a new run: its
//! count starts over, and so does the log's (after a `relive` entry).
//!
//! The file holds at most [`MAX_LOG_BYTES`]; beyond, it is renamed
//! `app.log.1` (replacing the previous one) and a new one begins. Every
//! entry carries an `id`, increasing across the VM's whole log, so that a
//! follower that read the file and then the live entries takes each once.

use std::fs::File;
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// Size at which `app.log` is rotated.
pub const MAX_LOG_BYTES: u64 = 8 << 20;

/// Live entries a slow follower may lag behind before it misses some.
const FOLLOW_CAPACITY: usize = 1024;

/// One entry of a VM's app log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Position in the VM's log, from 1, never reused.
    pub id: u64,
    /// Wall-clock time it reached the supervisor, unix ms.
    pub unix_ms: u64,
    /// `out`, `err`, or `relive` (a note of the supervisor's: a restore, a
    /// new run).
    pub stream: String,
    /// The agent's line count `N` (absent for `relive` entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The line.
    pub text: String,
}

/// Live entries of every VM, for `relive logs --follow`.
#[derive(Clone)]
pub struct LogFeed {
    tx: broadcast::Sender<(String, LogEntry)>,
}

impl Default for LogFeed {
    fn default() -> Self {
        LogFeed {
            tx: broadcast::channel(FOLLOW_CAPACITY).0,
        }
    }
}

impl LogFeed {
    /// Entries written from now on, with their VM's name.
    pub fn subscribe(&self) -> broadcast::Receiver<(String, LogEntry)> {
        self.tx.subscribe()
    }
}

/// The app log of one VM; owned by its task.
pub struct AppLog {
    vm: String,
    path: PathBuf,
    file: Option<File>,
    size: u64,
    /// The highest agent count kept in this run.
    last_seq: u64,
    /// The last entry id written.
    last_id: u64,
    /// Restored lines dropped since the last restore (already shown).
    dropped: u64,
    feed: LogFeed,
    /// The last write failed: said once, until one works again.
    failing: bool,
}

/// `out N TEXT` or `err N TEXT` from the agent: (stream, N, TEXT).
pub fn parse_output(line: &str) -> Option<(&'static str, u64, &str)> {
    let (stream, rest) = if let Some(rest) = line.strip_prefix("out ") {
        ("out", rest)
    } else {
        ("err", line.strip_prefix("err ")?)
    };
    let (n, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Some((stream, n.parse().ok()?, text))
}

impl AppLog {
    /// The log in `dir` (`dir/app.log`), going on from what it holds; the
    /// file is created with the first entry.
    pub fn open(vm: &str, dir: &Path, feed: LogFeed) -> AppLog {
        let path = dir.join("app.log");
        let (last_id, last_seq) = last_entry(&path).map_or((0, 0), |(entries, seq)| (entries, seq));
        AppLog {
            vm: vm.to_string(),
            path,
            file: None,
            size: 0,
            last_seq,
            last_id,
            dropped: 0,
            feed,
            failing: false,
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn reopen(&mut self) {
        let opened = relive_images::private::open_options()
            .append(true)
            .create(true)
            .open(&self.path);
        match opened {
            Ok(file) => {
                self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(file);
            }
            Err(e) => self.failed(&e),
        }
    }

    fn failed(&mut self, e: &io::Error) {
        if !self.failing {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the app log");
        }
        self.failing = true;
    }

    /// Takes one agent line: keeps it if it is app output not shown yet.
    /// Returns whether it was app output.
    pub fn on_agent_line(&mut self, line: &str) -> bool {
        let Some((stream, seq, text)) = parse_output(line) else {
            return false;
        };
        if seq <= self.last_seq {
            self.dropped += 1;
            return true;
        }
        self.last_seq = seq;
        self.write(stream, Some(seq), text);
        true
    }

    /// The guest came back from a consistency image (or an operator's
    /// image): its count goes on from the image's, and lines it sends
    /// again are not kept again.
    pub fn on_restored_state(&mut self, what: &str) {
        self.dropped = 0;
        let text = format!(
            "restored from {what}: the app goes on from there; its lines up to {} were shown \
             already and are not repeated",
            self.last_seq
        );
        self.write("relive", None, &text);
    }

    /// A new run of the app (a boot, or a boot image): its count starts over.
    pub fn on_new_run(&mut self, what: &str) {
        self.last_seq = 0;
        self.dropped = 0;
        self.write("relive", None, &format!("{what}: a new run of the app"));
    }

    fn write(&mut self, stream: &str, seq: Option<u64>, text: &str) {
        if self.size >= MAX_LOG_BYTES {
            let _ = std::fs::rename(&self.path, self.path.with_extension("log.1"));
            self.file = None;
            self.reopen();
        }
        if self.file.is_none() {
            self.reopen();
        }
        self.last_id += 1;
        let entry = LogEntry {
            id: self.last_id,
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            stream: stream.to_string(),
            seq,
            text: text.to_string(),
        };
        let mut line = serde_json::to_vec(&entry).unwrap_or_default();
        line.push(b'\n');
        if let Some(file) = self.file.as_mut() {
            // One write(2) of a whole line on an O_APPEND file: a reader
            // never sees half an entry, a full disk loses whole entries.
            match file.write_all(&line) {
                Ok(()) => {
                    self.size += line.len() as u64;
                    self.failing = false;
                }
                Err(e) => self.failed(&e),
            }
        }
        let _ = self.feed.tx.send((self.vm.clone(), entry));
    }
}

/// The last entry's id and the highest agent count of the current run in
/// the log at `path` (reading at most its last 1 MiB).
fn last_entry(path: &Path) -> Option<(u64, u64)> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(1 << 20);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    let entries: Vec<LogEntry> = tail
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice(l).ok())
        .collect();
    let last = entries.last()?;
    // The count of the current run: the highest since its last new-run note.
    let run_start = entries
        .iter()
        .rposition(|e| e.stream == "relive" && e.text.ends_with("a new run of the app"))
        .map_or(0, |i| i + 1);
    let seq = entries[run_start..]
        .iter()
        .filter_map(|e| e.seq)
        .max()
        .unwrap_or(0);
    Some((last.id, seq))
}

/// The last `n` entries of the log at `path` (and of its rotated
/// predecessor when the current file holds fewer).
pub fn read_tail(path: &Path, n: usize) -> io::Result<Vec<LogEntry>> {
    let mut entries = Vec::new();
    for file in [path.with_extension("log.1"), path.to_path_buf()] {
        match File::open(&file) {
            Ok(f) => {
                for line in io::BufReader::new(f).lines() {
                    if let Ok(entry) = serde_json::from_str::<LogEntry>(&line?) {
                        entries.push(entry);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let skip = entries.len().saturating_sub(n);
    Ok(entries.split_off(skip))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a test fails by panicking
mod tests {
    use super::*;

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "relive-applog-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn texts(entries: &[LogEntry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| match e.seq {
                Some(n) => format!("{n} {}", e.text),
                None => format!("- {}", e.text),
            })
            .collect()
    }

    #[test]
    fn output_parses_and_other_lines_are_not_output() {
        assert_eq!(
            parse_output("out 3 hello world"),
            Some(("out", 3, "hello world"))
        );
        assert_eq!(parse_output("err 4 "), Some(("err", 4, "")));
        assert_eq!(parse_output("err 5"), Some(("err", 5, "")));
        assert_eq!(parse_output("hb seq=1 app=running"), None);
        assert_eq!(parse_output("out x y"), None);
    }

    #[test]
    fn a_restore_does_not_repeat_lines_a_new_run_starts_over_and_a_reopen_goes_on() {
        let dir = temp_dir();
        let feed = LogFeed::default();
        let mut follower = feed.subscribe();
        let mut log = AppLog::open("web", &dir, feed.clone());
        for line in ["out 1 a", "err 2 b", "hb seq=1", "out 3 c"] {
            log.on_agent_line(line);
        }
        // Restored from an image taken after line 1: lines 2 and 3 come
        // again (the app runs again from there), then new ones.
        log.on_restored_state("consistency image x");
        for line in ["err 2 b", "out 3 c'", "out 4 d"] {
            assert!(log.on_agent_line(line));
        }
        drop(log);
        // A new supervisor goes on from the file: line 4 was shown.
        let mut log = AppLog::open("web", &dir, feed.clone());
        log.on_agent_line("out 4 d");
        log.on_agent_line("out 5 e");
        log.on_new_run("boot image");
        log.on_agent_line("out 1 A");
        let all = read_tail(&dir.join("app.log"), 100).unwrap();
        assert_eq!(
            texts(&all),
            [
                "1 a",
                "2 b",
                "3 c",
                "- restored from consistency image x: the app goes on from there; its lines up \
                 to 3 were shown already and are not repeated",
                "4 d",
                "5 e",
                "- boot image: a new run of the app",
                "1 A",
            ]
        );
        let ids: Vec<u64> = all.iter().map(|e| e.id).collect();
        assert_eq!(ids, (1..=8).collect::<Vec<_>>());
        assert_eq!(
            texts(&read_tail(&dir.join("app.log"), 2).unwrap()),
            ["- boot image: a new run of the app", "1 A"]
        );
        // Followers heard every entry, once.
        let mut heard = Vec::new();
        while let Ok((vm, entry)) = follower.try_recv() {
            assert_eq!(vm, "web");
            heard.push(entry);
        }
        assert_eq!(heard, all);
        // The file is the owner's alone.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("app.log"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Reopened after the new run, the count is the new run's.
        let mut log = AppLog::open("web", &dir, feed);
        log.on_agent_line("out 2 B");
        assert_eq!(texts(&read_tail(&dir.join("app.log"), 1).unwrap()), ["2 B"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_full_log_is_rotated_and_the_tail_spans_both_files() {
        let dir = temp_dir();
        let mut log = AppLog::open("big", &dir, LogFeed::default());
        let text = "x".repeat(500);
        let mut n = 0;
        while !dir.join("app.log.1").exists() {
            n += 1;
            log.on_agent_line(&format!("out {n} {text}"));
        }
        log.on_agent_line(&format!("out {} last", n + 1));
        assert!(std::fs::metadata(dir.join("app.log.1")).unwrap().len() >= MAX_LOG_BYTES);
        let tail = read_tail(&dir.join("app.log"), 3).unwrap();
        assert_eq!(
            tail.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            [n - 1, n, n + 1]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
