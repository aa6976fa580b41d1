//! Process signals: the one way every command installs handlers and waits.
//!
//! SIGTERM and SIGINT always mean "stop": drain what is in flight and exit
//! 0. Commands that do more ask for more: the proxy and the coordinator
//! reload on SIGHUP.

use std::future::pending;
use tokio::signal::unix::{Signal as Handler, SignalKind, signal};

/// A signal a command acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: stop.
    Stop,
    /// SIGHUP: reload.
    Reload,
    /// SIGUSR2: upgrade to the binary at the same path (the proxy).
    Upgrade,
}

/// A handler could not be installed (a runtime failure: exit 2).
#[derive(Debug, thiserror::Error)]
#[error("cannot install signal handlers: {0}")]
pub struct SignalError(#[from] std::io::Error);

/// Installed handlers.
pub struct Signals {
    term: Handler,
    int: Handler,
    hup: Option<Handler>,
    usr2: Option<Handler>,
}

impl Signals {
    /// Handlers for SIGTERM and SIGINT.
    ///
    /// Install them before announcing readiness: a signal that arrives before
    /// its handler would take its default action and kill the process.
    pub fn stop() -> Result<Signals, SignalError> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: None,
            usr2: None,
        })
    }

    /// Handlers for SIGTERM and SIGINT, and SIGHUP as a reload.
    pub fn stop_and_reload() -> Result<Signals, SignalError> {
        let mut s = Signals::stop()?;
        s.hup = Some(signal(SignalKind::hangup())?);
        Ok(s)
    }

    /// The proxy's: SIGTERM and SIGINT, SIGHUP as a reload, SIGUSR2 as an upgrade.
    pub fn proxy() -> Result<Signals, SignalError> {
        let mut s = Signals::stop_and_reload()?;
        s.usr2 = Some(signal(SignalKind::user_defined2())?);
        Ok(s)
    }

    /// The next signal.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = installed(self.hup.as_mut()) => Signal::Reload,
            _ = installed(self.usr2.as_mut()) => Signal::Upgrade,
        }
    }

    /// Wait for SIGTERM or SIGINT.
    pub async fn stopped(&mut self) {
        while self.recv().await != Signal::Stop {}
    }
}

/// The next delivery of `handler`'s signal; never, for one not installed.
async fn installed(handler: Option<&mut Handler>) {
    match handler {
        Some(h) => {
            h.recv().await;
        }
        None => pending().await,
    }
}
