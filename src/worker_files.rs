//! The worker script, embedded in the library and written to a private folder when needed.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

const WORKER_SCRIPT: &str = include_str!("../scripts/worker/worker.ps1");

/// The worker host's C# sources, one file per concept, compiled together by `worker.ps1`.
pub(crate) const HOST_SOURCES: &[(&str, &str)] = &[
    ("Executor.cs", include_str!("../scripts/worker/host/Executor.cs")),
    ("Host.cs", include_str!("../scripts/worker/host/Host.cs")),
    ("Inbox.cs", include_str!("../scripts/worker/host/Inbox.cs")),
    ("Lanes.cs", include_str!("../scripts/worker/host/Lanes.cs")),
    ("Protocol.cs", include_str!("../scripts/worker/host/Protocol.cs")),
    ("Serializer.cs", include_str!("../scripts/worker/host/Serializer.cs")),
    ("Usings.cs", include_str!("../scripts/worker/host/Usings.cs")),
    ("Values.cs", include_str!("../scripts/worker/host/Values.cs")),
];

/// A private temporary folder holding `worker.ps1` and the host's sources in `host/`.
///
/// Written once and shared by every runspace alive at the same time; the folder is removed when the
/// last of them is gone.
#[derive(Debug)]
pub(crate) struct WorkerFiles {
    dir: tempfile::TempDir,
}

impl WorkerFiles {
    /// The shared copy, written now if no runspace holds one.
    pub(crate) fn shared() -> std::io::Result<Arc<WorkerFiles>> {
        static CURRENT: Mutex<Weak<WorkerFiles>> = Mutex::new(Weak::new());
        let mut current = CURRENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(files) = current.upgrade() {
            return Ok(files);
        }
        let files = Arc::new(Self::write()?);
        *current = Arc::downgrade(&files);
        Ok(files)
    }

    fn write() -> std::io::Result<WorkerFiles> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("psbridge-worker-");
        // Only the owner may read or replace the script pwsh is about to run.
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let dir = builder.tempdir()?;
        std::fs::write(dir.path().join("worker.ps1"), WORKER_SCRIPT)?;
        let host = dir.path().join("host");
        std::fs::create_dir(&host)?;
        for (name, text) in HOST_SOURCES {
            std::fs::write(host.join(name), text)?;
        }
        Ok(WorkerFiles { dir })
    }

    /// The script to pass to `pwsh -File`.
    pub(crate) fn script(&self) -> PathBuf {
        self.dir.path().join("worker.ps1")
    }

    #[cfg(test)]
    fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// The default folder for the compiled worker host: `<user cache dir>/psbridge`.
pub(crate) fn default_assembly_cache() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("psbridge"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_shared_while_alive_and_removed_after() {
        let a = WorkerFiles::shared().unwrap();
        let b = WorkerFiles::shared().unwrap();
        assert_eq!(a.dir(), b.dir());
        let dir = a.dir().to_path_buf();
        assert_eq!(std::fs::read_to_string(a.script()).unwrap(), WORKER_SCRIPT);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        }
        drop((a, b));
        assert!(!dir.exists());
    }

    #[test]
    fn every_host_source_is_embedded() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/worker/host");
        let mut on_disk: Vec<String> = std::fs::read_dir(folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".cs"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = HOST_SOURCES.iter().map(|(name, _)| *name).collect();
        assert_eq!(on_disk, embedded, "HOST_SOURCES lists scripts/worker/host/*.cs in order");
    }
}
