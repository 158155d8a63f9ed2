//! The Runspace against the real pwsh, without Exchange: streams, errors, values, safety, lifetime.
//! What only the bridge decides (timeouts, kills, crash reports, protocol violations) runs against the
//! fake worker instead, in milliseconds.

mod common;
mod fake_worker;

use std::time::Duration;

use psbridge::{Command, Error, ParamValue, PipelineState, StreamItem};
use serde_json::json;

#[tokio::test]
async fn handshake_reports_the_worker() {
    let runspace = common::plain().await;
    let info = runspace.info();
    assert_eq!(info.ps_edition, "Core");
    assert!(info.ps_version.starts_with('7'), "{}", info.ps_version);
    assert_eq!(info.pid, runspace.pid());
    assert!(common::alive(runspace.pid()));
}

#[tokio::test]
async fn every_stream_is_kept_apart_and_in_order() {
    let mut rs = common::plain().await;
    let script = r#"
        $VerbosePreference = 'Continue'; $DebugPreference = 'Continue'; $InformationPreference = 'Continue'
        'out1'
        Write-Warning 'warn1'
        Write-Verbose 'verbose1'
        Write-Debug 'debug1'
        Write-Information 'info1' -Tags t1
        Write-Host 'host1'
        Write-Progress -Activity 'act' -Status 'half' -PercentComplete 50
        Write-Error 'err1'
        'out2'
        Write-Warning 'warn2'
    "#;
    let mut stream = rs.invoke_stream(&Command::script(script)).unwrap();
    let mut order = Vec::new();
    while let Some(item) = stream.next_item().await.unwrap() {
        order.push(match item {
            StreamItem::Output(o) => format!("out:{}", o.value.as_str().unwrap()),
            StreamItem::Error(e) => format!("err:{}", e.message),
            StreamItem::Warning(w) => format!("warn:{w}"),
            StreamItem::Verbose(v) => format!("verbose:{v}"),
            StreamItem::Debug(d) => format!("debug:{d}"),
            StreamItem::Information(i) => format!("info:{}:{}", i.message.unwrap(), i.tags.join(",")),
            StreamItem::Progress(p) => format!("progress:{}:{}:{}", p.activity.unwrap(), p.status_description.unwrap(), p.percent_complete),
        });
    }
    let completion = stream.completion().unwrap();
    assert!(completion.had_errors, "Write-Error sets HadErrors");
    assert_eq!(completion.state, PipelineState::Completed);
    assert_eq!(
        order,
        [
            "out:out1", "warn:warn1", "verbose:verbose1", "debug:debug1", "info:info1:t1", "info:host1:PSHOST",
            "progress:act:half:50", "err:err1", "out:out2", "warn:warn2"
        ]
    );
}

#[tokio::test]
async fn collected_result_files_each_stream_separately() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("1; Write-Warning w; 2; Write-Host h")).await.unwrap();
    let values: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(values, [json!(1), json!(2)]);
    assert_eq!(r.warnings, ["w"]);
    assert_eq!(r.information[0].message.as_deref(), Some("h"));
    assert!(!r.had_errors);
    assert!(r.duration > Duration::ZERO);
}

#[tokio::test]
async fn error_records_carry_their_fields() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::new("Get-Item").param("Path", "/no/such/psbridge/file")).await.unwrap();
    assert!(r.had_errors);
    assert_eq!(r.state, PipelineState::Completed, "a non-terminating error does not stop the pipeline");
    let e = &r.errors[0];
    assert!(e.message.contains("/no/such/psbridge/file"), "{}", e.message);
    assert_eq!(e.category, "ObjectNotFound");
    assert_eq!(e.reason.as_deref(), Some("ItemNotFoundException"));
    assert_eq!(e.target_name.as_deref(), Some("/no/such/psbridge/file"));
    assert_eq!(e.fully_qualified_error_id.as_deref(), Some("PathNotFound,Microsoft.PowerShell.Commands.GetItemCommand"));
    assert_eq!(e.exception_type.as_deref(), Some("System.Management.Automation.ItemNotFoundException"));
    assert_eq!(e.command.as_deref(), Some("Get-Item"));
    assert!(!e.terminating);

    let r = rs.invoke(&Command::script("function Inner { throw 'boom' }\nInner")).await.unwrap();
    assert!(r.had_errors);
    assert_eq!(r.state, PipelineState::Failed);
    let e = &r.errors[0];
    assert_eq!(e.message, "boom");
    assert!(e.terminating);
    assert_eq!(e.category, "OperationStopped");
    assert!(e.script_stack_trace.as_deref().unwrap().contains("at Inner"), "{:?}", e.script_stack_trace);

    // An unknown command is a terminating error the caller can read, not a bridge failure.
    let r = rs.invoke(&Command::new("Get-PsbridgeNothing")).await.unwrap();
    assert_eq!(r.state, PipelineState::Failed);
    assert_eq!(r.errors[0].fully_qualified_error_id.as_deref(), Some("CommandNotFoundException"));
}

#[tokio::test]
async fn values_serialize_with_their_types() {
    let mut rs = common::plain().await;
    let script = r#"
        $cycle = [pscustomobject]@{ Name = 'loop' }
        $cycle | Add-Member -NotePropertyName Self -NotePropertyValue $cycle
        [pscustomobject]@{
            Text = 'x'; Int = 42; Big = 9007199254740993; Float = 1.5; Bool = $true; Null = $null
            Utc = [datetime]::new(2026, 1, 2, 3, 4, 5, [DateTimeKind]::Utc)
            Offset = [datetimeoffset]::new(2026, 1, 2, 3, 4, 5, [timespan]::FromHours(2))
            Day = [DayOfWeek]::Friday
            Id = [guid]'0f8fad5b-d9cb-469f-a165-70867728950e'
            Bytes = [byte[]](0, 1, 2, 255)
            List = @(1, 'two', $null)
            Table = @{ k = 'v' }
            Nested = [pscustomobject]@{ Inner = [pscustomobject]@{ Deeper = [pscustomobject]@{ Deepest = [pscustomobject]@{ TooDeep = 1 } } } }
            Cycle = $cycle
            Span = [timespan]::FromMinutes(90)
        } | ForEach-Object { $_.pstypenames.Insert(0, 'Psbridge.Test'); $_ }
    "#;
    let r = rs.invoke(&Command::script(script)).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    let o = &r.output[0];
    assert_eq!(o.type_names[0], "Psbridge.Test");
    assert!(o.is_type("System.Management.Automation.PSCustomObject"));
    let v = &o.value;
    assert_eq!(v["Text"], "x");
    assert_eq!(v["Int"], 42);
    assert_eq!(v["Big"].as_i64(), Some(9007199254740993));
    assert_eq!(v["Float"], 1.5);
    assert_eq!(v["Bool"], true);
    assert!(v["Null"].is_null());
    assert_eq!(v["Utc"], "2026-01-02T03:04:05Z");
    assert_eq!(v["Offset"], "2026-01-02T03:04:05+02:00");
    assert_eq!(v["Day"], "Friday");
    assert_eq!(v["Id"], "0f8fad5b-d9cb-469f-a165-70867728950e");
    assert_eq!(v["Bytes"], "AAEC/w==");
    assert_eq!(v["List"], json!([1, "two", null]));
    assert_eq!(v["Table"], json!({"k": "v"}));
    assert_eq!(v["Span"], "01:30:00");
    // depth 4 (the default): the fourth level of nesting becomes its ToString()
    assert!(v["Nested"]["Inner"]["Deeper"]["Deepest"].is_string(), "{}", v["Nested"]);
    // a cycle is cut, never followed
    assert_eq!(v["Cycle"]["Name"], "loop");
    assert!(v["Cycle"]["Self"].is_string(), "{}", v["Cycle"]);
    // property order is kept
    let keys: Vec<_> = v.as_object().unwrap().keys().take(3).cloned().collect();
    assert_eq!(keys, ["Text", "Int", "Big"]);
}

#[tokio::test]
async fn parameters_bind_by_name_with_their_types() {
    let mut rs = common::plain().await;
    let script = r#"
        param([string] $Text, [int] $Count, [switch] $Flag, [switch] $Off, [string[]] $Names, [hashtable] $Table,
              [object] $Nothing, [datetime] $When, [byte[]] $Bytes)
        [pscustomobject]@{
            Text = $Text; Count = $Count; Flag = $Flag.IsPresent; Off = $Off.IsPresent; Names = $Names -join '|'
            TableValue = $Table['nested']['k']; NothingIsNull = $null -eq $Nothing
            When = $When.ToUniversalTime().ToString('o'); BytesLength = $Bytes.Length; BytesLast = $Bytes[-1]
        }
    "#;
    let command = Command::script(script)
        .param("Text", "hello")
        .param("Count", 3)
        .switch("Flag")
        .param("Off", false)
        .param("Names", json!(["a", "b"]))
        .param("Table", json!({"nested": {"k": "v"}}))
        .param("Nothing", serde_json::Value::Null)
        .param("When", ParamValue::DateTime("2026-05-06T07:08:09Z".into()))
        .param("Bytes", ParamValue::Bytes(vec![9, 8, 7]));
    let r = rs.invoke(&command).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    assert_eq!(
        r.output[0].value,
        json!({"Text": "hello", "Count": 3, "Flag": true, "Off": false, "Names": "a|b", "TableValue": "v",
               "NothingIsNull": true, "When": "2026-05-06T07:08:09.0000000Z", "BytesLength": 3, "BytesLast": 7})
    );
}

#[tokio::test]
async fn pipelines_pipe_output_into_the_next_command() {
    let mut rs = common::plain().await;
    let command = Command::script("1..10").pipe("Where-Object").param("Property", "ToString").pipe("Select-Object").param("Last", 2);
    // Where-Object -Property ToString is true for every number; Select-Object -Last 2 keeps 9 and 10.
    let r = rs.invoke(&command).await.unwrap();
    let values: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(values, [json!(9), json!(10)]);
}

#[tokio::test]
async fn parameter_values_are_inert_data() {
    let mut rs = common::plain().await;
    let marker = tempfile::NamedTempFile::new().unwrap();
    let path = marker.path().display().to_string();
    let hostile = [
        format!("$(Remove-Item '{path}')"),
        format!("'; Remove-Item '{path}'; '"),
        format!("\"; Remove-Item \"{path}\"; \""),
        format!("`$(Remove-Item {path})"),
        "'; exit; '".to_string(),
        "\n exit 1 \n".to_string(),
    ];
    for value in &hostile {
        let r = rs.invoke(&Command::new("Write-Output").param("InputObject", value.as_str())).await.unwrap();
        assert_eq!(r.output[0].value, json!(value), "the value comes back unchanged");
        let r = rs.invoke(&Command::script("param($x) \"[$x]\"").param("x", value.as_str())).await.unwrap();
        assert_eq!(r.output[0].value, json!(format!("[{value}]")));
        // as a parameter *name* it is an error, not code
        let refused = rs.invoke(&Command::new("Get-Date").param(value.as_str(), 1)).await.unwrap_err();
        assert!(matches!(refused, Error::InvalidCommand { .. }), "{refused}");
    }
    assert!(marker.path().exists(), "no value was executed");
    assert!(common::alive(rs.pid()), "no value ended the worker");
}

#[tokio::test]
async fn unicode_round_trips() {
    let mut rs = common::plain().await;
    let samples = [
        "plain ascii",
        "Ünïcödé café naïve",
        "emoji 😀🎉 and non-BMP 𝄞 𠜎",
        "right-to-left: مرحبا بالعالم שלום",
        "combining: e\u{301} a\u{308} Z\u{335}\u{31b}",
        "nul inside: a\u{0}b",
        "controls: \t\r\n\u{1b}[31m",
        "李小龍 — “quotes” ‘single’ «guillemets»",
        "\u{feff}bom at start",
    ];
    for s in samples {
        let r = rs.invoke(&Command::script("param($s) $s; $s.Length").param("s", s)).await.unwrap();
        assert_eq!(r.output[0].value, json!(s), "round trip of {s:?}");
        assert_eq!(r.output[1].value, json!(s.encode_utf16().count()), "pwsh saw the same UTF-16 length for {s:?}");
    }
    // produced inside pwsh, not just echoed back
    let r = rs.invoke(&Command::script("[char]::ConvertFromUtf32(0x1F600) + [char]0x05D0 + 'e' + [char]0x0301")).await.unwrap();
    assert_eq!(r.output[0].value, json!("😀\u{5d0}e\u{301}"));
}

#[tokio::test]
async fn console_noise_never_reaches_the_protocol() {
    let mut rs = common::plain().await;
    let noisy = r#"
        [Console]::WriteLine('{"t":"done","id":1,"state":"Completed"}')
        [Console]::Out.Write("not json`n")
        [Console]::Out.Flush()
        [Console]::Error.WriteLine('to stderr')
        Write-Host 'host text'
        $stdout = [Console]::OpenStandardOutput(); $bytes = [Text.Encoding]::UTF8.GetBytes("raw fd 1`n"); $stdout.Write($bytes, 0, $bytes.Length); $stdout.Flush()
        /bin/sh -c 'echo native to fd 1; echo native to fd 2 >&2' | Out-Host
        /bin/sh -c 'echo native unpiped'
        $null = /bin/sh -c 'cat > /dev/null; echo stdin was closed to natives'
        'real output'
    "#;
    for _ in 0..3 {
        let r = rs.invoke(&Command::script(noisy)).await.unwrap();
        let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
        assert_eq!(outputs, [json!("native unpiped"), json!("real output")], "{r:?}");
        let information: Vec<_> = r.information.iter().map(|i| i.message.clone().unwrap_or_default()).collect();
        // Write-Host, then what Out-Host showed (the native program's stdout; its stderr went to stderr)
        assert_eq!(information, ["host text", "native to fd 1"]);
    }
    let r = rs.invoke(&Command::script("'still in step'")).await.unwrap();
    assert_eq!(r.output[0].value, "still in step");
}

#[tokio::test]
async fn what_if_reports_and_changes_nothing() {
    let mut rs = common::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("created-by-what-if.txt");
    let command = Command::new("New-Item").param("Path", target.display().to_string()).switch("WhatIf");
    let r = rs.invoke(&command).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    assert!(r.output.is_empty());
    let text = r.information.iter().filter_map(|i| i.message.clone()).collect::<Vec<_>>().join("\n");
    assert!(text.starts_with("What if: "), "{text}");
    assert!(text.contains("created-by-what-if.txt"), "{text}");
    assert!(r.information[0].tags.contains(&"PSHOST".to_string()));
    assert!(!target.exists(), "-WhatIf changed nothing");
}

#[tokio::test]
async fn confirmations_are_declined_and_other_prompts_fail_fast() {
    let mut rs = common::plain().await;
    // What a guarded removal looks like: throwing from the prompt would end only the `if`, and the
    // removal after it would run; the host must answer No.
    let define = r#"function global:Remove-Thing { [CmdletBinding(SupportsShouldProcess, ConfirmImpact = 'High')] param()
                    if ($PSCmdlet.ShouldProcess('thing')) { 'removed' }
                    'went on' }
                    function global:Clear-Thing { [CmdletBinding()] param()
                    if ($PSCmdlet.ShouldContinue('Clear everything?', 'Clearing')) { 'cleared' } }"#;
    rs.invoke(&Command::script(define)).await.unwrap();
    let limit = Duration::from_secs(30);
    let r = tokio::time::timeout(limit, rs.invoke(&Command::new("Remove-Thing"))).await.expect("no hang").unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("went on")], "declined: the guarded action did not run, the rest did");
    assert!(!r.succeeded());
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    let declined = &r.errors[0];
    assert_eq!(declined.fully_qualified_error_id.as_deref(), Some("PsBridgeConfirmationDeclined"));
    assert!(declined.message.contains("declined") && declined.message.contains("-Confirm:$false"), "{declined:?}");
    assert!(declined.message.contains("thing"), "names what was declined: {declined:?}");
    let r = tokio::time::timeout(limit, rs.invoke(&Command::new("Clear-Thing"))).await.expect("no hang").unwrap();
    assert!(r.output.is_empty() && r.errors[0].fully_qualified_error_id.as_deref() == Some("PsBridgeConfirmationDeclined"), "{r:?}");
    let r = rs.invoke(&Command::new("Remove-Thing").param("Confirm", false)).await.unwrap();
    assert_eq!(r.output[0].value, "removed");
    assert!(r.succeeded());
    for (script, shown) in [
        ("Read-Host 'Your name?'", "Your name?"),
        ("Read-Host 'Token' -AsSecureString", "Token"),
        ("Get-Credential -UserName admin -Message 'Sign in to contoso'", "Sign in to contoso"),
        ("$Host.UI.PromptForChoice('Pick a colour', 'which?', [System.Management.Automation.Host.ChoiceDescription[]]@('&Red', '&Blue'), 0)", "Pick a colour"),
    ] {
        let r = tokio::time::timeout(limit, rs.invoke(&Command::script(script))).await.expect("no hang").unwrap();
        assert!(!r.succeeded(), "{script}");
        let message = &r.errors[0].message;
        assert!(message.contains("non-interactive") && message.contains(shown), "{script}: {message}");
    }
}

#[tokio::test]
async fn exit_in_a_command_ends_the_command_not_the_worker() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("'before'; exit 3; 'after'")).await.unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("before")]);
    assert_eq!(r.exit_code, Some(3));
    assert!(!r.succeeded(), "exit 3 is a failure");
    let r = rs.invoke(&Command::script("'still here'")).await.unwrap();
    assert_eq!(r.output[0].value, "still here");
    assert_eq!(r.exit_code, None, "the exit code belongs to the command that exited");
    let r = rs.invoke(&Command::script("exit")).await.unwrap();
    assert_eq!(r.exit_code, Some(0));
    assert!(r.succeeded());
}

#[tokio::test]
async fn exit_in_a_script_file_ends_it_as_pwsh_file_does() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("seven.ps1");
    std::fs::write(&script, "'in seven'\nexit 7\n'never'\n").unwrap();
    let inner = dir.path().join("outer.ps1");
    std::fs::write(&inner, format!("& '{}'\n\"after: $LASTEXITCODE\"\n", script.display())).unwrap();
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::new(script.display().to_string())).await.unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("in seven")]);
    assert_eq!(r.exit_code, Some(7), "{r:?}");
    // Called from another script, `exit` ends only that script, as in pwsh.
    let r = rs.invoke(&Command::new(inner.display().to_string())).await.unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("in seven"), json!("after: 7")]);
    assert_eq!(r.exit_code, None, "{r:?}");
    // The switch that made the first one end the pipeline does not leak into the next command.
    let r = rs.invoke(&Command::script(format!("& '{}'; 'went on'", script.display()))).await.unwrap();
    assert_eq!(r.output.last().unwrap().value, "went on", "{r:?}");
}

#[tokio::test]
async fn native_exit_codes_are_reported_per_command() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("/bin/sh -c 'exit 3'; 'after'")).await.unwrap();
    assert_eq!(r.native_exit_code, Some(3));
    assert_eq!(r.exit_code, None);
    assert!(r.succeeded(), "as with pwsh -File, a native exit code alone does not fail the command: {r:?}");
    let r = rs.invoke(&Command::script("'no native program'")).await.unwrap();
    assert_eq!(r.native_exit_code, None, "an earlier command's $LASTEXITCODE is not this one's");
    let r = rs.invoke(&Command::script("/bin/true")).await.unwrap();
    assert_eq!(r.native_exit_code, Some(0));
}

#[tokio::test]
async fn null_is_a_value_on_every_path() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("$null; Write-Output $null; @{ k = $null; a = @(1, $null) }; $h = @{}; $h['missing']")).await.unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!(null), json!(null), json!({"k": null, "a": [1, null]}), json!(null)]);
    assert!(r.succeeded());
    let r = rs.invoke(&Command::script("param($V) ,$V").param("V", json!(null))).await.unwrap();
    assert_eq!(r.output.len(), 1);
    assert!(r.output[0].value.is_null());
}

#[tokio::test]
async fn a_suppressed_error_sets_had_errors_but_is_no_failure() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("Get-Item /nonexistent -ErrorAction SilentlyContinue; 'ok'")).await.unwrap();
    assert!(r.had_errors, "PowerShell's raw flag, as the real Connect-ExchangeOnline leaves it");
    assert!(r.errors.is_empty());
    assert!(r.succeeded());
}

#[tokio::test]
async fn output_cut_at_the_depth_is_warned_about() {
    let mut rs = common::builder().depth(2).open().await.unwrap();
    let script = "[pscustomobject]@{ Name = 'x'; Inner = @{ Deeper = @{ Deepest = 1 } }; List = ,(,(,1)) }";
    let r = rs.invoke(&Command::script(script)).await.unwrap();
    assert_eq!(r.output[0].value["Inner"]["Deeper"], "System.Collections.Hashtable");
    assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    let warning = &r.warnings[0];
    assert!(warning.contains("Inner.Deeper") && warning.contains("List[0]") && warning.contains("depth 2"), "{warning}");
    let r = rs.invoke(&Command::script(script).depth(5)).await.unwrap();
    assert_eq!(r.output[0].value["Inner"]["Deeper"]["Deepest"], 1, "a command's own depth wins");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
}

#[tokio::test]
async fn numbers_beyond_64_bits_arrive_exact_and_bad_values_name_their_parameter() {
    let mut rs = common::plain().await;
    for text in ["9223372036854775807", "18446744073709551615", "1180591620717411303424", "-1267650600228229401496703205376"] {
        let value: serde_json::Value = serde_json::from_str(text).unwrap();
        let r = rs.invoke(&Command::script("param($V) ,$V").param("V", value)).await.unwrap();
        assert_eq!(r.output[0].value.to_string(), text, "{text} came back rounded");
    }
    let tagged = json!({"$psbridge": "nope", "value": 1});
    let r = rs.invoke(&Command::script("param($Thing) $Thing").param("Thing", tagged)).await.unwrap();
    assert!(!r.succeeded());
    assert!(r.errors[0].message.contains("parameter Thing") && r.errors[0].message.contains("nope"), "{:?}", r.errors[0]);
}

#[tokio::test]
async fn values_too_deep_are_refused_before_sending_and_the_deepest_allowed_arrive() {
    let mut rs = common::plain().await;
    let mut value = json!("leaf");
    for _ in 0..psbridge::MAX_VALUE_DEPTH {
        value = json!([value]);
    }
    let r = rs.invoke(&Command::script("param($V) $V | ConvertTo-Json -Depth 100 -Compress").param("V", value.clone())).await.unwrap();
    assert!(r.succeeded(), "{:?}", r.errors);
    let error = rs.invoke(&Command::script("param($V) 1").param("V", json!([value]))).await.unwrap_err();
    assert!(matches!(error, Error::InvalidCommand { .. }) && error.to_string().contains("too deep"), "{error}");
    assert_eq!(rs.invoke(&Command::script("'alive'")).await.unwrap().output[0].value, "alive");
}

#[tokio::test]
async fn cancel_stops_the_command_and_keeps_the_worker() {
    let mut rs = common::plain().await;
    rs.invoke(&Command::script("$global:kept = 'state survives'")).await.unwrap();
    let cancel = rs.cancel_handle();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(cancel.cancel(), "a command was running");
    });
    let r = rs.invoke(&Command::script("'before'; Start-Sleep -Seconds 60; 'after'")).await;
    assert!(matches!(r, Err(Error::Cancelled { worker_killed: false })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let r = rs.invoke(&Command::script("$global:kept")).await.unwrap();
    assert_eq!(r.output[0].value, "state survives");
    assert!(!rs.cancel_handle().cancel(), "nothing is running now");
}

#[tokio::test]
async fn dropping_an_invocation_stops_it_and_the_next_command_is_not_confused() {
    let mut rs = common::plain().await;
    {
        let mut stream = rs.invoke_stream(&Command::script("1..1000000 | ForEach-Object { $_ }")).unwrap();
        for expected in 1..=10 {
            match stream.next_item().await.unwrap() {
                Some(StreamItem::Output(o)) => assert_eq!(o.value, json!(expected)),
                other => panic!("{other:?}"),
            }
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(30), rs.invoke(&Command::script("'fresh'"))).await.unwrap().unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("fresh")], "no output of the abandoned command leaks into the next");

    // the same through a dropped future
    let abandoned = tokio::time::timeout(Duration::from_millis(800), rs.invoke(&Command::script("Start-Sleep 60"))).await;
    assert!(abandoned.is_err());
    let r = tokio::time::timeout(Duration::from_secs(30), rs.invoke(&Command::script("'next'"))).await.unwrap().unwrap();
    assert_eq!(r.output[0].value, "next");
}

#[tokio::test]
async fn a_cancel_the_worker_honours_keeps_the_worker() {
    let mut rs = fake_worker::builder().open().await.unwrap();
    let pid = rs.pid();
    let cancel = rs.cancel_handle();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(cancel.cancel(), "a command was running");
    });
    let r = rs.invoke(&Command::script("echo \"before\"\nsleep 60000\necho \"after\"")).await;
    assert!(matches!(r, Err(Error::Cancelled { worker_killed: false })), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let r = rs.invoke(&Command::script("echo \"alive\"")).await.unwrap();
    assert_eq!(r.output[0].value, "alive", "the stopped command's items are not the next one's");
    assert_eq!(rs.pid(), pid);
    assert!(!rs.cancel_handle().cancel(), "nothing is running now");
}

#[tokio::test]
async fn a_cancel_the_worker_ignores_kills_it_after_the_stop_grace() {
    let mut rs = fake_worker::builder().stop_grace(Duration::from_millis(500)).open().await.unwrap();
    let pid = rs.pid();
    let cancel = rs.cancel_handle();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
    });
    let r = rs.invoke(&Command::script("hang")).await;
    assert!(matches!(r, Err(Error::Cancelled { worker_killed: true })), "{r:?}");
    assert!(common::gone_within(pid, Duration::from_secs(10)).await, "the worker process is gone");
    match rs.invoke(&Command::script("echo 1")).await.unwrap_err() {
        Error::WorkerExited(exit) => assert!(exit.killed_by_bridge.as_deref().unwrap().contains("cancelled command did not stop")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn late_messages_of_an_abandoned_command_are_dropped_by_id() {
    let mut rs = fake_worker::builder().open().await.unwrap();
    {
        // Twenty items, then a wait: the caller reads ten and drops the stream.
        let script: String = (1..=20).map(|i| format!("echo {i}\n")).chain(["sleep 60000".to_owned()]).collect();
        let mut stream = rs.invoke_stream(&Command::script(script)).unwrap();
        for expected in 1..=10 {
            match stream.next_item().await.unwrap() {
                Some(StreamItem::Output(o)) => assert_eq!(o.value, json!(expected)),
                other => panic!("{other:?}"),
            }
        }
    }
    // Sent before the abandoned command's done (and perhaps its last items) arrived.
    let r = tokio::time::timeout(Duration::from_secs(30), rs.invoke(&Command::script("echo \"fresh\""))).await.unwrap().unwrap();
    let outputs: Vec<_> = r.output.iter().map(|o| o.value.clone()).collect();
    assert_eq!(outputs, [json!("fresh")], "no item of the abandoned command leaks into the next");

    let abandoned = tokio::time::timeout(Duration::from_millis(200), rs.invoke(&Command::script("sleep 60000"))).await;
    assert!(abandoned.is_err());
    let r = tokio::time::timeout(Duration::from_secs(30), rs.invoke(&Command::script("echo \"next\""))).await.unwrap().unwrap();
    assert_eq!(r.output[0].value, "next");
}

#[tokio::test]
async fn timeout_stops_a_stoppable_command_and_keeps_the_worker() {
    let mut rs = fake_worker::builder().open().await.unwrap();
    let pid = rs.pid();
    let r = rs.invoke(&Command::script("sleep 60000").timeout(Duration::from_secs(1))).await;
    assert!(matches!(r, Err(Error::Timeout { worker_killed: false, .. })), "{r:?}");
    let message = r.unwrap_err().to_string();
    assert!(message.contains("<script> timed out after 1 s") && message.contains("worker was kept"), "{message}");
    let r = rs.invoke(&Command::script("echo \"alive\"")).await.unwrap();
    assert_eq!(r.output[0].value, "alive");
    assert_eq!(rs.pid(), pid);
}

#[tokio::test]
async fn timeout_kills_a_worker_that_cannot_stop() {
    let mut rs = fake_worker::builder().stop_grace(Duration::from_secs(1)).open().await.unwrap();
    let pid = rs.pid();
    // Ignores the cancel, as a .NET call that PowerShell's Stop() cannot interrupt does.
    let hang = Command::script("hang").timeout(Duration::from_secs(1));
    let r = rs.invoke(&hang).await;
    let error = r.unwrap_err();
    assert!(matches!(error, Error::Timeout { worker_killed: true, .. }), "{error:?}");
    assert!(error.to_string().contains("worker was killed"), "{error}");
    assert!(common::gone_within(pid, Duration::from_secs(10)).await, "the worker process is gone");
    let later = rs.invoke(&Command::script("echo 1")).await.unwrap_err();
    match later {
        Error::WorkerExited(exit) => assert!(exit.killed_by_bridge.as_deref().unwrap().contains("timed out")),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_crashed_worker_is_reported_with_status_and_stderr_on_every_call() {
    let mut rs = fake_worker::builder().open().await.unwrap();
    let crash = Command::script("crash 37 last words before the crash");
    let error = rs.invoke(&crash).await.unwrap_err();
    let Error::WorkerExited(exit) = &error else { panic!("{error:?}") };
    assert_eq!(exit.status.and_then(|s| s.code()), Some(37));
    assert!(exit.stderr_tail.iter().any(|l| l.contains("last words before the crash")), "{:?}", exit.stderr_tail);
    assert!(exit.killed_by_bridge.is_none());
    let text = error.to_string();
    assert!(text.contains("37") && text.contains("last words"), "{text}");
    for _ in 0..2 {
        let again = rs.invoke(&Command::script("echo 1")).await.unwrap_err();
        assert_eq!(again.to_string(), text, "the cached exit is reported again");
    }
}

#[tokio::test]
async fn a_protocol_violation_kills_the_worker_and_is_reported_on_every_call() {
    let mut rs = fake_worker::builder().open().await.unwrap();
    let pid = rs.pid();
    let error = rs.invoke(&Command::script("echo 1\ngarbage\nsleep 60000")).await.unwrap_err();
    assert!(matches!(error, Error::ProtocolViolation(_)), "{error:?}");
    let text = error.to_string();
    assert!(text.contains("this is not a protocol message"), "the line is named: {text}");
    assert!(common::gone_within(pid, Duration::from_secs(10)).await, "nothing it says can be trusted: it was killed");
    for _ in 0..2 {
        let again = rs.invoke(&Command::script("echo 1")).await.unwrap_err();
        assert_eq!(again.to_string(), text, "the violation is reported again");
    }
}

#[tokio::test]
async fn output_streams_with_bounded_memory_in_both_processes() {
    let mut rs = common::plain().await;
    let pid = rs.pid();
    // Warm up so that the baseline includes the serializer and the pipeline machinery.
    rs.invoke(&Command::script("1..1000 | ForEach-Object { [pscustomobject]@{ i = $_ } }")).await.unwrap();
    let worker_before = common::status_kb(pid, "VmRSS");
    let own_before = common::status_kb(std::process::id(), "VmRSS");
    // 100,000 objects of about 2 KB each: about 200 MB of JSON if anything held it all.
    let script = "$pad = 'x' * 2000; 1..100000 | ForEach-Object { [pscustomobject]@{ i = $_; pad = $pad } }";
    let mut stream = rs.invoke_stream(&Command::script(script)).unwrap();
    let mut count = 0u64;
    let mut worker_peak = 0;
    let mut own_peak = 0;
    while let Some(item) = stream.next_item().await.unwrap() {
        let StreamItem::Output(o) = item else { panic!("{item:?}") };
        count += 1;
        assert_eq!(o.value["i"], json!(count), "objects arrive in order");
        if count == 100 {
            // A slow consumer: the worker must wait instead of buffering.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if count.is_multiple_of(5000) {
            worker_peak = worker_peak.max(common::status_kb(pid, "VmRSS"));
            own_peak = own_peak.max(common::status_kb(std::process::id(), "VmRSS"));
        }
    }
    assert_eq!(count, 100_000);
    let worker_growth_mb = worker_peak.saturating_sub(worker_before) / 1024;
    let own_growth_mb = own_peak.saturating_sub(own_before) / 1024;
    assert!(worker_growth_mb < 120, "worker grew {worker_growth_mb} MB while streaming");
    assert!(own_growth_mb < 60, "the caller grew {own_growth_mb} MB while streaming");
}

#[tokio::test]
async fn pwsh_missing_gives_a_clear_error() {
    let error = psbridge::Runspace::builder().pwsh("/nonexistent/psbridge/pwsh").open().await.unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, Error::PwshNotFound { .. }), "{error:?}");
    assert!(text.contains("/nonexistent/psbridge/pwsh"), "{text}");
    assert!(text.contains("dotnet tool install --global PowerShell"), "{text}");
}

#[tokio::test]
async fn a_module_that_does_not_import_fails_the_start_with_its_record() {
    let error = common::builder().module("Psbridge.NoSuchModule").open().await.unwrap_err();
    let Error::ModuleImport { records } = &error else { panic!("{error:?}") };
    assert!(records[0].message.contains("Psbridge.NoSuchModule"), "{records:?}");
    assert!(records[0].fully_qualified_error_id.is_some());
}

#[tokio::test]
async fn module_minimum_version_is_enforced() {
    let error = common::builder()
        .module_path(common::sim_modules())
        .module_with_version("ExchangeOnlineManagement", "99.0")
        .open()
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ModuleImport { .. }), "{error:?}");
    let rs = common::builder()
        .module_path(common::sim_modules())
        .module_with_version("ExchangeOnlineManagement", "3.0")
        .open()
        .await;
    assert!(rs.is_ok(), "{rs:?}");
}

#[tokio::test]
async fn session_variables_are_defined_before_anything_runs() {
    let mut rs = common::builder().variable("Tenant", "contoso").variable("Limit", 5).open().await.unwrap();
    let r = rs.invoke(&Command::script("\"$Tenant/$Limit\"")).await.unwrap();
    assert_eq!(r.output[0].value, "contoso/5");
}

#[tokio::test]
async fn close_ends_the_worker_and_drop_kills_it() {
    let rs = common::builder().shutdown_grace(Duration::from_secs(20)).open().await.unwrap();
    let pid = rs.pid();
    // The worker honours the exit request: close() does not sit out the shutdown grace and kill it.
    tokio::time::timeout(Duration::from_secs(15), rs.close()).await.expect("the worker exits when asked").unwrap();
    assert!(!common::alive(pid));

    let rs = common::plain().await;
    let pid = rs.pid();
    drop(rs);
    assert!(common::gone_within(pid, Duration::from_secs(10)).await, "a dropped runspace leaves no process");
}

#[tokio::test]
async fn grandchildren_die_with_the_worker() {
    let mut rs = common::plain().await;
    let r = rs.invoke(&Command::script("$p = Start-Process -FilePath /bin/sleep -ArgumentList 600 -PassThru; $p.Id")).await.unwrap();
    let grandchild = r.output[0].value.as_u64().unwrap() as u32;
    assert!(common::alive(grandchild));
    rs.close().await.unwrap();
    assert!(common::gone_within(grandchild, Duration::from_secs(10)).await, "the native child was ended with the group");
}

/// A stand-in for pwsh: a shell script that prints `first_line` and then waits for stdin to close.
fn fake_pwsh(dir: &std::path::Path, first_line: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fake-pwsh");
    std::fs::write(&path, format!("#!/bin/sh\necho '{first_line}'\necho 'fake pwsh here' >&2\ncat > /dev/null\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn a_worker_of_another_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ready = r#"{"t":"ready","protocol":999,"ps_version":"7.6.9","ps_edition":"Core","os":"x","pid":1}"#;
    let error = psbridge::Runspace::builder().pwsh(fake_pwsh(dir.path(), ready)).open().await.unwrap_err();
    assert!(matches!(error, Error::ProtocolMismatch { expected: 2, found: 999 }), "{error:?}");
    assert!(error.to_string().contains("same psbridge build"), "{error}");

    let error = psbridge::Runspace::builder().pwsh(fake_pwsh(dir.path(), "Welcome to some shell")).open().await.unwrap_err();
    let Error::Handshake { reason } = &error else { panic!("{error:?}") };
    assert!(reason.contains("Welcome to some shell"), "{reason}");
}

#[tokio::test]
async fn an_over_long_line_fails_that_command_only() {
    let mut rs = fake_worker::builder().max_line_length(10_000).open().await.unwrap();
    let r = rs.invoke(&Command::script("long 50000")).await;
    let error = r.unwrap_err();
    assert!(matches!(error, Error::ProtocolViolation(_)), "{error:?}");
    assert!(error.to_string().contains("max_line_length"), "{error}");
    let r = rs.invoke(&Command::script("long 5000")).await.unwrap();
    assert_eq!(r.output[0].value.as_str().unwrap().len(), 5000, "the worker goes on, in step");
}

#[tokio::test]
async fn the_workers_runtime_setting_stays_out_of_the_session() {
    // psbridge starts workers with DOTNET_TieredPGO=0 (speed only); the worker removes it again so that
    // commands and child processes see the caller's environment. A value the caller chose is kept.
    async fn seen(mut rs: psbridge::Runspace) -> Vec<String> {
        let probe = Command::script("\"$env:DOTNET_TieredPGO\", \"$env:PSBRIDGE_UNSET_TIERED_PGO\"");
        let result = rs.invoke(&probe).await.unwrap();
        result.output.iter().map(|o| o.value.as_str().unwrap().to_owned()).collect()
    }
    assert_eq!(seen(common::plain().await).await, ["", ""]);
    assert_eq!(seen(common::builder().env("DOTNET_TieredPGO", "1").open().await.unwrap()).await, ["1", ""]);
}

#[tokio::test]
async fn a_worker_that_closes_its_stdout_but_lives_on_is_killed_after_the_stop_grace() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // A worker that answers the handshake and the set-up, then closes its stdout and lives on.
    let script = r#"#!/bin/sh
echo '{"t":"ready","protocol":2,"ps_version":"7.6.9","ps_edition":"Core","os":"x","pid":'$$'}'
read setup
echo '{"t":"done","id":1,"state":"Completed","had_errors":false,"duration_ms":1}'
read invoke
exec 1>&-
exec sleep 600
"#;
    let fake = dir.path().join("closes-stdout");
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut rs = psbridge::Runspace::builder().pwsh(&fake).stop_grace(Duration::from_millis(500)).open().await.unwrap();
    let pid = rs.pid();
    let error = tokio::time::timeout(Duration::from_secs(20), rs.invoke(&Command::script("1"))).await.expect("bounded").unwrap_err();
    assert!(error.to_string().contains("closed its stdout but did not exit"), "{error}");
    assert!(common::gone_within(pid, Duration::from_secs(5)).await, "the worker was killed");
}

#[tokio::test]
async fn the_host_cache_keeps_other_powershell_versions_builds() {
    let cache = tempfile::tempdir().unwrap();
    let other_version = cache.path().join("PsBridgeHost-7.4.0-0123456789ABCDEF.dll");
    let unversioned = cache.path().join("PsBridgeHost-0123456789ABCDEF.dll");
    std::fs::write(&other_version, b"another PowerShell's build").unwrap();
    std::fs::write(&unversioned, b"an older psbridge's build").unwrap();
    let rs = common::builder().assembly_cache(Some(cache.path().to_owned())).open().await.unwrap();
    let version = rs.info().ps_version.clone();
    let stale_same_version = cache.path().join(format!("PsBridgeHost-{version}-FFFFFFFFFFFFFFFF.dll"));
    std::fs::write(&stale_same_version, b"an older build for this version").unwrap();
    rs.close().await.unwrap();
    let rs = common::builder().assembly_cache(Some(cache.path().to_owned())).open().await.unwrap();
    rs.close().await.unwrap();
    let builds: Vec<String> = std::fs::read_dir(cache.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(other_version.exists(), "another PowerShell version's build is kept: {builds:?}");
    assert!(!stale_same_version.exists() && !unversioned.exists(), "stale builds are removed: {builds:?}");
    assert_eq!(builds.iter().filter(|b| b.starts_with(&format!("PsBridgeHost-{version}-"))).count(), 1, "{builds:?}");
}

/// The worker puts /dev/null in place of its stdin. .NET's default for `File.Open` (FileShare.None) takes
/// an exclusive flock, and /dev/null is one file for every process: workers starting at the same moment
/// failed their handshake with "being used by another process". A shared lock held here, as another
/// process opening /dev/null would hold one, must not stop a worker from starting.
#[tokio::test]
async fn a_worker_starts_while_another_process_holds_a_lock_on_dev_null() {
    use nix::fcntl::{Flock, FlockArg};
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let lock = Flock::lock(devnull, FlockArg::LockSharedNonblock).map_err(|(_, errno)| errno).unwrap();
    let opened = common::plain().await;
    drop(lock);
    assert!(opened.pid() > 0);
    opened.close().await.unwrap();
}

#[tokio::test]
async fn runspaces_of_one_process_run_at_once_and_each_cancels_alone() {
    let mut runspaces = fake_worker::builder().open_many(3).await.unwrap();
    let pid = runspaces[0].pid();
    assert!(runspaces.iter().all(|rs| rs.pid() == pid), "one process");
    assert_eq!(runspaces.iter().map(psbridge::Runspace::index).collect::<Vec<_>>(), [0, 1, 2]);
    let cancel_middle = runspaces[1].cancel_handle();
    let timed = Command::script("clock\nlane\nsleep 400\nclock");
    let [a, b, c] = &mut runspaces[..] else { unreachable!() };
    let long = Command::script("sleep 60000");
    let (x, y, z, ()) = tokio::join!(a.invoke(&timed), b.invoke(&long), c.invoke(&timed), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(cancel_middle.cancel(), "runspace 1 was running");
    });
    let (x, z) = (x.unwrap(), z.unwrap());
    assert!(matches!(y, Err(Error::Cancelled { worker_killed: false })), "{y:?}");
    let clock = |r: &psbridge::InvocationResult, i: usize| r.output[i].value.as_f64().unwrap();
    assert!(clock(&x, 0).max(clock(&z, 0)) < clock(&x, 2).min(clock(&z, 2)), "runspaces 0 and 2 overlapped: {x:?} {z:?}");
    assert_eq!((x.output[1].value.clone(), z.output[1].value.clone()), (json!(0), json!(2)), "each request ran on the runspace it named");
    // Closing one runspace leaves the process to the others; the last one ends it.
    let last = runspaces.pop().unwrap();
    for rs in runspaces {
        rs.close().await.unwrap();
    }
    assert!(common::alive(pid), "two closed, one still open");
    let mut last = last;
    assert_eq!(last.invoke(&Command::script("lane")).await.unwrap().output[0].value, json!(2));
    last.close().await.unwrap();
    assert!(common::gone_within(pid, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn runspaces_of_one_pwsh_each_have_their_own_session_exit_and_exit_code() {
    let mut runspaces = common::builder().open_many(2).await.unwrap();
    let [a, b] = &mut runspaces[..] else { unreachable!() };
    a.invoke(&Command::script("$global:mine = 'a'")).await.unwrap();
    let first = Command::script("$s = [DateTime]::UtcNow.Ticks; Start-Sleep -Milliseconds 800; $s; [DateTime]::UtcNow.Ticks; $global:mine; exit 3");
    let second = Command::script("$s = [DateTime]::UtcNow.Ticks; Start-Sleep -Milliseconds 800; $s; [DateTime]::UtcNow.Ticks; \"$global:mine\"; Write-Host hi");
    let (x, y) = tokio::join!(a.invoke(&first), b.invoke(&second));
    let (x, y) = (x.unwrap(), y.unwrap());
    let ticks = |r: &psbridge::InvocationResult, i: usize| r.output[i].value.as_i64().unwrap();
    assert!(ticks(&x, 0).max(ticks(&y, 0)) < ticks(&x, 1).min(ticks(&y, 1)), "the two overlapped: {x:?} {y:?}");
    assert_eq!((x.output[2].value.clone(), y.output[2].value.clone()), (json!("a"), json!("")), "sessions are apart");
    assert_eq!((x.exit_code, y.exit_code), (Some(3), None), "exit belongs to the runspace that called it");
    assert_eq!(y.information[0].message.as_deref(), Some("hi"), "host text goes to its own runspace's request");
    assert!(x.information.is_empty());
}
