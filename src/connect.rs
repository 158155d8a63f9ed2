//! How a worker connects: the command it runs once after set-up, made anew for every worker.
//!
//! Credentials change while a pool runs (a rotated secret file, a fresh access token from the cloud's
//! identity service), and a worker whose token expired is replaced, never connected again in place
//! (ExchangeOnlineManagement adds a second connection instead of replacing the first). So the connect
//! command is asked of a [`Connector`] each time a worker starts.

use std::fmt;
use std::time::SystemTime;

use futures_util::future::BoxFuture;

use crate::command::Command;

/// The error a [`Connector`] may fail with; its message must not contain a secret.
pub type ConnectorError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A connect command and what is known about how long it stays good.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The command that connects a new worker, for example `Connect-ExchangeOnline` with its secrets.
    pub command: Command,
    /// When the credentials it connects with expire (an access token's `exp`), if known. A pool
    /// replaces the worker before then (see
    /// [`PoolBuilder::refresh_margin`](crate::PoolBuilder::refresh_margin)).
    pub expires_at: Option<SystemTime>,
}

impl From<Command> for Connection {
    fn from(command: Command) -> Self {
        Connection { command, expires_at: None }
    }
}

/// Makes the connect command for each new worker, reading its credentials anew.
///
/// ```
/// use psbridge::{Command, Connection, Connector, ConnectorError, SecretString};
/// use futures_util::future::BoxFuture;
///
/// /// Reads the token from a file each time, so that a rotated file is picked up.
/// #[derive(Debug)]
/// struct TokenFile(std::path::PathBuf);
///
/// impl Connector for TokenFile {
///     fn connection(&self) -> BoxFuture<'_, Result<Connection, ConnectorError>> {
///         Box::pin(async move {
///             let token = SecretString::from(tokio::fs::read_to_string(&self.0).await?.trim().to_owned());
///             let command = Command::new("Connect-ExchangeOnline")
///                 .param("Organization", "contoso.onmicrosoft.com")
///                 .secret_param("AccessToken", token);
///             Ok(Connection::from(command))
///         })
///     }
/// }
/// let builder = psbridge::Runspace::builder().connect_with(TokenFile("/run/secrets/exo-token".into()));
/// # let _ = builder;
/// ```
pub trait Connector: fmt::Debug + Send + Sync + 'static {
    /// The connection for the next worker. Called once per worker start, just before it connects.
    fn connection(&self) -> BoxFuture<'_, Result<Connection, ConnectorError>>;
}

/// A connect command that never changes: what [`RunspaceBuilder::connect`](crate::RunspaceBuilder::connect) uses.
#[derive(Debug)]
pub(crate) struct Fixed(pub(crate) Command);

impl Connector for Fixed {
    fn connection(&self) -> BoxFuture<'_, Result<Connection, ConnectorError>> {
        Box::pin(std::future::ready(Ok(Connection::from(self.0.clone()))))
    }
}
