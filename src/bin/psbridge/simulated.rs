//! `--simulated`: the bundled simulated ExchangeOnlineManagement module and its sample tenant.
//!
//! This lives in the binary only. The library knows nothing of the simulation: `--simulated` is just a
//! runspace builder with a module path, a module and a connect command, as a real profile would be.

use std::path::{Path, PathBuf};

use anyhow::Context;
use psbridge::{Command, Runspace, RunspaceBuilder};

/// The module's files (path below the module folder, content), embedded so that the binary works
/// wherever it is installed. build.rs lists them.
const MODULE_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/sim_module_files.rs"));

/// The simulated tenant's organization.
const ORGANIZATION: &str = "contoso.onmicrosoft.com";

/// A runspace builder connected to the simulated tenant with a managed identity (no credentials).
pub fn builder() -> anyhow::Result<RunspaceBuilder> {
    let data = dirs::data_dir()
        .context("no per-user data folder on this system (set HOME or XDG_DATA_HOME)")?
        .join("psbridge");
    let modules = install_module(&data.join("sim-module"))?;
    let tenant = match std::env::var_os("EXO_SIM_TENANT").filter(|v| !v.is_empty()) {
        Some(tenant) => PathBuf::from(tenant),
        None => data.join("sim-tenant"),
    };
    Ok(Runspace::builder()
        .module_path(modules)
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("ManagedIdentity", true)
                .param("Organization", ORGANIZATION)
                .param("ShowBanner", false),
        )
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false)))
}

/// Writes the module under `root/<content hash>/ExchangeOnlineManagement` unless it is there already, and
/// returns the folder to put on PSModulePath. A folder is only ever renamed into place whole.
fn install_module(root: &Path) -> anyhow::Result<PathBuf> {
    let folder = root.join(content_hash());
    if folder.join("ExchangeOnlineManagement").is_dir() {
        return Ok(folder);
    }
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let staging = tempfile::tempdir_in(root).with_context(|| format!("cannot write to {}", root.display()))?;
    let module = staging.path().join("ExchangeOnlineManagement");
    std::fs::create_dir(&module)?;
    for (name, text) in MODULE_FILES {
        let path = module.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let staged = staging.keep();
    if let Err(error) = std::fs::rename(&staged, &folder) {
        // Another psbridge installed the same content meanwhile: use theirs.
        let _ = std::fs::remove_dir_all(&staged);
        if !folder.join("ExchangeOnlineManagement").is_dir() {
            return Err(error).with_context(|| format!("cannot install the simulated module in {}", folder.display()));
        }
    }
    Ok(folder)
}

/// A stable name for this build's module content (FNV-1a over the files).
fn content_hash() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, text) in MODULE_FILES {
        for byte in name.bytes().chain(text.bytes()) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}
