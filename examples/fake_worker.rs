//! A stand-in for the PowerShell worker: speaks psbridge's protocol (PROTOCOL.md) in a few
//! milliseconds, for tests of the bridge that need no PowerShell.
//!
//! ```sh
//! cargo build --example fake_worker
//! ```
//! Use it with `RunspaceBuilder::pwsh("target/debug/examples/fake_worker")`; the arguments psbridge
//! passes (`-NoLogo ... -File worker.ps1 -CacheDirectory DIR`) are ignored.
//!
//! It prints `ready` (protocol 2, its own pid), answers `setup` with `done`, and runs the script text
//! of each `invoke`'s first step as instructions, one per line, in order. Like the real worker it hosts
//! as many runspaces as the owner sets up (`setup` with `runspace` N), each running its own requests on
//! a thread of its own:
//!
//! | instruction | what the fake worker does |
//! |---|---|
//! | `echo <json>` | one `out` with that value |
//! | `clock` | one `out` with the time in milliseconds since the Unix epoch (a float) |
//! | `lane` | one `out` with the index of the runspace running the request |
//! | `long <n>` | one `out` whose value is a string of `n` `x`: a line a little longer than `n` bytes |
//! | `sleep <ms>` | waits; a `cancel` for the request ends it with `done` `Stopped` |
//! | `hang` | waits forever and ignores `cancel` (only the owner's kill or stdin EOF ends it) |
//! | `crash <code> [words]` | writes `words` (or a default line) to stderr and exits with `code` |
//! | `crash-once <file>` | crashes (exit code 1) unless `file` exists, creating it first: the next worker survives |
//! | `garbage` | writes a line that is not JSON to stdout |
//! | `exit <n>` | ends the request: `done` `Completed` with `exit_code` `n` |
//! | `error <message>` | a terminating `err` with that message, then `done` `Failed` |
//! | `throttle <n>` | the first `n` times in this process (all runspaces together): a non-terminating `err` shaped like Exchange Online's HTTP 429, then `done`; afterwards nothing |
//!
//! A request that runs to its end gets `done` `Completed`. Like the real worker it reads stdin on a
//! thread of its own, so that `cancel` arrives while an instruction runs (every runspace hears every
//! cancel; ids are unique in the process); it exits at once on stdin EOF, and after the requests before
//! it on `exit`.

use std::collections::{HashSet, VecDeque};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

/// How many `throttle` instructions this process has failed, all runspaces together.
static THROTTLED: AtomicU32 = AtomicU32::new(0);

fn main() {
    let (first, requests) = mpsc::channel();
    let lanes = std::thread::spawn(move || read_requests(first));
    send(&json!({
        "t": "ready", "protocol": 2, "ps_version": "0.0.0", "ps_edition": "Fake",
        "os": std::env::consts::OS, "pid": std::process::id(),
    }));
    Worker::new(0, requests).serve();
    for lane in lanes.join().unwrap_or_default() {
        let _ = lane.join();
    }
}

/// Reads owner messages on a thread of its own and hands each to the runspace it names (a `setup` for a
/// new index starts that runspace's thread); stdin EOF ends the process at once, as the real worker's
/// does. Returns the threads of the runspaces it started, after `exit`.
fn read_requests(first: Sender<Value>) -> Vec<JoinHandle<()>> {
    let mut lanes = vec![first];
    let mut threads = Vec::new();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            continue;
        }
        let message = match serde_json::from_str::<Value>(&line) {
            Ok(message) => message,
            Err(error) => {
                send(&json!({"t": "fatal", "message": format!("unparsable request: {error}")}));
                continue;
            }
        };
        match message["t"].as_str() {
            Some("cancel") => lanes.iter().for_each(|lane| drop(lane.send(message.clone()))),
            Some("exit") => {
                lanes.iter().for_each(|lane| drop(lane.send(message.clone())));
                return threads; // nothing is read after exit, so its EOF ends nothing early
            }
            _ => {
                let index = message["runspace"].as_u64().unwrap_or(0) as usize;
                if index == lanes.len() && message["t"] == "setup" {
                    let (sender, requests) = mpsc::channel();
                    lanes.push(sender);
                    threads.push(std::thread::spawn(move || Worker::new(index, requests).serve()));
                }
                match lanes.get(index) {
                    Some(lane) => drop(lane.send(message)),
                    None => {
                        let id = message["id"].as_u64().unwrap_or(0);
                        send_error(id, &format!("runspace {index} has not been set up"), true);
                        done(id, "Failed", true, Instant::now(), None);
                    }
                }
            }
        }
    }
    std::process::exit(0);
}

struct Worker {
    /// Which runspace this is.
    index: usize,
    requests: Receiver<Value>,
    /// Requests that arrived while an instruction waited.
    queued: VecDeque<Value>,
    /// Ids cancelled before they ran (or after they finished).
    cancelled: HashSet<u64>,
}

/// How one instruction left the request.
enum Flow {
    Next,
    Done { state: &'static str, had_errors: bool, exit_code: Option<i64> },
}

impl Worker {
    fn new(index: usize, requests: Receiver<Value>) -> Worker {
        Worker { index, requests, queued: VecDeque::new(), cancelled: HashSet::new() }
    }

    fn serve(&mut self) {
        while let Some(request) = self.next_request() {
            let id = request["id"].as_u64().unwrap_or(0);
            if self.cancelled.remove(&id) {
                done(id, "Stopped", false, Instant::now(), None);
                continue;
            }
            match request["t"].as_str() {
                Some("setup") => done(id, "Completed", false, Instant::now(), None),
                Some("invoke") => self.invoke(id, &request),
                Some("exit") => return,
                other => send(&json!({"t": "fatal", "id": id, "message": format!("unknown request type {other:?}")})),
            }
        }
    }

    /// The next request to run; cancels met on the way are remembered.
    fn next_request(&mut self) -> Option<Value> {
        if let Some(request) = self.queued.pop_front() {
            return Some(request);
        }
        loop {
            let message = self.requests.recv().ok()?;
            if !self.note_cancel(&message) {
                return Some(message);
            }
        }
    }

    fn note_cancel(&mut self, message: &Value) -> bool {
        let is_cancel = message["t"] == "cancel";
        if is_cancel {
            self.cancelled.insert(message["id"].as_u64().unwrap_or(0));
        }
        is_cancel
    }

    fn invoke(&mut self, id: u64, request: &Value) {
        let started = Instant::now();
        let Some(script) = request["pipeline"][0]["script"].as_str() else {
            send_error(id, "the fake worker runs script text only", true);
            return done(id, "Failed", true, started, None);
        };
        for line in script.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (verb, argument) = line.split_once(' ').unwrap_or((line, ""));
            if let Flow::Done { state, had_errors, exit_code } = self.instruction(id, verb, argument.trim()) {
                return done(id, state, had_errors, started, exit_code);
            }
        }
        done(id, "Completed", false, started, None);
    }

    fn instruction(&mut self, id: u64, verb: &str, argument: &str) -> Flow {
        match verb {
            "echo" => match serde_json::from_str::<Value>(argument) {
                Ok(value) => send(&json!({"t": "out", "id": id, "types": [], "v": value})),
                Err(error) => return failed(id, &format!("echo: {error}")),
            },
            "clock" => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                send(&json!({"t": "out", "id": id, "types": ["System.Double"], "v": now.as_secs_f64() * 1000.0}));
            }
            "lane" => send(&json!({"t": "out", "id": id, "types": ["System.Int32"], "v": self.index})),
            "long" => send(&json!({"t": "out", "id": id, "types": ["System.String"], "v": "x".repeat(number(argument))})),
            "sleep" => {
                if self.sleep(id, Duration::from_millis(number(argument))) {
                    return Flow::Done { state: "Stopped", had_errors: false, exit_code: None };
                }
            }
            "hang" => loop {
                std::thread::park(); // stdin EOF or a kill ends the process
            },
            "crash" => {
                let (code, words) = argument.split_once(' ').unwrap_or((argument, "fake worker: crashing as told"));
                crash(number(code), words);
            }
            "crash-once" => {
                // create_new: of two workers racing, one crashes and one survives.
                if std::fs::OpenOptions::new().write(true).create_new(true).open(argument).is_ok() {
                    crash(1, "fake worker: crashing once");
                }
            }
            "garbage" => {
                let mut stdout = std::io::stdout().lock();
                let _ = writeln!(stdout, "this is not a protocol message").and_then(|()| stdout.flush());
            }
            "exit" => return Flow::Done { state: "Completed", had_errors: false, exit_code: Some(number(argument)) },
            "error" => return failed(id, argument),
            "throttle" if THROTTLED.fetch_add(1, Ordering::SeqCst) < number::<u32>(argument) => {
                let message = "Error while querying REST service. HttpStatusCode=429 \
                               ErrorMessage={\"error\":{\"code\":\"TooManyRequests\",\"message\":\"Rate limit exceeded.\"}}";
                send_error(id, message, false);
                return Flow::Done { state: "Completed", had_errors: true, exit_code: None };
            }
            "throttle" => {}
            other => return failed(id, &format!("unknown instruction {other:?}")),
        }
        Flow::Next
    }

    /// Waits `duration`, or until the owner cancels request `id`: returns whether it did.
    fn sleep(&mut self, id: u64, duration: Duration) -> bool {
        let end = Instant::now() + duration;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.requests.recv_timeout(left) {
                Ok(message) if message["t"] == "cancel" && message["id"] == id => return true,
                Ok(message) => {
                    if !self.note_cancel(&message) {
                        self.queued.push_back(message);
                    }
                }
                Err(RecvTimeoutError::Timeout) => return false,
                // The reader stopped after `exit`: nothing can cancel any more.
                Err(RecvTimeoutError::Disconnected) => {
                    std::thread::sleep(left);
                    return false;
                }
            }
        }
    }
}

/// A terminating error ends the request.
fn failed(id: u64, message: &str) -> Flow {
    send_error(id, message, true);
    Flow::Done { state: "Failed", had_errors: true, exit_code: None }
}

fn crash(code: i32, words: &str) -> ! {
    eprintln!("{words}");
    std::process::exit(code);
}

/// An instruction's number; a bad one is a bug in the test that wrote it.
fn number<T: std::str::FromStr>(text: &str) -> T {
    text.parse().unwrap_or_else(|_| panic!("fake worker: {text:?} is not a number"))
}

/// Writes one message as one line.
fn send(message: &Value) {
    let mut stdout = std::io::stdout().lock();
    // A closed stdout means the owner is gone; stdin EOF ends the process soon.
    let _ = writeln!(stdout, "{message}").and_then(|()| stdout.flush());
}

fn done(id: u64, state: &str, had_errors: bool, started: Instant, exit_code: Option<i64>) {
    let mut message = json!({
        "t": "done", "id": id, "state": state, "had_errors": had_errors,
        "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
    });
    if let Some(code) = exit_code {
        message["exit_code"] = code.into();
    }
    send(&message);
}

fn send_error(id: u64, message: &str, terminating: bool) {
    let record = json!({
        "message": message, "exception_message": message, "exception_type": "System.Exception",
        "fully_qualified_error_id": "FakeWorkerError", "category": "NotSpecified", "terminating": terminating,
    });
    send(&json!({"t": "err", "id": id, "v": record}));
}
