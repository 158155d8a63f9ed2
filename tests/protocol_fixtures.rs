//! The owner-to-worker golden fixture (tests/fixtures/protocol/owner-to-worker.jsonl) read by the real
//! worker code: every line goes through `PsBridge.Inbox.Parse` and every value through
//! `PsBridge.Values`, in one pwsh, which prints the .NET types and values it got. The Rust side of the
//! same fixture is checked byte for byte by `src/protocol.rs`'s unit tests.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

const FIXTURE: &str = include_str!("fixtures/protocol/owner-to-worker.jsonl");

/// Parses each line of the file `$env:FIXTURE_INPUT` as the worker (`$env:FIXTURE_HOST`) does and describes what it got, one JSON
/// object per line. A line the worker cannot read is described by its error.
const DESCRIBE: &str = r#"
$ErrorActionPreference = 'Stop'
$PSStyle.OutputRendering = 'PlainText'
$WarningPreference = 'SilentlyContinue' # ConvertTo-Json warns on stdout when it cuts the deepest probe
Add-Type -Path ([System.IO.Directory]::GetFiles($env:FIXTURE_HOST, '*.cs') | Sort-Object)

function Describe($v) {
    if ($null -eq $v) { return @{ type = $null } }
    $d = [ordered]@{ type = $v.GetType().FullName }
    if ($v -is [System.Security.SecureString]) {
        $d.value = [System.Net.NetworkCredential]::new('', $v).Password
        $d.read_only = $v.IsReadOnly()
    } elseif ($v -is [datetime]) {
        $d.kind = "$($v.Kind)"; $d.value = $v.ToString('o'); $d.utc = $v.ToUniversalTime().ToString('o')
    } elseif ($v -is [byte[]]) {
        $d.value = [int[]]$v
    } elseif ($v -is [System.Security.Cryptography.X509Certificates.X509Certificate2]) {
        $d.subject = $v.Subject; $d.has_private_key = $v.HasPrivateKey
    } elseif ($v -is [hashtable]) {
        $table = [ordered]@{}
        foreach ($key in @($v.Keys) | Sort-Object) { $table[$key] = Describe $v[$key] }
        $d.value = $table
        $d.case_insensitive = $v.Count -eq 0 -or $v.ContainsKey(([string]@($v.Keys)[0]).ToUpperInvariant())
    } elseif ($v -is [object[]]) {
        $d.value = [object[]]@(foreach ($item in $v) { Describe $item })
    } elseif ($v -is [string] -or $v -is [bool]) {
        $d.value = $v
    } else {
        $d.value = $v.ToString([cultureinfo]::InvariantCulture)
    }
    $d
}

function Parameters($holder) {
    $described = [ordered]@{}
    foreach ($p in $holder.EnumerateObject()) { $described[$p.Name] = Describe ([PsBridge.Values]::Parameter($p.Name, $p.Value)) }
    $described
}

foreach ($line in [System.IO.File]::ReadAllLines($env:FIXTURE_INPUT)) {
    try {
        $request = [PsBridge.Inbox]::Parse([System.Text.Encoding]::UTF8.GetBytes($line))
        $body = $request.Body
        $got = [ordered]@{ t = $request.Type; id = $request.Id; runspace = $request.Runspace }
        if ($request.Type -eq 'setup') {
            $got.modules = @(foreach ($m in $body.GetProperty('modules').EnumerateArray()) { $m.GetRawText() })
            $got.variables = Parameters $body.GetProperty('variables')
            $got.depth = $body.GetProperty('depth').GetInt32()
        } elseif ($request.Type -eq 'invoke') {
            $got.steps = @(foreach ($step in $body.GetProperty('pipeline').EnumerateArray()) {
                $members = @($step.EnumerateObject() | ForEach-Object Name)
                $runnable = if ($members -contains 'script') { 'script' } else { 'command' }
                [ordered]@{ $runnable = $step.GetProperty($runnable).GetString(); parameters = Parameters $step.GetProperty('parameters') }
            })
        }
    } catch {
        $got = @{ error = $_.Exception.InnerException.Message ?? $_.Exception.Message }
    }
    $got | ConvertTo-Json -Depth 30 -Compress
}
"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A request whose one parameter nests `levels` arrays deep.
fn nested_request(levels: usize) -> String {
    let mut value = json!("leaf");
    for _ in 0..levels {
        value = json!([value]);
    }
    json!({"t": "invoke", "id": 90 + levels, "pipeline": [{"script": "param($V)", "parameters": {"V": value}}]}).to_string()
}

/// Runs the worker's parser over `lines` in one pwsh; one description per line.
fn described_by_the_worker(lines: &[String]) -> Vec<Value> {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("requests.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = Command::new(psbridge::find_pwsh(None).expect("pwsh is installed"))
        .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command", DESCRIBE])
        .env("FIXTURE_INPUT", &input)
        .env("FIXTURE_HOST", repo().join("scripts/worker/host"))
        // An offset that is not UTC, so that a datetime converted to local time shows it.
        .env("TZ", "Asia/Kolkata")
        .output()
        .expect("pwsh runs");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(output.status.success(), "pwsh failed: {}\n{stdout}", String::from_utf8_lossy(&output.stderr));
    stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn the_worker_reads_every_owner_fixture_line_as_the_protocol_says() {
    let mut lines: Vec<String> = FIXTURE.lines().map(str::to_owned).collect();
    let fixture_lines = lines.len();
    lines.push(nested_request(psbridge::MAX_VALUE_DEPTH));
    lines.push(nested_request(psbridge::MAX_VALUE_DEPTH + 1));
    let got = described_by_the_worker(&lines);
    assert_eq!(got.len(), lines.len(), "{got:?}");

    let setup = &got[0];
    assert_eq!((&setup["t"], &setup["id"], &setup["depth"]), (&json!("setup"), &json!(1), &json!(4)));
    assert_eq!(setup["modules"][1], r#"{"name":"/opt/psbridge/modules/Contoso.Tools.psd1","minimum_version":null}"#);
    assert_eq!(setup["variables"]["Limit"], json!({"type": "System.Int32", "value": "5"}));
    assert_eq!(setup["variables"]["When"]["kind"], "Utc", "variables are values too: {setup}");

    let invoke = &got[1];
    assert_eq!((&invoke["t"], &invoke["id"]), (&json!("invoke"), &json!(2)));
    assert_eq!(invoke["steps"][0]["command"], "Connect-Thing");
    assert_eq!(invoke["steps"][1], json!({"command": "Select-Object", "parameters": {"First": {"type": "System.Int32", "value": "1"}}}));
    let p = &invoke["steps"][0]["parameters"];
    let typed = |name: &str| (p[name]["type"].as_str().unwrap_or("null").to_owned(), p[name]["value"].clone());
    assert_eq!(typed("Text"), ("System.String".into(), json!("café ✓ \"quoted\" \\ back\nslash\u{1}")));
    // Integers by size, exact; a fraction or an exponent is a double.
    assert_eq!(typed("Int"), ("System.Int32".into(), json!("42")));
    assert_eq!(typed("Negative"), ("System.Int32".into(), json!("-7")));
    assert_eq!(typed("Long"), ("System.Int64".into(), json!("9007199254740993")));
    assert_eq!(typed("Decimal"), ("System.Decimal".into(), json!("18446744073709551615")));
    assert_eq!(typed("Big"), ("System.Numerics.BigInteger".into(), json!("-1267650600228229401496703205376")));
    assert_eq!(typed("Float"), ("System.Double".into(), json!("1.5")));
    assert_eq!(typed("Exponent"), ("System.Double".into(), json!("1000")));
    assert_eq!((typed("On"), typed("Off")), (("System.Boolean".into(), json!(true)), ("System.Boolean".into(), json!(false))));
    assert_eq!(p["Nothing"], json!({"type": null}));
    // Arrays are object[], objects case-insensitive hashtables, all the way down.
    assert_eq!(p["List"]["type"], "System.Object[]");
    let list: Vec<_> = p["List"]["value"].as_array().unwrap().iter().map(|d| d["type"].clone()).collect();
    assert_eq!(list, [json!("System.Int32"), json!("System.String"), json!(null), json!("System.Object[]")]);
    assert_eq!(p["Table"]["type"], "System.Collections.Hashtable");
    assert_eq!(p["Table"]["case_insensitive"], true);
    assert_eq!(p["Table"]["value"]["Nested"]["type"], "System.Collections.Hashtable");
    assert_eq!(p["Table"]["value"]["Nested"]["value"]["n"], json!({"type": "System.Int32", "value": "1"}));
    // The tagged values.
    assert_eq!(p["When"], json!({"type": "System.DateTime", "kind": "Utc", "value": "2026-01-02T03:04:05.0000000Z", "utc": "2026-01-02T03:04:05.0000000Z"}));
    assert_eq!(
        p["WhenOffset"],
        json!({"type": "System.DateTime", "kind": "Local", "value": "2026-01-02T06:34:05.0000000+05:30", "utc": "2026-01-02T01:04:05.0000000Z"}),
        "another offset: the same instant, in the worker's local time"
    );
    assert_eq!(p["Blob"], json!({"type": "System.Byte[]", "value": [0, 1, 2, 255]}));
    assert_eq!(p["Password"], json!({"type": "System.Security.SecureString", "value": "p@ss w0rd", "read_only": true}));
    assert_eq!(typed("Token"), ("System.String".into(), json!("eyJ0eXAi.fixture.token")));
    let certificate = json!({"type": "System.Security.Cryptography.X509Certificates.X509Certificate2", "subject": "CN=psbridge fixture", "has_private_key": true});
    assert_eq!(p["Cert"], certificate);
    assert_eq!(p["CertNoPassword"], certificate);

    let script = &got[2];
    assert_eq!(script["steps"][0]["script"], "param($Name) \"Hello, $Name\"");
    assert_eq!(script["steps"][0]["parameters"]["Name"]["value"], "world");
    assert_eq!(script["runspace"], 0, "a request without runspace is for runspace 0");
    assert_eq!((&got[3]["t"], &got[3]["runspace"], &got[3]["modules"]), (&json!("setup"), &json!(1), &json!([])));
    assert_eq!((&got[4]["t"], &got[4]["id"], &got[4]["runspace"]), (&json!("invoke"), &json!(5), &json!(1)));
    assert_eq!(got[4]["steps"][0]["command"], "Get-Date");
    assert_eq!(got[5], json!({"t": "cancel", "id": 2, "runspace": 0}));
    assert_eq!(got[6], json!({"t": "exit", "id": 0, "runspace": 0}), "exit has no id; the worker reads it as 0");

    // The depth limit: MAX_VALUE_DEPTH levels of a parameter value are read, one more is not.
    let deepest = &got[fixture_lines];
    assert_eq!(deepest["steps"][0]["parameters"]["V"]["type"], "System.Object[]", "{deepest}");
    let too_deep = got[fixture_lines + 1]["error"].as_str().unwrap_or_default();
    assert!(too_deep.contains("maximum configured depth of 68"), "{too_deep}");
}
