//! `psbridge batch` against the simulated tenant: one result per item whatever happens, resumption after a
//! SIGKILL without repeating finished work, bad lines reported by number, same-key order, Ctrl-C.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{CliEnv, jsonl, read, text};
use serde_json::{Value, json};

/// Writes JSONL items to `name` and returns its path as a string.
fn write_items(env: &CliEnv, name: &str, items: &[Value]) -> String {
    let path = env.path(name);
    let body: String = items.iter().map(|i| format!("{i}\n")).collect();
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

fn new_mailbox(name: &str) -> Value {
    json!({ "command": "New-Mailbox", "parameters": { "Name": name }, "id": name })
}

/// Result records by input line; panics when a line has two results.
fn by_line(results: &[Value]) -> BTreeMap<u64, &Value> {
    let mut lines = BTreeMap::new();
    for r in results {
        let line = r["line"].as_u64().expect("every result has its line");
        assert!(lines.insert(line, r).is_none(), "line {line} has two results");
    }
    lines
}

/// How many records of `kind` (`start` or `finish`) the journal holds so far.
fn journal_records(path: &std::path::Path, kind: &str) -> usize {
    let prefix = format!("{{\"{kind}\"");
    std::fs::read_to_string(path).map(|t| t.lines().filter(|l| l.starts_with(&prefix)).count()).unwrap_or(0)
}

/// Waits (up to 2 minutes) until the journal holds `count` records of `kind`; the batch must not end first.
fn wait_for_journal(path: &std::path::Path, kind: &str, count: usize, batch: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while journal_records(path, kind) < count {
        assert!(Instant::now() < deadline, "the batch never got going");
        assert!(batch.try_wait().unwrap().is_none(), "the batch ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn two_thousand_items_with_crashes_and_throttling_each_get_exactly_one_result() {
    let env = CliEnv::new("");
    let mut items: Vec<Value> = (0..2000).map(|i| new_mailbox(&format!("Bulk{i:04}"))).collect();
    // Looking up CrashMe kills the worker mid-command; Set-Mailbox is not idempotent, so it is not retried.
    for at in [500, 1000, 1500] {
        items.insert(at, json!({ "command": "Set-Mailbox", "parameters": { "Identity": "CrashMe", "Office": "X" } }));
    }
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("results.jsonl");
    let run = env
        .psbridge()
        .args(["batch", &input, "--workers", "3", "--output", output.to_str().unwrap(), "--progress-interval", "2"])
        .env("EXO_SIM_CRASH_ON", "CrashMe")
        .env("EXO_SIM_THROTTLE_RATE", "0.05")
        .env("EXO_SIM_RETRY_SCALE", "0.001")
        .output()
        .unwrap();
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "some items failed: {stderr}");
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), (1..=2003).collect::<Vec<_>>(), "one result per input line");
    let failed: Vec<&&Value> = lines.values().filter(|r| r["status"] != "succeeded").collect();
    assert_eq!(failed.len(), 3, "only the crashing items fail: {failed:?}");
    for r in &failed {
        assert_eq!(r["command"], "Set-Mailbox");
        assert!(r["errors"][0]["message"].as_str().unwrap().contains("worker exited"), "{r}");
    }
    assert!(results.iter().any(|r| r["attempts"].as_u64().unwrap() > 1), "throttled items were retried");
    assert!(results.iter().all(|r| r.get("resumed_in_flight").is_none()));
    // Every mailbox was created exactly once (a repeat would have failed as a duplicate).
    let names: Vec<String> = env.mailbox_names().into_iter().filter(|n| n.starts_with("Bulk")).collect();
    assert_eq!(names.len(), 2000);
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 2000);
    assert!(stderr.contains("2000 succeeded, 3 failed") && stderr.contains("retried"), "{stderr}");
    assert!(stderr.contains("psbridge batch:") && stderr.contains("items/s"), "plain progress lines off a terminal: {stderr}");
}

#[test]
fn a_batch_killed_part_way_resumes_and_creates_every_mailbox_exactly_once() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (0..240).map(|i| new_mailbox(&format!("Kill{i:03}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("results.jsonl");
    let journal = env.path("results.jsonl.journal");
    let args = ["batch", input.as_str(), "--workers", "3", "--output", output.to_str().unwrap(), "--quiet"];

    let mut first = env.psbridge().args(args).env("EXO_SIM_LATENCY_MS", "40").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_journal(&journal, "finish", 60, &mut first);
    first.kill().unwrap(); // SIGKILL: no clean-up at all
    first.wait().unwrap();
    assert!(!output.exists(), "no half-written output file");
    let done_before = journal_records(&journal, "finish");
    assert!(done_before < 240, "killed part-way");

    let second = env.psbridge().args(args).output().unwrap();
    let stderr = text(&second.stderr);
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.len(), 240, "one result per item: {stderr}");
    let previous = results.iter().filter(|r| r["previous_run"] == true).count();
    assert!(previous >= done_before.min(60), "finished items were not run again ({previous} of {done_before})");
    common::cli::assert_each_mailbox_made_once(&env, &results, "Kill", 240, &stderr);
}

#[test]
fn malformed_lines_are_reported_by_number_and_the_rest_still_run() {
    let env = CliEnv::new("");
    let input = env.path("mixed.jsonl");
    std::fs::write(
        &input,
        concat!(
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \"ContosoUser1\"}, \"id\": \"a\"}\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \n",
            "{\"parameters\": {\"Identity\": \"ContosoUser2\"}}\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": [\"ContosoUser3\"]}\n",
            "\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity; Remove-Item\": \"x\"}}\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \"nobody-here\"}}\n",
            "{\"command\": \"Get-Mailbox\", \"parameters\": {\"Identity\": \"ContosoUser4\"}, \"id\": 7}\n",
        ),
    )
    .unwrap();
    let run = env.run(&["batch", input.to_str().unwrap(), "--quiet"]);
    assert_eq!(run.status.code(), Some(1));
    let results = jsonl(&text(&run.stdout));
    let lines = by_line(&results);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4, 6, 7, 8]);
    for (line, wanted) in [(2, "not valid JSON"), (3, "`command` is missing"), (4, "`parameters` as an object"), (6, "is not valid")] {
        let r = lines[&line];
        assert_eq!(r["status"], "invalid", "{r}");
        for field in ["id", "key", "command", "input", "output", "errors", "warnings", "exit_code", "native_exit_code", "attempts", "duration_ms"] {
            assert!(r.get(field).is_some(), "an invalid result has every field, {field} too: {r}");
        }
        let error = r["errors"][0]["message"].as_str().unwrap();
        assert!(error.starts_with(&format!("line {line}: ")) && error.contains(wanted), "{error}");
    }
    assert_eq!((lines[&1]["status"].as_str(), lines[&1]["id"].as_str()), (Some("succeeded"), Some("a")));
    assert_eq!(lines[&1]["output"][0]["Alias"], "ContosoUser1");
    assert_eq!((lines[&8]["status"].as_str(), lines[&8]["id"].as_u64()), (Some("succeeded"), Some(7)));
    let missing = lines[&7];
    assert_eq!(missing["status"], "failed");
    assert!(missing["errors"][0]["message"].as_str().unwrap().contains("couldn't be found"), "{missing}");
}

#[test]
fn csv_rows_run_one_command_and_same_key_rows_keep_their_order() {
    let env = CliEnv::new("");
    let input = env.path("offices.csv");
    // Three changes to each of three mailboxes, interleaved; with the key, the last one must win.
    let mut rows = String::from("Identity,Office,CustomAttribute1\n");
    for round in 1..=3 {
        for user in 1..=3 {
            rows += &format!("ContosoUser{user},Office {round},Attr {user}\n");
        }
    }
    rows += "ContosoUser9,Lonely\n";
    std::fs::write(&input, rows).unwrap();
    let output = env.path("offices.jsonl");
    let run = env.run(&["batch", input.to_str().unwrap(), "--command", "Set-Mailbox", "--key-column", "Identity", "--workers", "3", "-o", output.to_str().unwrap()]);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[&11]["status"], "invalid");
    assert!(lines[&11]["errors"][0]["message"].as_str().unwrap().starts_with("line 11: 2 fields for 3 columns; missing CustomAttribute1"), "{}", lines[&11]);
    assert!(lines.iter().filter(|(l, _)| **l != 11).all(|(_, r)| r["status"] == "succeeded" && r["key"].as_str().unwrap().starts_with("ContosoUser")));
    for user in 1..=3 {
        let mailbox = env.run(&["run", "Get-Mailbox", "--params", &format!(r#"{{"Identity": "ContosoUser{user}"}}"#), "--select", "Office,CustomAttribute1"]);
        let mailbox: Value = serde_json::from_slice(&mailbox.stdout).unwrap();
        assert_eq!(mailbox[0], json!({ "Office": "Office 3", "CustomAttribute1": format!("Attr {user}") }));
    }
    assert!(stderr.contains("9 succeeded, 1 failed (1 invalid)"), "{stderr}");
}

#[test]
fn ctrl_c_lets_running_items_finish_and_a_rerun_does_the_rest() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (0..150).map(|i| new_mailbox(&format!("Int{i:03}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("out.jsonl");
    let journal = env.path("out.jsonl.journal");
    let args = ["batch", input.as_str(), "--workers", "2", "-o", output.to_str().unwrap()];
    let mut child = env.psbridge().args(args).env("EXO_SIM_LATENCY_MS", "60").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    wait_for_journal(&journal, "finish", 10, &mut child);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let first = child.wait_with_output().unwrap();
    let stderr = text(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping: waiting for") && stderr.contains("run the same command again"), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 150, "every item is accounted for");
    let done = results.iter().filter(|r| r["status"] == "succeeded").count();
    let not_run = results.iter().filter(|r| r["status"] == "not_run").count();
    assert_eq!(done + not_run, 150, "running items finished, none was cancelled: {stderr}");
    assert!(not_run > 0, "it stopped taking items");

    let second = env.run(&args);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    let results = jsonl(&read(&output));
    assert_eq!(results.iter().filter(|r| r["previous_run"] == true).count(), done);
    assert!(results.iter().all(|r| r["status"] == "succeeded" && r.get("resumed_in_flight").is_none()));
    assert_eq!(env.mailbox_names().iter().filter(|n| n.starts_with("Int")).count(), 150);
}

#[test]
fn a_second_ctrl_c_cancels_running_items_and_the_rerun_marks_them() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (0..12).map(|i| new_mailbox(&format!("Cancel{i:02}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("out.jsonl");
    let journal = env.path("out.jsonl.journal");
    let args = ["batch", input.as_str(), "--workers", "2", "-o", output.to_str().unwrap()];
    // Each New-Mailbox waits 30 s (stoppably) before it writes: the interrupts find two running.
    let mut child = env.psbridge().args(args).env("EXO_SIM_LATENCY_MS", "30000").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    wait_for_journal(&journal, "start", 2, &mut child);
    std::thread::sleep(Duration::from_millis(1500)); // the commands reach the workers
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let first = child.wait_with_output().unwrap();
    let stderr = text(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelling the running items"), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 12);
    let cancelled: Vec<u64> = results.iter().filter(|r| r["status"] == "cancelled").map(|r| r["line"].as_u64().unwrap()).collect();
    assert!(!cancelled.is_empty(), "running items were cancelled: {stderr}");
    assert!(results.iter().all(|r| r["status"] == "cancelled" || r["status"] == "not_run" || r["status"] == "succeeded"));

    let second = env.run(&args);
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    for line in &cancelled {
        let r = lines[line];
        assert_eq!(r["resumed_in_flight"], true, "a cancelled item may have been applied: {r}");
        assert!(r["attempts"].as_u64().unwrap() >= 2);
    }
    assert!(results.iter().all(|r| r["status"] == "succeeded" || r["resumed_in_flight"] == true), "{}", text(&second.stderr));
    assert_eq!(env.mailbox_names().iter().filter(|n| n.starts_with("Cancel")).count(), 12);
}

#[test]
fn a_terminal_gets_a_progress_bar_with_rate_and_eta_and_quiet_gets_nothing() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (1..=40).map(|i| json!({ "command": "Get-Mailbox", "parameters": { "Identity": format!("ContosoUser{i}") } })).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("out.jsonl");
    let mut batch = env.psbridge();
    batch.args(["batch", input.as_str(), "--workers", "1", "-o", output.to_str().unwrap()]);
    // `script` runs the batch on a pseudo-terminal and copies what it drew to its own stdout.
    let line: Vec<String> = std::iter::once(batch.get_program()).chain(batch.get_args()).map(|a| format!("'{}'", a.to_str().unwrap())).collect();
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line.join(" "), "/dev/null"]).env("TERM", "xterm-256color").env("EXO_SIM_LATENCY_MS", "150");
    for (name, value) in batch.get_envs() {
        match value {
            Some(value) => script.env(name, value),
            None => script.env_remove(name),
        };
    }
    let drawn = script.output().unwrap();
    let screen = text(&drawn.stdout);
    assert_eq!(drawn.status.code(), Some(0), "{screen}");
    assert!(screen.contains("/40 items") && screen.contains("ETA") && screen.contains("/s"), "a bar with position, rate and ETA: {screen}");
    assert!(screen.contains("40 succeeded, 0 failed"), "the summary follows: {screen}");
    assert_eq!(jsonl(&read(&output)).len(), 40);

    let quiet = env.run(&["batch", input.as_str(), "--quiet", "--no-journal"]);
    assert_eq!(quiet.status.code(), Some(0));
    assert!(quiet.stderr.is_empty(), "--quiet prints nothing on stderr: {}", text(&quiet.stderr));
    assert_eq!(jsonl(&text(&quiet.stdout)).len(), 40);
}

#[test]
fn bad_batch_usage_is_explained_and_touches_nothing() {
    let env = CliEnv::new("");
    let csv = env.path("rows.csv");
    std::fs::write(&csv, "Identity,Office\nContosoUser1,A\n").unwrap();
    let run = env.run(&["batch", csv.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run.stderr).contains("CSV input needs --command"), "{}", text(&run.stderr));
    let run = env.run(&["batch", csv.to_str().unwrap(), "--command", "Set-Mailbox", "--key-column", "Alias"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run.stderr).contains("--key-column Alias: no such column; columns: Identity, Office"), "{}", text(&run.stderr));
    // A journal that is not one is refused, and left as it was.
    let run = env.run(&["batch", csv.to_str().unwrap(), "--command", "Set-Mailbox", "--journal", csv.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert_eq!(read(&csv), "Identity,Office\nContosoUser1,A\n");
    let run = env.run(&["batch", env.path("missing.jsonl").to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run.stderr).contains("cannot read the input"), "{}", text(&run.stderr));
}

#[test]
fn workers_that_cannot_connect_end_the_batch_at_once_with_every_item_not_run_and_why() {
    // The simulation refuses any Organization but contoso's: every connect fails the same way.
    let env = CliEnv::new(
        r#"
[profiles.refused]
module_path = ['MODULES']
modules = ["ExchangeOnlineManagement"]
[profiles.refused.connect]
command = "Connect-ExchangeOnline"
parameters = { ManagedIdentity = true, Organization = "fabrikam.onmicrosoft.com", ShowBanner = false }
"#
        .replace("MODULES", &common::sim_modules().display().to_string())
        .as_str(),
    );
    let items: Vec<Value> = (0..20).map(|i| new_mailbox(&format!("Refused{i:02}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("out.jsonl");
    let run = env.psbridge().args(["--profile", "refused", "batch", &input, "-w", "2", "-o", output.to_str().unwrap()]).output().unwrap();
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("not_run"), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(results.len(), 20, "one result per item");
    for r in &results {
        assert_eq!(r["status"], "not_run", "{r}");
        let why = r["errors"][0]["message"].as_str().unwrap_or_default();
        assert!(why.contains("could not start") && why.contains("fabrikam"), "the reason names the cause: {r}");
    }
}

#[test]
fn the_first_sigterm_ends_a_batch_whose_workers_cannot_connect_with_143() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (0..10).map(|i| new_mailbox(&format!("Slow{i:02}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("out.jsonl");
    let child = env
        .psbridge()
        .args(["batch", input.as_str(), "-w", "2", "-o", output.to_str().unwrap()])
        .env("EXO_SIM_CONNECT_DELAY_MS", "600000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the workers get into their connect, then one SIGTERM only.
    std::thread::sleep(Duration::from_secs(5));
    let signalled = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let done = child.wait_with_output().unwrap();
    let stderr = text(&done.stderr);
    assert_eq!(done.status.code(), Some(143), "{stderr}");
    assert!(signalled.elapsed() < Duration::from_secs(120), "ended within the grace: {:?}", signalled.elapsed());
    let results = jsonl(&read(&output));
    assert_eq!(results.len(), 10);
    assert!(results.iter().all(|r| r["status"] == "not_run"), "{results:?}");
}

#[test]
fn runspaces_per_worker_and_adaptive_concurrency_run_a_throttled_batch_to_the_end() {
    let env = CliEnv::new("");
    let items: Vec<Value> = (0..24).map(|i| new_mailbox(&format!("Lane{i:02}"))).collect();
    let input = write_items(&env, "items.jsonl", &items);
    let output = env.path("results.jsonl");
    let run = env
        .psbridge()
        .args(["batch", &input, "--workers", "1", "--runspaces-per-worker", "3", "--adaptive-concurrency"])
        .args(["--output", output.to_str().unwrap(), "--progress-interval", "0.01"])
        .env("EXO_SIM_BUDGET", "6/2s")
        .output()
        .unwrap();
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{stderr}");
    let results = jsonl(&read(&output));
    assert_eq!(by_line(&results).len(), 24);
    assert!(results.iter().all(|r| r["status"] == "succeeded"), "{results:?}");
    assert!(results.iter().any(|r| r["attempts"].as_u64().unwrap() > 1), "the budget throttled some: {stderr}");
    assert!(stderr.contains("concurrency limit 1"), "the progress line shows the limit coming down to 1: {stderr}");
    let bad = env.psbridge().args(["batch", &input, "--runspaces-per-worker", "0"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad.stderr));
}
