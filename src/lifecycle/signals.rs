//! OS signals, turned into lifecycle events. Handlers are registered once, at
//! start-up, before any socket is bound, so a SIGTERM that arrives during
//! start-up is never lost (or, worse, fatal).
//!
//! The lifecycle only sees [`Event`]s from a channel: tests and the admin
//! server drive it the same way a signal does.

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::drain::Event;

pub struct OsSignals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl OsSignals {
    pub fn register() -> std::io::Result<Self> {
        Ok(OsSignals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Event::Stop("SIGINT"),
            _ = self.hangup.recv() => Event::Reload,
        }
    }

    /// Forwards signals until the lifecycle stops listening. Owned by
    /// `lifecycle::run`, which aborts it on the way out.
    pub async fn forward(mut self, events: mpsc::Sender<Event>) {
        loop {
            let event = self.next().await;
            if events.send(event).await.is_err() {
                return;
            }
        }
    }
}
