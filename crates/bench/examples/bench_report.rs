//! Gathers the comparators' records of `scripts/bench.sh` (`target/bench/raw/*.json`) into
//! `target/bench/summary.json` (every record with its ratio to the in-process C# figure, and the goal
//! check) and `target/bench/summary.md` (the table), and prints the table.
//!
//! ```sh
//! bench_report target/bench
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

const BASELINE: &str = "in-process C#";
/// Figures that count what was done rather than measure it: they get no ratio.
const COUNTS: [&str; 3] = ["calls", "objects", "properties"];
/// Comparators in table order.
const COMPARATORS: [&str; 4] = [BASELINE, "psbridge", "node-powershell", "one-shot pwsh"];
/// psbridge's three-lane variants: processes x runspaces per process (`psbridge` is 3 x 1).
const THREE_WAY: [(&str, &str); 3] = [("psbridge", "3 × 1"), ("psbridge 1×3", "1 × 3"), ("psbridge 2×2", "2 × 2")];

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// All records of all phases, each with `ratio_to_csharp`: every figure divided by the in-process C#
/// figure of the same workload.
fn with_ratios(mut records: Vec<Value>) -> Vec<Value> {
    let baselines: Vec<Value> = records.iter().filter(|r| r["comparator"] == BASELINE).cloned().collect();
    for record in &mut records {
        let baseline = baselines.iter().find(|b| b["workload"] == record["workload"]);
        let mut ratios = Map::new();
        if let (Some(baseline), Some(figures)) = (baseline, record["figures"].as_object()) {
            for (name, value) in figures.iter().filter(|(name, _)| !COUNTS.contains(&name.as_str())) {
                if let (Some(value), Some(base)) = (value.as_f64(), baseline["figures"][name].as_f64())
                    && base != 0.0
                {
                    ratios.insert(name.clone(), json!(value / base));
                }
            }
        }
        record["ratio_to_csharp"] = Value::Object(ratios);
    }
    records
}

struct Summary {
    records: Vec<Value>,
}

impl Summary {
    fn record(&self, comparator: &str, workload: &str) -> Option<&Value> {
        self.records.iter().find(|r| r["comparator"] == comparator && r["workload"] == workload)
    }

    fn figure(&self, comparator: &str, workload: &str, name: &str) -> Option<f64> {
        self.record(comparator, workload)?["figures"][name].as_f64()
    }

    /// A table cell: the figure, and for the other comparators its ratio to in-process C#.
    fn cell(&self, comparator: &str, workload: &str, name: &str) -> String {
        let Some(record) = self.record(comparator, workload) else { return "–".into() };
        let Some(value) = record["figures"][name].as_f64() else { return "–".into() };
        match record["ratio_to_csharp"][name].as_f64() {
            Some(ratio) if comparator != BASELINE => format!("{} ({}×)", number(value), ratio_text(ratio)),
            _ => number(value),
        }
    }

    fn variants(&self, comparator: &str) -> String {
        let mut variants: Vec<&str> = Vec::new();
        for record in self.records.iter().filter(|r| r["comparator"] == comparator) {
            let variant = record["variant"].as_str().unwrap_or("?");
            if !variants.contains(&variant) {
                variants.push(variant);
            }
        }
        variants.join(", ")
    }
}

/// Three significant digits or so, without a long tail.
fn number(value: f64) -> String {
    match value.abs() {
        v if v >= 100.0 => format!("{value:.0}"),
        v if v >= 10.0 => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

fn ratio_text(ratio: f64) -> String {
    if ratio >= 10.0 { format!("{ratio:.0}") } else { format!("{ratio:.2}") }
}

/// The three-lane variant with the most small commands per second: the best N x M on this machine.
fn best_three_way(summary: &Summary) -> (&'static str, &'static str) {
    let rate = |name| summary.figure(name, "small-x3", "per_s").unwrap_or(0.0);
    THREE_WAY.into_iter().max_by(|a, b| rate(a.0).total_cmp(&rate(b.0))).expect("THREE_WAY is not empty")
}

/// The issue's goals for psbridge, checked against the figures.
fn goals(summary: &Summary) -> Vec<Value> {
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b);
    let psb = |workload, name| summary.figure("psbridge", workload, name);
    let (best, shape) = best_three_way(summary);
    let best_figure = |workload, name| summary.figure(best, workload, name);
    let csharp = |workload, name| summary.figure(BASELINE, workload, name);
    let throttled = |mode: &str, name| summary.figure("psbridge", &format!("throttled-{mode}"), name);
    let fixed_worse = throttled("fixed", "to_bound")
        .zip(throttled("adaptive", "to_bound"))
        .zip(throttled("fixed", "throttled_share").zip(throttled("adaptive", "throttled_share")))
        .map(|((fixed_time, time), (fixed_share, share))| f64::from(u8::from(fixed_time > time && fixed_share > share)));
    let three_way = [
        (
            format!("three-way small commands/s at least in-process C#'s (best N × M: {shape})"),
            "psbridge ×3 cmd/s / C# ×3 cmd/s ≥ 1".to_owned(),
            ratio(best_figure("small-x3", "per_s"), csharp("small-x3", "per_s")),
            (1.0, f64::INFINITY),
        ),
        (
            format!("three-way writes/s at least in-process C#'s ({shape})"),
            "psbridge write ×3 cmd/s / C# write ×3 cmd/s ≥ 1".to_owned(),
            ratio(best_figure("write-x3", "per_s"), csharp("write-x3", "per_s")),
            (1.0, f64::INFINITY),
        ),
        (
            format!("three-way start-up at most 1.2× in-process C#'s ({shape})"),
            "psbridge start-up ×3 / C# start-up ×3 ≤ 1.2".to_owned(),
            ratio(best_figure("start-up-x3", "ms"), csharp("start-up-x3", "ms")),
            (f64::NEG_INFINITY, 1.2),
        ),
        (
            format!("three-way at least 3× node-powershell's three shells ({shape})"),
            "psbridge ×3 cmd/s / node-powershell ×3 cmd/s ≥ 3".to_owned(),
            ratio(best_figure("small-x3", "per_s"), summary.figure("node-powershell", "small-x3", "per_s")),
            (3.0, f64::INFINITY),
        ),
        (
            "throttled batch, adaptive: within 1.15× of the budget's lower bound".to_owned(),
            "time / (items / budget rate) ≤ 1.15".to_owned(),
            throttled("adaptive", "to_bound"),
            (f64::NEG_INFINITY, 1.15),
        ),
        (
            "throttled batch, adaptive: under 5 % of responses throttled".to_owned(),
            "refused / (admitted + refused) < 0.05".to_owned(),
            throttled("adaptive", "throttled_share"),
            (f64::NEG_INFINITY, 0.0499),
        ),
        (
            "throttled batch: fixed concurrency 8 worse than adaptive on both".to_owned(),
            "fixed time > adaptive time and fixed share > adaptive share (1 = yes)".to_owned(),
            fixed_worse,
            (1.0, 1.0),
        ),
    ];
    let checks = [
        (
            "small-command p50 within 1.5× of in-process C# single runspace",
            "psbridge p50 / C# p50 ≤ 1.5",
            ratio(psb("small", "p50_ms"), summary.figure(BASELINE, "small", "p50_ms")),
            (f64::NEG_INFINITY, 1.5),
        ),
        (
            "at least 3× the small-command throughput of node-powershell (sequential)",
            "psbridge cmd/s / node-powershell cmd/s ≥ 3",
            ratio(psb("small", "per_s"), summary.figure("node-powershell", "small", "per_s")),
            (3.0, f64::INFINITY),
        ),
        (
            "at least 3× the small-command throughput of node-powershell (3-way parallel)",
            "psbridge ×3 cmd/s / node-powershell ×3 cmd/s ≥ 3",
            ratio(psb("small-x3", "per_s"), summary.figure("node-powershell", "small-x3", "per_s")),
            (3.0, f64::INFINITY),
        ),
        (
            "large-output objects/s at least half of in-process C#",
            "psbridge objects/s / C# objects/s ≥ 0.5",
            ratio(psb("large", "per_s"), summary.figure(BASELINE, "large", "per_s")),
            (0.5, f64::INFINITY),
        ),
        (
            "at least 100× faster per small command than one-shot pwsh",
            "one-shot p50 / psbridge p50 ≥ 100",
            ratio(summary.figure("one-shot pwsh", "small", "p50_ms"), psb("small", "p50_ms")),
            (100.0, f64::INFINITY),
        ),
    ];
    checks
        .into_iter()
        .map(|(goal, test, measured, range)| (goal.to_owned(), test.to_owned(), measured, range))
        .chain(three_way)
        .map(|(goal, test, measured, (low, high))| {
            json!({ "goal": goal, "test": test, "measured": measured, "met": measured.map(|m| m >= low && m <= high) })
        })
        .collect()
}

/// The three-lane variants side by side with in-process C# and node-powershell, and the throttled batch.
fn three_way_tables(md: &mut String, summary: &Summary) {
    let _ = writeln!(md, "\nThree lanes of callers, psbridge as processes × runspaces per process (ratios to in-process C#'s RunspacePool of 3):\n");
    let _ = writeln!(md, "| comparator | start-up ×3 ms | small ×3 p50 ms | small ×3 cmd/s | write ×3 cmd/s | peak MB, all processes |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    let rows = [(BASELINE, "RunspacePool of 3, one process")]
        .into_iter()
        .chain(THREE_WAY)
        .chain([("node-powershell", "3 shells")]);
    for (comparator, shape) in rows {
        let _ = writeln!(
            md,
            "| {comparator} ({shape}) | {} | {} | {} | {} | {} |",
            summary.cell(comparator, "start-up-x3", "ms"),
            summary.cell(comparator, "small-x3", "p50_ms"),
            summary.cell(comparator, "small-x3", "per_s"),
            summary.cell(comparator, "write-x3", "per_s"),
            summary.cell(comparator, "peak-x3", "total_mb"),
        );
    }
    let _ = writeln!(
        md,
        "\nThrottled batch: `Set-Mailbox` items under the tenant budget EXO_SIM_BUDGET=100/5s (20 calls/s, shared by every \
         process; refused calls count against it too), 200 ms of service latency, psbridge's pool of 2 processes × 4 runspaces (concurrency 8), retrying \
         throttled calls after the service's Retry-After. Lower bound: items / 20 per s. Throttled: the calls the budget \
         refused, of all calls it answered.\n"
    );
    let _ = writeln!(md, "| concurrency | items | seconds | lower bound s | time / bound | throttled | lowest limit |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|");
    for mode in ["fixed", "adaptive"] {
        let workload = format!("throttled-{mode}");
        let figure = |name| summary.figure("psbridge", &workload, name);
        let shown = |name, scale: f64, suffix: &str| figure(name).map_or("–".to_owned(), |v| format!("{}{suffix}", number(v * scale)));
        let label = if mode == "fixed" { "fixed 8" } else { "adaptive (from 8)" };
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} |",
            shown("calls", 1.0, ""),
            shown("seconds", 1.0, ""),
            shown("lower_bound_s", 1.0, ""),
            shown("to_bound", 1.0, "×"),
            shown("throttled_share", 100.0, " %"),
            shown("lowest_limit", 1.0, ""),
        );
    }
}

fn markdown(config: &Value, summary: &Summary, goals: &[Value]) -> String {
    let m = &config["machine"];
    let text = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut md = String::new();
    let kind = if config["quick"] == true {
        "quick run (`scripts/bench.sh --quick`)"
    } else {
        "full run (`scripts/bench.sh`)"
    };
    let _ = writeln!(md, "# psbridge against the alternatives: {kind}\n");
    let _ = writeln!(
        md,
        "Machine: {}, {} cores, {} GB, {}; load average {} at the start. Date: {}.  \nPowerShell {} (pwsh and \
         Microsoft.PowerShell.SDK 7.6.9), .NET SDK {}, Node {} (node-powershell 5.0.1), {}.\n",
        text(&m["cpu"]),
        m["cores"],
        m["memory_gb"],
        text(&m["os"]),
        m["load_1m"],
        text(&m["date"]),
        text(&m["pwsh"]),
        text(&m["dotnet"]),
        text(&m["node"]),
        text(&m["rustc"]),
    );
    let (c, o) = (&config["counts"], &config["oneshot"]);
    let _ = writeln!(
        md,
        "Simulated ExchangeOnlineManagement (`scripts/sim`), tenant of {} mailboxes, EXO_SIM_LATENCY_MS = \
         EXO_SIM_CONNECT_DELAY_MS = 0. Small: {} × `Get-Mailbox -Identity <random existing>` after {} warm-up calls \
         (one-shot pwsh: {} after {}); write: {} × `Set-Mailbox` after {} warm-up writes (one-shot: {} after {}); large: \
         `Get-Mailbox -ResultSize Unlimited` after one full listing as warm-up (one-shot: none, every call is cold). \
         ×3: three lanes, each taking the next call. Every output object is parsed and every property read by the \
         caller.\n",
        config["mailboxes"],
        c["small"],
        c["warmup"],
        o["small"],
        o["warmup"],
        c["writes"],
        c["warmup"],
        o["writes"],
        o["warmup"],
    );
    let _ = writeln!(
        md,
        "Figures in parentheses: the figure divided by the in-process C# figure (for ms lower is better, for /s higher).\n"
    );
    let _ = writeln!(
        md,
        "| comparator | start-up ms | small p50 ms | small p90 ms | small p99 ms | small cmd/s | small ×3 p50 ms | small ×3 cmd/s | \
         write ×3 cmd/s | large objects/s | large peak MB caller / worker | start-up ×3 ms |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for comparator in COMPARATORS {
        let peak = |name| summary.figure(comparator, "large", name).map_or("in-process".to_owned(), number);
        let _ = writeln!(
            md,
            "| {comparator} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} |",
            summary.cell(comparator, "start-up", "ms"),
            summary.cell(comparator, "small", "p50_ms"),
            summary.cell(comparator, "small", "p90_ms"),
            summary.cell(comparator, "small", "p99_ms"),
            summary.cell(comparator, "small", "per_s"),
            summary.cell(comparator, "small-x3", "p50_ms"),
            summary.cell(comparator, "small-x3", "per_s"),
            summary.cell(comparator, "write-x3", "per_s"),
            summary.cell(comparator, "large", "per_s"),
            peak("caller_peak_mb"),
            peak("worker_peak_mb"),
            summary.cell(comparator, "start-up-x3", "ms"),
        );
    }
    let _ = writeln!(md, "\nVariants (sequential and large / 3-way parallel):\n");
    for comparator in COMPARATORS {
        let _ = writeln!(md, "- {comparator}: {}", summary.variants(comparator));
    }
    let _ = writeln!(md, "\nWarm-up, excluded from the figures above:\n");
    let _ = writeln!(
        md,
        "| comparator | first call ms | warm-up total ms | ×3 warm-up total ms | ×3 write warm-up total ms | large warm-up s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for comparator in COMPARATORS {
        let _ = writeln!(
            md,
            "| {comparator} | {} | {} | {} | {} | {} |",
            summary.cell(comparator, "warm-up", "first_ms"),
            summary.cell(comparator, "warm-up", "total_ms"),
            summary.cell(comparator, "warm-up-x3", "total_ms"),
            summary.cell(comparator, "warm-up-write-x3", "total_ms"),
            summary.cell(comparator, "warm-up-large", "seconds"),
        );
    }
    three_way_tables(&mut md, summary);
    let _ = writeln!(md, "\nGoals for psbridge:\n");
    let _ = writeln!(md, "| goal | test | measured | met |");
    let _ = writeln!(md, "|---|---|---|---|");
    for goal in goals {
        let measured = goal["measured"].as_f64().map_or("–".to_owned(), ratio_text);
        let met = match goal["met"].as_bool() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(md, "| {} | {} | {measured} | {met} |", text(&goal["goal"]), text(&goal["test"]));
    }
    let _ = writeln!(
        md,
        "\nNotes: the in-process C# pool connects each runspace with its own `-Prefix` (Exchange's connection is per \
         process; Sample 2 as written leaves only the last-connected runspace usable). One-shot pwsh's large figure \
         includes its own start-up. Peak memory is VmHWM of the caller and of the PowerShell process; in-process C# is \
         one process."
    );
    md
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: bench_report <target/bench>"));
    let config = read_json(&dir.join("config.json"));
    let mut raw: Vec<PathBuf> = std::fs::read_dir(dir.join("raw"))
        .expect("target/bench/raw exists")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    raw.sort();
    let records: Vec<Value> =
        raw.iter().flat_map(|path| read_json(path).as_array().cloned().unwrap_or_default()).collect();
    let summary = Summary { records: with_ratios(records) };
    let goals = goals(&summary);
    let json = json!({
        "quick": config["quick"], "mailboxes": config["mailboxes"], "counts": config["counts"],
        "oneshot_counts": config["oneshot"], "machine": config["machine"], "records": summary.records, "goals": goals,
    });
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&json).expect("serializes"))
        .expect("summary.json written");
    let md = markdown(&config, &summary, &goals);
    std::fs::write(dir.join("summary.md"), &md).expect("summary.md written");
    print!("{md}");
}
