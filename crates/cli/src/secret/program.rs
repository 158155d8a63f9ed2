//! A secret from a program's standard output: `{ command = ["az", "account", "get-access-token", ...] }`.
//!
//! The program is started directly (argv, no shell) with stdin null, in a process group of its own so
//! that a timeout ends whatever it started too. Its trimmed standard output is the secret (or one
//! top-level string field of it, with `json_field`), and never appears in a message: a failure names
//! the program, its exit status and the tail of its standard error.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use psbridge::SecretString;
use tokio::io::{AsyncRead, AsyncReadExt};
use zeroize::Zeroize;

use crate::config::Program;

/// Most of a program's standard output read: a token or a base64 certificate is far smaller.
const MAX_OUTPUT: usize = 1 << 20;
/// Most lines of the program's standard error shown in a message.
const STDERR_TAIL_LINES: usize = 20;
/// Most bytes of the program's standard error shown in a message.
const STDERR_TAIL_BYTES: usize = 4096;

/// A program that did not give a secret. The message never holds its standard output.
#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error("command {program} was not found: {source}; install it, or give its full path as the first element of command = [...]")]
    NotFound {
        program: String,
        #[source]
        source: which::Error,
    },
    #[error("command {program} could not be started: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command {program} failed ({status}); run it yourself to see why{}", tail(stderr))]
    Failed { program: String, status: ExitStatus, stderr: String },
    #[error(
        "command {program} did not finish within {} s and was killed (set timeout_secs to allow longer){}",
        timeout.as_secs_f64(),
        tail(stderr)
    )]
    TimedOut { program: String, timeout: Duration, stderr: String },
    #[error("command {program} printed nothing on standard output ({status}){}", tail(stderr))]
    Empty { program: String, status: ExitStatus, stderr: String },
    #[error("command {program} printed more than {} bytes on standard output; a secret is far shorter", MAX_OUTPUT)]
    TooLong { program: String },
    #[error("command {program} printed something that is not a JSON object, and json_field = {field:?} needs one")]
    NotJson { program: String, field: String },
    #[error("command {program} printed a JSON object without a string field {field:?} (json_field); check the field's name and case")]
    MissingField { program: String, field: String },
    #[error("command {program}: cannot read its output: {source}")]
    Read {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

/// `; stderr tail:\n  ...` or `; stderr was empty`.
fn tail(stderr: &str) -> String {
    if stderr.trim().is_empty() { "; stderr was empty".to_owned() } else { format!("; stderr tail:\n  {}", stderr.trim_end().replace('\n', "\n  ")) }
}

/// Checks that the program can be found (on PATH, or at the path given), without running it.
pub fn find(program: &Program<'_>) -> Result<(), ProgramError> {
    let name = &program.argv[0];
    which::which(name).map(drop).map_err(|source| ProgramError::NotFound { program: name.clone(), source })
}

/// Runs the program and returns its trimmed standard output (or its `json_field`) as a secret.
///
/// # Cancel safety
/// Dropping the future kills the program's process group.
pub async fn run(program: &Program<'_>) -> Result<SecretString, ProgramError> {
    let name = program.argv[0].clone();
    let mut command = tokio::process::Command::new(&program.argv[0]);
    command.args(&program.argv[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command.spawn().map_err(|source| ProgramError::Start { program: name.clone(), source })?;
    let group = KillGroup(child.id());
    let stdout = child.stdout.take().expect("stdout is piped");
    // Standard error is read on its own, so that its tail is there even when the program is killed.
    let stderr = tokio::spawn(read_tail(child.stderr.take().expect("stderr is piped")));
    tracing::debug!(program = %name, pid = ?child.id(), "running a secret's command");
    let finished = tokio::time::timeout(program.timeout, async { tokio::join!(child.wait(), read_bounded(stdout)) }).await;
    let Ok((status, stdout)) = finished else {
        // The whole group goes, so that nothing the program started keeps running or holds a pipe open;
        // then the program itself is reaped.
        drop(group);
        let _ = child.kill().await;
        let stderr = tokio::time::timeout(Duration::from_secs(1), stderr).await.ok().and_then(Result::ok).unwrap_or_default();
        return Err(ProgramError::TimedOut { program: name, timeout: program.timeout, stderr: stderr_tail(&stderr) });
    };
    group.disarm();
    // Something the program started may still hold standard error open: its tail is not worth a wait.
    let stderr = tokio::time::timeout(Duration::from_secs(1), stderr).await.ok().and_then(Result::ok).unwrap_or_default();
    let stderr = stderr_tail(&stderr);
    let status = status.map_err(|source| ProgramError::Read { program: name.clone(), source })?;
    let Some(mut stdout) = stdout.map_err(|source| ProgramError::Read { program: name.clone(), source })? else {
        return Err(ProgramError::TooLong { program: name });
    };
    if !status.success() {
        stdout.zeroize();
        return Err(ProgramError::Failed { program: name, status, stderr });
    }
    let secret = secret_from(&name, &stdout, program.json_field);
    stdout.zeroize();
    match secret? {
        Some(secret) => Ok(secret),
        None => Err(ProgramError::Empty { program: name, status, stderr }),
    }
}

/// The secret in the program's output: the trimmed text, or its JSON field; `None` when it is empty.
fn secret_from(program: &str, stdout: &[u8], json_field: Option<&str>) -> Result<Option<SecretString>, ProgramError> {
    let text = String::from_utf8_lossy(stdout);
    let value = match json_field {
        None => text.trim().to_owned(),
        Some(field) => {
            let not_json = || ProgramError::NotJson { program: program.to_owned(), field: field.to_owned() };
            let mut json: serde_json::Value = serde_json::from_str(text.trim()).map_err(|_| not_json())?;
            let object = json.as_object_mut().ok_or_else(not_json)?;
            match object.remove(field) {
                Some(serde_json::Value::String(value)) => value.trim().to_owned(),
                _ => return Err(ProgramError::MissingField { program: program.to_owned(), field: field.to_owned() }),
            }
        }
    };
    Ok((!value.is_empty()).then(|| SecretString::from(value)))
}

/// Reads all of `reader`, or `None` when it holds more than [`MAX_OUTPUT`] bytes (the rest is read and
/// dropped, so that the program is not left blocked on a full pipe).
async fn read_bounded(mut reader: impl AsyncRead + Unpin) -> std::io::Result<Option<Vec<u8>>> {
    let mut buffer = Vec::new();
    (&mut reader).take(MAX_OUTPUT as u64 + 1).read_to_end(&mut buffer).await?;
    if buffer.len() > MAX_OUTPUT {
        buffer.zeroize();
        tokio::io::copy(&mut reader, &mut tokio::io::sink()).await?;
        return Ok(None);
    }
    Ok(Some(buffer))
}

/// Reads all of `reader`, keeping only its last [`STDERR_TAIL_BYTES`] bytes (errors end the read).
async fn read_tail(mut reader: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n @ 1..) = reader.read(&mut chunk).await {
        kept.extend_from_slice(&chunk[..n]);
        if kept.len() > 2 * STDERR_TAIL_BYTES {
            kept.drain(..kept.len() - STDERR_TAIL_BYTES);
        }
    }
    kept
}

/// The last [`STDERR_TAIL_LINES`] lines of standard error, at most [`STDERR_TAIL_BYTES`] bytes.
fn stderr_tail(stderr: &[u8]) -> String {
    let start = stderr.len().saturating_sub(STDERR_TAIL_BYTES);
    let text = String::from_utf8_lossy(&stderr[start..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_TAIL_LINES)..].join("\n")
}

/// Kills the program's process group when dropped armed: on a timeout, or when the read is cancelled.
struct KillGroup(Option<u32>);

impl KillGroup {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroup {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.0.and_then(|pid| i32::try_from(pid).ok()) {
            // The program leads its own group (process_group(0)), and it is not reaped yet, so the id
            // still names that group and nothing else.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn sh(script: &str) -> Vec<String> {
        ["/bin/sh", "-c", script].map(str::to_owned).to_vec()
    }

    fn program<'a>(argv: &'a [String], json_field: Option<&'a str>, timeout: Duration) -> Program<'a> {
        Program { argv, json_field, timeout }
    }

    #[tokio::test]
    async fn the_trimmed_output_or_its_json_field_is_the_secret() {
        let argv = sh("echo '  tok-1  '");
        assert_eq!(run(&program(&argv, None, Duration::from_secs(20))).await.unwrap().expose_secret(), "tok-1");
        let argv = sh(r#"echo '{"accessToken": "tok-2", "expiresOn": "x"}'"#);
        assert_eq!(run(&program(&argv, Some("accessToken"), Duration::from_secs(20))).await.unwrap().expose_secret(), "tok-2");
        let error = run(&program(&argv, Some("access_token"), Duration::from_secs(20))).await.unwrap_err().to_string();
        assert!(error.contains("without a string field \"access_token\"") && !error.contains("tok-2"), "{error}");
        let argv = sh("true");
        let error = run(&program(&argv, None, Duration::from_secs(20))).await.unwrap_err().to_string();
        assert!(error.contains("printed nothing"), "{error}");
    }

    #[tokio::test]
    async fn a_failure_shows_the_status_and_the_stderr_tail_never_the_output() {
        let argv = sh("echo Fake-Secret-On-Stdout; for i in $(seq 1 30); do echo \"line $i\" >&2; done; exit 3");
        let error = run(&program(&argv, None, Duration::from_secs(20))).await.unwrap_err().to_string();
        assert!(error.contains("command /bin/sh failed (exit status: 3)") && error.contains("line 30"), "{error}");
        assert!(!error.contains("line 10\n"), "only the last 20 lines: {error}");
        assert!(!error.contains("Fake-Secret-On-Stdout"), "{error}");
    }

    #[tokio::test]
    async fn a_program_that_hangs_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let argv = sh(&format!("sleep 600 & echo $! > {}; echo waiting >&2; wait", pid_file.display()));
        let error = run(&program(&argv, None, Duration::from_millis(1500))).await.unwrap_err().to_string();
        assert!(error.contains("did not finish within 1.5 s and was killed") && error.contains("waiting"), "{error}");
        let child: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        // The grandchild was in the program's group: it goes too (a zombie until its new parent reaps it).
        let gone = || {
            let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
            stat.is_empty() || stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z')
        };
        for _ in 0..100 {
            if gone() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(gone(), "the program's child {child} still runs");
    }
}
