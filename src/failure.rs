//! The failure vocabulary every layer shares: where a row failed
//! ([`FailureKind`]), the failed row itself ([`FailedRow`]), and dead
//! letters.
//!
//! Dead letters (`failures.policy = "dead_letter"`): an event that failed
//! permanently, or transiently `failures.max_attempts` times, is published
//! to the dead-letter topic with the reason, and only once the broker
//! acknowledged that message is the row treated as done.
//!
//! Message: key = the aggregate id if known, else the position as text;
//! value = JSON `{"position","event_id","aggregate_type","aggregate_id",
//! "event_type","error","failed_at","payload"}` where `payload` is the raw
//! payload text as a JSON string (it may not be valid JSON); headers
//! `error` and `source_table`.

use std::borrow::Cow;

use crate::config::FailuresConfig;
use crate::event::{OutboxEvent, RawRow, Rejected};
use crate::sink::{OutgoingMessage, PublishError, Sink};

/// A row that was not published.
#[derive(Debug, Clone)]
pub struct FailedRow {
    /// Position and reason.
    pub row: Rejected,
    /// Where it failed, which also says whether retrying can help.
    pub kind: FailureKind,
    /// The event as the dead-letter topic should see it, when the stage had
    /// it in hand (mapping and broker failures); rows rejected before that
    /// are read back from the table.
    pub letter: Option<Box<DeadLetter>>,
}

impl FailedRow {
    /// The aggregate whose later events must wait for this one.
    pub fn aggregate_id(&self) -> Option<&str> {
        self.letter.as_ref().and_then(|l| l.aggregate_id.as_deref()).or(self.row.aggregate_id.as_deref())
    }
}

/// Where a row failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The row cannot form a valid message (bad column, bad topic).
    Envelope,
    /// The broker refused it and a retry may succeed.
    BrokerTransient,
    /// The broker refused it for good (too large, not authorized...).
    BrokerPermanent,
    /// Too many aggregates are blocked to hold back one more: the session
    /// stops and retries (see [`crate::holdback::MAX_BLOCKED`]).
    TooManyBlocked,
}

impl FailureKind {
    /// Label value for `outbox_relay_publish_failures_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Envelope => "envelope",
            FailureKind::BrokerTransient => "broker_transient",
            FailureKind::BrokerPermanent => "broker_permanent",
            FailureKind::TooManyBlocked => "too_many_blocked",
        }
    }
}

/// What is known about a failed event (everything may be missing).
#[derive(Debug, Clone, Default)]
pub struct DeadLetter {
    /// Row position (or LSN for logical messages).
    pub position: i64,
    /// Event id text, if known.
    pub event_id: Option<String>,
    /// Aggregate type, if known.
    pub aggregate_type: Option<String>,
    /// Aggregate id, if known (the message key).
    pub aggregate_id: Option<String>,
    /// Event type, if known.
    pub event_type: Option<String>,
    /// Raw payload text, if known.
    pub payload: Option<String>,
    /// Why it was dead-lettered.
    pub error: String,
}

impl DeadLetter {
    /// From a row read back from the outbox.
    pub fn from_row(row: &RawRow, error: &str) -> DeadLetter {
        DeadLetter {
            position: row.position,
            event_id: row.event_id.clone(),
            aggregate_type: row.aggregate_type.clone(),
            aggregate_id: row.aggregate_id.clone().filter(|a| !a.is_empty()),
            event_type: row.event_type.clone(),
            payload: row.payload.clone(),
            error: error.to_owned(),
        }
    }

    /// From a decoded event.
    pub fn from_event(event: &OutboxEvent, error: &str) -> DeadLetter {
        DeadLetter {
            position: event.position,
            event_id: Some(event.event_id.hyphenated().to_string()),
            aggregate_type: Some(event.aggregate_type.clone()),
            aggregate_id: Some(event.aggregate_id.clone()),
            event_type: Some(event.event_type.clone()),
            payload: Some(event.payload.get().to_owned()),
            error: error.to_owned(),
        }
    }

    /// Only the position and the reason.
    pub fn bare(position: i64, error: &str) -> DeadLetter {
        DeadLetter { position, error: error.to_owned(), ..DeadLetter::default() }
    }

    /// The message for the dead-letter topic.
    pub fn to_message(&self, topic: &str, source_table: &str) -> OutgoingMessage {
        let value = serde_json::json!({
            "position": self.position,
            "event_id": self.event_id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.event_type,
            "error": self.error,
            "failed_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "payload": self.payload,
        });
        OutgoingMessage {
            position: self.position,
            topic: topic.to_owned(),
            key: self.aggregate_id.clone().unwrap_or_else(|| self.position.to_string()),
            value: serde_json::to_vec(&value).expect("JSON values serialize"),
            headers: vec![
                (Cow::Borrowed("error"), self.error.as_bytes().to_vec()),
                (Cow::Borrowed("source_table"), source_table.as_bytes().to_vec()),
            ],
            timestamp_ms: None,
            tombstone: false,
        }
    }
}

/// Publishes dead letters through `sink` and waits for the broker's answers,
/// one per letter, in order.
pub async fn publish<S: Sink>(
    sink: &S,
    config: &FailuresConfig,
    source_table: &str,
    letters: &[DeadLetter],
) -> Vec<Result<(), PublishError>> {
    if letters.is_empty() {
        return Vec::new();
    }
    let messages = letters.iter().map(|l| l.to_message(&config.dead_letter_topic, source_table)).collect();
    let mut results = sink.enqueue(messages).await.await;
    // A letter the broker refuses for good (typically: the payload is what was
    // too large) goes again once without its payload, so the poison row
    // cannot block itself.
    let again: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(i, r)| matches!(r, Err(e) if e.permanent) && letters[*i].payload.is_some())
        .map(|(i, _)| i)
        .collect();
    if !again.is_empty() {
        let messages = again
            .iter()
            .map(|&i| {
                let first = results[i].as_ref().err().map(|e| e.reason.clone()).unwrap_or_default();
                let stripped = DeadLetter {
                    payload: None,
                    error: format!("{} (payload omitted from the dead letter: {first})", letters[i].error),
                    ..letters[i].clone()
                };
                stripped.to_message(&config.dead_letter_topic, source_table)
            })
            .collect();
        let retried = sink.enqueue(messages).await.await;
        for (i, result) in again.into_iter().zip(retried) {
            results[i] = result;
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_letter_without_aggregate_keys_by_position_and_keeps_invalid_payload_as_text() {
        let letter = DeadLetter {
            position: 17,
            payload: Some("{not json".into()),
            error: "payload is not valid JSON".into(),
            ..DeadLetter::default()
        };
        let message = letter.to_message("outbox.dead-letter", "public.outbox");
        assert_eq!(message.key, "17");
        let value: serde_json::Value = serde_json::from_slice(&message.value).unwrap();
        assert_eq!(value["payload"], "{not json");
        assert_eq!(value["position"], 17);
        assert_eq!(value["aggregate_id"], serde_json::Value::Null);
        assert!(value["failed_at"].as_str().unwrap().ends_with('Z'));
        assert_eq!(message.headers[1].1, b"public.outbox");
    }
}
