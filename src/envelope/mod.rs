//! How an [`OutboxEvent`] becomes a broker message.
//!
//! Three formats, chosen by `[envelope] format` (see `docs/envelope.md`):
//!
//! - `native` (default): envelope v1. The value is a JSON document (see
//!   `docs/envelope-v1.schema.json`); headers repeat the fields consumers
//!   route on so they need not parse the value.
//! - `cloudevents-structured` / `cloudevents-binary`: CloudEvents 1.0 over
//!   the Kafka protocol binding, in [`cloudevents`].
//! - `debezium`: Debezium's Outbox Event Router output, in [`debezium`]
//!   (its topic comes from `envelope.debezium.route_topic_replacement`).
//!
//! In every format the key is the aggregate id and the topic comes from the
//! `sink.topic` template. The payload is spliced in as raw JSON text: it is
//! never parsed into a tree and re-serialized. The JSON formats need a JSON
//! payload; `debezium` carries text and bytea payloads as they are.
//!
//! Topic names: templates and rendered names are checked here against what
//! some sink accepts (letters, digits, `. _ - ~ + %`); each sink then applies
//! its own rule (Kafka: [`is_valid_topic`]; Pub/Sub: `sink::pubsub::topic`).

pub mod cloudevents;
pub mod debezium;
mod template;

use std::borrow::Cow;
use std::io::Write as _;

use chrono::SecondsFormat;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::config::{EnvelopeConfig, EnvelopeFormat};
use crate::event::{OutboxEvent, Payload};
use crate::sink::OutgoingMessage;
use template::{Field, Template};

/// Version string written into every envelope and header.
pub const ENVELOPE_VERSION: &str = "1";

/// Longest topic name Kafka accepts.
const MAX_TOPIC_LEN: usize = 249;

/// Longest topic name any sink accepts (Pub/Sub: 255).
const MAX_ANY_TOPIC_LEN: usize = 255;

/// Why an event could not become a message.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The rendered topic is not a name any broker accepts.
    #[error("topic {topic:?} is not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -) nor a Pub/Sub one (which also allows ~ + %): fix the row's topic, sink.topic or envelope.debezium.route_topic_replacement")]
    InvalidTopic {
        /// The rendered topic name.
        topic: String,
    },
    /// A JSON envelope got a payload that is not JSON (text or bytea).
    #[error("payload is not valid JSON ({kind} column value): envelope.format = \"{format}\" carries JSON payloads only; set envelope.format = \"debezium\" to publish text and bytea payloads as they are")]
    NotJson {
        /// The payload column's kind (`text`, `bytea`).
        kind: &'static str,
        /// The configured `envelope.format`.
        format: &'static str,
    },
    /// A NULL payload, which only the Debezium format can carry (null value or tombstone).
    #[error("payload is NULL: envelope.format = \"{format}\" needs a payload; write one, or use envelope.format = \"debezium\" (a null value, or a tombstone with envelope.debezium.route_tombstone_on_empty_payload = true)")]
    NullPayload {
        /// The configured `envelope.format`.
        format: &'static str,
    },
    /// The value could not be serialized (only possible with corrupt input).
    #[error("could not encode the envelope: {0}")]
    Encode(String),
}

/// A parsed `sink.topic` template such as `outbox.{aggregate_type}`.
#[derive(Debug, Clone)]
pub struct TopicTemplate {
    template: Template,
}

/// The placeholders `sink.topic` accepts.
const TOPIC_FIELDS: &[Field] = &[Field::AggregateType, Field::EventType];

impl TopicTemplate {
    /// Parses a template; unknown placeholders are an error naming them.
    pub fn parse(template: &str) -> Result<TopicTemplate, String> {
        if template.is_empty() {
            return Err("is empty: set a topic name or template such as \"outbox.{aggregate_type}\"".into());
        }
        let template = TopicTemplate { template: Template::parse(template, TOPIC_FIELDS)? };
        let sample = template.render("Aggregate", "EventType");
        if !is_valid_topic_for_some_sink(&sample) {
            return Err(format!(
                "renders invalid topic names such as {sample:?}: use only a-z A-Z 0-9 . _ - (Kafka), and for Pub/Sub also ~ + %"
            ));
        }
        Ok(template)
    }

    /// The topic for an event of this aggregate and event type.
    pub fn render(&self, aggregate_type: &str, event_type: &str) -> String {
        let mut out = String::with_capacity(64);
        self.template.render_into(&mut out, |field, out| match field {
            Field::AggregateType => out.push_str(aggregate_type),
            Field::EventType => out.push_str(event_type),
            // Not in TOPIC_FIELDS: parse refuses it.
            Field::EventVersion => {}
        });
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

/// Whether some sink accepts this name (letters, digits, `. _ - ~ + %`, at
/// most 255 characters); each sink applies its own rule on top.
pub fn is_valid_topic_for_some_sink(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_ANY_TOPIC_LEN
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b'+' | b'%'))
}

/// Kafka's topic rule, quoted in every rejection.
pub const KAFKA_TOPIC_RULE: &str =
    "Kafka topic names are 1-249 characters of a-z A-Z 0-9 . _ - and not \".\" or \"..\"";

/// Checks a `sink.topic` template against Kafka's rule (`sink.kind = "kafka"`).
pub fn check_kafka_template(template: &str) -> Result<(), String> {
    let parsed = TopicTemplate::parse(template)?;
    let sample = parsed.render("Aggregate", "EventType");
    if is_valid_topic(&sample) {
        Ok(())
    } else {
        Err(format!("renders names Kafka rejects, such as {sample:?} ({KAFKA_TOPIC_RULE})"))
    }
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
    Debezium(Box<debezium::Debezium>),
}

/// Turns events into messages: topic, key, headers and value.
#[derive(Debug, Clone)]
pub struct EnvelopeMapper {
    topic: TopicTemplate,
    encoding: Encoding,
}

impl EnvelopeMapper {
    /// A mapper using the configured topic template and `[envelope]`
    /// section; `source_table` is `source.table`. The Debezium format's
    /// column names resolve against the default mapping here; the relay
    /// uses [`EnvelopeMapper::with_columns`] to give the configured one.
    #[cfg(test)]
    pub fn new(
        topic: TopicTemplate,
        envelope: &EnvelopeConfig,
        source_table: &str,
    ) -> Result<Self, EnvelopeConfigError> {
        Self::with_columns(topic, envelope, source_table, &crate::config::ColumnMapping::default())
    }

    /// A mapper for the configured topic template and `[envelope]` section, resolving the Debezium format's column
    /// names (`route_by_field`, `additional_placement`) against `columns`.
    pub fn with_columns(
        topic: TopicTemplate,
        envelope: &EnvelopeConfig,
        source_table: &str,
        columns: &crate::config::ColumnMapping,
    ) -> Result<Self, EnvelopeConfigError> {
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
            EnvelopeFormat::Debezium => {
                validate_config(envelope, source_table)?;
                Encoding::Debezium(Box::new(debezium::Debezium::from_config(&envelope.debezium, columns)?))
            }
        };
        Ok(Self { topic, encoding })
    }

    /// A mapper producing the native envelope v1 (the default format).
    #[cfg(test)]
    pub fn native(topic: TopicTemplate) -> Self {
        Self { topic, encoding: Encoding::Native }
    }

    /// The message for one event.
    pub fn to_message(&self, event: &OutboxEvent) -> Result<OutgoingMessage, EnvelopeError> {
        if let Encoding::Debezium(debezium) = &self.encoding {
            return debezium.to_message(event);
        }
        let topic = match &event.topic {
            Some(topic) => topic.clone(),
            None => self.topic.render(&event.aggregate_type, &event.event_type),
        };
        if !is_valid_topic_for_some_sink(&topic) {
            return Err(EnvelopeError::InvalidTopic { topic });
        }
        let format = match &self.encoding {
            Encoding::CloudEvents(_) => "cloudevents",
            _ => "native",
        };
        match &event.payload {
            Payload::Json(_) => {}
            Payload::Null => return Err(EnvelopeError::NullPayload { format }),
            Payload::Text(_) => return Err(EnvelopeError::NotJson { kind: "text", format }),
            Payload::Binary { .. } => return Err(EnvelopeError::NotJson { kind: "bytea", format }),
        }
        let (value, headers) = match &self.encoding {
            Encoding::Native | Encoding::Debezium(_) => native_value_and_headers(event)?,
            Encoding::CloudEvents(ce) => ce.value_and_headers(event)?,
        };
        Ok(OutgoingMessage {
            position: event.position,
            topic,
            key: event.aggregate_id.clone(),
            value,
            headers,
            timestamp_ms: None,
            tombstone: false,
        })
    }
}

/// Message headers: (name, value).
pub type Headers = Vec<(Cow<'static, str>, Vec<u8>)>;

/// Envelope v1: the JSON value and the routing headers.
fn native_value_and_headers(event: &OutboxEvent) -> Result<(Vec<u8>, Headers), EnvelopeError> {
    let payload = event.payload.as_json().ok_or(EnvelopeError::NotJson { kind: "text", format: "native" })?;
    let headers = event.headers.as_deref().unwrap_or(empty_object());
    let mut value = Vec::with_capacity(payload.get().len() + headers.get().len() + 320);
    write_native(&mut value, event, headers, payload);
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

/// Writes envelope v1, field for field and byte for byte what the relay
/// always wrote (`docs/envelope-v1.schema.json`). Written by hand rather than through a `#[derive(Serialize)]`
/// struct: the derived serializer ran serde_json's per-byte escape loop over
/// every field name and value, the largest single cost per event in the
/// relay's profile. The unit tests hold it to serde_json's output.
fn write_native(out: &mut Vec<u8>, event: &OutboxEvent, headers: &RawValue, payload: &RawValue) {
    out.extend_from_slice(b"{\"envelope_version\":\"");
    out.extend_from_slice(ENVELOPE_VERSION.as_bytes());
    out.extend_from_slice(b"\",\"event_id\":\"");
    out.extend_from_slice(event.event_id.hyphenated().encode_lower(&mut Uuid::encode_buffer()).as_bytes());
    out.extend_from_slice(b"\",\"event_type\":");
    write_json_str(out, &event.event_type);
    // Writing into a Vec cannot fail.
    let _ = write!(out, ",\"event_version\":{}", event.event_version);
    out.extend_from_slice(b",\"aggregate_type\":");
    write_json_str(out, &event.aggregate_type);
    out.extend_from_slice(b",\"aggregate_id\":");
    write_json_str(out, &event.aggregate_id);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(event.created_at.to_rfc3339_opts(SecondsFormat::Micros, true).as_bytes());
    out.extend_from_slice(b"\",\"actor\":");
    match event.actor.as_deref() {
        Some(actor) => write_json_str(out, actor),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"headers\":");
    out.extend_from_slice(headers.get().as_bytes());
    out.extend_from_slice(b",\"payload\":");
    out.extend_from_slice(payload.get().as_bytes());
    out.push(b'}');
}

/// A JSON string literal, escaped exactly as serde_json escapes it: text
/// with no quote, backslash or control character is copied as it is, and
/// anything else goes through serde_json.
fn write_json_str(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        // Writing into a Vec cannot fail, and a &str always serializes.
        let _ = serde_json::to_writer(&mut *out, text);
    }
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
            payload: Payload::Json(RawValue::from_string(r#"{"total_cents":1999,"items":[1,2]}"#.into()).unwrap()),
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
            EnvelopeMapper::new(TopicTemplate::parse("outbox.{aggregate_type}").unwrap(), &default, "outbox.events")
                .unwrap();
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

    /// What the envelope was before it was written by hand: serde_json's
    /// serialization of this struct is the reference `write_native` must match.
    #[derive(serde::Serialize)]
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

    #[test]
    fn the_hand_written_envelope_matches_serde_json_for_hostile_strings() {
        let hostile = [
            "plain",
            "",
            "quote \" inside",
            "back\\slash",
            "tab\tnewline\ncarriage\r",
            "nul \u{0} bell \u{7} unit \u{1f}",
            "del \u{7f} stays",
            "slash / stays",
            "ünïcödé ✓ 😀",
            "</script>",
        ];
        for (i, text) in hostile.iter().enumerate() {
            let mut e = event();
            e.event_type = (*text).into();
            e.aggregate_type = hostile[(i + 1) % hostile.len()].into();
            e.aggregate_id = hostile[(i + 2) % hostile.len()].into();
            e.actor = (i % 2 == 0).then(|| hostile[(i + 3) % hostile.len()].into());
            e.event_version = [i32::MIN, -1, 0, 7, i32::MAX][i % 5];
            if i % 3 == 0 {
                e.headers = Some(RawValue::from_string(r#"{"k": "v\"x"}"#.into()).unwrap());
            }
            let headers = e.headers.as_deref().unwrap_or(empty_object());
            let payload = e.payload.as_json().unwrap();
            let reference = serde_json::to_vec(&EnvelopeV1 {
                envelope_version: ENVELOPE_VERSION,
                event_id: e.event_id,
                event_type: &e.event_type,
                event_version: e.event_version,
                aggregate_type: &e.aggregate_type,
                aggregate_id: &e.aggregate_id,
                timestamp: e.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
                actor: e.actor.as_deref(),
                headers,
                payload,
            })
            .unwrap();
            let mut written = Vec::new();
            write_native(&mut written, &e, headers, payload);
            assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(reference).unwrap(), "case {i}");
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
    fn native_refuses_text_bytea_and_null_payloads_naming_the_fix() {
        for payload in
            [Payload::Text("hi".into()), Payload::Binary { bytes: vec![1], text: "\\x01".into() }, Payload::Null]
        {
            let e = OutboxEvent { payload, ..event() };
            let err = mapper().to_message(&e).unwrap_err().to_string();
            assert!(err.contains("envelope.format = \"debezium\""), "{err}");
        }
    }

    #[test]
    fn topic_rules_per_sink() {
        assert!(TopicTemplate::parse("orders~v1+x%20").is_ok(), "Pub/Sub names pass the shared check");
        assert!(check_kafka_template("orders~v1").unwrap_err().contains("Kafka"));
        assert!(check_kafka_template("outbox.{aggregate_type}").is_ok());
        assert!(TopicTemplate::parse("bad topic").is_err());
    }

    #[test]
    fn aggregate_type_with_space_gives_invalid_topic_error() {
        let mut e = event();
        e.aggregate_type = "Sales Order".into();
        let err = mapper().to_message(&e).unwrap_err();
        assert!(err.to_string().contains("\"outbox.Sales Order\""), "{err}");
    }
}
