//! Ctrl-C and SIGTERM while a command runs: both mean "stop the command, disconnect, and go".

use crate::exit::Interrupt;

/// Listens for SIGINT and SIGTERM from the moment it is made (so that a signal sent during start-up is
/// not lost to the default handler).
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts listening. Fails only when the process cannot install signal handlers.
    pub fn new() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals { interrupt: signal(SignalKind::interrupt())?, terminate: signal(SignalKind::terminate())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next signal. Cancel safe.
    pub async fn recv(&mut self) -> Interrupt {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Interrupt::CtrlC,
                _ = self.terminate.recv() => Interrupt::Terminate,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Interrupt::CtrlC
        }
    }
}
