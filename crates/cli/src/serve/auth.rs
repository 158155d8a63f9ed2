//! Who may reach the server. On a unix socket: the peer's uid (SO_PEERCRED) must be the server's own,
//! or a member of the `--allow-group`. On TCP: a bearer token equal to one read from a `--token-from`
//! source, compared in constant time (over SHA-256 digests, so that not even the length shows). The
//! client's name for the audit is its uid or the token's source, never the token.

use axum::http::HeaderMap;
use psbridge::SecretString;
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::listen::Peer;
use crate::config::SecretSpec;
use crate::secret::{self, SecretError, SecretReader};

/// A request's client, once let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// For the audit and the per-client limit: `uid 1000`, or `token env PSBRIDGE_TOKEN`.
    pub name: String,
    /// The peer's uid (unix sockets).
    pub uid: Option<u32>,
}

/// Why a request was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this server needs a bearer token (Authorization: Bearer ...): give --token-from, or server_token in the profile")]
    NoToken,
    #[error("the bearer token is not one this server accepts")]
    WrongToken,
    #[error("uid {uid} may not use this server: only uid {owner}{}", group.as_ref().map_or(String::new(), |g| format!(" and members of group {g}")))]
    Foreign { uid: u32, owner: u32, group: Option<String> },
    #[error("the peer's credentials could not be read")]
    Unknown,
}

/// A token the server accepts: where it came from, and its digest.
struct Token {
    label: String,
    digest: [u8; 32],
}

/// The server's admission rules.
pub struct Access {
    owner: u32,
    group: Option<(String, u32)>,
    tokens: Vec<Token>,
}

/// Parses `--token-from`: `env:VARIABLE`, `file:PATH` (private, as secret files are) or `stdin`.
pub fn parse_token_source(text: &str) -> Result<SecretSpec, String> {
    let spec = if let Some(variable) = text.strip_prefix("env:").filter(|v| !v.is_empty()) {
        SecretSpec { env: Some(variable.to_owned()), ..SecretSpec::default() }
    } else if let Some(path) = text.strip_prefix("file:").filter(|p| !p.is_empty()) {
        SecretSpec { file: Some(path.into()), ..SecretSpec::default() }
    } else if text == "stdin" {
        SecretSpec { stdin: Some(true), ..SecretSpec::default() }
    } else {
        // Not echoed: it may be the token itself, given by mistake.
        return Err("not a token source: give env:VARIABLE, file:PATH or stdin (never the token itself)".to_owned());
    };
    Ok(spec)
}

fn digest(token: &SecretString) -> [u8; 32] {
    Sha256::digest(token.expose_secret().as_bytes()).into()
}

impl Access {
    /// The rules: the server's own uid, `group` (a group name) if given, and the tokens read now from
    /// `sources`.
    pub fn new(group: Option<&str>, sources: &[SecretSpec], secrets: &mut SecretReader) -> Result<Access, String> {
        let group = match group {
            None => None,
            Some(name) => Some((name.to_owned(), group_id(name)?)),
        };
        let mut tokens = Vec::new();
        for source in sources {
            let token = secrets.read("--token-from", source).map_err(|e: SecretError| e.to_string())?;
            tokens.push(Token { label: format!("token {}", secret::describe(source)), digest: digest(&token) });
        }
        Ok(Access { owner: own_uid(), group, tokens })
    }

    /// The group whose members may connect besides the server's user, by id.
    pub fn group(&self) -> Option<u32> {
        self.group.as_ref().map(|(_, gid)| *gid)
    }

    /// Whether any token is configured.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Lets the request in, or says why not. A TCP peer needs a token; a unix peer its uid.
    pub fn admit(&self, peer: &Peer, headers: &HeaderMap) -> Result<Client, Denied> {
        match *peer {
            Peer::Unix { uid: Some(uid), gid, .. } => {
                if uid == self.owner || self.group.as_ref().is_some_and(|(_, group)| is_member(uid, gid, *group)) {
                    Ok(Client { name: format!("uid {uid}"), uid: Some(uid) })
                } else {
                    Err(Denied::Foreign { uid, owner: self.owner, group: self.group.as_ref().map(|(name, _)| name.clone()) })
                }
            }
            Peer::Unix { uid: None, .. } => Err(Denied::Unknown),
            Peer::Tcp(_) => {
                let given = bearer(headers).ok_or(Denied::NoToken)?;
                let given = digest(&SecretString::from(given.to_owned()));
                // Every token is compared, so that which one matched does not show in the time taken.
                let mut matched = None;
                for token in &self.tokens {
                    if bool::from(token.digest.ct_eq(&given)) {
                        matched = Some(token.label.clone());
                    }
                }
                matched.map(|name| Client { name, uid: None }).ok_or(Denied::WrongToken)
            }
        }
    }
}

/// The bearer token of an `Authorization` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(unix)]
fn own_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}

#[cfg(not(unix))]
fn own_uid() -> u32 {
    0
}

#[cfg(unix)]
fn group_id(name: &str) -> Result<u32, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("--allow-group {name}: no such group")),
        Err(error) => Err(format!("--allow-group {name}: {error}")),
    }
}

#[cfg(not(unix))]
fn group_id(name: &str) -> Result<u32, String> {
    Err(format!("--allow-group {name}: groups are for unix sockets"))
}

/// Whether `uid` (whose primary group is `gid`) is a member of `group`, as the group database says now.
#[cfg(unix)]
fn is_member(uid: u32, gid: Option<u32>, group: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    if gid == Some(group) {
        return true;
    }
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else { return false };
    user.gid == Gid::from_raw(group) || matches!(Group::from_gid(Gid::from_raw(group)), Ok(Some(g)) if g.mem.contains(&user.name))
}

#[cfg(not(unix))]
fn is_member(_uid: u32, _gid: Option<u32>, _group: u32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(tokens: &[&str]) -> Access {
        Access {
            owner: 1000,
            group: None,
            tokens: tokens.iter().map(|t| Token { label: format!("token {t}-label"), digest: digest(&SecretString::from((*t).to_owned())) }).collect(),
        }
    }

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn tcp_peers_need_a_known_token_and_are_named_by_its_source() {
        let rules = access(&["alpha", "beta"]);
        let tcp = Peer::Tcp("127.0.0.1:5000".parse().unwrap());
        assert_eq!(rules.admit(&tcp, &HeaderMap::new()), Err(Denied::NoToken));
        assert_eq!(rules.admit(&tcp, &with_auth("Bearer gamma")), Err(Denied::WrongToken));
        assert_eq!(rules.admit(&tcp, &with_auth("Bearer alph")), Err(Denied::WrongToken));
        assert_eq!(rules.admit(&tcp, &with_auth("bearer beta")).unwrap().name, "token beta-label");
        assert_eq!(rules.admit(&tcp, &with_auth("Basic beta")), Err(Denied::NoToken));
    }

    #[test]
    fn unix_peers_are_let_in_by_uid() {
        let rules = access(&[]);
        let me = Peer::Unix { uid: Some(1000), gid: Some(1000), pid: Some(1) };
        assert_eq!(rules.admit(&me, &HeaderMap::new()).unwrap().name, "uid 1000");
        let other = Peer::Unix { uid: Some(1001), gid: Some(1001), pid: Some(1) };
        let denied = rules.admit(&other, &HeaderMap::new()).unwrap_err();
        assert!(denied.to_string().contains("uid 1001 may not use this server"), "{denied}");
    }

    #[test]
    fn token_sources_parse() {
        assert_eq!(parse_token_source("env:T").unwrap().env.as_deref(), Some("T"));
        assert!(parse_token_source("file:/run/t").unwrap().file.is_some());
        assert_eq!(parse_token_source("stdin").unwrap().stdin, Some(true));
        let error = parse_token_source("s3cret").unwrap_err();
        assert!(error.contains("env:VARIABLE") && !error.contains("s3cret"), "{error}");
    }
}
