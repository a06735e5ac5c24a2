//! One [`OutgoingMessage`] as a Pub/Sub `PubsubMessage`, encoded once, when
//! it is enqueued.
//!
//! | Pub/Sub field | from |
//! |---|---|
//! | `data` | the message value: the same bytes the Kafka sink sends |
//! | `orderingKey` | the message key (the aggregate id) |
//! | `attributes` | the headers, by name; `ce_<name>` (CloudEvents Kafka binding) becomes `ce-<name>` (Pub/Sub binding) |
//! | `attributes.aggregate_type`, `attributes.aggregate_id` | non-CloudEvents messages only: from the value's `aggregate_type` field and the key |
//!
//! CloudEvents messages (those with a `content-type` header) keep exactly
//! the binding's attributes, so a CloudEvents SDK sees nothing foreign.
//! Pub/Sub's limits are checked here, so a message that can never be
//! accepted fails permanently at once instead of failing its whole request.

use std::borrow::Cow;

use base64::Engine as _;
use serde::ser::{SerializeMap, Serializer as _};

use crate::sink::{OutgoingMessage, PublishError};

/// Largest message Pub/Sub accepts (data plus attributes plus ordering key).
pub const MAX_MESSAGE_BYTES: usize = 10_000_000;
/// Most attributes per message.
const MAX_ATTRIBUTES: usize = 100;
/// Longest attribute name.
const MAX_ATTRIBUTE_KEY: usize = 256;
/// Longest attribute value.
const MAX_ATTRIBUTE_VALUE: usize = 1024;
/// Longest ordering key.
const MAX_ORDERING_KEY: usize = 1024;

/// A message encoded for the publish request body.
#[derive(Debug)]
pub struct Prepared {
    /// Outbox position, for logs.
    pub position: i64,
    /// Topic id (validated).
    pub topic: String,
    /// Ordering key; requests never mix keys (Pub/Sub rejects that).
    pub key: String,
    /// `{"data":"<base64>","attributes":{..},"orderingKey":".."}`.
    pub json: Vec<u8>,
}

/// The Pub/Sub attributes of a message, in header order.
pub fn attributes(message: &OutgoingMessage) -> Result<Vec<(Cow<'_, str>, &str)>, String> {
    let mut out: Vec<(Cow<'_, str>, &str)> = Vec::with_capacity(message.headers.len() + 2);
    let mut cloudevents = false;
    for (name, value) in &message.headers {
        let value = std::str::from_utf8(value)
            .map_err(|_| format!("header {name:?} is not UTF-8 text, which Pub/Sub attributes must be"))?;
        let name: Cow<'_, str> = match name.strip_prefix("ce_") {
            Some(rest) => Cow::Owned(format!("ce-{rest}")),
            None => Cow::Borrowed(name.as_ref()),
        };
        cloudevents |= name == "content-type";
        out.push((name, value));
    }
    if !cloudevents {
        if !out.iter().any(|(n, _)| n == "aggregate_type") {
            if let Some(aggregate_type) = peek_aggregate_type(&message.value) {
                out.push((Cow::Borrowed("aggregate_type"), aggregate_type));
            }
        }
        if !out.iter().any(|(n, _)| n == "aggregate_id") {
            out.push((Cow::Borrowed("aggregate_id"), &message.key));
        }
    }
    if out.len() > MAX_ATTRIBUTES {
        return Err(format!("{} attributes; Pub/Sub allows at most {MAX_ATTRIBUTES}", out.len()));
    }
    for (i, (name, value)) in out.iter().enumerate() {
        if name.is_empty() || name.len() > MAX_ATTRIBUTE_KEY {
            return Err(format!("attribute name {name:?} must be 1-{MAX_ATTRIBUTE_KEY} bytes"));
        }
        if name.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("goog")) {
            return Err(format!("attribute name {name:?} starts with \"goog\", which Pub/Sub reserves"));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE {
            return Err(format!(
                "attribute {name:?} is {} bytes; Pub/Sub allows at most {MAX_ATTRIBUTE_VALUE} (shorten the row's value)",
                value.len()
            ));
        }
        if out[..i].iter().any(|(other, _)| other == name) {
            return Err(format!("attribute {name:?} appears twice"));
        }
    }
    Ok(out)
}

/// The envelope's `aggregate_type` field (native envelope v1 and dead
/// letters carry it at the top level); `None` if the value has none.
fn peek_aggregate_type(value: &[u8]) -> Option<&str> {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        aggregate_type: Option<&'a str>,
    }
    serde_json::from_slice::<Peek<'_>>(value).ok().and_then(|p| p.aggregate_type)
}

/// Encodes one message, or says why Pub/Sub can never accept it.
pub fn prepare(message: &OutgoingMessage) -> Result<Prepared, PublishError> {
    let permanent =
        |reason: String| PublishError { reason: format!("Pub/Sub topic {}: {reason}", message.topic), permanent: true };
    super::topic::check_topic_name(&message.topic)
        .map_err(|e| permanent(format!("{e}: fix the row's topic or sink.topic")))?;
    if message.key.len() > MAX_ORDERING_KEY {
        return Err(permanent(format!(
            "ordering key (aggregate id) is {} bytes; Pub/Sub allows at most {MAX_ORDERING_KEY}",
            message.key.len()
        )));
    }
    let attributes = attributes(message).map_err(permanent)?;
    let size =
        message.value.len() + message.key.len() + attributes.iter().map(|(n, v)| n.len() + v.len()).sum::<usize>();
    if size > MAX_MESSAGE_BYTES {
        return Err(permanent(format!(
            "message is {size} bytes; Pub/Sub accepts at most {MAX_MESSAGE_BYTES} (data plus attributes): make the payload smaller"
        )));
    }
    if message.value.is_empty() && attributes.is_empty() {
        return Err(permanent("message has neither data nor attributes, which Pub/Sub rejects".into()));
    }
    let mut json = Vec::with_capacity(message.value.len() * 4 / 3 + 64 + size - message.value.len());
    let mut writer = serde_json::Serializer::new(&mut json);
    let encode = |e: serde_json::Error| permanent(format!("cannot encode the message: {e}"));
    let mut map = writer.serialize_map(None).map_err(encode)?;
    map.serialize_entry("data", &base64::engine::general_purpose::STANDARD.encode(&message.value)).map_err(encode)?;
    map.serialize_entry("attributes", &Attributes(&attributes)).map_err(encode)?;
    if !message.key.is_empty() {
        map.serialize_entry("orderingKey", &message.key).map_err(encode)?;
    }
    map.end().map_err(encode)?;
    Ok(Prepared { position: message.position, topic: message.topic.clone(), key: message.key.clone(), json })
}

/// Serializes attribute pairs as a JSON object, in order.
struct Attributes<'a, 'b>(&'b [(Cow<'a, str>, &'a str)]);

impl serde::Serialize for Attributes<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(n, v)| (n.as_ref(), *v)))
    }
}

/// The body of one publish request: `{"messages":[m1,m2,..]}`.
pub fn request_body<'a>(messages: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = Vec::with_capacity(4096);
    body.extend_from_slice(b"{\"messages\":[");
    for (i, message) in messages.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(message);
    }
    body.extend_from_slice(b"]}");
    body
}

/// Bytes a message adds to a request body.
pub fn encoded_len(prepared: &Prepared) -> usize {
    prepared.json.len() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn native() -> OutgoingMessage {
        OutgoingMessage {
            position: 7,
            topic: "outbox.Order".into(),
            key: "42".into(),
            value: br#"{"envelope_version":"1","event_id":"e","event_type":"OrderPlaced","event_version":1,"aggregate_type":"Order","aggregate_id":"42","payload":{"aggregate_type":"nested"}}"#.to_vec(),
            headers: vec![
                (Cow::Borrowed("event_id"), b"e".to_vec()),
                (Cow::Borrowed("event_type"), b"OrderPlaced".to_vec()),
                (Cow::Borrowed("event_version"), b"1".to_vec()),
                (Cow::Borrowed("envelope_version"), b"1".to_vec()),
                (Cow::Borrowed("traceparent"), b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec()),
            ],
            timestamp_ms: None,
            tombstone: false,
        }
    }

    fn decoded(message: &OutgoingMessage) -> Value {
        serde_json::from_slice(&prepare(message).unwrap().json).unwrap()
    }

    #[test]
    fn native_message_keeps_headers_adds_aggregate_and_data_is_the_value() {
        let message = native();
        let wire = decoded(&message);
        assert_eq!(
            wire["attributes"],
            json!({
                "event_id": "e", "event_type": "OrderPlaced", "event_version": "1", "envelope_version": "1",
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "aggregate_type": "Order", "aggregate_id": "42",
            })
        );
        assert_eq!(wire["orderingKey"], "42");
        let data = base64::engine::general_purpose::STANDARD.decode(wire["data"].as_str().unwrap()).unwrap();
        assert_eq!(data, message.value, "data is the Kafka value byte for byte");
    }

    #[test]
    fn cloudevents_binary_headers_become_ce_dash_attributes_and_nothing_else() {
        let mut message = native();
        message.value = br#"{"total":1}"#.to_vec();
        message.headers = vec![
            (Cow::Borrowed("ce_specversion"), b"1.0".to_vec()),
            (Cow::Borrowed("ce_id"), b"e".to_vec()),
            (Cow::Borrowed("content-type"), b"application/json".to_vec()),
            (Cow::Owned("ce_tenant".into()), b"acme".to_vec()),
        ];
        let wire = decoded(&message);
        assert_eq!(
            wire["attributes"],
            json!({"ce-specversion": "1.0", "ce-id": "e", "content-type": "application/json", "ce-tenant": "acme"})
        );
    }

    #[test]
    fn structured_cloudevents_has_only_content_type() {
        let mut message = native();
        message.headers =
            vec![(Cow::Borrowed("content-type"), b"application/cloudevents+json; charset=UTF-8".to_vec())];
        assert_eq!(
            decoded(&message)["attributes"],
            json!({"content-type": "application/cloudevents+json; charset=UTF-8"})
        );
    }

    #[test]
    fn dead_letters_get_aggregate_attributes_too() {
        let mut message = native();
        message.value = br#"{"position":7,"aggregate_type":null,"error":"x"}"#.to_vec();
        message.headers = vec![(Cow::Borrowed("error"), b"x".to_vec())];
        assert_eq!(decoded(&message)["attributes"], json!({"error": "x", "aggregate_id": "42"}));
    }

    #[test]
    fn limits_fail_permanently_naming_topic_and_rule() {
        let mut message = native();
        message.topic = "1bad".into();
        let err = prepare(&message).unwrap_err();
        assert!(
            err.permanent && err.reason.contains("\"1bad\"") && err.reason.contains("start with a letter"),
            "{err}"
        );

        let mut message = native();
        message.value = vec![b'x'; MAX_MESSAGE_BYTES + 1];
        let err = prepare(&message).unwrap_err();
        assert!(
            err.permanent && err.reason.contains("outbox.Order") && err.reason.contains("at most 10000000"),
            "{err}"
        );

        let mut message = native();
        message.headers.push((Cow::Borrowed("error"), vec![b'e'; 1025]));
        let err = prepare(&message).unwrap_err();
        assert!(err.permanent && err.reason.contains("\"error\" is 1025 bytes"), "{err}");

        let mut message = native();
        message.headers.push((Cow::Borrowed("bin"), vec![0xff, 0xfe]));
        assert!(prepare(&message).unwrap_err().reason.contains("not UTF-8"));

        let mut message = native();
        message.key = "k".repeat(1025);
        assert!(prepare(&message).unwrap_err().reason.contains("ordering key"));
    }

    #[test]
    fn request_body_joins_messages() {
        let a = prepare(&native()).unwrap();
        let b = prepare(&native()).unwrap();
        let body = request_body([a.json.as_slice(), b.json.as_slice()].into_iter());
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["messages"].as_array().unwrap().len(), 2);
        assert_eq!(body.len(), 2 + "{\"messages\":[".len() + encoded_len(&a) + encoded_len(&b) - 1);
    }
}
