//! `psbridge run` against `pwsh -File`: the same script must give the same exit status, the same output and
//! the same error messages, except for the deliberate differences listed (with their reasons) in CASES.
//!
//! Every case runs once through `pwsh -NoLogo -NoProfile -NonInteractive -File` and once through the
//! psbridge binary (`run --script TEXT`, or `run PATH.ps1` for the cases that are files), several cases at
//! a time. The pwsh exit statuses written here are what pwsh 7.6 was seen to do (FINDINGS-pwsh.md); the
//! test checks them too, so a listed difference is a real one.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::cli::text;

/// One script of the corpus.
struct Case {
    name: &'static str,
    /// The script text; `{dir}` stands for the folder holding the case files (for scripts that call
    /// another file).
    script: &'static str,
    /// Run as `psbridge run PATH.ps1` (the worker runs the file as a command) instead of `--script TEXT`.
    file: bool,
    /// The exit status of `pwsh -File` for this script.
    pwsh_status: i32,
    /// Error text that pwsh prints on stderr, and psbridge too unless `difference` says otherwise.
    messages: &'static [&'static str],
    /// `None`: psbridge must do exactly what pwsh does. `Some`: what psbridge does instead, and why.
    difference: Option<Difference>,
}

/// A deliberate difference between psbridge and `pwsh -File`.
struct Difference {
    why: &'static str,
    /// psbridge's exit status.
    status: i32,
    /// psbridge's output, when it is not pwsh's.
    output: Option<&'static [&'static str]>,
    /// Text psbridge's stderr must hold (instead of `messages`).
    stderr: &'static [&'static str],
}

/// pwsh -File ignores non-terminating errors in its exit status; psbridge's contract is exit 1 when the
/// command wrote an error record, so that a caller (a script, CI) notices a Get-Mailbox that half failed.
const NON_TERMINATING: &str = "pwsh -File exits 0 after a non-terminating error; psbridge exits 1 when the command wrote an error record";

const CASES: &[Case] = &[
    // --- exit N: the status the OS sees is N & 0xFF; what ran before is kept ----------------------------
    Case { name: "exit_with_output", script: "'x'; exit 5", file: false, pwsh_status: 5, messages: &[], difference: None },
    Case { name: "bare_exit", script: "'x'; exit", file: false, pwsh_status: 0, messages: &[], difference: None },
    // ('b' shows that exit stops the whole script, not just the function)
    Case { name: "exit_in_a_function", script: "function f { exit 6 }\n'a'; f; 'b'", file: false, pwsh_status: 6, messages: &[], difference: None },
    Case { name: "exit_300_wraps", script: "exit 300", file: false, pwsh_status: 44, messages: &[], difference: None },
    Case { name: "exit_minus_1", script: "exit -1", file: false, pwsh_status: 255, messages: &[], difference: None },
    // A .ps1 run as a command: in a hosted runspace its `exit 7` only sets $LASTEXITCODE (and HadErrors).
    Case { name: "file_ending_in_exit_7", script: "'before'\nfunction f { 'in f' }\nf\nexit 7", file: true, pwsh_status: 7, messages: &[], difference: None },
    Case { name: "file_ending_in_exit_0", script: "'before'\nexit 0", file: true, pwsh_status: 0, messages: &[], difference: None },
    // `exit` in a script that the command calls ends that script only: the caller goes on and exits 0.
    Case {
        name: "exit_in_a_called_script",
        script: "'a'; & '{dir}/child_exit_7.ps1'; \"after child: $LASTEXITCODE\"",
        file: false,
        pwsh_status: 0,
        messages: &[],
        difference: None,
    },
    Case {
        name: "environment_exit",
        script: "'x'; [Environment]::Exit(4)",
        file: true,
        pwsh_status: 4,
        messages: &[],
        difference: Some(Difference {
            why: "[Environment]::Exit ends the hosting process: in psbridge that is the worker, which no host can \
                  survive; psbridge reports a bridge failure (exit 3) naming the worker's exit status, after \
                  printing what the command wrote before",
            status: 3,
            output: None,
            stderr: &["exit status: 4"],
        }),
    },
    // --- errors -------------------------------------------------------------------------------------------
    Case {
        name: "write_error",
        script: "Write-Error 'psbridge-nonterminating'; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["psbridge-nonterminating"],
        difference: Some(Difference { why: NON_TERMINATING, status: 1, output: None, stderr: &["psbridge-nonterminating"] }),
    },
    Case {
        name: "cmdlet_error",
        script: "Get-Item /psbridge/nonexistent; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["Cannot find path '/psbridge/nonexistent' because it does not exist."],
        difference: Some(Difference {
            why: NON_TERMINATING,
            status: 1,
            output: None,
            stderr: &["Cannot find path '/psbridge/nonexistent' because it does not exist."],
        }),
    },
    // SilentlyContinue: HadErrors is set but no error record exists; neither counts it as a failure.
    Case {
        name: "silently_continue",
        script: "Get-Item /psbridge/nonexistent -ErrorAction SilentlyContinue; 'ok'",
        file: false,
        pwsh_status: 0,
        messages: &[],
        difference: None,
    },
    Case { name: "throw", script: "throw 'psbridge-boom'", file: false, pwsh_status: 1, messages: &["psbridge-boom"], difference: None },
    Case { name: "throw_after_output", script: "'a'; throw 'psbridge-boom'; 'b'", file: false, pwsh_status: 1, messages: &["psbridge-boom"], difference: None },
    Case {
        name: "error_action_stop",
        script: "Write-Error 'psbridge-stop' -ErrorAction Stop; 'never'",
        file: false,
        pwsh_status: 1,
        messages: &["psbridge-stop"],
        difference: None,
    },
    Case {
        name: "error_action_preference_stop",
        script: "$ErrorActionPreference = 'Stop'; Write-Error 'psbridge-pref'; 'after'",
        file: false,
        pwsh_status: 1,
        messages: &["psbridge-pref"],
        difference: None,
    },
    Case {
        name: "parse_error",
        script: "'fine'\n\"unterminated",
        file: false,
        pwsh_status: 1,
        messages: &["The string is missing the terminator: \"."],
        difference: None,
    },
    // --- native commands: -File does not pass their status on; only `exit $LASTEXITCODE` does ----------------
    Case { name: "native_failure_mid_script", script: "/bin/false; 'x'", file: false, pwsh_status: 0, messages: &[], difference: None },
    Case { name: "native_failure_last", script: "/bin/sh -c 'exit 3'", file: false, pwsh_status: 0, messages: &[], difference: None },
    Case { name: "native_then_bare_exit", script: "/bin/sh -c 'exit 3'; exit", file: false, pwsh_status: 0, messages: &[], difference: None },
    Case {
        name: "native_status_passed_on",
        script: "/bin/sh -c 'exit 3'; 'x'; exit $LASTEXITCODE",
        file: false,
        pwsh_status: 3,
        messages: &[],
        difference: None,
    },
    // --- values ---------------------------------------------------------------------------------------------
    Case { name: "scalars", script: "1; 2.5; 'three'; $true; -7", file: false, pwsh_status: 0, messages: &[], difference: None },
    // pwsh prints nothing for $null; psbridge's nulls are left out of the comparison the same way
    // (that they arrive as JSON null is tests/proptest_values.rs's business).
    Case { name: "nulls", script: "$null; Write-Output $null; @($null, 1)", file: false, pwsh_status: 0, messages: &[], difference: None },
    Case {
        name: "warning",
        script: "Write-Warning 'psbridge-warn'; 'x'",
        file: false,
        pwsh_status: 0,
        messages: &[],
        difference: Some(Difference {
            why: "pwsh -File prints warnings on stdout among the output; psbridge keeps stdout for output objects \
                  and prints warnings on stderr (the comparison drops pwsh's WARNING: lines)",
            status: 0,
            output: None,
            stderr: &["WARNING: psbridge-warn"],
        }),
    },
    // --- prompts and confirmations ------------------------------------------------------------------------------
    Case {
        name: "read_host",
        script: "Read-Host 'psbridge-name'; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["PowerShell is in NonInteractive mode. Read and Prompt functionality is not available."],
        difference: Some(Difference {
            why: "a prompt fails at once in both, but psbridge exits 1 for the error record it leaves and its \
                  message names the prompt, which pwsh's does not",
            status: 1,
            output: None,
            stderr: &["psbridge-name"],
        }),
    },
    Case {
        name: "get_credential",
        script: "Get-Credential; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["PowerShell is in NonInteractive mode. Read and Prompt functionality is not available."],
        difference: Some(Difference {
            why: "pwsh -File prints the credential prompt (caption, message, 'User: ') on stdout before failing; \
                  psbridge prints nothing on stdout but the output, exits 1 for the error record, and names the \
                  prompt's message in it",
            status: 1,
            output: Some(&["after"]),
            stderr: &["Enter your credentials."],
        }),
    },
    Case {
        name: "should_process_declined",
        script: "function Remove-Thing {
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')] param()
    if ($PSCmdlet.ShouldProcess('t')) { 'removed' } else { 'declined' }
}
Remove-Thing; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["PowerShell is in NonInteractive mode. Read and Prompt functionality is not available."],
        difference: Some(Difference {
            why: "pwsh -File throws from ShouldProcess, so neither branch runs and the script exits 0; psbridge \
                  declines the confirmation (answers No), so the else branch runs, and leaves an error record \
                  saying what was declined and to pass -Confirm:$false (exit 1)",
            status: 1,
            output: Some(&["declined", "after"]),
            stderr: &["Performing the operation \"Remove-Thing\" on target \"t\"", "-Confirm:$false"],
        }),
    },
    Case {
        name: "should_process_confirm_false",
        script: "function Remove-Thing {
    [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')] param()
    if ($PSCmdlet.ShouldProcess('t')) { 'removed' } else { 'declined' }
}
Remove-Thing -Confirm:$false; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &[],
        difference: None,
    },
    Case {
        name: "should_continue_declined",
        script: "function Test-Go {
    [CmdletBinding(SupportsShouldProcess)] param()
    if ($PSCmdlet.ShouldContinue('psbridge-query?', 'psbridge-caption')) { 'went' } else { 'stayed' }
}
Test-Go; 'after'",
        file: false,
        pwsh_status: 0,
        messages: &["PowerShell is in NonInteractive mode. Read and Prompt functionality is not available."],
        difference: Some(Difference {
            why: "as for ShouldProcess: pwsh throws from ShouldContinue, psbridge answers No and says so in an error \
                  record",
            status: 1,
            output: Some(&["stayed", "after"]),
            stderr: &["psbridge-query?"],
        }),
    },
];

// ---------------------------------------------------------------------------------------------------
// Running both
// ---------------------------------------------------------------------------------------------------

/// What one program did with one case.
struct Run {
    status: Option<i32>,
    /// stdout as lines of text (pwsh) or output values in their string form (psbridge).
    output: Vec<String>,
    stderr: String,
}

fn pwsh(file: &Path) -> Run {
    let output = Command::new(psbridge::find_pwsh(None).expect("pwsh is installed"))
        .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-File"])
        .arg(file)
        .env("NO_COLOR", "1") // plain text, no ANSI colours around messages
        .stdin(Stdio::null())
        .output()
        .expect("pwsh runs");
    let output_lines = text(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with("WARNING: ")) // pwsh -File mixes warnings into stdout
        .map(str::to_owned)
        .collect();
    Run { status: output.status.code(), output: output_lines, stderr: text(&output.stderr) }
}

fn psbridge_run(world: &Path, case: &Case, file: &Path) -> Run {
    let empty_config = world.join("empty.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_psbridge"));
    cmd.env("PSBRIDGE_CONFIG", &empty_config)
        .env_remove("PSBRIDGE_PROFILE")
        .env("XDG_CONFIG_HOME", world.join("config-home"))
        .env("XDG_DATA_HOME", world.join("data"))
        .stdin(Stdio::null())
        .args(["run", "--format", "jsonl", "--timeout", "60"]);
    if case.file {
        cmd.arg(file);
    } else {
        cmd.arg("--script").arg(script_text(case, world));
    }
    let output: Output = cmd.output().expect("psbridge runs");
    let values = text(&output.stdout)
        .lines()
        .filter_map(|line| match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) => as_printed(&value),
            Err(_) => Some(format!("<not JSON: {line}>")),
        })
        .collect();
    Run { status: output.status.code(), output: values, stderr: text(&output.stderr) }
}

/// A value as `pwsh -File` prints it: strings bare, booleans as True/False, nothing for null.
fn as_printed(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_owned()),
        other => Some(other.to_string()),
    }
}

fn script_text(case: &Case, dir: &Path) -> String {
    case.script.replace("{dir}", &dir.display().to_string())
}

/// Error text with pwsh's ConciseView layout taken out: the `     | ` gutter of positioned errors, line
/// wrapping at 80 columns and repeated spaces.
fn flatten(stderr: &str) -> String {
    let words = stderr.lines().map(|line| match line.split_once('|') {
        Some((gutter, rest)) if gutter.trim().chars().all(|c| c.is_ascii_digit()) || gutter.trim() == "Line" => rest,
        _ => line,
    });
    words.flat_map(str::split_whitespace).collect::<Vec<_>>().join(" ")
}

fn contains(stderr: &str, message: &str) -> bool {
    flatten(stderr).contains(&message.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Everything wrong with one case, empty when it behaved.
fn check(case: &Case, pwsh: &Run, ours: &Run) -> Vec<String> {
    let mut problems = Vec::new();
    if pwsh.status != Some(case.pwsh_status) {
        problems.push(format!("pwsh -File exited {:?}, the table says {} (stderr: {})", pwsh.status, case.pwsh_status, pwsh.stderr.trim()));
    }
    for message in case.messages {
        if !contains(&pwsh.stderr, message) {
            problems.push(format!("pwsh's stderr lacks {message:?}: {}", pwsh.stderr.trim()));
        }
    }
    let (status, output, stderr): (Option<i32>, Vec<String>, &[&str]) = match &case.difference {
        None => (pwsh.status, pwsh.output.clone(), case.messages),
        Some(d) => (Some(d.status), d.output.map_or_else(|| pwsh.output.clone(), |o| o.iter().map(|s| s.to_string()).collect()), d.stderr),
    };
    if ours.status != status {
        problems.push(format!("psbridge exited {:?}, expected {status:?}", ours.status));
    }
    if ours.output != output {
        problems.push(format!("psbridge's output {:?}, expected {output:?}", ours.output));
    }
    for message in stderr {
        if !contains(&ours.stderr, message) {
            problems.push(format!("psbridge's stderr lacks {message:?}"));
        }
    }
    if !problems.is_empty() {
        problems.push(format!("psbridge's stderr was: {}", ours.stderr.trim()));
    }
    problems
}

#[test]
fn psbridge_run_behaves_like_pwsh_file_except_where_listed() {
    let world = tempfile::tempdir().unwrap();
    std::fs::write(world.path().join("empty.toml"), "").unwrap();
    std::fs::write(world.path().join("child_exit_7.ps1"), "'before'\nfunction f { 'in f' }\nf\nexit 7\n").unwrap();
    for case in CASES {
        std::fs::write(world.path().join(format!("{}.ps1", case.name)), script_text(case, world.path())).unwrap();
    }

    // Each run starts a pwsh (psbridge's worker is one too): a few cases at a time keeps the two cores
    // busy without every case waiting on all the others.
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                while let Some(case) = CASES.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let file = world.path().join(format!("{}.ps1", case.name));
                    let pwsh = pwsh(&file);
                    let ours = psbridge_run(world.path(), case, &file);
                    let problems = check(case, &pwsh, &ours);
                    if !problems.is_empty() {
                        failures.lock().unwrap().push(format!("{}:\n    {}", case.name, problems.join("\n    ")));
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap();
    failures.sort();
    assert!(failures.is_empty(), "{} of {} cases differ:\n{}", failures.len(), CASES.len(), failures.join("\n"));
}

#[test]
fn every_listed_difference_says_why_and_really_differs() {
    let mut names = std::collections::HashSet::new();
    for case in CASES {
        assert!(names.insert(case.name), "two cases are called {}", case.name);
        if let Some(difference) = &case.difference {
            assert!(difference.why.len() > 20, "{}: say why psbridge differs", case.name);
            let differs = difference.status != case.pwsh_status || difference.output.is_some() || !difference.stderr.is_empty();
            assert!(differs, "{}: listed as a difference but psbridge is expected to do what pwsh does", case.name);
        }
    }
}
