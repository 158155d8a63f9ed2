//! `psbridge doctor`: checks, one line each, that a profile can work on this machine, and says how to fix
//! what cannot.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use psbridge::exo::TokenClaims;
use psbridge::{Command, InvocationResult, Runspace, SecretString};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::config::{CERTIFICATE_PASSWORD, Config, SIMULATED, SecretKind, SecretSpec};
use crate::connector::{self, rfc3339};
use crate::profile::Profile;
use crate::secret::{self, SecretReader};
use crate::exit::CliError;
use crate::{EXIT_COMMAND_ERRORS, Globals};

/// Days before a certificate expires when doctor starts to warn.
const EXPIRY_WARNING_DAYS: f64 = 30.0;
/// Time left on an access token under which doctor warns.
const TOKEN_WARNING: Duration = Duration::from_secs(15 * 60);

/// Check that a profile can work here: pwsh, modules, certificate, secrets, a test connect and a cheap
/// command.
///
/// One line per check: ok, warn, FAIL or skip, and under each failure how to fix it. The exit status is
/// 0 when nothing failed (warnings allowed) and 1 otherwise, so that CI can run doctor before the real
/// work and stop early with the reason in its log. Secrets are read from their sources to check them,
/// and never printed.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge doctor --profile contoso\n  \
    psbridge doctor --simulated\n  \
    PSBRIDGE_PROFILE=contoso psbridge doctor && psbridge batch changes.jsonl --output results.jsonl")]
pub struct DoctorArgs {
    /// Short for --profile simulated (it wins over --profile and PSBRIDGE_PROFILE).
    #[arg(long)]
    simulated: bool,

    /// Stop after the local checks: no connect, no command.
    #[arg(long)]
    offline: bool,
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

/// Prints checks as they are made and remembers whether any failed.
#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, status: Status, what: &str, detail: impl std::fmt::Display, fix: Option<String>) {
        let mark = match status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        };
        println!("{mark}  {what:<13} {detail}");
        if let Some(fix) = fix {
            println!("      {:<13} fix: {fix}", "");
        }
        self.failed |= status == Status::Fail;
    }

    fn ok(&mut self, what: &str, detail: impl std::fmt::Display) {
        self.line(Status::Ok, what, detail, None);
    }

    fn fail(&mut self, what: &str, detail: impl std::fmt::Display, fix: impl Into<String>) {
        self.line(Status::Fail, what, detail, Some(fix.into()));
    }
}

pub async fn run(args: DoctorArgs, globals: Globals) -> Result<(), CliError> {
    let globals = globals.with_simulated(args.simulated);
    let mut report = Report::default();
    if let Some(profile) = configuration(&mut report, &globals, globals.profile.as_deref()) {
        check_profile(&mut report, &profile, args.offline).await;
    }
    if report.failed {
        println!("\nSome checks failed: fix them before running psbridge with this profile.");
        Err(CliError::Reported(EXIT_COMMAND_ERRORS))
    } else {
        Ok(())
    }
}

/// The configuration file and the profile.
fn configuration(report: &mut Report, globals: &Globals, asked: Option<&str>) -> Option<Profile> {
    let config = match Config::load(globals.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            report.fail("configuration", error, "correct the file at the line shown (psbridge --help describes the format)");
            return None;
        }
    };
    match &config.path {
        Some(path) => report.ok("configuration", format!("{} ({} profiles)", path.display(), config.file.profiles.len())),
        None => report.ok(
            "configuration",
            format!(
                "no file at {} (only the built-in `{SIMULATED}` profile)",
                crate::config::default_path().map_or("the config folder".to_owned(), |p| p.display().to_string())
            ),
        ),
    }
    match Profile::find(&config, asked) {
        Ok(profile) => {
            let line = profile.name.as_deref().and_then(|n| config.profile_line(n)).map(|l| format!(" (line {l})")).unwrap_or_default();
            report.ok("profile", format!("{}{line}", profile.label()));
            Some(profile)
        }
        Err(error) => {
            report.fail("profile", error, "pass --profile with one of the names above, or add the profile to the file");
            None
        }
    }
}

async fn check_profile(report: &mut Report, profile: &Profile, offline: bool) {
    let mut secrets = SecretReader::default();
    let (secrets_ok, connect_values) = check_secrets(report, profile, &mut secrets).await;
    let Some(mut runspace) = check_pwsh(report, profile).await else {
        report.line(Status::Skip, "connect", "skipped: pwsh did not start", None);
        return;
    };
    let modules_ok = check_modules(report, profile, &mut runspace).await;
    let certificate_ok = check_certificate(report, profile, &connect_values, &mut runspace).await;
    let _ = runspace.close().await;
    if offline {
        report.line(Status::Skip, "connect", "skipped (--offline)", None);
    } else if !(secrets_ok && modules_ok && certificate_ok) {
        report.line(Status::Skip, "connect", "skipped: an earlier check failed", None);
    } else {
        check_connect(report, profile, &mut secrets).await;
    }
}

/// Every secret of the profile can be read from its source (a program is run), and an access token is
/// a JWT that has not expired. Returns whether all passed, and the connect command's secrets as read.
async fn check_secrets(report: &mut Report, profile: &Profile, secrets: &mut SecretReader) -> (bool, BTreeMap<String, SecretString>) {
    let mut ok = true;
    let mut connect_values = BTreeMap::new();
    let commands = [(true, &profile.spec.connect), (false, &profile.spec.disconnect), (false, &profile.spec.check)];
    for (is_connect, spec) in commands {
        let Some(spec) = spec else { continue };
        for (name, source) in &spec.secrets {
            let source = source.get_ref();
            match secrets.read_any(name, source).await {
                Ok(value) => {
                    report.ok("secret", format!("{name} from {}", secret::describe(source)));
                    if connector::is_access_token(name) {
                        ok &= check_token(report, name, source, &value);
                    }
                    if is_connect {
                        connect_values.insert(name.clone(), value);
                    }
                }
                Err(error) => {
                    ok = false;
                    let fix = match source.source() {
                        crate::config::Source::File(_) => "make the file hold the secret, readable only by you (chmod 600)",
                        crate::config::Source::Env(_) => "set the variable in the job's environment (a CI secret), not in the file",
                        crate::config::Source::Command(_) => "run the command yourself: it must exit 0 and print the secret on its standard output",
                        crate::config::Source::Stdin => "pipe the secret into psbridge's standard input",
                    };
                    report.fail("secret", error, fix);
                }
            }
        }
    }
    (ok, connect_values)
}

/// An access token's expiry, tenant and audience (never the token): FAIL when it is not a JWT or has
/// expired, warn when under [`TOKEN_WARNING`] is left.
fn check_token(report: &mut Report, name: &str, source: &SecretSpec, token: &SecretString) -> bool {
    let from = secret::describe(source);
    let fix_fresh = "get a fresh token (a command source, such as az account get-access-token, gets one at every connect)";
    let claims = match TokenClaims::from_jwt(token.expose_secret()) {
        Ok(claims) => claims,
        Err(error) => {
            report.fail("token", format!("{name} from {from}: {error}"), "give the access token itself: three base64url parts separated by dots");
            return false;
        }
    };
    let about = format!(
        "tenant {}, audience {}",
        claims.tenant_id.as_deref().unwrap_or("(no tid claim)"),
        claims.audience.as_deref().unwrap_or("(no aud claim)")
    );
    let Some(at) = claims.expires_at else {
        report.line(Status::Warn, "token", format!("{name} from {from}: no exp claim, so its end cannot be known; {about}"), None);
        return true;
    };
    let now = SystemTime::now();
    match at.duration_since(now) {
        Err(ago) => {
            let minutes = ago.duration().as_secs() / 60;
            report.fail("token", format!("{name} from {from}: expired at {} ({minutes} min ago); {about}", rfc3339(at)), fix_fresh);
            false
        }
        Ok(left) => {
            let detail = format!("{name} from {from}: expires at {} (in {} min); {about}", rfc3339(at), left.as_secs() / 60);
            if left < TOKEN_WARNING {
                report.line(Status::Warn, "token", detail, Some(fix_fresh.to_owned()));
            } else {
                report.ok("token", detail);
            }
            true
        }
    }
}

/// pwsh is found and starts; returns a bare worker (the profile's module path, no modules).
async fn check_pwsh(report: &mut Report, profile: &Profile) -> Option<Runspace> {
    let fix = "install PowerShell 7.4 or later (scripts/setup.sh, or https://aka.ms/powershell), or set pwsh in the profile or PSBRIDGE_PWSH";
    let path = match psbridge::find_pwsh(profile.spec.pwsh.as_deref()) {
        Ok(path) => path,
        Err(error) => {
            report.fail("pwsh", error, fix);
            return None;
        }
    };
    match profile.bare_builder().open().await {
        Ok(runspace) => {
            let info = runspace.info();
            report.ok("pwsh", format!("{}: PowerShell {} ({}) on {}", path.display(), info.ps_version, info.ps_edition, info.os));
            Some(runspace)
        }
        Err(error) => {
            report.fail("pwsh", format!("{}: {error}", path.display()), fix);
            None
        }
    }
}

/// Every module of the profile is found, in a version it accepts.
async fn check_modules(report: &mut Report, profile: &Profile, runspace: &mut Runspace) -> bool {
    let mut ok = true;
    for module in &profile.spec.modules {
        let name = module.name();
        let probe = Command::script(
            "param([string]$Name)
             Get-Module -ListAvailable -Name $Name -ErrorAction SilentlyContinue |
                 Sort-Object Version -Descending | Select-Object -First 1 |
                 ForEach-Object { [pscustomobject]@{ Version = $_.Version.ToString(); Path = $_.Path } }",
        )
        .param("Name", name);
        let found = runspace.invoke(&probe).await.ok().and_then(|r| r.output.into_iter().next()).map(|o| o.value);
        let Some(found) = found else {
            ok = false;
            report.fail(
                "module",
                format!("{name}: not found on PSModulePath"),
                format!("Install-Module {name} -Scope CurrentUser, or add its folder to module_path in the profile"),
            );
            continue;
        };
        let version = found["Version"].as_str().unwrap_or_default();
        let path = found["Path"].as_str().unwrap_or_default();
        match module.minimum_version() {
            Some(minimum) if version_less(version, minimum) => {
                ok = false;
                report.fail(
                    "module",
                    format!("{name} {version} at {path} is older than {minimum}, the profile's minimum"),
                    format!("Update-Module {name}"),
                );
            }
            _ => report.ok("module", format!("{name} {version} ({path})")),
        }
    }
    ok
}

/// Whether dotted version `a` is lower than `b`.
fn version_less(a: &str, b: &str) -> bool {
    let parts = |v: &str| v.split('.').map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
    let (mut a, mut b) = (parts(a), parts(b));
    let len = a.len().max(b.len());
    a.resize(len, 0);
    b.resize(len, 0);
    a < b
}

/// The connect command's certificate, when it names one: a certificate secret (a base64 PFX) or a
/// file opens with its password, holds a private key and is valid now; or the thumbprint is in the
/// user's store. `values` are the connect command's secrets as read by [`check_secrets`].
async fn check_certificate(report: &mut Report, profile: &Profile, values: &BTreeMap<String, SecretString>, runspace: &mut Runspace) -> bool {
    let Some(connect) = &profile.spec.connect else { return true };
    let parameter = |name: &str| connect.parameters.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v);
    let password = connect.secrets.iter().find(|(name, _)| name.eq_ignore_ascii_case(CERTIFICATE_PASSWORD));
    let password_source = password.map(|(name, spec)| format!("{name} ({})", secret::describe(spec.get_ref())));
    let password_value = || password.and_then(|(name, _)| values.get(name)).cloned();
    let unreadable = password.is_some_and(|(name, _)| !values.contains_key(name));
    if let Some((name, spec)) = connect.secrets.iter().find(|(_, spec)| spec.get_ref().kind == SecretKind::Certificate) {
        let what = format!("{name} from {}", secret::describe(spec.get_ref()));
        let (Some(pfx), false) = (values.get(name), unreadable) else {
            report.line(Status::Skip, "certificate", format!("{what}: it or its password could not be read (above)"), None);
            return false;
        };
        // Built in the worker's memory exactly as the connect builds it.
        let probe = certificate_probe("param($Certificate)", "Describe-Certificate $Certificate").certificate_param("Certificate", pfx.clone(), password_value());
        return certificate_verdict(report, &what, "certificate", runspace.invoke(&probe).await, password_source);
    }
    if let Some(Value::String(thumbprint)) = parameter("CertificateThumbprint") {
        let probe = certificate_probe(
            "param([string]$Thumbprint)",
            "$store = [System.Security.Cryptography.X509Certificates.X509Store]::new('My', 'CurrentUser')
             $store.Open('ReadOnly')
             try { $store.Certificates.Find('FindByThumbprint', $Thumbprint, $false) | ForEach-Object { Describe-Certificate $_ } }
             finally { $store.Close() }",
        )
        .param("Thumbprint", thumbprint.as_str());
        return certificate_verdict(report, &format!("thumbprint {thumbprint}"), "certificate", runspace.invoke(&probe).await, None);
    }
    let Some(Value::String(path)) = parameter("CertificateFilePath") else { return true };
    let file = PathBuf::from(path);
    if let Err(error) = std::fs::File::open(&file) {
        report.fail("certificate", format!("{}: {error}", file.display()), "point CertificateFilePath at the .pfx file, readable by this user");
        return false;
    }
    if unreadable {
        report.line(Status::Skip, "certificate", format!("{}: its password could not be read (above)", file.display()), None);
        return false;
    }
    let mut probe = certificate_probe(
        "param([string]$Path, [securestring]$Password)",
        "Describe-Certificate ([System.Security.Cryptography.X509Certificates.X509Certificate2]::new($Path, $Password))",
    )
    .param("Path", path.as_str());
    if let Some(value) = password_value() {
        probe = probe.secure_param("Password", value);
    }
    certificate_verdict(report, &file.display().to_string(), "file", runspace.invoke(&probe).await, password_source)
}

/// A script: `param_block`, then a function that turns a certificate into the fields doctor reads,
/// then `body`.
fn certificate_probe(param_block: &str, body: &str) -> Command {
    Command::script(format!(
        "{param_block}
         function Describe-Certificate($c) {{
             [pscustomobject]@{{
                 Subject = $c.Subject; Thumbprint = $c.Thumbprint; HasPrivateKey = $c.HasPrivateKey
                 NotAfter = $c.NotAfter.ToUniversalTime().ToString('yyyy-MM-dd HH:mm') + ' UTC'
                 DaysLeft = ($c.NotAfter.ToUniversalTime() - [datetime]::UtcNow).TotalDays
             }}
         }}
         {body}"
    ))
}

/// Reports what a certificate probe found; `noun` is what the password opens ("file", "certificate").
fn certificate_verdict(report: &mut Report, what: &str, noun: &str, outcome: psbridge::Result<InvocationResult>, password: Option<String>) -> bool {
    let result = match outcome {
        Ok(result) => result,
        Err(error) => {
            report.fail("certificate", format!("{what}: {error}"), "run doctor again; if it persists, see RUST_LOG=psbridge=debug");
            return false;
        }
    };
    let Some(found) = result.output.first().map(|o| &o.value) else {
        let message = result.errors.first().map_or("not found".to_owned(), |e| e.exception_message.clone().unwrap_or_else(|| e.message.clone()));
        let fix = match &password {
            Some(source) if message.to_lowercase().contains("password") => {
                format!("the password does not open this {noun}: check secret {source}")
            }
            _ if what.starts_with("thumbprint") => "import the certificate into CurrentUser\\My, or use CertificateFilePath".to_owned(),
            _ => "check that the file is a PKCS#12 (.pfx) certificate with its private key".to_owned(),
        };
        let detail = if message.to_lowercase().contains("password") { format!("{what}: cannot be opened with the password given ({message})") } else { format!("{what}: {message}") };
        report.fail("certificate", detail, fix);
        return false;
    };
    let days = found["DaysLeft"].as_f64().unwrap_or(0.0);
    let summary = format!("{what}: {}, thumbprint {}, valid until {}", found["Subject"].as_str().unwrap_or(""), found["Thumbprint"].as_str().unwrap_or(""), found["NotAfter"].as_str().unwrap_or(""));
    if found["HasPrivateKey"] != Value::Bool(true) {
        report.fail("certificate", format!("{summary}: no private key"), "export the certificate with its private key (.pfx)");
        false
    } else if days <= 0.0 {
        report.fail("certificate", format!("{summary}: expired"), "create a new certificate and upload it to the app registration");
        false
    } else if days < EXPIRY_WARNING_DAYS {
        report.line(Status::Warn, "certificate", format!("{summary}: expires in {days:.0} days"), Some("renew it soon and upload the new one to the app registration".to_owned()));
        true
    } else {
        report.ok("certificate", summary);
        true
    }
}

/// The real thing: a worker opened and connected as the profile says, then the cheap command.
async fn check_connect(report: &mut Report, profile: &Profile, secrets: &mut SecretReader) {
    let (builder, check) = match (profile.builder(secrets), profile.check_command(secrets).await) {
        (Ok(builder), Ok(check)) => (builder, check),
        (Err(error), _) | (_, Err(error)) => {
            report.fail("connect", error, "correct the profile");
            return;
        }
    };
    let what = profile.spec.connect.as_ref().map_or("start".to_owned(), |c| c.command.clone());
    let started = Instant::now();
    let mut runspace = match builder.open().await {
        Ok(runspace) => runspace,
        Err(error) => {
            report.fail("connect", format!("{what}: {error}"), "check the connect parameters (AppId, Organization, certificate) and the app's permissions; RUST_LOG=psbridge=debug shows the worker's stderr");
            return;
        }
    };
    report.ok("connect", format!("{what}: connected in {:.1} s", started.elapsed().as_secs_f64()));
    match check {
        None => report.line(Status::Skip, "command", "no check command: set `check = { command = \"...\" }` in the profile", None),
        Some(check) => {
            let started = Instant::now();
            match runspace.invoke(&check).await {
                Ok(result) if result.succeeded() => report.ok(
                    "command",
                    format!("{}: {} object(s) in {:.0} ms", check.name(), result.output.len(), started.elapsed().as_secs_f64() * 1000.0),
                ),
                Ok(result) => report.fail(
                    "command",
                    format!("{}: {}", check.name(), result.errors.first().map_or("reported errors", |e| e.message.as_str())),
                    "check the app's Exchange role assignments (the command needs read access)",
                ),
                Err(error) => report.fail("command", format!("{}: {error}", check.name()), "see RUST_LOG=psbridge=debug for the worker's stderr"),
            }
        }
    }
    let _ = runspace.close().await;
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_compare_by_number() {
        assert!(super::version_less("3.4.0", "3.10"));
        assert!(!super::version_less("3.9.0", "3.9"));
        assert!(super::version_less("2", "2.0.1"));
    }
}
