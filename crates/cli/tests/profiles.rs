//! Profiles and secret sources, `doctor`, `run` formats, completions and the manual page, through the
//! `psbridge` binary against the simulated tenant.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use assert_cmd::Command;
use common::cli::{CliEnv, jsonl, text};
use serde_json::Value;

const APP_ID: &str = "11111111-2222-3333-4444-555555555555";

/// A `cert` profile: certificate sign-in with the password from `source` (TOML inline table).
fn cert_profile(env: &CliEnv, pfx: &Path, source: &str) -> String {
    format!(
        r#"
[profiles.cert]
module_path = ['{modules}']
modules = ["ExchangeOnlineManagement"]
env = {{ EXO_SIM_TENANT = '{tenant}' }}
[profiles.cert.connect]
command = "Connect-ExchangeOnline"
parameters = {{ AppId = "{APP_ID}", Organization = "contoso.onmicrosoft.com", CertificateFilePath = '{pfx}', ShowBanner = false, EXOModuleBasePath = '{tenant}' }}
secrets.CertificatePassword = {source}
"#,
        modules = common::sim_modules().display(),
        tenant = env.tenant().display(),
        pfx = pfx.display(),
    )
}

fn assert_secret_absent(output: &std::process::Output, secret: &str) {
    for (name, stream) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        assert!(!text(stream).contains(secret), "the secret appeared on {name}: {}", text(stream));
    }
}

#[test]
fn a_certificate_password_from_a_private_file_connects_and_never_shows() {
    let password = "Pfx-Pw-7q2Lr9-SecretValue";
    let env = CliEnv::new("");
    let pfx = env.certificate(password, 365);
    let secret_file = env.path("exo-password");
    std::fs::write(&secret_file, format!("{password}\n")).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    env.write_config(&cert_profile(&env, &pfx, &format!("{{ file = '{}' }}", secret_file.display())));

    let output = env
        .psbridge()
        .args(["run", "--profile", "cert", "Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#, "--envelope"])
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let envelope: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(envelope["output"][0]["Alias"], "ContosoUser1");
    assert!(text(&output.stderr).contains("TRACE") || text(&output.stderr).contains("DEBUG"), "the log was on");
    assert_secret_absent(&output, password);

    let doctor = env.run(&["doctor", "--profile", "cert"]);
    assert_eq!(doctor.status.code(), Some(0), "{}", text(&doctor.stdout));
    let report = text(&doctor.stdout);
    assert!(report.contains("ok    certificate") && report.contains("CN=psbridge-exo-sim-app"), "{report}");
    assert!(report.contains(&format!("ok    secret        CertificatePassword from file {}", secret_file.display())), "{report}");
    assert!(report.contains("ok    connect") && report.contains("ok    command       Get-EXOMailbox"), "{report}");
    assert_secret_absent(&doctor, password);

    // The same file readable by others is refused, by run and by doctor.
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = env.run(&["run", "--profile", "cert", "Get-Mailbox"]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("may be read by other users (mode 0644)") && stderr.contains(&format!("chmod 600 {}", secret_file.display())), "{stderr}");
    assert_secret_absent(&refused, password);
    let doctor = env.run(&["doctor", "--profile", "cert"]);
    assert_eq!(doctor.status.code(), Some(1));
    assert!(text(&doctor.stdout).contains("FAIL  secret"), "{}", text(&doctor.stdout));
    assert_secret_absent(&doctor, password);
}

#[test]
fn doctor_explains_a_wrong_certificate_password_without_showing_it() {
    let env = CliEnv::new("");
    let pfx = env.certificate("the-right-one-8k2", 365);
    env.write_config(&cert_profile(&env, &pfx, r#"{ env = "EXO_TEST_CERT_PASSWORD" }"#));
    let wrong = "Wrong-Pw-3xZ9-NotIt";
    let doctor = env.psbridge().args(["doctor", "--profile", "cert"]).env("EXO_TEST_CERT_PASSWORD", wrong).output().unwrap();
    let report = text(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1), "{report}");
    assert!(report.contains("ok    pwsh") && report.contains("ok    module        ExchangeOnlineManagement 3.9.0"), "{report}");
    assert!(report.contains("FAIL  certificate") && report.contains("cannot be opened with the password given"), "{report}");
    assert!(report.contains("fix: the password does not open this file: check secret CertificatePassword (environment variable EXO_TEST_CERT_PASSWORD)"), "{report}");
    assert!(report.contains("skip  connect"), "{report}");
    assert_secret_absent(&doctor, wrong);

    // An expired certificate, and one about to expire.
    for (days, mark, wanted) in [(-2, "FAIL", ": expired"), (10, "warn", "expires in")] {
        let pfx = env.certificate("the-right-one-8k2", days);
        env.write_config(&cert_profile(&env, &pfx, r#"{ env = "EXO_TEST_CERT_PASSWORD" }"#));
        let doctor = env.psbridge().args(["doctor", "--profile", "cert", "--offline"]).env("EXO_TEST_CERT_PASSWORD", "the-right-one-8k2").output().unwrap();
        let report = text(&doctor.stdout);
        assert!(report.contains(&format!("{mark}  certificate")) && report.contains(wanted), "{report}");
        assert_eq!(doctor.status.code(), Some(if mark == "FAIL" { 1 } else { 0 }), "{report}");
    }

    // The variable missing altogether is a failed secret check with its fix.
    let doctor = env.psbridge().args(["doctor", "--profile", "cert", "--offline"]).env_remove("EXO_TEST_CERT_PASSWORD").output().unwrap();
    let report = text(&doctor.stdout);
    assert_eq!(doctor.status.code(), Some(1));
    assert!(report.contains("FAIL  secret        secret CertificatePassword: environment variable EXO_TEST_CERT_PASSWORD is not set"), "{report}");
}

#[test]
fn a_bad_config_file_points_at_the_line_and_unknown_profiles_list_the_known() {
    let env = CliEnv::new("[profiles.other]\nworkers = 2\nwokers = 3\n");
    let output = env.run(&["run", "Get-Date"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    let line = std::fs::read_to_string(env.config()).unwrap().lines().position(|l| l.starts_with("wokers")).unwrap() + 1;
    assert!(stderr.contains("config.toml") && stderr.contains(&format!("line {line}")) && stderr.contains("unknown field `wokers`"), "{stderr}");

    let env = CliEnv::new("");
    let output = env.run(&["run", "--profile", "nope", "Get-Date"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("no profile named `nope`") && text(&output.stderr).contains("simulated, sim"), "{}", text(&output.stderr));
    // PSBRIDGE_PROFILE names the profile when --profile does not.
    let output = env.psbridge().args(["run", "Get-Date"]).env("PSBRIDGE_PROFILE", "nope").output().unwrap();
    assert!(text(&output.stderr).contains("no profile named `nope`"));
}

#[test]
fn run_prints_every_format_and_select_keeps_the_asked_properties() {
    let env = CliEnv::new("");
    let params = ["--params", r#"{"ResultSize": 3}"#, "--select", "alias,Office,NoSuchProperty"];
    let run = |format: &str| {
        let output = env.run(&[&["run", "Get-Mailbox"], &params[..], &["--format", format]].concat());
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        text(&output.stdout)
    };
    let json: Value = serde_json::from_str(&run("json")).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3);
    let keys: Vec<&String> = json[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["Alias", "Office", "NoSuchProperty"], "asked order, the object's spelling");
    assert_eq!(json[0]["NoSuchProperty"], Value::Null);
    let lines = jsonl(&run("jsonl"));
    assert_eq!(lines, json.as_array().unwrap().clone());
    let csv = run("csv");
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some("Alias,Office,NoSuchProperty"));
    assert_eq!(rows.next(), Some(format!("{},{},", json[0]["Alias"].as_str().unwrap(), json[0]["Office"].as_str().unwrap()).as_str()));
    assert_eq!(csv.lines().count(), 4);
    let table = run("table");
    assert!(table.contains("Alias") && table.contains(json[2]["Alias"].as_str().unwrap()), "{table}");

    // Nested values survive in CSV as JSON.
    let output = env.run(&["run", "Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#, "--select", "Alias,EmailAddresses", "--format", "csv"]);
    let mut reader = csv_rows(&text(&output.stdout));
    let addresses: Value = serde_json::from_str(&reader.remove(1)[1]).expect("EmailAddresses as a JSON array");
    assert!(addresses.as_array().is_some_and(|a| !a.is_empty()), "{addresses}");
}

/// Splits CSV text into rows of cells (quoted cells may hold commas and quotes).
fn csv_rows(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let (mut cells, mut cell, mut quoted, mut chars) = (Vec::new(), String::new(), false, line.chars().peekable());
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    cell.push('"');
                    chars.next();
                }
                ('"', _) => quoted = !quoted,
                (',', false) => cells.push(std::mem::take(&mut cell)),
                (c, _) => cell.push(c),
            }
        }
        cells.push(cell);
        rows.push(cells);
    }
    rows
}

#[test]
fn completions_and_the_manual_page_cover_every_subcommand() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let output = Command::cargo_bin("psbridge").unwrap().args(["completions", shell]).output().unwrap();
        assert_eq!(output.status.code(), Some(0));
        let script = text(&output.stdout);
        for word in ["batch", "doctor", "key-column", "profile"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let man = Command::cargo_bin("psbridge").unwrap().arg("man").output().unwrap();
    let page = text(&man.stdout);
    assert!(page.starts_with(".ie") || page.contains(".TH psbridge"), "{page}");
    assert!(page.contains("batch") && page.contains("doctor") && page.contains("PSBRIDGE_CONFIG"), "{page}");
    let help = Command::cargo_bin("psbridge").unwrap().args(["batch", "--help"]).output().unwrap();
    assert!(text(&help.stdout).contains("Examples:") && text(&help.stdout).contains("resumed_in_flight"));
    let bad = Command::cargo_bin("psbridge").unwrap().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
