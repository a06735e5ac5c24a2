//! End-to-end: `[envelope] format` with the real binary, a private Postgres
//! and a real Kafka-protocol broker. CloudEvents messages are read back and
//! parsed by an independent implementation, the CloudEvents Python SDK
//! (`tests/cloudevents_parse.py`), which the tests install on first use into
//! `.tools/pyce` with pip. The native format is checked byte for byte.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::cloudevents::{
    assert_round_trip, expected_attributes, hex, parse_with_sdk, row_for, write_sample_events, Row,
};
use common::relay::{connect, relay_env, unpublished, RelayProcess, Stack};
use common::{consume, Consumed};
use serde_json::{json, Value};

const TOPIC: &str = "outbox.Order";

/// Writes the sample events, runs the relay with `extra_env` until all are
/// published, and returns the rows and the messages read back.
async fn relay_samples(extra_env: &[(&'static str, &str)]) -> (Vec<Row>, Vec<Consumed>) {
    let s = Stack::start(TOPIC, 4);
    let rows = write_sample_events(&s.pg.url()).await;
    let mut env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    env.extend(extra_env.iter().map(|(k, v)| (*k, v.to_string())));
    let relay = RelayProcess::start(&["run"], &env);
    let client = connect(&s.pg.url()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while unpublished(&client).await > 0 {
        assert!(std::time::Instant::now() < deadline, "events not published; relay log:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], rows.len(), Duration::from_secs(30));
    assert_eq!(consumed.len(), rows.len(), "one message per row; relay log:\n{}", relay.log());
    drop(relay);
    (rows, consumed)
}

fn header<'m>(message: &'m Consumed, name: &str) -> Option<&'m str> {
    message.headers.iter().find(|(n, _)| n == name).map(|(_, v)| std::str::from_utf8(v).expect("utf-8 header"))
}

/// Kafka messages as `tests/cloudevents_parse.py` reads them.
fn parse_kafka_messages(mode: &str, messages: &[Consumed]) -> Vec<Value> {
    let messages = messages
        .iter()
        .map(|m| {
            json!({
                "key": m.key.as_deref().map(hex),
                "headers": m.headers.iter().map(|(n, v)| json!([n, hex(v)])).collect::<Vec<_>>(),
                "value": hex(&m.value),
            })
        })
        .collect();
    parse_with_sdk("cloudevents_parse.py", mode, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_format_is_the_default_and_unchanged() {
    // GIVEN a relay with no [envelope] settings
    let (rows, consumed) = relay_samples(&[]).await;

    // THEN every message is envelope v1, byte for byte, with its routing headers
    for message in &consumed {
        let row = row_for(&rows, header(message, "event_id").expect("event_id header"));
        let s = |text: &str| serde_json::to_string(text).unwrap();
        let expected = format!(
            r#"{{"envelope_version":"1","event_id":"{}","event_type":{},"event_version":{},"aggregate_type":"Order","aggregate_id":{},"timestamp":"{}","actor":{},"headers":{},"payload":{}}}"#,
            row.event_id,
            s(&row.event_type),
            row.event_version,
            s(&row.aggregate_id),
            row.created,
            row.actor.as_deref().map_or("null".into(), s),
            row.headers,
            row.payload,
        );
        assert_eq!(std::str::from_utf8(&message.value).unwrap(), expected);
        assert_eq!(message.key.as_deref(), Some(row.aggregate_id.as_bytes()));
        let mut expected_headers = vec![
            ("event_id".to_owned(), row.event_id.clone()),
            ("event_type".to_owned(), row.event_type.clone()),
            ("event_version".to_owned(), row.event_version.to_string()),
            ("envelope_version".to_owned(), "1".to_owned()),
        ];
        if let Some(traceparent) = &row.traceparent {
            expected_headers.push(("traceparent".to_owned(), traceparent.clone()));
        }
        let headers: Vec<(String, String)> =
            message.headers.iter().map(|(n, v)| (n.clone(), String::from_utf8(v.clone()).unwrap())).collect();
        assert_eq!(headers, expected_headers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_mode_round_trips_through_the_cloudevents_sdk() {
    // GIVEN a relay in structured mode with the default source and type suffix,
    // copying two header fields into extensions
    let (rows, consumed) = relay_samples(&[
        ("OUTBOX_RELAY_ENVELOPE__FORMAT", "cloudevents-structured"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__TENANT", "tenant"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__SHARD", "shard"),
    ])
    .await;

    // THEN each message has only the structured content-type header and the aggregate key
    for message in &consumed {
        let headers: Vec<&str> = message.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(headers, ["content-type"]);
        assert_eq!(header(message, "content-type"), Some("application/cloudevents+json; charset=UTF-8"));
        // AND the payload is spliced in as written (jsonb's text form), not re-serialized
        let value: Value = serde_json::from_slice(&message.value).unwrap();
        let row = row_for(&rows, value["id"].as_str().unwrap());
        let text = std::str::from_utf8(&message.value).unwrap();
        assert!(text.ends_with(&format!(r#","data":{}}}"#, row.payload)), "{text}");
        assert_eq!(value["time"], row.created.as_str(), "time is formatted like the native timestamp");
        assert_eq!(message.key.as_deref(), Some(row.aggregate_id.as_bytes()));
    }

    // AND the CloudEvents SDK reads every attribute and the data back
    let parsed = parse_kafka_messages("structured", &consumed);
    for event in &parsed {
        let row = row_for(&rows, event["attributes"]["id"].as_str().unwrap());
        let ty = format!("{}.v{}", row.event_type, row.event_version);
        let extensions = [("tenant", "tenant"), ("shard", "shard")];
        let expected = expected_attributes(row, false, "/outbox-relay/outbox.events", &ty, None, &extensions);
        assert_round_trip(event, &expected, row);
    }
    let versions: BTreeMap<&str, &Value> =
        parsed.iter().map(|e| (e["attributes"]["type"].as_str().unwrap(), &e["attributes"]["eventversion"])).collect();
    assert_eq!(versions["OrderPlaced.v2"], &json!(2), "eventversion is a JSON integer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_round_trips_through_the_cloudevents_sdk() {
    // GIVEN a relay in binary mode with a configured source and the version in dataschema
    let (rows, consumed) = relay_samples(&[
        ("OUTBOX_RELAY_ENVELOPE__FORMAT", "cloudevents-binary"),
        ("OUTBOX_RELAY_ENVELOPE__SOURCE", "https://orders.example.com/outbox"),
        ("OUTBOX_RELAY_ENVELOPE__TYPE_VERSION", "dataschema"),
        ("OUTBOX_RELAY_ENVELOPE__DATASCHEMA", "https://schemas.example.com/{event_type}/v{event_version}.json"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__TENANT", "tenant"),
    ])
    .await;

    // THEN the value is the payload exactly, content-type is the data's, and
    // attributes are ce_ headers (none of the native headers)
    for message in &consumed {
        let row = row_for(&rows, header(message, "ce_id").expect("ce_id header"));
        assert_eq!(std::str::from_utf8(&message.value).unwrap(), row.payload);
        assert_eq!(message.key.as_deref(), Some(row.aggregate_id.as_bytes()));
        assert_eq!(header(message, "content-type"), Some("application/json"));
        assert_eq!(header(message, "ce_specversion"), Some("1.0"));
        assert_eq!(header(message, "ce_time"), Some(row.created.as_str()));
        for name in ["event_id", "event_type", "event_version", "envelope_version", "traceparent"] {
            assert!(header(message, name).is_none(), "native header {name} in binary mode");
        }
        for (name, _) in &message.headers {
            assert!(name == "content-type" || name.starts_with("ce_"), "unexpected header {name}");
        }
    }

    // AND the CloudEvents SDK reads every attribute and the data back
    let parsed = parse_kafka_messages("binary", &consumed);
    for event in &parsed {
        let row = row_for(&rows, event["attributes"]["id"].as_str().unwrap());
        let dataschema = format!("https://schemas.example.com/{}/v{}.json", row.event_type, row.event_version);
        let expected = expected_attributes(
            row,
            true,
            "https://orders.example.com/outbox",
            &row.event_type,
            Some(dataschema),
            &[("tenant", "tenant")],
        );
        assert_round_trip(event, &expected, row);
    }
}

#[test]
fn invalid_envelope_settings_exit_2_naming_the_key() {
    for (key, value, named) in [
        ("OUTBOX_RELAY_ENVELOPE__FORMAT", "cloudevents", "format"),
        ("OUTBOX_RELAY_ENVELOPE__SOURCE", "not a uri", "envelope.source"),
        ("OUTBOX_RELAY_ENVELOPE__TYPE_VERSION", "dataschema", "envelope.dataschema"),
        ("OUTBOX_RELAY_ENVELOPE__DATASCHEMA", "/schemas/{event_type}.json", "envelope.dataschema"),
        ("OUTBOX_RELAY_ENVELOPE__DATASCHEMA", "https://s.example.com/{type}.json", "envelope.dataschema"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__TENANT_ID", "tenant", "envelope.header_extensions"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
            .arg("run")
            .env_remove("RUST_LOG")
            .env("OUTBOX_RELAY_POSTGRES__URL", "postgres://relay@127.0.0.1:9/app")
            .env("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9")
            .env(key, value)
            .stdin(Stdio::null())
            .output()
            .expect("run outbox-relay");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{key}={value}: {stderr}");
        assert!(stderr.contains(named), "{key}={value}: {stderr}");
    }
}
