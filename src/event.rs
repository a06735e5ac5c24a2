//! One captured outbox event, decoded and validated, independent of how it
//! was captured (polling the table, or logical replication from a slot).

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use uuid::Uuid;

/// An outbox row that is valid enough to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Publication order within the outbox; what the checkpoint marks.
    pub position: i64,
    /// Stable id consumers deduplicate on.
    pub event_id: Uuid,
    /// E.g. "Order"; feeds the topic template.
    pub aggregate_type: String,
    /// Message key: all events of one aggregate land on one partition, in order.
    pub aggregate_id: String,
    /// E.g. "OrderPlaced".
    pub event_type: String,
    /// Schema version of the payload for this event type.
    pub event_version: i32,
    /// The application's payload as the column held it: JSON kept as text
    /// (never re-serialized), or text / bytes that are not JSON.
    pub payload: Payload,
    /// Application headers, a JSON object.
    pub headers: Option<Box<RawValue>>,
    /// Who caused the event.
    pub actor: Option<String>,
    /// W3C trace context, passed through unchanged.
    pub traceparent: Option<String>,
    /// Per-row topic override.
    pub topic: Option<String>,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
}

/// An event's payload. Debezium carries any payload as is (jsonb, text,
/// bytea); the JSON envelopes need JSON, so the difference is kept here and
/// each envelope decides (see `docs/debezium.md`).
#[derive(Debug, Clone)]
pub enum Payload {
    /// SQL NULL: only the Debezium format carries it (a null value, a tombstone).
    Null,
    /// Valid JSON text (a json/jsonb column, or text that parses as JSON).
    Json(Box<RawValue>),
    /// Text that is not JSON (a text/varchar column).
    Text(String),
    /// A bytea column: `bytes` as stored, `text` its `\x` hex form (logs, dead letters).
    Binary {
        /// The stored bytes, published as is by the Debezium format.
        bytes: Vec<u8>,
        /// Postgres's hex text form of the bytes.
        text: String,
    },
}

impl Payload {
    /// The payload as text: JSON text, the text, or `\x` hex for bytes.
    pub fn get(&self) -> &str {
        match self {
            Payload::Null => "",
            Payload::Json(raw) => raw.get(),
            Payload::Text(text) => text,
            Payload::Binary { text, .. } => text,
        }
    }

    /// The JSON value, if the payload is JSON.
    pub fn as_json(&self) -> Option<&RawValue> {
        match self {
            Payload::Json(raw) => Some(raw),
            _ => None,
        }
    }

    /// The bytes a Debezium consumer reads: the text's UTF-8 bytes, or the stored bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Null => b"",
            Payload::Json(raw) => raw.get().as_bytes(),
            Payload::Text(text) => text.as_bytes(),
            Payload::Binary { bytes, .. } => bytes,
        }
    }

    /// Whether the payload is empty (Debezium's `route.tombstone.on.empty.payload`).
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

/// The W3C `traceparent` in a tracing column: either the bare value or
/// Debezium's `tracingspancontext` (Java properties text holding a
/// `traceparent=` line, comments starting with `#` or `!`). None when the
/// text holds no traceparent.
pub fn parse_traceparent(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let looks_like_properties = text.lines().any(|l| {
        let l = l.trim_start();
        l.starts_with('#') || l.starts_with('!') || l.contains('=') || l.contains(':')
    }) && !is_traceparent(text);
    if !looks_like_properties {
        return Some(text.to_owned());
    }
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        let Some((key, value)) = line.split_once(['=', ':']) else { continue };
        if key.trim() == "traceparent" {
            let value = value.trim();
            return (!value.is_empty()).then(|| value.to_owned());
        }
    }
    None
}

/// Whether `text` has the W3C shape `vv-<32 hex>-<16 hex>-ff`.
fn is_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    parts.len() >= 4
        && [2usize, 32, 16, 2]
            .iter()
            .zip(&parts)
            .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A row that can never become a valid event as it stands; it is recorded on
/// the row and reported, never silently dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Which row.
    pub position: i64,
    /// Why, in words an operator can act on.
    pub reason: String,
    /// The row's aggregate, when it had a usable one: `failures.policy =
    /// "block"` holds back that aggregate's later events.
    pub aggregate_id: Option<String>,
    /// The event's original text, when no table row holds it (a logical
    /// decoding message): what a dead letter carries instead.
    pub original: Option<String>,
}

impl Rejected {
    /// A rejection known only by position and reason.
    pub fn new(position: i64, reason: impl Into<String>) -> Rejected {
        Rejected { position, reason: reason.into(), aggregate_id: None, original: None }
    }

    /// The same rejection, tied to `aggregate_id`.
    pub fn of_aggregate(mut self, aggregate_id: Option<String>) -> Rejected {
        self.aggregate_id = aggregate_id.filter(|a| !a.is_empty());
        self
    }
}

/// Fields of a captured row before validation; every column may be NULL or
/// malformed because the table is written by applications, not by us.
#[derive(Debug, Default, Clone)]
pub struct RawRow {
    /// See [`OutboxEvent::position`].
    pub position: i64,
    /// Text form of the event id column, if the table has one.
    pub event_id: Option<String>,
    /// See [`OutboxEvent::aggregate_type`].
    pub aggregate_type: Option<String>,
    /// See [`OutboxEvent::aggregate_id`].
    pub aggregate_id: Option<String>,
    /// See [`OutboxEvent::event_type`].
    pub event_type: Option<String>,
    /// See [`OutboxEvent::event_version`].
    pub event_version: Option<i32>,
    /// Payload as text (json, jsonb or text column; a bytea column's `\x` hex form).
    pub payload: Option<String>,
    /// A bytea payload column's bytes (then `payload` holds their hex text).
    pub payload_binary: Option<Vec<u8>>,
    /// Headers as text.
    pub headers: Option<String>,
    /// See [`OutboxEvent::actor`].
    pub actor: Option<String>,
    /// See [`OutboxEvent::traceparent`].
    pub traceparent: Option<String>,
    /// See [`OutboxEvent::topic`].
    pub topic: Option<String>,
    /// See [`OutboxEvent::created_at`].
    pub created_at: Option<DateTime<Utc>>,
}

/// Namespace for event ids derived from positions when the table has no
/// event id column, so the same row always gets the same id.
const DERIVED_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f75_7462_6f78_2d72_656c_6179_0000_0001);

impl RawRow {
    /// Validates the row; `table` seeds derived event ids.
    pub fn into_event(self, table: &str) -> Result<OutboxEvent, Rejected> {
        let position = self.position;
        // Errors found once the aggregate is known name it (only on the error
        // path is it copied), so a blocking policy can hold that aggregate.
        let reject = |reason: String| Rejected::new(position, reason);
        let required = |value: Option<String>, what: &str| match value {
            Some(v) if !v.is_empty() => Ok(v),
            Some(_) => Err(reject(format!("{what} is empty"))),
            None => Err(reject(format!("{what} is NULL"))),
        };
        let aggregate_type =
            required(self.aggregate_type, "aggregate_type").map_err(|r| r.of_aggregate(self.aggregate_id.clone()))?;
        let aggregate_id = required(self.aggregate_id, "aggregate_id")?;
        // From here on every rejection names the aggregate: a blocking policy
        // must hold its later events back behind this one, whatever is wrong.
        let reject = |reason: String| Rejected::new(position, reason).of_aggregate(Some(aggregate_id.clone()));
        let event_type =
            required(self.event_type, "event_type").map_err(|r| r.of_aggregate(Some(aggregate_id.clone())))?;
        // JSON stays JSON; anything else (NULL too) is carried as is, and only
        // the JSON envelopes refuse it (with the reason and the fix, when encoding).
        let payload = match (self.payload, self.payload_binary) {
            (None, _) => Payload::Null,
            (Some(payload_text), binary) => match binary {
                Some(bytes) => Payload::Binary { bytes, text: payload_text },
                // Parsed once (checking first, then `from_string`, parsed it twice).
                None => match serde_json::from_str::<Box<RawValue>>(&payload_text) {
                    Ok(raw) => Payload::Json(raw),
                    Err(_) => Payload::Text(payload_text),
                },
            },
        };
        let headers = match self.headers {
            None => None,
            Some(text) => {
                let raw =
                    RawValue::from_string(text).map_err(|e| reject(format!("headers are not valid JSON: {e}")))?;
                if !raw.get().trim_start().starts_with('{') {
                    return Err(reject("headers must be a JSON object".into()));
                }
                Some(raw)
            }
        };
        let event_id = match self.event_id {
            Some(text) => {
                Uuid::parse_str(&text).map_err(|e| reject(format!("event_id {text:?} is not a UUID: {e}")))?
            }
            None => Uuid::new_v5(&DERIVED_ID_NAMESPACE, format!("{table}:{position}").as_bytes()),
        };
        let event_version = self.event_version.unwrap_or(1);
        if event_version < 1 {
            return Err(reject(format!("event_version {event_version} must be at least 1")));
        }
        Ok(OutboxEvent {
            position,
            event_id,
            aggregate_type,
            aggregate_id,
            event_type,
            event_version,
            payload,
            headers,
            actor: self.actor,
            traceparent: self.traceparent.as_deref().and_then(parse_traceparent),
            topic: self.topic.filter(|t| !t.is_empty()),
            created_at: self.created_at.unwrap_or_else(Utc::now),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> RawRow {
        RawRow {
            position: 7,
            event_id: Some("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11".into()),
            aggregate_type: Some("Order".into()),
            aggregate_id: Some("42".into()),
            event_type: Some("OrderPlaced".into()),
            event_version: Some(2),
            payload: Some(r#"{"total":10}"#.into()),
            headers: Some("{}".into()),
            ..RawRow::default()
        }
    }

    #[test]
    fn a_complete_row_becomes_an_event() {
        let event = row().into_event("outbox.events").unwrap();
        assert_eq!(event.aggregate_id, "42");
        assert_eq!(event.payload.get(), r#"{"total":10}"#);
        assert_eq!(event.event_version, 2);
    }

    #[test]
    fn null_aggregate_id_is_rejected_with_its_position() {
        let mut r = row();
        r.aggregate_id = None;
        let rejected = r.into_event("t").unwrap_err();
        assert_eq!(rejected, Rejected::new(7, "aggregate_id is NULL"));
    }

    #[test]
    fn text_payload_that_is_not_json_is_carried_as_text() {
        let mut r = row();
        r.payload = Some("{not json".into());
        let event = r.into_event("t").unwrap();
        assert!(matches!(&event.payload, Payload::Text(t) if t == "{not json"));
        assert!(event.payload.as_json().is_none());
    }

    #[test]
    fn bytea_payload_keeps_its_bytes() {
        let mut r = row();
        r.payload = Some("\\x00ff".into());
        r.payload_binary = Some(vec![0, 255]);
        let event = r.into_event("t").unwrap();
        assert_eq!(event.payload.as_bytes(), &[0, 255]);
        assert_eq!(event.payload.get(), "\\x00ff");
    }

    #[test]
    fn traceparent_from_plain_text_or_debezium_properties() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(parse_traceparent(tp).as_deref(), Some(tp));
        let props = format!("#\n#Wed Dec 02 05:34:49 UTC 2026\ntraceparent={tp}\n");
        assert_eq!(parse_traceparent(&props).as_deref(), Some(tp));
        assert_eq!(parse_traceparent("#only a comment\n"), None);
        assert_eq!(parse_traceparent("tracestate=x\n"), None);
        assert_eq!(parse_traceparent(""), None);
    }

    #[test]
    fn every_rejection_after_the_aggregate_is_known_names_it() {
        for broken in [
            RawRow { event_type: Some(String::new()), ..row() },
            RawRow { event_type: None, ..row() },
            RawRow { event_id: Some("nope".into()), ..row() },
            RawRow { event_version: Some(0), ..row() },
            RawRow { aggregate_type: None, ..row() },
        ] {
            let rejected = broken.into_event("t").unwrap_err();
            assert_eq!(rejected.aggregate_id.as_deref(), Some("42"), "{}", rejected.reason);
        }
    }

    #[test]
    fn headers_must_be_an_object() {
        let mut r = row();
        r.headers = Some("[1]".into());
        assert!(r.into_event("t").is_err());
    }

    #[test]
    fn missing_event_id_column_gives_a_stable_derived_id() {
        let mut a = row();
        a.event_id = None;
        let b = a.clone();
        assert_eq!(a.into_event("t").unwrap().event_id, b.into_event("t").unwrap().event_id);
    }
}
