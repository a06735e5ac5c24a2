//! Logical replication capture: tail the outbox table's inserts (and
//! `pg_logical_emit_message` events) from a pgoutput slot.
//!
//! ```text
//!  walsender ──CopyData──▶ wire ──▶ pgoutput::Logical ──▶ EventDecoder ──▶ OutboxEvent
//!      ▲                                                                     │
//!      └──── standby status: confirmed flush LSN ◀── acked + marked ◀────────┘
//! ```
//!
//! # Progress tracking
//! pgoutput (protocol 1) sends a transaction only after it committed, row by
//! row; the relay publishes rows as they arrive and confirms a transaction's
//! end LSN only once every event in it (and in everything before it) was
//! acknowledged and, in mark/delete mode, marked. A crash re-sends at most
//! the unconfirmed tail. Reading stops while the in-flight window is full,
//! so a one-million-row transaction needs one window of memory, not a
//! million rows: the walsender waits on TCP flow control.
//!
//! # Error handling
//! Prerequisites (wal_level, REPLICATION, publication, slot) are checked
//! before streaming, each with one message naming the fix. A slot that was
//! dropped or invalidated is recreated in mark/delete mode, after which the
//! relay drains unpublished rows by polling before it streams again.

pub mod pgoutput;
pub mod wire;

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::config::{ColumnMapping, Config, PublishedMode, ReplicationConfig};
use crate::event::{OutboxEvent, RawRow, Rejected};
use crate::postgres::PostgresError;
use crate::source::table::{quote_ident, TableName};
use pgoutput::{Column, Value};

/// Prefix of the relay's own heartbeat messages (ignored when decoded).
pub(crate) const HEARTBEAT_PREFIX: &str = "outbox-relay-heartbeat";

/// A prerequisite is missing; the message says exactly how to fix it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Prerequisite(pub String);

/// The slot as Postgres reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Exists and usable; `active_pid` is set while another session streams it.
    Ready {
        /// The backend streaming the slot, if any.
        active_pid: Option<i32>,
    },
    /// Does not exist.
    Missing,
    /// Exists but its WAL is gone (`wal_status = lost`): unusable.
    Lost,
}

/// Checks wal_level, the REPLICATION attribute and the publication.
pub(crate) async fn validate(client: &Client, config: &Config) -> Result<Result<(), Prerequisite>, PostgresError> {
    let q = |e: tokio_postgres::Error| PostgresError::query("checking replication prerequisites", &e);
    let r = &config.source.replication;
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await.map_err(q)?.get(0);
    if wal_level != "logical" {
        return Ok(Err(Prerequisite(format!(
            "wal_level is '{wal_level}', logical replication needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres (or use source.mode = \"poll\")"
        ))));
    }
    let row = client
        .query_one(
            "SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(q)?;
    let (user, can_replicate): (String, bool) = (row.get(0), row.get(1));
    if !can_replicate {
        return Ok(Err(Prerequisite(format!(
            "role {user} lacks the REPLICATION attribute: run ALTER ROLE {user} REPLICATION; (see sql/roles/replication.sql)"
        ))));
    }
    let table = TableName::parse(&config.source.table).map_err(PostgresError::Query)?;
    // Resolved as polling resolves it: through the role's search_path when unqualified.
    let resolved = client
        .query_opt(
            "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1)",
            &[&table.to_string()],
        )
        .await
        .map_err(q)?;
    let Some(resolved) = resolved else {
        return Ok(Err(Prerequisite(format!(
            "the outbox table {} does not exist (an unqualified name is looked up through the relay role's search_path): \
             run outbox-relay migrate, or set source.table to schema.table",
            config.source.table
        ))));
    };
    let (schema, name): (String, String) = (resolved.get(0), resolved.get(1));
    let covered = client
        .query_opt(
            "SELECT 1 FROM pg_publication_tables WHERE pubname = $1 AND schemaname = $2 AND tablename = $3",
            &[&r.publication, &schema, &name],
        )
        .await
        .map_err(q)?
        .is_some();
    if covered && table.schema.is_none() {
        // The stream names tables schema-qualified; an unqualified source.table matches by name,
        // so the publication must not carry a namesake from another schema.
        let namesakes: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = $1 AND tablename = $2 AND schemaname <> $3",
                &[&r.publication, &name, &schema],
            )
            .await
            .map_err(q)?
            .get(0);
        if namesakes > 0 {
            return Ok(Err(Prerequisite(format!(
                "publication {} covers several tables named {name}; source.table = \"{}\" is ambiguous in the stream: \
                 set source.table = \"{schema}.{name}\"",
                r.publication, config.source.table
            ))));
        }
    }
    if !covered {
        let exists = client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&r.publication])
            .await
            .map_err(q)?
            .is_some();
        // A partitioned table in a publication without publish_via_partition_root
        // is listed by its partitions: ADD TABLE would fail ("already member").
        let member = client
            .query_opt(
                "SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid \
                 WHERE p.pubname = $1 AND pr.prrelid = $2::text::regclass",
                &[&r.publication, &table.to_string()],
            )
            .await
            .map_err(q)?
            .is_some();
        if member {
            return Ok(Err(Prerequisite(format!(
                "publication {} holds the partitioned table {} but publishes its partitions under their own names: run \
                 ALTER PUBLICATION {} SET (publish_via_partition_root = true); so its rows arrive as {}'s",
                r.publication,
                config.source.table,
                quote_ident(&r.publication),
                config.source.table
            ))));
        }
        let fix = if exists {
            format!("ALTER PUBLICATION {} ADD TABLE {table};", quote_ident(&r.publication))
        } else {
            format!(
                "CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert', publish_via_partition_root = true);",
                quote_ident(&r.publication)
            )
        };
        return Ok(Err(Prerequisite(format!(
            "publication {} does not cover {}: run outbox-relay migrate (with source.mode = \"replication\"), or {fix}",
            r.publication, config.source.table
        ))));
    }
    if marks_rows(config) && !position_is_integer(client, config).await? {
        return Ok(Err(Prerequisite(format!(
            "published.mode = \"{}\" stamps or deletes rows by source.columns.position = {:?}, which is not an integer column: \
             set published.mode = \"none\" (the slot alone tracks progress; replication needs no position column), \
             or run ALTER TABLE {table} ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY; CREATE INDEX ON {table} (seq); \
             and set source.columns.position = \"seq\"",
            published_mode_name(config.published.mode),
            config.source.columns.position,
        ))));
    }
    Ok(Ok(()))
}

fn published_mode_name(mode: PublishedMode) -> &'static str {
    match mode {
        PublishedMode::Mark => "mark",
        PublishedMode::Delete => "delete",
        PublishedMode::None => "none",
    }
}

/// Whether `source.columns.position` is an integer column. Replication
/// orders events by the WAL and needs it only to stamp or delete rows
/// (`published.mode` mark/delete); with `none`, any column (a uuid) works.
pub(crate) async fn position_is_integer(client: &Client, config: &Config) -> Result<bool, PostgresError> {
    let row = client
        .query_opt(
            "SELECT a.atttypid = ANY('{int2,int4,int8}'::regtype[]) FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
            &[&config.source.table, &config.source.columns.position],
        )
        .await
        .map_err(|e| PostgresError::query("reading the outbox position column's type", &e))?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}

/// Reads the slot's state.
pub(crate) async fn slot_state(client: &Client, slot: &str) -> Result<SlotState, PostgresError> {
    let row = client
        .query_opt(
            "SELECT active_pid, coalesce(wal_status, 'reserved') = 'lost' FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PostgresError::query("reading the replication slot", &e))?;
    Ok(match row {
        None => SlotState::Missing,
        Some(row) if row.get::<_, bool>(1) => SlotState::Lost,
        Some(row) => SlotState::Ready { active_pid: row.get(0) },
    })
}

/// Creates the slot (dropping a lost one first).
pub(crate) async fn create_slot(client: &Client, slot: &str) -> Result<(), PostgresError> {
    let q = |e: tokio_postgres::Error| PostgresError::query("creating the replication slot", &e);
    if slot_state(client, slot).await? == SlotState::Lost {
        client.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await.map_err(q)?;
    }
    client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.map_err(q)?;
    Ok(())
}

/// Drops the slot (a stale one the relay is about to recreate), ending the
/// connection that still streams it, if any.
pub(crate) async fn drop_slot(client: &Client, slot: &str) -> Result<(), PostgresError> {
    let q = |e: tokio_postgres::Error| PostgresError::query("dropping the stale replication slot", &e);
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .map_err(q)?;
    for _ in 0..50 {
        match client
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return Ok(()),
            // The terminated walsender may still hold it for a moment.
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(e) => return Err(q(e)),
        }
    }
    Err(PostgresError::Query(format!(
        "replication slot {slot} stayed in use; drop it by hand: SELECT pg_drop_replication_slot('{slot}');"
    )))
}

/// `migrate` in replication mode: the publication and the slot, if missing.
pub(crate) async fn setup(client: &Client, config: &Config) -> Result<Vec<String>, PostgresError> {
    let r = &config.source.replication;
    let table = TableName::parse(&config.source.table).map_err(PostgresError::Query)?;
    let mut done = Vec::new();
    let exists = client
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&r.publication])
        .await
        .map_err(|e| PostgresError::query("reading publications", &e))?
        .is_some();
    if !exists {
        client
            // publish_via_partition_root: a partitioned outbox's rows arrive
            // as the root table's (harmless for a plain table).
            .batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {table} WITH (publish = 'insert', publish_via_partition_root = true)",
                quote_ident(&r.publication)
            ))
            .await
            .map_err(|e| PostgresError::query(&format!("creating publication {}", r.publication), &e))?;
        done.push(format!("created publication {} for {}", r.publication, config.source.table));
    }
    if !matches!(slot_state(client, &r.slot).await?, SlotState::Ready { .. }) {
        create_slot(client, &r.slot).await?;
        done.push(format!("created replication slot {}", r.slot));
    }
    Ok(done)
}

/// `$1::int8[]` transaction ids as pgoutput's Begin carries them (32 bits):
/// true when every one is visible to a new snapshot. Each id is widened to
/// the full 64-bit id nearest the snapshot's xmax (a streamed transaction is
/// recent), so the test holds across epoch wraparound.
const TRANSACTIONS_VISIBLE_SQL: &str = "\
    SELECT coalesce(bool_and(pg_visible_in_snapshot((s.xmax + CASE WHEN d >= 2147483648 THEN d - 4294967296 ELSE d END)::text::xid8, s.snap)), true) \
    FROM (SELECT pg_current_snapshot() AS snap, pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS xmax) s, \
         LATERAL (SELECT ((x - s.xmax % 4294967296) % 4294967296 + 4294967296) % 4294967296 AS d FROM unnest($1::int8[]) AS x) w";

/// Waits until the transactions `xids` are visible to new snapshots, at
/// most `timeout`; false if they are still not. A commit is flushed to the
/// WAL (and streamed) just before the committing backend makes it visible,
/// so a statement on its rows can, for a moment, not see them.
pub(crate) async fn wait_visible(client: &Client, xids: &[u32], timeout: Duration) -> Result<bool, PostgresError> {
    let ids: Vec<i64> = xids.iter().map(|&x| i64::from(x)).collect();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let visible: bool = client
            .query_one(TRANSACTIONS_VISIBLE_SQL, &[&ids])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| PostgresError::query("waiting for streamed transactions to become visible", &e))?;
        if visible {
            return Ok(true);
        }
        if tokio::time::Instant::now() + pause > deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The START_REPLICATION command for this configuration.
pub(crate) fn start_command(r: &ReplicationConfig) -> String {
    let publication = r.publication.replace('\'', "''").replace('"', "\"\"");
    format!(
        "START_REPLICATION SLOT {} LOGICAL 0/0 (proto_version '1', publication_names '\"{publication}\"', messages 'true')",
        quote_ident(&r.slot)
    )
}

/// Where each mapped column sits in the outbox relation's tuples.
#[derive(Debug, Clone, Default)]
struct ColumnSlots {
    /// The payload column is bytea: its text form is `\x` hex, published as bytes.
    payload_is_bytea: bool,
    position: Option<usize>,
    event_id: Option<usize>,
    aggregate_type: Option<usize>,
    aggregate_id: Option<usize>,
    event_type: Option<usize>,
    event_version: Option<usize>,
    payload: Option<usize>,
    headers: Option<usize>,
    actor: Option<usize>,
    traceparent: Option<usize>,
    topic: Option<usize>,
    created_at: Option<usize>,
}

impl ColumnSlots {
    fn resolve(columns: &[Column], mapping: &ColumnMapping) -> ColumnSlots {
        let find = |name: &str| if name.is_empty() { None } else { columns.iter().position(|c| c.name == name) };
        let payload = find(&mapping.payload);
        ColumnSlots {
            payload_is_bytea: payload.and_then(|i| columns.get(i)).is_some_and(|c| c.type_oid == BYTEA_OID),
            position: find(&mapping.position),
            event_id: find(&mapping.event_id),
            aggregate_type: find(&mapping.aggregate_type),
            aggregate_id: find(&mapping.aggregate_id),
            event_type: find(&mapping.event_type),
            event_version: find(&mapping.event_version),
            payload,
            headers: find(&mapping.headers),
            actor: find(&mapping.actor),
            traceparent: find(&mapping.traceparent),
            topic: find(&mapping.topic),
            created_at: find(&mapping.created_at),
        }
    }
}

/// pg_type oid of bytea.
const BYTEA_OID: u32 = 17;

/// What a decoded change means for the relay.
#[derive(Debug)]
pub(crate) enum Decoded {
    /// An outbox row or emitted message to publish; `row` is true for table
    /// rows (which mark/delete mode must stamp).
    Event {
        /// The event.
        event: Box<OutboxEvent>,
        /// A table row (not an emitted message).
        row: bool,
    },
    /// A row or message that cannot be published as it stands.
    Rejected {
        /// What was rejected, and why.
        rejected: Rejected,
        /// A table row (not an emitted message).
        row: bool,
    },
    /// Not ours.
    Ignored,
}

/// Turns pgoutput inserts and messages into outbox events.
pub(crate) struct EventDecoder {
    /// `None` for an unqualified `source.table`: the table is matched by
    /// name, as `validate` checked the publication has only the one the
    /// search_path resolves to.
    schema: Option<String>,
    table: String,
    label: String,
    mapping: ColumnMapping,
    prefix: String,
    relations: HashMap<u32, Option<ColumnSlots>>,
    /// Rows are stamped or deleted after publishing (needs integer positions).
    marks_rows: bool,
    /// Last position handed out: rows without an integer position (a uuid
    /// `id`, published.mode = "none") get the next one, kept above the LSNs
    /// of emitted messages so positions in a stream only grow.
    last_position: std::cell::Cell<i64>,
}

/// The JSON applications pass to `pg_logical_emit_message(true, '<prefix>', ...)`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmittedEvent {
    event_id: Option<uuid::Uuid>,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    event_version: Option<i32>,
    payload: Box<RawValue>,
    headers: Option<Box<RawValue>>,
    actor: Option<String>,
    traceparent: Option<String>,
    topic: Option<String>,
}

/// Namespace for event ids of emitted messages without one (stable per LSN).
const MESSAGE_ID_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f75_7462_6f78_2d72_656c_6179_0000_0002);

impl EventDecoder {
    /// A decoder for the configured table, mapping and message prefix.
    pub fn new(config: &Config) -> Result<EventDecoder, String> {
        let table = TableName::parse(&config.source.table)?;
        Ok(EventDecoder {
            schema: table.schema,
            table: table.table,
            label: config.source.table.clone(),
            mapping: config.source.columns.clone(),
            prefix: config.source.replication.message_prefix.clone(),
            relations: HashMap::new(),
            marks_rows: marks_rows(config),
            last_position: std::cell::Cell::new(0),
        })
    }

    /// Learns (or re-learns, after ALTER TABLE) a relation's columns.
    pub fn relation(&mut self, oid: u32, namespace: &str, name: &str, columns: &[Column]) {
        let ours = name == self.table && self.schema.as_deref().is_none_or(|schema| schema == namespace);
        self.relations.insert(oid, ours.then(|| ColumnSlots::resolve(columns, &self.mapping)));
    }

    /// Decodes an insert; `commit_time` stands in for a missing created_at.
    pub fn insert(&self, oid: u32, values: &[Value], commit_time: DateTime<Utc>) -> Decoded {
        let Some(Some(slots)) = self.relations.get(&oid) else { return Decoded::Ignored };
        let text = |slot: Option<usize>| -> Result<Option<String>, String> {
            match slot.and_then(|i| values.get(i)) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::UnchangedToast) => Err("an unchanged TOAST value arrived in an insert".into()),
                // `from_utf8` first: its validation is several times faster than
                // the lossy decoder's, and Postgres sends valid UTF-8 here.
                Some(Value::Text(bytes)) => Ok(Some(match std::str::from_utf8(bytes) {
                    Ok(text) => text.to_owned(),
                    Err(_) => String::from_utf8_lossy(bytes).into_owned(),
                })),
            }
        };
        let (position, row) = match text(slots.position).ok().flatten().and_then(|t| t.parse::<i64>().ok()) {
            Some(position) => (position, true),
            // Nothing to stamp: the WAL orders the rows, the slot tracks progress.
            None if !self.marks_rows => {
                let next = self.last_position.get().saturating_add(1);
                self.last_position.set(next);
                (next, false)
            }
            None => {
                return Decoded::Rejected {
                    rejected: Rejected::new(
                        0,
                        format!(
                            "outbox row without an integer source.columns.position ({:?}): published.mode mark/delete needs one to stamp rows; \
                             set published.mode = \"none\" or add an integer column (ALTER TABLE {} ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY)",
                            self.mapping.position, self.label
                        ),
                    ),
                    row: false,
                }
            }
        };
        let build = || -> Result<RawRow, String> {
            Ok(RawRow {
                position,
                event_id: text(slots.event_id)?,
                aggregate_type: text(slots.aggregate_type)?,
                aggregate_id: text(slots.aggregate_id)?,
                event_type: text(slots.event_type)?,
                event_version: match text(slots.event_version)? {
                    None => None,
                    Some(v) => Some(v.parse().map_err(|_| format!("event_version {v:?} is not an integer"))?),
                },
                payload_binary: if slots.payload_is_bytea {
                    match text(slots.payload)? {
                        Some(hex) => Some(decode_bytea(&hex).ok_or_else(|| format!("bytea payload {hex:.40} is not in hex format: SET bytea_output = 'hex' for the walsender's role"))?),
                        None => None,
                    }
                } else {
                    None
                },
                payload: text(slots.payload)?,
                headers: text(slots.headers)?,
                actor: text(slots.actor)?,
                traceparent: text(slots.traceparent)?,
                topic: text(slots.topic)?,
                created_at: match text(slots.created_at)? {
                    None => Some(commit_time),
                    Some(t) => {
                        Some(parse_timestamptz(&t).ok_or_else(|| format!("created_at {t:?} is not a timestamp"))?)
                    }
                },
            })
        };
        match build().map_err(|reason| Rejected::new(position, reason)).and_then(|raw| raw.into_event(&self.label)) {
            Ok(event) => Decoded::Event { event: Box::new(event), row },
            Err(rejected) => Decoded::Rejected { rejected, row },
        }
    }

    /// Decodes an emitted message with the configured prefix.
    pub fn message(&self, prefix: &str, content: &[u8], lsn: u64, commit_time: DateTime<Utc>) -> Decoded {
        if prefix != self.prefix {
            return Decoded::Ignored;
        }
        let position = lsn as i64;
        self.last_position.set(self.last_position.get().max(position));
        let parsed: EmittedEvent = match serde_json::from_slice(content) {
            Ok(parsed) => parsed,
            Err(e) => {
                return Decoded::Rejected {
                    rejected: Rejected {
                        original: Some(String::from_utf8_lossy(content).into_owned()),
                        ..Rejected::new(
                            position,
                            format!(
                                "logical message at LSN {} is not a valid outbox event: {e}",
                                wire::format_lsn(lsn)
                            ),
                        )
                    },
                    row: false,
                }
            }
        };
        let raw = RawRow {
            position,
            event_id: Some(
                parsed
                    .event_id
                    .unwrap_or_else(|| uuid::Uuid::new_v5(&MESSAGE_ID_NAMESPACE, &lsn.to_be_bytes()))
                    .to_string(),
            ),
            aggregate_type: Some(parsed.aggregate_type),
            aggregate_id: Some(parsed.aggregate_id),
            event_type: Some(parsed.event_type),
            event_version: parsed.event_version,
            payload: Some(parsed.payload.get().to_owned()),
            payload_binary: None,
            headers: parsed.headers.map(|h| h.get().to_owned()),
            actor: parsed.actor,
            traceparent: parsed.traceparent,
            topic: parsed.topic,
            created_at: Some(commit_time),
        };
        match raw.into_event(&self.label) {
            Ok(event) => Decoded::Event { event: Box::new(event), row: false },
            Err(rejected) => Decoded::Rejected {
                rejected: Rejected { original: Some(String::from_utf8_lossy(content).into_owned()), ..rejected },
                row: false,
            },
        }
    }
}

/// Parses Postgres's ISO text output of a timestamptz (`2026-11-22
/// 07:38:00.123456+00`) or of a `timestamp without time zone`, read as UTC
/// (as polling reads it, see [`crate::outbox::utc_timestamp`]).
pub(crate) fn parse_timestamptz(text: &str) -> Option<DateTime<Utc>> {
    // Every row carries one: chrono's format-string parser cost ~3,000
    // instructions per event, the ISO layout Postgres sends takes ~100.
    if let Some(time) = parse_iso_timestamp(text) {
        return Some(time);
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Some(t.with_timezone(&Utc));
        }
    }
    chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok().map(|t| t.and_utc())
}

/// Postgres' ISO output, `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]]`
/// (no offset: UTC); None for anything else (the caller falls back to chrono).
fn parse_iso_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        b.get(from..to)?.iter().try_fold(0u32, |n, &c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
    };
    let date = chrono::NaiveDate::from_ymd_opt(number(0, 4)? as i32, number(5, 7)?, number(8, 10)?)?;
    let mut at = 19;
    let mut micros = 0;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        at = start;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        let digits = at - start;
        if digits == 0 || digits > 6 {
            return None;
        }
        micros = number(start, at)? * 10u32.pow((6 - digits) as u32);
    }
    let time = chrono::NaiveTime::from_hms_micro_opt(number(11, 13)?, number(14, 16)?, number(17, 19)?, micros)?;
    let mut offset = 0i64;
    if at < b.len() {
        let sign = match b[at] {
            b'+' => 1,
            b'-' => -1,
            _ => return None,
        };
        let mut parts = [0i64; 3];
        let mut part = 0;
        at += 1;
        loop {
            parts[part] = i64::from(number(at, at + 2)?);
            at += 2;
            if at == b.len() {
                break;
            }
            if b[at] != b':' || part == 2 {
                return None;
            }
            at += 1;
            part += 1;
        }
        offset = sign * (parts[0] * 3600 + parts[1] * 60 + parts[2]);
    }
    Some(date.and_time(time).and_utc() - chrono::Duration::seconds(offset))
}

/// Bytes of a bytea's hex text output (`\x00ff`); None for another format.
pub(crate) fn decode_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2).map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?)).collect()
}

/// A Postgres timestamp (microseconds since 2000-01-01) as UTC.
pub(crate) fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros + wire::PG_EPOCH_OFFSET_MICROS).unwrap_or_else(Utc::now)
}

/// Whether this configuration keeps rows in the table after publishing.
pub(crate) fn marks_rows(config: &Config) -> bool {
    config.published.mode != PublishedMode::None
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fast_timestamp_parser_agrees_with_chrono() {
        let chrono_parse = |text: &str| {
            for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z"] {
                if let Ok(t) = chrono::DateTime::parse_from_str(text, format) {
                    return Some(t.with_timezone(&chrono::Utc));
                }
            }
            chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok().map(|t| t.and_utc())
        };
        for text in [
            "2026-12-02 17:48:48.339270+00",
            "2026-12-02 17:48:48+00",
            "2026-12-02 17:48:48.3+05:30",
            "2026-12-02 23:59:59.999999-08",
            "2000-02-29 00:00:00.000001+00",
            "2026-12-02 17:48:48.339270",
            "2026-12-02 17:48:48",
            "1999-01-01 01:02:03.04-03:30",
        ] {
            assert_eq!(super::parse_iso_timestamp(text), chrono_parse(text), "{text}");
            assert!(super::parse_iso_timestamp(text).is_some(), "{text}");
        }
        for text in [
            "2026-02-30 00:00:00+00",
            "2026-12-02T17:48:48+00",
            "2026-12-02 17:48:48.1234567+00",
            "2026-12-02 17:48:48+0",
            "x",
        ] {
            assert_eq!(super::parse_iso_timestamp(text), None, "{text}");
        }
        assert_eq!(
            super::parse_timestamptz("2026-12-02 17:48:48.339270+00"),
            chrono_parse("2026-12-02 17:48:48.339270+00")
        );
    }

    use super::*;
    use bytes::Bytes;

    fn config() -> Config {
        let mut c = Config::default();
        c.postgres.url = "postgres://a@b/c".into();
        c
    }

    fn outbox_columns() -> Vec<Column> {
        [
            "id",
            "event_id",
            "aggregate_type",
            "aggregate_id",
            "event_type",
            "event_version",
            "payload",
            "headers",
            "created_at",
        ]
        .iter()
        .map(|n| Column { name: (*n).into(), type_oid: 25 })
        .collect()
    }

    fn t(s: &'static str) -> Value {
        Value::Text(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn outbox_insert_becomes_an_event_and_other_tables_are_ignored() {
        let mut decoder = EventDecoder::new(&config()).unwrap();
        decoder.relation(1, "outbox", "events", &outbox_columns());
        decoder.relation(2, "public", "orders", &outbox_columns());
        let values = vec![
            t("42"),
            t("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"),
            t("Order"),
            t("o-1"),
            t("OrderPlaced"),
            t("2"),
            t("{\"total\": 5}"),
            t("{}"),
            t("2026-11-22 07:38:00.5+00"),
        ];
        let Decoded::Event { event, row } = decoder.insert(1, &values, Utc::now()) else { panic!("not an event") };
        assert!(row);
        assert_eq!((event.position, event.aggregate_id.as_str(), event.event_version), (42, "o-1", 2));
        assert_eq!(event.created_at.to_rfc3339(), "2026-11-22T07:38:00.500+00:00");
        assert!(matches!(decoder.insert(2, &values, Utc::now()), Decoded::Ignored));
        assert!(matches!(decoder.insert(3, &values, Utc::now()), Decoded::Ignored));
    }

    #[test]
    fn an_unqualified_table_is_matched_by_name_in_any_schema() {
        let mut c = config();
        c.source.table = "events".into();
        let mut decoder = EventDecoder::new(&c).unwrap();
        decoder.relation(1, "outbox", "events", &outbox_columns());
        decoder.relation(2, "public", "orders", &outbox_columns());
        assert!(decoder.relations[&1].is_some(), "search_path resolved events to outbox.events");
        assert!(decoder.relations[&2].is_none());
    }

    #[test]
    fn column_order_change_is_followed_after_a_new_relation_message() {
        let mut decoder = EventDecoder::new(&config()).unwrap();
        let mut columns = outbox_columns();
        columns.reverse();
        decoder.relation(1, "outbox", "events", &columns);
        let mut values = vec![
            t("42"),
            t("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"),
            t("Order"),
            t("o-1"),
            t("OrderPlaced"),
            t("1"),
            t("[1]"),
            t("{}"),
            t("2026-11-22 07:38:00+00"),
        ];
        values.reverse();
        let Decoded::Event { event, .. } = decoder.insert(1, &values, Utc::now()) else { panic!() };
        assert_eq!(event.payload.get(), "[1]");
    }

    #[test]
    fn emitted_messages_need_the_prefix_and_valid_json() {
        let decoder = EventDecoder::new(&config()).unwrap();
        let json = br#"{"aggregate_type":"Order","aggregate_id":"9","event_type":"OrderPaid","payload":{"a":1}}"#;
        let Decoded::Event { event, row } = decoder.message("outbox", json, 0x10, Utc::now()) else { panic!() };
        assert!(!row);
        assert_eq!((event.aggregate_id.as_str(), event.payload.get()), ("9", r#"{"a":1}"#));
        let again = decoder.message("outbox", json, 0x10, Utc::now());
        let Decoded::Event { event: same, .. } = again else { panic!() };
        assert_eq!(event.event_id, same.event_id, "stable id per LSN");
        assert!(matches!(decoder.message("other", json, 1, Utc::now()), Decoded::Ignored));
        assert!(matches!(decoder.message("outbox", b"{nope", 1, Utc::now()), Decoded::Rejected { .. }));
    }

    #[test]
    fn timestamp_without_time_zone_is_utc_and_bytea_is_hex() {
        assert_eq!(
            parse_timestamptz("2026-12-02 05:34:49.143595").unwrap().to_rfc3339(),
            "2026-12-02T05:34:49.143595+00:00"
        );
        assert_eq!(parse_timestamptz("2026-12-02 05:34:49").unwrap().to_rfc3339(), "2026-12-02T05:34:49+00:00");
        assert_eq!(parse_timestamptz("2026-12-02 05:34:49+02").unwrap().to_rfc3339(), "2026-12-02T03:34:49+00:00");
        assert_eq!(decode_bytea("\\x00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_bytea("\\x0"), None);
        assert_eq!(decode_bytea("abc"), None);
    }

    #[test]
    fn uuid_position_without_marking_gets_growing_positions() {
        let mut c = config();
        c.published.mode = PublishedMode::None;
        c.source.columns.event_id = "id".into();
        let mut decoder = EventDecoder::new(&c).unwrap();
        decoder.relation(1, "outbox", "events", &outbox_columns());
        let mut values = vec![
            t("6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11"),
            t("ignored"),
            t("Order"),
            t("o-1"),
            t("OrderPlaced"),
            t("1"),
            t("{}"),
            t("{}"),
            t("2026-11-22 07:38:00"),
        ];
        let Decoded::Event { event: a, row } = decoder.insert(1, &values, Utc::now()) else { panic!() };
        assert!(!row, "nothing to stamp");
        values[0] = t("7a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11");
        let Decoded::Event { event: b, .. } = decoder.insert(1, &values, Utc::now()) else { panic!() };
        assert!(b.position > a.position);
        assert_eq!(a.event_id.to_string(), "6a1c1a0e-4a8e-4c55-9a53-3c8e7f0a2b11");
        c.published.mode = PublishedMode::Delete;
        let mut marking = EventDecoder::new(&c).unwrap();
        marking.relation(1, "outbox", "events", &outbox_columns());
        let Decoded::Rejected { rejected, .. } = marking.insert(1, &values, Utc::now()) else { panic!() };
        assert!(rejected.reason.contains("published.mode = \"none\""), "{}", rejected.reason);
    }

    #[test]
    fn start_command_quotes_names() {
        let r = ReplicationConfig::default();
        assert_eq!(
            start_command(&r),
            "START_REPLICATION SLOT \"outbox_relay\" LOGICAL 0/0 (proto_version '1', publication_names '\"outbox_relay_pub\"', messages 'true')"
        );
    }
}
