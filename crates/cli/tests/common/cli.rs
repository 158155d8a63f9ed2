//! Running the `psbridge` binary against the simulated module, with a private configuration, data folder
//! and tenant.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A private world for one test: `config.toml` (profile `sim`), a data folder and a tenant.
pub struct CliEnv {
    pub dir: tempfile::TempDir,
    /// More keys of the `sim` profile.
    sim_keys: String,
}

impl CliEnv {
    /// A world whose config file holds the `sim` profile followed by `extra` TOML.
    pub fn new(extra: &str) -> CliEnv {
        CliEnv::with_sim_keys("", extra)
    }

    /// A world whose `sim` profile has these keys too (`allow = [...]`), followed by `extra` TOML.
    pub fn with_sim_keys(sim_keys: &str, extra: &str) -> CliEnv {
        let env = CliEnv { dir: tempfile::tempdir().unwrap(), sim_keys: sim_keys.to_owned() };
        env.write_config(extra);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn tenant(&self) -> PathBuf {
        self.path("tenant")
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Rewrites the config file: profile `sim` (the repository's simulated module, a managed identity
    /// connect, fast retries), then `extra`.
    pub fn write_config(&self, extra: &str) {
        let tenant = self.tenant();
        let text = format!(
            r#"
default_profile = "sim"

[profiles.sim]
module_path = ['{modules}']
modules = ["ExchangeOnlineManagement"]
workers = 3
start_timeout_secs = 120
env = {{ EXO_SIM_TENANT = '{tenant}' }}
{sim_keys}

[profiles.sim.connect]
command = "Connect-ExchangeOnline"
parameters = {{ ManagedIdentity = true, Organization = "contoso.onmicrosoft.com", ShowBanner = false, EXOModuleBasePath = '{tenant}' }}

[profiles.sim.disconnect]
command = "Disconnect-ExchangeOnline"
parameters = {{ Confirm = false }}

[profiles.sim.retry]
max_attempts = 6
base_delay_ms = 10
max_delay_ms = 50

{extra}
"#,
            modules = super::sim_modules().display(),
            tenant = tenant.display(),
            sim_keys = self.sim_keys,
        );
        std::fs::write(self.config(), text).unwrap();
    }

    /// `psbridge` with this world's configuration, data folder and tenant.
    pub fn psbridge(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_psbridge"));
        cmd.env("PSBRIDGE_CONFIG", self.config())
            .env_remove("PSBRIDGE_PROFILE")
            .env("XDG_CONFIG_HOME", self.path("config-home"))
            .env("XDG_DATA_HOME", self.path("data"))
            .env("EXO_SIM_TENANT", self.tenant());
        cmd
    }

    /// Runs psbridge with `args` and returns what it did.
    pub fn run(&self, args: &[&str]) -> Output {
        self.psbridge().args(args).output().unwrap()
    }

    /// A password-protected PFX valid for `days` (negative: already expired), made in this world's folder
    /// by the simulation's New-SimCertificate.ps1 (the password goes through a file, removed again).
    pub fn certificate(&self, password: &str, days: i32) -> PathBuf {
        let pfx = self.path(&format!("app{days}.pfx"));
        let password_file = self.path("pfx-password.txt");
        std::fs::write(&password_file, password).unwrap();
        let made = std::process::Command::new(psbridge::find_pwsh(None).expect("pwsh"))
            .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"])
            .arg(super::sim_modules().join("New-SimCertificate.ps1"))
            .arg("-Path")
            .arg(&pfx)
            .arg("-PasswordFile")
            .arg(&password_file)
            .arg("-ExpiresInDays")
            .arg(days.to_string())
            .output()
            .unwrap();
        assert!(made.status.success(), "{}", text(&made.stderr));
        std::fs::remove_file(password_file).unwrap();
        pfx
    }

    /// Every mailbox name in the tenant (through `psbridge run`).
    pub fn mailbox_names(&self) -> Vec<String> {
        let output = self.run(&["run", "Get-Mailbox", "--params", r#"{"ResultSize": "Unlimited"}"#, "--select", "Name", "--format", "jsonl"]);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        text(&output.stdout).lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["Name"].as_str().unwrap().to_owned()).collect()
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Parses a JSONL file or text.
pub fn jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a JSON line ({e}): {l}"))).collect()
}

/// A file's text (panics with its name when missing).
pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A psbridge started in the background, its stderr read line by line as it comes.
pub struct Running {
    pub child: Child,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
    stdout: Option<JoinHandle<Vec<u8>>>,
}

impl Running {
    pub fn start(mut command: std::process::Command, stdout: Stdio) -> Running {
        let mut child = command.stdout(stdout).stderr(Stdio::piped()).spawn().unwrap();
        let (lines, stderr) = mpsc::channel();
        let reader = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in reader.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let stdout = child.stdout.take().map(|mut out| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = out.read_to_end(&mut bytes);
                bytes
            })
        });
        Running { child, stderr, seen: Vec::new(), stdout }
    }

    /// Waits (up to two minutes) for a stderr line containing `marker`; returns what follows it.
    pub fn wait_for(&mut self, marker: &str) -> String {
        let end = Instant::now() + Duration::from_secs(120);
        while let Ok(line) = self.stderr.recv_timeout(end.saturating_duration_since(Instant::now())) {
            self.seen.push(line.clone());
            if let Some(at) = line.find(marker) {
                return line[at + marker.len()..].trim().to_owned();
            }
        }
        panic!("no {marker:?} on stderr; it said: {:?}", self.seen);
    }

    /// Everything it wrote on stderr so far (for failure messages).
    pub fn said(&mut self) -> String {
        self.seen.extend(self.stderr.try_iter());
        self.seen.join("\n")
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the exit (up to a minute); returns the status, stdout and all of stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
        let end = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < end, "psbridge did not exit; stderr: {:?}", self.seen);
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = self.stdout.take().map(|h| text(&h.join().unwrap())).unwrap_or_default();
        self.seen.extend(self.stderr.iter());
        (status, stdout, self.seen.join("\n"))
    }
}

/// After a batch of New-Mailbox items (names starting with `prefix`) survived a kill mid-run: only an item
/// that was in flight may have failed, and only because its mailbox was already made; such items count
/// both runs; the kill caught some; and every one of the `count` mailboxes exists exactly once.
pub fn assert_each_mailbox_made_once(env: &CliEnv, results: &[serde_json::Value], prefix: &str, count: usize, context: &str) {
    for r in results {
        if r["status"] != "succeeded" {
            assert_eq!(r["resumed_in_flight"], true, "{r}");
            assert!(r["errors"][0]["message"].as_str().unwrap().contains("is being used by another recipient"), "{r}");
        }
        if r["resumed_in_flight"] == true {
            assert!(r["attempts"].as_u64().unwrap() >= 2, "attempts count both runs: {r}");
        }
    }
    assert!(results.iter().any(|r| r["resumed_in_flight"] == true), "the kill caught items in flight: {context}");
    let names: Vec<String> = env.mailbox_names().into_iter().filter(|n| n.starts_with(prefix)).collect();
    assert_eq!(names.len(), count, "every mailbox exists");
    assert_eq!(names.iter().collect::<std::collections::BTreeSet<_>>().len(), count, "and exactly once");
}
