//! `GET /metrics`: Prometheus text (version 0.0.4). Commands by status and their latency are counted
//! here as requests end; the pools' state (queue depth, workers by state, restarts, retries, throttled,
//! resident memory and credential expiry per worker) is read from their statistics at each scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use psbridge::WorkerState;

use super::pools::Served;

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// How a command ended, for `psbridge_commands_total{status}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CommandStatus {
    /// It ran and succeeded.
    Succeeded,
    /// It ran and failed (error records, a failed pipeline, `exit N`).
    Failed,
    /// psbridge could not run it to its end (no worker, a timeout, a dead worker, cancelled).
    Error,
    /// The profile's rules refused it.
    Refused,
}

impl CommandStatus {
    /// Its name, in the metrics and the audit.
    pub fn label(self) -> &'static str {
        match self {
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::Error => "error",
            CommandStatus::Refused => "refused",
        }
    }
}

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS.len()];
        }
        for (bucket, bound) in self.counts.iter_mut().zip(BUCKETS) {
            if seconds <= *bound {
                *bucket += 1;
            }
        }
        self.sum += seconds;
        self.count += 1;
    }
}

#[derive(Default)]
struct Recorded {
    commands: BTreeMap<(String, CommandStatus), u64>,
    latency: BTreeMap<String, Histogram>,
}

/// The server's own counters.
#[derive(Default)]
pub struct Metrics {
    recorded: Mutex<Recorded>,
}

impl Metrics {
    /// Counts a command of `profile` that ended as `status` after `took` (refused ones have no latency).
    pub fn command(&self, profile: &str, status: CommandStatus, took: Duration) {
        let mut recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        *recorded.commands.entry((profile.to_owned(), status)).or_default() += 1;
        if status != CommandStatus::Refused {
            recorded.latency.entry(profile.to_owned()).or_default().observe(took.as_secs_f64());
        }
    }

    /// The whole exposition: the server's counters and every pool's state.
    pub fn render(&self, served: &[std::sync::Arc<Served>], uptime: Duration) -> String {
        let mut out = String::new();
        family(&mut out, "psbridge_uptime_seconds", "gauge", "Seconds since the server started.");
        let _ = writeln!(out, "psbridge_uptime_seconds {}", uptime.as_secs_f64());
        {
            let recorded = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
            family(&mut out, "psbridge_commands_total", "counter", "Commands that ended, by profile and status.");
            for ((profile, status), count) in &recorded.commands {
                let _ = writeln!(out, "psbridge_commands_total{{profile=\"{}\",status=\"{}\"}} {count}", escape(profile), status.label());
            }
            family(&mut out, "psbridge_command_duration_seconds", "histogram", "Time from a command's arrival to its end.");
            for (profile, histogram) in &recorded.latency {
                let profile = escape(profile);
                for (bound, count) in BUCKETS.iter().zip(&histogram.counts) {
                    let _ = writeln!(out, "psbridge_command_duration_seconds_bucket{{profile=\"{profile}\",le=\"{bound}\"}} {count}");
                }
                let _ = writeln!(out, "psbridge_command_duration_seconds_bucket{{profile=\"{profile}\",le=\"+Inf\"}} {}", histogram.count);
                let _ = writeln!(out, "psbridge_command_duration_seconds_sum{{profile=\"{profile}\"}} {}", histogram.sum);
                let _ = writeln!(out, "psbridge_command_duration_seconds_count{{profile=\"{profile}\"}} {}", histogram.count);
            }
        }
        let pools: Vec<(String, Option<psbridge::PoolStats>)> = served.iter().map(|s| (escape(&s.name), s.stats())).collect();
        family(&mut out, "psbridge_pool_open", "gauge", "Whether the profile's pool is open (1) or closed until its next request (0).");
        for (profile, stats) in &pools {
            let _ = writeln!(out, "psbridge_pool_open{{profile=\"{profile}\"}} {}", u8::from(stats.is_some()));
        }
        family(&mut out, "psbridge_queue_depth", "gauge", "Commands waiting for a worker.");
        for (profile, stats) in &pools {
            let _ = writeln!(out, "psbridge_queue_depth{{profile=\"{profile}\"}} {}", stats.as_ref().map_or(0, |s| s.queued));
        }
        family(&mut out, "psbridge_concurrency_limit", "gauge", "Commands the pool lets run at once now (adaptive_concurrency lowers it on throttling).");
        for (profile, stats) in pools.iter().filter_map(|(p, s)| s.as_ref().map(|s| (p, s))) {
            let _ = writeln!(out, "psbridge_concurrency_limit{{profile=\"{profile}\"}} {}", stats.concurrency_limit);
        }
        family(&mut out, "psbridge_workers", "gauge", "Workers by state.");
        for (profile, stats) in &pools {
            for (state, label) in [(WorkerState::Starting, "starting"), (WorkerState::Idle, "idle"), (WorkerState::Busy, "busy"), (WorkerState::Recycling, "recycling")] {
                let count = stats.as_ref().map_or(0, |s| s.workers.iter().filter(|w| w.state == state).count());
                let _ = writeln!(out, "psbridge_workers{{profile=\"{profile}\",state=\"{label}\"}} {count}");
            }
        }
        type Read = fn(&psbridge::Counters) -> u64;
        let counters: [(&str, &str, Read); 4] = [
            ("psbridge_worker_restarts_total", "Workers replaced after they died, in the open pool.", |c| c.restarts),
            ("psbridge_retries_total", "Attempts repeated (throttling, a dead worker), in the open pool.", |c| c.retries),
            ("psbridge_throttled_total", "Attempts repeated because the service throttled them, in the open pool.", |c| c.throttled),
            ("psbridge_reconnects_total", "Workers replaced because their credentials expired or their health check failed, in the open pool.", |c| c.reconnects),
        ];
        for (name, help, read) in counters {
            family(&mut out, name, "counter", help);
            for (profile, stats) in &pools {
                let _ = writeln!(out, "{name}{{profile=\"{profile}\"}} {}", stats.as_ref().map_or(0, |s| read(&s.counters)));
            }
        }
        family(&mut out, "psbridge_worker_resident_bytes", "gauge", "Resident memory of each worker's pwsh process.");
        for (profile, stats) in &pools {
            for worker in stats.iter().flat_map(|s| &s.workers) {
                if let (Some(pid), Some(bytes)) = (worker.pid, worker.resident_bytes) {
                    let _ = writeln!(out, "psbridge_worker_resident_bytes{{profile=\"{profile}\",worker=\"{}\",pid=\"{pid}\"}} {bytes}", worker.id);
                }
            }
        }
        family(&mut out, "psbridge_worker_token_expiry_timestamp_seconds", "gauge", "When each worker's credentials expire (Unix time), where known.");
        for (profile, stats) in &pools {
            for worker in stats.iter().flat_map(|s| &s.workers) {
                if let Some(at) = worker.credentials_expire_at.and_then(|at| at.duration_since(SystemTime::UNIX_EPOCH).ok()) {
                    let _ = writeln!(out, "psbridge_worker_token_expiry_timestamp_seconds{{profile=\"{profile}\",worker=\"{}\"}} {}", worker.id, at.as_secs());
                }
            }
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value escaped as the text format wants it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
