//! End-to-end: polling capture -> real Kafka-protocol broker, with the real
//! binary, a private Postgres and crashes on purpose.

mod common;

use std::time::Duration;

use common::consume;
use common::relay::{connect, relay_env, verify, wait_all_published, write_events, RelayProcess, Stack};

const TOPIC: &str = "outbox.Order";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivers_10k_events_over_100_aggregates_once_in_order_with_envelope() {
    // GIVEN a relay running against an outbox that four writers fill concurrently
    let s = Stack::start(TOPIC, 8);
    let relay = RelayProcess::start(&["run"], &relay_env(&s.pg.url(), &s.broker.bootstrap()));
    write_events(&s.pg.url(), 100, 100, 4, Duration::ZERO).await;

    // WHEN every row has been published
    let client = connect(&s.pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN each event arrived exactly once, in per-aggregate order
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 10_000, Duration::from_secs(60));
    let verdict = verify(&consumed, 100, 100);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.duplicates, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert_eq!(consumed.len(), 10_000);

    // AND the envelope, key and headers match the row
    let rows = client
        .query(
            "SELECT event_id::text, aggregate_id, traceparent, \
                    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
             FROM outbox.events",
            &[],
        )
        .await
        .unwrap();
    let by_id: std::collections::HashMap<String, (String, Option<String>, String)> =
        rows.iter().map(|r| (r.get::<_, String>(0), (r.get(1), r.get(2), r.get(3)))).collect();
    let mut with_trace = 0;
    for message in &consumed {
        let value: serde_json::Value = serde_json::from_slice(&message.value).unwrap();
        let event_id = value["event_id"].as_str().unwrap();
        let (aggregate_id, traceparent, created) = &by_id[event_id];
        assert_eq!(value["envelope_version"], "1");
        assert_eq!(value["event_type"], "OrderUpdated");
        assert_eq!(value["event_version"], 1);
        assert_eq!(value["aggregate_type"], "Order");
        assert_eq!(&value["aggregate_id"], aggregate_id.as_str());
        assert_eq!(value["timestamp"].as_str().unwrap(), created);
        assert!(value["payload"].is_object(), "payload is JSON, not a string");
        assert_eq!(value["headers"], serde_json::json!({}));
        assert_eq!(message.key.as_deref(), Some(aggregate_id.as_bytes()));
        let header = |name: &str| {
            message.headers.iter().find(|(n, _)| n == name).map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(header("event_id").as_deref(), Some(event_id));
        assert_eq!(header("event_type").as_deref(), Some("OrderUpdated"));
        assert_eq!(header("event_version").as_deref(), Some("1"));
        assert_eq!(header("envelope_version").as_deref(), Some("1"));
        assert_eq!(header("traceparent"), *traceparent);
        with_trace += traceparent.is_some() as usize;
    }
    assert_eq!(with_trace, 1_000, "every 10th event carries a traceparent");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_stream_and_restarted_loses_nothing() {
    // GIVEN a steady stream of events and a relay publishing them
    let s = Stack::start(TOPIC, 8);
    let env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    let url = s.pg.url();
    let writers = tokio::spawn(async move { write_events(&url, 100, 100, 4, Duration::from_millis(2)).await });
    let client = connect(&s.pg.url()).await;

    // WHEN the relay is SIGKILLed three times mid-stream and restarted
    for _ in 0..3 {
        let mut relay = RelayProcess::start(&["run"], &env);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relay.kill();
    }
    writers.await.unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN nothing is lost, order holds, and duplicates stay within the in-flight window
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 10_000, Duration::from_secs(60));
    let verdict = verify(&consumed, 100, 100);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(verdict.duplicates <= 3 * 5 * 1000, "duplicates bounded by the in-flight window: {verdict:?}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_relay_shares_the_lanes_then_takes_them_all_when_the_first_dies() {
    // GIVEN one relay holding every lane, then a second one joining while writers run
    let s = Stack::start(TOPIC, 8);
    let env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    let with_id = |id: &str| {
        let mut env = env.clone();
        env.push(("OUTBOX_RELAY_REPLICAS__RELAY_ID", id.to_owned()));
        env
    };
    let mut first = RelayProcess::start(&["run"], &with_id("first"));
    assert!(first.wait_for_log("count=32 of=32", Duration::from_secs(30)), "{}", first.log());
    let second = RelayProcess::start(&["run"], &with_id("second"));
    let url = s.pg.url();
    let writers = tokio::spawn(async move { write_events(&url, 100, 50, 4, Duration::from_millis(1)).await });
    assert!(second.wait_for_log("count=16 of=32", Duration::from_secs(30)), "{}", second.log());
    assert!(first.wait_for_log("handed lanes back", Duration::from_secs(10)), "{}", first.log());
    let client = connect(&s.pg.url()).await;

    // WHEN the first relay dies with half the lanes
    tokio::time::sleep(Duration::from_secs(1)).await;
    first.kill();

    // THEN the second takes them over after their leases expire, and every
    // event is present in order, duplicates bounded by the killed relay's window
    assert!(second.wait_for_log("count=32 of=32", Duration::from_secs(30)), "{}", second.log());
    assert!(second.log().contains("previous_holders={\"first\"}"), "{}", second.log());
    writers.await.unwrap();
    wait_all_published(&client, Duration::from_secs(120)).await;
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 5_000, Duration::from_secs(60));
    let verdict = verify(&consumed, 100, 50);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(verdict.duplicates <= 5 * 1000, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_relays_from_the_start_publish_each_event_exactly_once() {
    let s = Stack::start(TOPIC, 8);
    let env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    let _a = RelayProcess::start(&["run"], &env);
    let _b = RelayProcess::start(&["run"], &env);
    write_events(&s.pg.url(), 100, 20, 4, Duration::ZERO).await;
    let client = connect(&s.pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 2_000, Duration::from_secs(60));
    let verdict = verify(&consumed, 100, 20);
    assert_eq!((verdict.lost, verdict.duplicates, verdict.order_violations), (0, 0, 0), "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_marks_what_was_acknowledged_and_exits_zero() {
    // GIVEN a relay busy with a backlog
    let s = Stack::start(TOPIC, 8);
    write_events(&s.pg.url(), 50, 100, 2, Duration::ZERO).await;
    let mut relay = RelayProcess::start(&["run"], &relay_env(&s.pg.url(), &s.broker.bootstrap()));
    assert!(relay.wait_for_log("claiming lanes", Duration::from_secs(30)), "{}", relay.log());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // WHEN it receives SIGTERM
    relay.signal(libc::SIGTERM);
    let status = relay.wait_exit(Duration::from_secs(15)).expect("relay exits within the drain timeout");

    // THEN it exits 0 and every event the broker has is marked published
    assert_eq!(status.code(), Some(0), "{}", relay.log());
    let client = connect(&s.pg.url()).await;
    let marked: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], marked as usize, Duration::from_secs(30));
    assert_eq!(consumed.len() as i64, marked, "acknowledged == marked after a clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_mode_removes_rows_and_mark_mode_retention_cleans_up() {
    let s = Stack::start(TOPIC, 8);
    write_events(&s.pg.url(), 10, 10, 1, Duration::ZERO).await;
    let mut env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    env.push(("OUTBOX_RELAY_PUBLISHED__MODE", "delete".into()));
    let relay = RelayProcess::start(&["run"], &env);
    let client = connect(&s.pg.url()).await;
    let gone = wait_for_count(&client, "SELECT count(*) FROM outbox.events", 0).await;
    assert!(gone, "delete mode removes published rows: {}", relay.log());
    drop(relay);

    let mut env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    env.push(("OUTBOX_RELAY_PUBLISHED__RETENTION", "1s".into()));
    env.push(("OUTBOX_RELAY_PUBLISHED__CLEANUP_INTERVAL", "1s".into()));
    let relay = RelayProcess::start(&["run"], &env);
    write_events(&s.pg.url(), 10, 10, 1, Duration::ZERO).await;
    let cleaned = wait_for_count(&client, "SELECT count(*) FROM outbox.events", 0).await;
    assert!(cleaned, "retention deletes published rows: {}", relay.log());
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 200, Duration::from_secs(30));
    assert_eq!(consumed.len(), 200);
}

async fn wait_for_count(client: &tokio_postgres::Client, sql: &str, want: i64) -> bool {
    for _ in 0..300 {
        let n: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if n == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_committed_late_with_a_lower_id_is_neither_skipped_nor_overtaken() {
    // GIVEN a transaction that takes an id for aggregate X and stays open
    let s = Stack::start(TOPIC, 8);
    let relay = RelayProcess::start(&["run"], &relay_env(&s.pg.url(), &s.broker.bootstrap()));
    let mut slow = connect(&s.pg.url()).await;
    let slow_tx = slow.transaction().await.unwrap();
    slow_tx
        .execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', 'X', 'OrderUpdated', '{\"seq\":1}')",
            &[],
        )
        .await
        .unwrap();

    // AND later ids for other aggregates commit and get published first
    write_events(&s.pg.url(), 20, 50, 2, Duration::ZERO).await;
    let client = connect(&s.pg.url()).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    // WHEN the slow transaction commits and X's next event follows it
    slow_tx.commit().await.unwrap();
    client
        .execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', 'X', 'OrderUpdated', '{\"seq\":2}')",
            &[],
        )
        .await
        .unwrap();
    wait_all_published(&client, Duration::from_secs(60)).await;

    // THEN X's late row was published, and before X's later event
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], 1_002, Duration::from_secs(30));
    let x: Vec<i64> = consumed
        .iter()
        .filter(|m| m.key.as_deref() == Some(b"X"))
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["payload"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(x, [1, 2], "{}", relay.log());
    assert_eq!(consumed.len(), 1_002);
}
