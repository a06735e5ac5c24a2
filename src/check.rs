//! `outbox-relay check`: every prerequisite, one line each, with the fix.
//!
//! Exit 0 only when nothing failed (warnings do not fail).

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::producer::Producer;
use serde::Serialize;

use crate::config::{Config, EnvelopeFormat};
use crate::coordination::ClaimScope;
use crate::envelope::debezium::Debezium;
use crate::envelope::TopicTemplate;
use crate::outbox::OutboxTable;
use crate::postgres;
use crate::sink::kafka::KafkaSink;
use crate::sink::pubsub::PubSubSink;
use crate::sink::AnySink;
use crate::source::poll::PollSource;

/// Outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Works, but worth knowing.
    Warn,
    /// The relay cannot work like this.
    Fail,
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// What was checked.
    pub name: &'static str,
    /// Ok, warn or fail.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> CheckResult {
    CheckResult { name, verdict: Verdict::Ok, detail: detail.into(), fix: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    CheckResult { name, verdict: Verdict::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> CheckResult {
    CheckResult { name, verdict: Verdict::Warn, detail: detail.into(), fix: Some(fix.into()) }
}

/// Runs every check against the configured database and broker; `sink` is
/// `Err(why)` when it could not even be created.
pub async fn run(config: &Config, sink: Result<&AnySink, String>) -> Vec<CheckResult> {
    let mut results = vec![ok("configuration", "valid")];
    let target = postgres::redacted_target(&config.postgres.url);
    let mut pending_topics = BTreeSet::new();
    // Topics are those pending events go to: unknown until the outbox was read.
    let mut outbox_read = false;
    match postgres::connect(&config.postgres, "outbox-relay check").await {
        Err(e) => results.push(fail(
            "postgres",
            e.to_string(),
            "check postgres.url (host, port, database, user), the password, and network access",
        )),
        Ok(connection) => {
            let version = connection
                .client
                .query_one("SHOW server_version", &[])
                .await
                .ok()
                .and_then(|r| r.try_get::<_, String>(0).ok())
                .unwrap_or_default();
            results.push(ok("postgres", format!("connected to {target} (PostgreSQL {version})")));
            results.push(check_leases(&connection).await);
            let outbox = check_outbox(config, &connection, &mut pending_topics).await;
            outbox_read = outbox.iter().any(|r| r.name == "outbox table" && r.verdict == Verdict::Ok);
            results.extend(outbox);
            if config.source.mode == crate::config::SourceMode::Replication {
                results.extend(check_replication(config, &connection).await);
            }
            drop(connection);
        }
    }
    match (sink, config.sink.kind) {
        (Err(why), crate::config::SinkKind::Kafka) => results.push(fail("kafka", why, "check sink.kafka.properties")),
        (Err(why), crate::config::SinkKind::PubSub) => {
            results.push(fail("pubsub", why, "check sink.pubsub.credentials_file / GOOGLE_APPLICATION_CREDENTIALS"))
        }
        (Ok(AnySink::Kafka(sink)), _) => match sink.check_reachable(Duration::from_secs(5)).await {
            Err(e) => results.push(fail(
                "kafka",
                e.to_string(),
                "check sink.kafka.brokers, TLS/SASL properties and network access",
            )),
            Ok(()) => {
                results.push(ok("kafka", format!("brokers {} answer", config.sink.kafka.brokers)));
                results.push(if outbox_read { check_topics(sink, &pending_topics).await } else { topics_unknown() });
            }
        },
        (Ok(AnySink::PubSub(sink)), _) => match sink.check_reachable(Duration::from_secs(5)).await {
            Err(e) => results.push(fail(
                "pubsub",
                e,
                "check sink.pubsub.endpoint (or PUBSUB_EMULATOR_HOST), credentials and network access",
            )),
            Ok(()) => {
                results.push(ok("pubsub", format!("{} answers for project {}", sink.endpoint(), sink.project())));
                results.push(if outbox_read {
                    check_pubsub_topics(sink, &pending_topics).await
                } else {
                    topics_unknown()
                });
            }
        },
    }
    results
}

/// Topics could not be checked because the outbox could not be read.
fn topics_unknown() -> CheckResult {
    warn(
        "topics",
        "not checked: the outbox could not be read",
        "fix the postgres / outbox table checks above, then run check again",
    )
}

/// Pub/Sub: every topic pending events go to has a valid name and exists
/// (or will be created).
async fn check_pubsub_topics(sink: &PubSubSink, topics: &BTreeSet<String>) -> CheckResult {
    use crate::sink::pubsub::client::ApiError;
    if topics.is_empty() {
        return ok("topics", "no unpublished events to check topics for");
    }
    let (mut invalid, mut missing, mut unreadable) = (Vec::new(), Vec::new(), Vec::new());
    for topic in topics {
        if let Err(why) = crate::sink::pubsub::topic::check_topic_name(topic) {
            invalid.push(why);
            continue;
        }
        match sink.check_topic(topic, Duration::from_secs(5)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => missing.push(topic.as_str()),
            Err(e @ ApiError::Status { code: 403, .. }) => unreadable.push(format!("{topic} ({e})")),
            Err(e) => return fail("topics", sink.explain(&e, topic), "check the Pub/Sub endpoint and credentials"),
        }
    }
    if !invalid.is_empty() {
        return fail("topics", invalid.join("; "), "fix the rows' topic column or sink.topic");
    }
    if !missing.is_empty() && !sink.creates_topics() {
        return fail(
            "topics",
            format!("pending events go to missing Pub/Sub topic(s): {}", missing.join(", ")),
            format!(
                "create them (gcloud pubsub topics create {} --project {}), or set sink.pubsub.create_topics = true",
                missing.join(" "),
                sink.project()
            ),
        );
    }
    if !unreadable.is_empty() {
        return warn(
            "topics",
            format!("cannot read topic(s) {}", unreadable.join(", ")),
            "publishing needs only roles/pubsub.publisher; grant roles/pubsub.viewer too if you want `check` to verify topics",
        );
    }
    if missing.is_empty() {
        ok("topics", format!("{} Pub/Sub topic(s) pending events go to exist", topics.len()))
    } else {
        ok(
            "topics",
            format!("missing topic(s) {} will be created (sink.pubsub.create_topics = true)", missing.join(", ")),
        )
    }
}

/// The lease tables every relay needs, even alone (see `crate::coordination`).
/// Each privilege is checked on its own: `has_table_privilege(t, 'SELECT, INSERT')`
/// is true when ANY of the listed privileges is held.
async fn check_leases(connection: &postgres::Connection) -> CheckResult {
    const NEEDED: [(&str, &[&str]); 2] = [
        ("outbox.relay_leases", &["SELECT", "INSERT", "UPDATE"]),
        ("outbox.relay_members", &["SELECT", "INSERT", "UPDATE", "DELETE"]),
    ];
    let exists =
        "SELECT to_regclass('outbox.relay_leases') IS NOT NULL AND to_regclass('outbox.relay_members') IS NOT NULL";
    match connection.client.query_one(exists, &[]).await.map(|row| row.try_get::<_, bool>(0)) {
        Ok(Ok(true)) => {}
        Ok(_) => {
            return fail(
                "lease tables",
                "outbox.relay_leases or outbox.relay_members does not exist",
                "run `outbox-relay migrate` (several relays coordinate through these tables; one relay needs them too)",
            )
        }
        Err(e) => return fail("lease tables", postgres::describe(&e), "run `outbox-relay migrate`"),
    }
    let mut missing = Vec::new();
    for (table, privileges) in NEEDED {
        for privilege in privileges {
            let held = connection
                .client
                .query_one("SELECT has_table_privilege($1::text::regclass, $2)", &[&table, privilege])
                .await
                .map_err(|e| postgres::describe(&e));
            match held.map(|row| row.try_get::<_, bool>(0).unwrap_or(false)) {
                Ok(true) => {}
                Ok(false) => missing.push(format!("{privilege} on {table}")),
                Err(e) => return fail("lease tables", e, "check the role can read the catalog"),
            }
        }
    }
    if missing.is_empty() {
        ok("lease tables", "outbox.relay_leases and outbox.relay_members are writable")
    } else {
        fail(
            "lease tables",
            format!("the relay's role lacks {}", missing.join(", ")),
            format!(
                "grant them (e.g. GRANT {} TO <relay role>), or re-run the role script in sql/roles, which grants SELECT, INSERT, UPDATE, DELETE on both",
                missing.first().map(String::as_str).unwrap_or_default()
            ),
        )
    }
}

async fn check_outbox(
    config: &Config,
    connection: &postgres::Connection,
    topics: &mut BTreeSet<String>,
) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let Ok(outbox) = OutboxTable::from_config(config) else { return results };
    let table = outbox.name();
    let client = &connection.client;
    let polling = config.source.mode == crate::config::SourceMode::Poll;
    let position_problem = crate::outbox::position_column_problem(client, &outbox).await.ok().flatten();
    if let (Some(problem), true) = (&position_problem, polling) {
        results.push(fail(
            "outbox table",
            problem.clone(),
            "give polling an integer position column (the message says how), or use source.mode = \"replication\"",
        ));
        return results;
    }
    // Preparing the relay's own statements proves the table and columns exist.
    // Replication orders events by the WAL and needs no integer position.
    let probe = postgres::connect(&config.postgres, "outbox-relay check").await;
    match probe {
        Ok(_) if position_problem.is_some() => results.push(ok(
            "outbox table",
            format!("{} is read from the WAL; replication needs no integer position column", config.source.table),
        )),
        Ok(probe) => match PollSource::prepare(
            probe,
            &config.source,
            &outbox,
            &ClaimScope {
                resource: config.source.table.clone(),
                lanes: config.replicas.lanes as i32,
                instance: uuid::Uuid::nil(),
                by_lane: true,
            },
        )
        .await
        {
            Ok(_) => results.push(ok("outbox table", format!("{} has the mapped columns", config.source.table))),
            Err(e) => {
                results.push(fail(
                    "outbox table",
                    e.to_string(),
                    "run `outbox-relay migrate`, or set source.table and source.columns to match your table",
                ));
                return results;
            }
        },
        Err(e) => results.push(fail("outbox table", e.to_string(), "see the postgres check")),
    }
    if polling {
        if let Ok(Some(problem)) = crate::outbox::deleted_by_others_problem(client, &outbox, None).await {
            results.push(warn(
                "deleted rows",
                problem,
                "see the message: polling cannot see rows deleted by their own transaction",
            ));
        }
    }
    let quoted = table.to_string();
    let privileges = client
        .query_one(
            "SELECT has_table_privilege($1, 'SELECT'), has_table_privilege($1, 'UPDATE'), has_table_privilege($1, 'DELETE')",
            &[&quoted],
        )
        .await;
    match privileges {
        Ok(row) => {
            let names = ["SELECT", "UPDATE", "DELETE"];
            let missing: Vec<&str> = names
                .iter()
                .enumerate()
                .filter(|(i, _)| !row.try_get::<_, bool>(*i).unwrap_or(false))
                .map(|(_, n)| *n)
                .collect();
            if missing.is_empty() {
                results.push(ok("privileges", "SELECT, UPDATE, DELETE granted"));
            } else {
                results.push(fail(
                    "privileges",
                    format!("missing {} on {}", missing.join(", "), config.source.table),
                    format!("GRANT {} ON {} TO <relay role>; (see sql/roles/polling.sql)", missing.join(", "), quoted),
                ));
            }
        }
        Err(e) => results.push(fail("privileges", postgres::describe(&e), "check the role can read the catalog")),
    }
    if config.source.mode == crate::config::SourceMode::Poll {
        results.push(check_notify_trigger(config, client, &quoted).await);
    }
    if config.published.mode != crate::config::PublishedMode::None {
        results.push(check_position_index(config, client, &quoted).await);
    }
    // The topics pending events go to, as the configured envelope routes them.
    let debezium = (config.envelope.format == EnvelopeFormat::Debezium)
        .then(|| Debezium::from_config(&config.envelope.debezium, &config.source.columns).ok())
        .flatten();
    let route_by = debezium.as_ref().map(|d| d.route_column(&config.source.columns));
    if let Ok(template) = TopicTemplate::parse(&config.sink.topic) {
        if let Ok(rows) = client.query(&outbox.pending_topics_sql(route_by), &[]).await {
            for row in rows.iter().take(200) {
                let text = |i: usize| row.try_get::<_, Option<String>>(i).unwrap_or(None);
                let rendered = match (text(2), &debezium) {
                    (Some(explicit), _) => Some(explicit),
                    // A NULL routing value fails the event itself (reported as a failing row), not a topic.
                    (None, Some(debezium)) => text(3).map(|routed| debezium.topic_for(&routed)),
                    (None, None) => Some(template.render(&text(0).unwrap_or_default(), &text(1).unwrap_or_default())),
                };
                topics.extend(rendered);
            }
        }
    }
    results
}

/// Polling only: a NOTIFY trigger wakes the relay at commit (replication needs none).
async fn check_notify_trigger(config: &Config, client: &tokio_postgres::Client, quoted: &str) -> CheckResult {
    let trigger = client
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = $1::text::regclass AND NOT t.tgisinternal AND p.prosrc ILIKE '%pg_notify%'",
            &[&quoted],
        )
        .await;
    match trigger.map(|r| r.try_get::<_, i64>(0).unwrap_or(0)) {
        Ok(n) if n > 0 => ok("notify trigger", "present: events wake the relay at commit"),
        _ => warn(
            "notify trigger",
            "no NOTIFY trigger on the outbox table",
            format!(
                "latency is bounded by source.poll_interval; add a statement trigger that calls pg_notify('{}', '')",
                config.source.notify_channel
            ),
        ),
    }
}

/// Claims, marks and deletes go by the position column: without an index that
/// starts with it, every batch scans the table (measured: 14k instead of 80k events/s).
async fn check_position_index(config: &Config, client: &tokio_postgres::Client, quoted: &str) -> CheckResult {
    let position = &config.source.columns.position;
    let indexed = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
             WHERE i.indrelid = $1::text::regclass AND a.attname = $2)",
            &[&quoted, position],
        )
        .await;
    match indexed.map(|r| r.try_get::<_, bool>(0).unwrap_or(false)) {
        Ok(true) => ok("position index", format!("an index starts with {position}")),
        Ok(false) => warn(
            "position index",
            format!(
                "no index on {quoted} starts with the position column {position}: every claim and mark scans the table"
            ),
            format!("CREATE INDEX CONCURRENTLY ON {quoted} ({position}); (a primary key on it also works)"),
        ),
        Err(e) => warn("position index", postgres::describe(&e), "check the role can read pg_index"),
    }
}

async fn check_replication(config: &Config, connection: &postgres::Connection) -> Vec<CheckResult> {
    use crate::source::replication::{slot_state, validate, SlotState};
    let mut results = Vec::new();
    match validate(&connection.client, config).await {
        Ok(Ok(())) => {
            results.push(ok("replication", "wal_level = logical, REPLICATION granted, publication covers the table"))
        }
        Ok(Err(missing)) => {
            // Prerequisite messages read "<what is wrong>: run <the fix>".
            let (detail, fix) = match missing.0.split_once(": run ") {
                Some((detail, fix)) => (detail.to_owned(), format!("run {fix}")),
                None => (
                    missing.0.clone(),
                    "see sql/roles/replication.sql and docs on replication prerequisites".to_owned(),
                ),
            };
            results.push(fail("replication", detail, fix))
        }
        Err(e) => results.push(fail("replication", e.to_string(), "check the role can read the catalog")),
    }
    let slot = &config.source.replication.slot;
    match slot_state(&connection.client, slot).await {
        Ok(SlotState::Ready { active_pid: None }) => results.push(ok("slot", format!("{slot} exists and is free"))),
        Ok(SlotState::Ready { active_pid: Some(pid) }) => {
            results.push(ok("slot", format!("{slot} exists; streamed by backend pid {pid} (a running relay)")))
        }
        Ok(SlotState::Missing) => results.push(warn(
            "slot",
            format!("{slot} does not exist"),
            "run `outbox-relay migrate`; in mark/delete mode the relay also creates it and drains by polling",
        )),
        Ok(SlotState::Lost) => results.push(fail(
            "slot",
            format!("{slot} was invalidated (max_slot_wal_keep_size)"),
            "in mark/delete mode the relay recreates it and drains by polling; in none mode recreate it and replay the gap",
        )),
        Err(e) => results.push(fail("slot", e.to_string(), "check the role can read pg_replication_slots")),
    }
    results
}

async fn check_topics(sink: &KafkaSink, topics: &BTreeSet<String>) -> CheckResult {
    if topics.is_empty() {
        return ok("topics", "no unpublished events to check topics for");
    }
    let producer = sink.producer();
    let metadata = tokio::task::spawn_blocking(move || {
        producer.client().fetch_metadata(None, Duration::from_secs(5)).map_err(|e| e.to_string())
    })
    .await;
    let existing: BTreeSet<String> = match metadata {
        Ok(Ok(m)) => m.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name().to_owned()).collect(),
        Ok(Err(e)) => return fail("topics", e, "check the broker"),
        Err(e) => return fail("topics", e.to_string(), "check the broker"),
    };
    let missing: Vec<&String> = topics.iter().filter(|t| !existing.contains(*t)).collect();
    if missing.is_empty() {
        ok("topics", format!("{} topic(s) pending events go to exist", topics.len()))
    } else {
        fail(
            "topics",
            format!(
                "pending events go to missing topic(s): {}",
                missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
            "create them (kafka-topics --create ...), or rely on the broker's auto.create.topics.enable",
        )
    }
}

/// Prints the report; returns whether everything passed.
pub fn print(results: &[CheckResult]) -> bool {
    for r in results {
        let tag = match r.verdict {
            Verdict::Ok => " ok ",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        };
        println!("[{tag}] {:<16} {}", r.name, r.detail);
        if let Some(fix) = &r.fix {
            println!("       {:<16} fix: {fix}", "");
        }
    }
    results.iter().all(|r| r.verdict != Verdict::Fail)
}
