//! Regression tests for the seams the settlement core closed: each one
//! failed on the relay before it (main 84ede18) and checks, as a user
//! would, what a consumer reads and what the outbox table and the
//! replication slot say.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::relay::{
    connect, create_relay_role, migrate, migrate_with, relay_env, slot_confirmed, wait_all_published, RelayProcess,
};
use common::{consume, Consumed, TestBroker, ThrowawayPostgres};
use rdkafka::mocking::MockCluster;

fn replication_env(pg_url: &str, brokers: &str, published: &str) -> Vec<(&'static str, String)> {
    let mut env = relay_env(pg_url, brokers);
    env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
    env.push(("OUTBOX_RELAY_PUBLISHED__MODE", published.into()));
    env
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

fn seq_of(message: &Consumed) -> i64 {
    let value: serde_json::Value = serde_json::from_slice(&message.value).expect("JSON envelope");
    value["payload"]["seq"].as_i64().expect("payload.seq")
}

fn event_id_of(message: &Consumed) -> String {
    let value: serde_json::Value = serde_json::from_slice(&message.value).expect("JSON envelope");
    value["event_id"].as_str().expect("event_id").to_owned()
}

/// Copies of each event id beyond the first, summed.
fn duplicates(consumed: &[Consumed]) -> usize {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for message in consumed {
        *seen.entry(event_id_of(message)).or_default() += 1;
    }
    seen.values().map(|n| n - 1).sum()
}

async fn enqueue(client: &tokio_postgres::Client, aggregate_type: &str, aggregate: &str, event_type: &str, seq: i64) {
    client
        .execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) VALUES ($1, $2, $3, jsonb_build_object('seq', $4::int8))",
            &[&aggregate_type, &aggregate, &event_type, &seq],
        )
        .await
        .expect("insert event");
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool, log: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_rejected_for_its_event_type_holds_its_aggregate_back_until_fixed() {
    // GIVEN polling with the default block policy, a fast retry, and aggregate X
    // whose second event has an empty event_type
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    enqueue(&client, "Order", "X", "OrderPlaced", 0).await;
    enqueue(&client, "Order", "X", "", 1).await;
    enqueue(&client, "Order", "X", "OrderPaid", 2).await;
    enqueue(&client, "Order", "X", "OrderShipped", 3).await;
    let mut env = relay_env(&pg.url(), &broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__RETRY_FAILED_AFTER", "1s".into()));

    // WHEN the relay runs, and the operator fixes the row after a while
    let relay = RelayProcess::start(&["run"], &env);
    let first = consume(&broker.bootstrap(), &["outbox.Order"], 1, Duration::from_secs(30));
    assert!(relay.wait_for_log("its aggregate's later events wait for it", Duration::from_secs(20)), "{}", relay.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_fix = consume(&broker.bootstrap(), &["outbox.Order"], 1, Duration::from_secs(3));
    client.execute("UPDATE outbox.events SET event_type = 'OrderConfirmed' WHERE event_type = ''", &[]).await.unwrap();
    wait_all_published(&client, Duration::from_secs(30)).await;

    // THEN the consumer sees X's events in their order, the fixed one in its place
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 4, Duration::from_secs(30));
    let seqs: Vec<i64> = consumed.iter().map(seq_of).collect();
    assert_eq!(first.iter().map(seq_of).collect::<Vec<_>>(), [0]);
    assert_eq!(before_fix.iter().map(seq_of).collect::<Vec<_>>(), [0], "nothing of X overtakes its failed event");
    assert_eq!(seqs, [0, 1, 2, 3], "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_never_confirms_the_slot_past_rows_it_has_not_marked() {
    // GIVEN replication in mark mode, and outbox rows locked by another session so marking them waits
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    let env = replication_env(&pg.url(), &broker.bootstrap(), "mark");
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    for seq in 0..10 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    let after_rows: i64 = count(&client, "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8").await as i64;
    let (mut locker, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let lock = locker.transaction().await.unwrap();
    lock.execute("SELECT 1 FROM outbox.events FOR UPDATE", &[]).await.unwrap();

    // WHEN the relay publishes them and then sees transactions that carry nothing of ours
    let relay = RelayProcess::start(&["run"], &env);
    consume(&broker.bootstrap(), &["outbox.Order"], 10, Duration::from_secs(30));
    for _ in 0..20 {
        client.execute("SELECT pg_logical_emit_message(true, 'not-ours', 'x')", &[]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // THEN the slot stays behind the unmarked rows
    let confirmed = slot_confirmed(&client).await;
    assert!(
        confirmed < after_rows,
        "the slot confirmed {confirmed} past the unmarked rows (written by {after_rows})\n{}",
        relay.log()
    );
    assert_eq!(count(&client, "SELECT count(*) FROM outbox.events WHERE published_at IS NULL").await, 10);

    // AND once the rows can be marked, they are, and the slot moves on
    lock.rollback().await.unwrap();
    wait_all_published(&client, Duration::from_secs(30)).await;
    let relay_log = || relay.log();
    wait_for(
        "the slot to move past the rows",
        Duration::from_secs(30),
        async || slot_confirmed(&client).await >= after_rows,
        relay_log,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_marks_rows_whose_commit_was_streamed_before_it_was_visible() {
    // GIVEN replication in mark mode, and a writer whose commit is in the WAL (so it is
    // streamed) but not yet visible to other sessions: it waits for a synchronous
    // standby that is not there. (On a loaded box the same moment happens on its own,
    // between a backend flushing its commit and publishing it.)
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    let env = replication_env(&pg.url(), &broker.bootstrap(), "mark");
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    for statement in [
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = local', current_database()); END $$",
        "ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'",
        "SELECT pg_reload_conf()",
    ] {
        client.batch_execute(statement).await.expect("configure a missing synchronous standby");
    }
    let writer = connect(&pg.url()).await;
    writer.batch_execute("SET synchronous_commit = on").await.unwrap();
    let writer_pid: i32 = writer.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("streaming from the replication slot", Duration::from_secs(30)), "{}", relay.log());
    let commit = tokio::spawn(async move {
        writer
            .batch_execute(
                "BEGIN; \
                 INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                 SELECT 'Order', 'A', 'OrderUpdated', jsonb_build_object('seq', g) FROM generate_series(0, 2) g; \
                 COMMIT;",
            )
            .await
    });

    // WHEN the relay streams and publishes the rows before they are visible
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 3, Duration::from_secs(30));
    assert_eq!(consumed.len(), 3, "{}", relay.log());
    tokio::time::sleep(Duration::from_secs(2)).await;

    // THEN once the commit becomes visible (the writer stops waiting for the standby), the
    // rows are marked: the relay did not settle them while it could not see them
    client.execute("SELECT pg_cancel_backend($1)", &[&writer_pid]).await.unwrap();
    commit.await.expect("writer task").expect("the commit completes locally");
    assert_eq!(count(&client, "SELECT count(*) FROM outbox.events").await, 3);
    wait_all_published(&client, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_published_rows_in_replication_mode_too() {
    // GIVEN replication in mark mode with a one-second retention
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    let mut env = replication_env(&pg.url(), &broker.bootstrap(), "mark");
    env.push(("OUTBOX_RELAY_PUBLISHED__RETENTION", "1s".into()));
    env.push(("OUTBOX_RELAY_PUBLISHED__CLEANUP_INTERVAL", "1s".into()));
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    for seq in 0..20 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }

    // WHEN the relay publishes them
    let relay = RelayProcess::start(&["run"], &env);
    consume(&broker.bootstrap(), &["outbox.Order"], 20, Duration::from_secs(30));

    // THEN the published rows are deleted once past retention
    wait_for(
        "retention to delete the published rows",
        Duration::from_secs(30),
        async || count(&client, "SELECT count(*) FROM outbox.events").await == 0,
        || relay.log(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_dead_letters_an_event_after_max_attempts_of_transient_failures() {
    // GIVEN replication with policy dead_letter and max_attempts 2, and a topic
    // whose only partition sits on a broker too slow to answer in time
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let cluster = MockCluster::new(2).expect("mock cluster");
    cluster.create_topic("outbox.Order", 1, 1).unwrap();
    cluster.create_topic("outbox.Slow", 1, 1).unwrap();
    cluster.create_topic("outbox.dead-letter", 1, 1).unwrap();
    cluster.partition_leader("outbox.Order", 0, Some(1)).unwrap();
    cluster.partition_leader("outbox.dead-letter", 0, Some(1)).unwrap();
    cluster.partition_leader("outbox.Slow", 0, Some(2)).unwrap();
    cluster.broker_round_trip_time(2, Duration::from_secs(30)).unwrap();
    let bootstrap = cluster.bootstrap_servers();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[failures]\npolicy = \"dead_letter\"\nmax_attempts = 2\n\n[sink.kafka.properties]\n\"message.timeout.ms\" = \"1500\"\n",
    );
    let env = replication_env(&pg.url(), &bootstrap, "mark");
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    for seq in 0..5 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    enqueue(&client, "Slow", "S", "SlowThing", 0).await;
    for seq in 5..10 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }

    // WHEN the relay streams
    let relay = RelayProcess::start(&["run", "--config", &config], &env);

    // THEN the slow event is dead-lettered after its attempts, and everything behind it flows, once and in order
    wait_all_published(&client, Duration::from_secs(90)).await;
    let letters = consume(&bootstrap, &["outbox.dead-letter"], 1, Duration::from_secs(20));
    let consumed = consume(&bootstrap, &["outbox.Order"], 10, Duration::from_secs(20));
    assert_eq!(letters.len(), 1, "{}", relay.log());
    assert_eq!(consumed.iter().map(seq_of).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>(), "{}", relay.log());
    assert_eq!(count(&client, "SELECT count(*) FROM outbox.events WHERE dead_lettered_at IS NOT NULL").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_broker_refusal_in_replication_does_not_republish_the_tail() {
    // GIVEN replication with the default block policy and one event over the
    // producer's size limit, with events of its own and another aggregate behind it
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 2);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[sink.kafka.properties]\n\"message.max.bytes\" = \"100000\"\n");
    let env = replication_env(&pg.url(), &broker.bootstrap(), "mark");
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    for seq in 0..10 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    client
        .execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', 'B', 'Huge', jsonb_build_object('seq', 0, 'pad', repeat('x', 200000)))",
            &[],
        )
        .await
        .unwrap();
    for seq in 1..4 {
        enqueue(&client, "Order", "B", "OrderUpdated", seq).await;
    }
    for seq in 10..20 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }

    // WHEN the relay retries the refused event for a while
    let relay = RelayProcess::start(&["run", "--config", &config], &env);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut halts = 0;
    while Instant::now() < deadline {
        halts = relay.log().matches("the stream stops here;").count();
        if halts >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // THEN it retried several times, and no event reached the broker twice
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 23, Duration::from_secs(5));
    assert!(halts >= 2, "the relay retried the refused event ({halts} times)\n{}", relay.log());
    assert_eq!(duplicates(&consumed), 0, "{} messages for {} events\n{}", consumed.len(), 23, relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_cannot_mark_does_not_publish_the_same_events_again_and_again() {
    // GIVEN polling in mark mode as a role whose UPDATE on the outbox was revoked
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    create_relay_role(&client, "SELECT, DELETE").await;
    for seq in 0..50 {
        enqueue(&client, "Order", &format!("agg-{}", seq % 5), "OrderUpdated", seq).await;
    }
    let url = pg.url_for("relay", "postgres");

    // WHEN the relay runs for a while, failing to mark every time
    let relay = RelayProcess::start(&["run"], &relay_env(&url, &broker.bootstrap()));
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && relay.log().matches("relay session failed").count() < 4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // THEN each event reached the broker once, and it kept trying to mark them
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 50, Duration::from_secs(5));
    assert!(relay.log().matches("relay session failed").count() >= 2, "{}", relay.log());
    assert_eq!(consumed.len(), 50, "{}", relay.log());
    assert_eq!(duplicates(&consumed), 0);
    assert_eq!(count(&client, "SELECT count(*) FROM outbox.events WHERE published_at IS NULL").await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_dropped_and_created_again_is_recovered_without_loss() {
    // GIVEN replication in mark mode, streaming
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 1);
    let env = replication_env(&pg.url(), &broker.bootstrap(), "mark");
    migrate_with(&env);
    let client = connect(&pg.url()).await;
    let relay = RelayProcess::start(&["run"], &env);
    for seq in 0..5 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    wait_all_published(&client, Duration::from_secs(30)).await;

    // WHEN the publication is dropped, events are written, and it is created again
    client.execute("DROP PUBLICATION outbox_relay_pub", &[]).await.unwrap();
    for seq in 5..10 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    client
        .execute("CREATE PUBLICATION outbox_relay_pub FOR TABLE outbox.events WITH (publish = 'insert')", &[])
        .await
        .unwrap();
    for seq in 10..15 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }

    // THEN every event is published, in order, and streaming resumes
    wait_all_published(&client, Duration::from_secs(60)).await;
    for seq in 15..20 {
        enqueue(&client, "Order", "A", "OrderUpdated", seq).await;
    }
    wait_all_published(&client, Duration::from_secs(30)).await;
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 20, Duration::from_secs(20));
    let mut first_seen: Vec<i64> = Vec::new();
    for seq in consumed.iter().map(seq_of) {
        if !first_seen.contains(&seq) {
            first_seen.push(seq);
        }
    }
    assert_eq!(first_seen, (0..20).collect::<Vec<_>>(), "{}", relay.log());
    assert!(relay.log().contains("recovery drain finished"), "{}", relay.log());
}
