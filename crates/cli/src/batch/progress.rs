//! Batch progress on stderr: a bar with rate and ETA on a terminal, a plain line every few seconds
//! otherwise (CI logs), nothing with `--quiet`. A server's batch sends its notes and errors down the
//! response stream instead, for its client to print.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::mpsc::UnboundedSender;

use crate::serve::wire::BatchLine;

/// Counts of a batch so far.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub succeeded: usize,
    pub failed: usize,
    /// Bad input lines (also counted in `failed`).
    pub invalid: usize,
    /// Finished in an earlier run, not run again.
    pub skipped: usize,
    /// Run more than once (throttling, a dead worker, or in flight when an earlier run died).
    pub retried: usize,
    pub cancelled: usize,
    pub not_run: usize,
    /// Items that ran in this run and finished (succeeded or failed).
    pub ran: usize,
    /// Queued batches: runs that finished after another host had already recorded the item's result
    /// (their results were dropped; the first one recorded stands).
    pub duplicates: usize,
}

impl Tally {
    pub fn done(&self) -> usize {
        self.succeeded + self.failed + self.skipped
    }
}

enum Display {
    Bar(ProgressBar),
    Lines { every: Duration, last: Instant },
    Quiet,
    /// The bar is gone (the batch ended): notes are plain lines.
    Done,
    /// A server's batch: notes and errors go to the client.
    Remote(UnboundedSender<BatchLine>),
}

/// Shows how a batch is going.
pub struct Progress {
    display: Display,
    total: usize,
    started: Instant,
    /// The pool's current concurrency limit, shown when the batch adapts it to throttling.
    limit: Option<usize>,
}

impl Progress {
    /// A bar when stderr is a terminal, else a line every `every`; nothing when `quiet`.
    pub fn new(total: usize, quiet: bool, every: Duration) -> Progress {
        let display = if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} items  {per_sec}  ETA {eta}  {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("█▉▊▋▌▍▎▏ ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            Display::Bar(bar)
        } else {
            Display::Lines { every, last: Instant::now() }
        };
        Progress { display, total, started: Instant::now(), limit: None }
    }

    /// For a server's batch: notes, errors and the summary go down `lines` to the client.
    pub fn remote(total: usize, lines: UnboundedSender<BatchLine>) -> Progress {
        Progress { display: Display::Remote(lines), total, started: Instant::now(), limit: None }
    }

    /// Marks the start of this run's own work, with `tally` already done.
    pub fn begin(&mut self, tally: &Tally) {
        self.started = Instant::now();
        if let Display::Bar(bar) = &self.display {
            bar.set_position(tally.done() as u64);
            bar.reset_eta();
        }
    }

    /// The pool's concurrency limit now (`--adaptive-concurrency`), shown from the next update on.
    pub fn concurrency(&mut self, limit: usize) {
        self.limit = Some(limit);
    }

    /// Updates the display after an item finished.
    pub fn update(&mut self, tally: &Tally) {
        let limit = self.limit_text();
        match &mut self.display {
            Display::Bar(bar) => {
                bar.set_position(tally.done() as u64);
                bar.set_message(format!("{} ok, {} failed{limit}", tally.succeeded, tally.failed));
            }
            Display::Lines { every, last } if last.elapsed() >= *every => {
                *last = Instant::now();
                eprintln!("{}", self.line(tally));
            }
            _ => {}
        }
    }

    /// Prints a message without tearing the bar (nothing with `--quiet`).
    pub fn note(&self, message: &str) {
        match &self.display {
            Display::Bar(bar) => bar.suspend(|| eprintln!("{message}")),
            Display::Lines { .. } | Display::Done => eprintln!("{message}"),
            Display::Quiet => {}
            Display::Remote(lines) => drop(lines.send(BatchLine::Note(message.to_owned()))),
        }
    }

    /// Prints an error, `--quiet` or not.
    pub fn error(&self, message: &str) {
        match &self.display {
            Display::Bar(bar) => bar.suspend(|| eprintln!("{message}")),
            Display::Lines { .. } | Display::Done | Display::Quiet => eprintln!("{message}"),
            Display::Remote(lines) => drop(lines.send(BatchLine::Error(message.to_owned()))),
        }
    }

    /// Clears the bar; later notes are plain lines.
    pub fn finish(&mut self) {
        if let Display::Bar(bar) = &self.display {
            bar.finish_and_clear();
            self.display = Display::Done;
        }
    }

    /// Items per second of this run.
    pub fn rate(&self, tally: &Tally) -> f64 {
        let elapsed = self.started.elapsed().as_secs_f64();
        if elapsed > 0.0 { tally.ran as f64 / elapsed } else { 0.0 }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn line(&self, tally: &Tally) -> String {
        let rate = self.rate(tally);
        let left = self.total.saturating_sub(tally.done());
        let eta = if rate > 0.0 { format!("{:.0} s", left as f64 / rate) } else { "unknown".to_owned() };
        format!(
            "psbridge batch: {}/{} done ({} succeeded, {} failed), {rate:.1} items/s, ETA {eta}{}",
            tally.done(),
            self.total,
            tally.succeeded,
            tally.failed,
            self.limit_text(),
        )
    }

    fn limit_text(&self) -> String {
        self.limit.map_or_else(String::new, |limit| format!(", concurrency limit {limit}"))
    }
}
