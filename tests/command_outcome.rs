//! How a command ended, as the library reports it: `exit N`, native exit codes, `succeeded()`, declined
//! confirmations and prompts. The PowerShell behaviour behind each expectation is in FINDINGS-pwsh.md
//! (hosted runspace vs. `pwsh -File`).

mod common;

use psbridge::{Command, InvocationResult, PipelineState, Runspace};
use serde_json::{Value, json};

async fn run(rs: &mut Runspace, script: &str) -> InvocationResult {
    rs.invoke(&Command::script(script)).await.unwrap_or_else(|e| panic!("{script}: {e}"))
}

fn values(r: &InvocationResult) -> Vec<Value> {
    r.output.iter().map(|o| o.value.clone()).collect()
}

fn messages(r: &InvocationResult) -> Vec<&str> {
    r.errors.iter().map(|e| e.message.as_str()).collect()
}

#[tokio::test]
async fn exit_n_in_a_script_is_the_exit_code_and_the_worker_goes_on() {
    let mut rs = common::plain().await;
    let pid = rs.pid();
    // Hosted, `exit` reaches only PSHost.SetShouldExit: no error, no $LASTEXITCODE, state Completed.
    let r = run(&mut rs, "'x'; exit 5; 'never'").await;
    assert_eq!(values(&r), [json!("x")], "exit stops the script");
    assert_eq!(r.exit_code, Some(5));
    assert_eq!(r.state, PipelineState::Completed);
    assert!(r.errors.is_empty());
    assert!(!r.succeeded(), "exit 5 is a failure");

    for (script, code) in [("exit", 0), ("exit 0", 0), ("exit 300", 300), ("exit -1", -1), ("function f { exit 6 }; f; 'never'", 6)] {
        let r = run(&mut rs, script).await;
        assert_eq!(r.exit_code, Some(code), "{script}");
        assert_eq!(r.succeeded(), code == 0, "{script}");
    }
    let r = run(&mut rs, "'no exit here'").await;
    assert_eq!(r.exit_code, None, "an exit code is not carried over from an earlier command");
    assert!(r.succeeded());
    assert_eq!(rs.pid(), pid, "exit ends the command, never the worker");
}

#[tokio::test]
async fn exit_in_a_script_file_run_as_a_command_is_its_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ends_in_exit_7.ps1");
    std::fs::write(&file, "'before'\nexit 7\n").unwrap();
    let mut rs = common::plain().await;
    // Run by path (AddCommand), PowerShell turns the exit into $LASTEXITCODE = 7 and HadErrors, with no
    // error record: psbridge must report it as the exit code, not as a native command's.
    let r = rs.invoke(&Command::new(file.display().to_string())).await.unwrap();
    assert_eq!(values(&r), [json!("before")]);
    assert_eq!(r.exit_code, Some(7));
    assert_eq!(r.native_exit_code, None, "no native command ran");
    assert!(!r.succeeded());

    // Called from a script, the file's exit ends only the file; the script goes on and did not exit.
    let script = format!("& '{}'; 'after'", file.display());
    let r = run(&mut rs, &script).await;
    assert_eq!(values(&r), [json!("before"), json!("after")]);
    assert_eq!(r.exit_code, None);
    assert_eq!(r.native_exit_code, None, "a script's exit is not a native command's");
    assert!(r.succeeded());
}

#[tokio::test]
async fn native_exit_codes_are_reported_for_the_command_that_ran_them() {
    let mut rs = common::plain().await;
    let r = run(&mut rs, "/bin/sh -c 'exit 3'; 'after'").await;
    assert_eq!(values(&r), [json!("after")]);
    assert_eq!(r.native_exit_code, Some(3));
    assert_eq!(r.exit_code, None);
    // A failing native command is not an error record, and pwsh -File exits 0 for it too.
    assert!(r.errors.is_empty());
    assert!(r.succeeded(), "only exit N, error records and failure count");

    let r = run(&mut rs, "/bin/false; /bin/true").await;
    assert_eq!(r.native_exit_code, Some(0), "the last native command counts");

    run(&mut rs, "/bin/sh -c 'exit 9'").await;
    // $LASTEXITCODE is a session global that outlives the command; this one ran no native command.
    let r = run(&mut rs, "'no native command'").await;
    assert_eq!(r.native_exit_code, None, "not carried over from the previous command");

    let r = run(&mut rs, "/bin/sh -c 'exit 4'; exit $LASTEXITCODE").await;
    assert_eq!((r.exit_code, r.native_exit_code), (Some(4), Some(4)));
    let r = run(&mut rs, "/bin/sh -c 'exit 4'; exit").await;
    assert_eq!(r.exit_code, Some(0), "bare exit is 0 whatever ran before");
}

#[tokio::test]
async fn succeeded_is_not_had_errors() {
    let mut rs = common::plain().await;
    // SilentlyContinue: PowerShell sets HadErrors without leaving any record.
    let r = run(&mut rs, "Get-Item /psbridge/nonexistent -ErrorAction SilentlyContinue; 'ok'").await;
    assert!(r.had_errors, "had_errors stays PowerShell's flag");
    assert!(r.errors.is_empty());
    assert!(r.succeeded());

    let r = run(&mut rs, "Write-Error 'psbridge-e'; 'after'").await;
    assert_eq!(r.state, PipelineState::Completed);
    assert!(!r.succeeded(), "an error record is a failure");

    let r = run(&mut rs, "Write-Error 'psbridge-e'; exit 0").await;
    assert_eq!(r.exit_code, Some(0));
    assert!(!r.succeeded(), "exit 0 does not hide an error record");

    let r = run(&mut rs, "throw 'psbridge-boom'").await;
    assert_eq!(r.state, PipelineState::Failed);
    assert!(!r.succeeded());
}

#[tokio::test]
async fn a_confirmation_that_cannot_be_shown_is_declined() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keep-me.txt");
    std::fs::write(&file, "x").unwrap();
    let mut rs = common::plain().await;

    // pwsh -File would throw from ShouldProcess (neither branch runs); psbridge answers No.
    let r = run(
        &mut rs,
        "function Remove-Thing {
            [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')] param()
            if ($PSCmdlet.ShouldProcess('t')) { 'removed' } else { 'declined' }
        }
        Remove-Thing; 'after'",
    )
    .await;
    assert_eq!(values(&r), [json!("declined"), json!("after")]);
    assert_eq!(r.state, PipelineState::Completed);
    assert_eq!(r.errors.len(), 1, "{:?}", messages(&r));
    let message = &r.errors[0].message;
    assert!(message.contains("Performing the operation \"Remove-Thing\" on target \"t\""), "says what was declined: {message}");
    assert!(message.contains("-Confirm:$false"), "says how to go ahead: {message}");
    assert!(!r.succeeded());

    // A real cmdlet: the file survives a declined Remove-Item -Confirm.
    let script = format!("Remove-Item -LiteralPath '{}' -Confirm", file.display());
    let r = run(&mut rs, &script).await;
    assert!(file.exists(), "a declined Remove-Item removes nothing");
    assert!(messages(&r).iter().any(|m| m.contains("-Confirm:$false")), "{:?}", messages(&r));

    // -Confirm:$false goes ahead without asking.
    let script = format!("Remove-Item -LiteralPath '{}' -Confirm:$false", file.display());
    let r = run(&mut rs, &script).await;
    assert!(r.succeeded(), "{:?}", messages(&r));
    assert!(!file.exists());

    // ShouldContinue is declined the same way.
    let r = run(
        &mut rs,
        "function Test-Go { [CmdletBinding(SupportsShouldProcess)] param()
            if ($PSCmdlet.ShouldContinue('psbridge-query?', 'psbridge-caption')) { 'went' } else { 'stayed' } }
        Test-Go",
    )
    .await;
    assert_eq!(values(&r), [json!("stayed")]);
    assert!(messages(&r).iter().any(|m| m.contains("psbridge-query?")), "{:?}", messages(&r));
}

#[tokio::test]
async fn prompts_for_input_fail_at_once_naming_the_prompt() {
    let mut rs = common::plain().await;
    let r = run(&mut rs, "Read-Host 'psbridge-name'; 'after'").await;
    assert_eq!(values(&r), [json!("after")], "a non-terminating error, as in pwsh");
    assert!(messages(&r).iter().any(|m| m.contains("psbridge-name")), "{:?}", messages(&r));

    let r = run(&mut rs, "Get-Credential -Message 'psbridge-why' -UserName u").await;
    assert!(messages(&r).iter().any(|m| m.contains("psbridge-why")), "{:?}", messages(&r));
    assert!(!r.succeeded());
}
