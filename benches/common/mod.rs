//! The simulated-tenant worker both benchmarks open.

use std::path::{Path, PathBuf};

use psbridge::{Command, Runspace, RunspaceBuilder};

/// The folder holding the simulated ExchangeOnlineManagement module.
pub fn sim_modules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join("sim")
}

/// A worker connected to the simulated tenant in `tenant`, each cmdlet delayed by `latency_ms`.
pub fn sim_workers(tenant: &Path, latency_ms: u32) -> RunspaceBuilder {
    Runspace::builder()
        .module_path(sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        .env("EXO_SIM_LATENCY_MS", latency_ms.to_string())
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("ManagedIdentity", true)
                .param("Organization", "contoso.onmicrosoft.com")
                .param("ShowBanner", false),
        )
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false))
}
