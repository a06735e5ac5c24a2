//! End-to-end: the real binary with `[sink] kind = "pubsub"` against
//! Google's Pub/Sub emulator and a private Postgres, in both capture modes.
//! Messages are pulled back through subscriptions with message ordering
//! enabled and checked for loss, order, attributes and data; CloudEvents
//! messages are parsed by the CloudEvents Python SDK.
//!
//! The emulator delivers in order even on unordered subscriptions, so the
//! order checker is itself tested on a deliberately reordered sequence.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cloudevents::{
    assert_round_trip, expected_attributes, hex, parse_with_sdk, row_for, write_sample_events, Row,
};
use common::pubsub::{PubSubClient, PubSubEmulator, Received};
use common::relay::{
    connect, http_get, published, unpublished, verify, wait_all_published, wait_published_at_least, write_events,
    RelayProcess, Verdict,
};
use common::{Consumed, ThrowawayPostgres};
use serde_json::{json, Value};

/// Project ids need at least 6 characters on the emulator.
const PROJECT: &str = "outbox-relay-tests";
const TOPIC: &str = "outbox.Order";
const SUBSCRIPTION: &str = "orders-ordered";
const AGGREGATES: usize = 100;
const PER_AGGREGATE: usize = 100;
const EVENTS: usize = AGGREGATES * PER_AGGREGATE;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Poll,
    Replication,
}

struct Setup {
    pg: ThrowawayPostgres,
    emulator: PubSubEmulator,
    client: PubSubClient,
    env: Vec<(&'static str, String)>,
}

/// Relay environment: Pub/Sub sink on the emulator, short timeouts so
/// freezes are noticed quickly.
fn pubsub_env(pg_url: &str, emulator_host: &str, mode: Mode) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("OUTBOX_RELAY_POSTGRES__URL", pg_url.to_owned()),
        ("OUTBOX_RELAY_SINK__KIND", "pubsub".to_owned()),
        ("OUTBOX_RELAY_SINK__PUBSUB__PROJECT", PROJECT.to_owned()),
        ("OUTBOX_RELAY_SINK__PUBSUB__REQUEST_TIMEOUT", "5s".to_owned()),
        ("OUTBOX_RELAY_SINK__PUBSUB__RETRY_MAX_DELAY", "2s".to_owned()),
        ("PUBSUB_EMULATOR_HOST", emulator_host.to_owned()),
        ("OUTBOX_RELAY_SOURCE__POLL_INTERVAL", "200ms".to_owned()),
        ("OUTBOX_RELAY_SHUTDOWN__DRAIN_TIMEOUT", "10s".to_owned()),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    if mode == Mode::Replication {
        env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".to_owned()));
    }
    env
}

fn run_command(args: &[&str], env: &[(&'static str, String)]) -> std::process::Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command.args(args).env_remove("RUST_LOG").stdin(Stdio::null());
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run outbox-relay")
}

async fn setup(mode: Mode) -> Setup {
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let emulator = PubSubEmulator::start();
    let client = PubSubClient::new(&emulator.host(), PROJECT);
    client.create_topic(TOPIC).await;
    client.create_ordered_subscription(SUBSCRIPTION, TOPIC).await;
    let env = pubsub_env(&pg.url(), &emulator.host(), mode);
    let out = run_command(&["migrate"], &env);
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    Setup { pg, emulator, client, env }
}

/// Pulled messages as `Consumed`, in arrival order, for `verify`.
fn as_consumed(received: &[Received]) -> Vec<Consumed> {
    received.iter().enumerate().map(|(i, m)| m.to_consumed(TOPIC, i)).collect()
}

/// Every message carries exactly the native attributes, consistent with its data.
fn check_native_attributes(received: &[Received]) {
    for message in received {
        let value: Value = serde_json::from_slice(&message.data).expect("data is the envelope JSON");
        let a = &message.attributes;
        let seq = value["payload"]["seq"].as_u64().expect("payload.seq");
        let aggregate = value["payload"]["aggregate"].as_u64().expect("payload.aggregate");
        let mut expected = BTreeMap::from([
            ("event_id".to_owned(), value["event_id"].as_str().unwrap().to_owned()),
            ("event_type".to_owned(), "OrderUpdated".to_owned()),
            ("event_version".to_owned(), "1".to_owned()),
            ("envelope_version".to_owned(), "1".to_owned()),
            ("aggregate_type".to_owned(), "Order".to_owned()),
            ("aggregate_id".to_owned(), format!("order-{aggregate}")),
        ]);
        if seq % 10 == 0 {
            expected.insert("traceparent".to_owned(), format!("00-{:032x}-{:016x}-01", aggregate + 1, seq));
        }
        assert_eq!(a, &expected, "attributes of {}", String::from_utf8_lossy(&message.data));
        assert_eq!(message.ordering_key, format!("order-{aggregate}"), "ordering key is the aggregate id");
        assert_eq!(value["aggregate_id"], message.ordering_key.as_str());
        assert!(!message.message_id.is_empty());
    }
}

fn assert_complete(verdict: &Verdict, received: usize, log: &str) {
    assert_eq!(verdict.lost, 0, "lost events: {verdict:?} of {received} pulled; relay log tail:\n{}", tail(log));
    assert_eq!(verdict.order_violations, 0, "order broken: {verdict:?}");
    assert_eq!(verdict.unique, EVENTS, "{verdict:?}");
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn order_checker_catches_a_reordered_aggregate() {
    // GIVEN a perfect delivery of 3 aggregates x 4 events, as pulled messages
    let message = |aggregate: usize, seq: usize| Received {
        data: serde_json::to_vec(&json!({"aggregate_id": format!("order-{aggregate}"), "payload": {"seq": seq}}))
            .unwrap(),
        attributes: BTreeMap::new(),
        ordering_key: format!("order-{aggregate}"),
        message_id: format!("{aggregate}-{seq}"),
    };
    let mut sequence: Vec<Received> =
        (1..=4).flat_map(|seq| (0..3).map(move |a| (a, seq))).map(|(a, s)| message(a, s)).collect();
    let clean = verify(&as_consumed(&sequence), 3, 4);
    assert_eq!((clean.lost, clean.order_violations, clean.duplicates), (0, 0, 0));

    // WHEN one aggregate's events 2 and 3 swap places (other keys untouched)
    let second = sequence.iter().position(|m| m.message_id == "1-2").unwrap();
    let third = sequence.iter().position(|m| m.message_id == "1-3").unwrap();
    sequence.swap(second, third);

    // THEN the checker reports it, and a redelivered earlier event is a duplicate, not a violation
    let reordered = verify(&as_consumed(&sequence), 3, 4);
    assert!(reordered.order_violations > 0, "{reordered:?}");
    sequence.swap(second, third);
    sequence.push(message(1, 2));
    let redelivered = verify(&as_consumed(&sequence), 3, 4);
    assert_eq!((redelivered.order_violations, redelivered.duplicates), (0, 1));
    // AND a gap is loss
    sequence.retain(|m| m.message_id != "2-3");
    assert_eq!(verify(&as_consumed(&sequence), 3, 4).lost, 1);
}

/// Backlog of 10,000 events, then the relay: everything arrives once, in
/// per-aggregate order, with the right attributes and data.
async fn delivers_everything_once_in_order(mode: Mode) {
    // GIVEN 10,000 events over 100 aggregates written by 4 concurrent writers
    let s = setup(mode).await;
    write_events(&s.pg.url(), AGGREGATES, PER_AGGREGATE, 4, Duration::ZERO).await;
    let db = connect(&s.pg.url()).await;

    // WHEN the relay drains them to Pub/Sub
    let started = Instant::now();
    let relay = RelayProcess::start(&["run"], &s.env);
    wait_all_published(&db, Duration::from_secs(180)).await;
    let drained = started.elapsed();
    eprintln!(
        "pubsub {mode:?}: relayed {EVENTS} events in {:.2} s ({:.0} events/s against the emulator, including start-up)",
        drained.as_secs_f64(),
        EVENTS as f64 / drained.as_secs_f64()
    );

    // THEN an ordered subscription receives each once, in per-aggregate order
    let received = s.client.pull_all(SUBSCRIPTION, EVENTS, Duration::from_secs(120)).await;
    let verdict = verify(&as_consumed(&received), AGGREGATES, PER_AGGREGATE);
    assert_complete(&verdict, received.len(), &relay.log());
    // No crash: a duplicate can only come from a retried request (one that
    // timed out on a loaded machine may have been published after all).
    let log = relay.log();
    if log.contains("Pub/Sub publish failed; retrying") {
        eprintln!("pubsub {mode:?}: {} duplicates after retried requests", verdict.duplicates);
    } else {
        assert_eq!(verdict.duplicates, 0, "no crash, no retry: no duplicates; log:\n{}", tail(&log));
    }
    // AND attributes and data are right
    check_native_attributes(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_delivers_10k_events_once_in_per_aggregate_order() {
    delivers_everything_once_in_order(Mode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_mode_delivers_10k_events_once_in_per_aggregate_order() {
    delivers_everything_once_in_order(Mode::Replication).await;
}

/// The relay SIGKILLed mid-stream and restarted loses nothing.
async fn survives_sigkill(mode: Mode) {
    // GIVEN a relay publishing a steady stream of events
    let s = setup(mode).await;
    let db = connect(&s.pg.url()).await;
    let mut relay = RelayProcess::start(&["run"], &s.env);
    let url = s.pg.url();
    let writer =
        tokio::spawn(async move { write_events(&url, AGGREGATES, PER_AGGREGATE, 4, Duration::from_millis(2)).await });

    // WHEN it is killed with SIGKILL part-way and started again
    wait_published_at_least(&db, 2000, Duration::from_secs(120), || tail(&relay.log())).await;
    relay.kill();
    let at_kill = published(&db).await;
    let relay = RelayProcess::start(&["run"], &s.env);
    writer.await.unwrap();
    wait_all_published(&db, Duration::from_secs(180)).await;
    eprintln!("pubsub {mode:?}: killed at {at_kill} published, restarted, all {EVENTS} published");

    // THEN nothing is lost and order holds (duplicates are allowed: at least once)
    let received = s.client.pull_all(SUBSCRIPTION, EVENTS, Duration::from_secs(120)).await;
    let verdict = verify(&as_consumed(&received), AGGREGATES, PER_AGGREGATE);
    assert_complete(&verdict, received.len(), &relay.log());
    eprintln!("pubsub {mode:?}: {} duplicates after the kill", verdict.duplicates);
    check_native_attributes(&received);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_relay_killed_mid_stream_loses_nothing() {
    survives_sigkill(Mode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_mode_relay_killed_mid_stream_loses_nothing() {
    survives_sigkill(Mode::Replication).await;
}

/// The emulator frozen (SIGSTOP) for 15 s mid-stream: the relay retries,
/// readiness fails, and after SIGCONT everything arrives in order.
async fn survives_a_frozen_emulator(mode: Mode) {
    // GIVEN a relay publishing a steady stream of events
    let s = setup(mode).await;
    let db = connect(&s.pg.url()).await;
    let relay = RelayProcess::start(&["run"], &s.env);
    let http = relay.http_address(Duration::from_secs(30));
    let url = s.pg.url();
    let writer =
        tokio::spawn(async move { write_events(&url, AGGREGATES, PER_AGGREGATE, 4, Duration::from_millis(3)).await });
    wait_published_at_least(&db, 1500, Duration::from_secs(120), || tail(&relay.log())).await;

    // WHEN the emulator is frozen for 15 s
    s.emulator.freeze();
    let frozen_at = published(&db).await;
    let freeze_ends = Instant::now() + Duration::from_secs(15);
    let mut saw_not_ready = false;
    while Instant::now() < freeze_ends {
        saw_not_ready |= http_get(&http, "/readyz").0 == 503;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let during = published(&db).await;
    s.emulator.thaw();

    // THEN the relay retried (and said so), readiness failed while frozen,
    assert!(relay.log().contains("Pub/Sub publish failed; retrying"), "no retry logged:\n{}", tail(&relay.log()));
    assert!(saw_not_ready, "/readyz never reported the frozen broker");
    // AND once thawed everything arrives, nothing lost, order kept
    writer.await.unwrap();
    wait_all_published(&db, Duration::from_secs(180)).await;
    let received = s.client.pull_all(SUBSCRIPTION, EVENTS, Duration::from_secs(120)).await;
    let verdict = verify(&as_consumed(&received), AGGREGATES, PER_AGGREGATE);
    eprintln!(
        "pubsub {mode:?}: frozen at {frozen_at} published ({during} when thawed), then all {EVENTS}; {} duplicates",
        verdict.duplicates
    );
    assert_complete(&verdict, received.len(), &relay.log());
    check_native_attributes(&received);
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&http, "/readyz").0 != 200 {
        assert!(Instant::now() < deadline, "/readyz did not recover after the thaw");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poll_mode_emulator_frozen_mid_stream_loses_nothing_and_keeps_order() {
    survives_a_frozen_emulator(Mode::Poll).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_mode_emulator_frozen_mid_stream_loses_nothing_and_keeps_order() {
    survives_a_frozen_emulator(Mode::Replication).await;
}

#[test]
fn missing_project_and_invalid_static_topic_exit_2_naming_the_key() {
    let base = |extra: &[(&'static str, &str)]| {
        let mut env = vec![
            ("OUTBOX_RELAY_POSTGRES__URL", "postgres://relay@127.0.0.1:9/app".to_owned()),
            ("OUTBOX_RELAY_SINK__KIND", "pubsub".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        env
    };
    for (extra, named, says) in [
        (vec![], "sink.pubsub.project", "OUTBOX_RELAY_SINK__PUBSUB__PROJECT"),
        (
            vec![("OUTBOX_RELAY_SINK__PUBSUB__PROJECT", PROJECT), ("OUTBOX_RELAY_SINK__TOPIC", "1-orders")],
            "sink.topic",
            "start with a letter",
        ),
        (
            vec![
                ("OUTBOX_RELAY_SINK__PUBSUB__PROJECT", PROJECT),
                ("OUTBOX_RELAY_SINK__PUBSUB__MAX_MESSAGES_PER_REQUEST", "5000"),
            ],
            "sink.pubsub.max_messages_per_request",
            "1000",
        ),
        (vec![("OUTBOX_RELAY_SINK__PUBSUB__PROJEKT", PROJECT)], "projekt", "unknown key"),
    ] {
        for command in ["run", "check"] {
            let out = run_command(&[command], &base(&extra));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{command} {extra:?}: {stderr}");
            assert!(stderr.contains(named) && stderr.contains(says), "{command} {extra:?}: {stderr}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_and_missing_topics_keep_rows_unpublished_until_create_topics() {
    // GIVEN events for an existing topic, one whose row topic Pub/Sub rejects
    // (valid for Kafka), and one whose topic does not exist
    let s = setup(Mode::Poll).await;
    let db = connect(&s.pg.url()).await;
    let enqueue = "SELECT outbox.enqueue($1, $2, 'Happened', '{\"n\":1}'::jsonb, 1, '{}'::jsonb, NULL, NULL, $3)";
    db.execute(enqueue, &[&"Order", &"o-1", &None::<String>]).await.unwrap();
    db.execute(enqueue, &[&"Order", &"o-2", &Some("ab")]).await.unwrap();
    db.execute(enqueue, &[&"Missing", &"m-1", &None::<String>]).await.unwrap();
    db.execute(enqueue, &[&"Order", &"o-3", &None::<String>]).await.unwrap();
    let mut env = s.env.clone();
    env.push(("OUTBOX_RELAY_SOURCE__RETRY_FAILED_AFTER", "1s".to_owned()));

    // `check` names both problems and their fixes
    let out = run_command(&["check"], &env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("[ ok ] pubsub"), "{stdout}");
    assert!(stdout.contains("\"ab\" is shorter than 3 characters"), "{stdout}");

    // WHEN the relay runs
    let mut relay = RelayProcess::start(&["run"], &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    let error_of = |row: Option<tokio_postgres::Row>| row.and_then(|r| r.get::<_, Option<String>>(0));
    loop {
        let bad = db.query_opt("SELECT last_error FROM outbox.events WHERE aggregate_id = 'o-2'", &[]).await.unwrap();
        let missing =
            db.query_opt("SELECT last_error FROM outbox.events WHERE aggregate_id = 'm-1'", &[]).await.unwrap();
        if error_of(bad).is_some() && error_of(missing).is_some() && unpublished(&db).await == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "failures not recorded; log:\n{}", tail(&relay.log()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // THEN the good events arrive; the others stay unpublished with a reason naming topic and fix
    let received = s.client.pull_all(SUBSCRIPTION, 2, Duration::from_secs(30)).await;
    let mut keys: Vec<&str> = received.iter().map(|m| m.ordering_key.as_str()).collect();
    keys.sort_unstable(); // different ordering keys: no order between them
    assert_eq!(keys, ["o-1", "o-3"]);
    let reason = |aggregate: &'static str| {
        let db = &db;
        async move {
            db.query_one(
                "SELECT last_error FROM outbox.events WHERE aggregate_id = $1 AND published_at IS NULL",
                &[&aggregate],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
        }
    };
    let invalid = reason("o-2").await;
    assert!(invalid.contains("\"ab\"") && invalid.contains("3-255 characters"), "{invalid}");
    let missing = reason("m-1").await;
    assert!(
        missing.contains("projects/outbox-relay-tests/topics/outbox.Missing does not exist")
            && missing.contains("sink.pubsub.create_topics = true"),
        "{missing}"
    );
    relay.kill();

    // WHEN the relay runs with create_topics = true
    env.push(("OUTBOX_RELAY_SINK__PUBSUB__CREATE_TOPICS", "true".to_owned()));
    let relay = RelayProcess::start(&["run"], &env);
    let deadline = Instant::now() + Duration::from_secs(60);
    while unpublished(&db).await != 1 {
        assert!(Instant::now() < deadline, "missing topic not created; log:\n{}", tail(&relay.log()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // THEN the topic exists and its event is published; the invalid one still waits
    assert!(s.client.topic_exists("outbox.Missing").await);
    assert!(relay.log().contains("creating Pub/Sub topic"), "{}", tail(&relay.log()));
    assert!(reason("o-2").await.contains("3-255 characters"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_republishes_through_pubsub_in_order() {
    // GIVEN published events of two aggregates
    let s = setup(Mode::Poll).await;
    let db = connect(&s.pg.url()).await;
    for (aggregate, n) in [("r-1", 1), ("r-2", 1), ("r-1", 2), ("r-1", 3), ("r-2", 2)] {
        db.execute(
            "SELECT outbox.enqueue('Order', $1, 'OrderUpdated', jsonb_build_object('seq', $2::int, 'aggregate', 0))",
            &[&aggregate, &n],
        )
        .await
        .unwrap();
    }
    let mut relay = RelayProcess::start(&["run"], &s.env);
    wait_all_published(&db, Duration::from_secs(60)).await;
    relay.kill();
    assert_eq!(s.client.pull_all(SUBSCRIPTION, 5, Duration::from_secs(30)).await.len(), 5);

    // WHEN one aggregate is replayed
    let out = run_command(&["replay", "--aggregate-id", "r-1"], &s.env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "replay: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("re-published 3 of 3 matching events"), "{stdout}");

    // THEN exactly its events arrive again, in order
    let again = s.client.pull_all(SUBSCRIPTION, 3, Duration::from_secs(30)).await;
    let seqs: Vec<(String, u64)> = again
        .iter()
        .map(|m| {
            let value: Value = serde_json::from_slice(&m.data).unwrap();
            (m.ordering_key.clone(), value["payload"]["seq"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(seqs, [("r-1".to_owned(), 1), ("r-1".to_owned(), 2), ("r-1".to_owned(), 3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_account_credentials_and_an_explicit_endpoint_publish() {
    // GIVEN a service-account key file and the emulator as an explicit
    // endpoint, without PUBSUB_EMULATOR_HOST: the relay signs JWTs and sends
    // them (the emulator accepts any token)
    let s = setup(Mode::Poll).await;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key.json");
    let json = json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "test-key",
        "private_key": include_str!("../src/sink/pubsub/testdata/test-key.pem"),
        "client_email": "outbox-relay@outbox-relay-tests.iam.gserviceaccount.com",
    });
    std::fs::write(&key, json.to_string()).unwrap();
    let mut env: Vec<(&'static str, String)> =
        s.env.iter().filter(|(k, _)| *k != "PUBSUB_EMULATOR_HOST").cloned().collect();
    env.push(("OUTBOX_RELAY_SINK__PUBSUB__ENDPOINT", format!("http://{}", s.emulator.host())));
    env.push(("OUTBOX_RELAY_SINK__PUBSUB__CREDENTIALS_FILE", key.display().to_string()));
    let db = connect(&s.pg.url()).await;
    db.execute("SELECT outbox.enqueue('Order', 'sa-1', 'OrderUpdated', '{\"seq\":1,\"aggregate\":0}'::jsonb)", &[])
        .await
        .unwrap();

    // WHEN the relay runs
    let relay = RelayProcess::start(&["run"], &env);
    wait_all_published(&db, Duration::from_secs(60)).await;

    // THEN it used the service account and the event arrived
    assert!(
        relay.log().contains("service account outbox-relay@outbox-relay-tests.iam.gserviceaccount.com"),
        "{}",
        relay.log()
    );
    let received = s.client.pull_all(SUBSCRIPTION, 1, Duration::from_secs(30)).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].ordering_key, "sa-1");

    // AND a credentials file that is not one is a configuration error naming the key
    std::fs::write(&key, "{}").unwrap();
    let out = run_command(&["run"], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("sink.pubsub.credentials_file") && stderr.contains("not supported"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_passes_and_sigterm_drains_and_exits_0() {
    // GIVEN pending events for an existing topic
    let s = setup(Mode::Poll).await;
    let db = connect(&s.pg.url()).await;
    write_events(&s.pg.url(), 10, 50, 2, Duration::ZERO).await;

    // THEN `check` passes every line, the Pub/Sub endpoint and topic included
    let out = run_command(&["check"], &s.env);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("[ ok ] pubsub") && stdout.contains("1 Pub/Sub topic(s) pending events go to exist"),
        "{stdout}"
    );

    // WHEN the relay is asked to stop with SIGTERM while publishing
    let mut relay = RelayProcess::start(&["run"], &s.env);
    wait_published_at_least(&db, 1, Duration::from_secs(60), || tail(&relay.log())).await;
    relay.signal(libc::SIGTERM);

    // THEN it exits 0 and everything it acknowledged is marked; a restart publishes the rest
    let status = relay.wait_exit(Duration::from_secs(30)).expect("relay exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", relay.log());
    let relay = RelayProcess::start(&["run"], &s.env);
    wait_all_published(&db, Duration::from_secs(60)).await;
    let received = s.client.pull_all(SUBSCRIPTION, 500, Duration::from_secs(30)).await;
    let verdict = verify(&as_consumed(&received), 10, 50);
    assert_eq!((verdict.lost, verdict.order_violations), (0, 0), "{verdict:?}\n{}", tail(&relay.log()));
}

// ---------------------------------------------------------------- CloudEvents

/// Relays the sample events with `extra` settings and pulls them back.
async fn relay_samples(extra: &[(&'static str, &str)]) -> (Vec<Row>, Vec<Received>) {
    let s = setup(Mode::Poll).await;
    let rows = write_sample_events(&s.pg.url()).await;
    let mut env = s.env.clone();
    env.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let relay = RelayProcess::start(&["run"], &env);
    let db = connect(&s.pg.url()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while unpublished(&db).await > 0 {
        assert!(Instant::now() < deadline, "events not published; log:\n{}", tail(&relay.log()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = s.client.pull_all(SUBSCRIPTION, rows.len(), Duration::from_secs(30)).await;
    assert_eq!(received.len(), rows.len(), "one message per row");
    (rows, received)
}

/// Pulled messages as `tests/cloudevents_pubsub_parse.py` reads them.
fn parse_pubsub_messages(mode: &str, messages: &[Received]) -> Vec<Value> {
    let messages = messages.iter().map(|m| json!({"attributes": m.attributes, "data": hex(&m.data)})).collect();
    parse_with_sdk("cloudevents_pubsub_parse.py", mode, messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_binary_mode_uses_ce_dash_attributes_and_round_trips_through_the_sdk() {
    // GIVEN a relay in binary mode with a configured source, the version in
    // dataschema, and a header extension
    let (rows, received) = relay_samples(&[
        ("OUTBOX_RELAY_ENVELOPE__FORMAT", "cloudevents-binary"),
        ("OUTBOX_RELAY_ENVELOPE__SOURCE", "https://orders.example.com/outbox"),
        ("OUTBOX_RELAY_ENVELOPE__TYPE_VERSION", "dataschema"),
        ("OUTBOX_RELAY_ENVELOPE__DATASCHEMA", "https://schemas.example.com/{event_type}/v{event_version}.json"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__TENANT", "tenant"),
    ])
    .await;

    // THEN data is the payload exactly, content-type is the data's, every
    // other attribute is ce-<name> (Pub/Sub binding), the ordering key is the aggregate
    for message in &received {
        let row = row_for(&rows, &message.attributes["ce-id"]);
        assert_eq!(std::str::from_utf8(&message.data).unwrap(), row.payload);
        assert_eq!(message.ordering_key, row.aggregate_id);
        assert_eq!(message.attributes["content-type"], "application/json");
        assert_eq!(message.attributes["ce-specversion"], "1.0");
        assert_eq!(message.attributes["ce-time"], row.created);
        for name in message.attributes.keys() {
            assert!(name == "content-type" || name.starts_with("ce-"), "unexpected attribute {name}");
        }
    }

    // AND the CloudEvents SDK reads every attribute and the data back
    for event in parse_pubsub_messages("binary", &received) {
        let row = row_for(&rows, event["attributes"]["id"].as_str().unwrap());
        let dataschema = format!("https://schemas.example.com/{}/v{}.json", row.event_type, row.event_version);
        let extensions = [("tenant", "tenant")];
        let expected = expected_attributes(
            row,
            true,
            "https://orders.example.com/outbox",
            &row.event_type,
            Some(dataschema),
            &extensions,
        );
        assert_round_trip(&event, &expected, row);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloudevents_structured_mode_round_trips_through_the_sdk() {
    // GIVEN a relay in structured mode with the default source and type suffix
    let (rows, received) = relay_samples(&[
        ("OUTBOX_RELAY_ENVELOPE__FORMAT", "cloudevents-structured"),
        ("OUTBOX_RELAY_ENVELOPE__HEADER_EXTENSIONS__TENANT", "tenant"),
    ])
    .await;

    // THEN the only attribute is the structured content-type, data is the JSON event
    for message in &received {
        let names: Vec<&str> = message.attributes.keys().map(String::as_str).collect();
        assert_eq!(names, ["content-type"]);
        assert_eq!(message.attributes["content-type"], "application/cloudevents+json; charset=UTF-8");
        let value: Value = serde_json::from_slice(&message.data).unwrap();
        let row = row_for(&rows, value["id"].as_str().unwrap());
        assert_eq!(message.ordering_key, row.aggregate_id);
        let text = std::str::from_utf8(&message.data).unwrap();
        assert!(text.ends_with(&format!(r#","data":{}}}"#, row.payload)), "{text}");
    }

    // AND the CloudEvents SDK reads every attribute and the data back
    for event in parse_pubsub_messages("structured", &received) {
        let row = row_for(&rows, event["attributes"]["id"].as_str().unwrap());
        let ty = format!("{}.v{}", row.event_type, row.event_version);
        let expected =
            expected_attributes(row, false, "/outbox-relay/outbox.events", &ty, None, &[("tenant", "tenant")]);
        assert_round_trip(&event, &expected, row);
    }
}
