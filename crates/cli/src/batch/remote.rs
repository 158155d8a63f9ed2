//! `batch --server`: the batch runs on a server's pool, and the server keeps its journal (by batch id);
//! the results come back as they finish and are written here as a local batch writes them, its notes
//! and summary go to stderr, and the exit status is the one the server's batch ended with.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{BatchArgs, InputFormat, ResultSink};
use crate::client::Client;
use crate::config::Config;
use crate::exit::{CliError, EXIT_OUTPUT};
use crate::secret::SecretReader;
use crate::serve::wire::{BatchLine, ErrorKind};
use crate::signals::Signals;
use crate::Globals;

/// How long a client waits for the server to finish an earlier run of the same batch (its client went
/// away while items were running).
const BUSY_WAIT: Duration = Duration::from_secs(120);

/// Runs the batch on the server; returns the exit status.
pub async fn run(args: BatchArgs, globals: Globals) -> u8 {
    match run_remote(args, globals).await {
        Ok(code) => code,
        Err(error) => {
            error.report();
            error.exit_code()
        }
    }
}

async fn run_remote(args: BatchArgs, globals: Globals) -> Result<u8, CliError> {
    if args.journal.is_some() {
        return Err(CliError::usage("with --server the server keeps the journal: name the batch with --batch-id instead of --journal"));
    }
    if args.workers.is_some() {
        return Err(CliError::usage("with --server the server's pool runs the items: its size is `psbridge serve --workers`, not --workers here"));
    }
    let config = Config::load(globals.config.as_deref())?;
    let asked = globals.profile_name()?;
    let stdin_input = args.input == Path::new("-");
    let mut secrets = SecretReader::with_stdin_taken(stdin_input.then(|| "the batch input".to_owned()));
    let address = args.remote.server.clone().expect("checked by the caller");
    let client = Client::new(address, args.remote.token_from.as_ref(), &config, config.chosen(asked), &mut secrets)?;
    let input = read_input(&args.input)?;
    let mut options = args.options();
    // The server reads a copy of the input, not its name: say here what the name says.
    if options.input_format.is_none() && args.input.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")) {
        options.input_format = Some(InputFormat::Csv);
    }
    let csv = options.input_format == Some(InputFormat::Csv);
    let mut sink = ResultSink::open(args.output.as_deref()).map_err(CliError::Usage)?;
    let mut signals = Signals::new().map_err(CliError::Runtime)?;
    let start = async {
        let profile = client.profile(asked, &config).await?;
        let id = match &args.batch_id {
            Some(id) => id.clone(),
            None => default_id(&profile, &args.input, args.output.as_deref(), &input),
        };
        let mut query = serde_urlencoded::to_string(&options).map_err(|e| CliError::usage(format_args!("cannot send the options: {e}")))?;
        query += &format!("&{}", serde_urlencoded::to_string([("id", id.as_str())]).map_err(|e| CliError::usage(e.to_string()))?);
        let path = format!("/v1/profiles/{profile}/batches?{query}");
        let content_type = if csv { "text/csv" } else { crate::serve::wire::NDJSON };
        let waiting_since = Instant::now();
        loop {
            match client.post_stream(&path, input.clone().into(), content_type).await {
                // The server still finishes the items of an earlier run of this batch whose client went away.
                Err(CliError::Server(error)) if error.error == ErrorKind::Conflict && waiting_since.elapsed() < BUSY_WAIT => {
                    if !args.quiet && waiting_since.elapsed() < Duration::from_millis(600) {
                        eprintln!("psbridge batch: {}; waiting for it", error.message);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    };
    let mut response = tokio::select! {
        response = start => response?,
        signal = signals.recv() => return Err(CliError::Interrupted(signal)),
    };
    loop {
        let line = tokio::select! {
            line = response.next_line(&client) => line?,
            signal = signals.recv() => {
                // Closing the connection: the server takes no more items, lets the running ones finish and
                // journals them.
                drop(response);
                let _ = sink.finish();
                if !args.quiet {
                    eprintln!("psbridge batch: interrupted; the server finishes the running items; run the same command again to resume");
                }
                return Err(CliError::Interrupted(signal));
            }
        };
        let Some(line) = line else {
            return Err(CliError::ServerGone(format!(
                "the psbridge server at {} ended the batch's stream before its end; run the same command again to resume",
                client.address()
            )));
        };
        let line: BatchLine = serde_json::from_slice(&line)
            .map_err(|e| CliError::ServerGone(format!("the psbridge server at {} sent a line that is not part of a batch ({e})", client.address())))?;
        match line {
            BatchLine::Result(record) => {
                if let Err(error) = sink.write(&record) {
                    // Closing the connection stops the batch on the server, as a local batch stops.
                    eprintln!("psbridge: cannot write the results: {error}");
                    return Ok(EXIT_OUTPUT);
                }
            }
            BatchLine::Note(note) if !args.quiet => eprintln!("{note}"),
            BatchLine::Note(_) => {}
            BatchLine::Error(error) => eprintln!("{error}"),
            BatchLine::End { status } => {
                if let Err(error) = sink.finish() {
                    eprintln!("psbridge: cannot write the results: {error}");
                    return Ok(EXIT_OUTPUT);
                }
                return Ok(status);
            }
        }
    }
}

/// The input's bytes (standard input for `-`).
fn read_input(path: &Path) -> Result<Vec<u8>, CliError> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes).map_err(|e| CliError::usage(format_args!("cannot read standard input: {e}")))?;
        Ok(bytes)
    } else {
        std::fs::read(path).map_err(|e| CliError::usage(format_args!("cannot read the input {}: {e}", path.display())))
    }
}

/// The batch's id when `--batch-id` does not give one: the same command run again (same profile, input
/// file and output) names the same batch, and so resumes it. Standard input has no name: its content
/// names it.
pub fn default_id(profile: &str, input: &Path, output: Option<&Path>, content: &[u8]) -> String {
    let mut hash = Sha256::new();
    hash.update(b"psbridge batch\0");
    hash.update(profile.as_bytes());
    hash.update([0]);
    if input == Path::new("-") {
        hash.update(Sha256::digest(content));
    } else {
        hash.update(absolute(input).to_string_lossy().as_bytes());
    }
    hash.update([0]);
    if let Some(output) = output {
        hash.update(absolute(output).to_string_lossy().as_bytes());
    }
    hash.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// A path made absolute (its folder resolved when it exists), for naming.
fn absolute(path: &Path) -> PathBuf {
    if let Ok(path) = std::fs::canonicalize(path) {
        return path;
    }
    let (parent, name) = (path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")), path.file_name());
    match (std::fs::canonicalize(parent), name) {
        (Ok(parent), Some(name)) => parent.join(name),
        _ => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_command_names_the_same_batch() {
        let a = default_id("p", Path::new("in.jsonl"), Some(Path::new("out.jsonl")), b"x");
        assert_eq!(a, default_id("p", Path::new("./in.jsonl"), Some(Path::new("./out.jsonl")), b"y"));
        assert_ne!(a, default_id("q", Path::new("in.jsonl"), Some(Path::new("out.jsonl")), b"x"));
        assert_ne!(a, default_id("p", Path::new("in.jsonl"), None, b"x"));
        assert_eq!(default_id("p", Path::new("-"), None, b"x"), default_id("p", Path::new("-"), None, b"x"));
        assert_ne!(default_id("p", Path::new("-"), None, b"x"), default_id("p", Path::new("-"), None, b"y"));
        assert_eq!(a.len(), 24);
    }
}
