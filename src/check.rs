//! `outbox-relay check`: every prerequisite, one line each, with the fix.
//!
//! Exit 0 only when nothing failed (warnings do not fail).

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::producer::Producer;
use serde::Serialize;

use crate::config::Config;
use crate::envelope::TopicTemplate;
use crate::postgres;
use crate::sink::kafka::KafkaSink;
use crate::sink::pubsub::PubSubSink;
use crate::sink::AnySink;
use crate::coordination::ClaimScope;
use crate::outbox::OutboxTable;
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
            results.extend(check_outbox(config, &connection, &mut pending_topics).await);
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
            Err(e) => results.push(fail("kafka", e.to_string(), "check sink.kafka.brokers, TLS/SASL properties and network access")),
            Ok(()) => {
                results.push(ok("kafka", format!("brokers {} answer", config.sink.kafka.brokers)));
                results.push(check_topics(sink, &pending_topics).await);
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
                results.push(check_pubsub_topics(sink, &pending_topics).await);
            }
        },
    }
    results
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
        ok("topics", format!("missing topic(s) {} will be created (sink.pubsub.create_topics = true)", missing.join(", ")))
    }
}

/// The lease tables every relay needs, even alone (see `crate::coordination`).
async fn check_leases(connection: &postgres::Connection) -> CheckResult {
    let sql = "SELECT to_regclass('outbox.relay_leases') IS NOT NULL AND to_regclass('outbox.relay_members') IS NOT NULL, \
               coalesce(has_table_privilege(to_regclass('outbox.relay_leases'), 'SELECT, INSERT, UPDATE'), false) \
               AND coalesce(has_table_privilege(to_regclass('outbox.relay_members'), 'SELECT, INSERT, UPDATE, DELETE'), false)";
    match connection.client.query_one(sql, &[]).await {
        Ok(row) => match (row.try_get::<_, bool>(0), row.try_get::<_, bool>(1)) {
            (Ok(true), Ok(true)) => ok("lease tables", "outbox.relay_leases and outbox.relay_members are writable"),
            (Ok(false), _) => fail(
                "lease tables",
                "outbox.relay_leases or outbox.relay_members does not exist",
                "run `outbox-relay migrate` (several relays coordinate through these tables; one relay needs them too)",
            ),
            _ => fail(
                "lease tables",
                "the relay role may not write outbox.relay_leases / outbox.relay_members",
                "re-run the role script in sql/roles (it grants SELECT, INSERT, UPDATE, DELETE on them)",
            ),
        },
        Err(e) => fail("lease tables", postgres::describe(&e), "run `outbox-relay migrate`"),
    }
}

async fn check_outbox(config: &Config, connection: &postgres::Connection, topics: &mut BTreeSet<String>) -> Vec<CheckResult> {
    let mut results = Vec::new();
    let Ok(outbox) = OutboxTable::from_config(config) else { return results };
    let table = outbox.name();
    let client = &connection.client;
    // Preparing the relay's own statements proves the table and columns exist.
    let probe = postgres::connect(&config.postgres, "outbox-relay check").await;
    match probe {
        Ok(probe) => match PollSource::prepare(
            probe,
            &config.source,
            &outbox,
            &ClaimScope { resource: config.source.table.clone(), lanes: config.replicas.lanes as i32, instance: uuid::Uuid::nil(), by_lane: true },
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
            let missing: Vec<&str> =
                names.iter().enumerate().filter(|(i, _)| !row.try_get::<_, bool>(*i).unwrap_or(false)).map(|(_, n)| *n).collect();
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
    let trigger = client
        .query_one(
            "SELECT count(*) FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = $1::text::regclass AND NOT t.tgisinternal AND p.prosrc ILIKE '%pg_notify%'",
            &[&quoted],
        )
        .await;
    match trigger.map(|r| r.try_get::<_, i64>(0).unwrap_or(0)) {
        Ok(n) if n > 0 => results.push(ok("notify trigger", "present: events wake the relay at commit")),
        _ => results.push(warn(
            "notify trigger",
            "no NOTIFY trigger on the outbox table",
            format!(
                "latency is bounded by source.poll_interval; add a statement trigger that calls pg_notify('{}', '')",
                config.source.notify_channel
            ),
        )),
    }
    if let Ok(template) = TopicTemplate::parse(&config.sink.topic) {
        if let Ok(rows) = client.query(&outbox.pending_topics_sql(), &[]).await {
            for row in rows.iter().take(200) {
                let explicit: Option<String> = row.try_get(2).unwrap_or(None);
                let rendered = explicit.unwrap_or_else(|| {
                    template.render(&row.try_get::<_, String>(0).unwrap_or_default(), &row.try_get::<_, String>(1).unwrap_or_default())
                });
                topics.insert(rendered);
            }
        }
    }
    results
}

async fn check_replication(config: &Config, connection: &postgres::Connection) -> Vec<CheckResult> {
    use crate::source::replication::{slot_state, validate, SlotState};
    let mut results = Vec::new();
    match validate(&connection.client, config).await {
        Ok(Ok(())) => results.push(ok("replication", "wal_level = logical, REPLICATION granted, publication covers the table")),
        Ok(Err(missing)) => results.push(fail("replication", missing.0, "see the message")),
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
    let metadata =
        tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, Duration::from_secs(5)).map_err(|e| e.to_string())).await;
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
            format!("pending events go to missing topic(s): {}", missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
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
