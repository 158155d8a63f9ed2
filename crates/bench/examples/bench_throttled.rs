//! The throttled batch of `scripts/bench.sh`: `Set-Mailbox` items against the simulated tenant's cmdlet
//! budget (`EXO_SIM_BUDGET`, for example `100/5s`), through a pool of 2 workers x 4 runspaces, at a fixed
//! concurrency of 8 and with adaptive concurrency. Reports the time against the budget's lower bound
//! (items / budget rate) and the share of calls the budget refused (from the tenant's `budget.state`).
//!
//! ```sh
//! bench_throttled fixed|adaptive <config.json> <out.json>
//! ```
//! The module, tenant, latency and budget come from the environment, set by bench.sh.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use psbridge::{Command, RetryPolicy, Runspace, RunspaceBuilder, RunspacePool, exo};
use psbridge_bench::{Config, Records};

const WORKERS: usize = 2;
const RUNSPACES: usize = 4;

fn workers() -> RunspaceBuilder {
    Runspace::builder()
        .module("ExchangeOnlineManagement")
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("ManagedIdentity", true)
                .param("Organization", "contoso.onmicrosoft.com")
                .param("ShowBanner", false),
        )
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false))
}

/// `EXO_SIM_BUDGET` as (calls, window): `100/5s` is (100, 5 s).
fn budget() -> (f64, Duration) {
    let text = std::env::var("EXO_SIM_BUDGET").expect("bench.sh sets EXO_SIM_BUDGET");
    let (calls, window) = text.split_once('/').expect("EXO_SIM_BUDGET is N/duration");
    let window = humantime_window(window.trim());
    (calls.trim().parse().expect("a number of calls"), window)
}

fn humantime_window(text: &str) -> Duration {
    let (number, unit) = text.find(|c: char| c.is_ascii_alphabetic()).map_or((text, "s"), |at| text.split_at(at));
    let number: f64 = number.parse().expect("a window length");
    match unit {
        "ms" => Duration::from_secs_f64(number / 1000.0),
        "s" => Duration::from_secs_f64(number),
        "m" => Duration::from_secs_f64(number * 60.0),
        other => panic!("unknown unit {other}"),
    }
}

/// The tenant budget's totals so far: (admitted, refused).
fn budget_totals(tenant: &Path) -> (u64, u64) {
    let Ok(state) = std::fs::read_to_string(tenant.join("budget.state")) else { return (0, 0) };
    let mut totals = state.lines().next().unwrap_or("0 0").split(' ').map(|n| n.parse().unwrap_or(0));
    (totals.next().unwrap_or(0), totals.next().unwrap_or(0))
}

async fn throttled(config: &Config, adaptive: bool, records: &mut Records) {
    let tenant = PathBuf::from(std::env::var("EXO_SIM_TENANT").expect("bench.sh sets EXO_SIM_TENANT"));
    let items = config.throttled_items;
    let (calls, window) = budget();
    let pool = RunspacePool::builder(workers())
        .min_workers(WORKERS)
        .max_workers(WORKERS)
        .runspaces_per_worker(RUNSPACES)
        .classifier(exo::ExchangeOnline)
        .retry(RetryPolicy::default().max_attempts(100).max_delay(Duration::from_secs(10)))
        .adaptive_concurrency(adaptive)
        .build()
        .await
        .expect("the pool opens");
    // Whatever an earlier run spent leaves the window first: every run starts with the whole budget.
    tokio::time::sleep(window).await;
    let before = budget_totals(&tenant);
    let lowest = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = {
        let (pool, lowest) = (pool.clone(), lowest.clone());
        tokio::spawn(async move {
            loop {
                lowest.fetch_min(pool.stats().concurrency_limit, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    let results = futures_util::future::join_all((0..items).map(|i| {
        // The throttled tenant is the 200-mailbox sample one.
        let identity = format!("ContosoUser{}", i % 200 + 1);
        let command = Command::new("Set-Mailbox").param("Identity", identity).param("CustomAttribute1", format!("throttled {} {i}", config.run_id));
        let pool = pool.clone();
        async move { pool.invoke(command).await }
    }))
    .await;
    let seconds = started.elapsed().as_secs_f64();
    sampler.abort();
    for result in results {
        let result = result.expect("Set-Mailbox runs");
        assert!(result.succeeded(), "Set-Mailbox: {:?}", result.errors);
    }
    let after = budget_totals(&tenant);
    let (admitted, refused) = (after.0 - before.0, after.1 - before.1);
    let rate = calls / window.as_secs_f64();
    let lower_bound = items as f64 / rate;
    let variant = if adaptive { "adaptive concurrency (2 x 4)" } else { "fixed concurrency 8 (2 x 4)" };
    records.add(
        variant,
        if adaptive { "throttled-adaptive" } else { "throttled-fixed" },
        serde_json::json!({
            "calls": items, "seconds": seconds, "lower_bound_s": lower_bound, "to_bound": seconds / lower_bound,
            "admitted": admitted, "refused": refused, "throttled_share": refused as f64 / (admitted + refused).max(1) as f64,
            "throttled_percent": 100.0 * refused as f64 / (admitted + refused).max(1) as f64,
            "lowest_limit": lowest.load(Ordering::Relaxed), "final_limit": pool.stats().concurrency_limit,
            "retries": pool.stats().counters.retries,
        }),
    );
    pool.close().await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, config, out] = args.as_slice() else {
        panic!("usage: bench_throttled fixed|adaptive <config.json> <out.json>");
    };
    let config = Config::read(&PathBuf::from(config));
    let mut records = Records::new("psbridge");
    match mode.as_str() {
        "fixed" => throttled(&config, false, &mut records).await,
        "adaptive" => throttled(&config, true, &mut records).await,
        other => panic!("unknown mode {other}"),
    }
    records.write(&PathBuf::from(out));
}
