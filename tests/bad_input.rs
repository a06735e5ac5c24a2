//! Bad configuration, unreachable dependencies and malformed rows each get
//! one clear message, and nothing is lost.

mod common;

use std::process::Command;
use std::time::Duration;

use common::relay::{connect, migrate, relay_env, RelayProcess};
use common::{consume, TestBroker, ThrowawayPostgres};

fn run_with(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    // Never the default 127.0.0.1:9187: a relay someone runs by hand may hold it.
    command.args(args).env_remove("RUST_LOG").env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("run outbox-relay");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn missing_postgres_url_exits_2_naming_key_and_env_var() {
    let (code, stderr) = run_with(&["run"], &[("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9")]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("postgres.url") && stderr.contains("OUTBOX_RELAY_POSTGRES__URL"), "{stderr}");
}

#[test]
fn unknown_key_and_bad_values_in_the_file_exit_2_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let cases = [
        ("[postgres]\nurl = \"postgres://a@127.0.0.1/b\"\n[sink.kafka]\nbrokers = \"x:1\"\nbatch_size = 5\n", "batch_size"),
        ("[postgres]\nurl = \"postgres://a@127.0.0.1/b\"\n[sink]\ntopic = \"events.{aggregate}\"\n[sink.kafka]\nbrokers = \"x:1\"\n", "sink.topic"),
        ("[postgres]\nurl = \"postgres://a@127.0.0.1/b\"\n[source]\nmode = \"tail\"\n[sink.kafka]\nbrokers = \"x:1\"\n", "mode"),
        ("[postgres]\nurl = \"postgres://a@127.0.0.1/b\"\n[source]\npoll_interval = \"soon\"\n[sink.kafka]\nbrokers = \"x:1\"\n", "poll_interval"),
        ("[postgres]\nurl = \"postgres://a@127.0.0.1/b\"\n[sink.kafka]\nbrokers = \"x:1\"\n[sink.kafka.properties]\n\"no.such.setting\" = \"1\"\n", "sink.kafka.properties"),
    ];
    for (toml, needle) in cases {
        std::fs::write(&path, toml).unwrap();
        let (code, stderr) = run_with(&["--config", path.to_str().unwrap(), "run"], &[]);
        assert_eq!(code, 2, "{toml}: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
    }
    let (code, stderr) = run_with(&["--config", "/nonexistent/relay.toml", "run"], &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/relay.toml"), "{stderr}");
}

const VALID: &str = "[postgres]\nurl = \"postgres://a@127.0.0.1:9/b\"\n[sink.kafka]\nbrokers = \"127.0.0.1:9\"\n";

#[test]
fn configuration_errors_exit_2_before_anything_is_bound() {
    // GIVEN the configured HTTP port is already taken
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = busy.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    // (configuration file, environment, what the error must name)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 5] = [
        ("[sink.kafka.properties]\n\"no.such.setting\" = \"1\"\n", &[], "no.such.setting"),
        ("[source]\nretry_failed_after = \"0s\"\n", &[], "source.retry_failed_after"),
        ("[log]\nlevel = \"verbose\"\n", &[], "log.level"),
        (
            "[failures]\npolicy = \"dead_letter\"\ndead_letter_topic = \"bad topic!\"\n",
            &[],
            "failures.dead_letter_topic",
        ),
        ("", &[("OUTBOX_RELAY_SOURCE__POLL_INTERVAL", "5")], "\"5s\""),
    ];
    for (extra, env, needle) in cases {
        std::fs::write(&path, format!("{VALID}{extra}")).unwrap();
        let mut env = env.to_vec();
        env.push(("OUTBOX_RELAY_HTTP__LISTEN", &listen));
        // WHEN the relay starts with a bad setting
        let (code, stderr) = run_with(&["--config", path.to_str().unwrap(), "run"], &env);
        // THEN it exits 2 naming the setting, whatever holds the port
        assert_eq!(code, 2, "{extra}: {stderr}");
        assert!(stderr.contains(needle), "expected {needle:?} in: {stderr}");
        assert!(!stderr.contains("http.listen"), "{stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("error:") || l.contains("ERROR")).count(),
            1,
            "printed once: {stderr}"
        );
    }
}

#[test]
fn configuration_errors_never_print_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    let cases = [
        // A TOML syntax error (unterminated string) on the line holding the password.
        "[postgres]\nurl = \"postgres://relay:TopSecretPw1@127.0.0.1/app\n[sink.kafka]\nbrokers = \"x:1\"\n".to_owned(),
        // A wrong type on a secret key.
        format!("{VALID}[sink.kafka.properties]\n\"sasl.password\" = 987654321\n"),
    ];
    for toml in cases {
        std::fs::write(&path, &toml).unwrap();
        let (code, stderr) = run_with(&["--config", path.to_str().unwrap(), "check"], &[]);
        assert_eq!(code, 2, "{stderr}");
        assert!(!stderr.contains("TopSecretPw1") && !stderr.contains("987654321"), "a secret leaked: {stderr}");
    }
}

#[test]
fn a_command_error_is_printed_once() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("postgres://relay@127.0.0.1:{closed}/app");
    let (code, stderr) = run_with(
        &["status"],
        &[("OUTBOX_RELAY_POSTGRES__URL", &url), ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9")],
    );
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.matches("cannot connect to Postgres").count(), 1, "{stderr}");
}

#[test]
fn unreachable_postgres_and_broker_are_retried_with_clear_logs_never_a_panic() {
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let env = vec![
        ("OUTBOX_RELAY_POSTGRES__URL", format!("postgres://relay@127.0.0.1:{closed}/app")),
        ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", format!("127.0.0.1:{closed}")),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let mut relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("Kafka is not reachable yet", Duration::from_secs(20)), "{}", relay.log());
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "{}", relay.log());
    assert!(!relay.log().contains("panicked"));

    let broker = TestBroker::start();
    let env = vec![
        ("OUTBOX_RELAY_POSTGRES__URL", format!("postgres://relay@127.0.0.1:{closed}/app")),
        ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", broker.bootstrap()),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
    ];
    let mut relay = RelayProcess::start(&["run"], &env);
    assert!(relay.wait_for_log("cannot connect to Postgres", Duration::from_secs(20)), "{}", relay.log());
    assert!(relay.wait_for_log("reconnecting", Duration::from_secs(5)), "{}", relay.log());
    relay.signal(libc::SIGTERM);
    assert_eq!(relay.wait_exit(Duration::from_secs(10)).and_then(|s| s.code()), Some(0), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_schema_says_to_run_migrate() {
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    let relay = RelayProcess::start(&["run"], &relay_env(&pg.url(), &broker.bootstrap()));
    assert!(relay.wait_for_log("outbox-relay migrate", Duration::from_secs(20)), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn row_with_invalid_topic_is_recorded_and_rows_behind_it_flow() {
    // GIVEN a row whose topic override cannot exist, between valid rows
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    broker.create_topic("outbox.Order", 2);
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "SELECT outbox.enqueue('Order', 'a', 'Placed', '{\"seq\":1}');
             SELECT outbox.enqueue('Order', 'b', 'Placed', '{\"seq\":1}', topic => 'not a topic!');
             SELECT outbox.enqueue('Order', 'c', 'Placed', '{\"seq\":1}');",
        )
        .await
        .unwrap();

    // WHEN the relay runs
    let relay = RelayProcess::start(&["run"], &relay_env(&pg.url(), &broker.bootstrap()));

    // THEN the valid rows are delivered and marked, the bad one keeps its error
    let consumed = consume(&broker.bootstrap(), &["outbox.Order"], 2, Duration::from_secs(30));
    assert_eq!(consumed.len(), 2);
    assert!(relay.wait_for_log("not a valid Kafka topic name", Duration::from_secs(10)), "{}", relay.log());
    let mut row = None;
    for _ in 0..50 {
        let r = client
            .query_one(
                "SELECT published_at IS NULL, attempts, last_error FROM outbox.events WHERE aggregate_id = 'b'",
                &[],
            )
            .await
            .unwrap();
        if r.get::<_, i32>(1) >= 1 {
            row = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let row = row.expect("failure recorded on the row");
    assert!(row.get::<_, bool>(0), "never marked published");
    assert!(row.get::<_, String>(2).contains("\"not a topic!\""));
    let marked: i64 = client
        .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(marked, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn debezium_style_table_works_through_column_mapping_and_reports_bad_rows() {
    // GIVEN a Debezium-style outbox with a text payload, including malformed rows
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    broker.create_topic("outbox.event.Order", 2);
    // `migrate` installs the lease tables relays coordinate through (and an unused outbox.events).
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    client
        .batch_execute(
            "CREATE TABLE public.outbox (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                aggregatetype varchar(255) NOT NULL,
                aggregateid varchar(255),
                type varchar(255) NOT NULL,
                payload text);
             INSERT INTO public.outbox (aggregatetype, aggregateid, type, payload) VALUES
                ('Order', '1', 'OrderCreated', '{\"seq\":1}'),
                ('Order', '2', 'OrderCreated', '{not json'),
                ('Order', NULL, 'OrderCreated', '{\"seq\":1}'),
                ('Order', '1', 'OrderShipped', '{\"seq\":2}');",
        )
        .await
        .unwrap();
    let mut env = relay_env(&pg.url(), &broker.bootstrap());
    for (key, value) in [
        ("OUTBOX_RELAY_SOURCE__TABLE", "public.outbox"),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__AGGREGATE_TYPE", "aggregatetype"),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__AGGREGATE_ID", "aggregateid"),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__EVENT_TYPE", "type"),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__EVENT_ID", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__EVENT_VERSION", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__HEADERS", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__ACTOR", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__TRACEPARENT", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__TOPIC", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__CREATED_AT", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__PUBLISHED_AT", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__ATTEMPTS", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__LAST_ERROR", ""),
        ("OUTBOX_RELAY_SOURCE__COLUMNS__FAILED_AT", ""),
        ("OUTBOX_RELAY_PUBLISHED__MODE", "delete"),
        ("OUTBOX_RELAY_SINK__TOPIC", "outbox.event.{aggregate_type}"),
    ] {
        env.push((key, value.to_owned()));
    }

    // WHEN the relay runs over it
    let relay = RelayProcess::start(&["run"], &env);

    // THEN valid rows are delivered in order and deleted; bad rows stay, reported by id
    let consumed = consume(&broker.bootstrap(), &["outbox.event.Order"], 2, Duration::from_secs(30));
    let types: Vec<String> = consumed
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["event_type"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(types, ["OrderCreated", "OrderShipped"]);
    assert!(relay.wait_for_log("payload is not valid JSON", Duration::from_secs(10)), "{}", relay.log());
    assert!(relay.wait_for_log("aggregate_id is NULL", Duration::from_secs(10)), "{}", relay.log());
    let log = relay.log();
    assert!(log.contains("position=2") && log.contains("position=3"), "{log}");
    let left: Vec<i64> =
        client.query("SELECT id FROM public.outbox ORDER BY id", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, [2, 3], "bad rows are kept, good rows deleted");
}
