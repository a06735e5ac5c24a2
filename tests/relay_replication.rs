//! End-to-end: logical replication capture -> real Kafka-protocol broker.

mod common;

use std::time::{Duration, Instant};

use common::relay::{connect, relay_env, verify, write_events, RelayProcess};
use common::{consume, StopMode, TestBroker, ThrowawayPostgres};

const TOPIC: &str = "outbox.Order";

struct Setup {
    pg: ThrowawayPostgres,
    broker: TestBroker,
}

fn replication_env(s: &Setup, published: &str) -> Vec<(&'static str, String)> {
    let mut env = relay_env(&s.pg.url(), &s.broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
    env.push(("OUTBOX_RELAY_PUBLISHED__MODE", published.into()));
    env
}

fn migrate(s: &Setup, env: &[(&str, String)]) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command.arg("migrate");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _ = s;
}

fn setup(published: &str) -> (Setup, Vec<(&'static str, String)>) {
    let s = Setup { pg: ThrowawayPostgres::start().expect("postgres"), broker: TestBroker::start() };
    s.broker.create_topic(TOPIC, 8);
    let env = replication_env(&s, published);
    migrate(&s, &env);
    (s, env)
}

/// Waits until the consumer sees `expected` distinct events (or times out).
fn consume_all(s: &Setup, expected: usize, timeout: Duration) -> Vec<common::Consumed> {
    consume(&s.broker.bootstrap(), &[TOPIC], expected, timeout)
}

async fn confirmed_lsn(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'outbox_relay'", &[])
        .await
        .unwrap()
        .get(0)
}

async fn wait_slot_caught_up(client: &tokio_postgres::Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let lag: i64 = client
            .query_one(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if lag <= 0 {
            return;
        }
        assert!(Instant::now() < deadline, "slot still {lag} bytes behind after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_10k_events_over_100_aggregates_once_in_order() {
    let (s, env) = setup("none");
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    write_events(&s.pg.url(), 100, 100, 4, Duration::ZERO).await;
    let consumed = consume_all(&s, 10_000, Duration::from_secs(120));
    let verdict = verify(&consumed, 100, 100);
    assert_eq!((verdict.lost, verdict.duplicates, verdict.order_violations), (0, 0, 0), "{verdict:?}\n{}", relay.log());
    let client = connect(&s.pg.url()).await;
    wait_slot_caught_up(&client, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emitted_logical_messages_are_events_and_mark_mode_stamps_rows() {
    let (s, env) = setup("mark");
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let client = connect(&s.pg.url()).await;
    client
        .batch_execute(
            r#"BEGIN;
               SELECT pg_logical_emit_message(true, 'outbox', '{"aggregate_type":"Order","aggregate_id":"m-1","event_type":"OrderPaid","payload":{"seq":1}}');
               SELECT outbox.enqueue('Order', 'm-1', 'OrderShipped', '{"seq":2}');
               SELECT pg_logical_emit_message(true, 'other-prefix', 'ignored');
               COMMIT;"#,
        )
        .await
        .unwrap();
    let consumed = consume_all(&s, 2, Duration::from_secs(30));
    let types: Vec<String> = consumed
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["event_type"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(types, ["OrderPaid", "OrderShipped"], "{}", relay.log());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let marked: i64 = client
            .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL", &[])
            .await
            .unwrap()
            .get(0);
        if marked == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "row not marked: {}", relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_and_postgres_restarted_mid_stream_lose_nothing() {
    let (mut s, env) = setup("none");
    let url = s.pg.url();
    let writers = tokio::spawn(async move { write_events(&url, 100, 60, 4, Duration::from_millis(2)).await });
    for _ in 0..2 {
        let mut relay = RelayProcess::start(&["run"], &env);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        relay.kill();
    }
    writers.await.unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    // Postgres restarted (fast shutdown) while the relay streams and writers write.
    let url = s.pg.url();
    let more = tokio::spawn(async move { write_events(&url, 100, 20, 2, Duration::from_millis(1)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    more.abort();
    s.pg.stop(StopMode::Fast).unwrap();
    s.pg.start_again().unwrap();
    let client = connect(&s.pg.url()).await;
    let written: i64 = client.query_one("SELECT count(*) FROM outbox.events", &[]).await.unwrap().get(0);
    let consumed = consume_all(&s, written as usize, Duration::from_secs(120));
    let mut seen = std::collections::HashSet::new();
    for m in &consumed {
        let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
        seen.insert(v["event_id"].as_str().unwrap().to_owned());
    }
    let ids: Vec<String> =
        client.query("SELECT event_id::text FROM outbox.events", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
    assert_eq!(missing, 0, "{missing} of {written} events missing\n{}", relay.log());
    // Per-aggregate order over the first-writer set (6,000 events, all committed).
    let verdict = verify(
        &consumed
            .into_iter()
            .filter(|m| {
                let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
                v["payload"]["seq"].as_i64().unwrap() <= 60
            })
            .collect::<Vec<_>>(),
        100,
        60,
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_outbox_with_other_tables_churning_still_advances_the_slot() {
    let (s, env) = setup("none");
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let client = connect(&s.pg.url()).await;
    client.batch_execute("CREATE TABLE churn (id serial primary key, v text)").await.unwrap();
    let before = confirmed_lsn(&client).await;
    for _ in 0..200 {
        client.execute("INSERT INTO churn (v) SELECT repeat('x', 500) FROM generate_series(1, 50)", &[]).await.unwrap();
    }
    wait_slot_caught_up(&client, Duration::from_secs(30)).await;
    let after = confirmed_lsn(&client).await;
    assert_ne!(before, after, "confirmed_flush_lsn advanced past the churn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slot_dropped_while_relay_is_down_is_recreated_and_nothing_is_lost_in_mark_mode() {
    let (s, env) = setup("mark");
    let client = connect(&s.pg.url()).await;
    let mut relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    write_events(&s.pg.url(), 20, 10, 1, Duration::ZERO).await;
    assert_eq!(consume_all(&s, 200, Duration::from_secs(60)).len(), 200);
    relay.kill();
    // While it is down: events are written and the slot is dropped (as a failover would).
    write_events(&s.pg.url(), 20, 20, 1, Duration::ZERO).await;
    client.execute("SELECT pg_drop_replication_slot('outbox_relay')", &[]).await.unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("replication slot does not exist", Duration::from_secs(30)), "{}", relay.log());
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(60)), "{}", relay.log());
    write_events(&s.pg.url(), 20, 30, 1, Duration::ZERO).await;
    let consumed = consume_all(&s, 600, Duration::from_secs(60));
    let verdict = verify(&consumed, 20, 30);
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_transaction_of_200k_rows_relays_with_bounded_memory() {
    let (s, env) = setup("none");
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let client = connect(&s.pg.url()).await;
    client
        .execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'Order', 'big-' || (g % 100), 'OrderUpdated', jsonb_build_object('seq', g / 100 + 1, 'pad', repeat('x', 200)) \
             FROM generate_series(0, 199999) g",
            &[],
        )
        .await
        .unwrap();
    wait_slot_caught_up(&client, Duration::from_secs(300)).await;
    let rss = relay.peak_rss_mib();
    eprintln!("relay peak RSS after a 200,000-row transaction: {rss:.1} MiB");
    assert!(rss < 64.0, "peak RSS {rss:.1} MiB");
    let consumed = consume_all(&s, 200_000, Duration::from_secs(120));
    let verdict = verify(&consumed, 100, 2000);
    assert_eq!((verdict.lost, verdict.order_violations), (0, 0), "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_misconfiguration_gets_its_message() {
    let (mut s, env) = setup("none");
    let client = connect(&s.pg.url()).await;

    // Publication that does not cover the table.
    client.batch_execute("DROP PUBLICATION outbox_relay_pub").await.unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    assert!(
        relay.wait_for_log("publication outbox_relay_pub does not cover outbox.events", Duration::from_secs(20)),
        "{}",
        relay.log()
    );
    assert!(relay.log().contains("CREATE PUBLICATION"), "{}", relay.log());
    drop(relay);
    client.batch_execute("CREATE PUBLICATION outbox_relay_pub FOR TABLE outbox.events").await.unwrap();

    // A role without REPLICATION.
    client
        .batch_execute(
            "CREATE ROLE plain LOGIN; GRANT ALL ON SCHEMA outbox TO plain; GRANT ALL ON outbox.events TO plain;",
        )
        .await
        .unwrap();
    let mut plain = env.clone();
    plain[0].1 = s.pg.url_for("plain", "postgres");
    let relay = RelayProcess::start(&["run"], &plain);
    assert!(relay.wait_for_log("lacks the REPLICATION attribute", Duration::from_secs(20)), "{}", relay.log());
    assert!(relay.log().contains("ALTER ROLE plain REPLICATION"), "{}", relay.log());
    drop(relay);

    // Slot held by another process: the second relay stands by.
    let first = RelayProcess::start(&["run"], &env);
    assert!(first.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", first.log());
    let second = RelayProcess::start(&["run"], &env);
    assert!(
        second.wait_for_log("another relay holds the replication slot's lease; standing by", Duration::from_secs(30)),
        "{}",
        second.log()
    );
    drop(first);
    drop(second);

    // none mode with the slot gone: stop, with the fix.
    client.execute("SELECT pg_drop_replication_slot('outbox_relay')", &[]).await.unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    assert!(
        relay.wait_for_log("replication slot outbox_relay does not exist", Duration::from_secs(20)),
        "{}",
        relay.log()
    );
    assert!(relay.log().contains("published.mode = \"mark\""), "{}", relay.log());
    drop(relay);

    // wal_level below logical.
    client.batch_execute("ALTER SYSTEM SET wal_level = replica").await.unwrap();
    drop(client);
    s.pg.stop(StopMode::Fast).unwrap();
    s.pg.start_again().unwrap();
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("wal_level is 'replica'", Duration::from_secs(20)), "{}", relay.log());
}
