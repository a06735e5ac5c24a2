//! Exactly-once delivery (`sink.kafka.delivery = "exactly_once"`): the real
//! relay binary against a private Postgres and the real test broker (tansu),
//! or librdkafka's mock cluster for transactional errors. Every check reads
//! the topic back the way a consumer must, with `isolation.level =
//! read_committed`, and counts what a user would: events lost, duplicated,
//! and out of per-aggregate order. Expected everywhere: 0, 0, 0.
//!
//! Every test prints one summary row:
//! `scenario | events | lost | duplicates | order violations`.

mod common;

use std::time::{Duration, Instant};

use common::relay::{cli, connect, metric_sum, relay_env, verify, wait_all_published_or, RelayProcess, Verdict};
use common::{Consumed, TestBroker};
use outbox_relay::demo::postgres::{StopMode, ThrowawayPostgres};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

const TOPIC: &str = "outbox.Order";
const OFFSETS: &str = "outbox-relay.offsets";

/// A tiny seeded xorshift64*, so kill moments are reproducible.
struct XorShift(u64);

impl XorShift {
    fn between(&mut self, low: u64, high: u64) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        low + x.wrapping_mul(0x2545_f491_4f6c_dd1d) % (high - low)
    }
}

fn summary(scenario: &str, events: usize, verdict: &Verdict) {
    println!("scenario | events | lost | duplicates | order violations");
    println!("{scenario} | {events} | {} | {} | {}", verdict.lost, verdict.duplicates, verdict.order_violations);
}

/// The capture mode; replication runs with `published.mode = "mark"` so
/// "every row ends published" is checkable.
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

    /// A relay's environment: exactly-once delivery, this mode, small batches
    /// (many transactions), a fast takeover.
    fn env(self, pg_url: &str, brokers: &str) -> Vec<(&'static str, String)> {
        let mut env = relay_env(pg_url, brokers);
        env.push(("OUTBOX_RELAY_SINK__KAFKA__DELIVERY", "exactly_once".into()));
        env.push(("OUTBOX_RELAY_SOURCE__BATCH_SIZE", "50".into()));
        env.push(("OUTBOX_RELAY_SOURCE__MAX_IN_FLIGHT_BATCHES", "4".into()));
        if self == Mode::Replication {
            env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
            env.push(("OUTBOX_RELAY_PUBLISHED__MODE", "mark".into()));
        }
        env
    }

    fn migrate(self, pg_url: &str) {
        let (code, _, err) = cli(&["migrate"], &self.env(pg_url, "127.0.0.1:9"));
        assert_eq!(code, 0, "migrate failed: {err}");
    }
}

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

/// Reads every partition of `topic` from the beginning as an exactly-once
/// consumer must (`isolation.level = read_committed`, as [`common::consume`] reads).
fn consume_committed(bootstrap: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Consumed> {
    common::consume(bootstrap, &[topic], expected, timeout)
}

in_both_modes!(sigkill_20_times_mid_drain_delivers_every_event_exactly_once: sigkill_20_times_poll, sigkill_20_times_replication);

async fn sigkill_20_times_mid_drain_delivers_every_event_exactly_once(mode: Mode) {
    // GIVEN exactly-once delivery, a backlog, and a writer that keeps writing
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let (aggregates, backlog, per_aggregate) = (30, 40, 80);
    write_seqs(&pg.url(), aggregates, 1..=backlog, Duration::ZERO).await;
    let writer = tokio::spawn({
        let url = pg.url();
        async move { write_seqs(&url, aggregates, backlog + 1..=per_aggregate, Duration::from_millis(40)).await }
    });
    let env = mode.env(&pg.url(), &broker.bootstrap());

    // WHEN the relay is SIGKILLed at seeded random moments 20 times while it drains
    let mut rng = XorShift(0x5eed_0e05_cafe_0020);
    for _ in 0..20 {
        let mut relay = RelayProcess::start(&["run"], &env);
        std::thread::sleep(Duration::from_millis(rng.between(300, 1500)));
        relay.kill();
    }
    let relay = RelayProcess::start(&["run"], &env);
    writer.await.expect("writer");
    let client = connect(&pg.url()).await;
    wait_all_published_or(&client, Duration::from_secs(180), || relay.log()).await;

    // THEN a read_committed consumer sees every event once, in per-aggregate order
    let total = aggregates * per_aggregate;
    let consumed = consume_committed(&broker.bootstrap(), TOPIC, total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(&format!("exactly once: 20 x SIGKILL mid-drain ({})", mode.label()), total, &verdict);
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    // tansu 0.6 shows a read_committed consumer the records of aborted transactions (its Fetch
    // reports none aborted): each relay killed with a transaction open leaves up to one batch (50)
    // of copies that Kafka would hide (README, "Exactly-once delivery to Kafka"). A lost event fails.
    assert!(verdict.duplicates <= 20 * 50, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(a_takeover_fences_the_frozen_relay_and_nothing_arrives_twice: takeover_fences_poll, takeover_fences_replication);

async fn a_takeover_fences_the_frozen_relay_and_nothing_arrives_twice(mode: Mode) {
    // GIVEN relay a publishing a backlog with exactly-once delivery and a writer writing
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let (aggregates, backlog, per_aggregate) = (30, 60, 100);
    write_seqs(&pg.url(), aggregates, 1..=backlog, Duration::ZERO).await;
    let writer = tokio::spawn({
        let url = pg.url();
        async move { write_seqs(&url, aggregates, backlog + 1..=per_aggregate, Duration::from_millis(40)).await }
    });
    let with_id = |id: &str| {
        let mut env = mode.env(&pg.url(), &broker.bootstrap());
        env.push(("OUTBOX_RELAY_REPLICAS__RELAY_ID", id.to_owned()));
        env
    };
    let mut a = RelayProcess::start(&["run"], &with_id("relay-a"));
    assert!(a.wait_for_log("transactional producer ready", Duration::from_secs(30)), "{}", a.log());
    std::thread::sleep(Duration::from_millis(700));

    // WHEN a freezes mid-drain (SIGSTOP) past its lease, b takes over, and a wakes up (SIGCONT)
    a.signal(libc::SIGSTOP);
    let b = RelayProcess::start(&["run"], &with_id("relay-b"));
    let fenced = match mode {
        Mode::Poll => "fenced the previous holder's producer",
        Mode::Replication => "transactional producer ready",
    };
    let took_over = b.wait_for_log(fenced, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    a.signal(libc::SIGCONT);
    writer.await.expect("writer");
    let client = connect(&pg.url()).await;
    wait_all_published_or(&client, Duration::from_secs(180), || {
        format!("relay-a:\n{}\nrelay-b:\n{}", a.log(), b.log())
    })
    .await;
    assert!(took_over, "relay-b never took over:\n{}", b.log());

    // THEN a read_committed consumer sees every event once, in order
    let total = aggregates * per_aggregate;
    let consumed = consume_committed(&broker.bootstrap(), TOPIC, total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(
        &format!("exactly once: leader frozen past its lease, taken over, woken ({})", mode.label()),
        total,
        &verdict,
    );
    a.kill();
    assert_eq!(verdict.lost, 0, "{verdict:?}\nrelay-a:\n{}\nrelay-b:\n{}", a.log(), b.log());
    // The frozen relay's open transaction is aborted by the takeover; tansu 0.6 still shows its
    // records to read_committed consumers (README, "Exactly-once delivery to Kafka"): at most
    // that one batch (50) of copies, which Kafka would hide.
    assert!(verdict.duplicates <= 50, "{verdict:?}\nrelay-a:\n{}\nrelay-b:\n{}", a.log(), b.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(postgres_restarts_and_terminated_backends_deliver_every_event_exactly_once: postgres_restarts_poll, postgres_restarts_replication);

async fn postgres_restarts_and_terminated_backends_deliver_every_event_exactly_once(mode: Mode) {
    // GIVEN exactly-once delivery from a Postgres that will go away three ways
    let mut pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 8);
    mode.migrate(&pg.url());
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &broker.bootstrap()));
    let aggregates = 50;

    // WHEN, mid-stream, Postgres stops fast, then immediately (a crash: the
    // slot's position is only as durable as the last checkpoint), then the
    // relay's backends are terminated
    write_seqs(&pg.url(), aggregates, 1..=20, Duration::ZERO).await;
    pg.stop(StopMode::Fast).expect("fast stop");
    pg.start_again().expect("start again");
    write_seqs(&pg.url(), aggregates, 21..=40, Duration::ZERO).await;
    pg.stop(StopMode::Immediate).expect("immediate stop");
    pg.start_again().expect("start again");
    write_seqs(&pg.url(), aggregates, 41..=60, Duration::ZERO).await;
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
            .expect("terminate the relay's backends")
            .get(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    write_seqs(&pg.url(), aggregates, 61..=80, Duration::ZERO).await;
    wait_all_published_or(&client, Duration::from_secs(180), || relay.log()).await;

    // THEN a read_committed consumer sees every event once, in order
    let total = aggregates * 80;
    let consumed = consume_committed(&broker.bootstrap(), TOPIC, total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, 80);
    summary(
        &format!("exactly once: postgres fast + immediate restart, backends terminated ({})", mode.label()),
        total,
        &verdict,
    );
    assert!(terminated > 0, "the relay's connection was terminated");
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_tansu_duplicates_only(&verdict, &relay);
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

/// No duplicate but the copies of transactions this relay aborted: tansu 0.6 shows their records
/// to read_committed consumers (README, "Exactly-once delivery to Kafka"), at most one batch (50)
/// per aborted transaction, as its metrics count them; with none aborted, none.
fn assert_tansu_duplicates_only(verdict: &Verdict, relay: &RelayProcess) {
    let (_, metrics) = common::relay::http_get(&relay.http_address(Duration::from_secs(5)), "/metrics");
    let aborted = metric_sum(&metrics, "outbox_relay_transactions_aborted_total");
    assert!(verdict.duplicates as f64 <= aborted * 50.0, "{verdict:?}, {aborted} aborted\n{}", relay.log());
}

in_both_modes!(broker_frozen_10s_delivers_every_event_exactly_once: broker_frozen_poll, broker_frozen_replication);

async fn broker_frozen_10s_delivers_every_event_exactly_once(mode: Mode) {
    // GIVEN exactly-once delivery to the test broker while writers write
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

    // WHEN the broker process is stopped (SIGSTOP) for 10 s, then continued
    broker.freeze(true);
    tokio::time::sleep(Duration::from_secs(10)).await;
    broker.freeze(false);
    writer.await.expect("writer");
    let client = connect(&pg.url()).await;
    wait_all_published_or(&client, Duration::from_secs(180), || relay.log()).await;

    // THEN a read_committed consumer sees every event once, in order
    let total = aggregates * per_aggregate;
    let consumed = consume_committed(&broker.bootstrap(), TOPIC, total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate);
    summary(&format!("exactly once: broker stopped 10 s (SIGSTOP), continued ({})", mode.label()), total, &verdict);
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_tansu_duplicates_only(&verdict, &relay);
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
}

in_both_modes!(transactional_errors_are_aborted_and_retried_without_loss_or_reordering: mock_txn_errors_poll, mock_txn_errors_replication);

async fn transactional_errors_are_aborted_and_retried_without_loss_or_reordering(mode: Mode) {
    // GIVEN a mock cluster whose transaction commits fail: abortable
    // (UNKNOWN_PRODUCER_ID), then the producer fenced (PRODUCER_FENCED)
    let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
    mode.migrate(&pg.url());
    let cluster = MockCluster::new(3).expect("start the mock cluster");
    cluster.create_topic(TOPIC, 4, 3).expect("create topic");
    cluster.create_topic(OFFSETS, 1, 3).expect("create offsets topic");
    let bootstrap = cluster.bootstrap_servers();
    let (aggregates, per_aggregate) = (20, 50);
    write_seqs(&pg.url(), aggregates, 1..=per_aggregate, Duration::ZERO).await;
    let relay = RelayProcess::start(&["run"], &mode.env(&pg.url(), &bootstrap));
    assert!(relay.wait_for_log("transactional producer ready", Duration::from_secs(30)), "{}", relay.log());
    cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED,
        ],
    );
    // AND more events behind them
    write_seqs(&pg.url(), aggregates, per_aggregate + 1..=per_aggregate * 2, Duration::from_millis(10)).await;

    // WHEN the relay drains everything
    let client = connect(&pg.url()).await;
    wait_all_published_or(&client, Duration::from_secs(180), || relay.log()).await;

    // THEN transactions were aborted and retried (as the relay's metrics
    // say), and a read_committed consumer sees every event, in per-aggregate
    // order. The mock cluster does not implement transaction markers (its
    // Fetch reports no aborted transactions and the high watermark as the
    // last stable offset), so its consumers also see the aborted attempts:
    // the duplicates counted here are those, which Kafka hides (tansu 0.6
    // shows them too).
    let (_, metrics) = common::relay::http_get(&relay.http_address(Duration::from_secs(5)), "/metrics");
    let aborted = metric_sum(&metrics, "outbox_relay_transactions_aborted_total");
    let committed = metric_sum(&metrics, "outbox_relay_transactions_committed_total");
    let total = aggregates * per_aggregate * 2;
    let consumed = consume_committed(&bootstrap, TOPIC, total, Duration::from_secs(60));
    let verdict = verify(&consumed, aggregates, per_aggregate * 2);
    summary(&format!("exactly once: mock EndTxn errors, {aborted} aborted ({})", mode.label()), total, &verdict);
    assert!(aborted >= 1.0, "no transaction was aborted: {metrics}\n{}", relay.log());
    assert!(
        relay.log().contains("fenced by a newer instance"),
        "the injected PRODUCER_FENCED never reached the relay:\n{}",
        relay.log()
    );
    assert!(committed >= 1.0, "{metrics}");
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    // Every duplicate is a copy of an aborted attempt: at most one batch (50) per abort.
    assert!(verdict.duplicates as f64 <= aborted * 50.0, "{verdict:?}, {aborted} aborted\n{}", relay.log());
}

#[test]
fn exactly_once_with_pubsub_is_a_configuration_error_that_says_why() {
    // GIVEN kind = "pubsub" and delivery = "exactly_once"
    let env = vec![
        ("OUTBOX_RELAY_POSTGRES__URL", "postgres://relay@127.0.0.1:9/app".to_owned()),
        ("OUTBOX_RELAY_SINK__KIND", "pubsub".to_owned()),
        ("OUTBOX_RELAY_SINK__PUBSUB__PROJECT", "my-project".to_owned()),
        ("OUTBOX_RELAY_SINK__KAFKA__DELIVERY", "exactly_once".to_owned()),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    // WHEN the relay starts
    let (code, _, err) = cli(&["run"], &env);
    // THEN it exits 2 naming the key and why
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("sink.kafka.delivery") && err.contains("Pub/Sub has no transactions"), "{err}");
}
