//! What the relay reports about its own work. Each event writes its log
//! line and moves its metric in one place, so an operator's log and
//! dashboard cannot disagree (the idea of Vector's internal events). Code
//! that does the work emits the event; it never logs or counts it itself.

use std::time::Duration;

use tracing::{error, warn};

use crate::failure::{DeadLetter, FailureKind};
use crate::metrics::Metrics;

/// Something the relay did or suffered, reported once.
pub(crate) trait InternalEvent {
    /// Writes the log line and moves the metric.
    fn emit(self, metrics: &Metrics);
}

/// A session ended in an error and the relay retries after `retry_in`.
pub(crate) struct SessionFailed<'a> {
    /// Why, worded for operators.
    pub(crate) error: &'a dyn std::fmt::Display,
    /// Only an operator can end it (a privilege, table, publication,
    /// password or server setting): logged as an error, while passing
    /// failures (a restart, a lost connection) are warnings.
    pub(crate) needs_operator: bool,
    /// Until the next session.
    pub(crate) retry_in: Duration,
}

impl InternalEvent for SessionFailed<'_> {
    fn emit(self, metrics: &Metrics) {
        let cause = if self.needs_operator { "needs_operator" } else { "transient" };
        metrics.session_failures.with_label_values(&[cause]).inc();
        let (error, retry_in) = (self.error, self.retry_in);
        if self.needs_operator {
            error!(%error, retry_in = ?retry_in, "relay session failed on something only an operator can fix; retrying until it is fixed");
        } else {
            warn!(%error, retry_in = ?retry_in, "relay session failed; reconnecting");
        }
    }
}

/// A batch went to the publish stage.
pub(crate) struct BatchSent {
    /// Events in it.
    pub(crate) events: usize,
}

impl InternalEvent for BatchSent {
    fn emit(self, metrics: &Metrics) {
        metrics.batches.inc();
        metrics.batch_size.observe(self.events as f64);
        metrics.events_in_flight.add(self.events as i64);
    }
}

/// The broker (or the envelope) refused one event; what happens next
/// (retry, dead letter, a stopped stream) is its own event.
pub(crate) struct EventFailed {
    /// Why, as the failure vocabulary names it.
    pub(crate) kind: FailureKind,
}

impl InternalEvent for EventFailed {
    fn emit(self, metrics: &Metrics) {
        metrics.publish_failures.with_label_values(&[self.kind.label()]).inc();
        tracing::debug!(reason = self.kind.label(), "event not acknowledged");
    }
}

/// A failed event stays unpublished and is tried again after `retry_in`.
pub(crate) struct EventRetried<'a> {
    /// Its position in the outbox.
    pub(crate) position: i64,
    /// Its aggregate, when `failures.policy = "block"` holds that aggregate back.
    pub(crate) holds_back: Option<&'a str>,
    /// Why it failed.
    pub(crate) reason: &'a str,
    /// Until the next attempt.
    pub(crate) retry_in: Duration,
}

impl InternalEvent for EventRetried<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.retries.inc();
        let (position, reason, retry_in) = (self.position, self.reason, self.retry_in);
        match self.holds_back {
            Some(aggregate_id) => error!(
                position,
                aggregate_id,
                reason,
                retry_in = ?retry_in,
                "event not published; it stays unpublished and will be retried, and its aggregate's later events wait for it \
                 (fix the row, or set failures.policy = \"dead_letter\" to move on)"
            ),
            None => error!(
                position,
                reason,
                retry_in = ?retry_in,
                "event not published; the row stays unpublished and will be retried"
            ),
        }
    }
}

/// An event went to the dead-letter topic and is not retried.
pub(crate) struct EventDeadLettered<'a> {
    /// The letter as published.
    pub(crate) letter: &'a DeadLetter,
    /// The dead-letter topic.
    pub(crate) topic: &'a str,
}

impl InternalEvent for EventDeadLettered<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.dead_lettered.inc();
        let letter = self.letter;
        error!(
            position = letter.position,
            aggregate_id = letter.aggregate_id.as_deref().unwrap_or(""),
            reason = %letter.error,
            topic = %self.topic,
            "event dead-lettered: published to the dead-letter topic and not retried (re-drive it with `outbox-relay replay --dead-lettered`)"
        );
    }
}

/// The dead-letter topic refused a letter: the event stays unpublished and
/// is retried, and counts as one more retry.
pub(crate) struct DeadLetterRefused<'a> {
    /// The letter that was refused.
    pub(crate) letter: &'a DeadLetter,
    /// The dead-letter topic.
    pub(crate) topic: &'a str,
    /// The refusal.
    pub(crate) error: &'a str,
}

impl InternalEvent for DeadLetterRefused<'_> {
    fn emit(self, metrics: &Metrics) {
        metrics.publish_failures.with_label_values(&["dead_letter"]).inc();
        error!(
            position = self.letter.position,
            reason = %self.letter.error,
            topic = %self.topic,
            dead_letter_error = %self.error,
            "publishing to the dead-letter topic failed; the event stays unpublished and will be retried"
        );
    }
}
