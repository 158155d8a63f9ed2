//! RunspacePool against the real pwsh and the simulated module, with its EXO_SIM_* fault injection.
//! What only the pool decides (replacing dead and hung workers, retries, the queue) runs against the
//! fake worker instead, in milliseconds.

mod common;
mod fake_worker;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::future::join_all;
use psbridge::{
    Command, Connection, Connector, ConnectorError, Error, RecyclePolicy, RetryPolicy, RunspaceBuilder, RunspacePool, exo,
};
use serde_json::{Value, json};

fn get(identity: &str) -> Command {
    Command::new("Get-Mailbox").param("Identity", identity)
}

fn user(i: usize) -> String {
    format!("ContosoUser{}", i % 200 + 1)
}

/// A pool of `n` workers on a fresh tenant; `extra` adds EXO_SIM_* settings.
async fn pool(tenant: &Path, n: usize, extra: impl FnOnce(RunspaceBuilder) -> RunspaceBuilder) -> RunspacePool {
    pool_of(extra(common::sim_builder(tenant)), n).await
}

/// A pool of `n` fake workers; `extra` adds settings.
async fn fake_pool(n: usize, extra: impl FnOnce(RunspaceBuilder) -> RunspaceBuilder) -> RunspacePool {
    pool_of(extra(fake_worker::builder()), n).await
}

/// The fake worker's script for a command that takes `ms` and answers like `get(identity)`.
fn fake_get(identity: &str, ms: u64) -> Command {
    Command::script(format!("sleep {ms}\necho {}", json!({"Alias": identity}))).idempotent(true)
}

async fn pool_of(workers: RunspaceBuilder, n: usize) -> RunspacePool {
    RunspacePool::builder(workers)
        .classifier(exo::ExchangeOnline)
        .min_workers(n)
        .max_workers(n)
        .retry(RetryPolicy::default().base_delay(Duration::from_millis(10)).max_delay(Duration::from_millis(50)))
        .restart_backoff(Duration::from_millis(100), Duration::from_secs(1))
        .build()
        .await
        .expect("the pool opens")
}

#[tokio::test]
async fn three_workers_run_a_thousand_mixed_commands_correctly() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 3, |b| b).await;
    let pids = pool.worker_pids();
    assert_eq!(pids.len(), 3);
    let commands = (0..1000).map(|i| {
        let pool = pool.clone();
        async move {
            let who = user(i);
            let outcome = match i % 4 {
                0 | 1 => pool.invoke(get(&who)).await.map(|r| (r.had_errors, r.output.first().map(|o| o.value["Alias"].clone()))),
                2 => pool.invoke(Command::new("Get-User").param("Identity", who.as_str())).await.map(|r| (r.had_errors, r.output.first().map(|o| o.value["Name"].clone()))),
                _ => pool
                    .invoke(Command::new("Set-Mailbox").param("Identity", who.as_str()).param("CustomAttribute2", format!("run-{i}")).key(who.as_str()))
                    .await
                    .map(|r| (r.had_errors, Some(json!(who)))),
            };
            (i, who, outcome)
        }
    });
    for (i, who, outcome) in join_all(commands).await {
        let (had_errors, value) = outcome.unwrap_or_else(|e| panic!("command {i} failed: {e}"));
        assert!(!had_errors, "command {i}");
        assert_eq!(value, Some(json!(who)), "command {i} answered for the right identity");
    }
    let stats = pool.stats();
    assert_eq!(stats.counters.commands, 1000);
    assert_eq!(stats.counters.failures, 0);
    assert!(stats.workers.iter().all(|w| w.counters.commands > 100), "the work was spread: {:?}", stats.workers.iter().map(|w| w.counters.commands).collect::<Vec<_>>());
    assert!(stats.latency.count == 1000 && stats.latency.p50 > Duration::ZERO);
    pool.close().await;
    for pid in pids {
        assert!(!common::alive(pid), "worker {pid} is gone after close");
    }
}

#[tokio::test]
async fn a_worker_killed_mid_command_is_replaced_and_nothing_fails() {
    let pool = fake_pool(3, |b| b).await;
    let victim = pool.worker_pids()[0];
    let killer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    });
    let results = join_all((0..150).map(|i| pool.invoke(fake_get(&user(i), 40)))).await;
    killer.await.unwrap();
    for (i, result) in results.into_iter().enumerate() {
        let result = result.unwrap_or_else(|e| panic!("command {i}: {e}"));
        assert_eq!(result.output[0].value["Alias"], json!(user(i)));
    }
    let stats = pool.stats();
    assert!(stats.counters.restarts >= 1, "{stats:?}");
    assert!(!pool.worker_pids().contains(&victim));
    assert_eq!(pool.worker_pids().len(), 3, "the dead worker was replaced");
    pool.close().await;
}

#[tokio::test]
async fn a_non_idempotent_command_on_a_dead_worker_fails_clearly_and_is_not_repeated() {
    let pool = fake_pool(1, |b| b).await;
    let crash = Command::script("crash 9");
    let error = pool.invoke(crash).await.unwrap_err();
    assert!(matches!(error, Error::WorkerExited(_)), "{error:?}");
    assert!(error.to_string().contains("exit status: 9"), "{error}");
    assert_eq!(pool.stats().counters.retries, 0, "a script is not idempotent unless marked");
    // the pool goes on with a fresh worker
    assert_eq!(pool.invoke(fake_get("ContosoUser1", 0)).await.unwrap().output.len(), 1);
    pool.close().await;
}

#[tokio::test]
async fn an_idempotent_command_whose_worker_died_is_run_again_on_a_fresh_one() {
    let pool = fake_pool(1, |b| b).await;
    let first = pool.worker_pids();
    let marker = tempfile::tempdir().unwrap();
    let once = format!("crash-once {}\necho \"survived\"", marker.path().join("crashed").display());
    let r = pool.invoke(Command::script(once).idempotent(true)).await.unwrap();
    assert_eq!(r.output[0].value, "survived");
    assert_eq!(r.attempts, 2, "{r:?}");
    let counters = pool.stats().counters;
    assert_eq!((counters.retries, counters.failures), (1, 0), "{counters:?}");
    assert_ne!(pool.worker_pids(), first, "on a new process");
    pool.close().await;
}

#[tokio::test]
async fn throttled_commands_are_retried_until_the_service_lets_them_through() {
    let pool = fake_pool(1, |b| b).await;
    // The fake worker fails the first two with Exchange Online's HTTP 429, as the service does.
    let r = pool.invoke(Command::script("throttle 2\necho \"through\"")).await.unwrap();
    assert!(r.succeeded(), "{r:?}");
    assert_eq!(r.output[0].value, "through");
    assert_eq!(r.attempts, 3);
    assert_eq!(pool.stats().counters.retries, 2);
    pool.close().await;
}

#[tokio::test]
async fn same_key_commands_never_overlap_and_keep_their_order() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 3, |b| b.env("EXO_SIM_LATENCY_MS", "20")).await;
    // Each step reads the attribute and writes it back with its number appended: a lost update or a
    // step out of order shows in the final value.
    let append = "param($Identity, $Step)
        $now = (Get-Mailbox -Identity $Identity).CustomAttribute3
        Set-Mailbox -Identity $Identity -CustomAttribute3 \"$now,$Step\"";
    let steps = 24;
    let mut calls = Vec::new();
    for step in 1..=steps {
        for identity in ["ContosoUser10", "ContosoUser11"] {
            let command = Command::script(append).param("Identity", identity).param("Step", step).key(identity);
            calls.push(pool.invoke(command));
        }
    }
    for result in join_all(calls).await {
        let result = result.unwrap();
        assert!(!result.had_errors, "{:?}", result.errors);
    }
    let expected: String = (1..=steps).map(|s| format!(",{s}")).collect();
    for identity in ["ContosoUser10", "ContosoUser11"] {
        let r = pool.invoke(get(identity)).await.unwrap();
        assert_eq!(r.output[0].value["CustomAttribute3"], json!(expected), "{identity}: every step, in order");
    }
    // The module's own timestamps: writes to one identity never overlap; the two keys ran side by side.
    let audit = std::fs::read_to_string(tenant.path().join("audit.jsonl")).unwrap();
    let mut spans: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for line in audit.lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        let identity = entry["identity"].as_str().unwrap().to_owned();
        spans.entry(identity).or_default().push((entry["start"].as_str().unwrap().into(), entry["end"].as_str().unwrap().into()));
    }
    for (identity, mut list) in spans.clone() {
        list.sort();
        assert_eq!(list.len(), steps, "{identity}");
        for pair in list.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{identity}: writes overlap: {pair:?}");
        }
    }
    let a = &spans["ContosoUser10"];
    let b = &spans["ContosoUser11"];
    let overlapping = a.iter().any(|(s1, e1)| b.iter().any(|(s2, e2)| s1 < e2 && s2 < e1));
    assert!(overlapping, "different keys run in parallel");
    pool.close().await;
}

#[tokio::test]
async fn submitted_commands_keep_their_order_wherever_awaited_and_a_dropped_one_never_runs() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 3, |b| b.env("EXO_SIM_LATENCY_MS", "150")).await;
    let append = "param($Step)
        $now = (Get-Mailbox -Identity ContosoUser12).CustomAttribute3
        Set-Mailbox -Identity ContosoUser12 -CustomAttribute3 \"$now,$Step\"";
    let mut pending = Vec::new();
    for step in 1..=5 {
        pending.push(pool.submit(Command::script(append).param("Step", step).key("ContosoUser12")).await.unwrap());
    }
    // Step 3 is withdrawn while step 1 still holds the key; the others are awaited last-first, each in a
    // task of its own.
    drop(pending.remove(2));
    let tasks: Vec<_> = pending.into_iter().map(|p| tokio::spawn(p.result())).collect();
    for task in tasks.into_iter().rev() {
        let result = task.await.unwrap().unwrap();
        assert!(!result.had_errors, "{:?}", result.errors);
        assert_eq!(result.attempts, 1);
    }
    let r = pool.invoke(get("ContosoUser12")).await.unwrap();
    assert_eq!(r.output[0].value["CustomAttribute3"], json!(",1,2,4,5"), "submission order, step 3 never ran");
    pool.close().await;
}

#[tokio::test]
async fn a_throttling_storm_ends_with_every_idempotent_command_succeeding() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path()).env("EXO_SIM_THROTTLE_RATE", "0.3").env("EXO_SIM_RETRY_SCALE", "0.001"))
        .classifier(exo::ExchangeOnline)
        .min_workers(3)
        .max_workers(3)
        .retry(RetryPolicy::default().max_attempts(15).base_delay(Duration::from_millis(5)).max_delay(Duration::from_millis(20)))
        .build()
        .await
        .unwrap();
    let results = join_all((0..200).map(|i| pool.invoke(get(&user(i))))).await;
    for (i, result) in results.into_iter().enumerate() {
        let result = result.unwrap();
        assert!(!result.had_errors, "command {i}: {:?}", result.errors);
        assert_eq!(result.output[0].value["Alias"], json!(user(i)));
    }
    assert!(pool.stats().counters.retries > 20, "about 30% of 200 calls were throttled: {:?}", pool.stats().counters.retries);
    pool.close().await;
}

#[tokio::test]
async fn permanent_errors_are_never_retried() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 1, |b| b).await;
    let r = pool.invoke(get("nobody-at-all")).await.unwrap();
    assert!(r.had_errors);
    assert_eq!(pool.stats().counters.retries, 0);
    pool.close().await;
}

#[tokio::test]
async fn token_expiry_replaces_workers_and_nothing_fails() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 2, |b| b.env("EXO_SIM_TOKEN_LIFETIME_S", "2").env("EXO_SIM_RETRY_SCALE", "0.001")).await;
    for round in 0..7 {
        let results = join_all((0..6).map(|i| pool.invoke(get(&user(round * 6 + i))))).await;
        for result in results {
            let result = result.unwrap();
            assert!(!result.had_errors, "round {round}: {:?}", result.errors);
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    assert!(pool.stats().counters.reconnects >= 2, "{:?}", pool.stats());
    assert_eq!(pool.stats().counters.failures, 0);
    pool.close().await;
}

#[tokio::test]
async fn a_hanging_command_times_out_and_its_worker_is_replaced() {
    let pool = fake_pool(2, |b| b.stop_grace(Duration::from_secs(1))).await;
    let before = pool.worker_pids();
    let hang = Command::script("hang").idempotent(true).timeout(Duration::from_secs(2));
    let error = pool.invoke(hang).await.unwrap_err();

    assert!(matches!(error, Error::Timeout { worker_killed: true, .. }), "{error:?}");
    for i in 10..20 {
        assert!(!pool.invoke(fake_get(&user(i), 0)).await.unwrap().had_errors);
    }
    // The replacement starts in the background while the other worker serves.
    let mut after = pool.worker_pids();
    for _ in 0..600 {
        if after.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = pool.worker_pids();
    }
    assert_eq!(after.len(), 2, "the hung worker was replaced");
    assert!(after.iter().any(|pid| !before.contains(pid)), "by a new process: {before:?} -> {after:?}");
    assert!(pool.stats().counters.restarts >= 1);
    pool.close().await;
}

#[tokio::test]
async fn workers_are_recycled_by_command_count_and_by_memory() {
    let tenant = tempfile::tempdir().unwrap();
    let by_count = RunspacePool::builder(common::sim_builder(tenant.path()))
        .min_workers(1)
        .max_workers(1)
        .recycle(RecyclePolicy { max_commands: Some(10), ..Default::default() })
        .build()
        .await
        .unwrap();
    let mut pids = std::collections::HashSet::new();
    for i in 0..25 {
        assert!(!by_count.invoke(get(&user(i))).await.unwrap().had_errors);
        pids.extend(by_count.worker_pids());
    }
    assert_eq!(by_count.stats().counters.recycles, 2, "after commands 10 and 20");
    assert_eq!(pids.len(), 3, "three processes served the 25 commands");
    by_count.close().await;

    // Any real worker is above 1 MB resident, so each command is followed by a recycle.
    let by_memory = RunspacePool::builder(common::sim_builder(tenant.path()))
        .min_workers(1)
        .max_workers(1)
        .recycle(RecyclePolicy { max_resident_bytes: Some(1024 * 1024), ..Default::default() })
        .build()
        .await
        .unwrap();
    for i in 0..2 {
        assert!(!by_memory.invoke(get(&user(i))).await.unwrap().had_errors);
    }
    assert_eq!(by_memory.stats().counters.recycles, 2);
    by_memory.close().await;
}

#[tokio::test]
async fn the_pool_grows_under_load_and_shrinks_when_idle() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path()).env("EXO_SIM_LATENCY_MS", "300"))
        .min_workers(1)
        .max_workers(3)
        .idle_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    assert_eq!(pool.worker_pids().len(), 1);
    let results = join_all((0..30).map(|i| pool.invoke(get(&user(i))))).await;
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|r| !r.had_errors)));
    let grown = pool.stats().workers.len();
    assert!(grown >= 2, "the pool grew: {grown} slots");
    // A worker grown late (pwsh starts slowly on a loaded machine) retires idle_timeout after it opened,
    // or stays as the last one while the others retire: look until it has settled.
    let mut pids = pool.worker_pids();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        pids = pool.worker_pids();
        if pids.len() == 1 {
            break;
        }
    }
    assert_eq!(pids.len(), 1, "back to min_workers when idle: {:?}", pool.stats().processes);
    pool.close().await;
}

#[tokio::test]
async fn a_full_queue_and_a_long_wait_are_clear_errors() {
    let pool = RunspacePool::builder(fake_worker::builder())
        .min_workers(1)
        .max_workers(1)
        .queue_capacity(1)
        .wait_timeout(Duration::from_millis(500))
        .build()
        .await
        .unwrap();
    let busy = pool.clone();
    let running = tokio::spawn(async move { busy.invoke(Command::script("sleep 3000\necho \"done\"")).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting = pool.clone();
    let queued = tokio::spawn(async move { waiting.invoke(Command::script("echo \"queued\"")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let full = pool.try_invoke(Command::script("echo \"no room\"")).await.unwrap_err();
    assert!(matches!(full, Error::QueueFull { capacity: 1 }), "{full:?}");
    assert!(matches!(queued.await.unwrap(), Err(Error::WaitTimeout(_))));
    assert_eq!(running.await.unwrap().unwrap().output[0].value, "done");
    pool.close().await;
}

#[tokio::test]
async fn a_pool_that_cannot_open_says_which_workers_failed_and_why() {
    let error = RunspacePool::builder(common::builder().module("Psbridge.Missing.Module")).min_workers(2).build().await.unwrap_err();
    let Error::PoolOpen { wanted, failures } = &error else { panic!("{error:?}") };
    assert_eq!(*wanted, 2);
    assert_eq!(failures.len(), 2);
    assert!(failures.iter().all(|f| matches!(f, Error::ModuleImport { .. })));
    assert!(error.to_string().contains("Psbridge.Missing.Module"), "{error}");
}

#[tokio::test]
async fn the_stream_form_delivers_items_as_they_come() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 2, |b| b).await;
    let mut stream = pool.invoke_stream(Command::new("Get-Mailbox").param("ResultSize", "Unlimited")).await.unwrap();
    let mut count = 0;
    while let Some(item) = stream.next_item().await.unwrap() {
        if let psbridge::StreamItem::Output(mailbox) = item {
            assert!(mailbox.value["Alias"].as_str().unwrap().starts_with("ContosoUser"));
            count += 1;
        }
    }
    assert!(count >= 200);
    assert!(!stream.completion().unwrap().had_errors);
    pool.close().await;
}

#[tokio::test]
async fn memory_stays_flat_over_ten_thousand_commands() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = pool(tenant.path(), 3, |b| b).await;
    let run = |from: usize, to: usize| {
        let pool = pool.clone();
        async move {
            let mut tasks = Vec::new();
            for lane in 0..6 {
                let pool = pool.clone();
                tasks.push(tokio::spawn(async move {
                    for i in (from + lane..to).step_by(6) {
                        let r = pool.invoke(get(&user(i))).await.unwrap();
                        assert!(!r.had_errors);
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
        }
    };
    let rss = |pool: &RunspacePool| -> (u64, u64) {
        let workers = pool.worker_pids().iter().map(|pid| common::status_kb(*pid, "VmRSS")).sum();
        (workers, common::status_kb(std::process::id(), "VmRSS"))
    };
    run(0, 2000).await; // warm-up: JIT, caches, the histogram
    let (workers_before, own_before) = rss(&pool);
    run(2000, 10_000).await;
    let (workers_after, own_after) = rss(&pool);
    assert_eq!(pool.stats().counters.commands, 10_000);
    let workers_growth = workers_after.saturating_sub(workers_before) / 1024;
    let own_growth = own_after.saturating_sub(own_before) / 1024;
    assert!(workers_growth < 90, "3 workers grew {workers_growth} MB over 8,000 commands");
    assert!(own_growth < 20, "the caller grew {own_growth} MB over 8,000 commands");
    pool.close().await;
}

#[test]
fn a_panic_in_the_caller_leaves_no_worker_behind() {
    let (tx, rx) = std::sync::mpsc::channel();
    let tenant = tempfile::tempdir().unwrap();
    let path = tenant.path().to_path_buf();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let pool = pool(&path, 2, |b| b).await;
            tx.send(pool.worker_pids()).unwrap();
            panic!("the caller panics with the pool open");
        });
    })
    .join();
    assert!(outcome.is_err());
    let pids = rx.recv().unwrap();
    assert_eq!(pids.len(), 2);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for pid in pids {
        assert!(runtime.block_on(common::gone_within(pid, Duration::from_secs(15))), "worker {pid} outlived the panic");
    }
}

/// The example binary of Sample 2, built by `cargo test` next to the test binaries.
fn example_binary() -> std::path::PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    deps.parent().unwrap().join("examples").join("pool")
}

async fn signal_leaves_no_worker_behind(signal: nix::sys::signal::Signal) {
    let tenant = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(example_binary())
        .args(["--simulated", "--hold"])
        .env("EXO_SIM_TENANT", tenant.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("the pool example was built by cargo test");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let pids: Vec<u32> = loop {
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap().expect("the example prints its pids");
        if let Some(pids) = line.strip_prefix("pids ") {
            break pids.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
    };
    assert_eq!(pids.len(), 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), signal).unwrap();
    tokio::time::timeout(Duration::from_secs(60), child.wait()).await.unwrap().unwrap();
    for pid in pids {
        assert!(common::gone_within(pid, Duration::from_secs(15)).await, "worker {pid} outlived {signal:?}");
    }
}

#[tokio::test]
async fn sigint_leaves_no_worker_behind() {
    signal_leaves_no_worker_behind(nix::sys::signal::Signal::SIGINT).await;
}

#[tokio::test]
async fn sigterm_leaves_no_worker_behind() {
    signal_leaves_no_worker_behind(nix::sys::signal::Signal::SIGTERM).await;
}

#[tokio::test]
async fn an_idle_worker_whose_session_broke_is_reconnected_by_the_health_check() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path()).env("EXO_SIM_TOKEN_LIFETIME_S", "1").env("EXO_SIM_RETRY_SCALE", "0.001"))
        .min_workers(1)
        .max_workers(1)
        .classifier(exo::ExchangeOnline)
        .health_check_after(Duration::ZERO)
        .health_check(exo::health_check())
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A script that does not touch Exchange cannot notice the expiry itself: only the check can.
    let r = pool.invoke(Command::script("'no exchange here'")).await.unwrap();
    assert_eq!(r.output[0].value, "no exchange here");
    assert!(pool.stats().counters.reconnects >= 1, "{:?}", pool.stats());
    let r = pool.invoke(Command::new("Get-ConnectionInformation")).await.unwrap();
    assert_eq!(r.output[0].value["TokenStatus"], "Active", "{r:?}");
    pool.close().await;
}

#[tokio::test]
async fn the_rate_limit_spaces_command_starts() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path())).min_workers(2).max_workers(2).rate_limit(5.0).build().await.unwrap();
    let started = std::time::Instant::now();
    let results = join_all((0..11).map(|i| pool.invoke(get(&user(i))))).await;
    assert!(results.iter().all(|r| r.is_ok()));
    // 11 starts at 5 per second: the last may start no sooner than 2 s after the first.
    assert!(started.elapsed() >= Duration::from_millis(1900), "{:?}", started.elapsed());
    pool.close().await;
}

/// Connects with the managed identity, counting its calls; fails from call `fail_from` on.
#[derive(Debug)]
struct CountingConnector {
    tenant: std::path::PathBuf,
    calls: Arc<AtomicUsize>,
    fail_from: usize,
    lifetime: Option<Duration>,
}

impl Connector for CountingConnector {
    fn connection(&self) -> BoxFuture<'_, Result<Connection, ConnectorError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call >= self.fail_from {
                return Err("the token source said no (test)".into());
            }
            let command = common::managed_identity_connect().param("EXOModuleBasePath", self.tenant.display().to_string());
            Ok(Connection { command, expires_at: self.lifetime.map(|d| SystemTime::now() + d) })
        })
    }
}

fn counting(tenant: &Path, fail_from: usize, lifetime: Option<Duration>) -> (RunspaceBuilder, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let connector = CountingConnector { tenant: tenant.to_owned(), calls: calls.clone(), fail_from, lifetime };
    let builder = common::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        .connect_with(connector)
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false));
    (builder, calls)
}

#[tokio::test]
async fn an_expired_token_means_a_fresh_process_with_credentials_read_again() {
    let tenant = tempfile::tempdir().unwrap();
    let (builder, calls) = counting(tenant.path(), usize::MAX, None);
    let pool = RunspacePool::builder(builder.env("EXO_SIM_TOKEN_LIFETIME_S", "1").env("EXO_SIM_RETRY_SCALE", "0.001"))
        .classifier(exo::ExchangeOnline)
        .min_workers(1)
        .max_workers(1)
        .build()
        .await
        .unwrap();
    let first = pool.worker_pids();
    let r = pool.invoke(Command::new("Get-ConnectionInformation")).await.unwrap();
    assert_eq!(r.output.len(), 1, "one connection in the worker");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = pool.invoke(get("ContosoUser1")).await.unwrap();
    assert!(r.succeeded(), "retried on a fresh worker: {:?}", r.errors);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the connector was asked again for the new worker");
    let second = pool.worker_pids();
    assert_ne!(first, second, "a new process, not a second connect in the old one");
    let r = pool.invoke(Command::new("Get-ConnectionInformation")).await.unwrap();
    assert_eq!(r.output.len(), 1, "still one connection: {r:?}");
    for pid in first {
        assert!(common::gone_within(pid, Duration::from_secs(15)).await, "the old worker {pid} was retired");
    }
    pool.close().await;
}

#[tokio::test]
async fn a_worker_is_replaced_before_its_credentials_expire() {
    let tenant = tempfile::tempdir().unwrap();
    // Credentials that expire 2 s after each connect, with a 1.5 s margin: replaced after about 0.5 s.
    let (builder, calls) = counting(tenant.path(), usize::MAX, Some(Duration::from_secs(2)));
    let pool = RunspacePool::builder(builder)
        .refresh_margin(Duration::from_millis(1500))
        .min_workers(1)
        .max_workers(1)
        .build()
        .await
        .unwrap();
    let first = pool.worker_pids();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = pool.invoke(get("ContosoUser2")).await.unwrap();
    assert!(r.succeeded(), "{:?}", r.errors);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_ne!(first, pool.worker_pids());
    assert_eq!(pool.stats().counters.failures, 0);
    pool.close().await;
}

#[tokio::test]
async fn credentials_that_stop_working_fail_every_queued_command_within_seconds() {
    let tenant = tempfile::tempdir().unwrap();
    // The first connect works; every later one fails, as when a token source starts refusing.
    let (builder, calls) = counting(tenant.path(), 2, None);
    let pool = RunspacePool::builder(builder.env("EXO_SIM_TOKEN_LIFETIME_S", "1").env("EXO_SIM_RETRY_SCALE", "0.001"))
        .classifier(exo::ExchangeOnline)
        .restart_backoff(Duration::from_millis(50), Duration::from_millis(200))
        .connect_attempts(3)
        .min_workers(1)
        .max_workers(1)
        .build()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let results = join_all((0..5).map(|i| pool.invoke(get(&user(i))))).await;
    assert!(started.elapsed() < Duration::from_secs(120), "bounded: {:?}", started.elapsed());
    for result in results {
        let error = result.unwrap_err();
        assert!(matches!(error, Error::WorkersUnavailable { attempts: 3, .. }), "{error}");
        assert!(error.to_string().contains("the token source said no"), "the cause is named: {error}");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4, "one good connect, then exactly three attempts");
    let later = pool.invoke(get("ContosoUser1")).await.unwrap_err();
    assert!(matches!(later, Error::WorkersUnavailable { .. }), "later commands fail at once: {later}");
    pool.close().await;
}

#[tokio::test]
async fn a_connector_that_fails_at_once_fails_the_open_with_its_reason() {
    let tenant = tempfile::tempdir().unwrap();
    let (builder, _) = counting(tenant.path(), 1, None);
    let error = builder.open().await.unwrap_err();
    assert!(matches!(error, Error::Credentials { .. }) && error.to_string().contains("the token source said no"), "{error}");
}

#[tokio::test]
async fn a_timeout_after_the_credentials_expired_names_them_as_the_likely_cause() {
    let tenant = tempfile::tempdir().unwrap();
    let (builder, _) = counting(tenant.path(), usize::MAX, Some(Duration::from_millis(1)));
    let mut rs = builder.open().await.unwrap();
    let slow = Command::script("Start-Sleep -Seconds 30").timeout(Duration::from_millis(500));
    let error = rs.invoke(&slow).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { credentials_expired_at: Some(_), worker_killed: false, .. }), "{error:?}");
    assert!(error.to_string().contains("credentials had expired at"), "{error}");
    rs.close().await.unwrap();
}

#[tokio::test]
async fn a_worker_that_cannot_be_renewed_gives_its_job_back_instead_of_failing_it() {
    let tenant = tempfile::tempdir().unwrap();
    // Credentials live 8 s and are renewed 4.5 s early. The first worker opens at once; the second, grown
    // under load, opens a second or two later, so the first is due for renewal while the second still
    // works. The token source works for those two connects and then refuses.
    let (builder, calls) = counting(tenant.path(), 3, Some(Duration::from_secs(8)));
    let pool = RunspacePool::builder(builder.env("EXO_SIM_LATENCY_MS", "300"))
        .refresh_margin(Duration::from_millis(4500))
        .restart_backoff(Duration::from_millis(20), Duration::from_millis(50))
        .connect_attempts(2)
        .min_workers(1)
        .max_workers(2)
        .build()
        .await
        .unwrap();
    let results = join_all((0..40).map(|i| pool.invoke(get(&user(i))))).await;
    assert!(calls.load(Ordering::SeqCst) >= 3, "a renewal was tried");
    for result in results {
        match result {
            Ok(r) => assert!(r.succeeded(), "{:?}", r.errors),
            // Never the credentials error of one slot: the job it could not begin went back to the queue,
            // and only once no worker was left did the pool fail what was still waiting.
            Err(error) => assert!(matches!(error, Error::WorkersUnavailable { .. }), "{error}"),
        }
    }
    pool.close().await;
}

/// A pool of `processes` fake workers hosting `lanes` runspaces each; `extra` adds pool settings.
async fn fake_lanes(processes: usize, lanes: usize, extra: impl FnOnce(psbridge::PoolBuilder) -> psbridge::PoolBuilder) -> RunspacePool {
    let builder = RunspacePool::builder(fake_worker::builder())
        .classifier(exo::ExchangeOnline)
        .min_workers(processes)
        .max_workers(processes)
        .runspaces_per_worker(lanes)
        .retry(RetryPolicy::default().base_delay(Duration::from_millis(10)).max_delay(Duration::from_millis(50)))
        .restart_backoff(Duration::from_millis(100), Duration::from_secs(1));
    extra(builder).build().await.expect("the pool opens")
}

/// The `(start, end)` a fake `clock ... clock` command reported, in ms since the epoch.
fn interval(result: &psbridge::InvocationResult) -> (f64, f64) {
    let clock = |i: usize| result.output[i].value.as_f64().unwrap_or_else(|| panic!("{result:?}"));
    (clock(0), clock(result.output.len() - 1))
}

#[tokio::test]
async fn runspaces_of_a_worker_share_its_process_and_keep_keyed_order_across_them() {
    let pool = fake_lanes(2, 3, |b| b).await;
    let stats = pool.stats();
    assert_eq!((stats.processes.len(), stats.workers.len(), stats.concurrency_limit), (2, 6, 6));
    assert_eq!(pool.worker_pids().len(), 2, "two processes, three runspaces each");
    for process in &stats.processes {
        let lanes: Vec<usize> = stats.workers.iter().filter(|w| w.process == process.id).map(|w| w.runspace).collect();
        assert_eq!(lanes, [0, 1, 2]);
        assert!(stats.workers.iter().filter(|w| w.process == process.id).all(|w| w.pid == process.pid));
    }
    // Five keys, twelve commands each, submitted in order: a key's commands never overlap and run in
    // submission order, whichever runspaces of whichever process take them.
    let mut pending = Vec::new();
    for i in 0..60 {
        let command = Command::script(format!("clock\nlane\nsleep {}\nclock", 5 + i % 7)).key(format!("k{}", i % 5));
        pending.push((i % 5, pool.submit(command).await.unwrap()));
    }
    let mut by_key: HashMap<usize, Vec<(f64, f64)>> = HashMap::new();
    let results = join_all(pending.into_iter().map(|(key, p)| async move { (key, p.result().await.unwrap()) })).await;
    for (key, result) in &results {
        assert!(result.succeeded(), "{result:?}");
        by_key.entry(*key).or_default().push(interval(result));
    }
    for (key, runs) in by_key {
        for pair in runs.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "key k{key}: a command began before the one submitted before it ended: {pair:?}");
        }
    }
    let stats = pool.stats();
    assert_eq!(stats.counters.commands, 60);
    let ran = |process: usize| stats.workers.iter().filter(|w| w.process == process && w.counters.commands > 0).count();
    assert!(ran(0) + ran(1) >= 5 && ran(0) > 0 && ran(1) > 0, "five keys at once ran on five runspaces of both processes: {:?}", stats.workers);
    pool.close().await;
}

#[tokio::test]
async fn a_runspace_that_will_not_stop_takes_its_process_down_and_its_siblings_commands_with_it() {
    let pool = fake_lanes(1, 3, |b| b.retry(RetryPolicy::default().max_attempts(3).base_delay(Duration::from_millis(10)))).await;
    let first = pool.worker_pids();
    let hang = Command::script("hang").timeout(Duration::from_millis(300));
    // Longer than the timeout and the stop grace (3 s) together: running when the process is killed.
    let sibling = || Command::script("clock\nsleep 6000\nclock");
    let (hung, retried, lost) = tokio::join!(pool.invoke(hang), pool.invoke(sibling().idempotent(true)), pool.invoke(sibling()));
    assert!(matches!(hung, Err(Error::Timeout { worker_killed: true, .. })), "{hung:?}");
    let retried = retried.expect("an idempotent sibling runs again on a fresh process");
    assert!(retried.succeeded() && retried.attempts == 2, "{retried:?}");
    match lost {
        Err(Error::WorkerExited(exit)) => assert!(exit.killed_by_bridge.as_deref().unwrap_or_default().contains("did not stop"), "{exit}"),
        other => panic!("a non-idempotent sibling fails with the process's exit: {other:?}"),
    }
    let stats = pool.stats();
    assert_eq!(stats.counters.restarts, 1, "one process died, once: {stats:?}");
    assert_ne!(pool.worker_pids(), first);
    pool.close().await;
}

#[tokio::test]
async fn adaptive_concurrency_cuts_on_throttling_once_per_round_and_grows_back() {
    // No retries: every throttled command comes back as it is, so the rounds below are exact. The fake
    // worker's 429 gives no Retry-After, so nothing holds new commands back between rounds.
    let adaptive = fake_lanes(1, 8, |b| b.adaptive_concurrency(true).retry(RetryPolicy::never())).await;
    assert_eq!(adaptive.stats().concurrency_limit, 8, "it starts at the maximum");
    // As many throttled commands as the limit lets run, sent at once, begin in one round: one cut.
    let throttled = || Command::script("sleep 50\nthrottle 1000000");
    let round = |n: usize| join_all((0..n).map(|_| adaptive.invoke(throttled())));
    assert!(round(8).await.into_iter().all(|r| r.is_ok_and(|r| r.had_errors)));
    assert_eq!(adaptive.stats().concurrency_limit, 6, "eight 429s of one round: one cut, to three quarters");
    round(6).await;
    assert_eq!(adaptive.stats().concurrency_limit, 4, "commands begun after the cut cut again");
    for n in [4, 3, 2, 1] {
        round(n).await;
    }
    assert_eq!(adaptive.stats().concurrency_limit, 1, "never below 1");
    let ok = || Command::script("echo 1");
    join_all((0..100).map(|_| adaptive.invoke(ok()))).await;
    assert!(adaptive.stats().concurrency_limit >= 3, "a run of successes grows it back: {}", adaptive.stats().concurrency_limit);
    adaptive.close().await;

    let fixed = fake_lanes(1, 8, |b| b.retry(RetryPolicy::never())).await;
    join_all((0..16).map(|_| fixed.invoke(throttled()))).await;
    assert_eq!(fixed.stats().concurrency_limit, 8, "without adaptive_concurrency the limit stays the capacity");
    fixed.close().await;
}

#[tokio::test]
async fn three_connected_runspaces_in_one_process_run_at_once() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path()))
        .classifier(exo::ExchangeOnline)
        .min_workers(1)
        .max_workers(1)
        .runspaces_per_worker(3)
        .build()
        .await
        .unwrap();
    assert_eq!(pool.worker_pids().len(), 1);
    // Each runspace connected on its own: the process holds three connections, and each runspace has
    // its tmpEXO_ functions, bound to its own connection.
    let probe = Command::script(
        "$s = [DateTime]::UtcNow.Ticks
         $m = Get-Mailbox -Identity ContosoUser7
         Start-Sleep -Milliseconds 1500
         [pscustomobject]@{ Start = $s; End = [DateTime]::UtcNow.Ticks; Connections = @(Get-ConnectionInformation).Count
                            Module = (Get-Command Get-Mailbox).Module.Name; Alias = $m.Alias }",
    );
    let results = join_all((0..3).map(|_| pool.invoke(probe.clone()))).await;
    let rows: Vec<Value> = results.into_iter().map(|r| r.unwrap().output[0].value.clone()).collect();
    let ticks = |row: &Value, name: &str| row[name].as_i64().unwrap();
    let latest_start = rows.iter().map(|r| ticks(r, "Start")).max().unwrap();
    let earliest_end = rows.iter().map(|r| ticks(r, "End")).min().unwrap();
    assert!(latest_start < earliest_end, "the three commands overlapped in time: {rows:?}");
    let modules: std::collections::HashSet<&str> = rows.iter().map(|r| r["Module"].as_str().unwrap()).collect();
    assert_eq!(modules.len(), 3, "three runspaces, three tmpEXO_ modules: {rows:?}");
    assert!(rows.iter().all(|r| r["Connections"] == 3 && r["Alias"] == "ContosoUser7"), "{rows:?}");
    let stats = pool.stats();
    assert!(stats.workers.iter().all(|w| w.counters.commands == 1), "one command on each runspace: {stats:?}");
    pool.close().await;
}

#[tokio::test]
async fn a_tenant_budget_throttles_with_retry_after_and_the_adaptive_limit_comes_down() {
    let tenant = tempfile::tempdir().unwrap();
    let pool = RunspacePool::builder(common::sim_builder(tenant.path()).env("EXO_SIM_BUDGET", "5/2s"))
        .classifier(exo::ExchangeOnline)
        .min_workers(1)
        .max_workers(1)
        .runspaces_per_worker(4)
        .adaptive_concurrency(true)
        .retry(RetryPolicy::default().max_attempts(10))
        .build()
        .await
        .unwrap();
    let results = join_all((0..16).map(|i| pool.invoke(get(&user(i))))).await;
    for (i, result) in results.into_iter().enumerate() {
        let result = result.unwrap();
        assert!(result.succeeded(), "command {i}: {:?}", result.errors);
    }
    let stats = pool.stats();
    assert!(stats.counters.retries > 0, "16 calls on a budget of 5 per 2 s were throttled: {stats:?}");
    assert!(stats.concurrency_limit < 4, "the limit came down from 4: {}", stats.concurrency_limit);
    let state = std::fs::read_to_string(tenant.path().join("budget.state")).unwrap();
    let totals: Vec<u64> = state.lines().next().unwrap().split(' ').map(|n| n.parse().unwrap()).collect();
    assert_eq!(totals[0], 16, "every command was admitted once in the end: {state}");
    assert!(totals[1] > 0, "and some were refused first: {state}");
    pool.close().await;
}

/// Growth counts and checks a new slot in one atomic step: bursts of submits from many threads at once,
/// each seeing every worker busy, still never start more than `max_workers` workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_submits_never_grow_the_pool_past_max_workers() {
    for round in 0..20 {
        let pool = RunspacePool::builder(fake_worker::builder())
            .min_workers(1)
            .max_workers(2)
            .wait_timeout(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        // all 64 submits are released at the same moment, so that their growth checks overlap
        let start = Arc::new(tokio::sync::Barrier::new(64));
        let submits: Vec<_> = (0..64)
            .map(|_| {
                let (pool, start) = (pool.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    pool.invoke(Command::script("sleep 5\necho 1")).await
                })
            })
            .collect();
        let mut pids = std::collections::HashSet::new();
        let mut most = 0;
        while !submits.iter().all(|s| s.is_finished()) {
            most = most.max(pool.stats().workers.len());
            pids.extend(pool.worker_pids());
            tokio::task::yield_now().await;
        }
        for submit in submits {
            assert!(submit.await.unwrap().unwrap().succeeded());
        }
        assert!(most <= 2, "round {round}: {most} worker slots at once with max_workers 2");
        assert!(pids.len() <= 2, "round {round}: {} worker processes started with max_workers 2", pids.len());
        pool.close().await;
    }
}
