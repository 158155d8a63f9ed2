//! `--simulated`: the bundled simulated ExchangeOnlineManagement module and its sample tenant.
//!
//! This lives in the binary only. The library knows nothing of the simulation: the built-in `simulated`
//! profile is a module path, a module and a connect command, as a profile in the configuration file is.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::json;

use crate::config::{CommandSpec, ModuleEntry, ProfileSpec};

/// The module's files (path below the module folder, content), embedded so that the binary works
/// wherever it is installed. build.rs lists them.
const MODULE_FILES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/sim_module_files.rs"));

/// The simulated tenant's organization.
const ORGANIZATION: &str = "contoso.onmicrosoft.com";

/// The built-in `simulated` profile: the embedded module, connected to the sample tenant with a managed
/// identity (no credentials).
pub fn profile() -> anyhow::Result<ProfileSpec> {
    let data = dirs::data_dir()
        .context("no per-user data folder on this system (set HOME or XDG_DATA_HOME)")?
        .join("psbridge");
    let modules = install_module(&data.join("sim-module"))?;
    let tenant = match std::env::var_os("EXO_SIM_TENANT").filter(|v| !v.is_empty()) {
        Some(tenant) => PathBuf::from(tenant),
        None => data.join("sim-tenant"),
    };
    let command = |name: &str, parameters: serde_json::Value| CommandSpec {
        command: name.to_owned(),
        parameters: parameters.as_object().cloned().unwrap_or_default(),
        secrets: Default::default(),
    };
    Ok(ProfileSpec {
        module_path: vec![modules],
        modules: vec![ModuleEntry::Name("ExchangeOnlineManagement".to_owned())],
        env: [("EXO_SIM_TENANT".to_owned(), tenant.to_string_lossy().into_owned())].into(),
        connect: Some(command(
            "Connect-ExchangeOnline",
            json!({ "ManagedIdentity": true, "Organization": ORGANIZATION, "ShowBanner": false }),
        )),
        disconnect: Some(command("Disconnect-ExchangeOnline", json!({ "Confirm": false }))),
        ..ProfileSpec::default()
    })
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

/// A stable name for this build's module content: the start of a SHA-256 over the files' names and texts.
fn content_hash() -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for (name, text) in MODULE_FILES {
        hash.update(name.as_bytes());
        hash.update([0]);
        hash.update(text.as_bytes());
        hash.update([0]);
    }
    hash.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}
