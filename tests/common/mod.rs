//! Helpers shared by the integration tests. They run against the real pwsh.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::time::Duration;

use psbridge::{Command, Runspace, RunspaceBuilder};

/// The folder holding the simulated ExchangeOnlineManagement module: `scripts/sim` at the top of the
/// workspace (these helpers are also compiled into the command-line tool's tests, one crate further down).
pub fn sim_modules() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join("scripts").join("sim"))
        .find(|sim| sim.is_dir())
        .expect("scripts/sim above the package being tested")
}

/// A builder for a plain worker with test-friendly limits.
pub fn builder() -> RunspaceBuilder {
    Runspace::builder().start_timeout(Duration::from_secs(120)).stop_grace(Duration::from_secs(3))
}

/// A plain worker (no modules, no connect).
pub async fn plain() -> Runspace {
    builder().open().await.expect("a plain worker opens")
}

/// A worker connected to a fresh simulated tenant in `tenant`, with a managed identity (no secrets).
pub fn sim_builder(tenant: &std::path::Path) -> RunspaceBuilder {
    builder()
        .module_path(sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        // keep the session's tmpEXO_ folders (left behind by workers the tests kill) in the test's folder
        .connect(managed_identity_connect().param("EXOModuleBasePath", tenant.display().to_string()))
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false))
}

pub fn managed_identity_connect() -> Command {
    Command::new("Connect-ExchangeOnline")
        .param("ManagedIdentity", true)
        .param("Organization", "contoso.onmicrosoft.com")
        .param("ShowBanner", false)
}

/// Whether a process with this pid is still alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits up to `limit` for a process to be gone.
pub async fn gone_within(pid: u32, limit: Duration) -> bool {
    let end = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < end {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status readable");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|r| r.trim_start_matches(':').split_whitespace().next()))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}
