//! One stop signal for every task: SIGTERM or SIGINT flips it, tasks watch it.

use tokio::sync::watch;

/// Cheap-to-clone view of "has the relay been asked to stop?".
#[derive(Debug, Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// The side that asks everything to stop (signals, the demo, tests).
#[derive(Debug)]
pub struct ShutdownTrigger {
    sender: watch::Sender<bool>,
}

/// A linked trigger and listener.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger { sender }, Shutdown { receiver })
}

impl ShutdownTrigger {
    /// Asks every listener to stop; idempotent.
    pub fn trigger(&self) {
        self.sender.send_replace(true);
    }

    /// A new listener, for tasks started after the trigger was made.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown { receiver: self.sender.subscribe() }
    }
}

impl Shutdown {
    /// Whether stop was requested.
    pub fn is_triggered(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once stop is requested (immediately if it already was).
    pub async fn wait(&mut self) {
        // An error means the trigger is gone, which can only happen at exit.
        let _ = self.receiver.wait_for(|stop| *stop).await;
    }
}

/// Triggers `trigger` on the first SIGTERM or SIGINT.
pub fn on_signals(trigger: ShutdownTrigger) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "stop requested: no new claims, draining in-flight events");
        trigger.trigger();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_after_trigger_and_when_already_triggered() {
        let (trigger, mut shutdown) = channel();
        assert!(!shutdown.is_triggered());
        trigger.trigger();
        shutdown.wait().await;
        let mut late = trigger.subscribe();
        late.wait().await;
        assert!(late.is_triggered());
    }
}
