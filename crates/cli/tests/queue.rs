//! `psbridge batch --queue` and `psbridge serve --queue` through the real binary, the real pwsh, the
//! simulated module and a real nats-server (JetStream, file storage in a temporary folder, a random port
//! on loopback, a user and password): hosts are separate processes, each in its own process group, and
//! are killed, stopped and continued as a machine would be.
//!
//! nats-server comes from Debian's package (`.ci/run` installs it). Without it these tests fail on CI
//! (CI set) and are skipped, loudly, elsewhere.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::cli::{CliEnv, jsonl, read, text};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};

/// The hosts' ack wait: short, so that a dead host's items come back within seconds.
const ACK_WAIT_SECS: u64 = 5;
/// Workers per host (hosts are separate processes, on a 2-core CI machine).
const WORKERS: usize = 2;
/// The simulated tenant's organization.
const ORGANIZATION: &str = "contoso.onmicrosoft.com";

/// A nats-server with JetStream on a free loopback port, its store in `dir`; killed when dropped.
struct Nats {
    program: PathBuf,
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    log: PathBuf,
}

impl Nats {
    /// Starts one; `None` (after a loud note) when nats-server is not installed and this is not CI.
    fn start(dir: &Path) -> Option<Nats> {
        // Debian installs it in /usr/sbin, which a user's PATH may not hold.
        let Some(program) = which::which("nats-server").ok().or_else(|| Some(PathBuf::from("/usr/sbin/nats-server")).filter(|p| p.is_file())) else {
            assert!(
                std::env::var_os("CI").is_none(),
                "nats-server is not installed; on CI it must be (`.ci/run` installs Debian's package: apt-get install -y nats-server)"
            );
            eprintln!("\n*** SKIPPING the queue tests: nats-server is not installed (apt-get install -y nats-server) ***\n");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let store = dir.join("nats-store");
        let config = dir.join("nats.conf");
        // The password is a throwaway of this test's server, given to psbridge through PSB_NATS_PASSWORD.
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\" }}\nauthorization {{ user: psb, password: \"{}\" }}\n",
                store.display(),
                password()
            ),
        )
        .unwrap();
        let mut nats = Nats { program, child: None, port, config, log: dir.join("nats.log") };
        nats.launch();
        Some(nats)
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.program)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(20);
        while !read(&self.log).contains("Server is ready") {
            assert!(Instant::now() < end, "nats-server did not start: {}", read(&self.log));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGTERM, as a service manager would) and starts it again on the same port and store.
    fn restart(&mut self, down_for: Duration) {
        if let Some(mut child) = self.child.take() {
            nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
            child.wait().unwrap();
        }
        std::thread::sleep(down_for);
        std::fs::write(&self.log, "").unwrap();
        self.launch();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The test server's password.
fn password() -> &'static str {
    "psbridge-queue-test"
}

/// The configuration every test adds to the `sim` profile: the queue's credentials, and a second
/// profile `other` on the same tenant, whose connect names `organization`.
fn queue_config(env_dir: &Path, organization: &str) -> String {
    let tenant = env_dir.join("tenant");
    format!(
        r#"
[queue]
user = "psb"
password = {{ env = "PSB_NATS_PASSWORD" }}

[profiles.other]
module_path = ['{modules}']
modules = ["ExchangeOnlineManagement"]
start_timeout_secs = 120
env = {{ EXO_SIM_TENANT = '{tenant}' }}

[profiles.other.connect]
command = "Connect-ExchangeOnline"
parameters = {{ ManagedIdentity = true, Organization = "{organization}", ShowBanner = false, EXOModuleBasePath = '{tenant}' }}
"#,
        modules = common::sim_modules().display(),
        tenant = tenant.display(),
    )
}

/// A world for one test: its configuration, tenant and nats-server; `None` when skipping.
fn world() -> Option<(CliEnv, Nats)> {
    let env = CliEnv::new("");
    env.write_config(&queue_config(env.dir.path(), ORGANIZATION));
    let nats = Nats::start(env.dir.path())?;
    Some((env, nats))
}

/// `psbridge` of this world, with the queue's password.
fn psbridge(env: &CliEnv) -> Command {
    let mut command = env.psbridge();
    command.env("PSB_NATS_PASSWORD", password()).env("RUST_LOG", "warn");
    command
}

/// A `psbridge serve --queue` host in its own process group (its workers with it); SIGKILLed with them
/// when dropped.
struct Host {
    child: Child,
    stderr: PathBuf,
}

impl Host {
    /// Starts a host serving `profiles` with [`WORKERS`] workers each, and waits until it pulls.
    fn start(env: &CliEnv, nats: &Nats, name: &str, profiles: &[&str], envs: &[(&str, &str)]) -> Host {
        let mut host = Host::spawn(env, nats, name, profiles, envs);
        host.wait_ready();
        host
    }

    /// Starts a host without waiting for it.
    fn spawn(env: &CliEnv, nats: &Nats, name: &str, profiles: &[&str], envs: &[(&str, &str)]) -> Host {
        Host::spawn_with(env, nats, name, profiles, envs, &[])
    }

    /// Starts a host with more `serve` arguments, without waiting for it.
    fn spawn_with(env: &CliEnv, nats: &Nats, name: &str, profiles: &[&str], envs: &[(&str, &str)], args: &[&str]) -> Host {
        use std::os::unix::process::CommandExt;
        let stderr = env.path(&format!("{name}.stderr"));
        let mut command = psbridge(env);
        command.arg("serve").args(["--queue", &nats.url(), "--ack-wait", &ACK_WAIT_SECS.to_string(), "--allow-all"]);
        command.args(["--workers", &WORKERS.to_string(), "--min-workers", &WORKERS.to_string()]);
        command.arg("--listen").arg(format!("unix:{}", env.path(&format!("{name}.sock")).display()));
        command.arg("--audit").arg(env.path(&format!("{name}.audit")));
        for profile in profiles {
            command.args(["--profile", profile]);
        }
        command.args(args);
        command.envs(envs.iter().copied()).env("RUST_LOG", "warn,psbridge=info");
        command.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&stderr).unwrap()).process_group(0);
        Host { child: command.spawn().unwrap(), stderr }
    }

    /// Waits (up to three minutes: the workers start on a busy machine) until its pools are open and it
    /// pulls.
    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(180);
        loop {
            let said = read(&self.stderr);
            if said.contains("psbridge serve: ready") && said.contains("psbridge serve: pulling queued items") {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the host ended ({status}) before it got ready: {said}");
            }
            assert!(Instant::now() < end, "the host never got ready: {said}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the host and its workers.
    fn signal(&self, signal: Signal) {
        killpg(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// The pids of its workers: every process below it (pwsh, and the process a dotnet tool's pwsh
    /// starts).
    fn worker_pids(&self) -> HashSet<u32> {
        let mut parents: HashMap<u32, u32> = HashMap::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            if let Some(ppid) = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok()) {
                parents.insert(pid, ppid);
            }
        }
        let host = self.child.id();
        let below = |mut pid: u32| loop {
            match parents.get(&pid) {
                Some(&parent) if parent == host => return true,
                Some(&parent) if parent > 1 => pid = parent,
                _ => return false,
            }
        };
        parents.keys().copied().filter(|pid| below(*pid)).collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGCONT);
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Writes JSONL items to `name`; returns its path.
fn write_items(env: &CliEnv, name: &str, items: &[Value]) -> String {
    let path = env.path(name);
    std::fs::write(&path, items.iter().map(|i| format!("{i}\n")).collect::<String>()).unwrap();
    path.display().to_string()
}

/// `batch --queue` of `input` for `profile` into `output`, started.
fn submit(env: &CliEnv, nats: &Nats, profile: &str, input: &str, output: &Path, extra: &[&str]) -> Child {
    psbridge(env)
        .args(["batch", "--queue", &nats.url(), "--profile", profile, input, "-o", output.to_str().unwrap(), "--progress-interval", "2"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to `limit`) for a started command to end; what it did.
fn finish(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    match result.recv_timeout(limit) {
        Ok(output) => output.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("the command did not end within {limit:?}");
        }
    }
}

/// `queue status --json` of `batch`.
fn status(env: &CliEnv, nats: &Nats, batch: &str) -> Value {
    try_status(env, nats, batch).unwrap_or_else(|| panic!("the queue has no batch {batch}"))
}

/// `queue status --json` of `batch`; `None` while the queue does not know it (yet).
fn try_status(env: &CliEnv, nats: &Nats, batch: &str) -> Option<Value> {
    let output = psbridge(env).args(["queue", "status", "--json", "--queue", &nats.url(), batch]).output().unwrap();
    if output.status.code() == Some(2) && text(&output.stderr).contains("has no batch") {
        return None;
    }
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    Some(serde_json::from_slice(&output.stdout).unwrap())
}

/// Waits (up to two minutes) until `batch` has `count` finished items; the submitter must not end first.
fn wait_finished(env: &CliEnv, nats: &Nats, batch: &str, count: u64, submitter: &mut Child) {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(submitter.try_wait().unwrap().is_none(), "the batch ended early");
        if try_status(env, nats, batch).is_some_and(|s| s["finished"].as_u64().unwrap_or(0) >= count) {
            return;
        }
        assert!(Instant::now() < end, "the batch never got to {count} finished items");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `batch --queue --detach` (with `extra` arguments): queues the batch and returns; the id it printed.
fn detach(env: &CliEnv, nats: &Nats, profile: &str, input: &str, output: &Path, extra: &[&str]) -> String {
    let detached = psbridge(env)
        .args(["batch", "--queue", &nats.url(), "--profile", profile, input, "-o", output.to_str().unwrap(), "--detach", "--quiet"])
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(detached.status.code(), Some(0), "{}", text(&detached.stderr));
    text(&detached.stdout).trim().to_owned()
}

/// Result records by input line; panics when a line has two.
fn by_line(results: &[Value]) -> BTreeMap<u64, &Value> {
    let mut lines = BTreeMap::new();
    for r in results {
        let line = r["line"].as_u64().expect("every result has its line");
        assert!(lines.insert(line, r).is_none(), "line {line} has two results");
    }
    lines
}

/// The numbers of the summary line: succeeded, failed, skipped.
fn summary_counts(stderr: &str) -> (u64, u64, u64) {
    let line = stderr.lines().rev().find(|l| l.contains(" succeeded, ") && l.contains(" skipped ")).unwrap_or_else(|| panic!("no summary: {stderr}"));
    let number = |after: &str| -> u64 {
        let at = line.find(after).unwrap_or_else(|| panic!("{after:?} in {line}"));
        line[..at].rsplit(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
    };
    (number(" succeeded"), number(" failed"), number(" skipped"))
}

/// The sim tenant's audit log: `(cmdlet, identity, pid)` of every completed write, in order.
fn audit(env: &CliEnv) -> Vec<(String, String, u32)> {
    let path = env.tenant().join("audit.jsonl");
    jsonl(&std::fs::read_to_string(path).unwrap_or_default())
        .into_iter()
        .map(|a| (a["cmdlet"].as_str().unwrap().to_owned(), a["identity"].as_str().unwrap().to_owned(), a["pid"].as_u64().unwrap() as u32))
        .collect()
}

#[test]
fn two_thousand_keyed_items_complete_when_a_host_is_killed_and_every_mailbox_exists_once() {
    let Some((env, nats)) = world() else { return };
    let mut hosts: Vec<Host> = (1..=3).map(|n| Host::spawn(&env, &nats, &format!("host{n}"), &["sim"], &[])).collect();
    hosts.iter_mut().for_each(Host::wait_ready);
    let items: Vec<Value> =
        (0..2000).map(|i| json!({ "command": "New-Mailbox", "parameters": { "Name": format!("Q{i:04}") }, "key": format!("Q{i:04}"), "id": i })).collect();
    let input = write_items(&env, "mailboxes.jsonl", &items);
    let output = env.path("created.jsonl");
    let batch = "two-thousand";
    let mut submitter = submit(&env, &nats, "sim", &input, &output, &["--batch-id", batch]);
    wait_finished(&env, &nats, batch, 300, &mut submitter);
    hosts[1].signal(Signal::SIGKILL); // no clean-up at all: its items come back after the ack wait
    let run = finish(submitter, Duration::from_secs(300));
    let stderr = text(&run.stderr);
    assert!(matches!(run.status.code(), Some(0 | 1)), "{stderr}");
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), (1..=2000).collect::<Vec<_>>(), "one result per item: {stderr}");
    common::cli::assert_each_mailbox_made_once(&env, &results, "Q", 2000, &stderr);
    let (succeeded, failed, skipped) = summary_counts(&stderr);
    let counted = |status: &str| results.iter().filter(|r| r["status"] == status).count() as u64;
    assert_eq!((succeeded, failed, skipped), (counted("succeeded"), 2000 - counted("succeeded"), 0), "{stderr}");
    assert_eq!(succeeded + failed + skipped, 2000, "the summary adds up: {stderr}");
    // The queue holds the same results.
    let fetched = psbridge(&env).args(["queue", "results", "--queue", &nats.url(), batch]).output().unwrap();
    assert_eq!(jsonl(&text(&fetched.stdout)).len(), 2000, "{}", text(&fetched.stderr));
}

#[test]
fn a_host_stopped_past_the_ack_wait_and_continued_records_nothing_twice() {
    let Some((env, nats)) = world() else { return };
    let slow = [("EXO_SIM_LATENCY_MS", "1500")];
    let mut hosts: Vec<Host> = (1..=3).map(|n| Host::spawn(&env, &nats, &format!("host{n}"), &["sim"], &slow)).collect();
    hosts.iter_mut().for_each(Host::wait_ready);
    let items: Vec<Value> = (1..=48)
        .map(|i| json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{i}"), "Office": format!("S{i}") }, "key": format!("ContosoUser{i}") }))
        .collect();
    let input = write_items(&env, "offices.jsonl", &items);
    let output = env.path("offices-results.jsonl");
    let batch = "stopped-host";
    let mut submitter = submit(&env, &nats, "sim", &input, &output, &["--batch-id", batch]);
    wait_finished(&env, &nats, batch, 6, &mut submitter);
    // Every worker is busy (1.5 s per item): host 1 stops in the middle of two items, which the other
    // hosts are given after the ack wait. It goes on once one of them is recorded from its second run,
    // and then finishes its own run of it too, late.
    hosts[0].signal(Signal::SIGSTOP);
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let fetched = psbridge(&env).args(["queue", "results", "--queue", &nats.url(), batch]).output().unwrap();
        if jsonl(&text(&fetched.stdout)).iter().any(|r| r["resumed_in_flight"] == true) {
            break;
        }
        assert!(Instant::now() < end, "host 1's items never ran elsewhere");
        std::thread::sleep(Duration::from_millis(300));
    }
    hosts[0].signal(Signal::SIGCONT);
    let run = finish(submitter, Duration::from_secs(240));
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 48, "{stderr}");
    assert!(results.iter().all(|r| r["status"] == "succeeded"), "{stderr}");
    assert!(!stderr.contains("second result"), "{stderr}");
    assert!(results.iter().any(|r| r["resumed_in_flight"] == true && r["attempts"] == 2), "host 1's items ran again: {stderr}");
    // Host 1's late runs were counted, not recorded: the queue's results are the ones written here.
    let end = Instant::now() + Duration::from_secs(30);
    while status(&env, &nats, batch)["duplicates"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < end, "host 1 finished its items late, and they count as duplicate attempts: {stderr}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let fetched = psbridge(&env).args(["queue", "results", "--queue", &nats.url(), batch]).output().unwrap();
    let recorded = jsonl(&text(&fetched.stdout));
    let key = |r: &Value| (r["line"].as_u64(), r["attempts"].as_u64(), r["duration_ms"].as_f64().map(f64::to_bits));
    let written: BTreeSet<_> = results.iter().map(key).collect();
    assert_eq!(recorded.iter().map(key).collect::<BTreeSet<_>>(), written, "one recorded result per item, the first");
}

#[test]
fn a_batch_survives_the_nats_server_restarting_and_loses_nothing() {
    let Some((env, mut nats)) = world() else { return };
    let latency = [("EXO_SIM_LATENCY_MS", "40")];
    let mut hosts: Vec<Host> = (1..=2).map(|n| Host::spawn(&env, &nats, &format!("host{n}"), &["sim"], &latency)).collect();
    hosts.iter_mut().for_each(Host::wait_ready);
    // 30 mailboxes, 10 changes each in order: the last one must win.
    let items: Vec<Value> = (1..=10)
        .flat_map(|step| {
            (31..=60).map(move |n| {
                json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{n}"), "Office": format!("R{step}") }, "key": format!("ContosoUser{n}") })
            })
        })
        .collect();
    let input = write_items(&env, "restart.jsonl", &items);
    let output = env.path("restart-results.jsonl");
    let batch = "server-restart";
    let mut submitter = submit(&env, &nats, "sim", &input, &output, &["--batch-id", batch]);
    wait_finished(&env, &nats, batch, 40, &mut submitter);
    nats.restart(Duration::from_secs(2));
    let run = finish(submitter, Duration::from_secs(240));
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 300, "{stderr}");
    assert!(results.iter().all(|r| r["status"] == "succeeded"), "{stderr}");
    let offices = psbridge(&env)
        .args(["run", "Get-Mailbox", "--params", r#"{"ResultSize": "Unlimited"}"#, "--select", "Name,Office", "--format", "jsonl"])
        .output()
        .unwrap();
    let offices: HashMap<String, String> = jsonl(&text(&offices.stdout))
        .into_iter()
        .map(|m| (m["Name"].as_str().unwrap().to_owned(), m["Office"].as_str().unwrap_or_default().to_owned()))
        .collect();
    for n in 31..=60 {
        assert_eq!(offices[&format!("ContosoUser{n}")], "R10", "the last change of ContosoUser{n} came last");
    }
}

#[test]
fn read_modify_write_chains_on_the_same_keys_keep_their_order_across_three_hosts() {
    let Some((env, nats)) = world() else { return };
    let mut hosts: Vec<Host> = (1..=3).map(|n| Host::spawn(&env, &nats, &format!("host{n}"), &["sim"], &[])).collect();
    hosts.iter_mut().for_each(Host::wait_ready);
    let workers: Vec<HashSet<u32>> = hosts.iter().map(Host::worker_pids).collect();
    // Each step reads the mailbox's CustomAttribute2, waits a little and writes it back with its own
    // number appended: steps of one key that overlapped or ran out of order would lose or swap numbers.
    let script = env.path("append-step.ps1");
    std::fs::write(
        &script,
        "param([string]$Identity, [int]$Step)\n\
         $seen = if ($Step -eq 1) { '' } else { [string](Get-Mailbox -Identity $Identity).CustomAttribute2 }\n\
         Start-Sleep -Milliseconds (Get-Random -Minimum 5 -Maximum 40)\n\
         Set-Mailbox -Identity $Identity -CustomAttribute2 $(if ($seen) { \"$seen,$Step\" } else { \"$Step\" })\n",
    )
    .unwrap();
    let keys: Vec<String> = (61..=72).map(|n| format!("ContosoUser{n}")).collect();
    let mut items: Vec<Value> = Vec::new();
    for step in 1..=15 {
        for key in &keys {
            items.push(json!({ "command": script.display().to_string(), "parameters": { "Identity": key, "Step": step }, "key": key }));
        }
        // and unkeyed items between them, which any host may run at any time
        items.push(json!({ "command": "Get-Mailbox", "parameters": { "Identity": format!("ContosoUser{step}") } }));
    }
    let input = write_items(&env, "chains.jsonl", &items);
    let output = env.path("chains-results.jsonl");
    let run = finish(submit(&env, &nats, "sim", &input, &output, &[]), Duration::from_secs(240));
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    assert_eq!(by_line(&jsonl(&read(&output))).len(), items.len());
    let attributes = psbridge(&env)
        .args(["run", "Get-Mailbox", "--params", r#"{"ResultSize": "Unlimited"}"#, "--select", "Name,CustomAttribute2", "--format", "jsonl"])
        .output()
        .unwrap();
    let attributes: HashMap<String, String> = jsonl(&text(&attributes.stdout))
        .into_iter()
        .map(|m| (m["Name"].as_str().unwrap().to_owned(), m["CustomAttribute2"].as_str().unwrap_or_default().to_owned()))
        .collect();
    let chain = (1..=15).map(|s| s.to_string()).collect::<Vec<_>>().join(",");
    for key in &keys {
        assert_eq!(attributes[key], chain, "{key}'s steps ran one at a time, in order");
    }
    // The chains were spread: their writes came from the workers of more than one host.
    let writers: HashSet<usize> = audit(&env)
        .iter()
        .filter(|(cmdlet, identity, _)| cmdlet == "Set-Mailbox" && keys.contains(identity))
        .filter_map(|(_, _, pid)| workers.iter().position(|w| w.contains(pid)))
        .collect();
    assert!(writers.len() >= 2, "the keys spread over the hosts: {writers:?}");
}

#[test]
fn a_host_serving_only_profile_a_never_runs_an_item_of_profile_b() {
    let Some((env, nats)) = world() else { return };
    let a = Host::start(&env, &nats, "host-a", &["sim"], &[]);
    let a_workers = a.worker_pids();
    let change = |profile: &str, n: u32| json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{n}"), "Office": profile } });
    // A's batch also holds a command that runs longer than the ack wait: its in-progress
    // acknowledgements keep it from being given to another slot while it runs.
    let mut a_items: Vec<Value> = (81..=100).map(|n| change("sim", n)).collect();
    a_items.push(json!({ "command": "Start-Sleep", "parameters": { "Seconds": ACK_WAIT_SECS + 3 }, "id": "slow" }));
    let a_input = write_items(&env, "a.jsonl", &a_items);
    let b_input = write_items(&env, "b.jsonl", &(101..=120).map(|n| change("other", n)).collect::<Vec<_>>());
    let (a_output, b_output) = (env.path("a-results.jsonl"), env.path("b-results.jsonl"));
    let b_batch = detach(&env, &nats, "other", &b_input, &b_output, &["--batch-id", "profile-b"]);
    assert_eq!(b_batch, "profile-b");
    let a_run = finish(submit(&env, &nats, "sim", &a_input, &a_output, &["--batch-id", "profile-a"]), Duration::from_secs(120));
    assert_eq!(a_run.status.code(), Some(0), "{}", text(&a_run.stderr));
    let slow = jsonl(&read(&a_output)).into_iter().find(|r| r["id"] == "slow").unwrap();
    assert_eq!((slow["attempts"].as_u64(), slow.get("resumed_in_flight")), (Some(1), None), "{slow}");
    // Profile A's batch is done; B's waits for a host that serves B.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&env, &nats, &b_batch)["finished"], 0);
    let b = Host::start(&env, &nats, "host-b", &["other"], &[]);
    let b_workers = b.worker_pids();
    let b_run = finish(submit(&env, &nats, "other", &b_input, &b_output, &["--batch-id", "profile-b"]), Duration::from_secs(120));
    assert_eq!(b_run.status.code(), Some(0), "{}", text(&b_run.stderr));
    assert_eq!(jsonl(&read(&b_output)).len(), 20);
    let writes = audit(&env);
    let by = |range: std::ops::RangeInclusive<u32>| -> HashSet<u32> {
        writes.iter().filter(|(_, identity, _)| range.clone().any(|n| *identity == format!("ContosoUser{n}"))).map(|(_, _, pid)| *pid).collect()
    };
    assert!(by(81..=100).is_subset(&a_workers), "profile A's items ran on host A");
    assert!(by(101..=120).is_subset(&b_workers), "profile B's items ran on host B only");
    assert_eq!(writes.len(), 40);
    // By now a second run of the slow command would have ended (and been counted).
    assert_eq!(status(&env, &nats, "profile-a")["duplicates"], 0, "the slow command ran once");
}

#[test]
fn a_host_whose_workers_cannot_connect_takes_nothing() {
    let Some((env, nats)) = world() else { return };
    // The same profile, on another machine whose configuration cannot connect (its pool opens on
    // demand, and fails every time).
    let broken = CliEnv::new("");
    broken.write_config(&queue_config(env.dir.path(), "nowhere.onmicrosoft.com"));
    let mut bad = Host::spawn_with(&broken, &nats, "broken", &["other"], &[], &["--lazy"]);
    bad.wait_ready();
    let items: Vec<Value> =
        (1..=10).map(|n| json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{n}"), "Office": "N" } })).collect();
    let input = write_items(&env, "no-connect.jsonl", &items);
    let output = env.path("no-connect-results.jsonl");
    detach(&env, &nats, "other", &input, &output, &["--batch-id", "no-connect"]);
    let end = Instant::now() + Duration::from_secs(90);
    while !read(&bad.stderr).contains("taking no queued items until the pool opens") {
        assert!(Instant::now() < end, "the broken host never tried: {}", read(&bad.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(status(&env, &nats, "no-connect")["finished"], 0);
    // A host that can connect runs them all, each on its first delivery: the broken one took none.
    let _good = Host::start(&env, &nats, "good", &["other"], &[]);
    let run = finish(submit(&env, &nats, "other", &input, &output, &["--batch-id", "no-connect"]), Duration::from_secs(120));
    assert_eq!(run.status.code(), Some(0), "{} {}", text(&run.stderr), read(&output));
    let results = jsonl(&read(&output));
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r["status"] == "succeeded" && r["attempts"] == 1 && r.get("resumed_in_flight").is_none()), "{results:?}");
}

#[test]
fn a_submitter_killed_and_run_again_reattaches_and_prints_each_result_once() {
    let Some((env, nats)) = world() else { return };
    let latency = [("EXO_SIM_LATENCY_MS", "150")];
    let _hosts: Vec<Host> = (1..=2).map(|n| Host::start(&env, &nats, &format!("host{n}"), &["sim"], &latency)).collect();
    let items: Vec<Value> =
        (121..=180).map(|n| json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{n}"), "Office": "K" }, "id": n })).collect();
    let input = write_items(&env, "attach.jsonl", &items);
    let args = ["batch", "--queue", &nats.url(), "--profile", "sim", input.as_str(), "--batch-id", "attach-test", "--quiet"];
    let first_out = env.path("first.stdout");
    let mut first = psbridge(&env).args(args).stdout(std::fs::File::create(&first_out).unwrap()).stderr(Stdio::null()).spawn().unwrap();
    let end = Instant::now() + Duration::from_secs(120);
    while read(&first_out).lines().count() < 10 {
        assert!(Instant::now() < end && first.try_wait().unwrap().is_none(), "the first run never got going");
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap(); // SIGKILL: the hosts go on
    first.wait().unwrap();
    let printed_before = read(&first_out).lines().filter(|l| serde_json::from_str::<Value>(l).is_ok()).count();
    let second = psbridge(&env).args(args).output().unwrap();
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let results = jsonl(&text(&second.stdout));
    let ids: Vec<u64> = results.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 60, "each item's result once: {ids:?}");
    assert_eq!(ids.len(), 60);
    let previous = results.iter().filter(|r| r["previous_run"] == true).count();
    assert!(previous >= printed_before, "what finished before came back as previous_run ({previous} of {printed_before})");
    assert!(results.iter().all(|r| r["status"] == "succeeded"));
    // The hosts ran every item once.
    assert_eq!(audit(&env).len(), 60);
}

#[test]
fn cancel_drops_what_has_not_begun_and_submitting_again_runs_the_rest() {
    let Some((env, nats)) = world() else { return };
    let _host = Host::start(&env, &nats, "host", &["sim"], &[("EXO_SIM_LATENCY_MS", "400")]);
    let items: Vec<Value> =
        (181..=200).map(|n| json!({ "command": "Set-Mailbox", "parameters": { "Identity": format!("ContosoUser{n}"), "Office": "C" } })).collect();
    let input = write_items(&env, "cancel.jsonl", &items);
    let output = env.path("cancel-results.jsonl");
    // No --batch-id: the id is derived from the profile, the input and the output, so that running the
    // same command again names the same batch.
    let batch = detach(&env, &nats, "sim", &input, &output, &[]);
    let end = Instant::now() + Duration::from_secs(60);
    while status(&env, &nats, &batch)["finished"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < end, "the batch never got going");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cancel = psbridge(&env).args(["queue", "cancel", "--queue", &nats.url(), &batch]).output().unwrap();
    assert_eq!(cancel.status.code(), Some(0), "{}", text(&cancel.stderr));
    std::thread::sleep(Duration::from_secs(2)); // what was running finishes
    let cancelled = status(&env, &nats, &batch);
    assert_eq!(cancelled["state"], "cancelled");
    let finished = cancelled["finished"].as_u64().unwrap();
    assert!(finished < 20, "{cancelled}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(status(&env, &nats, &batch)["finished"].as_u64().unwrap(), finished, "nothing more began");
    // Submitted again: the finished items come back, the others run now.
    let again = finish(submit(&env, &nats, "sim", &input, &output, &[]), Duration::from_secs(120));
    let stderr = text(&again.stderr);
    assert_eq!(again.status.code(), Some(0), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 20);
    assert_eq!(results.iter().filter(|r| r["previous_run"] == true).count() as u64, finished, "{stderr}");
    assert_eq!(audit(&env).len(), 20, "every item ran once");
}

#[test]
fn usage_mistakes_are_refused_before_anything_is_queued() {
    let env = CliEnv::new("");
    let input = write_items(&env, "x.jsonl", &[json!({ "command": "Get-Mailbox" })]);
    for (args, expected) in [
        (vec!["batch", "--queue", "http://127.0.0.1:1", "--profile", "sim", input.as_str()], "nats://HOST:PORT"),
        (vec!["batch", "--queue", "nats://127.0.0.1:1", "--profile", "sim", input.as_str(), "--batch-id", "a.b"], "--batch-id"),
        (vec!["batch", "--queue", "nats://127.0.0.1:1", "--profile", "sim", input.as_str(), "--workers", "2"], "--workers"),
        (vec!["batch", "--profile", "sim", input.as_str(), "--batch-id", "x"], "--batch-id names a batch"),
        (vec!["queue", "status", "--queue", "nats://127.0.0.1:1", "a.b"], "not a batch id"),
    ] {
        let output = env.run(&args);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains(expected), "{args:?}: {}", text(&output.stderr));
    }
    // No server there: exit status 3, saying where it looked.
    let output = env.run(&["queue", "status", "--queue", "nats://127.0.0.1:1", "b1"]);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("cannot connect to the queue at nats://127.0.0.1:1"), "{}", text(&output.stderr));
}
