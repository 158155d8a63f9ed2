//! The server's life: the signals it obeys (SIGTERM and Ctrl-C stop it, SIGHUP reloads the
//! configuration), what it tells systemd (`READY=1` once healthy, `STOPPING=1` when it begins to stop),
//! and the shutdown that every part of the server watches.

use tokio_util::sync::CancellationToken;

use crate::exit::Interrupt;

/// What the server was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGTERM or Ctrl-C: stop.
    Stop(Interrupt),
    /// SIGHUP: read the configuration again.
    Reload,
}

/// The server's signals, listened for from the moment this is made.
pub struct ServerSignals {
    stop: crate::signals::Signals,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl ServerSignals {
    /// Starts listening. Fails only when the process cannot install signal handlers.
    pub fn new() -> std::io::Result<ServerSignals> {
        Ok(ServerSignals {
            stop: crate::signals::Signals::new()?,
            #[cfg(unix)]
            hangup: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?,
        })
    }

    /// The next event. Cancel safe.
    pub async fn recv(&mut self) -> Event {
        #[cfg(unix)]
        {
            tokio::select! {
                signal = self.stop.recv() => Event::Stop(signal),
                _ = self.hangup.recv() => Event::Reload,
            }
        }
        #[cfg(not(unix))]
        Event::Stop(self.stop.recv().await)
    }
}

/// The server-wide shutdown: cancelled once when the server begins to stop.
pub type Shutdown = CancellationToken;

/// Tells systemd (when it started the server with `Type=notify`) that the server is ready.
pub fn notify_ready() {
    notify(&[sd_notify::NotifyState::Ready], "READY=1");
}

/// Tells systemd that the server is stopping.
pub fn notify_stopping() {
    notify(&[sd_notify::NotifyState::Stopping], "STOPPING=1");
}

fn notify(state: &[sd_notify::NotifyState], what: &str) {
    // Without NOTIFY_SOCKET (not under systemd) this does nothing.
    if let Err(error) = sd_notify::notify(state) {
        tracing::warn!(%error, "cannot tell systemd {what}");
    }
}
