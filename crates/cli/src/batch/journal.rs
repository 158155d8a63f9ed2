//! The batch journal: an append-only JSONL file that records which input it belongs to (its path and a
//! SHA-256 of its bytes), each item when a worker begins it and when its result is known, so that a
//! re-run skips what finished and repeats, marked, what was running.
//!
//! Records are appended whole, one at a time (under a lock, from the worker that begins an item or from
//! the batch's own task), to a file opened for appending, so a crash of psbridge at any point (SIGKILL
//! included) leaves every earlier record intact and at worst a torn last line, which the next run drops.
//! The file is created readable by its owner only (results may hold personal data). The file is also synced to disk about once a second and at the end: after a power
//! loss, the records of the last second may be missing. An exclusive lock keeps two batches off one
//! journal.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};

use super::record::ResultRecord;

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
    pub finished: HashMap<String, ResultRecord>,
    /// How many times each item was begun by a worker, by identity.
    pub starts: HashMap<String, u32>,
    /// The input the journal was written for (the last one, after a `--resume` with another input).
    pub input: Option<String>,
    /// The SHA-256 of that input's bytes (none in journals of older psbridge versions).
    pub input_sha256: Option<String>,
}

impl Previous {
    /// Items begun and never finished.
    pub fn in_flight(&self) -> usize {
        self.starts.keys().filter(|identity| !self.finished.contains_key(*identity)).count()
    }
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
    /// Opens (creating it if needed, mode 0600) and locks the journal at `path`, reads what it holds
    /// unless `restart`, and drops a torn last line. A new journal records that it belongs to `input`,
    /// whose bytes hash to `sha256`.
    pub fn open(path: &Path, input: &str, sha256: &str, restart: bool) -> Result<(Journal, Previous), JournalError> {
        let io = |source| JournalError::Io { path: path.to_owned(), source };
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(path).map_err(io)?;
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
        #[cfg(unix)]
        {
            // A journal an older psbridge created may be readable by others.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
        let mut journal = Journal { file, path: path.to_owned(), last_sync: Instant::now() };
        if good_len == 0 {
            journal.append(&json!({ "psbridge_journal": VERSION, "input": input, "input_sha256": sha256 }))?;
        }
        Ok((journal, previous))
    }

    /// Records that the journal now belongs to another input (`--resume` with a changed input).
    pub fn belongs_to(&mut self, input: &str, sha256: &str) -> Result<(), JournalError> {
        self.append(&json!({ "input": input, "input_sha256": sha256 }))
    }

    /// Records that a worker begins an item. Call before it can run.
    pub fn start(&mut self, identity: &str, line: usize) -> Result<(), JournalError> {
        self.append(&json!({ "start": identity, "line": line }))
    }

    /// Records an item's result.
    pub fn finish(&mut self, identity: &str, result: &ResultRecord) -> Result<(), JournalError> {
        #[derive(Serialize)]
        struct Finish<'a> {
            finish: &'a str,
            result: &'a ResultRecord,
        }
        self.append(&Finish { finish: identity, result })?;
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

    fn append(&mut self, record: &impl Serialize) -> Result<(), JournalError> {
        // Written through a buffer rather than built as one string first (a result may be large); a crash
        // leaves the line whole or torn at the end, and records never interleave (one writer at a time).
        let io = |source| JournalError::Io { path: self.path.clone(), source };
        let mut out = BufWriter::with_capacity(64 * 1024, &mut *self.file);
        serde_json::to_writer(&mut out, record).map_err(|e| io(e.into()))?;
        out.write_all(b"\n").map_err(io)?;
        out.flush().map_err(io)
    }
}

/// A journal shared by the batch's task and the workers that begin items (see
/// [`RunspacePool::submit_with_start`](psbridge::RunspacePool::submit_with_start)), and the first failure
/// to write a start record, which the batch reports (and then stops taking items).
#[derive(Clone)]
pub struct SharedJournal {
    journal: Arc<Mutex<Journal>>,
    start_failure: Arc<Mutex<Option<JournalError>>>,
    path: PathBuf,
}

impl SharedJournal {
    pub fn new(journal: Journal) -> SharedJournal {
        let path = journal.path.clone();
        SharedJournal { journal: Arc::new(Mutex::new(journal)), start_failure: Arc::default(), path }
    }

    /// [`Journal::start`]; a failure is kept for [`take_start_failure`](Self::take_start_failure).
    pub fn start(&self, identity: &str, line: usize) {
        if let Err(error) = guard(&self.journal).start(identity, line) {
            guard(&self.start_failure).get_or_insert(error);
        }
    }

    pub fn take_start_failure(&self) -> Option<JournalError> {
        guard(&self.start_failure).take()
    }

    pub fn finish(&self, identity: &str, result: &ResultRecord) -> Result<(), JournalError> {
        guard(&self.journal).finish(identity, result)
    }

    pub fn sync(&self) -> Result<(), JournalError> {
        guard(&self.journal).sync()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn guard<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
            previous.input_sha256 = record.get("input_sha256").and_then(Value::as_str).map(str::to_owned);
        } else if let Some(identity) = record.get("start").and_then(Value::as_str) {
            *previous.starts.entry(identity.to_owned()).or_default() += 1;
        } else if let (Some(identity), Some(result)) = (record.get("finish").and_then(Value::as_str), record.get("result")) {
            let Ok(result) = serde_json::from_value::<ResultRecord>(result.clone()) else {
                return Err(JournalError::Damaged { path: path.to_owned(), line: line_no });
            };
            previous.finished.insert(identity.to_owned(), result);
        } else if let Some(sha256) = record.get("input_sha256").and_then(Value::as_str) {
            previous.input = record.get("input").and_then(Value::as_str).map(str::to_owned);
            previous.input_sha256 = Some(sha256.to_owned());
        } else {
            return Err(JournalError::Damaged { path: path.to_owned(), line: line_no });
        }
        good_len = text.len() - rest.len();
    }
    Ok((previous, good_len))
}

#[cfg(test)]
mod tests {
    use super::super::record::Status;
    use super::*;

    #[test]
    fn a_torn_last_line_is_dropped_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        {
            let (mut journal, previous) = Journal::open(&path, "in.jsonl", "abc", false).unwrap();
            assert!(previous.finished.is_empty());
            journal.start("a#1", 1).unwrap();
            journal.finish("a#1", &record(Status::Succeeded)).unwrap();
            journal.start("b#1", 2).unwrap();
        }
        // psbridge died while writing the finish record of b#1.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"finish\": \"b#1\", \"res").unwrap();
        let (mut journal, previous) = Journal::open(&path, "in.jsonl", "def", false).unwrap();
        assert_eq!(previous.finished["a#1"].status, Status::Succeeded);
        assert_eq!(previous.input_sha256.as_deref(), Some("abc"), "the journal keeps the input it was written for");
        assert_eq!((previous.starts["a#1"], previous.starts["b#1"]), (1, 1));
        assert!(!previous.finished.contains_key("b#1"));
        assert_eq!(previous.input.as_deref(), Some("in.jsonl"));
        journal.finish("b#1", &record(Status::Failed)).unwrap();
        journal.belongs_to("other.jsonl", "def").unwrap();
        drop(journal);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{text}");
        let (_, previous) = Journal::open(&path, "in.jsonl", "xyz", false).unwrap();
        assert_eq!(previous.finished.len(), 2);
        assert_eq!((previous.input.as_deref(), previous.input_sha256.as_deref()), (Some("other.jsonl"), Some("def")));
    }

    fn record(status: Status) -> ResultRecord {
        ResultRecord::new(1, "{}".into(), status)
    }

    #[cfg(unix)]
    #[test]
    fn the_journal_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        std::fs::write(&path, "").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Journal::open(&path, "x", "y", false).unwrap());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_second_batch_cannot_share_a_journal_and_damage_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let held = Journal::open(&path, "x", "", false).unwrap();
        assert!(matches!(Journal::open(&path, "x", "", false), Err(JournalError::Locked { .. })));
        drop(held);
        std::fs::write(&path, "{\"psbridge_journal\": 1}\nnot json\n{\"start\": \"a#1\", \"line\": 1}\n").unwrap();
        assert!(matches!(Journal::open(&path, "x", "", false), Err(JournalError::Damaged { line: 2, .. })));
        let (_, previous) = Journal::open(&path, "x", "", true).unwrap();
        assert!(previous.starts.is_empty());
        // Anything else, even with --restart, is left alone.
        std::fs::write(&path, "Identity,Department\nu1,Sales\n").unwrap();
        assert!(matches!(Journal::open(&path, "x", "", true), Err(JournalError::Foreign { found: None, .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "Identity,Department\nu1,Sales\n");
    }
}
