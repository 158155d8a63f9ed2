//! The audit trail: one JSON line per request (time, client, profile, command, parameter names, status,
//! duration), on stdout or appended to a file created 0600. Parameter values are never written: not
//! those of secret parameters, and not the others either (they may hold personal data).

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

/// One audited request.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the request ended, RFC 3339 UTC.
    pub time: String,
    /// The peer's uid (`uid 1000`) or the token's source (`token env PSBRIDGE_TOKEN`); `null` when the
    /// request was not let in far enough to know.
    pub client: Option<String>,
    /// The request's method and path.
    pub request: String,
    /// The profile asked for, if any.
    pub profile: Option<String>,
    /// The command (`<script>` for a script; the commands of a pipeline joined with ` | `), if any.
    pub command: Option<String>,
    /// The parameters' names, never their values.
    pub parameters: Vec<String>,
    /// The HTTP status answered.
    pub status: u16,
    /// What the request came to: `succeeded`, `failed`, `refused`, `unauthorized`, ...
    pub outcome: String,
    /// From the request's arrival to its end, in milliseconds.
    pub duration_ms: f64,
}

/// Where audit lines go.
pub struct Audit {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Audit {
    /// Audit to `path` (appended, created 0600), else to stdout.
    pub fn open(path: Option<&Path>) -> Result<Audit, String> {
        let out: Box<dyn Write + Send> = match path {
            None => Box::new(io::stdout()),
            Some(path) => {
                let mut options = std::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let file: File = options.open(path).map_err(|e| format!("cannot open the audit file {}: {e}", path.display()))?;
                Box::new(file)
            }
        };
        Ok(Audit { out: Mutex::new(out) })
    }

    /// Writes one line (whole: one write per line, under a lock). A failure is logged, never fatal.
    pub fn write(&self, entry: &Entry) {
        let mut line = match serde_json::to_vec(entry) {
            Ok(line) => line,
            Err(error) => return tracing::error!(%error, "cannot encode an audit line"),
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(%error, "cannot write an audit line");
        }
    }
}

/// Now, as RFC 3339 UTC with milliseconds (`2026-11-27T10:00:00.123Z`).
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
