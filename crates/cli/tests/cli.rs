//! The `psbridge` binary: the README's demo and the run contract (formats, envelope, exit statuses).

mod common;

use std::process::Stdio;
use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;

/// `psbridge run --simulated ...` against a fresh tenant and a private data folder.
struct Sim {
    tenant: tempfile::TempDir,
    data: tempfile::TempDir,
}

impl Sim {
    fn new() -> Sim {
        Sim { tenant: tempfile::tempdir().unwrap(), data: tempfile::tempdir().unwrap() }
    }

    fn run(&self, args: &[&str]) -> Command {
        let mut cmd = Command::cargo_bin("psbridge").unwrap();
        cmd.env("EXO_SIM_TENANT", self.tenant.path()).env("XDG_DATA_HOME", self.data.path()).arg("run").arg("--simulated").args(args);
        cmd
    }
}

fn stdout_json(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("stdout is JSON ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

#[test]
fn the_readme_demo_prints_the_mailbox() {
    let sim = Sim::new();
    let output = sim.run(&["Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let mailboxes = stdout_json(&output);
    assert_eq!(mailboxes.as_array().unwrap().len(), 1);
    assert_eq!(mailboxes[0]["Alias"], "ContosoUser1");
}

#[test]
fn jsonl_prints_one_object_per_line_and_table_a_table() {
    let sim = Sim::new();
    let output = sim.run(&["Get-Mailbox", "--params", r#"{"ResultSize": 3}"#, "--format", "jsonl"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let lines: Vec<Value> = String::from_utf8(output.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|m| m["Alias"].as_str().unwrap().starts_with("ContosoUser")));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("WARNING: There are more results available"), "warnings go to stderr: {stderr}");

    let output = sim.run(&["Get-Mailbox", "--params", r#"{"Identity": "ContosoUser2"}"#, "--format", "table"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    let table = String::from_utf8(output.stdout).unwrap();
    assert!(table.contains("ContosoUser2"), "{table}");
    assert!(table.lines().count() >= 3, "a header, a rule and a row: {table}");
}

#[test]
fn envelope_carries_every_stream_and_errors_exit_1() {
    let sim = Sim::new();
    let output = sim.run(&["Get-Mailbox", "--params", r#"{"Identity": "nobody-here"}"#, "--envelope"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1), "the command reported errors");
    let envelope = stdout_json(&output);
    for key in ["output", "errors", "warnings", "verbose", "debug", "information", "had_errors"] {
        assert!(envelope.get(key).is_some(), "envelope has {key}: {envelope}");
    }
    assert_eq!(envelope["had_errors"], true);
    assert_eq!(envelope["output"], Value::Array(vec![]));
    assert!(envelope["errors"][0]["message"].as_str().unwrap().contains("nobody-here"));
    assert_eq!(envelope["errors"][0]["category"], "NotSpecified");

    let output = sim.run(&["Get-Mailbox", "--params", r#"{"Identity": "nobody-here"}"#]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stdout_json(&output), Value::Array(vec![]));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("couldn't be found") && stderr.contains("FullyQualifiedErrorId"), "{stderr}");
}

#[test]
fn a_script_binds_params_to_its_param_block() {
    let output = Command::cargo_bin("psbridge")
        .unwrap()
        .args(["run", "--script", "param($Name, $Count) \"$Name x $Count\"", "--params", r#"{"Name": "Zoë", "Count": 3}"#])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout_json(&output), serde_json::json!(["Zoë x 3"]));
}

#[test]
fn bad_params_are_a_usage_error_that_says_where() {
    let output = Command::cargo_bin("psbridge").unwrap().args(["run", "Get-Date", "--params", r#"{"Identity": }"#]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("--params is not valid JSON") && stderr.contains("column 14"), "{stderr}");

    let output = Command::cargo_bin("psbridge").unwrap().args(["run", "Get-Date", "--params", "[1, 2]"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8(output.stderr).unwrap().contains("must be a JSON object"));

    let output = Command::cargo_bin("psbridge").unwrap().args(["run"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "neither COMMAND nor --script");
}

#[test]
fn a_bridge_that_cannot_start_exits_3() {
    let output = Command::cargo_bin("psbridge")
        .unwrap()
        .env("PSBRIDGE_PWSH", "/nonexistent/psbridge-pwsh")
        .args(["run", "Get-Date"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("pwsh not found") && stderr.contains("/nonexistent/psbridge-pwsh"), "{stderr}");
}

#[test]
fn a_timeout_exits_124_and_says_so() {
    let output = Command::cargo_bin("psbridge").unwrap().args(["run", "--script", "Start-Sleep 60", "--timeout", "1"]).output().unwrap();
    assert_eq!(output.status.code(), Some(124));
    assert!(String::from_utf8(output.stderr).unwrap().contains("timed out after 1 s"));
}

/// Every process whose process group is `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) && fields.first() != Some(&"Z") {
            members.push(pid);
        }
    }
    members
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid = stat.rsplit(')').next().unwrap_or("").split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            children.push(pid);
        }
    }
    children
}

#[tokio::test]
async fn killing_psbridge_leaves_no_worker_behind() {
    let binary = assert_cmd::cargo::cargo_bin("psbridge");
    let mut psbridge = std::process::Command::new(binary)
        .args(["run", "--script", "Start-Process /bin/sleep -ArgumentList 300; 'started'; Start-Sleep 300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the worker (the process group psbridge created) and the grandchild it started.
    let mut group = Vec::new();
    for _ in 0..600 {
        if let Some(worker) = children_of(psbridge.id()).first() {
            group = group_members(*worker);
            if group.len() >= 3 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(group.len() >= 3, "launcher, pwsh and /bin/sleep are running: {group:?}");
    psbridge.kill().unwrap(); // SIGKILL: no chance to clean up
    psbridge.wait().unwrap();
    for pid in &group {
        assert!(common::gone_within(*pid, Duration::from_secs(15)).await, "process {pid} of the worker group outlived psbridge");
    }
}
