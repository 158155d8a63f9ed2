//! The batch journal: an append-only JSONL file that records each item when it is handed to a worker and
//! when its result is known, so that a re-run skips what finished and repeats, marked, what was in flight.
//!
//! Every record is one `write` of a whole line to a file opened for appending, so a crash of psbridge at
//! any point (SIGKILL included) leaves every earlier record intact and at worst a torn last line, which
//! the next run drops. The file is also synced to disk about once a second and at the end: after a power
//! loss, the records of the last second may be missing. An exclusive lock keeps two batches off one
//! journal.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Journal format version, in the header line.
const VERSION: u64 = 1;
/// How often records are synced to disk.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// A journal that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {} is in use by another psbridge batch; wait for it, or give this one another --journal", path.display())]
    Locked { path: PathBuf },
    #[error(
        "journal {} is damaged at line {line}; move it away to start over (every item then runs again), or pass --restart",
        path.display()
    )]
    Damaged { path: PathBuf, line: usize },
    #[error("{} is not a psbridge batch journal (version {found:?}); give another --journal", path.display())]
    Foreign { path: PathBuf, found: Option<u64> },
}

/// What an earlier run recorded.
#[derive(Debug, Default)]
pub struct Previous {
    /// The result record of every finished item, by identity.
    pub finished: HashMap<String, Value>,
    /// How many times each item was started, by identity.
    pub starts: HashMap<String, u32>,
    /// The input the journal was written for.
    pub input: Option<String>,
}

/// An open journal.
pub struct Journal {
    #[cfg(unix)]
    file: nix::fcntl::Flock<File>,
    #[cfg(not(unix))]
    file: File,
    path: PathBuf,
    last_sync: Instant,
}

impl Journal {
    /// Opens (creating it if needed) and locks the journal at `path`, reads what it holds unless
    /// `restart`, and drops a torn last line.
    pub fn open(path: &Path, input: &str, restart: bool) -> Result<(Journal, Previous), JournalError> {
        let io = |source| JournalError::Io { path: path.to_owned(), source };
        let file = OpenOptions::new().read(true).append(true).create(true).open(path).map_err(io)?;
        let mut file = lock(file, path)?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(io)?;
        // Parsed even when restarting, so that a file that is not a journal is never truncated.
        let (previous, good_len) = match parse(path, &text) {
            Ok(_) | Err(JournalError::Damaged { .. }) if restart => (Previous::default(), 0),
            parsed => parsed?,
        };
        if good_len < text.len() {
            // A torn tail (psbridge died mid-write), or everything when restarting.
            file.set_len(good_len as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let mut journal = Journal { file, path: path.to_owned(), last_sync: Instant::now() };
        if good_len == 0 {
            journal.append(&json!({ "psbridge_journal": VERSION, "input": input }))?;
        }
        Ok((journal, previous))
    }

    /// Records that an item is about to be handed to a worker. Call before it can run.
    pub fn start(&mut self, identity: &str, line: usize) -> Result<(), JournalError> {
        self.append(&json!({ "start": identity, "line": line }))
    }

    /// Records an item's result.
    pub fn finish(&mut self, identity: &str, result: &Value) -> Result<(), JournalError> {
        self.append(&json!({ "finish": identity, "result": result }))?;
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()?;
        }
        Ok(())
    }

    /// Syncs the records to disk.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.last_sync = Instant::now();
        self.file.sync_data().map_err(|source| JournalError::Io { path: self.path.clone(), source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&mut self, record: &Value) -> Result<(), JournalError> {
        let mut line = record.to_string();
        line.push('\n');
        // One write of the whole line: a crash leaves it whole or torn at the end, never interleaved.
        self.file.write_all(line.as_bytes()).map_err(|source| JournalError::Io { path: self.path.clone(), source })
    }
}

#[cfg(unix)]
fn lock(file: File, path: &Path) -> Result<nix::fcntl::Flock<File>, JournalError> {
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| match errno {
        nix::errno::Errno::EWOULDBLOCK => JournalError::Locked { path: path.to_owned() },
        other => JournalError::Io { path: path.to_owned(), source: other.into() },
    })
}

#[cfg(not(unix))]
fn lock(file: File, _path: &Path) -> Result<File, JournalError> {
    Ok(file) // Windows: no advisory lock here; do not share a journal between two batches.
}

/// Reads the records; returns them and the length of the text up to the last whole, valid line.
fn parse(path: &Path, text: &[u8]) -> Result<(Previous, usize), JournalError> {
    let mut previous = Previous::default();
    let mut good_len = 0;
    let mut rest = text;
    let mut line_no = 0;
    let header = br#"{"psbridge_journal""#;
    let torn_header = |line: &[u8]| header.starts_with(line) || line.starts_with(header);
    while !rest.is_empty() {
        line_no += 1;
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            // Torn: no line break yet. A first line must at least look like a header.
            if line_no == 1 && !torn_header(rest) {
                return Err(JournalError::Foreign { path: path.to_owned(), found: None });
            }
            break;
        };
        let (line, after) = rest.split_at(end + 1);
        rest = after;
        let record: Value = match serde_json::from_slice(line) {
            Ok(record) => record,
            Err(_) if line_no == 1 && !torn_header(line) => return Err(JournalError::Foreign { path: path.to_owned(), found: None }),
            Err(_) if rest.is_empty() => break, // a torn last line
            Err(_) => return Err(JournalError::Damaged { path: path.to_owned(), line: line_no }),
        };
        if line_no == 1 {
            let version = record.get("psbridge_journal").and_then(Value::as_u64);
            if version != Some(VERSION) {
                return Err(JournalError::Foreign { path: path.to_owned(), found: version });
            }
            previous.input = record.get("input").and_then(Value::as_str).map(str::to_owned);
        } else if let Some(identity) = record.get("start").and_then(Value::as_str) {
            *previous.starts.entry(identity.to_owned()).or_default() += 1;
        } else if let (Some(identity), Some(result)) = (record.get("finish").and_then(Value::as_str), record.get("result")) {
            previous.finished.insert(identity.to_owned(), result.clone());
        } else {
            return Err(JournalError::Damaged { path: path.to_owned(), line: line_no });
        }
        good_len = text.len() - rest.len();
    }
    Ok((previous, good_len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (mut journal, previous) = Journal::open(&path, "in.jsonl", false).unwrap();
            assert!(previous.finished.is_empty());
            journal.start("a#1", 1).unwrap();
            journal.finish("a#1", &json!({"status": "succeeded"})).unwrap();
            journal.start("b#1", 2).unwrap();
        }
        // psbridge died while writing the finish record of b#1.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"finish\": \"b#1\", \"res").unwrap();
        let (mut journal, previous) = Journal::open(&path, "in.jsonl", false).unwrap();
        assert_eq!(previous.finished["a#1"]["status"], "succeeded");
        assert_eq!((previous.starts["a#1"], previous.starts["b#1"]), (1, 1));
        assert!(!previous.finished.contains_key("b#1"));
        assert_eq!(previous.input.as_deref(), Some("in.jsonl"));
        journal.finish("b#1", &json!({"status": "failed"})).unwrap();
        drop(journal);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{text}");
        assert_eq!(Journal::open(&path, "in.jsonl", false).unwrap().1.finished.len(), 2);
    }

    #[test]
    fn a_second_batch_cannot_share_a_journal_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let held = Journal::open(&path, "x", false).unwrap();
        assert!(matches!(Journal::open(&path, "x", false), Err(JournalError::Locked { .. })));
        drop(held);
        std::fs::write(&path, "{\"psbridge_journal\": 1}\nnot json\n{\"start\": \"a#1\", \"line\": 1}\n").unwrap();
        assert!(matches!(Journal::open(&path, "x", false), Err(JournalError::Damaged { line: 2, .. })));
        let (_, previous) = Journal::open(&path, "x", true).unwrap();
        assert!(previous.starts.is_empty());
        // Anything else, even with --restart, is left alone.
        std::fs::write(&path, "Identity,Department\nu1,Sales\n").unwrap();
        assert!(matches!(Journal::open(&path, "x", true), Err(JournalError::Foreign { found: None, .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "Identity,Department\nu1,Sales\n");
    }
}
