//! Draws `target/bench/summary.svg` from `target/bench/summary.json` (written by `bench_report`): small-
//! command latency, throughput, large-output rate and start-up per comparator (psbridge's three-lane
//! variants 1 x 3 and 2 x 2 among them), and the throttled batch, as grouped bars.
//!
//! ```sh
//! bench_chart target/bench
//! ```

use std::path::PathBuf;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

const COMPARATORS: &[&str] = &["in-process C#", "psbridge", "psbridge 1×3", "psbridge 2×2", "node-powershell", "one-shot pwsh"];
const COLORS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44)];

type Panel<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Failure = Box<dyn std::error::Error>;

/// One panel: for each comparator a group of bars, one per (workload, figure) series.
struct Bars<'s> {
    /// The groups along the x axis.
    groups: &'s [&'s str],
    title: &'s str,
    unit: &'s str,
    log: bool,
    series: &'s [(&'s str, &'s str, &'s str)],
}

fn figure(records: &[Value], comparator: &str, workload: &str, name: &str) -> Option<f64> {
    let record = records.iter().find(|r| r["comparator"] == comparator && r["workload"] == workload)?;
    record["figures"][name].as_f64()
}

fn label(value: f64) -> String {
    if value >= 100.0 { format!("{value:.0}") } else { format!("{value:.1}") }
}

fn draw(panel: &Panel, records: &[Value], bars: &Bars) -> Result<(), Failure> {
    let groups = bars.groups;
    let values: Vec<Vec<Option<f64>>> = groups
        .iter()
        .map(|c| bars.series.iter().map(|(_, workload, name)| figure(records, c, workload, name)).collect())
        .collect();
    let max = values.iter().flatten().flatten().fold(1.0f64, |m, &v| m.max(v));
    let mut builder = ChartBuilder::on(panel);
    builder.caption(bars.title, ("sans-serif", 18)).margin(12).x_label_area_size(28).y_label_area_size(64);
    let x_range = -0.5f64..groups.len() as f64 - 0.5;
    let name = |x: &f64| {
        groups
            .get(x.round() as usize)
            .filter(|_| (x - x.round()).abs() < 1e-6)
            .map_or(String::new(), |c| c.to_string())
    };
    let width = 0.8 / bars.series.len() as f64;
    let bar = |group: usize, index: usize| -0.4 + group as f64 + index as f64 * width;
    // Log and linear axes are different types, so the drawing is written once as a macro.
    let y_label = |y: &f64| if *y >= 1.0 { format!("{y:.0}") } else { format!("{y}") };
    macro_rules! plot {
        ($chart:expr, $bottom:expr, $above:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_labels(groups.len())
                .x_label_formatter(&name)
                .y_label_formatter(&y_label)
                .y_desc(bars.unit)
                .draw()?;
            for (index, (legend, _, _)) in bars.series.iter().enumerate() {
                let color = COLORS[index % COLORS.len()];
                let points: Vec<(f64, f64)> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(group, v)| v[index].map(|value| (bar(group, index), value)))
                    .collect();
                chart
                    .draw_series(
                        points.iter().map(|&(x, value)| {
                            Rectangle::new([(x, $bottom), (x + width * 0.9, value)], color.filled())
                        }),
                    )?
                    .label(*legend)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
                chart.draw_series(points.iter().map(|&(x, value)| {
                    Text::new(label(value), (x, $above(value)), ("sans-serif", 11).into_font().color(&BLACK))
                }))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.85))
                .draw()?;
        }};
    }
    if bars.log {
        // Headroom above the tallest bar keeps the legend clear of it. Value labels sit just above
        // their bar: text is anchored at its top left corner.
        plot!(builder.build_cartesian_2d(x_range, (0.1f64..max * 40.0).log_scale())?, 0.1, |v: f64| v * 1.6);
    } else {
        plot!(builder.build_cartesian_2d(x_range, 0f64..max * 1.25)?, 0.0, |v: f64| v + max * 0.06);
    }
    Ok(())
}

fn main() -> Result<(), Failure> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: bench_chart <target/bench>")?);
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json"))?)?;
    let records = summary["records"].as_array().ok_or("summary.json has no records")?;
    let path = dir.join("summary.svg");
    let root = SVGBackend::new(&path, (2100, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let kind = if summary["quick"] == true { "quick run" } else { "full run" };
    let title =
        format!("psbridge against the alternatives ({kind}, {})", summary["machine"]["date"].as_str().unwrap_or("?"));
    let root = root.titled(&title, ("sans-serif", 24))?;
    let panels = root.split_evenly((2, 3));
    let charts = [
        Bars {
            groups: COMPARATORS,
            title: "Small command latency, sequential (ms, log scale; lower is better)",
            unit: "ms",
            log: true,
            series: &[("p50", "small", "p50_ms"), ("p90", "small", "p90_ms"), ("p99", "small", "p99_ms")],
        },
        Bars {
            groups: COMPARATORS,
            title: "Throughput (commands/s, log scale; higher is better)",
            unit: "commands/s",
            log: true,
            series: &[
                ("small, sequential", "small", "per_s"),
                ("small, 3-way", "small-x3", "per_s"),
                ("write, 3-way", "write-x3", "per_s"),
            ],
        },
        Bars {
            groups: COMPARATORS,
            title: "Large output: Get-Mailbox -ResultSize Unlimited (objects/s; higher is better)",
            unit: "objects/s",
            log: false,
            series: &[("objects/s", "large", "per_s")],
        },
        Bars {
            groups: COMPARATORS,
            title: "Start-up to connected worker(s) (ms, log scale; lower is better)",
            unit: "ms",
            log: true,
            series: &[("one worker", "start-up", "ms"), ("three workers", "start-up-x3", "ms")],
        },
        Bars {
            groups: &["psbridge"],
            title: "Throttled batch, 100 calls / 5 s: time / lower bound (lower is better)",
            unit: "× lower bound",
            log: false,
            series: &[("fixed 8", "throttled-fixed", "to_bound"), ("adaptive", "throttled-adaptive", "to_bound")],
        },
        Bars {
            groups: &["psbridge"],
            title: "Throttled batch: calls refused by the budget (%; lower is better)",
            unit: "%",
            log: false,
            series: &[("fixed 8", "throttled-fixed", "throttled_percent"), ("adaptive", "throttled-adaptive", "throttled_percent")],
        },
    ];
    for (panel, bars) in panels.iter().zip(&charts) {
        draw(panel, records, bars)?;
    }
    root.present()?;
    println!("{}", path.display());
    Ok(())
}
