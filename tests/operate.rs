//! Operating the relay: metrics move correctly, readiness follows the
//! broker and Postgres, `check` names each broken prerequisite, `status`
//! answers, `replay` re-publishes exactly the selection.

mod common;

use std::time::Duration;

use common::relay::{
    cli, connect, http_get, metric_sum, migrate, relay_env, wait_all_published, wait_until, write_events, RelayProcess,
};
use common::{consume, StopMode, TestBroker, ThrowawayPostgres};

const TOPIC: &str = "outbox.Order";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_each_event_once_and_backlog_drains_to_zero() {
    // GIVEN a backlog of 2,000 events and a relay
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 4);
    migrate(&pg.url());
    write_events(&pg.url(), 20, 100, 2, Duration::ZERO).await;
    let relay = RelayProcess::start(&["run"], &relay_env(&pg.url(), &broker.bootstrap()));
    let address = relay.http_address(Duration::from_secs(20));

    // WHEN it has published everything
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    // THEN the counters say 2,000 once, latency was observed for each, and the backlog gauge reaches zero
    let scrape = || http_get(&address, "/metrics").1;
    assert!(
        wait_until(Duration::from_secs(20), || metric_sum(&scrape(), "outbox_relay_events_published_total") == 2000.0),
        "{}",
        scrape()
    );
    let text = scrape();
    assert_eq!(metric_sum(&text, "outbox_relay_end_to_end_latency_seconds_count"), 2000.0);
    assert!(metric_sum(&text, "outbox_relay_batches_total") >= 2.0);
    assert_eq!(metric_sum(&text, "outbox_relay_leader"), 1.0);
    assert_eq!(metric_sum(&text, "outbox_relay_events_in_flight"), 0.0);
    assert!(metric_sum(&text, "outbox_relay_last_publish_timestamp_seconds") > 1.7e9);
    assert!(
        text.contains("outbox_relay_events_published_total{event_type=\"OrderUpdated\",topic=\"outbox.Order\"} 2000")
    );
    assert!(wait_until(Duration::from_secs(25), || {
        let t = scrape();
        t.contains("outbox_relay_backlog_events 0") && t.contains("outbox_relay_oldest_unpublished_age_seconds 0")
    }));
    let (code, body) = http_get(&address, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"role\":\"leader\""), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_broker_and_postgres() {
    let mut pg = ThrowawayPostgres::start().unwrap();
    let mut broker = TestBroker::start();
    broker.create_topic(TOPIC, 2);
    migrate(&pg.url());
    let relay = RelayProcess::start(&["run"], &relay_env(&pg.url(), &broker.bootstrap()));
    let address = relay.http_address(Duration::from_secs(20));
    let ready = || http_get(&address, "/readyz").0 == 200;
    assert!(wait_until(Duration::from_secs(20), ready), "{}", relay.log());

    // Broker away: unready; back: ready.
    broker.stop();
    assert!(wait_until(Duration::from_secs(30), || !ready()), "{}", relay.log());
    let (code, body) = http_get(&address, "/readyz");
    assert_eq!(code, 503);
    assert!(body.contains("\"broker\":false"), "{body}");
    assert_eq!(http_get(&address, "/healthz").0, 200, "still alive while unready");
    broker.start_again();
    broker.create_topic(TOPIC, 2);
    assert!(wait_until(Duration::from_secs(30), ready), "{}", relay.log());

    // Postgres away: unready; back: ready.
    pg.stop(StopMode::Fast).unwrap();
    assert!(wait_until(Duration::from_secs(30), || !ready()), "{}", relay.log());
    assert!(http_get(&address, "/readyz").1.contains("\"postgres\":false"));
    pg.start_again().unwrap();
    assert!(wait_until(Duration::from_secs(60), ready), "{}", relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_each_broken_prerequisite_and_passes_when_all_is_well() {
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    let env = relay_env(&pg.url(), &broker.bootstrap());

    // No schema yet.
    let (code, out, _) = cli(&["check"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] outbox table") && out.contains("outbox-relay migrate"), "{out}");
    assert!(out.contains("[ ok ] postgres") && out.contains("[ ok ] kafka"), "{out}");

    // Schema, a pending event, but its topic is missing.
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    client.batch_execute("SELECT outbox.enqueue('Invoice', '1', 'InvoiceSent', '{}')").await.unwrap();
    let (code, out, _) = cli(&["check"], &env);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] topics") && out.contains("outbox.Invoice"), "{out}");

    // Everything in place.
    broker.create_topic("outbox.Invoice", 1);
    let (code, out, _) = cli(&["check"], &env);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("[ ok ] privileges") && out.contains("[ ok ] notify trigger"), "{out}");
    assert!(out.contains("[ ok ] position index") && out.contains("[ ok ] lease tables"), "{out}");

    // A role without privileges.
    client
        .batch_execute(
            "CREATE ROLE weak LOGIN; GRANT USAGE ON SCHEMA outbox TO weak; GRANT SELECT ON outbox.events TO weak;",
        )
        .await
        .unwrap();
    let mut weak = env.clone();
    weak[0].1 = pg.url_for("weak", "postgres");
    let (code, out, _) = cli(&["check"], &weak);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] privileges") && out.contains("missing UPDATE, DELETE"), "{out}");
    // Each lease-table privilege is checked on its own (SELECT alone used to pass).
    client.batch_execute("GRANT SELECT ON outbox.relay_leases, outbox.relay_members TO weak;").await.unwrap();
    let (_, out, _) = cli(&["check"], &weak);
    assert!(out.contains("[FAIL] lease tables") && out.contains("INSERT on outbox.relay_leases"), "{out}");

    // A mapped position column without an index is worth a warning.
    client
        .batch_execute("CREATE TABLE public.unindexed (LIKE outbox.events INCLUDING DEFAULTS); ALTER TABLE public.unindexed ALTER COLUMN id DROP IDENTITY IF EXISTS;")
        .await
        .unwrap();
    let mut unindexed = env.clone();
    unindexed.push(("OUTBOX_RELAY_SOURCE__TABLE", "public.unindexed".into()));
    let (_, out, _) = cli(&["check"], &unindexed);
    assert!(out.contains("[warn] position index") && out.contains("CREATE INDEX"), "{out}");

    // A database that does not exist: nothing about topics can be known.
    let mut nodb = env.clone();
    nodb[0].1 = pg.url_for("postgres", "no_such_db");
    let (code, out, _) = cli(&["check"], &nodb);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[FAIL] postgres") && !out.contains("[ ok ] topics"), "{out}");

    // Unreachable broker and Postgres.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut down = env.clone();
    down[0].1 = format!("postgres://postgres@127.0.0.1:{closed}/postgres");
    down[1].1 = format!("127.0.0.1:{closed}");
    let (code, out, _) = cli(&["check"], &down);
    assert_eq!(code, 1);
    assert!(out.contains("[FAIL] postgres") && out.contains("[FAIL] kafka"), "{out}");
    let (_, json, _) = cli(&["check", "--json"], &down);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed[1]["verdict"], "fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_replay_answer_the_three_am_questions() {
    // GIVEN 300 published events over 3 aggregates
    let pg = ThrowawayPostgres::start().unwrap();
    let broker = TestBroker::start();
    broker.create_topic(TOPIC, 3);
    migrate(&pg.url());
    let env = relay_env(&pg.url(), &broker.bootstrap());
    write_events(&pg.url(), 3, 100, 1, Duration::ZERO).await;
    let mut relay = RelayProcess::start(&["run"], &env);
    let client = connect(&pg.url()).await;
    wait_all_published(&client, Duration::from_secs(60)).await;

    // status: nothing waiting, 300 published in the last minute, and who publishes
    let (code, out, err) = cli(&["status", "--json"], &env);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["backlog"], 0);
    assert_eq!(status["published_last_minute"], 300);
    let relays = status["relays"].as_array().expect("relays");
    assert_eq!(relays.len(), 1, "{out}");
    assert_eq!(relays[0]["lanes"].as_array().map(Vec::len), Some(32), "a lone relay holds every lane: {out}");
    assert!(status["unheld_lanes"].as_array().is_some_and(Vec::is_empty), "{out}");
    let (_, text, _) = cli(&["status"], &env);
    assert!(text.contains("32 lanes 0-31"), "{text}");
    relay.kill();

    // replay: dry run counts, then re-publishes exactly aggregate order-1's events with seq 41..=60
    let rows = client
        .query(
            "SELECT min(id), max(id) FROM outbox.events WHERE aggregate_id = 'order-1' AND (payload->>'seq')::int BETWEEN 41 AND 60",
            &[],
        )
        .await
        .unwrap();
    let (from, to): (i64, i64) = (rows[0].get(0), rows[0].get(1));
    let (from, to) = (from.to_string(), to.to_string());
    let args = ["replay", "--aggregate-id", "order-1", "--from-id", &from, "--to-id", &to];
    let mut dry = args.to_vec();
    dry.push("--dry-run");
    let (code, out, err) = cli(&dry, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would re-publish 20 events"), "{out}");
    let (code, out, err) = cli(&args, &env);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("re-published 20 of 20"), "{out}");

    let consumed = consume(&broker.bootstrap(), &[TOPIC], 320, Duration::from_secs(30));
    assert_eq!(consumed.len(), 320);
    let replayed: Vec<i64> = consumed
        .iter()
        .filter(|m| m.key.as_deref() == Some(b"order-1"))
        .map(|m| serde_json::from_slice::<serde_json::Value>(&m.value).unwrap()["payload"]["seq"].as_i64().unwrap())
        .skip(100)
        .collect();
    assert_eq!(replayed, (41..=60).collect::<Vec<_>>());
}
