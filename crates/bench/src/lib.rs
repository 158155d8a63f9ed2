//! What the Rust comparators of `scripts/bench.sh` share: the run's configuration, the record format
//! (the same as the C# and node comparators write) and the statistics; and the simulated-tenant worker
//! the benches in `benches/` open.

use std::path::{Path, PathBuf};
use std::time::Instant;

use psbridge::{Command, Runspace, RunspaceBuilder};
use serde::Deserialize;
use serde_json::{Value, json};

/// `target/bench/config.json`, written by `scripts/bench/New-BenchConfig.ps1`.
#[derive(Debug, Deserialize)]
pub struct Config {
    pub run_id: String,
    counts: Counts,
    /// One-shot pwsh takes seconds per call, so it gets its own, smaller counts.
    oneshot: Counts,
    /// Items of the throttled batch (`bench_throttled`).
    pub throttled_items: usize,
    /// Random existing mailboxes: the warm-up takes the first ones, the measured calls the next ones,
    /// the writes `identities[i % len]`.
    pub identities: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct Counts {
    pub warmup: usize,
    pub small: usize,
    pub writes: usize,
}

impl Config {
    pub fn read(path: &Path) -> Config {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The call counts of a comparator (one-shot pwsh has its own).
    pub fn counts(&self, oneshot: bool) -> &Counts {
        if oneshot { &self.oneshot } else { &self.counts }
    }
}

/// The records of one phase, written as a JSON array.
pub struct Records {
    comparator: &'static str,
    records: Vec<Value>,
}

impl Records {
    pub fn new(comparator: &'static str) -> Records {
        Records { comparator, records: Vec::new() }
    }

    pub fn add(&mut self, variant: &str, workload: &str, figures: Value) {
        self.records.push(
            json!({ "comparator": self.comparator, "variant": variant, "workload": workload, "figures": figures }),
        );
    }

    pub fn write(&self, path: &Path) {
        let text = serde_json::to_string_pretty(&self.records).expect("records serialize");
        std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// Each call's latency in ms, by call index, and the wall time of the whole run.
pub struct Run {
    pub latencies: Vec<f64>,
    pub seconds: f64,
}

impl Run {
    /// The figures of a warm-up: how many calls, the first one's latency, the total.
    pub fn warm_up(&self) -> Value {
        json!({ "calls": self.latencies.len(), "first_ms": self.latencies.first().copied().unwrap_or(0.0), "total_ms": self.seconds * 1e3 })
    }

    /// The figures of a measured run: p50/p90/p99 latency and calls per second.
    pub fn latency(&self) -> Value {
        let mut sorted = self.latencies.clone();
        sorted.sort_by(f64::total_cmp);
        let at = |p: f64| sorted[((sorted.len() - 1) as f64 * p).round() as usize];
        json!({
            "calls": sorted.len(), "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99),
            "per_s": sorted.len() as f64 / self.seconds,
        })
    }
}

pub fn millis_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Counts the non-null properties of parsed output objects, reading every one as a caller would.
pub fn read_properties(object: &Value) -> usize {
    object.as_object().map_or(0, |o| o.values().filter(|v| !v.is_null()).count())
}

/// A process's peak resident memory (VmHWM of /proc/PID/status; `self` for this process), in MB.
pub fn peak_megabytes(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status readable");
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc status");
    kb / 1024.0
}

/// The folder holding the simulated ExchangeOnlineManagement module (`scripts/sim` at the top level).
pub fn sim_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/sim")
}

/// A worker connected to the simulated tenant in `tenant`, each cmdlet delayed by `latency_ms`.
pub fn sim_workers(tenant: &Path, latency_ms: u32) -> RunspaceBuilder {
    Runspace::builder()
        .module_path(sim_modules())
        .module("ExchangeOnlineManagement")
        .env("EXO_SIM_TENANT", tenant)
        .env("EXO_SIM_LATENCY_MS", latency_ms.to_string())
        .connect(
            Command::new("Connect-ExchangeOnline")
                .param("ManagedIdentity", true)
                .param("Organization", "contoso.onmicrosoft.com")
                .param("ShowBanner", false),
        )
        .disconnect(Command::new("Disconnect-ExchangeOnline").param("Confirm", false))
}
