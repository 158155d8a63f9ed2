//! `POST /v1/profiles/{profile}/batches`: a batch run by `psbridge batch`'s own engine on the profile's
//! shared pool, its journal kept by the server under the batch's id, its results streamed back as they
//! finish (one [`BatchLine`] per line).
//!
//! A client that goes away stops the batch as a full disk stops a local one: no more items begin, the
//! running ones finish and are journalled. Running the batch again with the same id resumes it (while
//! the earlier run still finishes its items, the journal is busy: 409).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State as Shared};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::api::{Audited, Failure, State, line};
use super::metrics::CommandStatus;
use super::wire::{BatchLine, ErrorKind, NDJSON};
use crate::batch::{Batch, BatchError, BatchOptions, Destination, Interrupts, Progress, Setup, Workers};

/// The batch's id, from the query (the same query holds the [`BatchOptions`]).
#[derive(Debug, Deserialize)]
pub struct BatchId {
    /// The batch's name: letters, digits, `.`, `_` and `-` (at most 128).
    id: String,
}

/// Whether `id` may name a journal file.
fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && !id.starts_with('.') && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Runs a batch: a JSONL (or, `input_format=csv`, CSV) body; NDJSON lines back.
#[utoipa::path(post, path = "/v1/profiles/{profile}/batches",
    params(
        ("profile" = String, Path, description = "The profile's name"),
        ("id" = String, Query, description = "The batch's id: the same id resumes the batch from its journal"),
        ("input_format" = Option<String>, Query, description = "jsonl (default) or csv"),
        ("command" = Option<String>, Query, description = "CSV: the command every row runs"),
        ("key_column" = Option<String>, Query, description = "CSV: the column holding each item's key"),
        ("delimiter" = Option<String>, Query, description = "CSV: the cell separator"),
        ("max_line_bytes" = Option<u64>, Query, description = "The longest input line"),
        ("timeout_secs" = Option<f64>, Query, description = "Stop an item after this many seconds"),
        ("depth" = Option<u32>, Query, description = "How deep output objects are serialized"),
        ("restart" = Option<bool>, Query, description = "Forget the journal"),
        ("resume" = Option<bool>, Query, description = "Resume though the input changed"),
        ("retry_failed" = Option<bool>, Query, description = "Run failed items again"),
        ("no_journal" = Option<bool>, Query, description = "Keep no journal"),
    ),
    request_body(content = String, description = "Batch items, one JSON object per line ({\"command\", \"parameters\", \"key\", \"id\"}), or CSV", content_type = "application/x-ndjson"),
    responses(
        (status = 200, description = "One line per event: {\"result\": record} (the records of psbridge batch), {\"note\": text}, {\"error\": text}, and last {\"end\": {\"status\": exit status}}"),
        (status = 400, body = super::wire::ApiError), (status = 403, body = super::wire::ApiError), (status = 404, body = super::wire::ApiError),
        (status = 409, description = "The batch is still running (an earlier client went away)", body = super::wire::ApiError),
        (status = 413, body = super::wire::ApiError), (status = 503, body = super::wire::ApiError)
    ))]
pub async fn batches(
    Shared(state): Shared<Arc<State>>,
    Path(profile): Path<String>,
    Query(BatchId { id }): Query<BatchId>,
    Query(options): Query<BatchOptions>,
    Extension(audited): Extension<Arc<Audited>>,
    body: Body,
) -> Result<Response, Failure> {
    audited.note(|e| {
        e.profile = Some(profile.clone());
        e.command = Some(format!("batch {}", id));
    });
    if !valid_id(&id) {
        return Err(Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, "a batch id is 1 to 128 letters, digits, '.', '_' and '-', not starting with '.'"));
    }
    let served = state.pools.served(&profile)?;
    let folder = state.state_dir.join(&profile);
    private_dirs(&folder).map_err(|e| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Unavailable, format!("cannot create {}: {e}", folder.display())))?;
    let input = spool(&state, &folder, body).await?;
    let lease = state.pools.get(&profile).await?;
    let journal = (!options.no_journal).then(|| folder.join(format!("{}.journal", id)));
    let (tx, rx) = mpsc::unbounded_channel();
    let policy = served.policy.clone();
    let setup = Setup {
        input: input.path(),
        input_name: format!("batch {}", id),
        options: &options,
        journal,
        destination: Destination::Stream(tx.clone()),
        workers: Workers::Shared((*lease).clone()),
        size: served.workers,
        runspaces: served.runspaces,
        adaptive: served.profile.adaptive_concurrency(),
        allowed: Some(Box::new(move |name| policy.check_command(name).map_err(|refusal| refusal.to_string()))),
    };
    let batch = Batch::assemble(setup).map_err(|error| match &error {
        BatchError::Journal(crate::batch::JournalError::Locked { .. }) => Failure::new(
            StatusCode::CONFLICT,
            ErrorKind::Conflict,
            format!("batch {} is still running on the server (its earlier client went away)", id),
        ),
        _ => Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, error),
    })?;
    audited.note(|e| e.outcome = "disconnected".to_owned());
    let shutdown = state.shutdown.child_token();
    tokio::spawn(async move {
        let progress = Progress::remote(batch.total, tx.clone());
        let status = batch.execute(progress, Interrupts::Shutdown(Some(shutdown))).await;
        let _ = tx.send(BatchLine::End { status });
        // The spooled input and the lease (which keeps the pool from closing as idle) go with the batch.
        drop((input, lease));
    });
    Ok(stream(state, profile, rx, audited))
}

/// The batch's lines as the response body; items are counted in the metrics as they finish, the audit
/// line is written when the stream ends (or the client goes away: the receiver is dropped with it, and
/// the batch's next write fails).
fn stream(state: Arc<State>, profile: String, rx: mpsc::UnboundedReceiver<BatchLine>, audited: Arc<Audited>) -> Response {
    let lines = futures_util::stream::unfold((rx, audited), move |(mut rx, audited)| {
        let (state, profile) = (state.clone(), profile.clone());
        async move {
            let next = rx.recv().await?;
            match &next {
                BatchLine::Result(record) if !record.previous_run => {
                    use crate::batch::Status;
                    let status = match record.status {
                        Status::Succeeded => Some(CommandStatus::Succeeded),
                        Status::Failed => Some(CommandStatus::Failed),
                        Status::Invalid if record.errors.iter().any(|e| e.fully_qualified_error_id.as_deref() == Some("psbridge.refused")) => {
                            Some(CommandStatus::Refused)
                        }
                        Status::Cancelled => Some(CommandStatus::Error),
                        Status::Invalid | Status::NotRun => None,
                    };
                    if let Some(status) = status {
                        state.metrics.command(&profile, status, std::time::Duration::from_secs_f64(record.duration_ms / 1000.0));
                    }
                }
                BatchLine::End { status } => {
                    let status = *status;
                    audited.note(|e| e.outcome = if status == 0 { "succeeded".to_owned() } else { format!("exit status {status}") });
                }
                _ => {}
            }
            Some((Ok::<Bytes, Infallible>(line(&next)), (rx, audited)))
        }
    });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(lines)).into_response()
}

/// Creates `folder` (and its parents) readable by the server's user only.
fn private_dirs(folder: &std::path::Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(folder)
}

/// Writes the body to a private temporary file in `folder` (the batch engine reads its input from a
/// file, twice), refusing more than `--max-body-bytes`.
async fn spool(state: &State, folder: &std::path::Path, body: Body) -> Result<tempfile::NamedTempFile, Failure> {
    let failed = |e: std::io::Error| Failure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Unavailable, format!("cannot keep the batch input: {e}"));
    // tempfile creates it 0600.
    let file = tempfile::Builder::new().prefix(".input-").tempfile_in(folder).map_err(failed)?;
    let mut writer = tokio::fs::File::from_std(file.reopen().map_err(failed)?);
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, format!("cannot read the request body: {e}")))?;
        size += chunk.len();
        if size > state.limits.max_body_bytes {
            return Err(Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("the batch is larger than {} bytes, the most this server takes (--max-body-bytes)", state.limits.max_body_bytes),
            ));
        }
        writer.write_all(&chunk).await.map_err(failed)?;
    }
    writer.flush().await.map_err(failed)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    #[test]
    fn batch_ids_cannot_leave_their_folder() {
        for good in ["ci-1234", "nightly.2026-11-27", "a", "A_b"] {
            assert!(super::valid_id(good), "{good}");
        }
        for bad in ["", "..", ".hidden", "a/b", "../x", "a b", &"x".repeat(129)] {
            assert!(!super::valid_id(bad), "{bad}");
        }
    }
}
