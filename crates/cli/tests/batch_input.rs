//! `psbridge batch` input as people have it and the promises its files keep: CRLF CSV with typed columns
//! and a password column (never written anywhere, files private whatever the umask), a journal that
//! knows its input, start records only for items a worker began, and no more workers than items.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{CliEnv, jsonl, read, text};
use serde_json::{Value, json};

fn by_line(results: &[Value]) -> BTreeMap<u64, &Value> {
    results.iter().map(|r| (r["line"].as_u64().expect("every result has its line"), r)).collect()
}

/// `psbridge ARGS` run under `umask`.
fn with_umask(env: &CliEnv, umask: &str, args: &[&str]) -> std::process::Output {
    let batch = env.psbridge();
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg(format!("umask {umask}; exec \"$0\" \"$@\"")).arg(batch.get_program()).args(args);
    for (name, value) in batch.get_envs() {
        match value {
            Some(value) => sh.env(name, value),
            None => sh.env_remove(name),
        };
    }
    sh.output().unwrap()
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if std::fs::read(&path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle.as_bytes())) {
            found.push(path);
        }
    }
    found
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_crlf_csv_with_typed_columns_and_passwords_keeps_its_lines_and_no_secret_is_written() {
    let env = CliEnv::new("");
    let secret = "Pw-do-not-leak-7Q";
    // As Excel and Export-Csv write it: CRLF, quoted cells, typed columns.
    let csv = format!(
        "Name,Password:securestring,Shared:switch\r\n\"CsvAnn\",\"{secret}\",\r\nCsvBob,{secret}2,\r\nCsvCy,{secret}3,maybe\r\n"
    );
    let input = env.path("new.csv");
    std::fs::write(&input, csv).unwrap();
    let output = env.path("out.jsonl");
    let args = ["batch", input.to_str().unwrap(), "--command", "New-Mailbox", "-o", output.to_str().unwrap(), "--workers", "2"];
    let run = with_umask(&env, "022", &args);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "one row is invalid: {stderr}");
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.keys().copied().collect::<Vec<_>>(), [2, 3, 4], "CRLF lines are counted right");
    assert_eq!((lines[&2]["status"].as_str(), lines[&3]["status"].as_str()), (Some("succeeded"), Some("succeeded")), "{results:?}");
    assert_eq!(lines[&2]["input"], "CsvAnn,********,", "the row, its password replaced");
    assert_eq!(lines[&3]["input"], "CsvBob,********,", "no line ending in the input");
    let bad = lines[&4]["errors"][0]["message"].as_str().unwrap();
    assert_eq!(bad, "line 4: column Shared: `maybe` is not a bool (true or false)");
    assert!(env.mailbox_names().contains(&"CsvAnn".to_owned()));

    // Again with the secret as a JSONL securestring, under umask 000.
    let items = env.path("new.jsonl");
    let item = json!({ "command": "New-Mailbox", "parameters": { "Name": "JsonDi", "Password": { "$psbridge": "securestring", "value": secret } } });
    std::fs::write(&items, format!("{item}\n")).unwrap();
    let output2 = env.path("out2.jsonl");
    let run = with_umask(&env, "000", &["batch", items.to_str().unwrap(), "-o", output2.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    let result = &jsonl(&read(&output2))[0];
    assert_eq!(result["input"]["parameters"], Value::Null, "input is the line's text");
    assert!(result["input"].as_str().unwrap().contains(r#""Password":{"$psbridge":"securestring","value":"********"}"#), "{result}");

    for file in [&output, &env.path("out.jsonl.journal"), &output2, &env.path("out2.jsonl.journal")] {
        assert_eq!(mode(file), 0o600, "{} is private whatever the umask", file.display());
    }
    // Nothing psbridge wrote holds the password (the inputs do, of course).
    let leaks: Vec<PathBuf> = files_holding(env.dir.path(), secret).into_iter().filter(|p| *p != input && *p != items).collect();
    assert!(leaks.is_empty(), "the password is in {leaks:?}");
    assert!(!text(&run.stdout).contains(secret) && !stderr.contains(secret));
}

#[test]
fn a_journal_written_for_another_input_is_refused_unless_restart_or_resume() {
    let env = CliEnv::new("");
    let get = |user: u32| json!({ "command": "Get-Mailbox", "parameters": { "Identity": format!("ContosoUser{user}") } });
    let first = env.path("a.jsonl");
    std::fs::write(&first, format!("{}\n{}\n", get(1), get(2))).unwrap();
    let output = env.path("out.jsonl");
    let out = output.to_str().unwrap();
    let run = env.run(&["batch", first.to_str().unwrap(), "-o", out, "--quiet"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));

    let second = env.path("b.jsonl");
    std::fs::write(&second, format!("{}\n{}\n", get(2), get(3))).unwrap();
    let refused = env.run(&["batch", second.to_str().unwrap(), "-o", out, "--quiet"]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("belongs to another input") && stderr.contains("--restart") && stderr.contains("--resume"), "{stderr}");
    assert_eq!(jsonl(&read(&output)).len(), 2, "the earlier output is untouched");

    let resumed = env.run(&["batch", second.to_str().unwrap(), "-o", out, "--resume", "--quiet"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", text(&resumed.stderr));
    assert!(resumed.stderr.is_empty(), "--quiet silences notes too: {}", text(&resumed.stderr));
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines[&1]["previous_run"], true, "ContosoUser2 finished in the first run: {}", lines[&1]);
    assert!(lines[&2].get("previous_run").is_none());
    // The journal now belongs to b.jsonl: running it again needs no flag.
    assert_eq!(env.run(&["batch", second.to_str().unwrap(), "-o", out, "--quiet"]).status.code(), Some(0));
}

#[test]
fn only_items_a_worker_began_are_journalled_as_started_and_rerun_as_in_flight() {
    let env = CliEnv::new("");
    let items: String = (0..4).map(|i| format!("{}\n", json!({ "command": "New-Mailbox", "parameters": { "Name": format!("Flight{i}") } }))).collect();
    let input = env.path("items.jsonl");
    std::fs::write(&input, items).unwrap();
    let output = env.path("out.jsonl");
    let journal = env.path("out.jsonl.journal");
    let args = ["batch", input.to_str().unwrap(), "--workers", "1", "-o", output.to_str().unwrap(), "--quiet"];
    // One worker, each New-Mailbox 20 s: the first runs, the next waits in the pool's queue.
    let mut first = env.psbridge().args(args).env("EXO_SIM_LATENCY_MS", "20000").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let starts = || std::fs::read_to_string(&journal).map(|t| t.lines().filter(|l| l.starts_with("{\"start\"")).count()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while starts() == 0 {
        assert!(Instant::now() < deadline && first.try_wait().unwrap().is_none(), "the batch never began an item");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1000)); // time for a wrong start record of a queued item
    first.kill().unwrap(); // SIGKILL: the workers go with it
    first.wait().unwrap();
    assert_eq!(starts(), 1, "one worker began one item: {}", read(&journal));

    let second = env.psbridge().args(args).env("EXO_SIM_LATENCY_MS", "0").output().unwrap();
    let results = jsonl(&read(&output));
    let lines = by_line(&results);
    assert_eq!(lines.len(), 4, "{}", text(&second.stderr));
    assert_eq!((lines[&1]["resumed_in_flight"].as_bool(), lines[&1]["attempts"].as_u64()), (Some(true), Some(2)), "{}", lines[&1]);
    for line in 2..=4 {
        let r = lines[&line];
        assert!(r.get("resumed_in_flight").is_none() && r["attempts"] == 1, "line {line} never ran before: {r}");
    }
}

#[test]
fn two_items_with_sixteen_workers_start_two_and_bad_parameters_are_results() {
    // A profile whose connect writes down each worker's process id.
    let env = CliEnv::new("");
    let connects = env.path("connects.txt");
    let connect = env.path("connect.ps1");
    std::fs::write(&connect, format!("Add-Content -LiteralPath '{}' -Value $PID\n", connects.display())).unwrap();
    env.write_config(&format!("[profiles.count]\nconnect = {{ command = '{}' }}\n", connect.display()));
    let echo = env.path("echo.ps1");
    std::fs::write(&echo, "param($N) \"$N\"\n").unwrap();
    let big = "1180591620717411303424"; // 2^70
    let input = env.path("items.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n{}\n",
            format_args!(r#"{{"command": "{}", "parameters": {{"N": {big}}}, "id": "big"}}"#, echo.display()),
            json!({ "command": echo, "parameters": { "N": 5 } }),
            format_args!(r#"{{"command": "{}", "parameters": {{"N": 1, "n": 2}}, "id": "twice"}}"#, echo.display()),
        ),
    )
    .unwrap();
    let run = env.run(&["batch", input.to_str().unwrap(), "--profile", "count", "--workers", "16", "--no-journal"]);
    let stderr = text(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let pids = read(&connects);
    assert_eq!(pids.lines().count(), 2, "two items to run (and one invalid), two workers: {pids}");
    assert!(!stderr.contains("shutdown grace"), "{stderr}");
    let results = jsonl(&text(&run.stdout));
    let lines = by_line(&results);
    let echoed = lines[&1];
    assert_eq!(echoed["status"], "succeeded", "{echoed}");
    assert!(echoed["input"].as_str().unwrap().contains(big), "2^70 stays exact in the input: {echoed}");
    assert_eq!(echoed["exit_code"], Value::Null);
    assert_eq!(lines[&2]["output"][0], "5");
    let twice = lines[&3];
    assert_eq!((twice["status"].as_str(), twice["id"].as_str()), (Some("invalid"), None), "{twice}");
    assert!(twice["errors"][0]["message"].as_str().unwrap().contains("parameter n is given twice"), "{twice}");
    assert_eq!(twice["output"], json!([]));
}

#[test]
fn a_script_item_that_exits_3_fails_with_its_exit_code() {
    let env = CliEnv::new("");
    let exit3 = env.path("exit3.ps1");
    std::fs::write(&exit3, "'about to fail'\nexit 3\n").unwrap();
    let input = env.path("items.jsonl");
    std::fs::write(&input, format!("{}\n", json!({ "command": exit3, "id": "three" }))).unwrap();
    let run = env.run(&["batch", input.to_str().unwrap(), "--no-journal", "--quiet"]);
    let three = &jsonl(&text(&run.stdout))[0];
    assert_eq!((three["status"].as_str(), three["exit_code"].as_i64()), (Some("failed"), Some(3)), "exit 3 fails the item: {three}");
    assert_eq!(three["output"][0], "about to fail");
    assert_eq!(run.status.code(), Some(1));
}
