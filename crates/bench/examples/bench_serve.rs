//! The latency `psbridge serve` adds to a command, for `scripts/bench/serve.sh`: the same sequential
//! `Get-Mailbox -Identity` calls through an in-process [`RunspacePool`] of one worker and through a
//! running server's `POST /v1/profiles/simulated/invoke` (one keep-alive HTTP/1.1 connection over its unix
//! socket, as a service would hold one). Both are warmed up first, then measured in alternating blocks,
//! so that a busy machine slows both alike.
//!
//! ```sh
//! bench_serve <socket> <tenant> <calls> <out.json>
//! ```
//! Prints one JSON object (p50/p90/p99 of each, and the server-to-pool ratios) and writes it to out.json.

use psbridge_bench as common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use common::{Run, millis_since, read_properties, sim_workers};
use psbridge::{Command, RunspacePool};
use serde_json::{Value, json};

fn identity(i: usize) -> String {
    format!("ContosoUser{}", i % 200 + 1)
}

/// A keep-alive HTTP/1.1 connection to the server.
struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Connection {
    fn open(socket: &str) -> Connection {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("{socket}: {e}"));
        Connection { reader: BufReader::new(stream.try_clone().expect("a second handle")), writer: stream }
    }

    /// POSTs `body` to `path`; the response's status and body.
    fn post(&mut self, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let head = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
        self.writer.write_all(head.as_bytes()).and_then(|()| self.writer.write_all(body)).expect("the request is sent");
        let mut status = 0;
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).expect("a response line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some(rest) = line.strip_prefix("HTTP/1.1 ") {
                status = rest[..3].parse().expect("a status");
            } else if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().expect("a length");
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).expect("the body");
        (status, body)
    }
}

fn over_http(connection: &mut Connection, from: usize, calls: usize) -> Run {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(calls);
    for i in from..from + calls {
        let body = json!({ "command": "Get-Mailbox", "parameters": { "Identity": identity(i) } }).to_string();
        let call = Instant::now();
        let (status, reply) = connection.post("/v1/profiles/simulated/invoke", body.as_bytes());
        let result: Value = serde_json::from_slice(&reply).expect("an invocation result");
        assert_eq!(status, 200, "{result}");
        let output = result["output"].as_array().expect("output");
        assert_eq!(output.len(), 1, "{result}");
        std::hint::black_box(read_properties(&output[0]["value"]));
        latencies.push(millis_since(call));
    }
    Run { latencies, seconds: started.elapsed().as_secs_f64() }
}

async fn in_process(pool: &RunspacePool, from: usize, calls: usize) -> Run {
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(calls);
    for i in from..from + calls {
        let call = Instant::now();
        let result = pool.invoke(Command::new("Get-Mailbox").param("Identity", identity(i))).await.expect("Get-Mailbox");
        assert!(result.succeeded() && result.output.len() == 1, "{:?}", result.errors);
        std::hint::black_box(read_properties(&result.output[0].value));
        latencies.push(millis_since(call));
    }
    Run { latencies, seconds: started.elapsed().as_secs_f64() }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, tenant, calls, out] = args.as_slice() else {
        panic!("usage: bench_serve <socket> <tenant> <calls> <out.json>");
    };
    let calls: usize = calls.parse().expect("a number of calls");
    let warmup = calls / 2;

    let pool = RunspacePool::builder(sim_workers(&PathBuf::from(tenant), 0)).min_workers(1).max_workers(1).build().await.expect("the pool opens");
    let mut connection = Connection::open(socket);
    in_process(&pool, 0, warmup).await;
    over_http(&mut connection, 0, warmup);
    const BLOCKS: usize = 20;
    let block = calls.div_ceil(BLOCKS);
    let (mut pool_run, mut server_run) = (Run { latencies: Vec::new(), seconds: 0.0 }, Run { latencies: Vec::new(), seconds: 0.0 });
    for n in 0..BLOCKS {
        let from = warmup + n * block;
        for (run, part) in [(&mut pool_run, in_process(&pool, from, block).await), (&mut server_run, over_http(&mut connection, from, block))] {
            run.latencies.extend(part.latencies);
            run.seconds += part.seconds;
        }
    }
    pool.close().await;

    let (pool_figures, server_figures) = (pool_run.latency(), server_run.latency());
    let ratio = |key: &str| server_figures[key].as_f64().unwrap() / pool_figures[key].as_f64().unwrap();
    let report = json!({
        "calls": calls,
        "warmup": warmup,
        "in_process_pool": pool_figures,
        "server": server_figures,
        "p50_ratio": ratio("p50_ms"),
        "p99_ratio": ratio("p99_ms"),
    });
    let text = serde_json::to_string_pretty(&report).expect("a report");
    std::fs::write(out, &text).unwrap_or_else(|e| panic!("{out}: {e}"));
    println!("{text}");
}
