//! Where batch results go: standard output, line by line as items finish, or a file that appears whole
//! when the batch ends (written as `FILE.partial` until then, so a reader never sees half a file). The
//! file is created readable by its owner only, whatever the umask: results may hold personal data.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use super::record::ResultRecord;

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
        let cannot = |e: io::Error| format!("cannot create {}: {e}", partial.display());
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file: File = options.open(&partial).map_err(cannot)?;
        #[cfg(unix)]
        {
            // A stale FILE.partial from an earlier run keeps its mode when opened: set it.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(cannot)?;
        }
        Ok(ResultSink::File { partial, target: target.to_owned(), writer: BufWriter::new(file) })
    }

    /// Writes one result line (flushed at once on standard output, for pipelines reading along).
    pub fn write(&mut self, record: &ResultRecord) -> io::Result<()> {
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
