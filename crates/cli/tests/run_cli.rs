//! `psbridge run` through the real binary and the real pwsh: exit statuses, signals and a closed or
//! full stdout, secrets kept out of the workers' environment, limits checked before anything starts,
//! large and file input, and the output options.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::cli::{CliEnv, Running, text};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// A profile with no modules and no connect: the quickest worker.
const PLAIN: &str = "[profiles.plain]\nstart_timeout_secs = 120\n";

fn plain() -> CliEnv {
    CliEnv::new(PLAIN)
}

/// `psbridge run --profile plain ARGS`.
fn run(env: &CliEnv, args: &[&str]) -> std::process::Output {
    env.run(&[&["run", "--profile", "plain"], args].concat())
}

/// `psbridge run` with a pwsh that does not exist: a status other than 3 shows nothing tried to start.
fn run_without_pwsh(env: &CliEnv, args: &[&str]) -> std::process::Output {
    env.psbridge().env("PSBRIDGE_PWSH", "/nonexistent/pwsh").args(["run", "--profile", "plain"]).args(args).output().unwrap()
}

fn json_stdout(output: &std::process::Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("stdout is JSON ({e}): {:?}", text(&output.stdout)))
}

/// The lines psbridge wrote in its own name.
fn own_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.starts_with("psbridge:")).collect()
}

fn gone_within(pid: u32, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while common::alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
    }
    !common::alive(pid)
}

// ---- exit statuses -------------------------------------------------------------------------------

#[test]
fn the_help_shows_the_exit_status_table() {
    let env = plain();
    let help = text(&env.run(&["--help"]).stdout);
    for row in ["  0    success", "  124  the command timed out", "  141  the program reading stdout closed it", "  74   the output could not be written", "  143  SIGTERM"] {
        assert!(help.contains(row), "--help lacks {row:?}:\n{help}");
    }
}

#[test]
fn error_records_exit_1_and_suppressed_errors_do_not() {
    let env = plain();
    let failed = run(&env, &["--script", "Write-Error 'it broke'; 'after'"]);
    assert_eq!(failed.status.code(), Some(1), "{}", text(&failed.stderr));
    assert!(text(&failed.stderr).contains("it broke"));
    assert!(own_lines(&text(&failed.stderr)).is_empty(), "no message of psbridge's own: {}", text(&failed.stderr));
    // HadErrors is set, but no error record was written: a success.
    let suppressed = run(&env, &["--script", "Write-Error 'hidden' -ErrorAction SilentlyContinue; 'fine'", "--envelope"]);
    assert_eq!(suppressed.status.code(), Some(0), "{}", text(&suppressed.stderr));
    let envelope = json_stdout(&suppressed);
    assert_eq!(envelope["had_errors"], true, "had_errors is PowerShell's raw flag");
    assert_eq!(envelope["output"], json!(["fine"]));
}

/// Needs the worker to report `exit N` (the library side of issue 9).
#[test]
fn a_script_exit_number_is_the_exit_status_and_the_envelope_reports_it() {
    let env = plain();
    let five = run(&env, &["--script", "'x'; exit 5"]);
    assert_eq!(five.status.code(), Some(5), "{}", text(&five.stderr));
    assert_eq!(json_stdout(&five), json!(["x"]));
    let zero = run(&env, &["--script", "Write-Error 'noted'; exit 0"]);
    assert_eq!(zero.status.code(), Some(0), "exit 0 is 0: {}", text(&zero.stderr));
    let envelope = run(&env, &["--script", "/bin/sh -c 'exit 3'; 'after'; exit 7", "--envelope"]);
    assert_eq!(envelope.status.code(), Some(7), "{}", text(&envelope.stderr));
    let envelope = json_stdout(&envelope);
    assert_eq!(envelope["exit_code"], 7);
    assert_eq!(envelope["native_exit_code"], 3, "the last native program's $LASTEXITCODE");
    let native = json_stdout(&run(&env, &["--script", "'no exit'", "--envelope"]));
    assert_eq!((&native["exit_code"], &native["native_exit_code"]), (&Value::Null, &Value::Null), "{native}");
}

#[test]
fn a_timeout_exits_124_naming_the_command_and_the_limit_and_closes_the_output() {
    let env = plain();
    let output = run(&env, &["--script", "[pscustomobject]@{Name = 'start'}; Start-Sleep 60", "--timeout", "2", "--format", "csv"]);
    assert_eq!(output.status.code(), Some(124), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert_eq!(own_lines(&stderr), ["psbridge: <script> timed out after 2 s; it was stopped and the worker was kept"], "{stderr}");
    assert_eq!(text(&output.stdout), "Name\nstart\n", "whole CSV rows only");
    let output = run(&env, &["--script", "'start'; Start-Sleep 60", "--timeout", "2"]);
    assert_eq!(output.status.code(), Some(124));
    assert_eq!(json_stdout(&output), json!(["start"]), "the JSON array is closed");
}

#[test]
fn a_missing_module_or_a_bad_minimum_version_is_a_configuration_error() {
    let env = plain();
    let output = run(&env, &["--module", "NoSuchModulePsbridgeTest", "Get-Date"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("module NoSuchModulePsbridgeTest could not be imported"), "{stderr}");
    assert!(stderr.contains("Install-Module NoSuchModulePsbridgeTest") && stderr.contains("module_path"), "{stderr}");

    let env = CliEnv::new("[profiles.versioned]\nmodules = [{ name = \"Microsoft.PowerShell.Utility\", minimum_version = \"three\" }]\n");
    let output = env.psbridge().env("PSBRIDGE_PWSH", "/nonexistent/pwsh").args(["run", "--profile", "versioned", "Get-Date"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let line = std::fs::read_to_string(env.config()).unwrap().lines().position(|l| l.contains("\"three\"")).unwrap() + 1;
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&format!("line {line}")) && stderr.contains("minimum_version \"three\"") && stderr.contains("not a version"), "{stderr}");
}

// ---- signals, a closed pipe, a full disk -----------------------------------------------------------

#[test]
fn ctrl_c_stops_the_command_closes_the_json_and_leaves_no_worker() {
    let env = plain();
    let mut command = env.psbridge();
    command.args(["run", "--profile", "plain", "--script", "'start'; Write-Warning \"pid=$PID\"; Start-Sleep 300"]);
    let mut running = Running::start(command, Stdio::piped());
    let worker: u32 = running.wait_for("pid=").parse().unwrap();
    running.signal(Signal::SIGINT);
    let (status, stdout, stderr) = running.finish();
    assert_eq!(status.code(), Some(130), "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout:?}")), json!(["start"]));
    assert_eq!(own_lines(&stderr), ["psbridge: interrupted (Ctrl-C); the command was stopped and the worker disconnected"], "{stderr}");
    assert!(gone_within(worker, Duration::from_secs(15)), "worker {worker} outlived psbridge");
}

#[test]
fn sigterm_acts_as_ctrl_c_with_status_143_and_prints_the_table_so_far() {
    let env = CliEnv::new("");
    let mut command = env.psbridge();
    command.args([
        "run",
        "--script",
        "[pscustomobject]@{Name = 'start'; N = 1}; Write-Warning \"pid=$PID\"; Start-Sleep 300",
        "--format",
        "table",
    ]);
    let mut running = Running::start(command, Stdio::piped());
    let worker: u32 = running.wait_for("pid=").parse().unwrap();
    running.signal(Signal::SIGTERM);
    let (status, stdout, stderr) = running.finish();
    assert_eq!(status.code(), Some(143), "{stderr}");
    assert!(stdout.contains("Name") && stdout.contains("start"), "the rows received, as a table: {stdout}");
    assert_eq!(own_lines(&stderr), ["psbridge: terminated (SIGTERM); the command was stopped and the worker disconnected"], "{stderr}");
    assert!(gone_within(worker, Duration::from_secs(15)), "worker {worker} outlived psbridge");
}

#[test]
fn a_reader_that_closes_the_pipe_ends_psbridge_quietly_with_141() {
    let env = plain();
    let mut command = env.psbridge();
    command.args(["run", "--profile", "plain", "--script", "1..300000", "--format", "jsonl"]);
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap(); // then the pipe is dropped
    assert_eq!(first, "1\n");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(141));
    assert_eq!(text(&output.stderr), "", "no message for a closed pipe");
}

#[test]
fn a_full_disk_is_one_message_and_status_74() {
    let env = plain();
    for format in ["json", "jsonl"] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let output = env
            .psbridge()
            .args(["run", "--profile", "plain", "--script", "1..1000", "--format", format])
            .stdout(Stdio::from(full))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(74), "{}", text(&output.stderr));
        let stderr = text(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("psbridge: cannot write the output: No space left on device"), "{stderr}");
    }
}

// ---- secrets -----------------------------------------------------------------------------------------

#[test]
fn a_secret_from_the_environment_is_not_in_the_workers_environment() {
    let secret = "Env-Secret-5tq8Zp-Value";
    let env = CliEnv::new(
        "[profiles.secretive]\nstart_timeout_secs = 120\n[profiles.secretive.connect]\ncommand = \"Out-Null\"\n\
         secrets.InputObject = { env = \"PSBRIDGE_TEST_SECRET\", as = \"string\" }\n",
    );
    let done = env.path("done");
    let script = "param($Done) \"[$env:PSBRIDGE_TEST_SECRET]\"; Write-Warning \"pid=$PID\"; while (-not (Test-Path $Done)) { Start-Sleep -Milliseconds 50 }";
    let params = json!({"Done": done}).to_string();
    let mut command = env.psbridge();
    command.env("PSBRIDGE_TEST_SECRET", secret).args(["run", "--profile", "secretive", "--format", "jsonl", "--script", script, "--params", &params]);
    let mut running = Running::start(command, Stdio::piped());
    let worker: u32 = running.wait_for("pid=").parse().unwrap();
    // The worker and its parent (the pwsh launcher, when pwsh is a dotnet tool), but not psbridge.
    let stat = std::fs::read_to_string(format!("/proc/{worker}/stat")).unwrap();
    let parent: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    for pid in std::iter::once(worker).chain((parent != running.child.id()).then_some(parent)) {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(!text(&environ).contains(secret), "/proc/{pid}/environ holds the secret");
        assert!(!text(&environ).contains("PSBRIDGE_TEST_SECRET="), "/proc/{pid}/environ holds the variable");
    }
    std::fs::write(&done, "").unwrap();
    let (status, stdout, stderr) = running.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "\"[]\"\n", "the script cannot read the variable");
    assert!(!stderr.contains(secret));
}

// ---- limits, checked before anything starts --------------------------------------------------------

fn nested(levels: usize) -> String {
    format!("{{\"V\": {}1{}}}", "[".repeat(levels), "]".repeat(levels))
}

#[test]
fn params_nested_too_deep_are_refused_before_a_worker_starts() {
    let env = plain();
    let output = run_without_pwsh(&env, &["--script", "param($V) 1", "--params", &nested(100)]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("too deep") && stderr.contains("more than 64 levels") && stderr.contains("parameter V") && stderr.contains("[0][0]"), "{stderr}");
    // Beyond serde_json's own limit (128) too, with where.
    let output = run_without_pwsh(&env, &["--script", "param($V) 1", "--params", &nested(200)]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("too deep") && stderr.contains("line 1 column"), "{stderr}");
}

#[test]
fn a_parameter_given_twice_is_refused() {
    let env = plain();
    for (params, wanted) in [(r#"{"X": 1, "X": 2}"#, "parameter X is given twice"), (r#"{"X": 1, "x": 2}"#, "parameter x is given twice (as X and x")] {
        let output = run_without_pwsh(&env, &["--script", "param($X) $X", "--params", params]);
        assert_eq!(output.status.code(), Some(2), "{params}: {}", text(&output.stderr));
        assert!(text(&output.stderr).contains(wanted), "{params}: {}", text(&output.stderr));
    }
}

#[test]
fn timeouts_beyond_a_year_are_usage_errors_not_panics() {
    let env = plain();
    let output = run_without_pwsh(&env, &["Get-Date", "--timeout", "1e20"]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("at most 31536000 (a year)"), "{}", text(&output.stderr));
    for key in ["command_timeout_secs", "start_timeout_secs", "connect_timeout_secs"] {
        let env = CliEnv::new(&format!("[profiles.plain]\n{key} = 1e20\n"));
        let output = run_without_pwsh(&env, &["Get-Date"]);
        assert_eq!(output.status.code(), Some(2), "{key}: {}", text(&output.stderr));
        let stderr = text(&output.stderr);
        assert!(stderr.contains(key) && stderr.contains("at most 31536000 (a year)"), "{stderr}");
    }
}

#[test]
fn depth_from_the_option_or_the_profile_cuts_output_objects() {
    let env = CliEnv::new("[profiles.plain]\nstart_timeout_secs = 120\n[profiles.shallow]\nstart_timeout_secs = 120\ndepth = 1\n");
    let script = "@{a = @{b = @{c = 1}}}";
    let full = json_stdout(&env.run(&["run", "--profile", "plain", "--script", script]));
    assert_eq!(full[0]["a"]["b"]["c"], 1);
    let shallow = json_stdout(&env.run(&["run", "--profile", "shallow", "--script", script]));
    assert!(shallow[0]["a"].is_string(), "profile depth 1: {shallow}");
    // Needs the worker to honour a command's own depth (the library side of issue 9).
    let cut = json_stdout(&env.run(&["run", "--profile", "plain", "--script", script, "--depth", "1"]));
    assert!(cut[0]["a"].is_string(), "--depth 1: {cut}");
}

// ---- large and file input ----------------------------------------------------------------------------

#[test]
fn params_come_from_a_file_or_standard_input() {
    let env = plain();
    let file = env.path("params.json");
    std::fs::write(&file, json!({"V": "x".repeat(5_000_000)}).to_string()).unwrap();
    let output = run(&env, &["--script", "param($V) $V.Length", "--params", &format!("@{}", file.display())]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(json_stdout(&output), json!([5_000_000]));

    let mut child = env
        .psbridge()
        .args(["run", "--profile", "plain", "--script", "param($Name) \"Hello, $Name\"", "--params", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(br#"{"Name": "stdin"}"#).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(json_stdout(&output), json!(["Hello, stdin"]));

    // Standard input serves the parameters or a secret, not both.
    let env = CliEnv::new("[profiles.prompted.connect]\ncommand = \"Out-Null\"\nsecrets.InputObject = { stdin = true }\n");
    let output = env.psbridge().args(["run", "--profile", "prompted", "Get-Date", "--params", "-"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("standard input is already used (--params -)"), "{}", text(&output.stderr));
}

/// Peak resident memory of psbridge itself (not its worker) while it runs `args`, in kB.
fn peak_kb(env: &CliEnv, args: &[&str]) -> u64 {
    let mut child = env.psbridge().args(args).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let pid = child.id();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
            && let Some(kb) = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
        {
            peak = kb; // VmHWM only grows: the last reading is the peak
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0), "{out}");
    peak
}

#[test]
fn a_50_mb_parameter_costs_psbridge_about_twice_its_size() {
    let env = plain();
    let file = env.path("big.json");
    let size = 50_000_000;
    std::fs::write(&file, format!("{{\"V\": \"{}\"}}", "a".repeat(size))).unwrap();
    let base = peak_kb(&env, &["run", "--profile", "plain", "--script", "param($V) $V.Length", "--params", r#"{"V": "a"}"#]);
    let big = peak_kb(&env, &["run", "--profile", "plain", "--script", "param($V) $V.Length", "--params", &format!("@{}", file.display())]);
    // The value and its encoded line: 2 × 50 MB. Growing the line by doubling cost 3 × 50 MB.
    let limit = base + (size as u64 / 1024) * 5 / 2;
    assert!(big < limit, "psbridge peaked at {big} kB for a 50 MB parameter (a small one: {base} kB; limit {limit} kB)");
}

// ---- output options ----------------------------------------------------------------------------------

#[test]
fn envelope_with_format_is_refused() {
    let env = plain();
    let output = run_without_pwsh(&env, &["Get-Date", "--envelope", "--format", "csv"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("'--envelope' cannot be used with '--format"), "{}", text(&output.stderr));
}

#[test]
fn a_property_selected_twice_is_one_column_with_its_value() {
    let env = plain();
    for select in ["Alias,Alias", "Alias,alias"] {
        let output = run(&env, &["--script", "[pscustomobject]@{Alias = 'a1'; Department = 'Sales'}", "--select", select]);
        assert_eq!(json_stdout(&output), json!([{"Alias": "a1"}]), "--select {select}");
    }
}

#[test]
fn quiet_keeps_only_error_records_on_stderr_and_logs_have_no_colour_off_a_terminal() {
    let env = plain();
    let script = "Write-Warning 'warn-text'; Write-Verbose 'verbose-text' -Verbose; Write-Information 'info-text'; \
                  Write-Error 'error-text'; [pscustomobject]@{A = 1; B = 2}";
    let output = run(&env, &["--script", script, "--quiet", "--format", "csv", "--select", "A"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("error-text"), "{stderr}");
    for hidden in ["warn-text", "verbose-text", "info-text"] {
        assert!(!stderr.contains(hidden), "--quiet printed {hidden}: {stderr}");
    }
    assert_eq!(text(&output.stdout), "A\n1\n");

    let output = env.psbridge().env("RUST_LOG", "psbridge=debug").args(["run", "--profile", "plain", "--script", "1"]).output().unwrap();
    let stderr = text(&output.stderr);
    assert!(stderr.contains("DEBUG"), "the log was on: {stderr}");
    assert!(!stderr.contains('\u{1b}'), "ANSI escapes in a log that is not on a terminal: {stderr:?}");
}

/// Needs the worker to name the parameter of a bad tag (the library side of issue 9).
#[test]
fn a_bad_value_tag_is_reported_with_its_parameter() {
    let env = plain();
    let output = run(&env, &["--script", "param($WhenChanged) $WhenChanged", "--params", r#"{"WhenChanged": {"$psbridge": "nope", "value": 1}}"#]);
    assert_ne!(output.status.code(), Some(0));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("WhenChanged") && stderr.contains("nope"), "{stderr}");
}
