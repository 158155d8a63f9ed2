//! The client of `psbridge serve`, for `run --server`, `batch --server` and `server status`: one HTTP/1.1
//! connection per request over a unix socket or TCP, a bearer token when one is given, and responses
//! read whole or line by line (NDJSON).
//!
//! A server that cannot be reached, or goes away during a request, is [`CliError::ServerGone`] (exit
//! status 3) naming the address and how to start a server there; an error the server answers is
//! [`CliError::Server`], whose kind decides the exit status.

use bytes::{Buf, Bytes, BytesMut};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use psbridge::SecretString;
use secrecy::ExposeSecret;
use tokio::task::JoinHandle;

use crate::config::{Config, SecretSpec};
use crate::exit::CliError;
use crate::secret::SecretReader;
use crate::serve::address::{Address, SERVER_ENV};
use crate::serve::wire::{ApiError, ErrorKind, NDJSON, ServerStatus};

/// The options of a client subcommand (`run`, `batch`): where the server is and how to prove who we are.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Run on this psbridge server instead of starting workers here: unix:PATH or tcp:HOST:PORT (see
    /// `psbridge serve`). Output and exit statuses are those of the local command.
    #[arg(long, value_name = "ADDR", env = SERVER_ENV)]
    pub server: Option<Address>,

    /// Where the bearer token for a tcp: server comes from: env:VARIABLE, file:PATH or stdin
    /// [default: the profile's server_token].
    #[arg(long = "token-from", value_name = "SOURCE", value_parser = crate::serve::auth::parse_token_source, requires = "server")]
    pub token_from: Option<SecretSpec>,
}

/// A connection to a server: its address and the token to send.
pub struct Client {
    address: Address,
    token: Option<SecretString>,
}

impl Client {
    /// A client of `address`; the token comes from `--token-from`, else the profile's `server_token`
    /// (read now: a missing variable or file is a usage error).
    pub fn new(address: Address, token_from: Option<&SecretSpec>, config: &Config, profile: Option<&str>, secrets: &mut SecretReader) -> Result<Client, CliError> {
        let from_profile = profile.and_then(|name| config.file.profiles.get(name)).and_then(|p| p.get_ref().server_token.as_ref()).map(|t| t.get_ref());
        let token = match token_from.or(from_profile) {
            Some(source) => Some(secrets.read("the server token", source).map_err(crate::profile::ProfileError::from)?),
            None => None,
        };
        Ok(Client { address, token })
    }

    /// The server's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The server is not there, or went away.
    fn gone(&self, what: impl std::fmt::Display) -> CliError {
        CliError::ServerGone(format!(
            "the psbridge server at {} {what}; is it running? Start one with `{}`",
            self.address,
            self.address.how_to_serve()
        ))
    }

    /// Sends a request and returns the response once its head arrived; an error status becomes the
    /// server's [`ApiError`].
    pub async fn send(&self, method: Method, path: &str, body: Option<(Bytes, &str)>, accept: &str) -> Result<Response, CliError> {
        let (io, host) = match &self.address {
            #[cfg(unix)]
            Address::Unix(path) => match tokio::net::UnixStream::connect(path).await {
                Ok(stream) => (Io::Unix(TokioIo::new(stream)), "localhost".to_owned()),
                Err(error) => return Err(self.gone(format_args!("cannot be reached ({error})"))),
            },
            #[cfg(not(unix))]
            Address::Unix(_) => return Err(CliError::usage("unix sockets are not available on this system; use tcp:HOST:PORT")),
            Address::Tcp { host, port } => match tokio::net::TcpStream::connect((host.as_str(), *port)).await {
                Ok(stream) => (Io::Tcp(TokioIo::new(stream)), format!("{host}:{port}")),
                Err(error) => return Err(self.gone(format_args!("cannot be reached ({error})"))),
            },
        };
        let (mut sender, connection) = match io {
            #[cfg(unix)]
            Io::Unix(io) => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| self.gone(format_args!("closed the connection ({e})")))?;
                (sender, tokio::spawn(async move { drop(connection.await) }))
            }
            Io::Tcp(io) => {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| self.gone(format_args!("closed the connection ({e})")))?;
                (sender, tokio::spawn(async move { drop(connection.await) }))
            }
        };
        let mut request = Request::builder().method(method).uri(path).header(header::HOST, host).header(header::ACCEPT, accept);
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose_secret()));
        }
        let body = match body {
            Some((body, content_type)) => {
                request = request.header(header::CONTENT_TYPE, content_type);
                body
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body)).map_err(|e| CliError::usage(format_args!("cannot make the request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|e| self.gone(format_args!("closed the connection ({e})")))?;
        let mut response = Response { status: response.status(), body: response.into_body(), buffer: BytesMut::new(), connection, ended: false };
        if !response.status.is_success() {
            return Err(self.api_error(&mut response).await);
        }
        Ok(response)
    }

    /// The error an error response holds.
    async fn api_error(&self, response: &mut Response) -> CliError {
        let status = response.status;
        match response.whole(self).await {
            Ok(body) => match serde_json::from_slice::<ApiError>(&body) {
                Ok(error) => CliError::Server(error),
                Err(_) => CliError::Server(ApiError {
                    error: if status == StatusCode::SERVICE_UNAVAILABLE { ErrorKind::Unavailable } else { ErrorKind::InvalidRequest },
                    message: format!("the server at {} answered {status}: {}", self.address, String::from_utf8_lossy(&body).trim()),
                }),
            },
            Err(error) => error,
        }
    }

    /// `GET path`, its JSON body.
    pub async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, CliError> {
        let mut response = self.send(Method::GET, path, None, "application/json").await?;
        let body = response.whole(self).await?;
        serde_json::from_slice(&body).map_err(|e| self.gone(format_args!("answered {path} with something that is not its JSON ({e})")))
    }

    /// The server's status (its profiles, workers, uptime).
    pub async fn status(&self) -> Result<ServerStatus, CliError> {
        self.get("/v1/status").await
    }

    /// The profile to use on the server: the one asked for, else the configuration's default, else the
    /// server's only profile.
    pub async fn profile(&self, asked: Option<&str>, config: &Config) -> Result<String, CliError> {
        if let Some(name) = config.chosen(asked) {
            return Ok(name.to_owned());
        }
        let served: Vec<String> = self.status().await?.profiles.into_iter().map(|p| p.profile).collect();
        match served.as_slice() {
            [only] => Ok(only.clone()),
            _ => Err(CliError::usage(format_args!("the server at {} serves several profiles ({}): give --profile NAME", self.address, served.join(", ")))),
        }
    }

    /// `POST path` with a body of `content_type`, answered as NDJSON.
    pub async fn post_stream(&self, path: &str, body: Bytes, content_type: &str) -> Result<Response, CliError> {
        self.send(Method::POST, path, Some((body, content_type)), NDJSON).await
    }
}

enum Io {
    #[cfg(unix)]
    Unix(TokioIo<tokio::net::UnixStream>),
    Tcp(TokioIo<tokio::net::TcpStream>),
}

/// A response being read. Dropping it closes the connection (the server then stops what it was doing
/// for this request).
pub struct Response {
    status: StatusCode,
    body: Incoming,
    buffer: BytesMut,
    connection: JoinHandle<()>,
    ended: bool,
}

impl Drop for Response {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Response {
    /// The whole body.
    pub async fn whole(&mut self, client: &Client) -> Result<Bytes, CliError> {
        let mut whole = std::mem::take(&mut self.buffer);
        while let Some(chunk) = self.chunk(client).await? {
            whole.extend_from_slice(&chunk);
        }
        Ok(whole.freeze())
    }

    async fn chunk(&mut self, client: &Client) -> Result<Option<Bytes>, CliError> {
        if self.ended {
            return Ok(None);
        }
        loop {
            match self.body.frame().await {
                None => {
                    self.ended = true;
                    return Ok(None);
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
                Some(Err(error)) => return Err(client.gone(format_args!("went away during the request ({error})"))),
            }
        }
    }

    /// The next line of an NDJSON body (without its line break); `None` at the end.
    ///
    /// # Cancel safety
    /// Cancel safe: a partial line stays buffered.
    pub async fn next_line(&mut self, client: &Client) -> Result<Option<Bytes>, CliError> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line = self.buffer.split_to(end + 1);
                let mut line = line.freeze();
                line.truncate(end);
                return Ok(Some(line));
            }
            match self.chunk(client).await? {
                Some(chunk) => self.buffer.extend_from_slice(chunk.chunk()),
                None if self.buffer.is_empty() => return Ok(None),
                None => return Err(client.gone("ended a line half-way")),
            }
        }
    }
}

/// `psbridge server`: look at a running server.
#[derive(Debug, clap::Subcommand)]
pub enum ServerCommand {
    /// Print the server's profiles, their workers (state, pid, memory) and the server's uptime.
    #[command(after_help = "Examples:\n  psbridge server status\n  psbridge server status --wait 120      # in CI, after starting the server\n  psbridge server status --server tcp:127.0.0.1:8655 --token-from env:PSBRIDGE_TOKEN\n  psbridge server status --json | jq .profiles")]
    Status(StatusArgs),
}

/// `psbridge server status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The server [default: PSBRIDGE_SERVER, else unix:$XDG_RUNTIME_DIR/psbridge.sock].
    #[arg(long, value_name = "ADDR", env = SERVER_ENV)]
    server: Option<Address>,

    /// Where the bearer token for a tcp: server comes from: env:VARIABLE, file:PATH or stdin.
    #[arg(long = "token-from", value_name = "SOURCE", value_parser = crate::serve::auth::parse_token_source)]
    token_from: Option<SecretSpec>,

    /// Wait up to this many seconds for the server to listen and be healthy (a CI step after starting
    /// one); exit status 3 if it does not.
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    wait: Option<std::time::Duration>,

    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `psbridge server ...`.
pub async fn run(command: ServerCommand, globals: crate::Globals) -> Result<(), CliError> {
    let ServerCommand::Status(args) = command;
    let config = Config::load(globals.config.as_deref())?;
    let address = args.server.clone().unwrap_or_else(Address::default_socket);
    let client = Client::new(address, args.token_from.as_ref(), &config, globals.profile_name()?, &mut SecretReader::default())?;
    let status = match args.wait {
        None => client.status().await?,
        Some(limit) => healthy_within(&client, limit).await?,
    };
    let text = if args.json {
        serde_json::to_string_pretty(&status).map_err(|e| CliError::Output(std::io::Error::other(e)))? + "\n"
    } else {
        status_text(&status, client.address())
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(CliError::output)
}

/// The status once the server listens and is healthy, trying again until `limit` has passed.
async fn healthy_within(client: &Client, limit: std::time::Duration) -> Result<ServerStatus, CliError> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let outcome = client.status().await;
        let last = match outcome {
            Ok(status) if status.healthy => return Ok(status),
            Ok(_) => CliError::ServerGone(format!(
                "the psbridge server at {} is not healthy after {} s: its workers are not connected (see its log)",
                client.address(),
                limit.as_secs_f64()
            )),
            Err(error @ CliError::ServerGone(_)) => error,
            Err(other) => return Err(other),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(last);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The status in words: one block per profile, one line per worker.
fn status_text(status: &ServerStatus, address: &Address) -> String {
    let mut text = format!(
        "psbridge {} at {address}: up {}, {}\n",
        status.version,
        humantime::format_duration(std::time::Duration::from_secs(status.uptime_secs as u64)),
        if status.healthy { "healthy" } else { "not healthy (starting or stopping)" }
    );
    for profile in &status.profiles {
        text += &format!(
            "profile {}: pool {}{}, {} requests under way, {} queued, {} commands ({} failed, {} retried, {} throttled), {} restarts, p50 {} ms, p99 {} ms\n",
            profile.profile,
            profile.state,
            if profile.eager { "" } else { " (lazy)" },
            profile.requests,
            profile.queued,
            profile.commands,
            profile.failures,
            profile.retries,
            profile.throttled,
            profile.restarts,
            profile.latency_p50_ms,
            profile.latency_p99_ms,
        );
        for worker in &profile.workers {
            let memory = worker.resident_bytes.map_or("?".to_owned(), |b| format!("{:.0} MB", b as f64 / 1e6));
            let pid = worker.pid.map_or("-".to_owned(), |p| p.to_string());
            let expires = worker.credentials_expire_at.as_deref().map_or(String::new(), |at| format!(", credentials expire {at}"));
            text += &format!("  worker {}: {}, pid {pid}, {memory}, {} commands{expires}\n", worker.id, worker.state, worker.commands);
        }
    }
    text
}
