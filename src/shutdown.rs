//! One stop signal for every task: SIGTERM or SIGINT flips it, tasks watch it.

use std::time::Duration;

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

/// How long past `shutdown.drain_timeout` a stopping relay may take (closing
/// connections, flushing the producer) before it is ended regardless.
pub const HARD_STOP_GRACE: Duration = Duration::from_secs(5);

/// Triggers `trigger` on the first SIGTERM or SIGINT; from then on the
/// process ends within `drain_timeout` + [`HARD_STOP_GRACE`] whatever its
/// connections are doing (a stuck socket must not keep a pod terminating
/// until SIGKILL), and at once on a second signal.
pub fn on_signals(trigger: ShutdownTrigger, drain_timeout: Duration) -> std::io::Result<()> {
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
        hard_stop_after(drain_timeout + HARD_STOP_GRACE, name);
        let again = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = again,
            "second stop signal: exiting now; events not yet marked published are published again later"
        );
        std::process::exit(EXIT_HARD_STOP);
    });
    Ok(())
}

/// Exit status when the hard deadline (or a second signal) ends the process.
pub const EXIT_HARD_STOP: i32 = 1;

/// Ends the process after `limit`, from an OS thread: it fires even if the
/// async runtime is wedged.
fn hard_stop_after(limit: Duration, signal: &'static str) {
    let spawned = std::thread::Builder::new().name("hard-stop".into()).spawn(move || {
        std::thread::sleep(limit);
        tracing::error!(
            signal,
            "the relay did not stop within {limit:?} (shutdown.drain_timeout + {HARD_STOP_GRACE:?}): exiting now; \
             events not yet marked published are published again by the next relay"
        );
        std::process::exit(EXIT_HARD_STOP);
    });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the hard-stop timer; the relay stops when its drain finishes");
    }
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
        let mut clone = shutdown.clone();
        clone.wait().await;
        assert!(clone.is_triggered());
    }
}
