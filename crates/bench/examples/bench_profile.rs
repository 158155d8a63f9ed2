//! Where psbridge's time goes, split into the worker's PowerShell work, its serializer, the pipe and
//! Rust, for the same workloads as `scripts/bench.sh` (run that first: it writes the config and the
//! tenant this reads).
//!
//! ```sh
//! cargo run --release --example bench_profile -- target/bench
//! ```
//! Prints a markdown report. Figures inside the worker are taken with a Stopwatch in the same pwsh
//! process, through the worker's own serializer class (`PsBridge.Serializer`).

use psbridge_bench as common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{Config, Run, millis_since, read_properties};
use psbridge::{Command, Runspace, RunspaceBuilder, RunspacePool, StreamItem};
use serde_json::{Value, json};

/// `/proc/<pid>/stat` user + system time, in seconds (clock ticks of 1/100 s, as on Linux x86 and arm).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat readable");
    // Fields after the command name (which may hold spaces) start at field 3; utime and stime are 14, 15.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn p50(latencies: &[f64]) -> f64 {
    Run { latencies: latencies.to_vec(), seconds: 1.0 }.latency()["p50_ms"].as_f64().expect("p50")
}

/// Runs a script in the worker and returns its numeric outputs.
async fn numbers(runspace: &mut Runspace, command: Command) -> Vec<f64> {
    let result = runspace.invoke(&command).await.expect("the probe runs");
    assert!(!result.had_errors, "{:?}", result.errors);
    result.output.iter().map(|o| o.value.as_f64().expect("a number")).collect()
}

/// Microseconds per line of serde_json parsing `lines`, `rounds` times over.
fn parse_micros(lines: &[String], rounds: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        for line in lines {
            std::hint::black_box(serde_json::from_str::<Value>(line).expect("valid JSON"));
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / (rounds * lines.len()) as f64
}

/// The protocol line the worker sends for one output object.
fn out_line(value: &Value) -> String {
    json!({ "t": "out", "id": 7, "types": ["Deserialized.Microsoft.Exchange.Data.Directory.Management.Mailbox"], "v": value })
        .to_string()
}

fn builder(tenant: &Path) -> RunspaceBuilder {
    Runspace::builder()
        .module_path(common::sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        .env("EXO_SIM_LATENCY_MS", "0")
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("ManagedIdentity", true)
                .param("Organization", "contoso.onmicrosoft.com")
                .param("ShowBanner", false),
        )
}

async fn small(runspace: &mut Runspace, config: &Config) {
    let counts = config.counts(false);
    let ids = &config.identities[..counts.warmup + counts.small];
    let (mut round_trip, mut in_worker, mut ping) = (Vec::new(), Vec::new(), Vec::new());
    let mut sample = Value::Null;
    let worker = runspace.pid().to_string();
    let mut cpu = (0.0, 0.0);
    for (i, id) in ids.iter().enumerate() {
        if i == counts.warmup {
            cpu = (cpu_seconds(&worker), cpu_seconds("self"));
        }
        let started = Instant::now();
        let result = runspace.invoke(&Command::new("Get-Mailbox").param("Identity", id.as_str())).await.expect("runs");
        if i >= counts.warmup {
            round_trip.push(millis_since(started));
            in_worker.push(result.duration.as_secs_f64() * 1e3);
        }
        sample = result.output[0].value.clone();
    }
    let per_call = |before: f64, pid: &str| (cpu_seconds(pid) - before) * 1e3 / counts.small as f64;
    let (worker_cpu, own_cpu) = (per_call(cpu.0, &worker), per_call(cpu.1, "self"));
    for _ in 0..counts.small {
        let pinged = Instant::now();
        runspace.invoke(&Command::script("$true")).await.expect("the ping runs");
        ping.push(millis_since(pinged));
    }
    std::hint::black_box(read_properties(&sample));
    // The same cmdlet, and the worker's serializer on its output, timed inside the worker.
    let inside = numbers(
        runspace,
        Command::script(
            "param([string[]] $Ids)
             $cmdlet = [Collections.Generic.List[double]]::new()
             foreach ($id in $Ids) {
                 $clock = [Diagnostics.Stopwatch]::StartNew(); $null = Get-Mailbox -Identity $id; $cmdlet.Add($clock.Elapsed.TotalMilliseconds)
             }
             $cmdlet.Sort(); $cmdlet[[int](($cmdlet.Count - 1) / 2)]
             $mailbox = Get-Mailbox -Identity $Ids[0]
             $writer = [Text.Json.Utf8JsonWriter]::new([IO.Stream]::Null)
             $clock = [Diagnostics.Stopwatch]::StartNew()
             foreach ($i in 1..2000) { [PsBridge.Serializer]::WriteObject($writer, $mailbox); $writer.Reset() }
             $clock.Elapsed.TotalMilliseconds / 2000",
        )
        .param("Ids", ids[counts.warmup..].to_vec()),
    )
    .await;
    let (round_trip, in_worker, ping) = (p50(&round_trip), p50(&in_worker), p50(&ping));
    println!(
        "## Small: `Get-Mailbox -Identity`, sequential, p50 of {} calls after {} warm-up\n",
        counts.small, counts.warmup
    );
    println!("| part | ms |\n|---|---|");
    println!("| round trip seen by Rust (`Runspace::invoke`) | {round_trip:.3} |");
    println!("| time inside the worker (PowerShell.Create, bind, run, serialize, write) | {in_worker:.3} |");
    println!("| of which the cmdlet alone (Stopwatch in the worker's session) | {:.3} |", inside[0]);
    println!("| of which serializing the mailbox (`PsBridge.Serializer`, from script) | {:.3} |", inside[1]);
    println!(
        "| outside the worker: request, pipe both ways, Rust decode, task wake-ups | {:.3} |",
        round_trip - in_worker
    );
    println!("| whole round trip of `$true` (the bridge's fixed cost per command) | {ping:.3} |");
    println!(
        "| Rust: serde_json parse of one mailbox line | {:.3} |",
        parse_micros(&[out_line(&sample)], 20_000) / 1e3
    );
    println!("| CPU per call: worker process | {worker_cpu:.3} |");
    println!("| CPU per call: Rust process | {own_cpu:.3} |\n");
}

/// The pool's 3-way throughput and what it costs in CPU: three workers share this machine's cores.
async fn pool(tenant: &Path, config: &Config) {
    let counts = config.counts(false);
    let ids = &config.identities;
    let pool =
        RunspacePool::builder(builder(tenant)).min_workers(3).max_workers(3).build().await.expect("the pool opens");
    let run = |offset: usize, count: usize| {
        let lane = |lane: usize| {
            let pool = pool.clone();
            async move {
                for i in (lane..count).step_by(3) {
                    let result =
                        pool.invoke(Command::new("Get-Mailbox").param("Identity", ids[offset + i].as_str())).await;
                    assert!(!result.expect("runs").had_errors);
                }
            }
        };
        futures_util::future::join_all((0..3).map(lane))
    };
    run(0, counts.warmup).await;
    let pids: Vec<String> = pool.worker_pids().iter().map(u32::to_string).collect();
    let cpu = |pids: &[String]| pids.iter().map(|p| cpu_seconds(p)).sum::<f64>();
    let (workers_before, own_before) = (cpu(&pids), cpu_seconds("self"));
    let started = Instant::now();
    run(counts.warmup, counts.small).await;
    let seconds = started.elapsed().as_secs_f64();
    let per_call = |cpu: f64| cpu * 1e3 / counts.small as f64;
    let (workers, own) = (per_call(cpu(&pids) - workers_before), per_call(cpu_seconds("self") - own_before));
    println!("## Small ×3: RunspacePool(3), {} calls after {} warm-up\n", counts.small, counts.warmup);
    println!("| figure | value |\n|---|---|");
    println!("| commands/s | {:.0} |", counts.small as f64 / seconds);
    println!("| CPU per call: the three workers (ms) | {workers:.3} |");
    println!("| CPU per call: Rust process (ms) | {own:.3} |");
    println!(
        "| cores busy on average | {:.2} of {} |\n",
        (workers + own) * counts.small as f64 / 1e3 / seconds,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    pool.close().await;
}

async fn large(runspace: &mut Runspace) {
    // A full listing first, as in bench_psbridge: the first one pays for JIT and script compilation.
    let all = Command::new("Get-Mailbox").param("ResultSize", "Unlimited");
    let mut warm_up = runspace.invoke_stream(&all).expect("starts");
    while warm_up.next_item().await.expect("streams").is_some() {}
    drop(warm_up);
    let worker = runspace.pid().to_string();
    let (worker_cpu, own_cpu) = (cpu_seconds(&worker), cpu_seconds("self"));
    let started = Instant::now();
    let mut lines = Vec::new();
    let mut stream = runspace.invoke_stream(&all).expect("starts");
    while let Some(item) = stream.next_item().await.expect("streams") {
        if let StreamItem::Output(mailbox) = item {
            std::hint::black_box(read_properties(&mailbox.value));
            lines.push(out_line(&mailbox.value));
        }
    }
    drop(stream);
    let seconds = started.elapsed().as_secs_f64();
    let (worker_cpu, own_cpu) = (cpu_seconds(&worker) - worker_cpu, cpu_seconds("self") - own_cpu);
    let inside = numbers(
        runspace,
        Command::script(
            "$clock = [Diagnostics.Stopwatch]::StartNew(); $all = @(Get-Mailbox -ResultSize Unlimited); $clock.Elapsed.TotalSeconds
             $writer = [Text.Json.Utf8JsonWriter]::new([IO.Stream]::Null)
             $clock = [Diagnostics.Stopwatch]::StartNew()
             foreach ($mailbox in $all) { [PsBridge.Serializer]::WriteObject($writer, $mailbox); $writer.Reset() }
             $clock.Elapsed.TotalSeconds",
        ),
    )
    .await;
    let n = lines.len() as f64;
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let parse = parse_micros(&lines, 1) * n / 1e6;
    println!(
        "## Large: `Get-Mailbox -ResultSize Unlimited`, {} objects, {:.1} MB of protocol lines\n",
        lines.len(),
        bytes as f64 / 1e6
    );
    println!("| part | s | objects/s |\n|---|---|---|");
    println!("| streamed to Rust, every property read (`invoke_stream`) | {seconds:.2} | {:.0} |", n / seconds);
    println!("| cmdlet alone in the worker (collected into an array) | {:.2} | {:.0} |", inside[0], n / inside[0]);
    println!("| worker's serializer alone on those objects | {:.2} | {:.0} |", inside[1], n / inside[1]);
    println!("| Rust: serde_json parse of every line | {parse:.2} | {:.0} |", n / parse);
    println!("| CPU of the worker process during the stream | {worker_cpu:.2} | |");
    println!("| CPU of the Rust process during the stream | {own_cpu:.2} | |");
}

#[tokio::main]
async fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_profile <target/bench>"));
    let config = Config::read(&dir.join("config.json"));
    // bench.sh keeps the tenant beside the config, named after its size.
    let raw: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).expect("config")).expect("JSON");
    let tenant = dir.join(format!("tenant-{}", raw["mailboxes"]));
    let mut runspace = builder(&tenant).open().await.expect("the runspace opens");
    small(&mut runspace, &config).await;
    large(&mut runspace).await;
    drop(runspace); // closing is not profiled
    pool(&tenant, &config).await;
}
