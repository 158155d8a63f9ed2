//! Listening: a unix socket created with mode 0600 (each connection's peer credentials read with
//! SO_PEERCRED), or a TCP port, loopback unless `--allow-remote`. Serving stops accepting when the
//! shutdown begins and ends once every connection is done.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio_util::sync::CancellationToken;

use super::address::{self, Address};

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A unix socket peer, as the kernel reports it (SO_PEERCRED).
    Unix { uid: Option<u32>, gid: Option<u32>, pid: Option<i32> },
    /// A TCP peer.
    Tcp(SocketAddr),
}

#[cfg(unix)]
impl Connected<IncomingStream<'_, tokio::net::UnixListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::UnixListener>) -> Peer {
        match stream.io().peer_cred() {
            Ok(cred) => Peer::Unix { uid: Some(cred.uid()), gid: Some(cred.gid()), pid: cred.pid() },
            Err(error) => {
                tracing::warn!(%error, "cannot read a unix peer's credentials; it will be refused");
                Peer::Unix { uid: None, gid: None, pid: None }
            }
        }
    }
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer::Tcp(*stream.remote_addr())
    }
}

/// Why the server cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {address}: {source}")]
    Bind {
        address: Address,
        #[source]
        source: std::io::Error,
    },
    #[error("another server is listening on {0} already; stop it, or give this one another --listen")]
    InUse(Address),
    #[error(
        "{0} is not a loopback address: clients from other machines could reach the server (and its connected \
         sessions) over the network; give --allow-remote if that is meant (a token is still required)"
    )]
    Remote(Address),
    #[cfg(not(unix))]
    #[error("{0}: unix sockets are not available on this system; use tcp:127.0.0.1:PORT")]
    NoUnixSockets(Address),
}

/// A bound listener.
pub enum Listener {
    #[cfg(unix)]
    Unix { listener: tokio::net::UnixListener, path: PathBuf },
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    /// Binds `address`: a unix socket is created with mode 0600, or 0660 and owned by `group` when its
    /// members may connect too (a stale socket file nobody listens on is replaced; the default socket's
    /// private folder is created 0700); a TCP address must be loopback unless `allow_remote`.
    pub async fn bind(address: &Address, allow_remote: bool, group: Option<u32>) -> Result<Listener, ListenError> {
        let bind_error = |source| ListenError::Bind { address: address.clone(), source };
        match address {
            #[cfg(unix)]
            Address::Unix(path) => {
                use std::os::unix::fs::PermissionsExt;
                if address::in_private_folder(path) {
                    private_dir(path.parent().expect("a socket in a folder")).map_err(bind_error)?;
                }
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(path).is_ok() {
                        return Err(ListenError::InUse(address.clone()));
                    }
                    std::fs::remove_file(path).map_err(bind_error)?;
                }
                let listener = tokio::net::UnixListener::bind(path).map_err(bind_error)?;
                // Before the first accept: a peer that connected in between is still checked by uid.
                let mode = match group {
                    Some(gid) => {
                        std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_error)?;
                        0o660
                    }
                    None => 0o600,
                };
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_error)?;
                Ok(Listener::Unix { listener, path: path.clone() })
            }
            #[cfg(not(unix))]
            Address::Unix(_) => Err(ListenError::NoUnixSockets(address.clone())),
            Address::Tcp { host, port } => {
                let _ = group; // a unix socket's matter
                let listener = tokio::net::TcpListener::bind((host.as_str(), *port)).await.map_err(bind_error)?;
                let local = listener.local_addr().map_err(bind_error)?;
                if !local.ip().is_loopback() && !allow_remote {
                    return Err(ListenError::Remote(address.clone()));
                }
                Ok(Listener::Tcp(listener))
            }
        }
    }

    /// What clients connect to (the port the system chose for `tcp:HOST:0` included).
    pub fn address(&self) -> Address {
        match self {
            #[cfg(unix)]
            Listener::Unix { path, .. } => Address::Unix(path.clone()),
            Listener::Tcp(listener) => match listener.local_addr() {
                Ok(local) => Address::Tcp { host: local.ip().to_string(), port: local.port() },
                Err(_) => Address::Tcp { host: "?".to_owned(), port: 0 },
            },
        }
    }

    /// Whether requests need a bearer token (TCP) rather than a peer check (unix).
    pub fn needs_token(&self) -> bool {
        matches!(self, Listener::Tcp(_))
    }

    /// Serves `router` until `stop` is cancelled, then finishes the requests under way and returns; a
    /// unix socket file is removed.
    pub async fn serve(self, router: Router, stop: CancellationToken) -> std::io::Result<()> {
        let stopped = async move { stop.cancelled().await };
        match self {
            #[cfg(unix)]
            Listener::Unix { listener, path } => {
                let _remove = RemoveOnDrop(path);
                axum::serve(listener, router.into_make_service_with_connect_info::<Peer>()).with_graceful_shutdown(stopped).await
            }
            Listener::Tcp(listener) => {
                axum::serve(listener, router.into_make_service_with_connect_info::<Peer>()).with_graceful_shutdown(stopped).await
            }
        }
    }
}

/// Creates `dir` readable by its owner only, or checks that it is so and ours.
#[cfg(unix)]
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => return Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(error),
    }
    let metadata = std::fs::symlink_metadata(dir)?;
    if !metadata.is_dir() || metadata.uid() != nix::unistd::getuid().as_raw() || metadata.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} is not a private folder of this user's (mode 0700); remove it or give another --listen", dir.display()),
        ));
    }
    Ok(())
}

/// Removes the socket file when serving ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
