//! Where batch results go: standard output, line by line as items finish, or a file that appears whole
//! when the batch ends (written as `FILE.partial` until then, so a reader never sees half a file).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The results' destination.
pub enum ResultSink {
    Stdout(io::Stdout),
    File { partial: PathBuf, target: PathBuf, writer: BufWriter<File> },
}

impl ResultSink {
    /// Standard output when `path` is `None`, else `path` (through `path.partial`).
    pub fn open(path: Option<&Path>) -> Result<ResultSink, String> {
        let Some(target) = path else { return Ok(ResultSink::Stdout(io::stdout())) };
        if target.file_name().is_none() {
            return Err(format!("--output {} is not a file name", target.display()));
        }
        let partial = super::with_suffix(target, ".partial");
        let file = File::create(&partial).map_err(|e| format!("cannot create {}: {e}", partial.display()))?;
        Ok(ResultSink::File { partial, target: target.to_owned(), writer: BufWriter::new(file) })
    }

    /// Writes one result line (flushed at once on standard output, for pipelines reading along).
    pub fn write(&mut self, record: &Value) -> io::Result<()> {
        match self {
            ResultSink::Stdout(out) => {
                let mut out = out.lock();
                serde_json::to_writer(&mut out, record)?;
                out.write_all(b"\n")?;
                out.flush()
            }
            ResultSink::File { writer, .. } => {
                serde_json::to_writer(&mut *writer, record)?;
                writer.write_all(b"\n")
            }
        }
    }

    /// Puts the file in place (synced first, then renamed over the target).
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            ResultSink::Stdout(out) => out.flush(),
            ResultSink::File { partial, target, writer } => {
                writer.flush()?;
                writer.get_ref().sync_all()?;
                std::fs::rename(partial, target)
            }
        }
    }
}
