//! How an [`OutboxEvent`] becomes a broker message.
//!
//! Three formats, chosen by `[envelope] format` (see `docs/envelope.md`):
//!
//! - `native` (default): envelope v1. The value is a JSON document (see
//!   `docs/envelope-v1.schema.json`); headers repeat the fields consumers
//!   route on so they need not parse the value.
//! - `cloudevents-structured` / `cloudevents-binary`: CloudEvents 1.0 over
//!   the Kafka protocol binding, in [`cloudevents`].
//!
//! In every format the key is the aggregate id and the topic comes from the
//! `sink.topic` template. The payload is spliced in as raw JSON text: it is
//! never parsed into a tree and re-serialized.

pub mod cloudevents;

use std::borrow::Cow;

use chrono::SecondsFormat;
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::{EnvelopeConfig, EnvelopeFormat};
use crate::event::OutboxEvent;
use crate::sink::OutgoingMessage;

/// Version string written into every envelope and header.
pub const ENVELOPE_VERSION: &str = "1";

/// Longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// The JSON value of one message, borrowed from the event.
#[derive(Serialize)]
struct EnvelopeV1<'a> {
    envelope_version: &'static str,
    event_id: Uuid,
    event_type: &'a str,
    event_version: i32,
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    timestamp: String,
    actor: Option<&'a str>,
    headers: &'a RawValue,
    payload: &'a RawValue,
}

/// Why an event could not become a message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The rendered topic is not a name the broker accepts.
    #[error("topic {topic:?} is not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -): fix the row's topic or sink.topic")]
    InvalidTopic { topic: String },
    /// The value could not be serialized (only possible with corrupt input).
    #[error("could not encode the envelope: {0}")]
    Encode(String),
}

/// A parsed `sink.topic` template such as `outbox.{aggregate_type}`.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq)]
enum TemplatePart {
    Literal(String),
    AggregateType,
    EventType,
}

impl TopicTemplate {
    /// Parses a template; unknown placeholders are an error naming them.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        if template.is_empty() {
            return Err("is empty: set a topic name or template such as \"outbox.{aggregate_type}\"".into());
        }
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..]
                .find('}')
                .ok_or_else(|| format!("{template:?} has an unclosed '{{'"))?;
            let name = &rest[open + 1..open + close];
            parts.push(match name {
                "aggregate_type" => TemplatePart::AggregateType,
                "event_type" => TemplatePart::EventType,
                other => {
                    return Err(format!(
                        "{template:?} uses unknown placeholder {{{other}}}: use {{aggregate_type}} or {{event_type}}"
                    ))
                }
            });
            rest = &rest[open + close + 1..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_owned()));
        }
        let template = TopicTemplate { parts };
        let sample = template.render("Aggregate", "EventType");
        if !is_valid_topic(&sample) {
            return Err(format!("renders invalid topic names such as {sample:?}: use only a-z A-Z 0-9 . _ -"));
        }
        Ok(template)
    }

    /// The topic for an event of this aggregate and event type.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::AggregateType => out.push_str(aggregate_type),
                TemplatePart::EventType => out.push_str(event_type),
            }
        }
        out
    }
}

/// Whether Kafka accepts this topic name.
pub fn is_valid_topic(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_TOPIC_LEN
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// An `[envelope]` setting that cannot work; `key` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {problem}")]
pub struct EnvelopeConfigError {
    /// The configuration key, e.g. `envelope.source`.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// Checks the `[envelope]` section (`source_table` is `source.table`, which
/// the default CloudEvents `source` is derived from).
pub fn validate_config(envelope: &EnvelopeConfig, source_table: &str) -> Result<(), EnvelopeConfigError> {
    cloudevents::CloudEvents::from_config(envelope, source_table).map(|_| ())
}

/// How values are laid out, compiled from `[envelope]`.
#[derive(Debug, Clone)]
enum Encoding {
    Native,
    CloudEvents(Box<cloudevents::CloudEvents>),
}

/// Turns events into messages: topic, key, headers and value.
#[derive(Debug, Clone)]
pub struct EnvelopeMapper {
    topic: TopicTemplate,
    encoding: Encoding,
}

impl EnvelopeMapper {
    /// A mapper using the configured topic template and `[envelope]`
    /// section; `source_table` is `source.table`.
    pub fn new(topic: TopicTemplate, envelope: &EnvelopeConfig, source_table: &str) -> Result<Self, EnvelopeConfigError> {
        let encoding = match envelope.format {
            EnvelopeFormat::Native => {
                // Validate the CloudEvents keys anyway, so a bad value is
                // reported now and not when someone switches formats.
                validate_config(envelope, source_table)?;
                Encoding::Native
            }
            EnvelopeFormat::CloudEventsStructured | EnvelopeFormat::CloudEventsBinary => {
                Encoding::CloudEvents(Box::new(cloudevents::CloudEvents::from_config(envelope, source_table)?))
            }
        };
        Ok(Self { topic, encoding })
    }

    /// A mapper producing the native envelope v1 (the default format).
    pub fn native(topic: TopicTemplate) -> Self {
        Self { topic, encoding: Encoding::Native }
    }

    /// The message for one event.
    pub fn to_message(&self, event: &OutboxEvent) -> Result<OutgoingMessage, EnvelopeError> {
        let topic = match &event.topic {
            Some(topic) => topic.clone(),
            None => self.topic.render(&event.aggregate_type, &event.event_type),
        };
        if !is_valid_topic(&topic) {
            return Err(EnvelopeError::InvalidTopic { topic });
        }
        let (value, headers) = match &self.encoding {
            Encoding::Native => native_value_and_headers(event)?,
            Encoding::CloudEvents(ce) => ce.value_and_headers(event)?,
        };
        Ok(OutgoingMessage { position: event.position, topic, key: event.aggregate_id.clone(), value, headers })
    }
}

/// Message headers: (name, value).
pub type Headers = Vec<(Cow<'static, str>, Vec<u8>)>;

/// Envelope v1: the JSON value and the routing headers.
fn native_value_and_headers(event: &OutboxEvent) -> Result<(Vec<u8>, Headers), EnvelopeError> {
    let empty_headers = empty_object();
    let envelope = EnvelopeV1 {
        envelope_version: ENVELOPE_VERSION,
        event_id: event.event_id,
        event_type: &event.event_type,
        event_version: event.event_version,
        aggregate_type: &event.aggregate_type,
        aggregate_id: &event.aggregate_id,
        timestamp: event.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        actor: event.actor.as_deref(),
        headers: event.headers.as_deref().unwrap_or(empty_headers),
        payload: &event.payload,
    };
    let mut value = Vec::with_capacity(event.payload.get().len() + 320);
    serde_json::to_writer(&mut value, &envelope).map_err(|e| EnvelopeError::Encode(e.to_string()))?;
    let mut headers: Headers = Vec::with_capacity(5);
    headers.push((Cow::Borrowed("event_id"), event.event_id.hyphenated().to_string().into_bytes()));
    headers.push((Cow::Borrowed("event_type"), event.event_type.as_bytes().to_vec()));
    headers.push((Cow::Borrowed("event_version"), event.event_version.to_string().into_bytes()));
    headers.push((Cow::Borrowed("envelope_version"), ENVELOPE_VERSION.as_bytes().to_vec()));
    if let Some(traceparent) = &event.traceparent {
        headers.push((Cow::Borrowed("traceparent"), traceparent.as_bytes().to_vec()));
    }
    Ok((value, headers))
}

fn empty_object() -> &'static RawValue {
    // A literal that is valid JSON; `from_borrowed` only fails on invalid JSON.
    static EMPTY: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| RawValue::from_string("{}".to_owned()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn event() -> OutboxEvent {
        OutboxEvent {
            position: 1,
            event_id: Uuid::parse_str("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11").unwrap(),
            aggregate_type: "Order".into(),
            aggregate_id: "42".into(),
            event_type: "OrderPlaced".into(),
            event_version: 3,
            payload: RawValue::from_string(r#"{"total_cents":1999,"items":[1,2]}"#.into()).unwrap(),
            headers: None,
            actor: Some("user-7".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            topic: None,
            created_at: chrono::Utc.with_ymd_and_hms(2026, 11, 22, 7, 38, 0).unwrap(),
        }
    }

    fn mapper() -> EnvelopeMapper {
        EnvelopeMapper::native(TopicTemplate::parse("outbox.{aggregate_type}").unwrap())
    }

    #[test]
    fn native_format_is_byte_for_byte_envelope_v1() {
        // Pinned from the relay before CloudEvents support: the default
        // format must not change a byte of value or headers.
        let mut e = event();
        e.headers = Some(RawValue::from_string(r#"{"tenant": "acme", "n": 1}"#.into()).unwrap());
        let default = crate::config::EnvelopeConfig::default();
        let configured =
            EnvelopeMapper::new(TopicTemplate::parse("outbox.{aggregate_type}").unwrap(), &default, "outbox.events").unwrap();
        for msg in [mapper().to_message(&e).unwrap(), configured.to_message(&e).unwrap()] {
            assert_eq!(
                std::str::from_utf8(&msg.value).unwrap(),
                r#"{"envelope_version":"1","event_id":"6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11","event_type":"OrderPlaced","event_version":3,"aggregate_type":"Order","aggregate_id":"42","timestamp":"2026-11-22T07:38:00.000000Z","actor":"user-7","headers":{"tenant": "acme", "n": 1},"payload":{"total_cents":1999,"items":[1,2]}}"#
            );
            let headers: Vec<(&str, &str)> =
                msg.headers.iter().map(|(n, v)| (n.as_ref(), std::str::from_utf8(v).unwrap())).collect();
            assert_eq!(
                headers,
                [
                    ("event_id", "6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"),
                    ("event_type", "OrderPlaced"),
                    ("event_version", "3"),
                    ("envelope_version", "1"),
                    ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ]
            );
            assert_eq!(msg.key, "42");
        }
    }

    #[test]
    fn native_format_still_validates_the_cloudevents_keys() {
        let config = crate::config::EnvelopeConfig { source: "not a uri".into(), ..Default::default() };
        let err = EnvelopeMapper::new(TopicTemplate::parse("t").unwrap(), &config, "outbox.events").unwrap_err();
        assert_eq!(err.key, "envelope.source");
    }

    #[test]
    fn value_is_envelope_v1_with_payload_as_json() {
        let msg = mapper().to_message(&event()).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&msg.value).unwrap();
        assert_eq!(value["envelope_version"], "1");
        assert_eq!(value["event_id"], "6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11");
        assert_eq!(value["event_type"], "OrderPlaced");
        assert_eq!(value["event_version"], 3);
        assert_eq!(value["aggregate_type"], "Order");
        assert_eq!(value["aggregate_id"], "42");
        assert_eq!(value["timestamp"], "2026-11-22T07:38:00.000000Z");
        assert_eq!(value["actor"], "user-7");
        assert_eq!(value["headers"], serde_json::json!({}));
        assert_eq!(value["payload"]["items"], serde_json::json!([1, 2]));
    }

    #[test]
    fn key_topic_and_headers() {
        let msg = mapper().to_message(&event()).unwrap();
        assert_eq!(msg.key, "42");
        assert_eq!(msg.topic, "outbox.Order");
        let names: Vec<&str> = msg.headers.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(names, ["event_id", "event_type", "event_version", "envelope_version", "traceparent"]);
        assert_eq!(msg.headers[2].1, b"3");
    }

    #[test]
    fn row_topic_overrides_template_and_is_validated() {
        let mut e = event();
        e.topic = Some("billing-events".into());
        assert_eq!(mapper().to_message(&e).unwrap().topic, "billing-events");
        e.topic = Some("bad topic!".into());
        assert!(matches!(mapper().to_message(&e), Err(EnvelopeError::InvalidTopic { .. })));
    }

    #[test]
    fn template_rejects_unknown_placeholders_and_bad_characters() {
        assert!(TopicTemplate::parse("outbox.{aggregate}").unwrap_err().contains("unknown placeholder"));
        assert!(TopicTemplate::parse("out box").is_err());
        assert!(TopicTemplate::parse("outbox.{event_type").is_err());
        assert_eq!(TopicTemplate::parse("{event_type}-v1").unwrap().render("A", "E"), "E-v1");
    }

    #[test]
    fn aggregate_type_with_space_gives_invalid_topic_error() {
        let mut e = event();
        e.aggregate_type = "Sales Order".into();
        let err = mapper().to_message(&e).unwrap_err();
        assert!(err.to_string().contains("\"outbox.Sales Order\""), "{err}");
    }
}
