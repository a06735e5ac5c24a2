//! The fault suite: the real relay binary against a private Postgres and a
//! real Kafka-protocol broker (tansu) or librdkafka's mock cluster, with
//! crashes, outages, broker errors, poison rows and a slow broker.
//!
//! Every test prints one summary row:
//! `faults | events | lost | duplicates | dead-lettered`.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::relay::{check_order, connect, metric_sum, relay_env, verify, wait_all_published, Numbering, RelayProcess};
use common::{consume, Consumed, StopMode, TestBroker, ThrowawayPostgres};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const TOPIC: &str = "outbox.Order";
const DEAD_LETTER: &str = "outbox.dead-letter";

/// A tiny seeded xorshift64*, so "random" kill moments are reproducible.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

fn summary(faults: &str, events: usize, lost: usize, duplicates: usize, dead_lettered: usize) {
    println!("faults | events | lost | duplicates | dead-lettered");
    println!("{faults} | {events} | {lost} | {duplicates} | {dead_lettered}");
}

/// Writes `order-{a}` events with `seq` in `seqs` for every aggregate, five
/// rows per transaction, pausing `pause` after each transaction.
async fn write_seqs(url: &str, aggregates: usize, seqs: std::ops::RangeInclusive<usize>, pause: Duration) {
    let mut client = connect(url).await;
    let insert = client
        .prepare(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             VALUES ('Order', $1, 'OrderUpdated', $2)",
        )
        .await
        .expect("prepare insert");
    for seq in seqs {
        let all: Vec<usize> = (0..aggregates).collect();
        for chunk in all.chunks(5) {
            let tx = client.transaction().await.expect("begin");
            for a in chunk {
                let payload = serde_json::json!({ "seq": seq, "aggregate": a, "pad": "x".repeat(64) });
                tx.execute(&insert, &[&format!("order-{a}"), &payload]).await.expect("insert event");
            }
            tx.commit().await.expect("commit");
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn event_ids(consumed: &[Consumed]) -> HashSet<String> {
    consumed
        .iter()
        .filter_map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).ok())
        .filter_map(|v| v["event_id"].as_str().map(str::to_owned))
        .collect()
}

fn mock_cluster(brokers: i32) -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
    let cluster = MockCluster::new(brokers).expect("start the mock cluster");
    cluster.create_topic(TOPIC, 4, brokers).expect("create topic");
    cluster.create_topic(DEAD_LETTER, 1, brokers).expect("create dead-letter topic");
    cluster
}

/// The capture mode a fault test runs in; replication runs with
/// `published.mode = "mark"` so "every row ends published" is checkable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Poll,
    Replication,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Poll => "poll",
            Mode::Replication => "replication",
        }
    }

    fn env(self, pg_url: &str, brokers: &str) -> Vec<(&'static str, String)> {
        let mut env = relay_env(pg_url, brokers);
        if self == Mode::Replication {
            env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
            env.push(("OUTBOX_RELAY_PUBLISHED__MODE", "mark".into()));
        }
        env
    }

    /// `outbox-relay migrate` with this mode's settings: in replication mode
    /// it also creates the publication and the slot, so it runs before any
    /// event is written.
    fn migrate(self, pg_url: &str) {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        command.arg("migrate");
        for (key, value) in self.env(pg_url, "127.0.0.1:9") {
            command.env(key, value);
        }
        let output = command.output().expect("run migrate");
        assert!(output.status.success(), "migrate failed: {}", String::from_utf8_lossy(&output.stderr));
    }
}

/// One `#[tokio::test]` per capture mode for a fault scenario.
macro_rules! in_both_modes {
    ($scenario:ident: $poll:ident, $replication:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $poll() {
            $scenario(Mode::Poll).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $replication() {
            $scenario(Mode::Replication).await
        }
    };
}

/// `wait_all_published`, showing the relay's log on a timeout.
async fn wait_published_or_show_log(client: &tokio_postgres::Client, relay: &RelayProcess, timeout: Duration) {
    common::relay::wait_all_published_or(client, timeout, || relay.log()).await
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("relay.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

in_both_modes!(sigkill_20_times_under_steady_writes_loses_nothing_and_keeps_order: sigkill_20_times_poll, sigkill_20_times_replication);

async fn sigkill_20_times_under_steady_writes_loses_nothing_and_keeps_order(mode: Mode) {
    // GIVEN a relay with a small in-flight window and writers that keep writing
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let (aggregates, per_aggregate) = (30, 60);
    let writer = tokio::spawn({
        let url = pg.url();
        async move { write_seqs(&url, aggregates, 1..=per_aggregate, Duration::from_millis(20)).await }
    });
    let mut env = mode.env(&pg.url(), &broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__BATCH_SIZE", "100".into()));
    env.push(("OUTBOX_RELAY_SOURCE__MAX_IN_FLIGHT_BATCHES", "4".into()));
    let window = 100 * 4;

    // WHEN the relay is SIGKILLed at seeded random moments 20 times, restarted each time
    let mut rng = XorShift(0x5eed_f00d_cafe_0001);
    for _ in 0..20 {
        let mut relay = RelayProcess::start(&["run"], &env);
        std::thread::sleep(Duration::from_millis(rng.between(100, 700)));
        relay.kill();
    }
    let relay = RelayProcess::start(&["run"], &env);
    writer.await.expect("writer");
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN every event arrived, per-aggregate order holds, duplicates are bounded
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(&format!("20 x SIGKILL ({})", mode.label()), total, verdict.lost, verdict.duplicates, 0);
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(verdict.duplicates <= 20 * window, "{verdict:?}");
}

in_both_modes!(tansu_frozen_for_10s_loses_nothing_and_keeps_order: tansu_down_10s_poll, tansu_down_10s_replication);

async fn tansu_frozen_for_10s_loses_nothing_and_keeps_order(mode: Mode) {
    // GIVEN a relay publishing to the real test broker while writers write
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &broker.bootstrap()));
    let (aggregates, per_aggregate) = (20, 60);
    let writer = tokio::spawn({
        let url = pg.url();
        async move { write_seqs(&url, aggregates, 1..=per_aggregate, Duration::from_millis(40)).await }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // WHEN the broker process is stopped (SIGSTOP) for 10 s while writes continue, then continued
    broker.freeze(true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.freeze(false);
    writer.await.expect("writer");

    // THEN every row ends published, nothing is lost and per-aggregate order holds
    let client = connect(&pg.url()).await;
    wait_published_or_show_log(&client, &relay, Duration::from_secs(120)).await;
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        &format!("tansu stopped 10 s (SIGSTOP), continued ({})", mode.label()),
        total,
        verdict.lost,
        verdict.duplicates,
        0,
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(mock_cluster_all_brokers_down_for_10s_delivers_everything_in_order: mock_brokers_down_10s_poll, mock_brokers_down_10s_replication);

async fn mock_cluster_all_brokers_down_for_10s_delivers_everything_in_order(mode: Mode) {
    // GIVEN a relay on a 3-broker mock cluster and writers writing
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    mode.migrate(&pg.url());
    let cluster = mock_cluster(3);
    let bootstrap = cluster.bootstrap_servers();
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &bootstrap));
    let (aggregates, per_aggregate) = (20, 50);
    let writer = tokio::spawn({
        let url = pg.url();
        async move { write_seqs(&url, aggregates, 1..=per_aggregate, Duration::from_millis(30)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;

    // WHEN every broker goes down for 10 s
    for id in 1..=3 {
        cluster.broker_down(id).expect("broker down");
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    for id in 1..=3 {
        cluster.broker_up(id).expect("broker up");
    }
    writer.await.expect("writer");
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN everything was delivered, in per-aggregate order
    let total = aggregates * per_aggregate;
    let consumed = consume(&bootstrap, &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        &format!("mock cluster: all brokers down 10 s ({})", mode.label()),
        total,
        verdict.lost,
        verdict.duplicates,
        0,
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(retriable_produce_errors_still_deliver_everything_in_order: retriable_produce_errors_poll, retriable_produce_errors_replication);

async fn retriable_produce_errors_still_deliver_everything_in_order(mode: Mode) {
    // GIVEN a mock cluster whose next Produce requests fail with retriable errors
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    mode.migrate(&pg.url());
    let cluster = mock_cluster(3);
    let bootstrap = cluster.bootstrap_servers();
    let errors = [
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS,
        RDKafkaRespErr::RD_KAFKA_RESP_ERR_LEADER_NOT_AVAILABLE,
    ];
    let many: Vec<RDKafkaRespErr> = errors.iter().cycle().take(12).copied().collect();
    cluster.request_errors(RDKafkaApiKey::Produce, &many);

    // WHEN the relay publishes 1,000 events
    let (aggregates, per_aggregate) = (20, 50);
    write_seqs(&pg.url(), aggregates, 1..=per_aggregate, Duration::ZERO).await;
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &bootstrap));
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN everything arrived in order
    let total = aggregates * per_aggregate;
    let consumed = consume(&bootstrap, &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        &format!("mock: 12 retriable Produce errors ({})", mode.label()),
        total,
        verdict.lost,
        verdict.duplicates,
        0,
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(permanent_produce_errors_dead_letter_the_affected_events_and_the_rest_flows: permanent_produce_errors_poll, permanent_produce_errors_replication);

async fn permanent_produce_errors_dead_letter_the_affected_events_and_the_rest_flows(mode: Mode) {
    // GIVEN policy dead_letter and a mock cluster whose next Produce requests fail for good
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    mode.migrate(&pg.url());
    let cluster = mock_cluster(1);
    let bootstrap = cluster.bootstrap_servers();
    cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE, RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
    );
    let (aggregates, per_aggregate) = (10, 50);
    write_seqs(&pg.url(), aggregates, 1..=per_aggregate, Duration::ZERO).await;

    // WHEN the relay publishes
    let mut env = mode.env(&pg.url(), &bootstrap);
    env.push(("OUTBOX_RELAY_FAILURES__POLICY", "dead_letter".into()));
    let relay = RelayProcess::start(&["run"], &env);
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN the refused events are dead-lettered with their reason, and every other event arrived in order
    let dead: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE dead_lettered_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    let total = aggregates * per_aggregate;
    let letters = consume(&bootstrap, &[DEAD_LETTER], dead as usize, Duration::from_secs(30));
    let consumed = consume(&bootstrap, &[TOPIC], total - dead as usize, Duration::from_secs(60));
    let delivered = event_ids(&consumed);
    let lettered = event_ids(&letters);
    let lost = total - delivered.union(&lettered).count();
    summary(
        &format!("mock: 2 x MSG_SIZE_TOO_LARGE, dead_letter ({})", mode.label()),
        total,
        lost,
        consumed.len() - delivered.len(),
        lettered.len(),
    );
    assert!(dead > 0, "some events were refused\n{}", relay.log());
    assert_eq!(lettered.len(), dead as usize);
    for letter in &letters {
        let value: serde_json::Value = serde_json::from_slice(&letter.value).unwrap();
        assert!(value["error"].as_str().unwrap().to_lowercase().contains("too large"), "{value}");
    }
    assert_eq!(lost, 0, "{}", relay.log());
    assert_eq!(check_order(&consumed, Numbering::Increasing).order_violations, 0);
}

in_both_modes!(postgres_restarts_and_terminated_connections_lose_nothing: postgres_restarts_poll, postgres_restarts_replication);

async fn postgres_restarts_and_terminated_connections_lose_nothing(mode: Mode) {
    // GIVEN a relay publishing from a Postgres that will go away three ways
    let mut pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &broker.bootstrap()));
    let aggregates = 50;

    // WHEN, mid-stream, Postgres stops fast, then immediately, then the relay's backends are terminated
    write_seqs(&pg.url(), aggregates, 1..=20, Duration::ZERO).await;
    pg.stop(StopMode::Fast).expect("fast stop");
    pg.start_again().expect("start again");
    write_seqs(&pg.url(), aggregates, 21..=40, Duration::ZERO).await;
    pg.stop(StopMode::Immediate).expect("immediate stop");
    pg.start_again().expect("start again");
    write_seqs(&pg.url(), aggregates, 41..=60, Duration::ZERO).await;
    // Give the relay time to reconnect so there is something to terminate.
    let client = connect(&pg.url()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut terminated = 0i64;
    while terminated == 0 && Instant::now() < deadline {
        terminated = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE application_name LIKE 'outbox-relay%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_seqs(&pg.url(), aggregates, 61..=80, Duration::ZERO).await;
    wait_all_published(&client, Duration::from_secs(120)).await;

    // THEN nothing is lost and order holds
    let total = aggregates * 80;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, 80);
    summary(
        &format!("postgres fast + immediate restart, backends terminated ({})", mode.label()),
        total,
        verdict.lost,
        verdict.duplicates,
        0,
    );
    assert!(terminated > 0, "the relay's connection was terminated");
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_rows_are_dead_lettered_with_reasons_and_replay_redrives_fixed_ones() {
    // GIVEN a Debezium-style table (text payload, delete mode) with three poison rows mixed in
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(DEAD_LETTER, 1);
    // `migrate` installs the lease tables relays coordinate through (and an unused outbox.events).
    common::relay::migrate(&pg.url());
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "CREATE TABLE public.outbox (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                aggregatetype varchar(255) NOT NULL,
                aggregateid varchar(255),
                type varchar(255) NOT NULL,
                payload text,
                dead_lettered_at timestamptz)",
        )
        .await
        .unwrap();
    let (aggregates, per_aggregate) = (10, 10);
    let insert = "INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', $1, 'OrderUpdated', $2)";
    for seq in 1..=per_aggregate {
        for a in 0..aggregates {
            let payload = serde_json::json!({ "seq": seq, "aggregate": a }).to_string();
            client.execute(insert, &[&format!("order-{a}"), &payload]).await.unwrap();
        }
        if seq == 5 {
            let big = serde_json::json!({ "pad": "x".repeat(20_000) }).to_string();
            client.execute(insert, &[&"poison-big", &big]).await.unwrap();
            client.execute(insert, &[&None::<String>, &"{\"seq\":1}"]).await.unwrap();
            client.execute(insert, &[&"poison-json", &"{not json"]).await.unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[source]
table = "public.outbox"
[source.columns]
position = "id"
event_id = ""
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
payload = "payload"
event_version = ""
headers = ""
actor = ""
traceparent = ""
topic = ""
created_at = ""
published_at = ""
attempts = ""
last_error = ""
failed_at = ""
dead_lettered_at = "dead_lettered_at"
[published]
mode = "delete"
[failures]
policy = "dead_letter"
[sink.kafka.properties]
"message.max.bytes" = "10000"
"#,
    );
    let env = relay_env(&pg.url(), &broker.bootstrap());

    // WHEN the relay runs with policy dead_letter
    let mut relay = RelayProcess::start(&["--config", &config, "run"], &env);
    let letters = consume(&broker.bootstrap(), &[DEAD_LETTER], 3, Duration::from_secs(60));
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));

    // THEN the poison rows are dead-lettered with reasons, and everything behind them was delivered in order
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        "poison rows (too large, NULL key, bad JSON), dead_letter",
        total + 3,
        verdict.lost,
        verdict.duplicates,
        letters.len(),
    );
    let reasons: Vec<(String, serde_json::Value)> = letters
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.value).unwrap();
            (String::from_utf8(m.key.clone().unwrap()).unwrap(), v)
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}\n{}", relay.log());
    let find = |needle: &str| reasons.iter().find(|(_, v)| v["error"].as_str().unwrap().contains(needle)).cloned();
    let (_, big) = find("too large").unwrap_or_else(|| panic!("{reasons:?}"));
    assert_eq!(big["aggregate_id"], "poison-big");
    let (key, null_key) = find("aggregate_id is NULL").unwrap_or_else(|| panic!("{reasons:?}"));
    assert_eq!(key, null_key["position"].to_string(), "no aggregate id: keyed by position");
    let (_, bad_json) = find("not valid JSON").unwrap_or_else(|| panic!("{reasons:?}"));
    assert_eq!(bad_json["payload"], "{not json");
    assert!(letters.iter().all(|m| m.headers.iter().any(|(k, v)| k == "source_table" && v == b"public.outbox")));
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(relay.wait_for_log("event dead-lettered", Duration::from_secs(5)));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut left: Vec<String> = Vec::new();
    while Instant::now() < deadline {
        left = client
            .query("SELECT coalesce(aggregateid, 'NULL') FROM public.outbox WHERE dead_lettered_at IS NOT NULL ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let all: i64 = client.query_one("SELECT count(*) FROM public.outbox", &[]).await.unwrap().get(0);
        if left.len() == 3 && all == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        left,
        ["poison-big", "NULL", "poison-json"],
        "dead-lettered rows are kept and stamped, the rest deleted"
    );
    relay.kill();

    // AND WHEN two of them are fixed and `replay --dead-lettered` runs
    client.execute("UPDATE public.outbox SET aggregateid = 'fixed' WHERE aggregateid IS NULL", &[]).await.unwrap();
    client
        .execute("UPDATE public.outbox SET payload = '{\"seq\":1}' WHERE aggregateid = 'poison-json'", &[])
        .await
        .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .args(["--config", &config, "replay", "--dead-lettered"])
        .envs(env.iter().map(|(k, v)| (k.to_string(), v.clone())))
        .output()
        .expect("run replay");

    // THEN the fixed rows are re-driven (and deleted, delete mode); the still-too-large one stays dead-lettered
    let left: Vec<String> = client
        .query("SELECT aggregateid FROM public.outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, ["poison-big"], "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!output.status.success(), "one row still fails");
    let redriven = consume(&broker.bootstrap(), &[TOPIC], total + 2, Duration::from_secs(30));
    let keys: HashSet<String> = redriven.iter().map(|m| String::from_utf8(m.key.clone().unwrap()).unwrap()).collect();
    assert!(keys.contains("fixed") && keys.contains("poison-json"), "{keys:?}");
}

in_both_modes!(slow_broker_with_200k_backlog_stays_under_64_mib: slow_broker_bounded_rss_poll, slow_broker_bounded_rss_replication);

async fn slow_broker_with_200k_backlog_stays_under_64_mib(mode: Mode) {
    // GIVEN a 200,000-event backlog and a mock broker with a 500 ms round trip
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    mode.migrate(&pg.url());
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
             SELECT 'Order', 'order-' || (g % 100), 'OrderUpdated', \
                    jsonb_build_object('seq', g / 100 + 1, 'pad', repeat('x', 64)) \
             FROM generate_series(0, 199999) g",
        )
        .await
        .unwrap();
    let cluster = mock_cluster(1);
    cluster.broker_round_trip_time(1, Duration::from_millis(500)).expect("set round trip time");

    // WHEN the relay works through it for 20 s
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &cluster.bootstrap_servers()));
    let started = Instant::now();
    let mut peak = 0.0f64;
    while started.elapsed() < Duration::from_secs(20) {
        peak = peak.max(relay.peak_rss_mib());
        std::thread::sleep(Duration::from_millis(250));
    }
    peak = peak.max(relay.peak_rss_mib());
    let published: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);

    // THEN it made progress and its peak RSS stayed under 64 MiB
    println!("slow broker ({}): published {published} of 200000 in 20 s, peak RSS {peak:.1} MiB", mode.label());
    summary(
        &format!("mock broker 500 ms RTT, 200k backlog, peak RSS {peak:.1} MiB ({})", mode.label()),
        200_000,
        0,
        0,
        0,
    );
    assert!(published > 0, "{}", relay.log());
    assert!(peak > 0.0 && peak < 64.0, "peak RSS {peak:.1} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_poison_events_are_dead_lettered_and_everything_behind_them_flows() {
    // GIVEN replication with policy dead_letter and four poison events mixed into the stream:
    // an oversized row, a row whose topic override cannot exist, and two emitted messages
    // (invalid JSON; an empty aggregate_id)
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(DEAD_LETTER, 1);
    Mode::Replication.migrate(&pg.url());
    let mut env = Mode::Replication.env(&pg.url(), &broker.bootstrap());
    env.push(("OUTBOX_RELAY_FAILURES__POLICY", "dead_letter".into()));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[sink.kafka.properties]\n\"message.max.bytes\" = \"10000\"\n");
    let relay = RelayProcess::start(&["--config", &config, "run"], &env);
    let (aggregates, per_aggregate) = (10, 10);
    write_seqs(&pg.url(), aggregates, 1..=5, Duration::ZERO).await;
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue('Order', 'poison-big', 'OrderUpdated', jsonb_build_object('pad', repeat('x', 20000)));
             SELECT outbox.enqueue('Order', 'poison-topic', 'OrderUpdated', '{\"seq\":1}', topic => 'not a topic!');
             SELECT pg_logical_emit_message(true, 'outbox', '{not json');
             SELECT pg_logical_emit_message(true, 'outbox', '{\"aggregate_type\":\"Order\",\"aggregate_id\":\"\",\"event_type\":\"X\",\"payload\":{}}');",
        )
        .await
        .unwrap();
    write_seqs(&pg.url(), aggregates, 6..=per_aggregate, Duration::ZERO).await;

    // WHEN the relay streams it all
    let letters = consume(&broker.bootstrap(), &[DEAD_LETTER], 4, Duration::from_secs(60));
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    wait_published_or_show_log(&client, &relay, Duration::from_secs(60)).await;

    // THEN the four poison events are dead-lettered with their reasons and everything else arrived in order
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        "poison events (too large, bad topic, bad JSON, empty key), dead_letter (replication)",
        total + 4,
        verdict.lost,
        verdict.duplicates,
        letters.len(),
    );
    let errors: Vec<String> = letters
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["error"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(letters.len(), 4, "{errors:?}\n{}", relay.log());
    for needle in ["too large", "not a valid Kafka topic name", "not a valid outbox event", "aggregate_id is empty"] {
        assert!(errors.iter().any(|e| e.contains(needle)), "no dead letter says {needle:?}: {errors:?}");
    }
    let bad_json = letters
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).unwrap())
        .find(|v| v["error"].as_str().unwrap().contains("not a valid outbox event"))
        .unwrap();
    assert_eq!(bad_json["payload"], "{not json", "the original message travels with its dead letter");
    let stamped: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE dead_lettered_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stamped, 2, "the two poison rows are stamped dead-lettered");
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_holds_the_failing_aggregate_back_and_releases_it_in_order_when_fixed() {
    // GIVEN the default policy (block) and aggregate order-3's sixth event aimed at a topic that cannot exist
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    Mode::Poll.migrate(&pg.url());
    let mut env = Mode::Poll.env(&pg.url(), &broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__RETRY_FAILED_AFTER", "1s".into()));
    let client = connect(&pg.url()).await;
    let (aggregates, per_aggregate) = (10, 12);
    write_seqs(&pg.url(), aggregates, 1..=5, Duration::ZERO).await;
    client
        .execute(
            "SELECT outbox.enqueue('Order', 'order-3', 'OrderUpdated', jsonb_build_object('seq', 6), topic => 'not a topic!')",
            &[],
        )
        .await
        .unwrap();
    for seq in 6..=per_aggregate {
        for a in 0..aggregates {
            if a == 3 && seq == 6 {
                continue;
            }
            client
                .execute(
                    "SELECT outbox.enqueue('Order', $1, 'OrderUpdated', jsonb_build_object('seq', $2::int))",
                    &[&format!("order-{a}"), &(seq as i32)],
                )
                .await
                .unwrap();
        }
    }

    // WHEN the relay runs
    let relay = RelayProcess::start(&["run"], &env);
    let others = (aggregates - 1) * per_aggregate + 5;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], others, Duration::from_secs(60));

    // THEN every other aggregate is complete, order-3 stops at 5, and the gauge says one aggregate is blocked
    assert!(relay.wait_for_log("its aggregate's later events wait for it", Duration::from_secs(20)), "{}", relay.log());
    let order3: Vec<i64> = consumed
        .iter()
        .filter(|m| m.key.as_deref() == Some(b"order-3".as_slice()))
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["payload"]["seq"].as_i64().unwrap())
        .collect();
    assert_eq!(order3, [1, 2, 3, 4, 5], "nothing of order-3 overtakes its failed event");
    std::thread::sleep(Duration::from_secs(2));
    let address = relay.http_address(Duration::from_secs(5));
    let metrics = common::relay::http_get(&address, "/metrics").1;
    assert_eq!(metric_sum(&metrics, "outbox_relay_blocked_aggregates"), 1.0, "{metrics}");
    let held: i64 =
        client.query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(held, (per_aggregate - 5) as i64, "order-3's events from 6 on wait unpublished");

    // AND WHEN the operator fixes the row
    client.execute("UPDATE outbox.events SET topic = NULL WHERE topic = 'not a topic!'", &[]).await.unwrap();

    // THEN order-3's events follow, in order, and nothing is blocked any more
    wait_all_published(&client, Duration::from_secs(60)).await;
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary("invalid topic on one event, block, fixed by hand (poll)", total, verdict.lost, verdict.duplicates, 0);
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    let metrics = common::relay::http_get(&address, "/metrics").1;
    assert_eq!(metric_sum(&metrics, "outbox_relay_blocked_aggregates"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_policy_in_replication_stops_the_stream_at_the_poison_event_and_dead_letter_moves_on() {
    // GIVEN replication with the default policy (block) and an emitted message that is not JSON mid-stream
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    broker.create_topic(DEAD_LETTER, 1);
    Mode::Replication.migrate(&pg.url());
    let env = Mode::Replication.env(&pg.url(), &broker.bootstrap());
    let (aggregates, per_aggregate) = (10, 10);
    write_seqs(&pg.url(), aggregates, 1..=5, Duration::ZERO).await;
    let client = connect(&pg.url()).await;
    client.execute("SELECT pg_logical_emit_message(true, 'outbox', '{not json')", &[]).await.unwrap();
    write_seqs(&pg.url(), aggregates, 6..=per_aggregate, Duration::ZERO).await;

    // WHEN the relay streams
    let mut relay = RelayProcess::start(&["run"], &env);

    // THEN it delivers everything before the poison event, stops there, and says what to do
    let before = consume(&broker.bootstrap(), &[TOPIC], aggregates * 5, Duration::from_secs(60));
    assert!(relay.wait_for_log("the stream stops here", Duration::from_secs(30)), "{}", relay.log());
    std::thread::sleep(Duration::from_secs(2));
    let unpublished: i64 =
        client.query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NULL", &[]).await.unwrap().get(0);
    assert_eq!(unpublished, (aggregates * (per_aggregate - 5)) as i64, "nothing behind the poison event is marked");
    let address = relay.http_address(Duration::from_secs(5));
    assert_eq!(metric_sum(&common::relay::http_get(&address, "/metrics").1, "outbox_relay_blocked_aggregates"), 1.0);
    relay.kill();

    // AND WHEN it is restarted with policy dead_letter
    let mut env = env;
    env.push(("OUTBOX_RELAY_FAILURES__POLICY", "dead_letter".into()));
    let relay = RelayProcess::start(&["run"], &env);

    // THEN the poison event is dead-lettered and everything behind it arrives, in order
    wait_all_published(&client, Duration::from_secs(60)).await;
    let letters = consume(&broker.bootstrap(), &[DEAD_LETTER], 1, Duration::from_secs(30));
    let total = aggregates * per_aggregate;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        "emitted message not JSON, block then dead_letter (replication)",
        total + 1,
        verdict.lost,
        verdict.duplicates,
        letters.len(),
    );
    assert!(before.len() >= aggregates * 5);
    assert_eq!(letters.len(), 1, "{}", relay.log());
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}
