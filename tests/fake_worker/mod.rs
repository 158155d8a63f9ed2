//! The fake worker (`examples/fake_worker.rs`): psbridge's protocol without PowerShell, for the tests of
//! the bridge alone (timeouts, cancel, kills, crashes, protocol violations, pool retries and queues).
//! It starts in milliseconds where pwsh takes seconds.

use std::path::PathBuf;
use std::time::Duration;

use psbridge::{Runspace, RunspaceBuilder};

/// The fake worker's executable: `cargo test` builds the examples next to the test binaries.
pub fn path() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let path = deps.parent().unwrap().join("examples").join("fake_worker");
    assert!(
        path.exists(),
        "{} is missing: plain `cargo test` builds it; with --test, add `cargo build --example fake_worker` first",
        path.display()
    );
    path
}

/// A builder for fake workers, with the stop grace the real-pwsh tests use.
pub fn builder() -> RunspaceBuilder {
    Runspace::builder().pwsh(path()).assembly_cache(None).stop_grace(Duration::from_secs(3))
}
