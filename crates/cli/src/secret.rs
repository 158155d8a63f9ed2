//! Reading a secret from the source a profile names. Values go straight into a `SecretString`; no
//! message ever contains one, only where it was looked for.
//!
//! Environment variables, files and programs are read anew each time they are asked for (a rotated
//! file or a fresh token is picked up); standard input is read once and kept in memory.

mod program;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use psbridge::SecretString;

use crate::config::{SecretSpec, Source};
pub use program::ProgramError;

/// A secret that could not be read. Messages say where it was looked for and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret {name}: environment variable {variable} is not set (or empty); export it before running psbridge")]
    EnvMissing { name: String, variable: String },
    #[error("secret {name}: cannot read {}: {source}", path.display())]
    FileRead {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "secret {name}: {} may be read by other users (mode {mode:04o}); run `chmod 600 {}` (psbridge refuses secrets others can read, as ssh does with keys)",
        path.display(),
        path.display()
    )]
    FileTooOpen { name: String, path: PathBuf, mode: u32 },
    #[error("secret {name}: {} is empty", path.display())]
    FileEmpty { name: String, path: PathBuf },
    #[error("secret {name}: nothing was read from standard input; pipe the secret in, one line")]
    StdinEmpty { name: String },
    #[error("secret {name}: standard input is already used ({used_by}); read this secret from an environment variable or a file")]
    StdinTaken { name: String, used_by: String },
    #[error("secret {name}: cannot read standard input: {source}")]
    StdinRead {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {name}: {source}")]
    Program {
        name: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "secret {name}: a command source is run at each connect, not for a command made once (the disconnect command); \
         give this secret from env, file or stdin"
    )]
    ProgramNotHere { name: String },
}

/// Where a secret comes from, in words (for doctor and messages): `environment variable EXO_TOKEN`,
/// `file /run/secrets/tok`, `command az`, `standard input`.
pub fn describe(spec: &SecretSpec) -> String {
    match spec.source() {
        Source::Env(variable) => format!("environment variable {variable}"),
        Source::File(path) => format!("file {}", path.display()),
        Source::Command(program) => format!("command {}", program.argv[0]),
        Source::Stdin => "standard input".to_owned(),
    }
}

/// Reads the secret for parameter `name` anew from its environment variable, file or program; a secret
/// from standard input is `stdin`, the value read once at start-up.
pub async fn read_fresh(name: &str, spec: &SecretSpec, stdin: Option<&SecretString>) -> Result<SecretString, SecretError> {
    match spec.source() {
        Source::Env(variable) => read_env(name, variable),
        Source::File(path) => read_file(name, path),
        Source::Command(program) => program::run(&program).await.map_err(|source| SecretError::Program { name: name.to_owned(), source }),
        Source::Stdin => match stdin {
            Some(secret) => Ok(secret.clone()),
            None => Err(SecretError::StdinEmpty { name: name.to_owned() }),
        },
    }
}

fn read_env(name: &str, variable: &str) -> Result<SecretString, SecretError> {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => Ok(SecretString::from(value)),
        _ => Err(SecretError::EnvMissing { name: name.to_owned(), variable: variable.to_owned() }),
    }
}

/// Reads secrets, keeping track of standard input: only one secret may come from it, and it is read
/// once however often it is asked for.
#[derive(Debug, Default)]
pub struct SecretReader {
    stdin_used_by: Option<String>,
    from_stdin: Option<(String, SecretString)>,
}

impl SecretReader {
    /// A reader for which standard input is already taken by `user` (for example batch input `-`).
    pub fn with_stdin_taken(user: Option<String>) -> Self {
        SecretReader { stdin_used_by: user, from_stdin: None }
    }

    /// Checks at start-up that the secret for parameter `name` can be had, so that a missing variable or
    /// an unreadable file stops psbridge before anything starts: environment variables and files are
    /// read (and the value dropped), standard input is read and kept ([`stdin_value`](Self::stdin_value)),
    /// and a program must be found. Programs run only when a worker connects.
    pub fn check(&mut self, name: &str, spec: &SecretSpec) -> Result<(), SecretError> {
        match spec.source() {
            Source::Command(program) => program::find(&program).map_err(|source| SecretError::Program { name: name.to_owned(), source }),
            _ => self.read(name, spec).map(drop),
        }
    }

    /// Reads the secret for parameter `name` from its environment variable, file or standard input
    /// (read once); a program is not run here ([`SecretError::ProgramNotHere`]): use [`read_fresh`].
    pub fn read(&mut self, name: &str, spec: &SecretSpec) -> Result<SecretString, SecretError> {
        match spec.source() {
            Source::Env(variable) => read_env(name, variable),
            Source::File(path) => read_file(name, path),
            Source::Command(_) => Err(SecretError::ProgramNotHere { name: name.to_owned() }),
            Source::Stdin => self.stdin(name),
        }
    }

    /// Reads the secret for parameter `name` from any source, running a program if it names one.
    pub async fn read_any(&mut self, name: &str, spec: &SecretSpec) -> Result<SecretString, SecretError> {
        match spec.source() {
            Source::Stdin => self.stdin(name),
            _ => read_fresh(name, spec, None).await,
        }
    }

    /// The value standard input gave for parameter `name`, if it was read.
    pub fn stdin_value(&self, name: &str) -> Option<&SecretString> {
        self.from_stdin.as_ref().filter(|(read_for, _)| read_for == name).map(|(_, secret)| secret)
    }

    fn stdin(&mut self, name: &str) -> Result<SecretString, SecretError> {
        if let Some(secret) = self.stdin_value(name) {
            return Ok(secret.clone());
        }
        if let Some(used_by) = &self.stdin_used_by {
            return Err(SecretError::StdinTaken { name: name.to_owned(), used_by: used_by.clone() });
        }
        self.stdin_used_by = Some(format!("secret {name}"));
        let secret = read_stdin(name)?;
        self.from_stdin = Some((name.to_owned(), secret.clone()));
        Ok(secret)
    }
}

fn read_file(name: &str, path: &Path) -> Result<SecretString, SecretError> {
    let file_error = |source| SecretError::FileRead { name: name.to_owned(), path: path.to_owned(), source };
    let metadata = std::fs::metadata(path).map_err(file_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretError::FileTooOpen { name: name.to_owned(), path: path.to_owned(), mode });
        }
    }
    #[cfg(not(unix))]
    let _ = metadata; // Windows: access is governed by ACLs, which are not checked here.
    let mut text = std::fs::read_to_string(path).map_err(file_error)?;
    strip_line_break(&mut text);
    if text.is_empty() {
        return Err(SecretError::FileEmpty { name: name.to_owned(), path: path.to_owned() });
    }
    Ok(SecretString::from(text))
}

fn read_stdin(name: &str) -> Result<SecretString, SecretError> {
    let stdin = std::io::stdin();
    let on_terminal = stdin.is_terminal();
    if on_terminal {
        eprint!("{name}: ");
        let _ = std::io::stderr().flush();
    }
    let _echo = on_terminal.then(EchoOff::new).flatten();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if on_terminal {
        eprintln!();
    }
    read.map_err(|source| SecretError::StdinRead { name: name.to_owned(), source })?;
    strip_line_break(&mut line);
    if line.is_empty() {
        return Err(SecretError::StdinEmpty { name: name.to_owned() });
    }
    Ok(SecretString::from(line))
}

fn strip_line_break(text: &mut String) {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
}

/// Turns terminal echo off while a secret is typed, and back on when dropped.
struct EchoOff {
    #[cfg(unix)]
    saved: nix::sys::termios::Termios,
}

impl EchoOff {
    #[cfg(unix)]
    fn new() -> Option<EchoOff> {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).ok()?;
        Some(EchoOff { saved })
    }

    #[cfg(not(unix))]
    fn new() -> Option<EchoOff> {
        None
    }
}

#[cfg(unix)]
impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;
    use std::os::unix::fs::PermissionsExt;

    fn file_spec(path: &Path) -> SecretSpec {
        SecretSpec { file: Some(path.to_owned()), ..SecretSpec::default() }
    }

    #[test]
    fn a_file_others_can_read_is_refused_and_a_private_one_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = SecretReader::default().read("CertificatePassword", &file_spec(&path)).unwrap_err().to_string();
        assert!(error.contains("chmod 600") && error.contains("0644") && !error.contains("s3cret"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = SecretReader::default().read("CertificatePassword", &file_spec(&path)).unwrap();
        assert_eq!(secret.expose_secret(), "s3cret");
    }

    #[test]
    fn stdin_can_be_read_only_once() {
        let spec = SecretSpec { stdin: Some(true), ..SecretSpec::default() };
        let mut reader = SecretReader::with_stdin_taken(Some("the batch input".into()));
        let error = reader.read("AccessToken", &spec).unwrap_err().to_string();
        assert!(error.contains("the batch input"), "{error}");
    }
}
