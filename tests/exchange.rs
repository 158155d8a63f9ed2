//! The Runspace driving the simulated ExchangeOnlineManagement module (scripts/sim) in a real pwsh.
//! The bridge is used exactly as it would be with the real module.

mod common;

use std::time::Duration;

use psbridge::{Command, Error, PipelineState, SecretString};
use serde_json::json;

fn get(identity: &str) -> Command {
    Command::new("Get-Mailbox").param("Identity", identity)
}

#[tokio::test]
async fn connect_get_set_round_trip() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();

    let r = rs.invoke(&get("ContosoUser1")).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    let mailbox = &r.output[0];
    assert_eq!(mailbox.value["Alias"], "ContosoUser1");
    assert!(mailbox.type_names[0].contains("Mailbox"), "{:?}", mailbox.type_names);
    assert!(mailbox.value["PrimarySmtpAddress"].as_str().unwrap().contains('@'));

    let set = Command::new("Set-Mailbox").param("Identity", "ContosoUser1").param("Office", "Psbridge QA ✓");
    let r = rs.invoke(&set).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    assert!(r.output.is_empty(), "Set-Mailbox writes no object");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);

    let r = rs.invoke(&get("ContosoUser1")).await.unwrap();
    assert_eq!(r.output[0].value["Office"], "Psbridge QA ✓");

    // the same value again changes nothing, and says so as the real cmdlet does
    let r = rs.invoke(&set).await.unwrap();
    assert_eq!(r.warnings.len(), 1, "{r:?}");
    assert!(r.warnings[0].starts_with("The command completed successfully but no settings of '"), "{:?}", r.warnings);

    // a second worker sees the change: the tenant is shared between processes
    let mut other = common::sim_builder(tenant.path()).open().await.unwrap();
    let r = other.invoke(&get("ContosoUser1")).await.unwrap();
    assert_eq!(r.output[0].value["Office"], "Psbridge QA ✓");
    other.close().await.unwrap();
    rs.close().await.unwrap();
}

#[tokio::test]
async fn what_if_shows_the_change_and_makes_none() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();
    let before = rs.invoke(&get("ContosoUser2")).await.unwrap().output[0].value["Office"].clone();
    let set = Command::new("Set-Mailbox").param("Identity", "ContosoUser2").param("Office", "WhatIf Office").switch("WhatIf");
    let r = rs.invoke(&set).await.unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    let host: Vec<_> = r.information.iter().filter_map(|i| i.message.clone()).collect();
    assert!(host.iter().any(|m| m.starts_with("What if: ")), "{host:?}");
    let after = rs.invoke(&get("ContosoUser2")).await.unwrap().output[0].value["Office"].clone();
    assert_eq!(before, after);
    assert_ne!(after, json!("WhatIf Office"));
}

#[tokio::test]
async fn a_missing_identity_is_a_non_terminating_error_record() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();
    let r = rs.invoke(&get("nobody-psbridge")).await.unwrap();
    assert!(r.had_errors);
    assert_eq!(r.state, PipelineState::Completed);
    assert!(r.output.is_empty());
    let e = &r.errors[0];
    assert!(!e.terminating);
    assert!(e.message.contains("couldn't be found"), "{}", e.message);
    assert!(e.message.contains("nobody-psbridge"), "{}", e.message);
    assert!(e.message.contains("ManagementObjectNotFoundException"), "{}", e.message);
    assert_eq!(e.category, "NotSpecified");
    assert!(e.reason.as_deref().unwrap().contains("ManagementObjectNotFoundException"), "{e:?}");
    assert!(e.fully_qualified_error_id.as_deref().unwrap().ends_with(",Write-ErrorMessage"), "{e:?}");
    // the worker goes on
    let r = rs.invoke(&get("ContosoUser3")).await.unwrap();
    assert!(!r.had_errors);
}

#[tokio::test]
async fn result_size_truncates_with_the_real_warning() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();
    let r = rs.invoke(&Command::new("Get-Mailbox").param("ResultSize", 5)).await.unwrap();
    assert_eq!(r.output.len(), 5);
    assert_eq!(
        r.warnings,
        ["There are more results available than are currently displayed. To view them, increase the value for the ResultSize parameter."]
    );
    let r = rs.invoke(&Command::new("Get-Mailbox").param("ResultSize", "Unlimited")).await.unwrap();
    assert!(r.output.len() >= 200, "{}", r.output.len());
    assert!(r.warnings.is_empty());
}

#[tokio::test]
async fn cmdlets_before_a_connect_fail_with_the_real_message() {
    let mut rs = common::builder().module_path(common::sim_modules()).module("ExchangeOnlineManagement").open().await.unwrap();
    let r = rs.invoke(&Command::new("Get-EXOMailbox").param("Identity", "ContosoUser1")).await.unwrap();
    assert!(r.had_errors);
    assert_eq!(r.errors[0].message, "You must call Connect-ExchangeOnline before calling any other cmdlet.");
    let r = rs.invoke(&Command::new("Get-ConnectionInformation")).await.unwrap();
    assert!(!r.had_errors && r.output.is_empty(), "no connection, no error: {r:?}");
}

/// Makes a PFX protected by `password` with the simulation's helper (the password goes through a file).
async fn certificate(dir: &std::path::Path, password: &str) -> std::path::PathBuf {
    let pfx = dir.join("app.pfx");
    let password_file = dir.join("password.txt");
    std::fs::write(&password_file, password).unwrap();
    let mut rs = common::plain().await;
    let script = common::sim_modules().join("New-SimCertificate.ps1");
    let r = rs
        .invoke(&Command::new(script.display().to_string()).param("Path", pfx.display().to_string()).param("PasswordFile", password_file.display().to_string()))
        .await
        .unwrap();
    assert!(!r.had_errors, "{:?}", r.errors);
    std::fs::remove_file(password_file).unwrap();
    pfx
}

const APP_ID: &str = "11111111-2222-3333-4444-555555555555";

fn certificate_connect(pfx: &std::path::Path, password: &str) -> Command {
    Command::new("Connect-ExchangeOnline")
        .param("AppId", APP_ID)
        .param("Organization", "contoso.onmicrosoft.com")
        .param("CertificateFilePath", pfx.display().to_string())
        .secure_param("CertificatePassword", SecretString::from(password.to_owned()))
        .param("ShowBanner", false)
}

fn read_proc(pid: u32, what: &str) -> Vec<u8> {
    std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn certificate_connect_keeps_the_password_out_of_argv_environment_and_files() {
    let tenant = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let password = "Pfx-Secret-8c1f0d2e";
    let pfx = certificate(certs.path(), password).await;
    let mut rs = common::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant.path())
        .connect(certificate_connect(&pfx, password))
        .open()
        .await
        .unwrap();
    let r = rs.invoke(&Command::new("Get-ConnectionInformation")).await.unwrap();
    assert_eq!(r.output[0].value["State"], "Connected");
    assert_eq!(r.output[0].value["AppId"], APP_ID);
    assert_eq!(r.output[0].value["CertificateAuthentication"], true);

    // the PowerShell process and the launcher that started it (a dotnet tool shim) alike
    let worker = rs.pid();
    let stat = String::from_utf8(read_proc(worker, "stat")).unwrap();
    let parent: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    for pid in [worker, parent] {
        for what in ["cmdline", "environ"] {
            let bytes = read_proc(pid, what);
            assert!(!bytes.is_empty() || pid == parent, "/proc/{pid}/{what} readable");
            assert!(!contains(&bytes, password), "the password is in /proc/{pid}/{what}");
        }
    }
    // nothing psbridge or the session wrote to disk holds it either
    let mut roots = vec![tenant.path().to_path_buf()];
    for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("psbridge") || name.starts_with("tmpEXO_") {
            roots.push(entry.path());
        }
    }
    for file in roots.iter().flat_map(|root| files_under(root)) {
        if let Ok(bytes) = std::fs::read(&file) {
            assert!(!contains(&bytes, password), "the password is in {}", file.display());
        }
    }
    assert!(!format!("{rs:?}").contains(password));
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return vec![dir.to_path_buf()] };
    entries.flatten().flat_map(|entry| files_under(&entry.path())).collect()
}

#[tokio::test]
async fn a_wrong_certificate_password_fails_the_connect_without_showing_it() {
    let tenant = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let pfx = certificate(certs.path(), "the-right-password").await;
    let wrong = "Wrong-Password-51b7";
    let error = common::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant.path())
        .connect(certificate_connect(&pfx, wrong))
        .open()
        .await
        .unwrap_err();
    let Error::Connect { command, records } = &error else { panic!("{error:?}") };
    assert_eq!(command, "Connect-ExchangeOnline");
    assert_eq!(records[0].category, "OperationStopped");
    assert!(records[0].message.to_lowercase().contains("password"), "{:?}", records[0]);
    assert!(!error.to_string().contains(wrong));
    assert!(!format!("{error:?}").contains(wrong));
}

#[tokio::test]
async fn console_noise_from_cmdlets_never_corrupts_the_protocol() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).env("EXO_SIM_NOISE", "1").open().await.unwrap();
    for i in 1..=20 {
        let alias = format!("ContosoUser{i}");
        let r = rs.invoke(&get(&alias)).await.unwrap();
        assert!(!r.had_errors, "{:?}", r.errors);
        assert_eq!(r.output.len(), 1, "{r:?}");
        assert_eq!(r.output[0].value["Alias"], json!(alias));
    }
}

#[tokio::test]
async fn a_crash_inside_a_cmdlet_is_reported_with_exit_status_and_stderr() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).env("EXO_SIM_CRASH_ON", "ContosoUser7").open().await.unwrap();
    assert!(!rs.invoke(&get("ContosoUser6")).await.unwrap().had_errors);
    let error = rs.invoke(&get("ContosoUser7")).await.unwrap_err();
    let Error::WorkerExited(exit) = &error else { panic!("{error:?}") };
    assert!(exit.status.is_some_and(|s| !s.success()), "{exit}");
    assert!(!exit.stderr_tail.is_empty(), "{exit}");
    assert!(matches!(rs.invoke(&get("ContosoUser6")).await, Err(Error::WorkerExited(_))));
}

#[tokio::test]
async fn a_hanging_cmdlet_times_out_and_its_worker_is_killed() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path())
        .env("EXO_SIM_HANG_ON", "ContosoUser9")
        .stop_grace(Duration::from_secs(1))
        .open()
        .await
        .unwrap();
    let pid = rs.pid();
    let error = rs.invoke(&get("ContosoUser9").timeout(Duration::from_secs(2))).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { worker_killed: true, .. }), "{error:?}");
    assert!(common::gone_within(pid, Duration::from_secs(10)).await);
}

#[tokio::test]
async fn close_disconnects_and_removes_the_session_folder() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();
    let r = rs.invoke(&Command::new("Get-ConnectionInformation")).await.unwrap();
    let module = std::path::PathBuf::from(r.output[0].value["ModuleName"].as_str().unwrap());
    assert!(module.to_string_lossy().contains("tmpEXO_"), "{}", module.display());
    assert!(module.exists());
    let pid = rs.pid();
    let disconnect = rs.close().await.unwrap().expect("the disconnect command ran");
    assert!(!disconnect.had_errors, "{:?}", disconnect.errors);
    assert!(disconnect.information.iter().any(|i| i.message.as_deref() == Some("Disconnected successfully !")), "{disconnect:?}");
    assert!(!module.exists(), "the tmpEXO_ folder is removed on disconnect");
    assert!(!common::alive(pid));
}

#[tokio::test]
async fn the_connect_banner_reaches_the_information_stream_not_the_protocol() {
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant.path())
        .open()
        .await
        .unwrap();
    let connect = Command::new("Connect-ExchangeOnline").param("ManagedIdentity", true).param("Organization", "contoso.onmicrosoft.com");
    let r = rs.invoke(&connect).await.unwrap();
    assert!(r.succeeded() && r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.had_errors, "as with the real module, a suppressed internal lookup sets HadErrors on a good connect");
    assert!(r.output.is_empty(), "Connect-ExchangeOnline writes nothing to the output");
    let text: Vec<_> = r.information.iter().filter_map(|i| i.message.clone()).collect();
    assert!(text.iter().any(|t| t.contains("This V3 EXO PowerShell module contains new REST API backed Exchange Online cmdlets")), "{text:?}");
    let r = rs.invoke(&get("ContosoUser1")).await.unwrap();
    assert_eq!(r.output[0].value["Alias"], "ContosoUser1");
}

#[tokio::test]
async fn an_access_token_is_a_plain_string_secret() {
    let tenant = tempfile::tempdir().unwrap();
    let connect = Command::new("Connect-ExchangeOnline")
        .secret_param("AccessToken", SecretString::from("not-a-jwt".to_owned()))
        .param("Organization", "contoso.onmicrosoft.com")
        .param("ShowBanner", false);
    let error = common::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant.path())
        .connect(connect)
        .open()
        .await
        .unwrap_err();
    let Error::Connect { records, .. } = &error else { panic!("{error:?}") };
    assert_eq!(records[0].message, "AccessToken is not a well formed JWT token");
    assert!(!format!("{error:?}").contains("not-a-jwt"), "the token is masked: {error:?}");
}

#[tokio::test]
async fn a_certificate_from_a_base64_pfx_connects_in_memory() {
    use base64::Engine as _;
    let tenant = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    let password = "Pfx-Secret-5d0c77aa";
    let pfx = certificate(certs.path(), password).await;
    let encoded = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&pfx).unwrap());
    std::fs::remove_file(&pfx).unwrap(); // only the base64 text remains, as in a CI secret
    let connect = |password: &str| {
        Command::new("Connect-ExchangeOnline")
            .param("AppId", APP_ID)
            .param("Organization", "contoso.onmicrosoft.com")
            .param("ShowBanner", false)
            .param("EXOModuleBasePath", tenant.path().display().to_string())
            .certificate_param("Certificate", SecretString::from(encoded.clone()), Some(SecretString::from(password.to_owned())))
    };
    let builder = common::builder().module_path(common::sim_modules()).module("ExchangeOnlineManagement").env("EXO_SIM_TENANT", tenant.path());
    let mut rs = builder.clone().connect(connect(password)).open().await.unwrap();
    let r = rs.invoke(&Command::new("Get-ConnectionInformation")).await.unwrap();
    assert_eq!(r.output[0].value["CertificateAuthentication"], true, "{r:?}");
    let r = rs.invoke(&Command::new("Get-EXOMailbox").param("Identity", "ContosoUser1")).await.unwrap();
    assert!(r.succeeded(), "{:?}", r.errors);
    rs.close().await.unwrap();

    let error = builder.connect(connect("wrong-password")).open().await.unwrap_err().to_string();
    assert!(error.contains("Certificate") && error.contains("cannot be opened"), "{error}");
    assert!(!error.contains("wrong-password") && !error.contains(&encoded[..40]), "no secret in the message: {error}");
}

#[tokio::test]
async fn mailboxes_read_as_a_rust_type_and_a_mistyped_property_is_named() {
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    #[allow(dead_code)] // read through Debug and the assertions below
    struct Mailbox {
        alias: String,
        email_addresses: Vec<String>,
        recipient_type_details: String,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    #[allow(dead_code)]
    struct Wrong {
        email_addresses: Vec<u32>,
    }
    let tenant = tempfile::tempdir().unwrap();
    let mut rs = common::sim_builder(tenant.path()).open().await.unwrap();
    let r = rs.invoke(&Command::new("Get-Mailbox").param("ResultSize", 3)).await.unwrap();
    let mailboxes: Vec<Mailbox> = r.output_as().unwrap();
    assert_eq!(mailboxes.len(), 3);
    assert!(mailboxes[0].email_addresses.iter().any(|a| a.contains('@')), "{mailboxes:?}");
    let error = r.output_as::<Wrong>().unwrap_err();
    let Error::OutputShape { type_name, property, .. } = &error else { panic!("{error:?}") };
    assert!(type_name.contains("Mailbox"), "{error}");
    assert_eq!(property.as_deref(), Some("EmailAddresses[0]"), "{error}");
    rs.close().await.unwrap();
}
