//! The psbridge comparator of `scripts/bench.sh`: one [`Runspace`], and [`RunspacePool`]s of three
//! lanes: 3 processes x 1 runspace, 1 x 3, and 2 x 2.
//!
//! ```sh
//! bench_psbridge single       <config.json> <out.json>   # Runspace: start-up, warm-up, small sequential
//! bench_psbridge parallel     <config.json> <out.json>   # 3 x 1: start-up, warm-ups, small x3, write x3, peak memory
//! bench_psbridge parallel-1x3 <config.json> <out.json>   # the same, one process of three runspaces
//! bench_psbridge parallel-2x2 <config.json> <out.json>   # the same, two processes of two runspaces
//! bench_psbridge large        <config.json> <out.json>   # Runspace: Get-Mailbox -ResultSize Unlimited, streamed
//! ```
//! The N x M variants are comparators of their own in the report (`psbridge 1×3`, `psbridge 2×2`).
//! The module and tenant come from the environment (PSModulePath, EXO_SIM_TENANT), set by bench.sh.

use psbridge_bench as common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Config, Records, Run, millis_since, peak_megabytes, read_properties};
use psbridge::{Command, InvocationResult, Runspace, RunspaceBuilder, RunspacePool, StreamItem};

const LANES: usize = 3;

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

fn get_mailbox(identity: &str) -> Command {
    Command::new("Get-Mailbox").param("Identity", identity)
}

/// Fails loudly on anything but exactly one mailbox, and reads every property of it.
fn check_one(result: psbridge::Result<InvocationResult>, identity: &str) {
    let result = result.unwrap_or_else(|e| panic!("Get-Mailbox {identity}: {e}"));
    assert!(!result.had_errors, "Get-Mailbox {identity}: {:?}", result.errors);
    assert_eq!(result.output.len(), 1, "Get-Mailbox {identity}");
    std::hint::black_box(read_properties(&result.output[0].value));
}

async fn sequential(runspace: &mut Runspace, identities: &[String]) -> Run {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(identities.len());
    for identity in identities {
        let call = Instant::now();
        check_one(runspace.invoke(&get_mailbox(identity)).await, identity);
        latencies.push(millis_since(call));
    }
    Run { latencies, seconds: started.elapsed().as_secs_f64() }
}

/// Runs `count` calls in three concurrent lanes, each taking the next index.
async fn parallel<F, Fut>(count: usize, call: F) -> Run
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()>,
{
    let next = AtomicUsize::new(0);
    let lane = || async {
        let mut timed = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                return timed;
            }
            let started = Instant::now();
            call(i).await;
            timed.push((i, millis_since(started)));
        }
    };
    let started = Instant::now();
    let mut timed: Vec<(usize, f64)> = futures_util::future::join_all((0..LANES).map(|_| lane())).await.concat();
    let seconds = started.elapsed().as_secs_f64();
    timed.sort_by_key(|&(i, _)| i);
    Run { latencies: timed.into_iter().map(|(_, ms)| ms).collect(), seconds }
}

async fn single(config: &Config, records: &mut Records) {
    let counts = config.counts(false);
    let ids = &config.identities;
    let started = Instant::now();
    let mut runspace = workers().open().await.expect("the runspace opens");
    records.add("Runspace", "start-up", serde_json::json!({ "ms": millis_since(started) }));
    records.add("Runspace", "warm-up", sequential(&mut runspace, &ids[..counts.warmup]).await.warm_up());
    let small = &ids[counts.warmup..counts.warmup + counts.small];
    records.add("Runspace", "small", sequential(&mut runspace, small).await.latency());
    runspace.close().await.expect("the runspace closes");
}

/// Three lanes of callers on `processes` x `runspaces` (at least three runspaces in all).
async fn pool(config: &Config, records: &mut Records, processes: usize, runspaces: usize) {
    let variant = format!("RunspacePool({processes} x {runspaces})");
    let variant = variant.as_str();
    let counts = config.counts(false);
    let ids = &config.identities;
    let started = Instant::now();
    let pool = RunspacePool::builder(workers())
        .min_workers(processes)
        .max_workers(processes)
        .runspaces_per_worker(runspaces)
        .build()
        .await
        .expect("the pool opens");
    records.add(variant, "start-up-x3", serde_json::json!({ "ms": millis_since(started) }));
    let get = |i: usize| {
        let pool = pool.clone();
        async move { check_one(pool.invoke(get_mailbox(&ids[i])).await, &ids[i]) }
    };
    records.add(variant, "warm-up-x3", parallel(counts.warmup, get).await.warm_up());
    records.add(variant, "small-x3", parallel(counts.small, |i| get(counts.warmup + i)).await.latency());
    let write = |i: usize| {
        let pool = pool.clone();
        let command = Command::new("Set-Mailbox")
            .param("Identity", ids[i % ids.len()].as_str())
            .param("CustomAttribute1", format!("bench {} psbridge {i}", config.run_id));
        async move {
            let result = pool.invoke(command).await.expect("Set-Mailbox runs");
            assert!(!result.had_errors, "Set-Mailbox: {:?}", result.errors);
        }
    };
    records.add(variant, "warm-up-write-x3", parallel(counts.warmup, write).await.warm_up());
    records.add(variant, "write-x3", parallel(counts.writes, |i| write(counts.warmup + i)).await.latency());
    // Peak memory of the whole set-up: the caller and every worker process (VmHWM), as the in-process
    // C# pool's is its one process.
    let workers: f64 = pool.worker_pids().iter().map(|pid| peak_megabytes(&pid.to_string())).sum();
    let caller = peak_megabytes("self");
    records.add(variant, "peak-x3", serde_json::json!({ "caller_mb": caller, "workers_mb": workers, "total_mb": caller + workers }));
    pool.close().await;
}

/// Streams `Get-Mailbox -ResultSize Unlimited`, reading every property of every object; returns the
/// objects and non-null properties read.
async fn stream_all(runspace: &mut Runspace) -> (usize, usize) {
    let (mut objects, mut properties) = (0usize, 0usize);
    let all = Command::new("Get-Mailbox").param("ResultSize", "Unlimited");
    let mut stream = runspace.invoke_stream(&all).expect("the stream starts");
    while let Some(item) = stream.next_item().await.expect("Get-Mailbox streams") {
        match item {
            StreamItem::Output(mailbox) => {
                objects += 1;
                properties += read_properties(&mailbox.value);
            }
            StreamItem::Error(error) => panic!("Get-Mailbox: {}", error.message),
            _ => {}
        }
    }
    (objects, properties)
}

async fn large(records: &mut Records) {
    let mut runspace = workers().open().await.expect("the runspace opens");
    // The first full listing is the warm-up (JIT, PowerShell compiling the module's loop), reported apart.
    let warm_up = Instant::now();
    stream_all(&mut runspace).await;
    records.add("Runspace", "warm-up-large", serde_json::json!({ "seconds": warm_up.elapsed().as_secs_f64() }));
    let started = Instant::now();
    let (objects, properties) = stream_all(&mut runspace).await;
    let seconds = started.elapsed().as_secs_f64();
    records.add(
        "Runspace",
        "large",
        serde_json::json!({
            "objects": objects, "properties": properties, "seconds": seconds, "per_s": objects as f64 / seconds,
            "caller_peak_mb": peak_megabytes("self"), "worker_peak_mb": peak_megabytes(&runspace.pid().to_string()),
        }),
    );
    runspace.close().await.expect("the runspace closes");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [phase, config, out] = args.as_slice() else {
        panic!("usage: bench_psbridge single|parallel|parallel-1x3|parallel-2x2|large <config.json> <out.json>");
    };
    let config = Config::read(&PathBuf::from(config));
    let comparator = match phase.as_str() {
        "parallel-1x3" => "psbridge 1×3",
        "parallel-2x2" => "psbridge 2×2",
        _ => "psbridge",
    };
    let mut records = Records::new(comparator);
    match phase.as_str() {
        "single" => single(&config, &mut records).await,
        "parallel" => pool(&config, &mut records, LANES, 1).await,
        "parallel-1x3" => pool(&config, &mut records, 1, LANES).await,
        "parallel-2x2" => pool(&config, &mut records, 2, 2).await,
        "large" => large(&mut records).await,
        other => panic!("unknown phase {other}"),
    }
    records.write(&PathBuf::from(out));
}
