//! `psbridge serve`: one warm, connected pool per profile, shared over an HTTP/JSON API by CI steps,
//! scripts and services.
//!
//! The parts: [`address`] and [`listen`] (where it listens, the unix socket's mode and peer
//! credentials), [`auth`] (who may reach it), [`policy`] (what they may run), [`pools`] (the pools, by
//! profile), [`api`] (the routes), [`audit`], [`metrics`], and [`lifecycle`] (signals, systemd, the
//! shutdown).

pub mod address;
pub mod api;
pub mod audit;
pub mod auth;
pub mod batches;
pub mod lifecycle;
pub mod listen;
pub mod metrics;
pub mod policy;
pub mod pools;
pub mod wire;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::config::{Config, SIMULATED};
use crate::exit::{CliError, EXIT_BRIDGE};
use crate::profile::Profile;
use crate::secret::SecretReader;
use crate::Globals;
use address::Address;
use lifecycle::{Event, ServerSignals};
use policy::Policy;
use pools::{Pools, Served};

/// Serve one warm, connected pool of workers per profile over an HTTP/JSON API, for `run --server`,
/// `batch --server` and any HTTP client.
///
/// Each profile (--profile, repeatable; --simulated adds the built-in one; neither: every profile of the
/// configuration file) gets a pool, opened at launch
/// (or, with --lazy, on first use) and closed after --idle-timeout without requests (opened again on
/// demand). The API is under /v1 (its OpenAPI document at /v1/openapi.json); /metrics is Prometheus
/// text. On a unix socket (the default: $XDG_RUNTIME_DIR/psbridge.sock) only this user and members of
/// --allow-group get in; on TCP (loopback unless --allow-remote) a bearer token from --token-from is
/// required. What clients may run is the profile's `allow` globs and `allow_scripts`; a profile from the
/// file without `allow` is refused unless --allow-all. One audit line (JSONL) per request goes to
/// stdout, or to --audit FILE.
///
/// SIGTERM (or Ctrl-C) stops accepting, lets running commands finish within --shutdown-grace, cancels
/// the rest, disconnects every worker and exits 0; SIGHUP reads the configuration again (added or
/// changed profiles take effect, the old pools drain). Under systemd (Type=notify) it sends READY=1 once
/// healthy and STOPPING=1.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    psbridge serve --simulated\n  \
    psbridge serve --profile contoso --profile fabrikam --workers 4 --lazy --idle-timeout 900\n  \
    psbridge serve --profile contoso --listen tcp:127.0.0.1:8655 --token-from file:/run/secrets/psbridge-token\n  \
    psbridge run --server unix:$XDG_RUNTIME_DIR/psbridge.sock --simulated Get-Mailbox\n  \
    psbridge server status")]
pub struct ServeArgs {
    /// Serve the built-in simulated profile too (with the profiles --profile names).
    #[arg(long)]
    pub simulated: bool,

    /// Most workers per profile [default: the profile's workers, else 3].
    #[arg(long, short, value_name = "N")]
    pub workers: Option<usize>,

    /// Connected runspaces per worker process, each running one command at a time [default: the
    /// profile's runspaces_per_worker, else 1].
    #[arg(long, value_name = "M")]
    pub runspaces_per_worker: Option<usize>,

    /// Workers per profile kept connected while its pool is open [default: 1].
    #[arg(long, value_name = "N", default_value = "1")]
    pub min_workers: usize,

    /// Open a profile's pool on its first request instead of at launch.
    #[arg(long)]
    pub lazy: bool,

    /// Close a profile's pool after this many seconds without requests (opened again on demand).
    #[arg(long, value_name = "SECONDS", default_value = "1800", value_parser = crate::parse_seconds)]
    pub idle_timeout: Duration,

    /// Where to listen: unix:PATH (mode 0600) or tcp:HOST:PORT (loopback unless --allow-remote)
    /// [default: unix:$XDG_RUNTIME_DIR/psbridge.sock].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<Address>,

    /// Allow a TCP address that is not loopback.
    #[arg(long)]
    pub allow_remote: bool,

    /// Where the bearer token clients must give over TCP comes from: env:VARIABLE, file:PATH (mode
    /// 0600) or stdin (repeatable: several tokens, each named in the audit by its source).
    #[arg(long = "token-from", value_name = "SOURCE", value_parser = auth::parse_token_source)]
    pub token_from: Vec<crate::config::SecretSpec>,

    /// On a unix socket, let in members of this group too (besides this user): the socket is then mode
    /// 0660 and owned by the group.
    #[arg(long, value_name = "GROUP")]
    pub allow_group: Option<String>,

    /// Let clients run anything on profiles that have no `allow` list (scripts included).
    #[arg(long)]
    pub allow_all: bool,

    /// How long running commands may finish after SIGTERM before they are cancelled.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = crate::parse_seconds)]
    pub shutdown_grace: Duration,

    /// The largest request body, in bytes (suffix K, M or G).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = crate::batch::parse_bytes)]
    pub max_body_bytes: usize,

    /// Requests one client (a uid, or a token) may have under way at once; more are refused with 429.
    #[arg(long, value_name = "N", default_value = "64")]
    pub max_client_requests: usize,

    /// Append the audit lines to this file (created 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,

    /// The log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Where the server keeps batch journals [default: $XDG_STATE_HOME/psbridge/batches].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Also run the items that `batch --queue` publishes to this NATS JetStream server
    /// (nats://HOST:PORT, or tls://HOST:PORT) for the profiles served at launch, as many at once as
    /// each pool can run (--workers × --runspaces-per-worker); credentials come from the
    /// configuration's [queue] section.
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,

    /// With --queue: seconds without an acknowledgement (in-progress ones included) after which
    /// JetStream gives an item to another host, the time to notice a host that died. The consumers keep
    /// the value of the host that created them.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = crate::parse_seconds)]
    pub ack_wait: Duration,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The profiles to serve: those named (several `--profile`) and the simulated one with `--simulated`;
/// else every profile of the file (so that a reload adds the profiles added to it), else its
/// `default_profile`.
fn profile_names(globals: &Globals, config: &Config, simulated: bool) -> Result<Vec<String>, CliError> {
    let mut names: Vec<String> = Vec::new();
    for name in globals.profiles.iter().cloned().chain(simulated.then(|| SIMULATED.to_owned())) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        names.extend(config.file.profiles.keys().cloned());
    }
    if names.is_empty() {
        names.extend(config.chosen(None).map(str::to_owned));
    }
    if names.is_empty() {
        return Err(CliError::usage(format_args!(
            "give the profiles to serve: --profile NAME (repeatable) or --simulated; profiles: {}",
            config.profile_names()
        )));
    }
    Ok(names)
}

/// Reads the configuration and makes the profiles to serve (secrets checked, policies built).
fn load(args: &ServeArgs, globals: &Globals, secrets: &mut SecretReader) -> Result<Vec<Served>, CliError> {
    let config = Config::load(globals.config.as_deref())?;
    let mut served = Vec::new();
    for name in profile_names(globals, &config, args.simulated)? {
        let profile = Profile::find(&config, Some(&name))?;
        let policy = Policy::of(&profile, args.allow_all).map_err(CliError::Usage)?;
        let max = args.workers.unwrap_or_else(|| profile.workers());
        if max == 0 || args.min_workers == 0 {
            return Err(CliError::usage("--workers and --min-workers must be at least 1"));
        }
        let runspaces = args.runspaces_per_worker.unwrap_or_else(|| profile.runspaces_per_worker());
        if !(1..=64).contains(&runspaces) {
            return Err(CliError::usage("--runspaces-per-worker must be 1 to 64"));
        }
        let builder = profile
            .pool_builder(profile.builder(secrets)?)
            .runspaces_per_worker(runspaces)
            .min_workers(args.min_workers.min(max))
            .max_workers(max)
            .shutdown_grace(args.shutdown_grace);
        served.push(Served::new(profile, policy, builder, (max, runspaces), !args.lazy));
    }
    Ok(served)
}

/// Runs the server until SIGTERM or Ctrl-C.
pub async fn run(args: ServeArgs, globals: Globals) -> Result<(), CliError> {
    // Listening first: a signal during start-up stops the server cleanly.
    let mut signals = ServerSignals::new().map_err(CliError::Runtime)?;
    let mut secrets = SecretReader::default();
    let pools = Pools::new(load(&args, &globals, &mut secrets)?);
    let address = args.listen.clone().unwrap_or_else(Address::default_socket);
    let access = auth::Access::new(args.allow_group.as_deref(), &args.token_from, &mut secrets).map_err(CliError::Usage)?;
    let listener = listen::Listener::bind(&address, args.allow_remote, access.group()).await.map_err(CliError::usage)?;
    if listener.needs_token() && !access.has_tokens() {
        return Err(CliError::usage(format_args!(
            "{address} is a TCP address: give --token-from env:VARIABLE or file:PATH, the bearer token clients must send"
        )));
    }
    let address = listener.address();
    let audit = audit::Audit::open(args.audit.as_deref()).map_err(CliError::usage)?;
    let state_dir = match &args.state_dir {
        Some(dir) => dir.clone(),
        None => dirs::state_dir().or_else(dirs::data_local_dir).unwrap_or_else(std::env::temp_dir).join("psbridge").join("batches"),
    };
    let shutdown = lifecycle::Shutdown::new();
    let state = Arc::new(api::State {
        pools: pools.clone(),
        access,
        audit,
        metrics: metrics::Metrics::default(),
        started: Instant::now(),
        limits: api::Limits { max_body_bytes: args.max_body_bytes, max_client_requests: args.max_client_requests },
        clients: Default::default(),
        state_dir,
        shutdown: shutdown.clone(),
    });
    let serving = tokio::spawn(listener.serve(api::router(state), shutdown.child_token()));
    eprintln!("psbridge serve: listening on {address}");
    let host = match &args.queue {
        Some(url) => {
            let config = Config::load(globals.config.as_deref())?;
            let client = crate::queue::connect::connect(url, &config, &mut secrets, "psbridge serve", crate::queue::connect::Patience::Wait)
                .await
                .map_err(CliError::usage)?;
            let profiles = pools.all().iter().map(|s| (s.name.clone(), s.workers * s.runspaces)).collect();
            let options = crate::queue::host::HostOptions { ack_wait: args.ack_wait, name: crate::queue::host::host_name() };
            Some(tokio::spawn(crate::queue::host::run(client, pools.clone(), profiles, options, shutdown.child_token())))
        }
        None => None,
    };
    tracing::info!(%address, profiles = ?pools.all().iter().map(|s| s.name.clone()).collect::<Vec<_>>(), "listening");

    // The profiles started at launch; a signal meanwhile stops the server (the workers being started
    // are killed with the dropped future).
    let started = tokio::select! {
        started = pools.start_eager() => started,
        event = wait_for_stop(&mut signals) => {
            shutdown.cancel();
            let _ = serving.await;
            return Err(CliError::Interrupted(event));
        }
    };
    if let Err(error) = started {
        shutdown.cancel();
        pools.close_all().await;
        let _ = serving.await;
        eprintln!("psbridge serve: {error}");
        return Err(CliError::Reported(EXIT_BRIDGE));
    }
    lifecycle::notify_ready();
    eprintln!("psbridge serve: ready");
    let idle = tokio::spawn(pools.clone().close_idle(args.idle_timeout));

    loop {
        match signals.recv().await {
            Event::Reload => match load(&args, &globals, &mut secrets) {
                Ok(fresh) => {
                    let reloaded = pools.replace(fresh);
                    tracing::info!(added = ?reloaded.added, changed = ?reloaded.changed, removed = ?reloaded.removed, "configuration reloaded");
                    eprintln!(
                        "psbridge serve: reloaded the configuration (added: {:?}, changed: {:?}, removed: {:?})",
                        reloaded.added, reloaded.changed, reloaded.removed
                    );
                }
                Err(error) => {
                    tracing::error!(%error, "reload failed; the running configuration stays");
                    eprintln!("psbridge serve: cannot reload, the running configuration stays: {error}");
                }
            },
            Event::Stop(signal) => {
                tracing::info!(%signal, "stopping");
                break;
            }
        }
    }
    lifecycle::notify_stopping();
    eprintln!("psbridge serve: stopping: running commands get {} s", args.shutdown_grace.as_secs_f64());
    idle.abort();
    // Stop accepting; requests under way end as their commands finish, or when the pools cancel them.
    shutdown.cancel();
    let closing = pools.close_all();
    tokio::pin!(closing);
    tokio::select! {
        () = &mut closing => {}
        event = wait_for_stop(&mut signals) => {
            // A second signal: no more grace.
            tracing::warn!(signal = %event, "stopping at once");
            return Err(CliError::Interrupted(event));
        }
    }
    match serving.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "serving ended with an error"),
        Err(error) => tracing::warn!(%error, "the server task failed"),
    }
    if let Some(host) = host {
        // The queued items that ran are recorded and acknowledged before the process ends (else they
        // would be delivered again); a queue that cannot be reached does not hold the exit for long.
        if tokio::time::timeout(QUEUE_RECORD_GRACE, host).await.is_err() {
            tracing::warn!("the queue did not take the last results in time; their items are delivered again");
        }
    }
    eprintln!("psbridge serve: stopped");
    Ok(())
}

/// How long a stopping `serve --queue` waits for the queue to take the results of its last items.
const QUEUE_RECORD_GRACE: Duration = Duration::from_secs(10);

/// The next stop signal (reload requests are ignored meanwhile).
async fn wait_for_stop(signals: &mut ServerSignals) -> crate::exit::Interrupt {
    loop {
        if let Event::Stop(signal) = signals.recv().await {
            return signal;
        }
    }
}
