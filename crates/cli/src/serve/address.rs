//! Where a server listens and a client connects: `unix:PATH` or `tcp:HOST:PORT`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The environment variable `run --server` and `batch --server` read when `--server` is not given.
pub const SERVER_ENV: &str = "PSBRIDGE_SERVER";

/// A server's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket.
    Unix(PathBuf),
    /// A TCP host (name, IPv4, or IPv6 in brackets) and port.
    Tcp { host: String, port: u16 },
}

impl FromStr for Address {
    type Err = String;

    fn from_str(text: &str) -> Result<Address, String> {
        let usage = || format!("{text:?} is not a server address: give unix:PATH or tcp:HOST:PORT (tcp:127.0.0.1:8655)");
        if let Some(path) = text.strip_prefix("unix:") {
            return if path.is_empty() { Err(usage()) } else { Ok(Address::Unix(PathBuf::from(path))) };
        }
        let rest = text.strip_prefix("tcp:").ok_or_else(usage)?;
        let (host, port) = rest.rsplit_once(':').ok_or_else(usage)?;
        let port: u16 = port.parse().map_err(|_| usage())?;
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return Err(usage());
        }
        Ok(Address::Tcp { host: host.to_owned(), port })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

impl Address {
    /// The default: `$XDG_RUNTIME_DIR/psbridge.sock`, else `psbridge.sock` in a private folder of this
    /// user's under the temporary directory (`/tmp/psbridge-1000/psbridge.sock`).
    pub fn default_socket() -> Address {
        Address::Unix(match dirs::runtime_dir() {
            Some(dir) => dir.join("psbridge.sock"),
            None => private_folder().join("psbridge.sock"),
        })
    }

    /// For messages: how to start a server listening here.
    pub fn how_to_serve(&self) -> String {
        match self {
            Address::Unix(path) if Address::Unix(path.clone()) == Address::default_socket() => "psbridge serve --profile NAME".to_owned(),
            other => format!("psbridge serve --profile NAME --listen {other}"),
        }
    }
}

/// `<temp>/psbridge-<uid>`: the folder of the default socket when there is no runtime folder.
pub fn private_folder() -> PathBuf {
    std::env::temp_dir().join(format!("psbridge-{}", uid()))
}

/// Whether `path` is in [`private_folder`].
pub fn in_private_folder(path: &Path) -> bool {
    path.parent() == Some(private_folder().as_path())
}

fn uid() -> u32 {
    #[cfg(unix)]
    {
        nix::unistd::getuid().as_raw()
    }
    #[cfg(not(unix))]
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_print_alike() {
        for text in ["unix:/run/user/1000/psbridge.sock", "tcp:127.0.0.1:8655", "tcp:[::1]:8655", "tcp:ci-runner:80"] {
            assert_eq!(text.parse::<Address>().unwrap().to_string(), text);
        }
        for bad in ["", "unix:", "tcp:127.0.0.1", "tcp::80", "tcp:h:99999", "http://x", "/tmp/s.sock"] {
            let error = bad.parse::<Address>().unwrap_err();
            assert!(error.contains("unix:PATH or tcp:HOST:PORT"), "{bad}: {error}");
        }
    }
}
