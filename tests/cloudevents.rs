//! End-to-end: `[envelope] format` with the real binary, a private Postgres
//! and a real Kafka-protocol broker. CloudEvents messages are read back and
//! parsed by an independent implementation, the CloudEvents Python SDK
//! (`tests/cloudevents_parse.py`), which the tests install on first use into
//! `.tools/pyce` with pip. The native format is checked byte for byte.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use common::relay::{connect, migrate, relay_env, unpublished, RelayProcess};
use common::{consume, Consumed, TestBroker};
use outbox_relay::demo::postgres::ThrowawayPostgres;
use serde_json::{json, Value};

const TOPIC: &str = "outbox.Order";

/// The SDK release the tests parse with (`pip install cloudevents==...`).
const CLOUDEVENTS_SDK: &str = "2.2.0";

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One outbox row as the relay reads it.
#[derive(Debug)]
struct Row {
    event_id: String,
    aggregate_id: String,
    event_type: String,
    event_version: i32,
    payload: String,
    headers: String,
    actor: Option<String>,
    traceparent: Option<String>,
    /// `created_at` formatted like the envelopes: RFC 3339 UTC, six digits.
    created: String,
}

impl Row {
    fn header_field(&self, name: &str) -> Option<Value> {
        let headers: Value = serde_json::from_str(&self.headers).unwrap();
        headers.get(name).cloned()
    }
}

struct Setup {
    pg: ThrowawayPostgres,
    broker: TestBroker,
}

fn setup() -> Setup {
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    migrate(&pg.url());
    Setup { pg, broker }
}

/// Writes events that cover every optional attribute being present and
/// absent, several event versions, and payloads of each JSON kind.
async fn write_sample_events(pg_url: &str) -> Vec<Row> {
    let client = connect(pg_url).await;
    let enqueue = "SELECT outbox.enqueue('Order', $1, $2, $3::text::jsonb, $4, $5::text::jsonb, $6, $7)";
    let events: [(&str, &str, &str, i32, &str, Option<&str>, Option<&str>); 5] = [
        (
            "ord-1",
            "OrderPlaced",
            r#"{"order_id": 1, "total_cents": 1999, "note": "ünïcode ✓ \"quoted\""}"#,
            2,
            r#"{"tenant": "acme", "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "shard": 3}"#,
            Some("user:1017"),
            Some(TRACEPARENT),
        ),
        ("ord-1", "OrderPaid", "[1, 2, 3]", 1, "{}", None, None),
        ("ord-2", "OrderNoted", r#""just a string""#, 1, r#"{"tenant": "globex"}"#, Some("svc:billing"), Some(TRACEPARENT)),
        // tracestate without traceparent: not carried (it means nothing alone).
        (
            "ord-3",
            "OrderCancelled",
            r#"{"nested": {"a": [true, null, 1.5]}}"#,
            3,
            r#"{"tracestate": "rojo=1", "tenant": null}"#,
            None,
            None,
        ),
        ("ord-3", "OrderArchived", "42", 1, "{}", Some(""), None),
    ];
    for (aggregate_id, event_type, payload, version, headers, actor, traceparent) in events {
        client
            .execute(enqueue, &[&aggregate_id, &event_type, &payload, &version, &headers, &actor, &traceparent])
            .await
            .expect("enqueue event");
    }
    client
        .query(
            "SELECT event_id::text, aggregate_id, event_type, event_version, payload::text, headers::text, actor, traceparent, \
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM outbox.events ORDER BY id",
            &[],
        )
        .await
        .expect("read rows back")
        .iter()
        .map(|r| Row {
            event_id: r.get(0),
            aggregate_id: r.get(1),
            event_type: r.get(2),
            event_version: r.get(3),
            payload: r.get(4),
            headers: r.get(5),
            actor: r.get(6),
            traceparent: r.get(7),
            created: r.get(8),
        })
        .collect()
}

/// Writes the sample events, runs the relay with `extra_env` until all are
/// published, and returns the rows and the messages read back.
async fn relay_samples(extra_env: &[(&'static str, &str)]) -> (Vec<Row>, Vec<Consumed>) {
    let s = setup();
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

fn row_for<'r>(rows: &'r [Row], event_id: &str) -> &'r Row {
    rows.iter().find(|r| r.event_id == event_id).unwrap_or_else(|| panic!("no row with event_id {event_id}"))
}

fn header<'m>(message: &'m Consumed, name: &str) -> Option<&'m str> {
    message.headers.iter().find(|(n, _)| n == name).map(|(_, v)| std::str::from_utf8(v).expect("utf-8 header"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `.tools/pyce` with the CloudEvents SDK, installed with pip on first use.
fn pyce_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools");
        let dir = tools.join("pyce");
        let marker = dir.join(format!("cloudevents-{CLOUDEVENTS_SDK}.dist-info"));
        if marker.is_dir() {
            return dir;
        }
        // Install next to it, then rename, so an interrupted install never
        // leaves a half-filled .tools/pyce behind.
        let staging = tools.join(format!("pyce.installing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&tools).expect("create .tools");
        let output = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "--target"])
            .arg(&staging)
            .arg(format!("cloudevents=={CLOUDEVENTS_SDK}"))
            .stdin(Stdio::null())
            .output()
            .expect("run `python3 -m pip` (python3 with pip is needed to install the CloudEvents SDK the tests parse with)");
        assert!(
            output.status.success() && staging.join(format!("cloudevents-{CLOUDEVENTS_SDK}.dist-info")).is_dir(),
            "`python3 -m pip install --target {} cloudevents=={CLOUDEVENTS_SDK}` failed: {}{}",
            staging.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&staging, &dir).is_err() && !marker.is_dir() {
            panic!("could not move {} to {}", staging.display(), dir.display());
        }
        let _ = std::fs::remove_dir_all(&staging);
        dir
    })
}

/// Parses the messages with the Python SDK; one `{attributes, data}` each.
fn parse_with_sdk(mode: &str, messages: &[Consumed]) -> Vec<Value> {
    let request = json!({
        "mode": mode,
        "messages": messages.iter().map(|m| json!({
            "key": m.key.as_deref().map(hex),
            "headers": m.headers.iter().map(|(n, v)| json!([n, hex(v)])).collect::<Vec<_>>(),
            "value": hex(&m.value),
        })).collect::<Vec<_>>(),
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cloudevents_parse.py");
    let mut child = Command::new("python3")
        .arg("-I")
        .arg(&script)
        .arg(pyce_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 tests/cloudevents_parse.py");
    child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the CloudEvents SDK rejected the messages: {}\nmessages: {request}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&output.stdout).expect("parser prints JSON");
    assert_eq!(parsed.len(), messages.len());
    parsed
}

/// What the SDK must report for `row`. Binary mode carries every attribute
/// as a header string, so integers come back as text there.
fn expected_attributes(row: &Row, binary: bool, source: &str, ty: &str, dataschema: Option<String>, extensions: &[(&str, &str)]) -> Value {
    let int = |n: i64| if binary { json!(n.to_string()) } else { json!(n) };
    let mut attributes = json!({
        "specversion": "1.0",
        "id": row.event_id,
        "source": source,
        "type": ty,
        "subject": row.aggregate_id,
        "time": row.created,
        "datacontenttype": "application/json",
        "aggregatetype": "Order",
        "eventversion": int(i64::from(row.event_version)),
        "partitionkey": row.aggregate_id,
    });
    let map = attributes.as_object_mut().unwrap();
    if let Some(dataschema) = dataschema {
        map.insert("dataschema".into(), json!(dataschema));
    }
    if let Some(actor) = row.actor.as_deref().filter(|a| !a.is_empty()) {
        map.insert("actor".into(), json!(actor));
    }
    if let Some(traceparent) = &row.traceparent {
        map.insert("traceparent".into(), json!(traceparent));
        if let Some(tracestate) = row.header_field("tracestate") {
            map.insert("tracestate".into(), tracestate);
        }
    }
    for (extension, field) in extensions {
        match row.header_field(field) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => {
                map.insert((*extension).into(), int(n.as_i64().unwrap()));
            }
            Some(value) => {
                map.insert((*extension).into(), value);
            }
        }
    }
    attributes
}

fn assert_round_trip(parsed: &Value, expected: &Value, row: &Row) {
    assert_eq!(parsed["attributes"], *expected, "attributes of event {}", row.event_id);
    let payload: Value = serde_json::from_str(&row.payload).unwrap();
    assert_eq!(parsed["data"], payload, "data of event {}", row.event_id);
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
    let parsed = parse_with_sdk("structured", &consumed);
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
    let parsed = parse_with_sdk("binary", &consumed);
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
