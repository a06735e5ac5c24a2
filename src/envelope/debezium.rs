//! `envelope.format = "debezium"`: the messages Debezium's Outbox Event
//! Router (`io.debezium.transforms.outbox.EventRouter`) produces with Kafka
//! Connect's StringConverter, so consumers written against Debezium read
//! ours unchanged:
//!
//! - topic: `envelope.debezium.route_topic_replacement` with
//!   `${routedByValue}` replaced by the `route_by_field` value
//!   (default `outbox.event.<aggregate type>`);
//! - key: the aggregate id's bytes;
//! - value: the payload column as is (jsonb: Postgres's text output; json
//!   and text: the text; bytea: the bytes); a NULL payload is a null value
//!   (tombstone), and so is an empty one with
//!   `route_tombstone_on_empty_payload`;
//! - headers: `id` = the event id, `traceparent` when the tracing column
//!   holds one (as Debezium's router with OpenTelemetry), then
//!   `additional_placement` headers;
//! - record timestamp: the event time (`source.columns.created_at`, else the
//!   commit time in replication / the read time in polling).
//!
//! The option-by-option mapping is in `docs/debezium.md`.

use std::borrow::Cow;

use crate::config::{ColumnMapping, DebeziumConfig};
use crate::event::{OutboxEvent, Payload};
use crate::sink::OutgoingMessage;

use super::{is_valid_topic_for_some_sink, EnvelopeConfig, EnvelopeConfigError, EnvelopeError, Headers};

/// The placeholder of `route.topic.replacement`.
const ROUTED_BY_VALUE: &str = "${routedByValue}";

/// Most `additional_placement` entries accepted (bounded headers per message).
const MAX_PLACEMENTS: usize = 32;

/// An event field a Debezium option can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    EventId,
    AggregateType,
    AggregateId,
    EventType,
    EventVersion,
    Actor,
    Traceparent,
    Topic,
    CreatedAt,
}

/// Our name, Debezium's default column name, and how to find the configured column.
const FIELDS: [(Field, &str, &str); 9] = [
    (Field::EventId, "event_id", "id"),
    (Field::AggregateType, "aggregate_type", "aggregatetype"),
    (Field::AggregateId, "aggregate_id", "aggregateid"),
    (Field::EventType, "event_type", "type"),
    (Field::EventVersion, "event_version", "schemaversion"),
    (Field::Actor, "actor", "actor"),
    (Field::Traceparent, "traceparent", "tracingspancontext"),
    (Field::Topic, "topic", "topic"),
    (Field::CreatedAt, "created_at", "timestamp"),
];

fn configured(field: Field, columns: &ColumnMapping) -> &str {
    match field {
        Field::EventId => &columns.event_id,
        Field::AggregateType => &columns.aggregate_type,
        Field::AggregateId => &columns.aggregate_id,
        Field::EventType => &columns.event_type,
        Field::EventVersion => &columns.event_version,
        Field::Actor => &columns.actor,
        Field::Traceparent => &columns.traceparent,
        Field::Topic => &columns.topic,
        Field::CreatedAt => &columns.created_at,
    }
}

/// Resolves a column named in an option: our field name, Debezium's default
/// column name, or the column `source.columns` maps.
fn resolve(name: &str, columns: &ColumnMapping) -> Option<Field> {
    FIELDS
        .iter()
        .find(|(field, ours, debezium)| {
            name == *ours || name == *debezium || (!name.is_empty() && configured(*field, columns) == name)
        })
        .map(|(field, ..)| *field)
}

fn accepted_names() -> String {
    FIELDS.iter().map(|(_, ours, debezium)| format!("{ours} ({debezium})")).collect::<Vec<_>>().join(", ")
}

/// The compiled `[envelope.debezium]` options.
#[derive(Debug, Clone)]
pub struct Debezium {
    route_by: Field,
    /// Topic text before and after `${routedByValue}` (None: no placeholder).
    topic: (String, Option<String>),
    tombstone_on_empty: bool,
    /// (field, header name).
    placements: Vec<(Field, String)>,
}

/// Checks `[envelope.debezium]` (whatever the format, so a bad value is
/// reported before someone switches to it).
pub fn validate_config(envelope: &EnvelopeConfig, columns: &ColumnMapping) -> Result<(), EnvelopeConfigError> {
    Debezium::from_config(&envelope.debezium, columns).map(|_| ())
}

impl Debezium {
    /// Compiles the options; every error names its key and the fix.
    pub fn from_config(config: &DebeziumConfig, columns: &ColumnMapping) -> Result<Debezium, EnvelopeConfigError> {
        let route_by = resolve(&config.route_by_field, columns).ok_or_else(|| EnvelopeConfigError {
            key: "envelope.debezium.route_by_field",
            problem: format!(
                "{:?} is not a column the relay reads: use one of {} (or the column source.columns maps to it)",
                config.route_by_field,
                accepted_names()
            ),
        })?;
        let replacement = &config.route_topic_replacement;
        let topic = match replacement.split_once(ROUTED_BY_VALUE) {
            Some((before, after)) => (before.to_owned(), Some(after.to_owned())),
            None => (replacement.clone(), None),
        };
        let sample = format!("{}Aggregate{}", topic.0, topic.1.as_deref().unwrap_or(""));
        if replacement.is_empty()
            || topic.1.as_deref().is_some_and(|a| a.contains("${"))
            || !is_valid_topic_for_some_sink(&sample)
        {
            return Err(EnvelopeConfigError {
                key: "envelope.debezium.route_topic_replacement",
                problem: format!(
                    "{replacement:?} must be a topic name with at most one ${{routedByValue}}, e.g. \"outbox.event.${{routedByValue}}\" (letters, digits . _ -)"
                ),
            });
        }
        if config.additional_placement.len() > MAX_PLACEMENTS {
            return Err(EnvelopeConfigError {
                key: "envelope.debezium.additional_placement",
                problem: format!(
                    "has {} entries; at most {MAX_PLACEMENTS} are supported",
                    config.additional_placement.len()
                ),
            });
        }
        let mut placements = Vec::with_capacity(config.additional_placement.len());
        for entry in &config.additional_placement {
            let bad = |why: String| EnvelopeConfigError {
                key: "envelope.debezium.additional_placement",
                problem: format!("{entry:?}: {why}"),
            };
            let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
            let (column, placement, alias) = match parts.as_slice() {
                [c, p] => (*c, *p, *c),
                [c, p, a] if !a.is_empty() => (*c, *p, *a),
                _ => return Err(bad("write column:header or column:header:alias".into())),
            };
            match placement {
                "header" => {}
                "envelope" | "partition" => {
                    return Err(bad(format!(
                        "placement \"{placement}\" is not supported (the value is the payload as is, and the partition comes from the key): use \"header\""
                    )))
                }
                other => return Err(bad(format!("unknown placement {other:?}: use \"header\""))),
            }
            let field = resolve(column, columns).ok_or_else(|| {
                bad(format!(
                    "column {column:?} is not one the relay reads: use one of {} (arbitrary extra columns are not supported)",
                    accepted_names()
                ))
            })?;
            if alias == "id" {
                return Err(bad("header \"id\" is the event id already: choose another alias".into()));
            }
            placements.push((field, alias.to_owned()));
        }
        Ok(Debezium { route_by, topic, tombstone_on_empty: config.route_tombstone_on_empty_payload, placements })
    }

    /// The outbox column `route_by_field` names (what `check` reads to list
    /// the topics pending events go to).
    pub fn route_column<'a>(&self, columns: &'a ColumnMapping) -> &'a str {
        configured(self.route_by, columns)
    }

    /// The topic for an event whose routing column holds `routed`.
    pub fn topic_for(&self, routed: &str) -> String {
        match &self.topic {
            (before, Some(after)) => format!("{before}{routed}{after}"),
            (whole, None) => whole.clone(),
        }
    }

    /// The message Debezium's Event Router would produce for `event`.
    pub fn to_message(&self, event: &OutboxEvent) -> Result<OutgoingMessage, EnvelopeError> {
        let topic = match &event.topic {
            Some(topic) => topic.clone(),
            None => {
                let routed = value(self.route_by, event).ok_or_else(|| EnvelopeError::Encode(
                    "the envelope.debezium.route_by_field column is NULL: write a value, or route by another column".into(),
                ))?;
                self.topic_for(&routed)
            }
        };
        if !is_valid_topic_for_some_sink(&topic) {
            return Err(EnvelopeError::InvalidTopic { topic });
        }
        let mut headers: Headers = Vec::with_capacity(1 + self.placements.len());
        headers.push((Cow::Borrowed("id"), event.event_id.hyphenated().to_string().into_bytes()));
        // What Debezium's router injects from tracingspancontext when tracing is on.
        if let Some(traceparent) = &event.traceparent {
            headers.push((Cow::Borrowed("traceparent"), traceparent.as_bytes().to_vec()));
        }
        for (field, name) in &self.placements {
            // Kafka Connect's SimpleHeaderConverter writes a null header for NULL.
            let bytes = value(*field, event).map(|v| v.into_owned().into_bytes()).unwrap_or_default();
            headers.push((Cow::Owned(name.clone()), bytes));
        }
        let tombstone = matches!(event.payload, Payload::Null) || (self.tombstone_on_empty && event.payload.is_empty());
        Ok(OutgoingMessage {
            position: event.position,
            topic,
            key: event.aggregate_id.clone(),
            value: if tombstone { Vec::new() } else { event.payload.as_bytes().to_vec() },
            headers,
            timestamp_ms: Some(event.created_at.timestamp_millis()),
            tombstone,
        })
    }
}

/// A field's text as Debezium's SimpleHeaderConverter would write it
/// (timestamps: microseconds since the epoch, Debezium's MicroTimestamp).
fn value(field: Field, event: &OutboxEvent) -> Option<Cow<'_, str>> {
    match field {
        Field::EventId => Some(Cow::Owned(event.event_id.hyphenated().to_string())),
        Field::AggregateType => Some(Cow::Borrowed(&event.aggregate_type)),
        Field::AggregateId => Some(Cow::Borrowed(&event.aggregate_id)),
        Field::EventType => Some(Cow::Borrowed(&event.event_type)),
        Field::EventVersion => Some(Cow::Owned(event.event_version.to_string())),
        Field::Actor => event.actor.as_deref().map(Cow::Borrowed),
        Field::Traceparent => event.traceparent.as_deref().map(Cow::Borrowed),
        Field::Topic => event.topic.as_deref().map(Cow::Borrowed),
        Field::CreatedAt => Some(Cow::Owned(event.created_at.timestamp_micros().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::value::RawValue;
    use uuid::Uuid;

    fn debezium_columns() -> ColumnMapping {
        ColumnMapping {
            position: "id".into(),
            event_id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            created_at: "timestamp".into(),
            traceparent: "tracingspancontext".into(),
            ..ColumnMapping::default()
        }
    }

    fn event(payload: Payload) -> OutboxEvent {
        OutboxEvent {
            position: 1,
            event_id: Uuid::parse_str("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11").unwrap(),
            aggregate_type: "Order".into(),
            aggregate_id: "42".into(),
            event_type: "OrderCreated".into(),
            event_version: 1,
            payload,
            headers: None,
            actor: None,
            traceparent: None,
            topic: None,
            created_at: chrono::Utc.with_ymd_and_hms(2026, 12, 2, 5, 34, 49).unwrap()
                + chrono::Duration::microseconds(143_595),
        }
    }

    fn json(text: &str) -> Payload {
        Payload::Json(RawValue::from_string(text.into()).unwrap())
    }

    #[test]
    fn defaults_reproduce_the_event_router() {
        let d = Debezium::from_config(&DebeziumConfig::default(), &debezium_columns()).unwrap();
        let msg = d.to_message(&event(json(r#"{"id": 1, "total": 9.5}"#))).unwrap();
        assert_eq!(msg.topic, "outbox.event.Order");
        assert_eq!(msg.key, "42");
        assert_eq!(msg.value, br#"{"id": 1, "total": 9.5}"#);
        assert_eq!(msg.headers, vec![(Cow::Borrowed("id"), b"6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11".to_vec())]);
        assert_eq!(msg.timestamp_ms, Some(1_796_189_689_143));
        assert!(!msg.tombstone);
    }

    #[test]
    fn bytes_and_text_as_is_and_tombstones() {
        let d = Debezium::from_config(&DebeziumConfig::default(), &debezium_columns()).unwrap();
        let bin = d.to_message(&event(Payload::Binary { bytes: vec![0, 159, 255], text: "\\x009fff".into() })).unwrap();
        assert_eq!(bin.value, vec![0, 159, 255]);
        assert_eq!(d.to_message(&event(Payload::Text("plain".into()))).unwrap().value, b"plain");
        assert!(d.to_message(&event(Payload::Null)).unwrap().tombstone);
        assert!(!d.to_message(&event(Payload::Text(String::new()))).unwrap().tombstone);
        let config = DebeziumConfig { route_tombstone_on_empty_payload: true, ..DebeziumConfig::default() };
        let d = Debezium::from_config(&config, &debezium_columns()).unwrap();
        assert!(d.to_message(&event(Payload::Text(String::new()))).unwrap().tombstone);
    }

    #[test]
    fn routing_and_placement_by_column_names() {
        let config = DebeziumConfig {
            route_by_field: "type".into(),
            route_topic_replacement: "${routedByValue}.events".into(),
            additional_placement: vec![
                "type:header:eventType".into(),
                "aggregatetype:header".into(),
                "timestamp:header:ts".into(),
            ],
            ..DebeziumConfig::default()
        };
        let d = Debezium::from_config(&config, &debezium_columns()).unwrap();
        let msg = d.to_message(&event(json("{}"))).unwrap();
        assert_eq!(msg.topic, "OrderCreated.events");
        let headers: Vec<(&str, &str)> =
            msg.headers.iter().map(|(n, v)| (n.as_ref(), std::str::from_utf8(v).unwrap())).collect();
        assert_eq!(
            headers,
            [
                ("id", "6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"),
                ("eventType", "OrderCreated"),
                ("aggregatetype", "Order"),
                ("ts", "1796189689143595")
            ]
        );
    }

    #[test]
    fn unsupported_options_are_refused_naming_the_key() {
        for (config, needle) in [
            (
                DebeziumConfig { additional_placement: vec!["type:envelope:eventType".into()], ..Default::default() },
                "not supported",
            ),
            (
                DebeziumConfig { additional_placement: vec!["type:partition".into()], ..Default::default() },
                "not supported",
            ),
            (
                DebeziumConfig { additional_placement: vec!["tenant:header".into()], ..Default::default() },
                "arbitrary extra columns",
            ),
            (DebeziumConfig { route_by_field: "tenant".into(), ..Default::default() }, "route_by_field"),
            (
                DebeziumConfig { route_topic_replacement: "a ${routedByValue}".into(), ..Default::default() },
                "routedByValue",
            ),
        ] {
            let err = Debezium::from_config(&config, &debezium_columns()).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            assert!(err.key.starts_with("envelope.debezium."), "{err}");
        }
    }
}
