//! Finding the `pwsh` executable.

use std::path::{Path, PathBuf};

use crate::errors::{Error, Result};

/// The environment variable that names the pwsh executable when the builder does not.
pub const PWSH_ENV: &str = "PSBRIDGE_PWSH";

/// Finds pwsh: the configured path, else `PSBRIDGE_PWSH`, else `pwsh` on `PATH`, else
/// `~/.dotnet/tools/pwsh` (where `dotnet tool install --global PowerShell` puts it, often not on the
/// `PATH` of non-login shells and CI steps).
///
/// A configured path or `PSBRIDGE_PWSH` that does not exist is an error of its own (no silent fall-back
/// to another pwsh); the error names every place that was searched.
///
/// ```no_run
/// let pwsh = psbridge::find_pwsh(None)?;
/// println!("using {}", pwsh.display());
/// # Ok::<(), psbridge::Error>(())
/// ```
pub fn find_pwsh(configured: Option<&Path>) -> Result<PathBuf> {
    let env = std::env::var_os(PWSH_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    let explicit = configured.map(|p| (p.to_path_buf(), "configured path")).or(env.map(|p| (p, PWSH_ENV)));
    if let Some((path, source)) = explicit {
        return match which::which(&path) {
            Ok(found) => Ok(found),
            Err(_) => Err(Error::PwshNotFound { searched: vec![format!("{source} {}", path.display())] }),
        };
    }
    let mut searched = vec![format!("{PWSH_ENV} (not set)")];
    match which::which("pwsh") {
        Ok(found) => return Ok(found),
        Err(_) => searched.push(format!("PATH ({})", std::env::var("PATH").unwrap_or_default())),
    }
    // dotnet global tools are a common install that is not on PATH in non-login shells.
    if let Some(home) = dirs::home_dir() {
        let tool = home.join(".dotnet").join("tools").join(if cfg!(windows) { "pwsh.exe" } else { "pwsh" });
        if tool.is_file() {
            return Ok(tool);
        }
        searched.push(tool.display().to_string());
    }
    Err(Error::PwshNotFound { searched })
}
