//! CloudEvents 1.0 over the Kafka protocol binding, structured and binary
//! content modes (`[envelope] format = "cloudevents-structured"` or
//! `"cloudevents-binary"`; see `docs/envelope.md`).
//!
//! Attribute mapping, the same in both modes:
//!
//! | attribute | from |
//! |---|---|
//! | `specversion` | `"1.0"` |
//! | `id` | `event_id` |
//! | `source` | `[envelope] source`, default `/outbox-relay/<source.table>` |
//! | `type` | `event_type`, plus `.v<event_version>` with `type_version = "suffix"` |
//! | `dataschema` | the `[envelope] dataschema` template, when set |
//! | `subject` | `aggregate_id` |
//! | `time` | `created_at`, RFC 3339 UTC, six fractional digits |
//! | `datacontenttype` | `application/json` |
//! | `aggregatetype` | `aggregate_type` (extension) |
//! | `eventversion` | `event_version` (extension, integer) |
//! | `actor` | `actor`, when set (extension) |
//! | `traceparent`, `tracestate` | Distributed Tracing extension: the row's `traceparent`, and the `tracestate` string field of its `headers` |
//! | `partitionkey` | `aggregate_id` (Partitioning extension; also the Kafka key) |
//! | configured | `[envelope.header_extensions]`: fields of the row's `headers` |
//!
//! Structured mode: the value is the JSON event format with the payload
//! spliced in raw as `data`; the only header is `content-type:
//! application/cloudevents+json; charset=UTF-8`. Binary mode: the value is
//! the payload's bytes; `content-type: application/json`; every other
//! attribute is a `ce_<name>` header holding its canonical string form.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::SecondsFormat;
use iri_string::types::UriReferenceStr;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::ser::{SerializeMap, Serializer as _};

use super::template::{Field, Template};
use super::{EnvelopeConfigError, EnvelopeError, Headers};
use crate::config::{EnvelopeConfig, EnvelopeFormat, TypeVersion};
use crate::event::OutboxEvent;

/// The CloudEvents version written into `specversion`.
pub const SPEC_VERSION: &str = "1.0";

/// `datacontenttype` of every event: the payload is JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// Kafka `content-type` header of a structured-mode message.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";

/// Longest extension name CloudEvents 1.0 allows.
const MAX_EXTENSION_NAME_LEN: usize = 20;

/// Context attributes of the spec, and the extensions the relay always
/// sets: none of them may be reused for a configured extension.
const RESERVED_NAMES: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "datacontenttype",
    "dataschema",
    "subject",
    "time",
    "data",
    "aggregatetype",
    "eventversion",
    "actor",
    "traceparent",
    "tracestate",
    "partitionkey",
];

/// Structured (whole event in the value) or binary (attributes in headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// JSON event format in the value.
    Structured,
    /// `ce_` headers, payload as the value.
    Binary,
}

/// The compiled CloudEvents settings of `[envelope]`.
#[derive(Debug, Clone)]
pub struct CloudEvents {
    mode: ContentMode,
    source: String,
    type_version: TypeVersion,
    dataschema: Option<SchemaTemplate>,
    /// (extension name, its `ce_` header name, field of the row's headers).
    header_extensions: Vec<(String, String, String)>,
}

impl CloudEvents {
    /// Validates and compiles `[envelope]`; `source_table` is `source.table`.
    /// Works for every format (a native config is validated the same way);
    /// the mode is binary only for `cloudevents-binary`.
    pub fn from_config(config: &EnvelopeConfig, source_table: &str) -> Result<CloudEvents, EnvelopeConfigError> {
        let invalid = |key: &'static str, problem: String| EnvelopeConfigError { key, problem };
        let source = if config.source.is_empty() {
            default_source(source_table)
        } else {
            check_uri_reference(&config.source).map_err(|why| {
                invalid(
                    "envelope.source",
                    format!(
                        "{:?} is not a URI-reference ({why}): use e.g. \"/outbox-relay/orders\" or \"https://orders.example.com\", or leave it empty for the default",
                        config.source
                    ),
                )
            })?;
            config.source.clone()
        };
        let dataschema = if config.dataschema.is_empty() {
            None
        } else {
            Some(SchemaTemplate::parse(&config.dataschema).map_err(|why| invalid("envelope.dataschema", why))?)
        };
        if config.type_version == TypeVersion::Dataschema && dataschema.is_none() {
            return Err(invalid(
                "envelope.dataschema",
                "is required when envelope.type_version = \"dataschema\": set a template such as \"https://schemas.example.com/{event_type}/v{event_version}.json\"".into(),
            ));
        }
        let mut header_extensions = Vec::with_capacity(config.header_extensions.len());
        for (name, field) in &config.header_extensions {
            check_extension_name(name).map_err(|why| invalid("envelope.header_extensions", why))?;
            if field.is_empty() {
                return Err(invalid(
                    "envelope.header_extensions",
                    format!("{name}: the header field is empty: name the field of the row's headers object to copy"),
                ));
            }
            header_extensions.push((name.clone(), format!("ce_{name}"), field.clone()));
        }
        let mode = match config.format {
            EnvelopeFormat::CloudEventsBinary => ContentMode::Binary,
            EnvelopeFormat::Native | EnvelopeFormat::CloudEventsStructured | EnvelopeFormat::Debezium => {
                ContentMode::Structured
            }
        };
        Ok(CloudEvents { mode, source, type_version: config.type_version, dataschema, header_extensions })
    }

    /// The `source` attribute every event gets.
    #[cfg(test)]
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The message value and headers for one event.
    pub fn value_and_headers(&self, event: &OutboxEvent) -> Result<(Vec<u8>, Headers), EnvelopeError> {
        let attributes = self.attributes(event)?;
        match self.mode {
            ContentMode::Structured => {
                let mut value = Vec::with_capacity(event.payload.get().len() + 512);
                let mut json = serde_json::Serializer::new(&mut value);
                let encode = |e: serde_json::Error| EnvelopeError::Encode(e.to_string());
                let mut map = json.serialize_map(None).map_err(encode)?;
                for attribute in &attributes {
                    match &attribute.value {
                        AttributeValue::String(text) => map.serialize_entry(attribute.name, text.as_ref()),
                        AttributeValue::Integer(number) => map.serialize_entry(attribute.name, number),
                        AttributeValue::Boolean(flag) => map.serialize_entry(attribute.name, flag),
                    }
                    .map_err(encode)?;
                }
                let data =
                    event.payload.as_json().ok_or(EnvelopeError::NotJson { kind: "text", format: "cloudevents" })?;
                map.serialize_entry("data", data).map_err(encode)?;
                map.end().map_err(encode)?;
                Ok((value, vec![(Cow::Borrowed("content-type"), STRUCTURED_CONTENT_TYPE.as_bytes().to_vec())]))
            }
            ContentMode::Binary => {
                let mut headers: Headers = Vec::with_capacity(attributes.len());
                for attribute in attributes {
                    let value = match attribute.value {
                        AttributeValue::String(text) => text.into_owned().into_bytes(),
                        AttributeValue::Integer(number) => number.to_string().into_bytes(),
                        AttributeValue::Boolean(flag) => flag.to_string().into_bytes(),
                    };
                    headers.push((attribute.header, value));
                }
                Ok((event.payload.get().as_bytes().to_vec(), headers))
            }
        }
    }

    /// Every attribute except `data`, in the order they are written.
    fn attributes<'a>(&'a self, event: &'a OutboxEvent) -> Result<Vec<Attribute<'a>>, EnvelopeError> {
        let mut out = Vec::with_capacity(16 + self.header_extensions.len());
        let string = |name: &'static str, header: &'static str, text: Cow<'a, str>| Attribute {
            name,
            header: Cow::Borrowed(header),
            value: AttributeValue::String(text),
        };
        out.push(string("specversion", "ce_specversion", Cow::Borrowed(SPEC_VERSION)));
        out.push(string("id", "ce_id", Cow::Owned(event.event_id.hyphenated().to_string())));
        out.push(string("source", "ce_source", Cow::Borrowed(&self.source)));
        let event_type = match self.type_version {
            TypeVersion::Suffix => Cow::Owned(format!("{}.v{}", event.event_type, event.event_version)),
            TypeVersion::Dataschema | TypeVersion::None => Cow::Borrowed(event.event_type.as_str()),
        };
        out.push(string("type", "ce_type", event_type));
        if let Some(template) = &self.dataschema {
            out.push(string("dataschema", "ce_dataschema", Cow::Owned(template.render(event))));
        }
        out.push(string("subject", "ce_subject", Cow::Borrowed(&event.aggregate_id)));
        out.push(string("time", "ce_time", Cow::Owned(event.created_at.to_rfc3339_opts(SecondsFormat::Micros, true))));
        // The binding maps datacontenttype to the plain `content-type` header.
        out.push(string("datacontenttype", "content-type", Cow::Borrowed(DATA_CONTENT_TYPE)));
        out.push(string("aggregatetype", "ce_aggregatetype", Cow::Borrowed(&event.aggregate_type)));
        out.push(Attribute {
            name: "eventversion",
            header: Cow::Borrowed("ce_eventversion"),
            value: AttributeValue::Integer(i64::from(event.event_version)),
        });
        if let Some(actor) = event.actor.as_deref().filter(|a| !a.is_empty()) {
            out.push(string("actor", "ce_actor", Cow::Borrowed(actor)));
        }
        let needs_headers = event.traceparent.is_some() || !self.header_extensions.is_empty();
        let row_headers = match (&event.headers, needs_headers) {
            (Some(raw), true) => serde_json::from_str::<BTreeMap<String, serde_json::Value>>(raw.get())
                .map_err(|e| EnvelopeError::Encode(format!("the row's headers are not a JSON object: {e}")))?,
            _ => BTreeMap::new(),
        };
        if let Some(traceparent) = &event.traceparent {
            out.push(string("traceparent", "ce_traceparent", Cow::Borrowed(traceparent)));
            // tracestate without traceparent means nothing (W3C Trace Context).
            if let Some(serde_json::Value::String(tracestate)) = row_headers.get("tracestate") {
                if !tracestate.is_empty() {
                    out.push(string("tracestate", "ce_tracestate", Cow::Owned(tracestate.clone())));
                }
            }
        }
        out.push(string("partitionkey", "ce_partitionkey", Cow::Borrowed(&event.aggregate_id)));
        for (name, header, field) in &self.header_extensions {
            let value = match row_headers.get(field) {
                None | Some(serde_json::Value::Null) => continue,
                Some(serde_json::Value::String(text)) => AttributeValue::String(Cow::Owned(text.clone())),
                Some(serde_json::Value::Bool(flag)) => AttributeValue::Boolean(*flag),
                Some(serde_json::Value::Number(number)) => {
                    match number.as_i64().filter(|n| i32::try_from(*n).is_ok()) {
                        Some(n) => AttributeValue::Integer(n),
                        // CloudEvents integers are 32-bit; other numbers travel as text.
                        None => AttributeValue::String(Cow::Owned(number.to_string())),
                    }
                }
                Some(other) => AttributeValue::String(Cow::Owned(other.to_string())),
            };
            out.push(Attribute { name, header: Cow::Owned(header.clone()), value });
        }
        Ok(out)
    }
}

/// One context attribute or extension.
struct Attribute<'a> {
    /// Name in the JSON event format.
    name: &'a str,
    /// Kafka header name in binary mode.
    header: Cow<'static, str>,
    value: AttributeValue<'a>,
}

/// The CloudEvents types the relay writes (URI and Timestamp values are strings).
enum AttributeValue<'a> {
    String(Cow<'a, str>),
    Integer(i64),
    Boolean(bool),
}

/// `/outbox-relay/<table>`, e.g. `/outbox-relay/outbox.events`.
pub fn default_source(source_table: &str) -> String {
    let mut out = String::from("/outbox-relay/");
    percent_encode_into(&mut out, source_table);
    out
}

/// Whether `name` is a valid CloudEvents extension name the relay may
/// configure: 1-20 characters of a-z 0-9, not one of the spec's attributes
/// or the relay's own extensions.
fn check_extension_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_EXTENSION_NAME_LEN {
        return Err(format!("extension name {name:?} must be 1 to {MAX_EXTENSION_NAME_LEN} characters long"));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) {
        return Err(format!(
            "extension name {name:?} may only use lowercase letters a-z and digits 0-9 (CloudEvents 1.0), e.g. {:?}",
            name.to_ascii_lowercase().replace(|c: char| !c.is_ascii_alphanumeric(), "")
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!("extension name {name:?} is an attribute the relay already sets: choose another name"));
    }
    Ok(())
}

/// What a value spliced into a URI keeps as is: RFC 3986's unreserved
/// characters. Everything else is percent-encoded.
const NOT_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Appends `text` with everything but RFC 3986 unreserved characters
/// percent-encoded, so a value spliced into a URI keeps it valid.
fn percent_encode_into(out: &mut String, text: &str) {
    out.extend(utf8_percent_encode(text, NOT_UNRESERVED));
}

/// Checks that `text` is an RFC 3986 URI-reference; returns whether it has
/// a scheme (is a URI rather than a relative reference). The grammar is
/// `iri-string`'s; ours is only the hint that says what to change.
pub fn check_uri_reference(text: &str) -> Result<bool, String> {
    if text.is_empty() {
        return Err("it is empty".into());
    }
    match UriReferenceStr::new(text) {
        Ok(reference) => Ok(reference.scheme_str().is_some()),
        Err(_) => Err(uri_hint(text)),
    }
}

/// Why `text`, which is not a URI-reference, is not one, as far as one
/// character tells; else the rules people most often break.
fn uri_hint(text: &str) -> String {
    let bytes = text.as_bytes();
    for (i, c) in text.char_indices() {
        if c == '%' && !bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
            return "'%' must start a percent-encoding such as %20".into();
        }
        if !c.is_ascii() {
            return format!("{c:?} must be percent-encoded");
        }
        if !(c.is_ascii_alphanumeric() || "%-._~:/?#[]@!$&'()*+,;=".contains(c)) {
            return format!("{c:?} is not allowed in a URI: percent-encode it");
        }
    }
    "it breaks RFC 3986: a scheme is a letter, then letters, digits, '+', '-' or '.'; a relative reference's \
     first segment may not contain ':'; '[' and ']' only surround an IP literal host; a fragment (after '#') \
     may not contain another '#'"
        .into()
}

/// A parsed `[envelope] dataschema` template; placeholder values are
/// percent-encoded, so every rendering is a valid absolute URI.
#[derive(Debug, Clone)]
struct SchemaTemplate {
    template: Template,
}

/// The placeholders `envelope.dataschema` accepts.
const SCHEMA_FIELDS: &[Field] = &[Field::EventType, Field::EventVersion, Field::AggregateType];

impl SchemaTemplate {
    fn parse(template: &str) -> Result<SchemaTemplate, String> {
        let schema = SchemaTemplate { template: Template::parse(template, SCHEMA_FIELDS)? };
        let sample = schema.render_with("OrderPlaced", 1, "Order");
        match check_uri_reference(&sample) {
            Ok(true) if sample.contains('#') => Err(format!(
                "renders {sample:?}, which has a fragment ('#'): dataschema must be an absolute URI without one"
            )),
            Ok(true) if sample.split_once(':').is_some_and(|(_, after)| after.is_empty()) => {
                Err(format!("renders {sample:?}, which has nothing after the scheme"))
            }
            Ok(true) => Ok(schema),
            Ok(false) => Err(format!(
                "renders {sample:?}, which is not an absolute URI: start it with a scheme, e.g. \"https://schemas.example.com/{{event_type}}/v{{event_version}}.json\""
            )),
            Err(why) => Err(format!("renders {sample:?}, which is not a valid URI ({why})")),
        }
    }

    fn render(&self, event: &OutboxEvent) -> String {
        self.render_with(&event.event_type, event.event_version, &event.aggregate_type)
    }

    fn render_with(&self, event_type: &str, event_version: i32, aggregate_type: &str) -> String {
        let mut out = String::with_capacity(96);
        self.template.render_into(&mut out, |field, out| match field {
            Field::EventType => percent_encode_into(out, event_type),
            Field::EventVersion => out.push_str(&event_version.to_string()),
            Field::AggregateType => percent_encode_into(out, aggregate_type),
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{EnvelopeMapper, TopicTemplate};
    use chrono::TimeZone;
    use serde_json::value::RawValue;
    use serde_json::{json, Value};
    use uuid::Uuid;

    fn event() -> OutboxEvent {
        OutboxEvent {
            position: 1,
            event_id: Uuid::parse_str("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11").unwrap(),
            aggregate_type: "Order".into(),
            aggregate_id: "42".into(),
            event_type: "OrderPlaced".into(),
            event_version: 2,
            payload: crate::event::Payload::Json(RawValue::from_string(r#"{"total_cents": 1999, "items": [1, 2]}"#.into()).unwrap()),
            headers: Some(
                RawValue::from_string(r#"{"tenant": "acme", "tracestate": "rojo=00f067aa0ba902b7", "shard": 7, "big": 12345678901, "ok": true, "tags": ["a"]}"#.into())
                    .unwrap(),
            ),
            actor: Some("user-7".into()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            topic: None,
            created_at: chrono::Utc.with_ymd_and_hms(2026, 11, 22, 7, 38, 0).unwrap()
                + chrono::Duration::microseconds(123_456),
        }
    }

    fn config(format: EnvelopeFormat) -> EnvelopeConfig {
        EnvelopeConfig { format, ..EnvelopeConfig::default() }
    }

    fn mapper(config: &EnvelopeConfig) -> EnvelopeMapper {
        EnvelopeMapper::new(TopicTemplate::parse("outbox.{aggregate_type}").unwrap(), config, "outbox.events").unwrap()
    }

    fn header<'m>(headers: &'m Headers, name: &str) -> Option<&'m str> {
        headers.iter().find(|(n, _)| n == name).map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    #[test]
    fn structured_value_is_a_cloudevent_with_raw_payload_as_data() {
        let msg = mapper(&config(EnvelopeFormat::CloudEventsStructured)).to_message(&event()).unwrap();
        assert_eq!(msg.key, "42");
        assert_eq!(msg.topic, "outbox.Order");
        assert_eq!(msg.headers.len(), 1);
        assert_eq!(header(&msg.headers, "content-type"), Some("application/cloudevents+json; charset=UTF-8"));
        let text = std::str::from_utf8(&msg.value).unwrap();
        // The payload is spliced in as written, whitespace and all.
        assert!(text.ends_with(r#","data":{"total_cents": 1999, "items": [1, 2]}}"#), "{text}");
        let value: Value = serde_json::from_slice(&msg.value).unwrap();
        assert_eq!(
            value,
            json!({
                "specversion": "1.0",
                "id": "6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11",
                "source": "/outbox-relay/outbox.events",
                "type": "OrderPlaced.v2",
                "subject": "42",
                "time": "2026-11-22T07:38:00.123456Z",
                "datacontenttype": "application/json",
                "aggregatetype": "Order",
                "eventversion": 2,
                "actor": "user-7",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "tracestate": "rojo=00f067aa0ba902b7",
                "partitionkey": "42",
                "data": {"total_cents": 1999, "items": [1, 2]},
            })
        );
    }

    #[test]
    fn structured_omits_optional_extensions_when_the_row_has_none() {
        let mut e = event();
        e.actor = None;
        e.traceparent = None;
        e.headers = None;
        let msg = mapper(&config(EnvelopeFormat::CloudEventsStructured)).to_message(&e).unwrap();
        let value: Value = serde_json::from_slice(&msg.value).unwrap();
        for absent in ["actor", "traceparent", "tracestate", "dataschema"] {
            assert!(value.get(absent).is_none(), "{absent} in {value}");
        }
        // tracestate alone (no traceparent) is meaningless and not sent.
        let mut e = event();
        e.traceparent = None;
        let value: Value = serde_json::from_slice(
            &mapper(&config(EnvelopeFormat::CloudEventsStructured)).to_message(&e).unwrap().value,
        )
        .unwrap();
        assert!(value.get("tracestate").is_none());
    }

    #[test]
    fn binary_puts_attributes_in_ce_headers_and_the_payload_in_the_value() {
        let msg = mapper(&config(EnvelopeFormat::CloudEventsBinary)).to_message(&event()).unwrap();
        assert_eq!(msg.key, "42");
        assert_eq!(msg.value, br#"{"total_cents": 1999, "items": [1, 2]}"#);
        let names: Vec<&str> = msg.headers.iter().map(|(n, _)| n.as_ref()).collect();
        assert_eq!(
            names,
            [
                "ce_specversion",
                "ce_id",
                "ce_source",
                "ce_type",
                "ce_subject",
                "ce_time",
                "content-type",
                "ce_aggregatetype",
                "ce_eventversion",
                "ce_actor",
                "ce_traceparent",
                "ce_tracestate",
                "ce_partitionkey",
            ]
        );
        let h = |n| header(&msg.headers, n);
        assert_eq!(h("ce_specversion"), Some("1.0"));
        assert_eq!(h("ce_id"), Some("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"));
        assert_eq!(h("ce_source"), Some("/outbox-relay/outbox.events"));
        assert_eq!(h("ce_type"), Some("OrderPlaced.v2"));
        assert_eq!(h("ce_subject"), Some("42"));
        assert_eq!(h("ce_time"), Some("2026-11-22T07:38:00.123456Z"));
        assert_eq!(h("content-type"), Some("application/json"));
        assert_eq!(h("ce_aggregatetype"), Some("Order"));
        assert_eq!(h("ce_eventversion"), Some("2"));
        assert_eq!(h("ce_partitionkey"), Some("42"));
        // None of the native headers.
        assert!(h("event_id").is_none() && h("envelope_version").is_none() && h("traceparent").is_none());
    }

    #[test]
    fn type_version_modes_and_dataschema_template() {
        let mut c = config(EnvelopeFormat::CloudEventsBinary);
        c.type_version = TypeVersion::Dataschema;
        c.dataschema = "https://schemas.example.com/{aggregate_type}/{event_type}/v{event_version}.json".into();
        let mut e = event();
        e.event_type = "Order Placed/ü".into();
        let msg = mapper(&c).to_message(&e).unwrap();
        assert_eq!(header(&msg.headers, "ce_type"), Some("Order Placed/ü"));
        assert_eq!(
            header(&msg.headers, "ce_dataschema"),
            Some("https://schemas.example.com/Order/Order%20Placed%2F%C3%BC/v2.json")
        );
        assert_eq!(check_uri_reference(header(&msg.headers, "ce_dataschema").unwrap()), Ok(true));

        c.type_version = TypeVersion::None;
        c.dataschema.clear();
        let msg = mapper(&c).to_message(&event()).unwrap();
        assert_eq!(header(&msg.headers, "ce_type"), Some("OrderPlaced"));
        assert!(header(&msg.headers, "ce_dataschema").is_none());
        assert_eq!(header(&msg.headers, "ce_eventversion"), Some("2"));

        // A template with suffix mode sets both.
        c.type_version = TypeVersion::Suffix;
        c.dataschema = "urn:schema:{event_type}:{event_version}".into();
        let msg = mapper(&c).to_message(&event()).unwrap();
        assert_eq!(header(&msg.headers, "ce_type"), Some("OrderPlaced.v2"));
        assert_eq!(header(&msg.headers, "ce_dataschema"), Some("urn:schema:OrderPlaced:2"));
    }

    #[test]
    fn header_extensions_copy_typed_fields_of_the_row_headers() {
        let mut c = config(EnvelopeFormat::CloudEventsStructured);
        c.header_extensions = [
            ("tenant", "tenant"),
            ("shard", "shard"),
            ("big", "big"),
            ("ok", "ok"),
            ("tags", "tags"),
            ("missing", "nope"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .collect();
        let msg = mapper(&c).to_message(&event()).unwrap();
        let value: Value = serde_json::from_slice(&msg.value).unwrap();
        assert_eq!(value["tenant"], "acme");
        assert_eq!(value["shard"], 7);
        assert_eq!(value["big"], "12345678901", "beyond 32 bits: text");
        assert_eq!(value["ok"], true);
        assert_eq!(value["tags"], r#"["a"]"#);
        assert!(value.get("missing").is_none());

        c.format = EnvelopeFormat::CloudEventsBinary;
        let msg = mapper(&c).to_message(&event()).unwrap();
        assert_eq!(header(&msg.headers, "ce_tenant"), Some("acme"));
        assert_eq!(header(&msg.headers, "ce_shard"), Some("7"));
        assert_eq!(header(&msg.headers, "ce_ok"), Some("true"));
    }

    #[test]
    fn configured_source_is_used_and_default_is_derived_from_the_table() {
        let mut c = config(EnvelopeFormat::CloudEventsStructured);
        assert_eq!(CloudEvents::from_config(&c, "public.outbox").unwrap().source(), "/outbox-relay/public.outbox");
        c.source = "https://orders.example.com/outbox".into();
        let msg = mapper(&c).to_message(&event()).unwrap();
        let value: Value = serde_json::from_slice(&msg.value).unwrap();
        assert_eq!(value["source"], "https://orders.example.com/outbox");
    }

    fn problem(c: &EnvelopeConfig) -> EnvelopeConfigError {
        CloudEvents::from_config(c, "outbox.events").unwrap_err()
    }

    #[test]
    fn source_must_be_a_uri_reference() {
        let mut c = config(EnvelopeFormat::CloudEventsBinary);
        for good in
            ["/orders", "orders", "urn:example:orders", "https://a.example.com:8443/x?y=1#z", "//[::1]/x", "a%20b"]
        {
            c.source = good.into();
            assert!(CloudEvents::from_config(&c, "t").is_ok(), "{good}");
        }
        for bad in [" ", "has space", "1http://x", "a%2", "ü", "a#b#c", "/x[1]", "{x}"] {
            c.source = bad.into();
            let err = problem(&c);
            assert_eq!(err.key, "envelope.source", "{bad}");
            assert!(err.problem.contains("not a URI-reference"), "{bad}: {err}");
        }
    }

    #[test]
    fn uri_errors_say_what_to_change() {
        assert_eq!(check_uri_reference("https://x.example.com/a%20b"), Ok(true));
        assert_eq!(check_uri_reference("/relative?q=1#f"), Ok(false));
        let hint = |text: &str| check_uri_reference(text).unwrap_err();
        assert!(hint("a%2").contains("'%' must start a percent-encoding"), "{}", hint("a%2"));
        assert!(hint("ü").contains("must be percent-encoded"), "{}", hint("ü"));
        assert!(hint("a b").contains("' ' is not allowed"), "{}", hint("a b"));
        assert!(hint("1http://x").contains("first segment may not contain ':'"), "{}", hint("1http://x"));
        assert!(hint("").contains("empty"));
        let mut out = String::new();
        percent_encode_into(&mut out, "Order Placed/ü~x");
        assert_eq!(out, "Order%20Placed%2F%C3%BC~x");
    }

    #[test]
    fn dataschema_rules() {
        let mut c = config(EnvelopeFormat::CloudEventsStructured);
        c.type_version = TypeVersion::Dataschema;
        let err = problem(&c);
        assert_eq!(err.key, "envelope.dataschema");
        assert!(err.problem.contains("is required"), "{err}");
        c.dataschema = "/schemas/{event_type}.json".into();
        assert!(problem(&c).problem.contains("not an absolute URI"), "{}", problem(&c));
        c.dataschema = "https://s.example.com/{event_name}.json".into();
        assert!(problem(&c).problem.contains("unknown placeholder {event_name}"), "{}", problem(&c));
        c.dataschema = "https://s.example.com/{event_type.json".into();
        assert!(problem(&c).problem.contains("unclosed"), "{}", problem(&c));
        c.dataschema = "https://s.example.com/x.json#v{event_version}".into();
        assert!(problem(&c).problem.contains("fragment"), "{}", problem(&c));
        c.dataschema = "https://s.example.com/my schemas/{event_type}".into();
        assert!(problem(&c).problem.contains("not a valid URI"), "{}", problem(&c));
        c.dataschema = "https://schemas.example.com/{event_type}/v{event_version}.json".into();
        CloudEvents::from_config(&c, "t").unwrap();
    }

    #[test]
    fn extension_names_are_lowercase_alphanumeric_up_to_20_and_not_reserved() {
        let mut c = config(EnvelopeFormat::CloudEventsStructured);
        for (bad, why) in [
            ("Tenant", "lowercase"),
            ("tenant_id", "lowercase"),
            ("", "1 to 20"),
            ("abcdefghijklmnopqrstu", "1 to 20"),
            ("subject", "already sets"),
            ("partitionkey", "already sets"),
        ] {
            c.header_extensions = [(bad.to_owned(), "x".to_owned())].into();
            let err = problem(&c);
            assert_eq!(err.key, "envelope.header_extensions");
            assert!(err.problem.contains(why), "{bad}: {err}");
        }
        c.header_extensions = [("abcdefghijklmnopqrst".to_owned(), "x".to_owned())].into();
        CloudEvents::from_config(&c, "t").unwrap();
        c.header_extensions = [("tenant".to_owned(), String::new())].into();
        assert!(problem(&c).problem.contains("header field is empty"));
    }

    #[test]
    fn config_load_reads_the_envelope_section_and_rejects_bad_values_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let base = "[postgres]\nurl = \"postgres://a@b/c\"\n[sink.kafka]\nbrokers = \"k:9092\"\n";
        std::fs::write(
            &path,
            format!(
                "{base}[envelope]\nformat = \"cloudevents-binary\"\nsource = \"urn:orders\"\ntype_version = \"none\"\n\
                 [envelope.header_extensions]\ntenant = \"tenant_id\"\n"
            ),
        )
        .unwrap();
        let loaded = crate::startup::load(Some(&path)).unwrap();
        assert_eq!(loaded.envelope.format, EnvelopeFormat::CloudEventsBinary);
        assert_eq!(loaded.envelope.source, "urn:orders");
        assert_eq!(loaded.envelope.type_version, TypeVersion::None);
        assert_eq!(loaded.envelope.header_extensions["tenant"], "tenant_id");

        std::fs::write(&path, base).unwrap();
        let defaults = crate::startup::load(Some(&path)).unwrap();
        assert_eq!(defaults.envelope.format, EnvelopeFormat::Native);
        assert_eq!(defaults.envelope.type_version, TypeVersion::Suffix);

        for (section, key) in [
            ("format = \"cloudevents\"", "format"),
            ("source = \"not a uri\"", "envelope.source"),
            ("type_version = \"dataschema\"", "envelope.dataschema"),
            ("dataschema = \"https://x.example.com/{type}\"", "envelope.dataschema"),
            ("[envelope.header_extensions]\nTenant = \"t\"", "envelope.header_extensions"),
        ] {
            std::fs::write(&path, format!("{base}[envelope]\n{section}\n")).unwrap();
            let msg = crate::startup::load(Some(&path)).unwrap_err().to_string();
            assert!(msg.contains(key), "{section}: {msg}");
        }
    }
}
