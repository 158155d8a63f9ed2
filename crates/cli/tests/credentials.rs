//! Credentials read at every connect, through the `psbridge` binary against the simulated module: access
//! tokens (their expiry read from the token), command sources, certificates from base64 CI secrets,
//! doctor's view of them, and durations written as text in the configuration.

mod common;

use std::process::Output;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::cli::{CliEnv, text};
use serde_json::Value;

const APP_ID: &str = "11111111-2222-3333-4444-555555555555";
const TENANT_ID: &str = "7d5c1e2a-0b1f-4c3e-9a8d-2f6b4e1c9d07";

/// An unsigned JWT (`{"alg":"none"}`) expiring `offset` seconds from now (negative: already expired).
fn jwt(offset: i64) -> String {
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let payload = serde_json::json!({ "exp": now + offset, "tid": TENANT_ID, "aud": "https://outlook.office365.com", "appid": APP_ID });
    format!("{}.{}.", engine.encode(br#"{"alg":"none"}"#), engine.encode(payload.to_string()))
}

/// The `exp` of a token made by [`jwt`], as doctor and the messages print it (RFC 3339, UTC).
fn expiry_of(token: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64().unwrap())).to_string()
}

/// A profile `tok` that connects with an access token from `source` (a TOML inline table).
fn token_profile(env: &CliEnv, source: &str) -> String {
    format!(
        r#"
[profiles.tok]
module_path = ['{modules}']
modules = ["ExchangeOnlineManagement"]
env = {{ EXO_SIM_TENANT = '{tenant}' }}
start_timeout_secs = 120
[profiles.tok.connect]
command = "Connect-ExchangeOnline"
parameters = {{ Organization = "contoso.onmicrosoft.com", ShowBanner = false, EXOModuleBasePath = '{tenant}' }}
secrets.AccessToken = {source}
"#,
        modules = common::sim_modules().display(),
        tenant = env.tenant().display(),
    )
}

fn assert_absent(output: &Output, secret: &str) {
    assert!(secret.len() >= 8, "a secret worth looking for");
    for (name, stream) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        assert!(!text(stream).contains(secret), "the secret appeared on {name}: {}", text(stream));
    }
}

fn get_mailbox(env: &CliEnv, token_env: &str, token: &str) -> Output {
    env.psbridge()
        .args(["run", "--profile", "tok", "Get-Mailbox", "--params", r#"{"Identity": "ContosoUser1"}"#, "--envelope"])
        .env(token_env, token)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap()
}

#[test]
fn an_access_token_connects_until_it_expires_and_an_expired_one_fails_at_once_naming_its_source() {
    let env = CliEnv::new("");
    env.write_config(&token_profile(&env, r#"{ env = "EXO_TEST_TOKEN", as = "string" }"#));

    let good = jwt(3600);
    let output = get_mailbox(&env, "EXO_TEST_TOKEN", &good);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&output.stdout).unwrap()["output"][0]["Alias"], "ContosoUser1");
    assert_absent(&output, &good);
    // The variable the token came from is not in the worker's environment (the connector reads it from
    // psbridge's own).
    let output = env
        .psbridge()
        .args(["run", "--profile", "tok", "--script", "\"[$env:EXO_TEST_TOKEN]\"", "--format", "jsonl"])
        .env("EXO_TEST_TOKEN", &good)
        .output()
        .unwrap();
    assert_eq!(text(&output.stdout).trim(), "\"[]\"", "{}", text(&output.stderr));

    // Expired an hour ago: refused before the connect is tried, as a worker that could not connect (3).
    let expired = jwt(-3600);
    let output = get_mailbox(&env, "EXO_TEST_TOKEN", &expired);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let wanted = format!("access token from environment variable EXO_TEST_TOKEN expired at {} (", expiry_of(&expired));
    assert!(stderr.contains(&format!("{wanted}60 min ago)")) || stderr.contains(&format!("{wanted}61 min ago)")), "wanted {wanted:?} in\n{stderr}");
    assert!(output.stdout.is_empty() || !text(&output.stdout).contains("ContosoUser1"));
    assert_absent(&output, &expired);

    // Two minutes left, inside the default token_refresh_margin_secs of 300.
    let closing = jwt(120);
    let output = get_mailbox(&env, "EXO_TEST_TOKEN", &closing);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    let wanted = format!(
        "access token from environment variable EXO_TEST_TOKEN expires at {}, within token_refresh_margin_secs (300 s); get a fresh one",
        expiry_of(&closing)
    );
    assert!(stderr.contains(&wanted), "wanted {wanted:?} in\n{stderr}");
    assert_absent(&output, &closing);

    // Not a JWT at all: the parser's reason, never the value.
    let output = get_mailbox(&env, "EXO_TEST_TOKEN", "opaque-Token-Value-5c1");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("access token from environment variable EXO_TEST_TOKEN: the access token is not a well-formed JWT"), "{stderr}");
    assert_absent(&output, "opaque-Token-Value-5c1");
}

/// `["/bin/sh", "-c", script]` as TOML.
fn sh(script: &str) -> String {
    format!("[\"/bin/sh\", \"-c\", {}]", toml_string(script))
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap() // a JSON string is a TOML basic string
}

#[test]
fn a_command_source_is_run_at_connect_and_a_failing_one_shows_its_status_and_stderr_never_its_output() {
    let env = CliEnv::new("");
    let token = jwt(3600);

    // Plain output (argv, no shell of psbridge's own: the shell here is the program).
    env.write_config(&token_profile(&env, &format!("{{ command = {}, as = \"string\" }}", sh("echo \"$TEST_TOKEN_SOURCE\""))));
    let output = get_mailbox(&env, "TEST_TOKEN_SOURCE", &token);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_absent(&output, &token);

    // JSON output, as `az account get-access-token` prints it without --query.
    let json = sh(r#"printf '{"accessToken": "%s", "expiresOn": "2030-01-01 00:00:00", "tokenType": "Bearer"}' "$TEST_TOKEN_SOURCE""#);
    env.write_config(&token_profile(&env, &format!("{{ command = {json}, json_field = \"accessToken\", as = \"string\" }}")));
    let output = get_mailbox(&env, "TEST_TOKEN_SOURCE", &token);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_absent(&output, &token);

    // A failure: its exit status and the tail of its stderr; what it printed on stdout is never shown.
    let failing = sh("echo Fake-Secret-7Hq2-On-Stdout; echo 'ERROR: Please run az login to setup account.' >&2; exit 2");
    env.write_config(&token_profile(&env, &format!("{{ command = {failing}, as = \"string\" }}")));
    let output = get_mailbox(&env, "UNUSED", "unused-value");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("secret AccessToken: command /bin/sh failed (exit status: 2)"), "{stderr}");
    assert!(stderr.contains("ERROR: Please run az login to setup account."), "{stderr}");
    assert_absent(&output, "Fake-Secret-7Hq2-On-Stdout");

    // A program that hangs is killed after timeout_secs.
    let hanging = sh("echo still-thinking >&2; sleep 300");
    env.write_config(&token_profile(&env, &format!("{{ command = {hanging}, timeout_secs = \"1s\", as = \"string\" }}")));
    let output = get_mailbox(&env, "UNUSED", "unused-value");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("command /bin/sh did not finish within 1 s and was killed") && stderr.contains("still-thinking"), "{stderr}");

    // A program that is not there stops psbridge before any worker starts: a configuration problem (2).
    env.write_config(&token_profile(&env, r#"{ command = ["no-such-token-helper-x1"], as = "string" }"#));
    let output = get_mailbox(&env, "UNUSED", "unused-value");
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("command no-such-token-helper-x1 was not found"), "{stderr}");
}

#[test]
fn doctor_shows_a_tokens_expiry_tenant_and_audience_and_never_the_token() {
    let env = CliEnv::new("");
    env.write_config(&token_profile(&env, r#"{ env = "EXO_TEST_TOKEN", as = "string" }"#));
    let doctor = |token: &str, offline: bool| {
        let mut command = env.psbridge();
        command.args(["doctor", "--profile", "tok"]).env("EXO_TEST_TOKEN", token);
        if offline {
            command.arg("--offline");
        }
        let output = command.output().unwrap();
        assert_absent(&output, token);
        (output.status.code(), text(&output.stdout))
    };

    let good = jwt(3600);
    let (code, report) = doctor(&good, false);
    assert_eq!(code, Some(0), "{report}");
    let wanted = format!("ok    token         AccessToken from environment variable EXO_TEST_TOKEN: expires at {} (in ", expiry_of(&good));
    assert!(report.contains(&wanted), "wanted {wanted:?} in\n{report}");
    assert!(report.contains(&format!("tenant {TENANT_ID}, audience https://outlook.office365.com")), "{report}");
    assert!(report.contains("ok    connect") && report.contains("ok    command       Get-EXOMailbox"), "{report}");

    let closing = jwt(600);
    let (code, report) = doctor(&closing, true);
    assert_eq!(code, Some(0), "a warning does not fail doctor: {report}");
    assert!(report.contains(&format!("warn  token         AccessToken from environment variable EXO_TEST_TOKEN: expires at {}", expiry_of(&closing))), "{report}");
    assert!(report.contains("fix: get a fresh token"), "{report}");

    let expired = jwt(-7200);
    let (code, report) = doctor(&expired, true);
    assert_eq!(code, Some(1), "{report}");
    assert!(report.contains(&format!("FAIL  token         AccessToken from environment variable EXO_TEST_TOKEN: expired at {} (120 min ago)", expiry_of(&expired))), "{report}");
}

/// A password-protected PFX made by the simulation's helper, as base64 (the file is removed: only the
/// text remains, as in a CI secret).
fn pfx_base64(env: &CliEnv, password: &str) -> String {
    let pfx = env.certificate(password, 365);
    let encoded = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pfx).unwrap());
    std::fs::remove_file(pfx).unwrap();
    encoded
}

#[test]
fn a_base64_certificate_from_the_environment_connects_and_doctor_checks_it() {
    let env = CliEnv::new("");
    let password = "Ci-Pfx-Pw-4Kd81";
    let pfx = pfx_base64(&env, password);
    env.write_config(&format!(
        r#"
[profiles.ci]
module_path = ['{modules}']
modules = ["ExchangeOnlineManagement"]
env = {{ EXO_SIM_TENANT = '{tenant}' }}
[profiles.ci.connect]
command = "Connect-ExchangeOnline"
parameters = {{ AppId = "{APP_ID}", Organization = "contoso.onmicrosoft.com", ShowBanner = false, EXOModuleBasePath = '{tenant}' }}
secrets.Certificate = {{ env = "EXO_TEST_PFX_BASE64", as = "certificate" }}
secrets.CertificatePassword = {{ env = "EXO_TEST_PFX_PASSWORD" }}
"#,
        modules = common::sim_modules().display(),
        tenant = env.tenant().display(),
    ));
    let with_secrets = |args: &[&str], password: &str| {
        let output = env.psbridge().args(args).env("EXO_TEST_PFX_BASE64", &pfx).env("EXO_TEST_PFX_PASSWORD", password).env("RUST_LOG", "debug").output().unwrap();
        assert_absent(&output, password);
        assert_absent(&output, &pfx[..40]);
        output
    };

    let output = with_secrets(&["run", "--profile", "ci", "Get-ConnectionInformation", "--select", "CertificateAuthentication", "--format", "jsonl"], password);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), r#"{"CertificateAuthentication":true}"#);

    let output = with_secrets(&["doctor", "--profile", "ci"], password);
    let report = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{report}");
    assert!(report.contains("ok    certificate   Certificate from environment variable EXO_TEST_PFX_BASE64: CN=psbridge-exo-sim-app"), "{report}");
    assert!(report.contains("ok    connect"), "{report}");

    let wrong = "Not-The-Pw-93kf";
    let output = with_secrets(&["doctor", "--profile", "ci", "--offline"], wrong);
    let report = text(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{report}");
    assert!(report.contains("FAIL  certificate   Certificate from environment variable EXO_TEST_PFX_BASE64: cannot be opened with the password given"), "{report}");
    assert!(report.contains("fix: the password does not open this certificate: check secret CertificatePassword (environment variable EXO_TEST_PFX_PASSWORD)"), "{report}");
}

#[test]
fn durations_in_the_configuration_may_be_written_as_text() {
    let env = CliEnv::new("[profiles.quick]\ncommand_timeout_secs = \"2s\"\nstart_timeout_secs = \"2m\"\n");
    let output = env.run(&["run", "--profile", "quick", "--script", "Start-Sleep 10"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(124), "{stderr}");
    assert!(stderr.contains("timed out after 2 s"), "{stderr}");

    // A text that is not a duration: the file, the line and the key.
    let env = CliEnv::new("[profiles.quick]\nworkers = 2\ncommand_timeout_secs = \"2 fortnights\"\n");
    let output = env.run(&["run", "--profile", "quick", "--script", "1"]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    let line = common::cli::read(&env.config()).lines().position(|l| l.starts_with("command_timeout_secs")).unwrap() + 1;
    assert!(stderr.contains("config.toml") && stderr.contains(&format!("line {line}")) && stderr.contains("command_timeout_secs"), "{stderr}");
    assert!(stderr.contains("\"2 fortnights\" is not a duration") && stderr.contains("\"1h 30m\""), "{stderr}");
}
