//! CloudEvents checks shared by the Kafka (`tests/cloudevents.rs`) and
//! Pub/Sub (`tests/pubsub.rs`) end-to-end tests: one set of sample rows, the
//! attributes they must turn into, and the CloudEvents Python SDK as the
//! independent parser (installed into `.tools/pyce` on first use).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

use super::relay::connect;

/// The SDK release the tests parse with (`pip install cloudevents==...`).
pub const CLOUDEVENTS_SDK: &str = "2.2.0";

/// A W3C traceparent some sample rows carry.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// One outbox row as the relay reads it.
#[derive(Debug)]
pub struct Row {
    pub event_id: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub event_version: i32,
    pub payload: String,
    pub headers: String,
    pub actor: Option<String>,
    pub traceparent: Option<String>,
    /// `created_at` formatted like the envelopes: RFC 3339 UTC, six digits.
    pub created: String,
}

impl Row {
    /// A field of the row's `headers` JSON.
    pub fn header_field(&self, name: &str) -> Option<Value> {
        serde_json::from_str::<Value>(&self.headers).expect("headers column is JSON").get(name).cloned()
    }
}

/// aggregate_id, event_type, payload, event_version, headers, actor, traceparent.
type SampleEvent =
    (&'static str, &'static str, &'static str, i32, &'static str, Option<&'static str>, Option<&'static str>);

/// Every optional attribute present and absent, several event versions,
/// each JSON kind of payload, and values that need escaping in a URI or a
/// header (`%`, spaces, non-ASCII).
const SAMPLE_EVENTS: [SampleEvent; 5] = [
    (
        "ord-1",
        "OrderPlaced",
        r#"{"order_id": 1, "total_cents": 1999, "note": "ünïcode ✓ \"quoted\" 100%"}"#,
        2,
        r#"{"tenant": "acme", "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE", "shard": 3}"#,
        Some("user:1017"),
        Some(TRACEPARENT),
    ),
    ("ord-1", "OrderPaid", "[1, 2, 3]", 1, "{}", None, None),
    (
        "ord-2",
        "OrderNoted",
        r#""just a string""#,
        1,
        r#"{"tenant": "glo bex%"}"#,
        Some("svc:billing"),
        Some(TRACEPARENT),
    ),
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

/// Writes the sample events and reads them back as the relay will see them.
pub async fn write_sample_events(pg_url: &str) -> Vec<Row> {
    let client = connect(pg_url).await;
    let enqueue = "SELECT outbox.enqueue('Order', $1, $2, $3::text::jsonb, $4, $5::text::jsonb, $6, $7)";
    for (aggregate_id, event_type, payload, version, headers, actor, traceparent) in SAMPLE_EVENTS {
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

/// The row with `event_id`.
pub fn row_for<'r>(rows: &'r [Row], event_id: &str) -> &'r Row {
    rows.iter().find(|r| r.event_id == event_id).unwrap_or_else(|| panic!("no row with event_id {event_id}"))
}

/// Lowercase hex, how bytes travel to the Python parsers.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `.tools/pyce` with the CloudEvents SDK, installed with pip on first use.
///
/// Safe on a fresh clone with tests running in parallel: within a process
/// the install runs once (the `OnceLock`); across processes each installs
/// into its own staging directory (a fresh temporary directory, not one
/// named by process id, which every test thread shares) and renames it
/// into place, and a process that loses the race uses the winner's copy.
pub fn pyce_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools");
        let dir = tools.join("pyce");
        let marker = format!("cloudevents-{CLOUDEVENTS_SDK}.dist-info");
        if dir.join(&marker).is_dir() {
            return dir;
        }
        std::fs::create_dir_all(&tools).expect("create .tools");
        let staging = tempfile::Builder::new()
            .prefix("pyce.installing-")
            .tempdir_in(&tools)
            .expect("staging directory in .tools");
        let output = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input", "--target"])
            .arg(staging.path())
            .arg(format!("cloudevents=={CLOUDEVENTS_SDK}"))
            .stdin(Stdio::null())
            .output()
            .expect(
                "run `python3 -m pip` (python3 with pip is needed to install the CloudEvents SDK the tests parse with)",
            );
        assert!(
            output.status.success() && staging.path().join(&marker).is_dir(),
            "`python3 -m pip install --target {} cloudevents=={CLOUDEVENTS_SDK}` failed: {}{}",
            staging.path().display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if dir.exists() && !dir.join(&marker).is_dir() {
            // Another SDK version, or a copy left half-filled by an older harness: move it aside.
            let old = tempfile::Builder::new().prefix("pyce.old-").tempdir_in(&tools).expect("directory in .tools");
            let _ = std::fs::rename(&dir, old.path().join("pyce"));
        }
        // Fails only if another process put its copy in place first: then use that one.
        let _ = std::fs::rename(staging.path(), &dir);
        assert!(dir.join(&marker).is_dir(), "the CloudEvents SDK is not in {}", dir.display());
        dir
    })
}

/// Runs `tests/<script>` (the CloudEvents SDK reading `messages` in `mode`,
/// "structured" or "binary"); one `{attributes, data}` per message.
pub fn parse_with_sdk(script: &str, mode: &str, messages: Vec<Value>) -> Vec<Value> {
    let count = messages.len();
    let request = json!({ "mode": mode, "messages": messages });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(script);
    let mut child = Command::new("python3")
        .arg("-I")
        .arg(&script)
        .arg(pyce_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run python3 {}: {e}", script.display()));
    child.stdin.take().expect("piped stdin").write_all(request.to_string().as_bytes()).expect("write to the parser");
    let output = child.wait_with_output().expect("parser output");
    assert!(
        output.status.success(),
        "the CloudEvents SDK rejected the messages: {}\nmessages: {request}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<Value> = serde_json::from_slice(&output.stdout).expect("parser prints JSON");
    assert_eq!(parsed.len(), count);
    parsed
}

/// What the SDK must report for `row`: `extensions` maps an extension name
/// to the `headers` field it copies. Binary mode carries every attribute as
/// a string (a header or a Pub/Sub attribute), so integers come back as text there.
pub fn expected_attributes(
    row: &Row,
    binary: bool,
    source: &str,
    ty: &str,
    dataschema: Option<String>,
    extensions: &[(&str, &str)],
) -> Value {
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
    let map = attributes.as_object_mut().expect("an object");
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
                map.insert((*extension).into(), int(n.as_i64().expect("integer header field")));
            }
            Some(value) => {
                map.insert((*extension).into(), value);
            }
        }
    }
    attributes
}

/// The SDK's reading of one event matches `expected` and the row's payload.
pub fn assert_round_trip(parsed: &Value, expected: &Value, row: &Row) {
    assert_eq!(parsed["attributes"], *expected, "attributes of event {}", row.event_id);
    let payload: Value = serde_json::from_str(&row.payload).expect("payload is JSON");
    assert_eq!(parsed["data"], payload, "data of event {}", row.event_id);
}
