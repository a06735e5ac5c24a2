//! Liveness and readiness, as the HTTP endpoints and systemd see them.
//!
//! Liveness: the relay's main loop beat recently (it is not stuck).
//! Readiness: connected to Postgres, the broker answers, nothing fatal, and
//! the relay is not stuck behind an event it cannot publish (a blocked
//! replication stream), and no session failed on something only an operator
//! can fix (a missing privilege, table or publication) since work last
//! settled. While it waits for something at start-up,
//! `waiting_for` says what.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::systemd;

/// A beat older than this means the loop is stuck.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// Shared, cheap-to-clone health state.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    last_beat_ms: AtomicU64,
    last_watchdog_ms: AtomicU64,
    watchdog_every_ms: Option<u64>,
    postgres: AtomicBool,
    broker: AtomicBool,
    role: Mutex<&'static str>,
    failure: Mutex<Option<String>>,
    waiting_for: Mutex<Option<String>>,
    blocked: Mutex<Option<String>>,
    needs_operator: Mutex<Option<String>>,
}

/// What `/healthz` and `/readyz` return.
#[derive(Debug, Serialize)]
pub struct Report {
    /// "ok" or "fail".
    pub status: &'static str,
    /// Seconds since the main loop last beat.
    pub last_beat_seconds: f64,
    /// Connected to Postgres.
    pub postgres: bool,
    /// The broker answered its last probe.
    pub broker: bool,
    /// "starting", "standby" or "leader".
    pub role: &'static str,
    /// A fatal problem, if any.
    pub failure: Option<String>,
    /// What start-up waits for (e.g. the broker), if anything.
    pub waiting_for: Option<String>,
    /// Why publishing is stopped behind an event that cannot be published
    /// (a blocked replication stream under `failures.policy = "block"`).
    pub blocked: Option<String>,
    /// What the last session failed on when only an operator can fix it (a
    /// missing privilege, table or publication; `wal_level`): the relay
    /// retries meanwhile and clears this once it settles work again.
    pub needs_operator: Option<String>,
}

impl Health {
    /// Fresh state; reads systemd's `WATCHDOG_USEC` to pace watchdog pings.
    pub fn new() -> Health {
        let watchdog_every_ms = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|usec| (usec / 1000 / 2).max(1));
        Health {
            inner: Arc::new(Inner {
                started: Instant::now(),
                last_beat_ms: AtomicU64::new(0),
                last_watchdog_ms: AtomicU64::new(0),
                watchdog_every_ms,
                postgres: AtomicBool::new(false),
                broker: AtomicBool::new(false),
                role: Mutex::new("starting"),
                failure: Mutex::new(None),
                waiting_for: Mutex::new(None),
                blocked: Mutex::new(None),
                needs_operator: Mutex::new(None),
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// The main loop is alive; also pings systemd's watchdog when enabled.
    pub fn beat(&self) {
        let now = self.now_ms();
        self.inner.last_beat_ms.store(now, Ordering::Relaxed);
        if let Some(every) = self.inner.watchdog_every_ms {
            let last = self.inner.last_watchdog_ms.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= every {
                self.inner.last_watchdog_ms.store(now, Ordering::Relaxed);
                systemd::notify("WATCHDOG=1");
            }
        }
    }

    /// Records whether the relay holds a working Postgres connection.
    pub fn set_postgres(&self, up: bool) {
        self.inner.postgres.store(up, Ordering::Relaxed);
    }

    /// Records whether the broker answered.
    pub fn set_broker(&self, up: bool) {
        self.inner.broker.store(up, Ordering::Relaxed);
    }

    /// Records whether this relay publishes or stands by.
    pub fn set_role(&self, role: &'static str) {
        if let Ok(mut current) = self.inner.role.lock() {
            *current = role;
        }
    }

    /// Marks the relay failed (not ready) with a reason.
    pub fn fail(&self, reason: String) {
        if let Ok(mut failure) = self.inner.failure.lock() {
            *failure = Some(reason);
        }
    }

    /// What start-up is waiting for (`None` once it stopped waiting).
    pub fn set_waiting(&self, what: Option<String>) {
        if let Ok(mut current) = self.inner.waiting_for.lock() {
            *current = what;
        }
    }

    /// The relay cannot move on: its stream stopped at an event that fails
    /// (`Some(why)`: name the event and the error), or moves again (`None`).
    /// Readiness fails meanwhile and says why; the change is logged once.
    pub fn set_blocked(&self, why: Option<String>) {
        let Ok(mut current) = self.inner.blocked.lock() else { return };
        if *current == why {
            return;
        }
        match &why {
            Some(reason) => {
                tracing::warn!(reason = %reason, "publishing is blocked: readiness fails until the event is published")
            }
            None => tracing::info!("no longer blocked: publishing moves again"),
        }
        *current = why;
    }

    /// A session failed on something only an operator can fix (`Some`), or
    /// the relay has settled work since (`None`). Readiness fails meanwhile.
    pub fn set_needs_operator(&self, why: Option<String>) {
        if let Ok(mut current) = self.inner.needs_operator.lock() {
            if current.is_some() && why.is_none() {
                tracing::info!("the problem that needed an operator is gone: the relay settles events again");
            }
            *current = why;
        }
    }

    fn report(&self, ok: bool) -> Report {
        let last_beat = self.inner.last_beat_ms.load(Ordering::Relaxed);
        Report {
            status: if ok { "ok" } else { "fail" },
            last_beat_seconds: self.now_ms().saturating_sub(last_beat) as f64 / 1000.0,
            postgres: self.inner.postgres.load(Ordering::Relaxed),
            broker: self.inner.broker.load(Ordering::Relaxed),
            role: self.inner.role.lock().map(|r| *r).unwrap_or("unknown"),
            failure: self.inner.failure.lock().ok().and_then(|f| f.clone()),
            waiting_for: self.inner.waiting_for.lock().ok().and_then(|f| f.clone()),
            blocked: self.inner.blocked.lock().ok().and_then(|f| f.clone()),
            needs_operator: self.inner.needs_operator.lock().ok().and_then(|f| f.clone()),
        }
    }

    /// Alive: the loop beat within the last minute.
    pub fn liveness(&self) -> Report {
        let last_beat = self.inner.last_beat_ms.load(Ordering::Relaxed);
        let fresh = self.now_ms().saturating_sub(last_beat) < STALE_AFTER.as_millis() as u64;
        self.report(fresh)
    }

    /// Ready: Postgres connected, broker reachable, no failure, not
    /// blocked, nothing waiting for an operator.
    pub fn readiness(&self) -> Report {
        let failed = self.inner.failure.lock().map(|f| f.is_some()).unwrap_or(true)
            || self.inner.blocked.lock().map(|b| b.is_some()).unwrap_or(true)
            || self.inner.needs_operator.lock().map(|b| b.is_some()).unwrap_or(true);
        let ok = self.inner.postgres.load(Ordering::Relaxed) && self.inner.broker.load(Ordering::Relaxed) && !failed;
        self.report(ok)
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_postgres_and_broker_and_no_failure() {
        let health = Health::new();
        health.beat();
        assert_eq!(health.liveness().status, "ok");
        assert_eq!(health.readiness().status, "fail");
        health.set_postgres(true);
        health.set_broker(true);
        assert_eq!(health.readiness().status, "ok");
        health.set_broker(false);
        assert_eq!(health.readiness().status, "fail");
        health.set_broker(true);
        health.fail("bad".into());
        let report = health.readiness();
        assert_eq!((report.status, report.failure.as_deref()), ("fail", Some("bad")));
    }

    #[test]
    fn a_blocked_stream_is_not_ready_and_says_why() {
        let health = Health::new();
        health.set_postgres(true);
        health.set_broker(true);
        health.set_blocked(Some("event at LSN 0/16B3748 fails: topic missing".into()));
        let report = health.readiness();
        assert_eq!(report.status, "fail");
        assert!(report.blocked.as_deref().is_some_and(|b| b.contains("0/16B3748")));
        health.set_blocked(None);
        assert_eq!(health.readiness().status, "ok");
    }

    #[test]
    fn a_problem_only_an_operator_can_fix_is_not_ready_until_work_settles_again() {
        let health = Health::new();
        health.set_postgres(true);
        health.set_broker(true);
        health.set_needs_operator(Some("permission denied for table events".into()));
        let report = health.readiness();
        assert_eq!(report.status, "fail");
        assert!(report.needs_operator.as_deref().is_some_and(|b| b.contains("permission denied")));
        health.set_needs_operator(None);
        assert_eq!(health.readiness().status, "ok");
    }
}
