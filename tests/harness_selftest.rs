//! Proves the test harness itself works before anything relies on it: the
//! throwaway Postgres (start, fast stop, crash stop, restarts) and the tansu
//! broker with an idempotent producer and the `consume` helper, and the
//! order checker every delivery test trusts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::relay::{check_order, verify, Numbering};
use common::{consume, Consumed, StopMode, TestBroker, ThrowawayPostgres};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_postgres::NoTls;

async fn query(url: &str, sql: &str) -> String {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to throwaway postgres");
    let driver = tokio::spawn(connection);
    let value: String = client.query_one(sql, &[]).await.expect(sql).get(0);
    drop(client);
    let _ = driver.await;
    value
}

#[tokio::test]
async fn throwaway_postgres_starts_stops_crashes_and_restarts() {
    let mut pg = tokio::task::spawn_blocking(ThrowawayPostgres::start).await.unwrap().expect("start postgres");
    assert!(pg.is_running());
    assert_eq!(pg.url(), format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port()));
    assert_eq!(query(&pg.url(), "SHOW wal_level").await, "logical");

    // Data written before a stop must survive both kinds of restart.
    let (client, connection) = tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    client.batch_execute("CREATE TABLE t (n int); INSERT INTO t VALUES (1)").await.unwrap();

    pg.stop(StopMode::Fast).unwrap();
    assert!(!pg.is_running());
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "old session must be gone");
    let _ = driver.await;
    pg.start_again().unwrap();
    assert!(pg.is_running());
    assert_eq!(query(&pg.url(), "SELECT count(*)::text FROM t").await, "1");

    let (client, connection) = tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
    let driver = tokio::spawn(connection);
    client.batch_execute("INSERT INTO t VALUES (2)").await.unwrap();
    pg.stop(StopMode::Immediate).unwrap();
    assert!(!pg.is_running());
    let _ = driver.await;
    pg.start_again().unwrap();
    assert_eq!(query(&pg.url(), "SELECT count(*)::text FROM t").await, "2");
    let log = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(log.contains("database system was interrupted"), "crash restart replays WAL:\n{log}");
    assert_eq!(query(&pg.url(), "SHOW wal_level").await, "logical");

    // Replication connections are allowed (pg_hba) and slots can be made.
    let slot =
        query(&pg.url(), "SELECT slot_name::text FROM pg_create_logical_replication_slot('s', 'pgoutput')").await;
    assert_eq!(slot, "s");
    let psql = std::process::Command::new("psql")
        .arg(format!("{}?replication=database", pg.url()))
        .args(["-XAt", "-c", "IDENTIFY_SYSTEM"])
        .output();
    match psql {
        Ok(out) => assert!(out.status.success(), "replication connection: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => eprintln!("psql not available ({e}); replication connection not checked"),
    }

    let dir = pg.log_path().parent().unwrap().to_path_buf();
    drop(pg);
    assert!(!dir.exists(), "drop removes {}", dir.display());
}

#[tokio::test]
async fn tansu_takes_1000_idempotent_messages_and_consume_reads_them_in_key_order() {
    let broker = TestBroker::start();
    broker.create_topic("selftest", 4);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("create producer");
    let mut deliveries = Vec::new();
    for i in 0..1000u32 {
        let key = format!("key-{}", i % 10);
        let value = format!("{}:{}", key, i / 10);
        let record = FutureRecord::to("selftest").key(&key).payload(&value).headers(
            rdkafka::message::OwnedHeaders::new()
                .insert(rdkafka::message::Header { key: "n", value: Some(&i.to_string()) }),
        );
        deliveries.push(producer.send_result(record).expect("enqueue"));
    }
    for delivery in deliveries {
        delivery.await.expect("delivery future").expect("delivered");
    }

    let bootstrap = broker.bootstrap();
    let consumed =
        tokio::task::spawn_blocking(move || consume(&bootstrap, &["selftest"], 1000, Duration::from_secs(30)))
            .await
            .unwrap();
    assert_eq!(consumed.len(), 1000);
    let mut next: HashMap<Vec<u8>, u32> = HashMap::new();
    let mut partitions = std::collections::HashSet::new();
    for message in &consumed {
        let key = message.key.clone().expect("keyed");
        let expected = next.entry(key.clone()).or_insert(0);
        let want = format!("{}:{}", String::from_utf8_lossy(&key), expected);
        assert_eq!(String::from_utf8_lossy(&message.value), want, "per-key order");
        assert_eq!(message.headers.len(), 1);
        *expected += 1;
        partitions.insert(message.partition);
    }
    assert!(next.values().all(|&n| n == 100), "{next:?}");
    assert!(partitions.len() > 1, "keys spread over partitions: {partitions:?}");

    // A restarted broker listens on the same port, but empty (memory storage).
    let mut broker = broker;
    broker.stop();
    broker.start_again();
    broker.create_topic("selftest", 4);
    let bootstrap = broker.bootstrap();
    let after = tokio::task::spawn_blocking(move || consume(&bootstrap, &["selftest"], 0, Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(after.is_empty());
}

/// A message of aggregate `order-{aggregate}` with `payload.seq = seq`, at `offset` of one partition.
fn message(aggregate: usize, seq: i64, offset: i64) -> Consumed {
    let key = format!("order-{aggregate}");
    let value =
        serde_json::json!({"event_id": format!("{aggregate}-{seq}"), "aggregate_id": key, "payload": {"seq": seq}});
    Consumed {
        topic: "outbox.Order".into(),
        partition: 0,
        offset,
        key: Some(key.into_bytes()),
        value: serde_json::to_vec(&value).unwrap(),
        headers: Vec::new(),
        timestamp_ms: None,
    }
}

fn messages(sequence: &[(usize, i64)]) -> Vec<Consumed> {
    sequence.iter().enumerate().map(|(offset, &(aggregate, seq))| message(aggregate, seq, offset as i64)).collect()
}

#[test]
fn the_order_checker_is_strict_for_contiguous_numbering_and_allows_gaps_only_when_told() {
    // GIVEN two aggregates delivered in order, 1..=3 each, interleaved
    let clean = messages(&[(0, 1), (1, 1), (0, 2), (1, 2), (0, 3), (1, 3)]);
    let verdict = verify(&clean, 2, 3);
    assert_eq!((verdict.unique, verdict.lost, verdict.duplicates, verdict.order_violations), (6, 0, 0, 0));

    // WHEN one aggregate's events swap, THEN both numberings call it a violation
    let swapped = messages(&[(0, 1), (1, 1), (0, 3), (1, 2), (0, 2), (1, 3)]);
    assert!(verify(&swapped, 2, 3).order_violations > 0);
    assert!(check_order(&swapped, Numbering::Increasing).order_violations > 0);

    // WHEN an earlier event is delivered again, THEN it is a duplicate, not a violation
    let mut again = clean;
    again.push(message(0, 2, 6));
    let verdict = verify(&again, 2, 3);
    assert_eq!((verdict.duplicates, verdict.order_violations), (1, 0));

    // WHEN numbers skip (one counter shared by all aggregates), THEN only
    // the contiguous rule objects; a missing event is loss either way
    let gaps = messages(&[(0, 1), (1, 2), (0, 3), (1, 4)]);
    assert_eq!(check_order(&gaps, Numbering::Increasing).order_violations, 0);
    assert!(check_order(&gaps, Numbering::Contiguous).order_violations > 0);
    assert_eq!(verify(&messages(&[(0, 1), (0, 2), (1, 1)]), 2, 2).lost, 1);
}
