//! The one-shot pwsh comparator of `scripts/bench.sh`: what one-shot crates and shell scripts do. Every
//! cmdlet is a new `pwsh -NoProfile -Command` that imports the module, connects, runs the cmdlet and
//! prints its output as JSON, which this caller parses.
//!
//! ```sh
//! bench_oneshot single   <config.json> <out.json>   # start-up (a connect-only pwsh), warm-up, small sequential
//! bench_oneshot parallel <config.json> <out.json>   # three pwsh at a time: warm-ups, small x3, write x3
//! bench_oneshot large    <config.json> <out.json>   # one pwsh: Get-Mailbox -ResultSize Unlimited
//! ```
//! The module and tenant come from the environment (PSModulePath, EXO_SIM_TENANT), set by bench.sh.

use psbridge_bench as common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Config, Records, Run, millis_since, peak_megabytes, read_properties};
use serde_json::{Value, json};

const VARIANT: &str = "pwsh -Command per call";
const LANES: usize = 3;
const CONNECT: &str = "Import-Module ExchangeOnlineManagement; \
    Connect-ExchangeOnline -ManagedIdentity -Organization contoso.onmicrosoft.com -ShowBanner:$false";

/// A PowerShell single-quoted literal, as one-shot callers paste values into the script text.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Runs `script` in a new pwsh after the connect; returns its output objects and its stderr.
fn one_shot(script: &str) -> (Vec<Value>, String) {
    let pwsh = psbridge::find_pwsh(None).expect("pwsh");
    let output = std::process::Command::new(pwsh)
        .args(["-NoLogo", "-NoProfile", "-NonInteractive", "-Command"])
        .arg(format!("{CONNECT}; {script}"))
        .output()
        .expect("pwsh runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "pwsh -Command {script}: {}: {stderr}", output.status);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    let objects = match stdout.trim() {
        "" => Vec::new(),
        json => serde_json::from_str(json).unwrap_or_else(|e| panic!("{script}: {e}: {json:.200}")),
    };
    (objects, stderr)
}

fn get_mailbox(identity: &str) {
    let (objects, stderr) =
        one_shot(&format!("Get-Mailbox -Identity {} | ConvertTo-Json -Depth 4 -Compress -AsArray", quote(identity)));
    assert!(stderr.is_empty() && objects.len() == 1, "Get-Mailbox {identity}: {} objects, {stderr}", objects.len());
    std::hint::black_box(read_properties(&objects[0]));
}

/// Runs `count` calls in `lanes` threads, each taking the next index.
fn lanes(lanes: usize, count: usize, call: impl Fn(usize) + Sync) -> Run {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let mut timed: Vec<(usize, f64)> = std::thread::scope(|scope| {
        let lane = || {
            let mut timed = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return timed;
                }
                let call_started = Instant::now();
                call(i);
                timed.push((i, millis_since(call_started)));
            }
        };
        let threads: Vec<_> = (0..lanes).map(|_| scope.spawn(lane)).collect();
        threads.into_iter().flat_map(|t| t.join().expect("a lane finishes")).collect()
    });
    let seconds = started.elapsed().as_secs_f64();
    timed.sort_by_key(|&(i, _)| i);
    Run { latencies: timed.into_iter().map(|(_, ms)| ms).collect(), seconds }
}

fn single(config: &Config, records: &mut Records) {
    let counts = config.counts(true);
    let ids = &config.identities;
    let started = Instant::now();
    let (_, stderr) = one_shot("$null");
    assert!(stderr.is_empty(), "connect: {stderr}");
    records.add(VARIANT, "start-up", json!({ "ms": millis_since(started) }));
    records.add(VARIANT, "warm-up", lanes(1, counts.warmup, |i| get_mailbox(&ids[i])).warm_up());
    records.add(VARIANT, "small", lanes(1, counts.small, |i| get_mailbox(&ids[counts.warmup + i])).latency());
}

fn parallel(config: &Config, records: &mut Records) {
    let counts = config.counts(true);
    let ids = &config.identities;
    records.add(VARIANT, "warm-up-x3", lanes(LANES, counts.warmup, |i| get_mailbox(&ids[i])).warm_up());
    records.add(VARIANT, "small-x3", lanes(LANES, counts.small, |i| get_mailbox(&ids[counts.warmup + i])).latency());
    let write = |i: usize| {
        let value = format!("bench {} oneshot {i}", config.run_id);
        let (_, stderr) = one_shot(&format!(
            "Set-Mailbox -Identity {} -CustomAttribute1 {}",
            quote(&ids[i % ids.len()]),
            quote(&value)
        ));
        assert!(stderr.is_empty(), "Set-Mailbox: {stderr}");
    };
    records.add(VARIANT, "warm-up-write-x3", lanes(LANES, counts.warmup, write).warm_up());
    records.add(VARIANT, "write-x3", lanes(LANES, counts.writes, |i| write(counts.warmup + i)).latency());
}

fn large(records: &mut Records) {
    // The child reports its own peak memory on stderr after the JSON: it is gone when this caller
    // could look.
    let started = Instant::now();
    let (objects, stderr) = one_shot(
        "Get-Mailbox -ResultSize Unlimited | ConvertTo-Json -Depth 4 -Compress -AsArray; \
         [Console]::Error.WriteLine([Diagnostics.Process]::GetCurrentProcess().PeakWorkingSet64)",
    );
    let properties: usize = objects.iter().map(read_properties).sum();
    let seconds = started.elapsed().as_secs_f64();
    let worker_peak: f64 = stderr.trim().parse().unwrap_or_else(|_| panic!("peak memory on stderr, not {stderr:.500}"));
    records.add(
        VARIANT,
        "large",
        json!({
            "objects": objects.len(), "properties": properties, "seconds": seconds, "per_s": objects.len() as f64 / seconds,
            "caller_peak_mb": peak_megabytes("self"), "worker_peak_mb": worker_peak / 1048576.0,
        }),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [phase, config, out] = args.as_slice() else {
        panic!("usage: bench_oneshot single|parallel|large <config.json> <out.json>");
    };
    let config = Config::read(&PathBuf::from(config));
    let mut records = Records::new("one-shot pwsh");
    match phase.as_str() {
        "single" => single(&config, &mut records),
        "parallel" => parallel(&config, &mut records),
        "large" => large(&mut records),
        other => panic!("unknown phase {other}"),
    }
    records.write(&PathBuf::from(out));
}
