//! Silent failures at the edges: a network path that stops forwarding
//! without a reset (frozen NAT entry, dead VM, stuck proxy), in both capture
//! modes, and SIGTERM while a connection hangs.
//!
//! The relay reaches Postgres through a userspace TCP proxy
//! (`common/proxy.rs`) that the test freezes: existing connections stop
//! forwarding while new ones pass. Every test prints one row:
//! `scenario | io_timeout | recovery | lost | duplicates | order violations`.

mod common;

use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::relay::{connect, migrate, relay_env, unpublished, verify, wait_all_published_or, RelayProcess};
use common::{consume, TestBroker, ThrowawayPostgres};

const TOPIC: &str = "outbox.Order";
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const AGGREGATES: usize = 4;

struct Setup {
    pg: ThrowawayPostgres,
    broker: TestBroker,
    proxy: Proxy,
}

impl Setup {
    async fn start() -> Setup {
        let pg = ThrowawayPostgres::start().expect("start a throwaway postgres");
        let broker = TestBroker::start();
        broker.create_topic(TOPIC, 4);
        let proxy = Proxy::start(([127, 0, 0, 1], pg.port()).into()).await;
        Setup { pg, broker, proxy }
    }

    /// The relay's URL: through the proxy.
    fn proxied_url(&self) -> String {
        self.pg.url().replace(&format!(":{}/", self.pg.port()), &format!(":{}/", self.proxy.address().port()))
    }

    fn env(&self, mode: &str, io_timeout: Duration) -> Vec<(&'static str, String)> {
        let mut env = relay_env(&self.proxied_url(), &self.broker.bootstrap());
        env.push(("OUTBOX_RELAY_SOURCE__MODE", mode.into()));
        env.push(("OUTBOX_RELAY_POSTGRES__IO_TIMEOUT", format!("{}s", io_timeout.as_secs())));
        env
    }
}

/// Inserts seq `seq` for every aggregate, one transaction.
async fn write_seq(client: &tokio_postgres::Client, seq: usize) {
    for a in 0..AGGREGATES {
        let payload = serde_json::json!({ "seq": seq, "aggregate": a });
        client
            .execute(
                "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', $1, 'OrderUpdated', $2)",
                &[&format!("order-{a}"), &payload],
            )
            .await
            .expect("insert event");
    }
}

/// Waits until every row is published; the time it took.
async fn time_to_publish_all(client: &tokio_postgres::Client, relay: &RelayProcess, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_all_published_or(client, limit, || relay.log()).await;
    started.elapsed()
}

/// Freeze every connection the relay has to Postgres while it runs; the
/// relay must notice, reconnect through the (passing) new connections,
/// publish what was written meanwhile, lose nothing, keep order, and stop
/// on SIGTERM.
async fn frozen_postgres_path_recovers(mode: &str) {
    let s = Setup::start().await;
    let env = s.env(mode, IO_TIMEOUT);
    migrate_with(&s.pg.url(), &env);
    let client = connect(&s.pg.url()).await;
    let mut relay = RelayProcess::start(&["run"], &env);
    for seq in 1..=3 {
        write_seq(&client, seq).await;
    }
    time_to_publish_all(&client, &relay, Duration::from_secs(60)).await;

    let before = s.proxy.accepted();
    s.proxy.freeze();
    let frozen_at = Instant::now();
    write_seq(&client, 4).await;
    // Published again = the relay noticed the silence and reconnected.
    wait_all_published_or(&client, Duration::from_secs(60), || relay.log()).await;
    let recovery = frozen_at.elapsed();
    assert!(s.proxy.accepted() > before, "the relay opened new connections");
    let log = relay.log();
    assert!(log.contains("postgres.io_timeout"), "the log names the silent connection and the setting:\n{log}");

    for seq in 5..=8 {
        write_seq(&client, seq).await;
    }
    time_to_publish_all(&client, &relay, Duration::from_secs(60)).await;
    let consumed = consume(&s.broker.bootstrap(), &[TOPIC], AGGREGATES * 8, Duration::from_secs(30));
    let verdict = verify(&consumed, AGGREGATES, 8);
    println!("scenario | io_timeout | recovery | lost | duplicates | order violations");
    println!(
        "{mode}: freeze all postgres connections | {IO_TIMEOUT:?} | {:.2}s | {} | {} | {}",
        recovery.as_secs_f64(),
        verdict.lost,
        verdict.duplicates,
        verdict.order_violations
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(
        recovery < IO_TIMEOUT * 3,
        "recovery took {recovery:?}, more than 3 x postgres.io_timeout ({IO_TIMEOUT:?})\n{}",
        relay.log()
    );

    relay.signal(libc::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(20)).is_some(), "the relay did not stop on SIGTERM\n{}", relay.log());
}

fn migrate_with(url: &str, env: &[(&'static str, String)]) {
    let mut env: Vec<(&str, String)> = env.to_vec();
    env.retain(|(k, _)| *k != "OUTBOX_RELAY_POSTGRES__URL");
    env.push(("OUTBOX_RELAY_POSTGRES__URL", url.to_owned()));
    let (code, out, err) = common::relay::cli(&["migrate"], &env);
    assert_eq!(code, 0, "migrate failed: {out}{err}");
    let _ = migrate;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_recovers_from_a_frozen_postgres_path() {
    frozen_postgres_path_recovers("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_mode_recovers_from_a_frozen_postgres_path() {
    frozen_postgres_path_recovers("replication").await;
}

/// With a connection stuck (and `postgres.io_timeout` far away), SIGTERM
/// still ends the relay within `shutdown.drain_timeout` plus a few seconds.
async fn sigterm_ends_a_stuck_relay(mode: &str) {
    let s = Setup::start().await;
    let mut env = s.env(mode, Duration::from_secs(3600));
    env.retain(|(k, _)| *k != "OUTBOX_RELAY_SHUTDOWN__DRAIN_TIMEOUT");
    let drain = Duration::from_secs(3);
    env.push(("OUTBOX_RELAY_SHUTDOWN__DRAIN_TIMEOUT", "3s".into()));
    migrate_with(&s.pg.url(), &env);
    let client = connect(&s.pg.url()).await;
    let mut relay = RelayProcess::start(&["run"], &env);
    write_seq(&client, 1).await;
    time_to_publish_all(&client, &relay, Duration::from_secs(60)).await;
    // Everything hangs now, new connections included.
    s.proxy.blackhole(true);
    s.proxy.freeze();
    write_seq(&client, 2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(unpublished(&client).await > 0);
    relay.signal(libc::SIGTERM);
    let asked = Instant::now();
    let status = relay.wait_exit(Duration::from_secs(30));
    let took = asked.elapsed();
    println!("scenario | drain_timeout | exit after SIGTERM");
    println!("{mode}: SIGTERM with every connection hanging | {drain:?} | {:.2}s ({status:?})", took.as_secs_f64());
    assert!(status.is_some(), "the relay was still running 30 s after SIGTERM\n{}", relay.log());
    assert!(took < drain + Duration::from_secs(7), "stopping took {took:?}\n{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_sigterm_ends_a_stuck_relay() {
    sigterm_ends_a_stuck_relay("poll").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_mode_sigterm_ends_a_stuck_relay() {
    sigterm_ends_a_stuck_relay("replication").await;
}

/// Two-phase commit: a transaction that sent a NOTIFY cannot be prepared.
/// `migrate` installs the NOTIFY trigger only in poll mode with
/// `source.notify = true`; otherwise an application's `PREPARE TRANSACTION`
/// of an outbox insert works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_transaction_works_unless_the_notify_trigger_is_wanted() {
    let mut pg = ThrowawayPostgres::start().expect("start a throwaway postgres");
    {
        let client = connect(&pg.url()).await;
        client
            .batch_execute("ALTER SYSTEM SET max_prepared_transactions = 5")
            .await
            .expect("enable prepared transactions");
    }
    pg.stop(common::StopMode::Fast).expect("stop postgres");
    pg.start_again().expect("restart postgres");
    let url = pg.url();
    let base = relay_env(&url, "127.0.0.1:9");

    // GIVEN migrate ran for `mode` (and source.notify); WHEN an application prepares an outbox insert; THEN:
    let prepare = |gid: &'static str| {
        let url = url.clone();
        async move {
            let client = connect(&url).await;
            client.batch_execute("BEGIN").await.expect("begin");
            client
                .batch_execute(
                    "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', 'o-2pc', 'Created', '{}')",
                )
                .await
                .expect("insert");
            let prepared = client.batch_execute(&format!("PREPARE TRANSACTION '{gid}'")).await;
            if prepared.is_ok() {
                client
                    .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                    .await
                    .expect("roll back the prepared transaction");
            }
            prepared.map_err(|e| e.as_db_error().map(|d| d.message().to_owned()).unwrap_or_else(|| e.to_string()))
        }
    };
    let with = |extra: &[(&'static str, &str)]| {
        let mut env = base.clone();
        for (k, v) in extra {
            env.push((k, v.to_string()));
        }
        env
    };

    migrate_with(&url, &with(&[("OUTBOX_RELAY_SOURCE__MODE", "poll")]));
    let poll_default = prepare("poll-default").await;
    assert!(poll_default.is_err(), "poll mode with source.notify = true keeps the trigger (PREPARE cannot work)");

    migrate_with(&url, &with(&[("OUTBOX_RELAY_SOURCE__MODE", "poll"), ("OUTBOX_RELAY_SOURCE__NOTIFY", "false")]));
    assert_eq!(prepare("poll-no-notify").await, Ok(()), "source.notify = false: PREPARE TRANSACTION works");

    migrate_with(&url, &with(&[("OUTBOX_RELAY_SOURCE__MODE", "replication")]));
    assert_eq!(prepare("replication").await, Ok(()), "replication mode: PREPARE TRANSACTION works");
    println!("two-phase commit | poll (notify on): {poll_default:?} | poll, notify off: ok | replication: ok");
}

/// A relay whose Postgres and broker are unreachable: its HTTP endpoint is
/// up, and it keeps retrying.
fn unreachable_relay() -> RelayProcess {
    let env = vec![
        ("OUTBOX_RELAY_POSTGRES__URL", "postgres://postgres@127.0.0.1:9/none".to_owned()),
        ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9".to_owned()),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    RelayProcess::start(&["run"], &env)
}

/// 400 connections that send half a request and wait, against a relay
/// limited to 256 descriptors: /readyz still answers at once.
#[test]
fn readyz_answers_through_a_flood_of_half_sent_requests() {
    let relay = unreachable_relay();
    let address = relay.http_address(Duration::from_secs(20));
    let pid = relay.pid().expect("relay runs") as libc::pid_t;
    let limit = libc::rlimit { rlim_cur: 256, rlim_max: 256 };
    // SAFETY: sets the descriptor limit of our own child process.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit on the relay: {}", std::io::Error::last_os_error());
    let mut idle = Vec::new();
    for _ in 0..400 {
        use std::io::Write;
        let Ok(mut stream) = std::net::TcpStream::connect(&address) else { continue };
        let _ = stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: relay\r\n");
        idle.push(stream);
    }
    let started = Instant::now();
    let (status, body) = common::relay::http_get(&address, "/readyz");
    let took = started.elapsed();
    println!("scenario | half-sent connections | /readyz status | took");
    println!("http flood | {} | {status} | {:.3}s", idle.len(), took.as_secs_f64());
    assert!(status == 200 || status == 503, "/readyz did not answer ({status} {body})\n{}", relay.log());
    assert!(took < Duration::from_secs(2), "/readyz took {took:?}");
    assert!(relay.log().lines().count() < 10_000);
}

/// With the broker down, librdkafka's repeated "brokers are down" lines
/// reach the log once per kind, not many times a second.
#[test]
fn broker_down_does_not_flood_the_log() {
    let relay = unreachable_relay();
    relay.http_address(Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(12));
    let log = relay.log();
    let lines = log.lines().filter(|l| l.contains("librdkafka")).count();
    println!("scenario | seconds | librdkafka lines");
    println!("broker down | 12 | {lines}");
    assert!(log.contains("librdkafka"), "the broker outage is reported:\n{log}");
    assert!(lines <= 10, "{lines} librdkafka lines in 12 s:\n{log}");
}

/// Replication connection details: a multi-host `postgres.url` whose first
/// host is down, and an unqualified `source.table` that the role's
/// search_path resolves to `outbox.events`: the relay streams as polling
/// would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_uses_every_host_and_the_search_path() {
    let pg = ThrowawayPostgres::start().expect("start a throwaway postgres");
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    let client = connect(&pg.url()).await;
    client
        .batch_execute("ALTER ROLE postgres SET search_path = outbox, public")
        .await
        .expect("set the role's search_path");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port();
    // Nothing listens on `dead` once the listener above is dropped.
    let url = format!("postgres://postgres@127.0.0.1:{dead},127.0.0.1:{}/postgres", pg.port());
    let mut env = relay_env(&url, &broker.bootstrap());
    env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
    env.push(("OUTBOX_RELAY_SOURCE__TABLE", "events".into()));
    migrate_with(&url, &env);
    let relay = RelayProcess::start(&["run"], &env);
    for seq in 1..=3 {
        write_seq(&client, seq).await;
    }
    let took = time_to_publish_all(&client, &relay, Duration::from_secs(60)).await;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], AGGREGATES * 3, Duration::from_secs(30));
    let verdict = verify(&consumed, AGGREGATES, 3);
    println!(
        "replication, first host down, source.table = \"events\" via search_path | published in {:.2}s | {verdict:?}",
        took.as_secs_f64()
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
}

/// The broker behind the freezing proxy (tansu advertises the proxy): with
/// librdkafka's request and socket timeouts at 3 s (sink.kafka.properties),
/// the producer drops the silent connection and goes on through a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_recovers_from_a_frozen_broker_path() {
    let pg = ThrowawayPostgres::start().expect("start a throwaway postgres");
    let proxy = Proxy::start(([127, 0, 0, 1], 9).into()).await;
    let broker = TestBroker::start_advertising(proxy.address().port());
    proxy.retarget(broker.bootstrap().parse().expect("broker address"));
    broker.create_topic(TOPIC, 4);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        "[sink.kafka.properties]\n\"socket.timeout.ms\" = \"3000\"\n\"request.timeout.ms\" = \"3000\"\n",
    )
    .expect("write config");
    let env = relay_env(&pg.url(), &proxy.address().to_string());
    migrate_with(&pg.url(), &env);
    let client = connect(&pg.url()).await;
    let config = config.display().to_string();
    let relay = RelayProcess::start(&["--config", &config, "run"], &env);
    for seq in 1..=3 {
        write_seq(&client, seq).await;
    }
    time_to_publish_all(&client, &relay, Duration::from_secs(60)).await;
    s_freeze_and_measure(&proxy, &client, &relay, &broker, "poll: freeze the broker path").await;
}

/// Freezes `proxy`, writes, measures until published again, then checks
/// delivery of seq 1..=8.
async fn s_freeze_and_measure(
    proxy: &Proxy,
    client: &tokio_postgres::Client,
    relay: &RelayProcess,
    broker: &TestBroker,
    label: &str,
) {
    proxy.freeze();
    let frozen_at = Instant::now();
    write_seq(client, 4).await;
    wait_all_published_or(client, Duration::from_secs(90), || relay.log()).await;
    let recovery = frozen_at.elapsed();
    for seq in 5..=8 {
        write_seq(client, seq).await;
    }
    time_to_publish_all(client, relay, Duration::from_secs(60)).await;
    let consumed = consume(&broker.bootstrap(), &[TOPIC], AGGREGATES * 8, Duration::from_secs(30));
    let verdict = verify(&consumed, AGGREGATES, 8);
    println!("scenario | timeout | recovery | lost | duplicates | order violations");
    println!(
        "{label} | 3s | {:.2}s | {} | {} | {}",
        recovery.as_secs_f64(),
        verdict.lost,
        verdict.duplicates,
        verdict.order_violations
    );
    assert_eq!(verdict.lost, 0, "{verdict:?}\n{}", relay.log());
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    assert!(recovery < Duration::from_secs(20), "recovery took {recovery:?}\n{}", relay.log());
}

/// An ACL denial from the broker fails the affected events at once (here:
/// dead-lettered with the reason), instead of being retried as transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_authorization_failures_fail_the_event_not_the_session() {
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let pg = ThrowawayPostgres::start().expect("start a throwaway postgres");
    let cluster: MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
        MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(TOPIC, 4, 1).expect("create topic");
    cluster.create_topic("outbox.dead-letter", 1, 1).expect("create the dead-letter topic");
    let bootstrap = cluster.bootstrap_servers();
    let mut env = relay_env(&pg.url(), &bootstrap);
    env.push(("OUTBOX_RELAY_FAILURES__POLICY", "dead_letter".into()));
    migrate_with(&pg.url(), &env);
    let client = connect(&pg.url()).await;
    cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED]);
    let relay = RelayProcess::start(&["run"], &env);
    for seq in 1..=3 {
        write_seq(&client, seq).await;
    }
    // Transient failures would be retried every 30 s (source.retry_failed_after) and dead-lettered
    // only after 5 attempts: minutes. Permanent ones are dead-lettered at once.
    let took = time_to_publish_all(&client, &relay, Duration::from_secs(25)).await;
    let dead: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE dead_lettered_at IS NOT NULL", &[])
        .await
        .expect("count dead-lettered")
        .get(0);
    let letters = consume(&bootstrap, &["outbox.dead-letter"], dead as usize, Duration::from_secs(20));
    println!(
        "mock: 1 x CLUSTER_AUTHORIZATION_FAILED, dead_letter | all settled in {:.2}s | dead-lettered {dead}",
        took.as_secs_f64()
    );
    assert!(dead > 0, "the refused events were dead-lettered\n{}", relay.log());
    for letter in &letters {
        let value: serde_json::Value = serde_json::from_slice(&letter.value).expect("dead letter is JSON");
        assert!(value["error"].as_str().unwrap_or_default().to_lowercase().contains("authoriz"), "{value}");
    }
}
