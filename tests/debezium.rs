//! A drop-in for Debezium outbox users: Debezium's documented outbox table,
//! the Quarkus extension's variant (varchar payload, insert-then-delete) and
//! a partitioned one (bytea payload), in both capture modes, read back from
//! the tansu broker the way a consumer of Debezium's Event Router reads them:
//! topic, key bytes, value bytes, `id` header, record timestamp.

mod common;

use std::time::{Duration, Instant};

use chrono::NaiveDateTime;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use common::relay::{connect, RelayProcess};
use common::{TestBroker, ThrowawayPostgres};
use outbox_relay::config::{Config, PublishedMode};
use outbox_relay::outbox::{deleted_by_others_problem, position_column_problem, OutboxTable};

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const AGGREGATE_TYPES: [&str; 2] = ["Order", "Customer"];

/// What a Debezium consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    topic: String,
    key: Vec<u8>,
    /// None: a null value (tombstone).
    value: Option<Vec<u8>>,
    headers: Vec<(String, Vec<u8>)>,
    timestamp_ms: i64,
}

/// Debezium's outbox table as documented, with `seq` for polling if asked.
fn debezium_table(seq: bool) -> String {
    format!(
        "CREATE TABLE public.outbox (
           id uuid NOT NULL PRIMARY KEY,
           aggregatetype varchar(255) NOT NULL,
           aggregateid varchar(255) NOT NULL,
           type varchar(255) NOT NULL,
           timestamp timestamp NOT NULL,
           payload jsonb,
           tracingspancontext varchar(256){});",
        if seq { ",\n seq bigint GENERATED ALWAYS AS IDENTITY" } else { "" }
    )
}

/// The Quarkus Debezium outbox extension's table (payload varchar).
const QUARKUS_TABLE: &str = "CREATE TABLE public.outbox (
    id uuid NOT NULL PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    timestamp timestamp NOT NULL,
    payload varchar(8000),
    tracingspancontext varchar(256));";

/// A partitioned outbox (hash on the aggregate) with a bytea payload.
fn partitioned_table(seq: bool) -> String {
    format!(
        "CREATE TABLE public.outbox (
           id uuid NOT NULL,
           aggregatetype varchar(255) NOT NULL,
           aggregateid varchar(255) NOT NULL,
           type varchar(255) NOT NULL,
           timestamp timestamp NOT NULL,
           payload bytea,
           tracingspancontext varchar(256),{}
           PRIMARY KEY (id, aggregateid)) PARTITION BY HASH (aggregateid);
         CREATE TABLE public.outbox_p0 PARTITION OF public.outbox FOR VALUES WITH (MODULUS 2, REMAINDER 0);
         CREATE TABLE public.outbox_p1 PARTITION OF public.outbox FOR VALUES WITH (MODULUS 2, REMAINDER 1);",
        if seq { "\n seq bigserial," } else { "" }
    )
}

/// The relay's configuration for `public.outbox` in Debezium's layout.
fn config_toml(mode: &str, published: &str, position: &str) -> String {
    format!(
        r#"
[source]
table = "public.outbox"
mode = "{mode}"
poll_interval = "200ms"
[source.columns]
position = "{position}"
event_id = "id"
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
payload = "payload"
created_at = "timestamp"
traceparent = "tracingspancontext"
event_version = ""
headers = ""
actor = ""
topic = ""
published_at = ""
attempts = ""
last_error = ""
failed_at = ""
dead_lettered_at = ""
[published]
mode = "{published}"
[envelope]
format = "debezium"
[envelope.debezium]
additional_placement = ["type:header:eventType"]
[http]
listen = "127.0.0.1:0"
[shutdown]
drain_timeout = "10s"
"#
    )
}

struct Setup {
    pg: ThrowawayPostgres,
    broker: TestBroker,
    _dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
}

/// A cluster whose TimeZone is not UTC (a `timestamp` column must still be
/// read as UTC), a broker with the routed topics, the table and the config.
async fn setup(table_sql: &str, mode: &str, published: &str, position: &str) -> Setup {
    let pg = ThrowawayPostgres::start().expect("postgres");
    let broker = TestBroker::start();
    for aggregate_type in AGGREGATE_TYPES {
        broker.create_topic(&format!("outbox.event.{aggregate_type}"), 2);
    }
    let client = connect(&pg.url()).await;
    client.batch_execute("ALTER SYSTEM SET timezone = 'Asia/Kolkata'").await.unwrap();
    client.batch_execute("SELECT pg_reload_conf()").await.unwrap();
    client.batch_execute(table_sql).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, config_toml(mode, published, position)).unwrap();
    let env = vec![
        ("OUTBOX_RELAY_CONFIG", path.display().to_string()),
        ("OUTBOX_RELAY_POSTGRES__URL", pg.url()),
        ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", broker.bootstrap()),
    ];
    let (code, out, err) = common::relay::cli(&["migrate"], &env);
    assert_eq!(code, 0, "migrate: {out}\n{err}");
    Setup { pg, broker, _dir: dir, env }
}

/// One outbox row as the application writes it, and what Debezium's router
/// would publish for it.
struct Written {
    expected: Record,
}

/// The payload column's type.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Jsonb,
    Varchar,
    Bytea,
}

/// Writes `n` events as `(aggregate type, aggregate id)` round robin; with
/// `delete`, each is deleted in the transaction that inserted it (Quarkus).
async fn write(client: &tokio_postgres::Client, n: usize, kind: Kind, delete: bool) -> Vec<Written> {
    let payload_sql = match kind {
        Kind::Jsonb => "$6::text::jsonb",
        Kind::Varchar => "$6::text",
        Kind::Bytea => "decode($6::text, 'hex')",
    };
    let mut written = Vec::with_capacity(n);
    let base = NaiveDateTime::parse_from_str("2026-12-02 05:34:49.143595", "%Y-%m-%d %H:%M:%S%.f").unwrap();
    for i in 0..n {
        let id = uuid::Uuid::new_v4();
        let aggregate_type = AGGREGATE_TYPES[i % 2];
        let aggregate_id = format!("{}-{}", aggregate_type.to_lowercase(), i % 5);
        let event_type = format!("{aggregate_type}Created");
        let at = base + chrono::Duration::milliseconds(1_000 * i as i64 + 7);
        // jsonb normalizes spacing and key order: the value is Postgres's text output.
        let json = format!(r#"{{"seq":{i},  "b": [1,2], "a":"é {i}"}}"#);
        // Binary: bytes that are not UTF-8 (a protobuf-like frame).
        let bytes: Vec<u8> = vec![0x0a, 0x00, 0xff, 0xfe, i as u8, b'x'];
        let payload = match kind {
            Kind::Bytea => bytes.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            _ => json.clone(),
        };
        let tracing = if i % 2 == 0 {
            format!("#\n#Wed Dec 02 05:34:49 UTC 2026\ntraceparent={TRACEPARENT}\n")
        } else {
            TRACEPARENT.to_owned()
        };
        let insert = format!(
            "INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, timestamp, payload, tracingspancontext) \
             VALUES ($1::text::uuid, $2, $3, $4, $5::text::timestamp, {payload_sql}, $7)"
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] = [
            &id.to_string(),
            &aggregate_type,
            &aggregate_id,
            &event_type,
            &at.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            &payload,
            &tracing,
        ];
        if delete {
            client.batch_execute("BEGIN").await.unwrap();
            client.execute(&insert, &params).await.unwrap();
            client.execute("DELETE FROM public.outbox WHERE id = $1::text::uuid", &[&id.to_string()]).await.unwrap();
            client.batch_execute("COMMIT").await.unwrap();
        } else {
            client.execute(&insert, &params).await.unwrap();
        }
        // What Debezium's StringConverter emits: jsonb as Postgres's text
        // output (spacing and key order normalized), text as is, bytes as is.
        let value: Vec<u8> = match kind {
            Kind::Jsonb => client
                .query_one("SELECT $1::text::jsonb::text", &[&json])
                .await
                .unwrap()
                .get::<_, String>(0)
                .into_bytes(),
            Kind::Varchar => json.into_bytes(),
            Kind::Bytea => bytes,
        };
        written.push(Written {
            expected: Record {
                topic: format!("outbox.event.{aggregate_type}"),
                key: aggregate_id.into_bytes(),
                value: Some(value),
                headers: vec![
                    ("id".into(), id.to_string().into_bytes()),
                    ("traceparent".into(), TRACEPARENT.as_bytes().to_vec()),
                    ("eventType".into(), event_type.into_bytes()),
                ],
                timestamp_ms: at.and_utc().timestamp_millis(),
            },
        });
    }
    written
}

/// Reads every partition of the routed topics until `expected` records or `timeout`.
fn consume(bootstrap: &str, expected: usize, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "debezium-consumer")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for aggregate_type in AGGREGATE_TYPES {
        for partition in 0..2 {
            assignment
                .add_partition_offset(&format!("outbox.event.{aggregate_type}"), partition, Offset::Beginning)
                .unwrap();
        }
    }
    consumer.assign(&assignment).unwrap();
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| h.iter().map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default();
                let timestamp_ms = match m.timestamp() {
                    Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t,
                    Timestamp::NotAvailable => -1,
                };
                records.push(Record {
                    topic: m.topic().to_owned(),
                    key: m.key().unwrap_or_default().to_vec(),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp_ms,
                });
            }
            Some(Err(e)) => eprintln!("consume: {e}"),
            None => {}
        }
        if records.len() >= expected && quiet_since.elapsed() > Duration::from_secs(1) {
            break;
        }
    }
    records
}

/// Every written event arrives exactly as Debezium's router would publish
/// it, each aggregate in write order.
fn assert_debezium_records(records: &[Record], written: &[Written], log: impl Fn() -> String) {
    assert_eq!(records.len(), written.len(), "{records:#?}\n{}", log());
    for w in written {
        let found = records.iter().find(|r| r.headers.first() == w.expected.headers.first());
        let Some(found) = found else { panic!("missing {:?}\n{}", w.expected, log()) };
        assert_eq!(found, &w.expected, "{}", log());
    }
    for key in records.iter().map(|r| r.key.clone()).collect::<std::collections::BTreeSet<_>>() {
        let got: Vec<_> = records.iter().filter(|r| r.key == key).map(|r| r.headers[0].1.clone()).collect();
        let want: Vec<_> =
            written.iter().filter(|w| w.expected.key == key).map(|w| w.expected.headers[0].1.clone()).collect();
        assert_eq!(got, want, "aggregate {:?} out of order", String::from_utf8_lossy(&key));
    }
    // One message as a consumer sees it, for the report.
    if let Some(r) = records.first() {
        eprintln!(
            "SAMPLE topic={} key={:?} value={:?} headers={:?} timestamp={}",
            r.topic,
            String::from_utf8_lossy(&r.key),
            r.value.as_deref().map(String::from_utf8_lossy),
            r.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())).collect::<Vec<_>>(),
            r.timestamp_ms
        );
    }
}

fn test_config(s: &Setup, position: &str, published: PublishedMode) -> Config {
    let mut config = Config::default();
    config.postgres.url = s.pg.url();
    config.source.table = "public.outbox".into();
    config.source.columns.position = position.into();
    config.source.columns.published_at = String::new();
    config.published.mode = published;
    config
}

const N: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_table_by_polling_with_a_seq_column() {
    let s = setup(&debezium_table(false), "poll", "delete", "seq").await;
    let client = connect(&s.pg.url()).await;
    // GIVEN Debezium's table as is: polling says what is missing and how to add it
    let table = OutboxTable::from_config(&test_config(&s, "id", PublishedMode::Delete)).unwrap();
    let problem = position_column_problem(&client, &table).await.unwrap().expect("uuid id cannot order a poll");
    for needle in [
        "source.columns.position",
        "uuid",
        "ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY",
        "CREATE INDEX",
        "replication",
    ] {
        assert!(problem.contains(needle), "{needle}: {problem}");
    }
    client
        .batch_execute("ALTER TABLE public.outbox ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY; CREATE INDEX ON public.outbox (seq);")
        .await
        .unwrap();
    let table = OutboxTable::from_config(&test_config(&s, "seq", PublishedMode::Delete)).unwrap();
    assert_eq!(position_column_problem(&client, &table).await.unwrap(), None);
    // WHEN the application writes events
    let written = write(&client, N, Kind::Jsonb, false).await;
    // THEN check lists the topics the Event Router routes them to (which exist), not sink.topic's
    let (_, out, err) = common::relay::cli(&["check"], &s.env);
    let topics = out.lines().find(|l| l.contains("topics")).unwrap_or_default().to_owned();
    assert!(
        topics.contains("[ ok ]") && topics.contains(&format!("{} topic(s)", AGGREGATE_TYPES.len())),
        "{out}\n{err}"
    );
    // AND the relay polls them
    let relay = RelayProcess::start(&["run"], &s.env);
    // THEN a Debezium consumer reads what the Event Router would have sent
    let records = consume(&s.broker.bootstrap(), N, Duration::from_secs(60));
    assert_debezium_records(&records, &written, || relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_table_by_replication_needs_no_position_column() {
    // GIVEN Debezium's table untouched (uuid id), published.mode none
    let s = setup(&debezium_table(false), "replication", "none", "id").await;
    let client = connect(&s.pg.url()).await;
    let relay = RelayProcess::start(&["run"], &s.env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    // WHEN the application writes events
    let written = write(&client, N, Kind::Jsonb, false).await;
    // THEN a Debezium consumer reads what the Event Router would have sent
    let records = consume(&s.broker.bootstrap(), N, Duration::from_secs(60));
    assert_debezium_records(&records, &written, || relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_refuses_to_mark_rows_without_an_integer_position() {
    let s = setup(&debezium_table(false), "replication", "delete", "id").await;
    let mut relay = RelayProcess::start(&["run"], &s.env);
    let said = relay.wait_for_log("published.mode = \\\"none\\\"", Duration::from_secs(20))
        || relay.wait_for_log("published.mode = \"none\"", Duration::from_secs(1));
    assert!(said, "{}", relay.log());
    assert!(relay.log().contains("ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY"), "{}", relay.log());
    relay.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarkus_insert_then_delete_by_replication() {
    // GIVEN the Quarkus extension's table, rows deleted in the inserting transaction
    let s = setup(QUARKUS_TABLE, "replication", "none", "id").await;
    let client = connect(&s.pg.url()).await;
    let relay = RelayProcess::start(&["run"], &s.env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let written = write(&client, N, Kind::Varchar, true).await;
    // THEN every event arrives; the varchar payload as is
    let records = consume(&s.broker.bootstrap(), N, Duration::from_secs(60));
    assert_debezium_records(&records, &written, || relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarkus_insert_then_delete_by_polling_is_detected() {
    let s = setup(
        &format!("{QUARKUS_TABLE} ALTER TABLE public.outbox ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY;"),
        "poll",
        "delete",
        "seq",
    )
    .await;
    let client = connect(&s.pg.url()).await;
    let _ = write(&client, N, Kind::Varchar, true).await;
    client.query_one("SELECT pg_stat_force_next_flush()", &[]).await.unwrap();
    let table = OutboxTable::from_config(&test_config(&s, "seq", PublishedMode::Delete)).unwrap();
    // Statistics arrive asynchronously: wait for the finding.
    let deadline = Instant::now() + Duration::from_secs(20);
    let finding = loop {
        if let Some(finding) = deleted_by_others_problem(&client, &table, Some(0)).await.unwrap() {
            break finding;
        }
        assert!(Instant::now() < deadline, "no finding after inserts and deletes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for needle in [format!("{N} inserts"), "source.mode = \"replication\"".into(), "remove-after-insert".into()] {
        assert!(finding.contains(&needle), "{needle}: {finding}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_bytea_outbox_by_replication() {
    // GIVEN a partitioned outbox: migrate publishes it via its root
    let s = setup(&partitioned_table(false), "replication", "none", "id").await;
    let client = connect(&s.pg.url()).await;
    let via_root: bool = client
        .query_one("SELECT pubviaroot FROM pg_publication WHERE pubname = 'outbox_relay_pub'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(via_root);
    let relay = RelayProcess::start(&["run"], &s.env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let written = write(&client, N, Kind::Bytea, false).await;
    // THEN rows of both partitions arrive as the root's, bytea as its bytes
    let records = consume(&s.broker.bootstrap(), N, Duration::from_secs(60));
    assert_debezium_records(&records, &written, || relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_bytea_outbox_by_polling() {
    let s = setup(&partitioned_table(true), "poll", "delete", "seq").await;
    let client = connect(&s.pg.url()).await;
    let written = write(&client, N, Kind::Bytea, false).await;
    let relay = RelayProcess::start(&["run"], &s.env);
    let records = consume(&s.broker.bootstrap(), N, Duration::from_secs(60));
    assert_debezium_records(&records, &written, || relay.log());
}
