//! Opt-in: psbridge against the REAL ExchangeOnlineManagement 3.9.0 and a local stand-in for the Exchange
//! service (`shared/tools/exo-fake`). Runs only when `PSBRIDGE_REAL_EXO_MODULES` names the folder that holds
//! the real module and the stand-in answers on https://127.0.0.1:443; otherwise each test prints one line
//! saying it was skipped and why. CI has neither: the module is never committed (see the stand-in's README
//! for how to get it on your own machine).
//!
//! `PSBRIDGE_EXO_FAKE_STATE` names the stand-in's state folder (default `/tmp/exo-fake`, where its CA
//! bundle and request log are). The tests print the numbers the closing notes quote (connect time, a
//! 50-item batch's time, the time from a token's expiry to a clear failure): run with `--nocapture`.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::cli::{CliEnv, jsonl, read, text};
use serde_json::{Value, json};

/// Everything a test needs from the environment, or why it is skipped.
struct Real {
    modules: PathBuf,
    state: PathBuf,
}

impl Real {
    fn find(test: &str) -> Option<Real> {
        let skip = |why: &str| {
            // Straight to the stderr handle: libtest captures println!, and this line must show.
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "real_module::{test} skipped: {why}");
            None
        };
        let Some(modules) = std::env::var_os("PSBRIDGE_REAL_EXO_MODULES").map(PathBuf::from) else {
            return skip("PSBRIDGE_REAL_EXO_MODULES is not set (it names the folder holding the real ExchangeOnlineManagement)");
        };
        if !modules.join("ExchangeOnlineManagement").is_dir() {
            return skip(&format!("{} holds no ExchangeOnlineManagement folder", modules.display()));
        }
        let state = std::env::var_os("PSBRIDGE_EXO_FAKE_STATE").map_or_else(|| PathBuf::from("/tmp/exo-fake"), PathBuf::from);
        let real = Real { modules, state };
        if real.fake(&["/_fake/state"]).is_none() {
            return skip("the Exchange stand-in does not answer on https://127.0.0.1:443 (start shared/tools/exo-fake/server.py)");
        }
        real.fake(&["-X", "POST", "/_fake/reset"]);
        Some(real)
    }

    /// A request to the stand-in's control API (curl, which the stand-in's README uses too).
    fn fake(&self, args: &[&str]) -> Option<Value> {
        let (path, rest) = args.split_last()?;
        let output = Command::new("curl").args(["-sk", "--max-time", "5"]).args(rest).arg(format!("https://127.0.0.1{path}")).output().ok()?;
        output.status.success().then(|| serde_json::from_slice(&output.stdout).ok()).flatten()
    }

    fn mode(&self, mode: Value) {
        self.fake(&["-X", "POST", "-H", "content-type: application/json", "-d", &mode.to_string(), "/_fake/mode"]).expect("the stand-in takes the mode");
    }

    /// A world whose `real` profile connects with an access token from `token_source` (TOML).
    fn env(&self, token_source: &str, extra: &str) -> CliEnv {
        CliEnv::new(&format!(
            r#"
[profiles.real]
module_path = ['{modules}']
modules = [{{ name = "ExchangeOnlineManagement", minimum_version = "3.4.0" }}]
env = {{ SSL_CERT_FILE = '{bundle}' }}
workers = 3
{extra}
[profiles.real.connect]
command = "Connect-ExchangeOnline"
parameters = {{ Organization = "contoso.onmicrosoft.com", ConnectionUri = "https://localhost", ShowBanner = false }}
secrets.AccessToken = {token_source}
[profiles.real.disconnect]
command = "Disconnect-ExchangeOnline"
parameters = {{ Confirm = false }}
"#,
            modules = self.modules.display(),
            bundle = self.state.join("ca-bundle.pem").display(),
        ))
    }

    /// Everything the stand-in logged: its request log (which marks a token seen outside the header).
    fn request_log(&self) -> String {
        std::fs::read_to_string(self.state.join("requests.jsonl")).unwrap_or_default()
    }
}

/// An unsigned JWT of the shape the real module accepts (it only parses it), valid for `lifetime`.
fn token(lifetime: Duration) -> String {
    use base64::Engine as _;
    let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let tid = "6a1c7b8e-0f5d-4c2a-9b3e-111111111111";
    let claims = json!({
        "aud": "https://outlook.office365.com", "iss": format!("https://sts.windows.net/{tid}/"), "iat": now, "nbf": now,
        "exp": now + lifetime.as_secs(), "tid": tid, "appid": "11111111-2222-3333-4444-555555555555",
        "roles": ["Exchange.ManageAsApp"], "ver": "1.0"
    });
    format!("{}.{}.c2lnbmF0dXJlLW5vdC1jaGVja2Vk", enc(json!({"typ": "JWT", "alg": "RS256"})), enc(claims))
}

fn run(env: &CliEnv, token: &str, args: &[&str]) -> Output {
    env.psbridge().env("EXO_TOKEN", token).args(["--profile", "real"]).args(args).output().unwrap()
}

/// Fails when `secret` appears in anything psbridge printed or wrote, or the stand-in saw it outside the
/// Authorization header.
fn assert_no_leak(real: &Real, env: &CliEnv, outputs: &[&Output], secret: &str) {
    for output in outputs {
        assert!(!text(&output.stdout).contains(secret) && !text(&output.stderr).contains(secret), "the token leaked into psbridge's output");
    }
    for entry in std::fs::read_dir(env.dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(!String::from_utf8_lossy(&bytes).contains(secret), "the token leaked into {}", path.display());
        }
    }
    assert!(!real.request_log().contains("TOKEN_OUTSIDE_AUTHORIZATION_HEADER"), "a request carried the token outside its header");
}

#[test]
fn connect_run_and_doctor() {
    let Some(real) = Real::find("connect_run_and_doctor") else { return };
    let env = real.env(r#"{ env = "EXO_TOKEN", as = "string" }"#, "");
    let token = token(Duration::from_secs(3600));
    let started = Instant::now();
    let get = run(&env, &token, &["run", "Get-EXOMailbox", "--params", r#"{"ResultSize": 2}"#, "--select", "Alias", "--format", "jsonl"]);
    let elapsed = started.elapsed();
    assert_eq!(get.status.code(), Some(0), "{}", text(&get.stderr));
    assert_eq!(jsonl(&text(&get.stdout)).len(), 2);
    println!("real_module: psbridge run Get-EXOMailbox (start, import, connect, command, disconnect): {elapsed:?}");
    let info = run(&env, &token, &["run", "Get-ConnectionInformation", "--format", "jsonl", "--select", "State,TokenStatus,UserPrincipalName"]);
    assert_eq!(info.status.code(), Some(0), "{}", text(&info.stderr));
    let info = jsonl(&text(&info.stdout));
    assert_eq!(info.len(), 1, "one connection per worker: {info:?}");
    assert_eq!(info[0]["State"], "Connected");
    assert_eq!(info[0]["UserPrincipalName"], "OAuthUser@contoso.onmicrosoft.com");
    let doctor = run(&env, &token, &["doctor"]);
    assert_eq!(doctor.status.code(), Some(0), "{}{}", text(&doctor.stdout), text(&doctor.stderr));
    let trace = env.psbridge().env("EXO_TOKEN", &token).env("RUST_LOG", "trace").args(["--profile", "real", "run", "Get-EXOMailbox", "--params", r#"{"ResultSize": 1}"#]).output().unwrap();
    assert_eq!(trace.status.code(), Some(0), "{}", text(&trace.stderr));
    assert_no_leak(&real, &env, &[&get, &doctor, &trace], &token);
}

#[test]
fn a_three_worker_batch_of_fifty_changes() {
    let Some(real) = Real::find("a_three_worker_batch_of_fifty_changes") else { return };
    let env = real.env(r#"{ env = "EXO_TOKEN", as = "string" }"#, "");
    let token = token(Duration::from_secs(3600));
    let mut rows = String::from("Identity,Office\n");
    for i in 0..50 {
        rows += &format!("ContosoUser{},Office {}\n", i % 20 + 1, i);
    }
    let input = env.path("changes.csv");
    std::fs::write(&input, rows).unwrap();
    let output = env.path("results.jsonl");
    let started = Instant::now();
    let batch = run(&env, &token, &["batch", "--command", "Set-Mailbox", "--key-column", "Identity", input.to_str().unwrap(), "-w", "3", "-o", output.to_str().unwrap()]);
    let elapsed = started.elapsed();
    assert_eq!(batch.status.code(), Some(0), "{}", text(&batch.stderr));
    let results = jsonl(&read(&output));
    assert_eq!(results.len(), 50);
    assert!(results.iter().all(|r| r["status"] == "succeeded"), "{results:?}");
    println!("real_module: 50 keyed Set-Mailbox on 3 workers, start to summary: {elapsed:?}");
    // The last change of each mailbox won (same-key order).
    let check = run(&env, &token, &["run", "Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#, "--select", "Office", "--format", "jsonl"]);
    assert_eq!(jsonl(&text(&check.stdout))[0]["Office"], "Office 40", "{}", text(&check.stderr));
    assert_no_leak(&real, &env, &[&batch, &check], &token);
}

#[test]
fn throttling_is_retried_by_the_module_and_succeeds() {
    let Some(real) = Real::find("throttling_is_retried_by_the_module_and_succeeds") else { return };
    let env = real.env(r#"{ env = "EXO_TOKEN", as = "string" }"#, "");
    let token = token(Duration::from_secs(3600));
    real.mode(json!({"throttle_next": 2, "retry_after": 1}));
    let get = run(&env, &token, &["run", "Get-EXOMailbox", "--params", r#"{"Identity": "ContosoUser3"}"#, "--envelope"]);
    real.fake(&["-X", "POST", "/_fake/reset"]);
    assert_eq!(get.status.code(), Some(0), "{}", text(&get.stderr));
    let envelope: Value = serde_json::from_slice(&get.stdout).unwrap();
    assert_eq!(envelope["output"][0]["Alias"], "ContosoUser3", "{envelope}");
    assert!(envelope["errors"].as_array().unwrap().is_empty(), "the module retried the 429s itself: {envelope}");
}

/// The stand-in's server.py, which also makes test tokens (`--make-token SECONDS`).
fn server_py() -> PathBuf {
    std::env::var_os("PSBRIDGE_EXO_FAKE_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/exo-fake"), PathBuf::from)
        .join("server.py")
}

/// A batch long enough to outlive a token of `lifetime` seconds renewed `margin` seconds early.
fn long_batch(env: &CliEnv, items: usize) -> (PathBuf, PathBuf) {
    let lines: Vec<String> =
        (0..items).map(|i| json!({"command": "Get-EXOMailbox", "parameters": {"Identity": format!("ContosoUser{}", i % 20 + 1)}}).to_string()).collect();
    let input = env.path("reads.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    (input, env.path("reads-out.jsonl"))
}

#[test]
fn a_token_that_expires_mid_batch_stops_it_within_seconds_with_the_expiry_named() {
    let Some(real) = Real::find("a_token_that_expires_mid_batch_stops_it_within_seconds_with_the_expiry_named") else { return };
    let env = real.env(r#"{ env = "EXO_TOKEN", as = "string" }"#, "token_refresh_margin_secs = 10");
    let lifetime = Duration::from_secs(40);
    let token = token(lifetime);
    let renew_at = Instant::now() + lifetime - Duration::from_secs(10);
    real.mode(json!({"latency_ms": 300}));
    let (input, output) = long_batch(&env, 900);
    let batch = run(&env, &token, &["batch", input.to_str().unwrap(), "-w", "3", "-o", output.to_str().unwrap()]);
    let stopped = Instant::now();
    real.mode(json!({"latency_ms": 0}));
    let stderr = text(&batch.stderr);
    assert_eq!(batch.status.code(), Some(3), "{stderr}");
    println!("real_module: from the token's renewal time (exp - margin) to the batch's exit 3: {:?}", stopped.saturating_duration_since(renew_at));
    let results = jsonl(&read(&output));
    assert_eq!(results.len(), 900, "one result per item");
    let not_run: Vec<&Value> = results.iter().filter(|r| r["status"] == "not_run").collect();
    assert!(!not_run.is_empty(), "the token ran out before the batch did");
    let why = not_run[0]["errors"][0]["message"].as_str().unwrap_or_default();
    // Inside the margin ("expires at ..., within token_refresh_margin_secs") or, on a later attempt, past it.
    let named = why.contains("token_refresh_margin_secs") || why.contains("expired at");
    assert!(why.contains("access token from environment variable EXO_TOKEN") && named, "{why}");
    let half_way: Vec<&Value> = results.iter().filter(|r| r["status"] != "succeeded" && r["status"] != "not_run").collect();
    assert!(half_way.is_empty(), "nothing failed half-way: {:?}", half_way.iter().map(|r| (&r["status"], &r["errors"][0]["message"])).collect::<Vec<_>>());
    assert_no_leak(&real, &env, &[&batch], &token);
}

#[test]
fn a_token_from_a_command_is_renewed_and_the_batch_finishes() {
    let Some(real) = Real::find("a_token_from_a_command_is_renewed_and_the_batch_finishes") else { return };
    let source = format!(r#"{{ command = ["python3", "{}", "--make-token", "40"], as = "string" }}"#, server_py().display());
    let env = real.env(&source, "token_refresh_margin_secs = 10");
    real.mode(json!({"latency_ms": 300}));
    let (input, output) = long_batch(&env, 900);
    let started = Instant::now();
    let batch = env.psbridge().args(["--profile", "real", "batch", input.to_str().unwrap(), "-w", "3", "-o", output.to_str().unwrap()]).output().unwrap();
    real.mode(json!({"latency_ms": 0}));
    assert_eq!(batch.status.code(), Some(0), "{}", text(&batch.stderr));
    let results = jsonl(&read(&output));
    assert!(results.iter().all(|r| r["status"] == "succeeded"), "every worker was replaced with a fresh token in time");
    println!("real_module: 900 reads on 3 workers with 40 s tokens renewed from a command: {:?}", started.elapsed());
    assert!(!real.request_log().contains("TOKEN_OUTSIDE_AUTHORIZATION_HEADER"));
}
