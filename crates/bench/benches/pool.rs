//! RunspacePool benchmark: throughput of small commands for 1, 2, 3, 4 and 8 workers, as commands/s
//! and as the ratio to 1 worker measured in the same run; and the time to open a pool of 3 against the
//! time to open one runspace.
//!
//! `cargo bench --bench pool` (600 commands per point); `PSBRIDGE_BENCH_QUICK=1` (150 per point).
//! Simulated module (scripts/sim) with EXO_SIM_LATENCY_MS = 0 and = 50.

use std::path::Path;
use std::time::Instant;

use futures_util::future::join_all;
use psbridge::{Command, Runspace, RunspacePool};

use psbridge_bench::sim_workers;

async fn throughput(tenant: &Path, latency_ms: u32, size: usize, commands: usize) -> f64 {
    let pool = RunspacePool::builder(sim_workers(tenant, latency_ms)).min_workers(size).max_workers(size).build().await.unwrap();
    let get = |i: usize| Command::new("Get-Mailbox").param("Identity", format!("ContosoUser{}", i % 200 + 1));
    // warm-up: every worker runs a few commands first
    join_all((0..size * 10).map(|i| pool.invoke(get(i)))).await;
    let started = Instant::now();
    let results = join_all((0..commands).map(|i| pool.invoke(get(i)))).await;
    let rate = commands as f64 / started.elapsed().as_secs_f64();
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|r| !r.had_errors)));
    pool.close().await;
    rate
}

fn main() {
    let quick = std::env::var_os("PSBRIDGE_BENCH_QUICK").is_some();
    let commands = if quick { 150 } else { 600 };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let tenant = tempfile::tempdir().unwrap();
        // the first open seeds the tenant and compiles the worker host: keep it out of the timings
        Runspace::builder().open().await.unwrap().close().await.unwrap();
        sim_workers(tenant.path(), 0).open().await.unwrap().close().await.unwrap();

        let started = Instant::now();
        let one = sim_workers(tenant.path(), 0).open().await.unwrap();
        let one_open = started.elapsed();
        one.close().await.unwrap();
        let started = Instant::now();
        let pool = RunspacePool::builder(sim_workers(tenant.path(), 0)).min_workers(3).max_workers(3).build().await.unwrap();
        let pool_open = started.elapsed();
        pool.close().await;
        println!(
            "open: one runspace {:.0} ms; pool of 3 {:.0} ms (ratio {:.2}; workers open in parallel on {} cores)",
            one_open.as_secs_f64() * 1e3,
            pool_open.as_secs_f64() * 1e3,
            pool_open.as_secs_f64() / one_open.as_secs_f64(),
            std::thread::available_parallelism().map_or(0, usize::from)
        );

        for latency in [0, 50] {
            println!("\n{commands} x Get-Mailbox -Identity, EXO_SIM_LATENCY_MS={latency}");
            println!("  {:>7} {:>12} {:>10}", "workers", "commands/s", "vs 1");
            let mut base = None;
            for size in [1, 2, 3, 4, 8] {
                let rate = throughput(tenant.path(), latency, size, commands).await;
                let base = *base.get_or_insert(rate);
                println!("  {size:>7} {rate:>12.1} {:>10.2}", rate / base);
            }
        }
    });
}
