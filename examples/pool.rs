//! Sample 2 of Microsoft's "Use C# to connect to Exchange Online PowerShell", with psbridge: a pool of
//! three workers, each connected, and two Get-Mailbox commands run in parallel.
//!
//! ```sh
//! cargo run --example pool -- --simulated            # the bundled simulated module and a sample tenant
//! EXO_APP_ID=... EXO_ORGANIZATION=contoso.onmicrosoft.com EXO_CERT_PATH=/secure/app.pfx \
//!   EXO_CERT_PASSWORD=... cargo run --example pool     # a real tenant (ExchangeOnlineManagement 3.x)
//! ```
//! `--hold` keeps the pool open after the commands (printing the worker pids) until Ctrl-C or SIGTERM.

use std::path::PathBuf;

use psbridge::{Command, Runspace, RunspaceBuilder, RunspacePool, SecretString};

fn workers(simulated: bool) -> Result<RunspaceBuilder, String> {
    let builder = Runspace::builder().module("ExchangeOnlineManagement");
    let disconnect = Command::new("Disconnect-ExchangeOnline").param("Confirm", false);
    if simulated {
        let sim = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts").join("sim");
        let tenant = std::env::var_os("EXO_SIM_TENANT").map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("psbridge-example-tenant"));
        return Ok(builder
            .module_path(sim)
            .env("EXO_SIM_TENANT", tenant)
            .connect(
                Command::new("Connect-ExchangeOnline")
                    .param("ManagedIdentity", true)
                    .param("Organization", "contoso.onmicrosoft.com")
                    .param("ShowBanner", false),
            )
            .disconnect(disconnect));
    }
    let var = |name: &str| std::env::var(name).map_err(|_| format!("set {name} (or pass --simulated)"));
    Ok(builder
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("AppId", var("EXO_APP_ID")?)
                .param("Organization", var("EXO_ORGANIZATION")?)
                .param("CertificateFilePath", var("EXO_CERT_PATH")?)
                .secure_param("CertificatePassword", SecretString::from(var("EXO_CERT_PASSWORD")?))
                .param("ShowBanner", false),
        )
        .disconnect(disconnect))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let simulated = args.iter().any(|a| a == "--simulated");
    let hold = args.iter().any(|a| a == "--hold");

    // min = max = 3, every worker connected once (the C# sample's RunspacePool with ReuseThread).
    let pool = RunspacePool::builder(workers(simulated)?).min_workers(3).max_workers(3).build().await?;

    // BeginInvoke/EndInvoke: start both, then wait for both.
    let identities = ["ContosoUser1", "ContosoUser2"];
    let (first, second) = tokio::join!(
        pool.invoke(Command::new("Get-Mailbox").param("Identity", identities[0])),
        pool.invoke(Command::new("Get-Mailbox").param("Identity", identities[1])),
    );
    for (identity, result) in identities.iter().zip([first?, second?]) {
        if result.had_errors {
            for error in &result.errors {
                println!("{identity}: error: {} ({})", error.message, error.category_info.as_deref().unwrap_or(""));
            }
        } else {
            for mailbox in &result.output {
                let text = |name: &str| mailbox.value[name].as_str().unwrap_or_default().to_owned();
                println!("{identity}: {} <{}>", text("DisplayName"), text("PrimarySmtpAddress"));
            }
        }
    }

    if hold {
        println!("pids {}", pool.worker_pids().iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
        shutdown_signal().await?;
    }
    pool.close().await;
    Ok(())
}

/// Ctrl-C, or SIGTERM where there is one.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
