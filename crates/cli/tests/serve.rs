//! `psbridge serve` and its clients (`run --server`, `batch --server`, `server status`) through the real
//! binary, the real pwsh and the simulated module.
//!
//! Two servers do most of the work, each shared by several assertions: one on TCP with a token and a
//! 3 s connect (warmth across CI steps, health before and after, tokens, SIGKILL), and one on a unix
//! socket with an allowlist (concurrency, key order, refusals, metrics, the audit, the socket's mode and
//! peers, a resumed batch, SIGTERM).

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{CliEnv, Running, jsonl, text};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The token of the TCP server (a test value, not a secret).
const TOKEN: &str = "test-token-for-psbridge-serve";

/// A `psbridge serve` running in the background, its stderr read line by line.
struct Server {
    /// `None` once it has exited.
    running: Option<Running>,
    /// What clients give to --server.
    address: String,
}

impl Server {
    /// Starts `psbridge serve ARGS` and waits until it listens.
    fn start(env: &CliEnv, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut command = env.psbridge();
        command.arg("serve").args(args).envs(envs.iter().copied()).env("RUST_LOG", "warn").stdin(Stdio::null());
        let mut running = Running::start(command, Stdio::null());
        let address = running.wait_for("psbridge serve: listening on ");
        Server { running: Some(running), address }
    }

    fn running(&mut self) -> &mut Running {
        self.running.as_mut().expect("the server is running")
    }

    /// Waits (up to two minutes) for a stderr line containing `marker`; returns what follows it.
    fn wait_for(&mut self, marker: &str) -> String {
        self.running().wait_for(marker)
    }

    /// Everything it wrote on stderr so far (for failure messages).
    fn said(&mut self) -> String {
        self.running().said()
    }

    fn signal(&mut self, signal: Signal) {
        self.running().signal(signal);
    }

    /// Waits (up to a minute) for the server to exit; its status and everything it wrote on stderr.
    fn exit(&mut self) -> (Option<i32>, String) {
        let (status, _, stderr) = self.running.take().expect("the server is running").finish();
        (status.code(), stderr)
    }

    /// `GET path` (with the token on TCP).
    fn get(&self, path: &str) -> Reply {
        http(&self.address, "GET", path, &[("Authorization", &format!("Bearer {TOKEN}"))], b"")
    }

    /// The worker pids of every profile, from `GET /v1/status`.
    fn worker_pids(&self) -> Vec<u32> {
        let status = self.get("/v1/status").json();
        status["profiles"].as_array().unwrap().iter().flat_map(|p| p["workers"].as_array().unwrap().clone()).filter_map(|w| w["pid"].as_u64()).map(|p| p as u32).collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(running) = &mut self.running {
            let _ = running.child.kill();
            let _ = running.child.wait();
        }
    }
}

/// A raw HTTP reply.
struct Reply {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {} {}", self.status, text(&self.body)))
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// One HTTP/1.1 request over `address` (unix:PATH or tcp:HOST:PORT), read to its end (chunked bodies
/// decoded), so that status codes and headers can be checked without psbridge's own client.
fn http(address: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    let mut request = request.into_bytes();
    request.extend_from_slice(body);
    // The server may answer (and close) before it reads the body, say for an unknown profile: a write
    // that finds the connection closed still has the answer to read.
    let exchange = |stream: &mut dyn ReadWrite| {
        if let Err(error) = stream.write_all(&request) {
            assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
        }
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        answer
    };
    let answer = match address.strip_prefix("unix:") {
        Some(path) => exchange(&mut std::os::unix::net::UnixStream::connect(path).unwrap()),
        None => exchange(&mut std::net::TcpStream::connect(address.strip_prefix("tcp:").unwrap()).unwrap()),
    };
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").expect("a head");
    let head = text(&answer[..split]);
    let mut rest = answer[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut decoded = Vec::new();
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(text(&rest[..end]).trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[end + 2..end + 2 + size]);
            rest.drain(..end + 2 + size + 2);
        }
        rest = decoded;
    }
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Reply { status, head, body: rest }
}

/// Runs a client (`psbridge ARGS`) and times it.
fn client(env: &CliEnv, args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let output = env.psbridge().args(args).env("PSBRIDGE_TOKEN", TOKEN).stdin(Stdio::null()).output().unwrap();
    (output, started.elapsed())
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while common::alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    !common::alive(pid)
}

// ---- warmth across CI steps, health, tokens, SIGKILL -------------------------------------------------

/// Five `run --server` steps in a row reuse the server's one connected worker: with a 3 s connect, each
/// step is quicker than a connect, and the worker (its pid, its connection count) is the same one.
#[test]
fn ci_steps_share_one_connected_worker_and_a_killed_server_leaves_no_pwsh() {
    let env = CliEnv::new("");
    let mut server = Server::start(
        &env,
        &["--simulated", "--listen", "tcp:127.0.0.1:0", "--token-from", "env:PSBRIDGE_TOKEN"],
        &[("EXO_SIM_CONNECT_DELAY_MS", "3000"), ("PSBRIDGE_TOKEN", TOKEN)],
    );
    let address = server.address.clone();
    assert!(address.starts_with("tcp:127.0.0.1:"), "{address}");
    // Not healthy while the worker connects (3 s); then healthy.
    let early = server.get("/v1/health");
    assert_eq!(early.status, 503, "health before the workers are connected: {}", text(&early.body));
    // `server status --wait` is a CI job's step 0: it returns once the server is healthy.
    let (waited, _) = client(&env, &["server", "status", "--server", &address, "--token-from", "env:PSBRIDGE_TOKEN", "--wait", "120", "--json"]);
    assert_eq!(waited.status.code(), Some(0), "{}\nthe server said:\n{}", text(&waited.stderr), server.said());
    assert_eq!(serde_json::from_slice::<Value>(&waited.stdout).unwrap()["healthy"], true);
    assert_eq!(server.get("/v1/health").status, 200);

    // Tokens: none, a wrong one (both 401, exit 2, no secret in the message), the right one.
    let none = http(&address, "GET", "/v1/status", &[], b"");
    assert_eq!(none.status, 401);
    assert!(none.head.contains("www-authenticate: Bearer") || none.head.contains("WWW-Authenticate: Bearer"), "{}", none.head);
    let wrong = env.psbridge().args(["server", "status", "--server", &address, "--token-from", "env:WRONG"]).env("WRONG", "not-the-token").output().unwrap();
    assert_eq!(wrong.status.code(), Some(2), "{}", text(&wrong.stderr));
    let stderr = text(&wrong.stderr);
    assert!(stderr.contains("the bearer token is not one this server accepts") && !stderr.contains("not-the-token"), "{stderr}");
    let without = env.psbridge().args(["run", "--server", &address, "--simulated", "Get-Mailbox"]).output().unwrap();
    assert_eq!(without.status.code(), Some(2), "{}", text(&without.stderr));
    assert!(text(&without.stderr).contains("needs a bearer token"), "{}", text(&without.stderr));

    let before = server.worker_pids();
    assert_eq!(before.len(), 1, "one worker connected at launch");
    let step = ["run", "--server", &address, "--token-from", "env:PSBRIDGE_TOKEN", "--simulated", "Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#];
    for n in 1..=5 {
        let (output, took) = client(&env, &step);
        assert_eq!(output.status.code(), Some(0), "step {n}: {}", text(&output.stderr));
        let out: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(out[0]["Alias"], "ContosoUser1", "step {n}");
        assert!(took < Duration::from_secs(3), "step {n} took {took:?}: as long as a connect");
    }
    assert_eq!(server.worker_pids(), before, "the same worker served every step");
    // The simulation counts the connects of its process: one.
    let (output, _) = client(&env, &["run", "--server", &address, "--token-from", "env:PSBRIDGE_TOKEN", "--simulated", "Get-ConnectionInformation", "--select", "Id,State"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&output.stdout).unwrap(), json!([{"Id": 1, "State": "Connected"}]));
    let status = server.get("/v1/status").json();
    let profile = &status["profiles"][0];
    assert_eq!((profile["restarts"].as_u64(), profile["reconnects"].as_u64()), (Some(0), Some(0)), "{profile}");

    // SIGKILL of the server in the middle of a command: the client says so (exit 3) and its worker dies
    // with its owner.
    let worker = before[0];
    let mut running = env
        .psbridge()
        .args(["run", "--server", &address, "--token-from", "env:PSBRIDGE_TOKEN", "--simulated", "--script", "'started'; Start-Sleep 60"])
        .env("PSBRIDGE_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let end = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/status").json()["profiles"][0]["workers"][0]["state"] != "busy" {
        assert!(Instant::now() < end, "the command never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    server.signal(Signal::SIGKILL);
    let killed = wait_output(&mut running, Duration::from_secs(30));
    assert_eq!(killed.status.code(), Some(3), "{}", text(&killed.stderr));
    let stderr = text(&killed.stderr);
    assert!(stderr.contains(&format!("the psbridge server at {address}")) && stderr.contains("psbridge serve"), "{stderr}");
    assert!(gone_within(worker, Duration::from_secs(20)), "worker {worker} outlived the killed server");
    // And a server that is not there at all: exit 3, naming the address and how to start one.
    let (output, _) = client(&env, &step);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("cannot be reached"), "{}", text(&output.stderr));
}

/// Waits for a child started with piped output, up to `limit`.
fn wait_output(child: &mut Child, limit: Duration) -> Output {
    let end = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the client did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    child.stdout.take().map(|mut s| s.read_to_end(&mut stdout));
    child.stderr.take().map(|mut s| s.read_to_end(&mut stderr));
    Output { status: child.wait().unwrap(), stdout, stderr }
}

/// `--lazy` opens a pool on its first request; `--idle-timeout` closes it after a quiet while, and the next
/// request opens a fresh one.
#[test]
fn a_lazy_pool_opens_on_first_use_and_closes_when_idle() {
    let env = CliEnv::new("");
    let listen = format!("unix:{}", env.path("s.sock").display());
    let mut server = Server::start(&env, &["--simulated", "--listen", &listen, "--lazy", "--idle-timeout", "1"], &[]);
    server.wait_for("psbridge serve: ready");
    let pool_state = || server.get("/v1/profiles/simulated").json()["state"].clone();
    assert_eq!(server.get("/v1/health").status, 200, "no profile waits to start at launch");
    assert_eq!(pool_state(), "closed");
    let first = client(&env, &["run", "--server", &listen, "--simulated", "--script", "$PID"]).0;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let end = Instant::now() + Duration::from_secs(30);
    while pool_state() != "closed" {
        assert!(Instant::now() < end, "the idle pool was not closed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let worker = serde_json::from_slice::<Value>(&first.stdout).unwrap()[0].as_u64().unwrap() as u32;
    assert!(gone_within(worker, Duration::from_secs(20)), "the idle pool's worker {worker} is still there");
    let second = client(&env, &["run", "--server", &listen, "--simulated", "--script", "$PID"]).0;
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert_ne!(serde_json::from_slice::<Value>(&second.stdout).unwrap()[0].as_u64(), Some(u64::from(worker)), "a fresh worker");
}

// ---- what may reach the server, and what it refuses before anything starts ---------------------------

#[test]
fn profiles_without_an_allowlist_and_remote_addresses_are_refused_at_launch() {
    let env = CliEnv::new("");
    let output = env.psbridge().args(["serve", "--profile", "sim", "--listen", &format!("unix:{}", env.path("s.sock").display())]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("profile sim has no allowlist") && stderr.contains("allow = [\"Get-*\"") && stderr.contains("--allow-all"), "{stderr}");
    let output = env.psbridge().args(["serve", "--simulated", "--listen", "tcp:0.0.0.0:0", "--token-from", "env:T"]).env("T", TOKEN).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("not a loopback address") && text(&output.stderr).contains("--allow-remote"), "{}", text(&output.stderr));
    let output = env.psbridge().args(["serve", "--simulated", "--listen", "tcp:127.0.0.1:0"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("--token-from"), "{}", text(&output.stderr));
    let bad = CliEnv::with_sim_keys("allow = [\"Get-[\"]", "");
    let output = bad.psbridge().args(["serve", "--profile", "sim"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("profiles.sim.allow: \"Get-[\" is not a glob"), "{}", text(&output.stderr));
}

// ---- the shared unix-socket server ----------------------------------------------------------------

/// The unix-socket server's profile: Get-* and Set-Mailbox (and Start-Sleep, for a command that takes a
/// while), no scripts.
const ALLOW: &str = r#"allow = ["Get-*", "set-mailbox", "Start-Sleep"]"#;

#[test]
fn a_shared_server_serves_many_clients_by_its_rules_and_drains_on_sigterm() {
    let env = CliEnv::with_sim_keys(ALLOW, "");
    // The socket's folder is one other users may enter, so that the peer check itself is what refuses them.
    let public = env.path("public");
    std::fs::create_dir(&public).unwrap();
    set_mode(env.dir.path(), 0o711);
    set_mode(&public, 0o711);
    let socket = public.join("psbridge.sock");
    let audit = env.path("audit.jsonl");
    let state = env.path("state");
    let listen = format!("unix:{}", socket.display());
    let mut server = Server::start(
        &env,
        &[
            // Two workers kept connected: the drain below needs two at once, however long the test takes.
            "--profile", "sim", "--listen", &listen, "--workers", "3", "--min-workers", "2", "--audit", audit.to_str().unwrap(), "--state-dir", state.to_str().unwrap(),
            "--shutdown-grace", "6",
        ],
        &[("EXO_SIM_LATENCY_MS", "150")],
    );
    server.wait_for("psbridge serve: ready");
    assert_eq!(std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777).unwrap(), 0o600, "the socket's mode");
    let run = |args: &[&str]| client(&env, &[&["run", "--server", &listen][..], args].concat()).0;

    // The same output and exit statuses as a local run.
    let found = run(&["Get-Mailbox", "--params", r#"{"Identity": "ContosoUser2"}"#, "--select", "Alias,DisplayName", "--format", "jsonl"]);
    assert_eq!(found.status.code(), Some(0), "{}", text(&found.stderr));
    assert_eq!(text(&found.stdout), "{\"Alias\":\"ContosoUser2\",\"DisplayName\":\"Zoë 李\"}\n");
    let local = client(&env, &["run", "Get-Mailbox", "--params", r#"{"Identity": "nobody"}"#, "--envelope"]).0;
    let remote = run(&["Get-Mailbox", "--params", r#"{"Identity": "nobody"}"#, "--envelope"]);
    assert_eq!((remote.status.code(), local.status.code()), (Some(1), Some(1)), "{}", text(&remote.stderr));
    let (local, remote): (Value, Value) = (serde_json::from_slice(&local.stdout).unwrap(), serde_json::from_slice(&remote.stdout).unwrap());
    assert_eq!(remote["errors"][0]["message"].as_str().map(|m| m.split("couldn't be found").next()), local["errors"][0]["message"].as_str().map(|m| m.split("couldn't be found").next()));
    let bad = run(&["Get-Mailbox", "--params", r#"{"Identity": 1, "identity": 2}"#]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
    assert!(text(&bad.stderr).contains("given twice"), "{}", text(&bad.stderr));

    // Refusals: a command the allowlist does not name, and a script; 403 with the rule, exit 2.
    let refused = run(&["Remove-Mailbox", "--params", r#"{"Identity": "ContosoUser3"}"#]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains(r#"refused: Remove-Mailbox is not allowed by the profile's allowlist (allow = ["Get-*", "set-mailbox", "Start-Sleep"])"#), "{}", text(&refused.stderr));
    let script = run(&["--script", "'hi'"]);
    assert_eq!(script.status.code(), Some(2), "{}", text(&script.stderr));
    assert!(text(&script.stderr).contains("scripts are not allowed by the profile (allow_scripts = false)"), "{}", text(&script.stderr));
    let body = br#"{"command": "Get-Mailbox", "pipe": [{"command": "Remove-Mailbox"}]}"#;
    let piped = http(&listen, "POST", "/v1/profiles/sim/invoke", &[("Content-Type", "application/json")], body);
    assert_eq!(piped.status, 403, "every command of a pipeline is checked: {}", text(&piped.body));
    assert_eq!(piped.json()["error"], "forbidden");
    assert_eq!(http(&listen, "POST", "/v1/profiles/nope/invoke", &[], b"{}").status, 404);

    // 20 clients at once.
    let clients: Vec<Child> = (1..=20)
        .map(|n| {
            env.psbridge()
                .args(["run", "--server", &listen, "Get-Mailbox", "--params", &format!(r#"{{"Identity": "ContosoUser{n}"}}"#), "--select", "Alias", "--format", "jsonl"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (n, mut child) in (1..=20).zip(clients) {
        let output = wait_output(&mut child, Duration::from_secs(120));
        assert_eq!(output.status.code(), Some(0), "client {n}: {}", text(&output.stderr));
        assert_eq!(text(&output.stdout), format!("{{\"Alias\":\"ContosoUser{n}\"}}\n"), "client {n}");
    }

    // A key's order across clients: a first command holds the key for a while, and each later client's
    // command reaches the server before the next one starts; they run one after the other, in that order,
    // though three workers are free.
    let spawn_keyed = |args: &[&str]| {
        env.psbridge().args([&["run", "--server", &listen, "--key", "ContosoUser40"][..], args].concat()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let mut keyed = vec![spawn_keyed(&["Start-Sleep", "--params", r#"{"Seconds": 4}"#])];
    for n in 1..=4 {
        let end = Instant::now() + Duration::from_secs(30);
        while server.get("/v1/profiles/sim").json()["requests"].as_u64().unwrap() < n {
            assert!(Instant::now() < end, "client {n} never reached the server");
            std::thread::sleep(Duration::from_millis(10));
        }
        keyed.push(spawn_keyed(&["Set-Mailbox", "--params", &format!(r#"{{"Identity": "ContosoUser40", "Office": "Step {n}"}}"#)]));
    }
    let end = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/profiles/sim").json()["requests"].as_u64().unwrap() < 5 {
        assert!(Instant::now() < end, "the last client never reached the server");
        std::thread::sleep(Duration::from_millis(10));
    }
    for mut child in keyed {
        let output = wait_output(&mut child, Duration::from_secs(60));
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    }
    let writes: Vec<Value> = jsonl(&common::cli::read(&env.tenant().join("audit.jsonl"))).into_iter().filter(|w| w["identity"] == "ContosoUser40").collect();
    assert_eq!(writes.len(), 4, "{writes:?}");
    for pair in writes.windows(2) {
        assert!(pair[0]["end"].as_str() <= pair[1]["start"].as_str(), "same-key commands overlapped: {pair:?}");
    }
    let office = run(&["Get-Mailbox", "--params", r#"{"Identity": "ContosoUser40"}"#, "--select", "Office", "--format", "jsonl"]);
    assert_eq!(text(&office.stdout), "{\"Office\":\"Step 4\"}\n", "the last client's change is the one that stays");

    // /metrics is Prometheus text, with the families the issue names.
    let metrics = server.get("/metrics");
    assert_eq!(metrics.status, 200);
    assert!(metrics.head.contains("text/plain; version=0.0.4"), "{}", metrics.head);
    let families = check_prometheus(&text(&metrics.body));
    for family in [
        "psbridge_commands_total", "psbridge_command_duration_seconds", "psbridge_queue_depth", "psbridge_workers", "psbridge_worker_restarts_total",
        "psbridge_retries_total", "psbridge_throttled_total", "psbridge_worker_resident_bytes", "psbridge_worker_token_expiry_timestamp_seconds",
        "psbridge_concurrency_limit",
    ] {
        assert!(families.contains(family), "no {family} in /metrics");
    }
    let body = text(&metrics.body);
    assert!(body.contains("psbridge_commands_total{profile=\"sim\",status=\"refused\"} 3"), "{body}");
    assert!(body.lines().any(|l| l.starts_with("psbridge_worker_resident_bytes{profile=\"sim\"")), "{body}");
    // The OpenAPI document names the routes.
    let openapi = server.get("/v1/openapi.json").json();
    for route in ["/v1/profiles/{profile}/invoke", "/v1/profiles/{profile}/batches", "/v1/profiles/{profile}", "/v1/health"] {
        assert!(openapi["paths"].get(route).is_some(), "{route} not in the OpenAPI document");
    }
    let status = client(&env, &["server", "status", "--server", &listen]).0;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status.stderr));
    assert!(text(&status.stdout).contains("profile sim: pool open") && text(&status.stdout).contains(" MB, "), "{}", text(&status.stdout));

    // Another uid: the socket's mode keeps it out; with the mode opened up, the peer check still does.
    if nix::unistd::geteuid().is_root() {
        let as_nobody = || {
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(env!("CARGO_BIN_EXE_psbridge"));
            command.args(["server", "status", "--server", &listen]).env_clear().env("PATH", "/usr/bin:/bin").uid(65534).gid(65534);
            command.output().unwrap()
        };
        let output = as_nobody();
        assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
        assert!(text(&output.stderr).contains("Permission denied"), "{}", text(&output.stderr));
        set_mode(&socket, 0o666);
        let output = as_nobody();
        assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
        assert!(text(&output.stderr).contains("uid 65534 may not use this server"), "{}", text(&output.stderr));
        set_mode(&socket, 0o600);
    } else {
        eprintln!("not root: the foreign-uid check is left out");
    }

    resumed_batch(&env, &listen);

    // The audit: one line per request, with the client, the command and the parameter names only.
    let lines = jsonl(&common::cli::read(&audit));
    let invoke = lines.iter().find(|l| l["command"] == "Get-Mailbox" && l["outcome"] == "succeeded").expect("an audited invoke");
    assert_eq!(invoke["client"], format!("uid {}", nix::unistd::getuid()));
    assert_eq!(invoke["profile"], "sim");
    assert_eq!(invoke["parameters"], json!(["Identity"]));
    assert!(invoke["duration_ms"].as_f64().unwrap() > 0.0 && invoke["time"].as_str().unwrap().ends_with('Z'));
    assert!(lines.iter().any(|l| l["command"] == "Remove-Mailbox" && l["outcome"] == "refused" && l["status"] == 403), "{lines:?}");
    assert!(!common::cli::read(&audit).contains("ContosoUser2"), "no parameter value in the audit");
    if nix::unistd::geteuid().is_root() {
        assert!(lines.iter().any(|l| l["client"] == "uid 65534" && l["status"] == 403), "the foreign peer is audited");
    }

    // SIGTERM: the running command finishes within the grace, one past the grace is cancelled, new
    // clients are refused, every worker is disconnected, and the server exits 0.
    let workers = server.worker_pids();
    let spawn = |seconds: &str| {
        env.psbridge()
            .args(["run", "--server", &listen, "Start-Sleep", "--params", &format!(r#"{{"Seconds": {seconds}}}"#)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut short, mut long) = (spawn("3"), spawn("60"));
    let end = Instant::now() + Duration::from_secs(30);
    while server.get("/v1/profiles/sim").json()["workers"].as_array().unwrap().iter().filter(|w| w["state"] == "busy").count() < 2 {
        assert!(Instant::now() < end, "the two commands never started: {}", server.said());
        std::thread::sleep(Duration::from_millis(20));
    }
    server.signal(Signal::SIGTERM);
    server.wait_for("psbridge serve: stopping");
    let late = run(&["Get-Mailbox"]);
    assert_eq!(late.status.code(), Some(3), "a client after SIGTERM: {}", text(&late.stderr));
    let short = wait_output(&mut short, Duration::from_secs(30));
    assert_eq!(short.status.code(), Some(0), "the command within the grace finishes: {}", text(&short.stderr));
    let long = wait_output(&mut long, Duration::from_secs(30));
    assert_ne!(long.status.code(), Some(0), "the command past the grace is cancelled: {}", text(&long.stderr));
    let (code, stderr) = server.exit();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("psbridge serve: stopped"), "{stderr}");
    for pid in workers {
        assert!(gone_within(pid, Duration::from_secs(15)), "worker {pid} outlived the server");
    }
    assert!(!socket.exists(), "the socket is removed");
}

/// A batch whose client is killed half-way, run again: the server kept the journal, so the items that
/// finished are not run again and every item has one result.
fn resumed_batch(env: &CliEnv, listen: &str) {
    let input = env.path("offices.jsonl");
    let items: String = (101..=112).map(|n| format!("{{\"command\": \"Set-Mailbox\", \"parameters\": {{\"Identity\": \"ContosoUser{n}\", \"Office\": \"Moved {n}\"}}, \"id\": {n}}}\n")).collect();
    std::fs::write(&input, items + "{\"command\": \"Remove-Mailbox\", \"parameters\": {\"Identity\": \"ContosoUser113\"}, \"id\": 113}\n").unwrap();
    let mut first = env.psbridge().args(["batch", "--server", listen, input.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut results = BufReader::new(first.stdout.take().unwrap());
    let mut line = String::new();
    results.read_line(&mut line).unwrap();
    assert!(line.contains("\"status\""), "{line}");
    kill(Pid::from_raw(first.id() as i32), Signal::SIGKILL).unwrap();
    first.wait().unwrap();

    let output = client(env, &["batch", "--server", listen, input.to_str().unwrap()]).0;
    assert_eq!(output.status.code(), Some(1), "the refused item fails the batch: {}", text(&output.stderr));
    let records = jsonl(&text(&output.stdout));
    let ids: HashSet<u64> = records.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!((records.len(), ids.len()), (13, 13), "one result per item: {records:?}");
    assert!(records.iter().any(|r| r["previous_run"] == true), "items that finished before the kill are not run again: {records:?}");
    let refused = records.iter().find(|r| r["id"] == 113).unwrap();
    assert_eq!(refused["status"], "invalid");
    assert!(refused["errors"][0]["message"].as_str().unwrap().contains("refused: Remove-Mailbox is not allowed"), "{refused}");
    assert!(records.iter().filter(|r| r["id"] != 113).all(|r| r["status"] == "succeeded"), "{records:?}");
    assert!(text(&output.stderr).contains("resuming from"), "{}", text(&output.stderr));
    // Each mailbox was changed once, or twice when it was running as its client died (marked so).
    let writes = jsonl(&common::cli::read(&env.tenant().join("audit.jsonl")));
    for n in 101..=112 {
        let count = writes.iter().filter(|w| w["identity"] == format!("ContosoUser{n}")).count();
        let record = records.iter().find(|r| r["id"] == n).unwrap();
        assert!(count == 1 || (count == 2 && record["resumed_in_flight"] == true), "ContosoUser{n} written {count} times: {record}");
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

/// Checks the Prometheus text format line by line (HELP and TYPE before a family's samples, names,
/// labels, values) and returns the families declared.
fn check_prometheus(body: &str) -> HashSet<String> {
    let mut families = HashSet::new();
    let valid_name = |name: &str| {
        !name.is_empty() && name.chars().enumerate().all(|(i, c)| c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit()))
    };
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(name) && ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "{line}");
            families.insert(name.to_owned());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        assert!(!line.starts_with('#'), "{line}");
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "value: {line}");
        let name = match series.split_once('{') {
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').unwrap_or_else(|| panic!("labels: {line}"));
                for label in split_labels(labels) {
                    let (key, quoted) = label.split_once('=').unwrap_or_else(|| panic!("label: {line}"));
                    assert!(valid_name(key) && quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'), "label {label}: {line}");
                }
                name
            }
            None => series,
        };
        assert!(valid_name(name), "{line}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).filter(|f| families.contains(*f)).unwrap_or(name);
        assert!(families.contains(family), "a sample before its TYPE line: {line}");
    }
    families
}

/// `a="x",b="y,z"` into its labels (commas inside quotes kept).
fn split_labels(labels: &str) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&labels[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < labels.len() {
        parts.push(&labels[start..]);
    }
    parts
}
