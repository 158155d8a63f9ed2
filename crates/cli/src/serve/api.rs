//! The HTTP/JSON API, under `/v1` (its OpenAPI document at `/v1/openapi.json`), and `/metrics`.
//!
//! Every request passes [`gate`] first: the peer is admitted ([`Access`]), its client counted against
//! the per-client limit, and one audit line is written when the request ends (for a stream: when the
//! stream ends, or the client goes away).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use psbridge::{InvocationResult, StreamItem};
use tokio::sync::mpsc;
use utoipa::OpenApi;

use super::audit::{self, Audit};
use super::auth::{Access, Denied};
use super::listen::Peer;
use super::metrics::{CommandStatus, Metrics};
use super::policy::Refusal;
use super::pools::{Pools, PoolsError, Served};
use super::wire::{self, ApiError, ErrorKind, InvokeRequest, NDJSON, ProfileStats, ServerStatus, StreamEnd, WorkerInfo};

/// Request limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest body taken.
    pub max_body_bytes: usize,
    /// Requests one client may have under way.
    pub max_client_requests: usize,
}

/// What every request handler shares.
pub struct State {
    pub pools: Pools,
    pub access: Access,
    pub audit: Audit,
    pub metrics: Metrics,
    pub started: Instant,
    pub limits: Limits,
    /// Requests under way, by client name.
    pub clients: Mutex<HashMap<String, usize>>,
    /// Where batch journals are kept.
    pub state_dir: PathBuf,
    /// Cancelled when the server begins to stop.
    pub shutdown: super::lifecycle::Shutdown,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "psbridge serve", description = "Run PowerShell and Exchange Online commands on a warm, connected pool of pwsh workers."),
    paths(health, status, profile_stats, invoke, super::batches::batches),
    components(schemas(InvokeRequest, wire::PipeStep, ApiError, ErrorKind, ProfileStats, WorkerInfo, ServerStatus))
)]
struct ApiDoc;

/// The routes, behind the gate.
pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/status", get(status))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/profiles/{profile}", get(profile_stats))
        .route("/v1/profiles/{profile}/invoke", post(invoke))
        .route("/v1/profiles/{profile}/batches", post(super::batches::batches))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// An error response: its status and the [`ApiError`] body.
pub struct Failure(pub StatusCode, pub ApiError);

impl Failure {
    pub fn new(status: StatusCode, error: ErrorKind, message: impl std::fmt::Display) -> Failure {
        Failure(status, ApiError { error, message: message.to_string() })
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut response = (self.0, Json(self.1)).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<PoolsError> for Failure {
    fn from(error: PoolsError) -> Failure {
        match &error {
            PoolsError::Unknown { .. } => Failure::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, error),
            PoolsError::Open { source, .. } => {
                let Failure(status, api) = bridge_failure(source);
                Failure(status, ApiError { message: error.to_string(), ..api })
            }
            PoolsError::Closing => Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Unavailable, error),
        }
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, ErrorKind::Forbidden, format!("refused: {refusal}"))
    }
}

/// A library error as a response, in the words `psbridge run` would use (a module that did not import
/// gets its name and the fix).
fn bridge_failure(error: &psbridge::Error) -> Failure {
    use psbridge::Error;
    let message = crate::exit::bridge_message(error);
    match error {
        Error::ModuleImport { .. } => Failure::new(StatusCode::INTERNAL_SERVER_ERROR, ErrorKind::Configuration, format!("on the server: {message}")),
        Error::InvalidCommand { .. } => Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, message),
        Error::Timeout { .. } => Failure::new(StatusCode::GATEWAY_TIMEOUT, ErrorKind::Timeout, message),
        Error::Cancelled { .. } => Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Cancelled, message),
        Error::PoolClosed => Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Unavailable, "the server is stopping: the command did not run to its end"),
        _ => Failure::new(StatusCode::SERVICE_UNAVAILABLE, ErrorKind::Unavailable, message),
    }
}

/// One request under way: its audit line (written when the last holder drops it) and its place in the
/// client's count.
pub struct Audited {
    state: Arc<State>,
    started: Instant,
    entry: Mutex<audit::Entry>,
    client: Option<String>,
}

impl Audited {
    /// Fills in the audit line.
    pub fn note(&self, change: impl FnOnce(&mut audit::Entry)) {
        change(&mut self.entry.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        let entry = self.entry.get_mut().unwrap_or_else(|p| p.into_inner());
        if entry.outcome.is_empty() {
            // The request ended before anything said how: the client went away.
            entry.outcome = "disconnected".to_owned();
        }
        entry.time = audit::now();
        entry.duration_ms = wire::millis(self.started.elapsed());
        self.state.audit.write(entry);
        if let Some(client) = &self.client {
            let mut clients = self.state.clients.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(count) = clients.get_mut(client) {
                *count -= 1;
                if *count == 0 {
                    clients.remove(client);
                }
            }
        }
    }
}

/// Admission, the per-client limit, and the audit line of every request.
async fn gate(Shared(state): Shared<Arc<State>>, ConnectInfo(peer): ConnectInfo<Peer>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let entry = audit::Entry {
        time: String::new(),
        client: None,
        request: format!("{} {}", request.method(), request.uri().path()),
        profile: None,
        command: None,
        parameters: Vec::new(),
        status: 0,
        outcome: String::new(),
        duration_ms: 0.0,
    };
    let mut audited = Audited { state: state.clone(), started, entry: Mutex::new(entry), client: None };
    let client = match state.access.admit(&peer, request.headers()) {
        Ok(client) => client,
        Err(denied) => {
            let failure = match denied {
                Denied::NoToken | Denied::WrongToken => Failure::new(StatusCode::UNAUTHORIZED, ErrorKind::Unauthorized, &denied),
                Denied::Foreign { uid, .. } => {
                    audited.note(|e| e.client = Some(format!("uid {uid}")));
                    Failure::new(StatusCode::FORBIDDEN, ErrorKind::Forbidden, &denied)
                }
                Denied::Unknown => Failure::new(StatusCode::FORBIDDEN, ErrorKind::Forbidden, &denied),
            };
            audited.note(|e| {
                e.status = failure.0.as_u16();
                e.outcome = "unauthorized".to_owned();
            });
            return failure.into_response();
        }
    };
    audited.note(|e| e.client = Some(client.name.clone()));
    {
        let mut clients = state.clients.lock().unwrap_or_else(|p| p.into_inner());
        let count = clients.entry(client.name.clone()).or_default();
        if *count >= state.limits.max_client_requests {
            drop(clients);
            let failure = Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorKind::TooManyRequests,
                format!("{} has {} requests under way, the most this server takes from one client (--max-client-requests)", client.name, state.limits.max_client_requests),
            );
            audited.note(|e| {
                e.status = 429;
                e.outcome = "too_many_requests".to_owned();
            });
            return failure.into_response();
        }
        *count += 1;
    }
    audited.client = Some(client.name.clone());
    let audited = Arc::new(audited);
    request.extensions_mut().insert(client);
    request.extensions_mut().insert(audited.clone());
    let response = next.run(request).await;
    audited.note(|e| {
        e.status = response.status().as_u16();
        if e.outcome.is_empty() {
            e.outcome = if response.status().is_success() { "ok" } else { "error" }.to_owned();
        }
    });
    response
}

async fn not_found() -> Failure {
    Failure::new(StatusCode::NOT_FOUND, ErrorKind::NotFound, "no such route; the API is described at /v1/openapi.json")
}

/// Whether the server is ready: every profile started at launch has its pool open.
#[utoipa::path(get, path = "/v1/health", responses(
    (status = 200, description = "Every profile started at launch has its minimum workers connected"),
    (status = 503, description = "Starting, or stopping")
))]
async fn health(Shared(state): Shared<Arc<State>>) -> Response {
    if state.pools.healthy() {
        (StatusCode::OK, Json(serde_json::json!({ "healthy": true }))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "healthy": false }))).into_response()
    }
}

/// The server: version, uptime, health and every profile's pool.
#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = ServerStatus)))]
async fn status(Shared(state): Shared<Arc<State>>) -> Json<ServerStatus> {
    Json(ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        uptime_secs: wire::secs(state.started.elapsed()),
        healthy: state.pools.healthy(),
        profiles: state.pools.all().iter().map(|s| profile_stats_of(s)).collect(),
    })
}

/// One profile's pool.
#[utoipa::path(get, path = "/v1/profiles/{profile}", params(("profile" = String, Path, description = "The profile's name")),
    responses((status = 200, body = ProfileStats), (status = 404, body = ApiError)))]
async fn profile_stats(Shared(state): Shared<Arc<State>>, Path(profile): Path<String>, Extension(audited): Extension<Arc<Audited>>) -> Result<Json<ProfileStats>, Failure> {
    audited.note(|e| e.profile = Some(profile.clone()));
    Ok(Json(profile_stats_of(&*state.pools.served(&profile)?)))
}

fn profile_stats_of(served: &Served) -> ProfileStats {
    let stats = served.stats();
    let counters = stats.as_ref().map(|s| s.counters).unwrap_or_default();
    let workers = stats
        .iter()
        .flat_map(|s| &s.workers)
        .filter(|w| w.state != psbridge::WorkerState::Stopped)
        .map(|w| WorkerInfo {
            id: w.id,
            state: format!("{:?}", w.state).to_lowercase(),
            pid: w.pid,
            resident_bytes: w.resident_bytes,
            commands: w.runspace_commands,
            age_secs: w.runspace_age().map(wire::secs),
            credentials_expire_at: w.credentials_expire_at.map(crate::connector::rfc3339),
        })
        .collect();
    ProfileStats {
        profile: served.name.clone(),
        state: if stats.is_some() { "open" } else { "closed" }.to_owned(),
        eager: served.eager,
        requests: served.users(),
        queued: stats.as_ref().map_or(0, |s| s.queued),
        idle_secs: wire::secs(served.idle_for()),
        commands: counters.commands,
        failures: counters.failures,
        retries: counters.retries,
        throttled: counters.throttled,
        restarts: counters.restarts,
        recycles: counters.recycles,
        reconnects: counters.reconnects,
        latency_p50_ms: stats.as_ref().map_or(0.0, |s| wire::millis(s.latency.p50)),
        latency_p99_ms: stats.as_ref().map_or(0.0, |s| wire::millis(s.latency.p99)),
        workers,
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn metrics(Shared(state): Shared<Arc<State>>) -> Response {
    let text = state.metrics.render(&state.pools.all(), state.started.elapsed());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Reads a request body of at most `--max-body-bytes`.
async fn read_body(state: &State, body: Body) -> Result<Bytes, Failure> {
    axum::body::to_bytes(body, state.limits.max_body_bytes).await.map_err(|error| {
        let too_large = std::error::Error::source(&error).is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            Failure::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorKind::TooLarge,
                format!("the request body is larger than {} bytes, the most this server takes (--max-body-bytes)", state.limits.max_body_bytes),
            )
        } else {
            Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, format!("cannot read the request body: {error}"))
        }
    })
}

/// Whether the client asked for a stream (`Accept: application/x-ndjson`).
fn wants_stream(headers: &HeaderMap) -> bool {
    headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).any(|v| v.split(',').any(|t| t.trim().starts_with(NDJSON)))
}

/// Checks a request against the profile's rules: every command of the pipeline, and scripts.
fn check_policy(served: &Served, request: &InvokeRequest) -> Result<(), Refusal> {
    if request.script.is_some() {
        served.policy.check_script()?;
    }
    for name in request.command_names().into_iter().filter(|n| request.script.is_none() || *n != "<script>") {
        served.policy.check_command(name)?;
    }
    Ok(())
}

/// Runs a command: the whole [`InvocationResult`], or with `Accept: application/x-ndjson` one stream
/// item per line as produced and a last line `{"done": completion}` or `{"failed": error}`.
#[utoipa::path(post, path = "/v1/profiles/{profile}/invoke", request_body = InvokeRequest,
    params(("profile" = String, Path, description = "The profile's name")),
    responses(
        (status = 200, description = "The command ran (it may still have failed: judge the result); with Accept: application/x-ndjson, one line per stream item and a last {\"done\": ...} or {\"failed\": ...}"),
        (status = 400, body = ApiError), (status = 401, body = ApiError), (status = 403, description = "Not allowed: the rule that refused it", body = ApiError),
        (status = 404, body = ApiError), (status = 413, body = ApiError), (status = 429, body = ApiError),
        (status = 503, description = "No worker could be started and connected, or the server is stopping", body = ApiError),
        (status = 504, description = "The command timed out", body = ApiError)
    ))]
async fn invoke(
    Shared(state): Shared<Arc<State>>,
    Path(profile): Path<String>,
    Extension(audited): Extension<Arc<Audited>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Failure> {
    audited.note(|e| e.profile = Some(profile.clone()));
    let served = state.pools.served(&profile)?;
    let body = read_body(&state, body).await?;
    let request: InvokeRequest = serde_json::from_slice(&body)
        .map_err(|error| Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, format!("the request is not an invoke request: {error}")))?;
    audited.note(|e| {
        e.command = Some(request.command_names().join(" | "));
        e.parameters = request.parameter_names();
    });
    if let Err(refusal) = check_policy(&served, &request) {
        finished(&state, &profile, &audited, CommandStatus::Refused);
        return Err(refusal.into());
    }
    let command = request.to_command().map_err(|reason| Failure::new(StatusCode::BAD_REQUEST, ErrorKind::InvalidRequest, reason))?;
    let lease = state.pools.get(&profile).await.inspect_err(|_| audited.note(|e| e.outcome = "unavailable".to_owned()))?;
    if wants_stream(&headers) {
        return Ok(stream(state.clone(), profile, lease, command, audited));
    }
    match lease.invoke(command).await {
        Ok(result) => {
            let status = if result.succeeded() { CommandStatus::Succeeded } else { CommandStatus::Failed };
            finished(&state, &profile, &audited, status);
            Ok(Json::<InvocationResult>(result).into_response())
        }
        Err(error) => {
            finished(&state, &profile, &audited, CommandStatus::Error);
            let failure = bridge_failure(&error);
            if matches!(error, psbridge::Error::WorkersUnavailable { .. }) {
                lease.discard().await;
            }
            Err(failure)
        }
    }
}

/// Counts and audits a command's end.
fn finished(state: &State, profile: &str, audited: &Audited, status: CommandStatus) {
    state.metrics.command(profile, status, audited.started.elapsed());
    audited.note(|e| e.outcome = status.label().to_owned());
}

/// A body fed line by line from a task; the task sees the client go away as a failed send.
pub fn ndjson_body(lines: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(lines, |mut lines| async move { lines.recv().await.map(|line| (Ok::<_, Infallible>(line), lines)) });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(stream)).into_response()
}

/// One JSON line.
pub fn line(value: &impl serde::Serialize) -> Bytes {
    let mut bytes = serde_json::to_vec(value).unwrap_or_else(|error| {
        serde_json::to_vec(&StreamEnd::Failed(ApiError { error: ErrorKind::Unavailable, message: format!("cannot encode a line: {error}") })).unwrap_or_default()
    });
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Streams a command's items as NDJSON. Dropping the stream (the client went away) stops the command.
fn stream(state: Arc<State>, profile: String, lease: super::pools::Lease, command: psbridge::Command, audited: Arc<Audited>) -> Response {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut errors_seen = false;
        let end = match lease.invoke_stream(command).await {
            Err(error) => Err(error),
            Ok(mut items) => loop {
                match items.next_item().await {
                    Ok(Some(item)) => {
                        errors_seen |= matches!(item, StreamItem::Error(_));
                        if tx.send(line(&item)).await.is_err() {
                            // The client went away: dropping the stream stops the command.
                            finished(&state, &profile, &audited, CommandStatus::Error);
                            audited.note(|e| e.outcome = "disconnected".to_owned());
                            return;
                        }
                    }
                    Ok(None) => break Ok(items.completion().expect("the stream ended")),
                    Err(error) => break Err(error),
                }
            },
        };
        let last = match end {
            Ok(completion) => {
                let status = if !errors_seen && completion.ended_well() { CommandStatus::Succeeded } else { CommandStatus::Failed };
                finished(&state, &profile, &audited, status);
                StreamEnd::Done(completion)
            }
            Err(error) => {
                finished(&state, &profile, &audited, CommandStatus::Error);
                let failure = bridge_failure(&error);
                if matches!(error, psbridge::Error::WorkersUnavailable { .. }) {
                    lease.discard().await;
                }
                StreamEnd::Failed(failure.1)
            }
        };
        let _ = tx.send(line(&last)).await;
    });
    ndjson_body(rx)
}
