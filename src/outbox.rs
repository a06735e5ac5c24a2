//! The outbox table: its name, its column mapping and every statement the
//! relay runs on it, built once from the configuration and handed around.
//! No other module formats SQL over the outbox table.
//!
//! Claims are fenced by the lease of the lanes they read (the fence's SQL
//! lives in [`crate::coordination`]); everything else here is plain
//! statements with array parameters, so a batch is one round trip.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::config::{ColumnMapping, Config, FailurePolicy, PublishedMode};
use crate::coordination::ClaimScope;
use crate::event::RawRow;
use crate::postgres::PostgresError;
use crate::source::table::{quote_ident, TableName};

/// Rows the "published in the last minute" count looks at (newest first).
pub const RECENT_WINDOW: i64 = 100_000;

/// The outbox table and the SQL text of every statement on it, built once.
#[derive(Debug, Clone)]
pub struct OutboxTable {
    /// The table, quoted when displayed.
    name: TableName,
    /// `source.table` as configured: seeds derived event ids, labels errors.
    label: String,
    /// The column mapping the statements were built from.
    columns: ColumnMapping,
    /// What acknowledging a row does to it.
    published: PublishedMode,
    /// Dead-lettered rows count as done (policy dead_letter).
    exclude_dead_lettered: bool,
    claim: String,
    claim_blocked: String,
    claim_lanes: String,
    claim_lanes_blocked: String,
    checkpoint: String,
    record_failures: Option<String>,
    dead_lettered: String,
    failed_rows: String,
    still_pending: String,
}

impl OutboxTable {
    /// Builds the statements; names were validated by `Config::validate`.
    /// With `exclude_dead_lettered` (policy dead_letter and a mapped
    /// `dead_lettered_at` column), dead-lettered rows are never claimed.
    /// Claims are fenced by `scope`'s lease (None: unfenced, for callers
    /// that never claim).
    fn build(
        table: &TableName,
        columns: &ColumnMapping,
        published: PublishedMode,
        exclude_dead_lettered: bool,
        scope: Option<&ClaimScope>,
    ) -> OutboxTable {
        let position = quote_ident(&columns.position);
        let mut unpublished = if columns.published_at.is_empty() {
            "true".to_owned()
        } else {
            format!("{} IS NULL", quote_ident(&columns.published_at))
        };
        if exclude_dead_lettered && !columns.dead_lettered_at.is_empty() {
            unpublished = format!("{unpublished} AND {} IS NULL", quote_ident(&columns.dead_lettered_at));
        }
        let select_list = select_list(columns);
        // Rows of blocked aggregates ($4) wait, except the failed events they wait for ($5).
        let aggregate = if columns.aggregate_id.is_empty() {
            "NULL::text".to_owned()
        } else {
            format!("{}::text", quote_ident(&columns.aggregate_id))
        };
        let eligible = format!(
            "NOT ({position} = ANY($3::int8[])) \
             AND (NOT coalesce({aggregate} = ANY($4::text[]), false) OR {position} = ANY($5::int8[]))"
        );
        // $1: highest in-flight position, $2: batch size, $3: parked positions,
        // $4: blocked aggregates, $5: the positions they are blocked behind.
        // Used only while something is blocked: the aggregate test needs the
        // heap row, where the common statement below needs only the index.
        // `extra` adds the lease fence and, holding only some lanes, the lane test.
        // `floor` ($5, or $7 next to the blocked parameters) bounds the count
        // below once nothing can commit late under it (see `Floor`); the
        // statement's snapshot horizon (xmin, xmax) comes back for that test.
        let claim_sql = |eligible: &str, extra: &str, floor: &str| {
            format!(
                "WITH behind AS ( \
                   SELECT count(*) AS n, \
                          pg_snapshot_xmin(pg_current_snapshot())::text::int8 AS horizon, \
                          pg_snapshot_xmax(pg_current_snapshot())::text::int8 AS next_xid \
                   FROM {table} \
                   WHERE {unpublished} AND {position} <= $1::int8 AND {position} >= {floor}::int8 AND {eligible}{extra} \
                 ), next AS ( \
                   SELECT {select_list} FROM {table} \
                   WHERE {unpublished} AND {position} > $1::int8 AND {eligible}{extra} \
                   ORDER BY {position} LIMIT $2::int8 \
                 ) \
                 SELECT behind.n, behind.horizon, behind.next_xid, next.* FROM behind LEFT JOIN next ON true ORDER BY 4"
            )
        };
        // The lanes held ($4, or $6 next to the blocked parameters): every one
        // must still be leased to this relay, by the database clock.
        // The lease fence on the lanes held ($4, or $6 next to the blocked
        // parameters) and, holding only some lanes, the per-row lane test.
        let fence = |lanes: &str| scope.map(|s| s.fence_sql(lanes)).unwrap_or_default();
        let lane_test = |lanes: &str| scope.map(|s| s.lane_test_sql(&aggregate, lanes)).unwrap_or_default();
        let parked_only = format!("NOT ({position} = ANY($3::int8[]))");
        let claim = claim_sql(&parked_only, &fence("$4"), "$5");
        let claim_blocked = claim_sql(&eligible, &fence("$6"), "$7");
        let claim_lanes = claim_sql(&parked_only, &format!("{}{}", lane_test("$4"), fence("$4")), "$5");
        let claim_lanes_blocked = claim_sql(&eligible, &format!("{}{}", lane_test("$6"), fence("$6")), "$7");
        let still_pending =
            format!("SELECT {position}::int8 FROM {table} WHERE {unpublished} AND {position} = ANY($1::int8[])");
        let checkpoint = match published {
            PublishedMode::Mark => format!(
                "UPDATE {table} SET {} = now() WHERE {position} = ANY($1::int8[])",
                quote_ident(&columns.published_at)
            ),
            PublishedMode::Delete => format!("DELETE FROM {table} WHERE {position} = ANY($1::int8[])"),
            // Replication with no marking never checkpoints rows; keep a harmless statement.
            PublishedMode::None => "SELECT count(*) FROM unnest($1::int8[])".to_owned(),
        };
        let record_failures = (!columns.attempts.is_empty()).then(|| {
            let attempts = quote_ident(&columns.attempts);
            format!(
                "UPDATE {table} AS o SET {attempts} = o.{attempts} + 1, {} = f.error, {} = now() \
                 FROM unnest($1::int8[], $2::text[]) AS f(position, error) WHERE o.{position} = f.position",
                quote_ident(&columns.last_error),
                quote_ident(&columns.failed_at),
            )
        });
        let dead_lettered_at = (!columns.dead_lettered_at.is_empty()).then(|| quote_ident(&columns.dead_lettered_at));
        let dead_lettered = match (published, &dead_lettered_at) {
            (PublishedMode::Mark, Some(d)) => format!(
                "UPDATE {table} SET {} = now(), {d} = now() WHERE {position} = ANY($1::int8[])",
                quote_ident(&columns.published_at)
            ),
            (PublishedMode::Mark, None) => format!(
                "UPDATE {table} SET {} = now() WHERE {position} = ANY($1::int8[])",
                quote_ident(&columns.published_at)
            ),
            (PublishedMode::Delete, Some(d)) => {
                format!("UPDATE {table} SET {d} = now() WHERE {position} = ANY($1::int8[])")
            }
            (PublishedMode::Delete, None) => format!("DELETE FROM {table} WHERE {position} = ANY($1::int8[])"),
            (PublishedMode::None, _) => "SELECT count(*) FROM unnest($1::int8[])".to_owned(),
        };
        let attempts = if columns.attempts.is_empty() {
            "NULL::int8".to_owned()
        } else {
            format!("{}::int8", quote_ident(&columns.attempts))
        };
        let failed_rows = format!(
            "SELECT {select_list}, {attempts} FROM {table} WHERE {position} = ANY($1::int8[]) ORDER BY {position}"
        );
        OutboxTable {
            name: table.clone(),
            label: table.to_string(),
            columns: columns.clone(),
            published,
            exclude_dead_lettered,
            claim,
            claim_blocked,
            claim_lanes,
            claim_lanes_blocked,
            checkpoint,
            record_failures,
            dead_lettered,
            failed_rows,
            still_pending,
        }
    }
}

/// The columns every reader of the outbox selects, in [`decode`]'s order.
pub fn select_list(columns: &ColumnMapping) -> String {
    let col = |name: &str, cast: &str| -> String {
        if name.is_empty() {
            format!("NULL::{cast}")
        } else {
            format!("{}::{cast}", quote_ident(name))
        }
    };
    [
        format!("{}::int8", quote_ident(&columns.position)),
        col(&columns.event_id, "text"),
        col(&columns.aggregate_type, "text"),
        col(&columns.aggregate_id, "text"),
        col(&columns.event_type, "text"),
        col(&columns.event_version, "int4"),
        // Uncast: decode() reads it by its type, so bytea keeps its bytes
        // and jsonb its Postgres text form (what Debezium publishes).
        quote_ident(&columns.payload),
        col(&columns.headers, "text"),
        col(&columns.actor, "text"),
        col(&columns.traceparent, "text"),
        col(&columns.topic, "text"),
        utc_timestamp(&columns.created_at),
    ]
    .join(", ")
}

/// `column` as a timestamptz, reading a `timestamp without time zone` as
/// UTC whatever the session's TimeZone (replication decodes it the same way).
pub fn utc_timestamp(column: &str) -> String {
    if column.is_empty() {
        return "NULL::timestamptz".to_owned();
    }
    let c = quote_ident(column);
    format!(
        "CASE WHEN pg_typeof({c}) = 'timestamp without time zone'::regtype \
         THEN {c}::timestamp AT TIME ZONE 'UTC' ELSE {c}::timestamptz END"
    )
}

/// The payload column as it comes off the wire: the type tells how to read it.
struct PayloadColumn(Option<(String, Option<Vec<u8>>)>);

impl<'a> tokio_postgres::types::FromSql<'a> for PayloadColumn {
    fn from_sql(
        ty: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{Kind, Type};
        let base = match ty.kind() {
            Kind::Domain(base) => base.clone(),
            _ => ty.clone(),
        };
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|e| format!("payload is not UTF-8: {e}"));
        Ok(PayloadColumn(Some(match base {
            Type::BYTEA => {
                let mut hex = String::with_capacity(2 + raw.len() * 2);
                hex.push_str("\\x");
                for b in raw {
                    hex.push_str(&format!("{b:02x}"));
                }
                (hex, Some(raw.to_vec()))
            }
            // jsonb's binary form is a version byte (1) and its text output.
            Type::JSONB => match raw.split_first() {
                Some((1, rest)) => (text(rest)?, None),
                _ => return Err("jsonb payload in an unknown binary version".into()),
            },
            Type::JSON | Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => (text(raw)?, None),
            other => {
                return Err(format!(
                    "source.columns.payload has type {other}: use jsonb, json, text, varchar or bytea \
                     (e.g. ALTER TABLE <outbox> ALTER COLUMN <payload> TYPE jsonb USING <payload>::text::jsonb)"
                )
                .into())
            }
        })))
    }

    fn from_sql_null(_: &tokio_postgres::types::Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PayloadColumn(None))
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }
}

impl OutboxTable {
    /// The outbox table of `config`, with claims unfenced (for every caller
    /// that does not claim: replication, status, check, replay).
    pub fn from_config(config: &Config) -> Result<OutboxTable, String> {
        let table = TableName::parse(&config.source.table).map_err(|problem| format!("source.table {problem}"))?;
        let exclude_dead_lettered = config.failures.policy == FailurePolicy::DeadLetter;
        let mut built =
            OutboxTable::build(&table, &config.source.columns, config.published.mode, exclude_dead_lettered, None);
        built.label = config.source.table.clone();
        Ok(built)
    }

    /// The same table with its claims fenced by `scope`'s lease.
    pub fn fenced_by(&self, scope: &ClaimScope) -> OutboxTable {
        let mut built =
            OutboxTable::build(&self.name, &self.columns, self.published, self.exclude_dead_lettered, Some(scope));
        built.label = self.label.clone();
        built
    }

    /// The table's name, quoted when displayed.
    pub fn name(&self) -> &TableName {
        &self.name
    }

    /// `source.table` as configured (seeds derived event ids, names the table in messages).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The column mapping.
    pub fn columns(&self) -> &ColumnMapping {
        &self.columns
    }

    /// `$1` highest in-flight position, `$2` batch size, `$3` parked
    /// positions, then (see [`ClaimStatement`]) the lanes and the floor.
    pub fn claim_sql(&self, which: ClaimStatement) -> &str {
        match which {
            ClaimStatement::AllLanes => &self.claim,
            ClaimStatement::AllLanesBlocked => &self.claim_blocked,
            ClaimStatement::SomeLanes => &self.claim_lanes,
            ClaimStatement::SomeLanesBlocked => &self.claim_lanes_blocked,
        }
    }

    /// `$1::int8[]` positions: which of them are still unpublished.
    pub fn still_pending_sql(&self) -> &str {
        &self.still_pending
    }

    /// `$1::int8[]` positions to mark or delete (per `published.mode`).
    pub fn checkpoint_sql(&self) -> &str {
        &self.checkpoint
    }

    /// `$1::int8[]` positions, `$2::text[]` reasons; None without failure columns.
    pub fn record_failures_sql(&self) -> Option<&str> {
        self.record_failures.as_deref()
    }

    /// `$1::int8[]` positions just dead-lettered: stamp (mark mode: also
    /// published_at) so they are not claimed again; delete mode without a
    /// dead_lettered_at column deletes them.
    pub fn dead_lettered_sql(&self) -> &str {
        &self.dead_lettered
    }

    /// `$1::int8[]` positions: [`select_list`] plus the attempts so far (or NULL).
    pub fn failed_rows_sql(&self) -> &str {
        &self.failed_rows
    }

    /// SQL returning (unpublished rows, age in seconds of the oldest one).
    /// Counting stops at ten million so a huge backlog cannot make it slow.
    pub fn backlog_sql(&self) -> String {
        let columns = &self.columns;
        let table = &self.name;
        let position = quote_ident(&columns.position);
        let unpublished = self.unpublished_sql();
        let age = if columns.created_at.is_empty() {
            "NULL::float8".to_owned()
        } else {
            format!(
                "(SELECT extract(epoch FROM now() - {})::float8 FROM {table} WHERE {unpublished} ORDER BY {position} LIMIT 1)",
                quote_ident(&columns.created_at)
            )
        };
        format!("SELECT (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {unpublished} LIMIT 10000000) s), {age}")
    }

    /// SQL counting rows stamped published in the last minute, among the
    /// newest [`RECENT_WINDOW`] rows so it stays cheap on a large table;
    /// None without a `published_at` column.
    pub fn published_last_minute_sql(&self) -> Option<String> {
        if self.columns.published_at.is_empty() {
            return None;
        }
        Some(format!(
            "SELECT count(*) FROM (SELECT {p} AS p FROM {table} ORDER BY {pos} DESC LIMIT {RECENT_WINDOW}) s \
             WHERE p > now() - interval '1 minute'",
            table = self.name,
            p = quote_ident(&self.columns.published_at),
            pos = quote_ident(&self.columns.position),
        ))
    }

    /// SQL counting unpublished rows whose publish failed at least once;
    /// None without an `attempts` column.
    pub fn failing_sql(&self) -> Option<String> {
        if self.columns.attempts.is_empty() {
            return None;
        }
        Some(format!(
            "SELECT count(*) FROM {} WHERE {} AND {} > 0",
            self.name,
            self.unpublished_sql(),
            quote_ident(&self.columns.attempts)
        ))
    }

    /// SQL listing distinct (aggregate type, event type, topic column) among
    /// up to 10,000 unpublished rows: where pending events will go (`check`).
    /// With `route_by` (a column Debezium's router routes by), also that
    /// column's value, fourth.
    pub fn pending_topics_sql(&self, route_by: Option<&str>) -> String {
        let c = &self.columns;
        let text =
            |name: &str| if name.is_empty() { "NULL::text".to_owned() } else { format!("{}::text", quote_ident(name)) };
        format!(
            "SELECT DISTINCT {}, {}, {}, {} FROM (SELECT * FROM {} WHERE {} LIMIT 10000) s",
            text(&c.aggregate_type),
            text(&c.event_type),
            text(&c.topic),
            text(route_by.unwrap_or_default()),
            self.name,
            self.unpublished_sql()
        )
    }

    /// The predicate of a row not yet published (every row without a `published_at` column).
    pub fn unpublished_sql(&self) -> String {
        if self.columns.published_at.is_empty() {
            "true".to_owned()
        } else {
            format!("{} IS NULL", quote_ident(&self.columns.published_at))
        }
    }

    /// Retention: `$1::float8` seconds, `$2::int8` batch: deletes up to a
    /// batch of rows published longer ago than that, oldest first. None
    /// without a `published_at` column (nothing is kept to clean up).
    pub fn retention_sql(&self) -> Option<String> {
        if self.columns.published_at.is_empty() {
            return None;
        }
        let table = &self.name;
        let position = quote_ident(&self.columns.position);
        Some(format!(
            "DELETE FROM {table} WHERE {position} IN ( \
               SELECT {position} FROM {table} \
               WHERE {published} < now() - make_interval(secs => $1::float8) \
               ORDER BY {position} LIMIT $2::int8)",
            published = quote_ident(&self.columns.published_at),
        ))
    }

    /// The statements that re-publish `selection`, oldest first. Fails when
    /// the selection needs a column the mapping does not have.
    pub fn replay_query(&self, selection: &Selection) -> Result<ReplayQuery, String> {
        let table = &self.name;
        let c = &self.columns;
        let mut clauses = Vec::new();
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        let mut add = |clause: String, value: Box<dyn ToSql + Sync + Send>, clauses: &mut Vec<String>| {
            params.push(value);
            clauses.push(clause.replace('?', &format!("${}", params.len() + 1)));
        };
        if selection.dead_lettered {
            if c.dead_lettered_at.is_empty() {
                return Err("--dead-lettered needs source.columns.dead_lettered_at, but it is empty".into());
            }
            clauses.push(format!("{} IS NOT NULL", quote_ident(&c.dead_lettered_at)));
        } else if !c.published_at.is_empty() {
            clauses.push(format!("{} IS NOT NULL", quote_ident(&c.published_at)));
        }
        let position = quote_ident(&c.position);
        if let Some(v) = selection.from_id {
            add(format!("{position} >= ?::int8"), Box::new(v), &mut clauses);
        }
        if let Some(v) = selection.to_id {
            add(format!("{position} <= ?::int8"), Box::new(v), &mut clauses);
        }
        let need = |column: &str, flag: &str| {
            if column.is_empty() {
                Err(format!("{flag} needs a mapped column, but source.columns has none for it"))
            } else {
                Ok(quote_ident(column))
            }
        };
        if let Some(v) = selection.since {
            add(format!("{} >= ?::timestamptz", need(&c.created_at, "--since")?), Box::new(v), &mut clauses);
        }
        if let Some(v) = selection.until {
            add(format!("{} < ?::timestamptz", need(&c.created_at, "--until")?), Box::new(v), &mut clauses);
        }
        if let Some(v) = &selection.aggregate_id {
            add(
                format!("{}::text = ?::text", need(&c.aggregate_id, "--aggregate-id")?),
                Box::new(v.clone()),
                &mut clauses,
            );
        }
        if let Some(v) = &selection.event_type {
            add(format!("{}::text = ?::text", need(&c.event_type, "--event-type")?), Box::new(v.clone()), &mut clauses);
        }
        let filter = if clauses.is_empty() { "true".into() } else { clauses.join(" AND ") };
        let redrive = selection.dead_lettered.then(|| match self.published {
            PublishedMode::Delete => format!("DELETE FROM {table} WHERE {position} = ANY($1::int8[])"),
            _ => format!(
                "UPDATE {table} SET {} = NULL WHERE {position} = ANY($1::int8[])",
                quote_ident(&c.dead_lettered_at)
            ),
        });
        Ok(ReplayQuery {
            // $1 is unused in the count; numbering stays identical to the page query.
            count: format!(
                "SELECT count(*), min({position})::int8, max({position})::int8 FROM {table} WHERE $1::int8 IS NOT NULL AND {filter}"
            ),
            page: format!(
                "SELECT {} FROM {table} WHERE {position} > $1::int8 AND {filter} ORDER BY {position} LIMIT 1000",
                select_list(c)
            ),
            redrive,
            params,
        })
    }

    /// Reads failed rows back (for dead-lettering): the raw row and its attempts so far.
    pub async fn read_failed_rows(
        &self,
        client: &tokio_postgres::Client,
        positions: &[i64],
    ) -> Result<HashMap<i64, (RawRow, Option<i64>)>, PostgresError> {
        let mut found = HashMap::new();
        if positions.is_empty() {
            return Ok(found);
        }
        let rows = client
            .query(self.failed_rows_sql(), &[&positions])
            .await
            .map_err(|e| PostgresError::query("reading failed rows", &e))?;
        for row in &rows {
            let Some(raw) = decode(row, 0)? else { continue };
            let attempts: Option<i64> = row.try_get(12).map_err(|e| PostgresError::query("reading failed rows", &e))?;
            found.insert(raw.position, (raw, attempts));
        }
        Ok(found)
    }
}

/// Whether `source.columns.position` can order a poll: it must be an
/// integer column. Returns the finding (what is wrong, the key, the SQL that
/// fixes it) or None. For `check` and the poll session's start-up; replication
/// needs no position column (see [`crate::source::replication::position_is_integer`]).
pub async fn position_column_problem(
    client: &tokio_postgres::Client,
    table: &OutboxTable,
) -> Result<Option<String>, PostgresError> {
    let column = &table.columns.position;
    let row = client
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod), a.atttypid = ANY('{int2,int4,int8}'::regtype[]) \
             FROM pg_attribute a WHERE a.attrelid = $1::text::regclass AND a.attname = $2 AND NOT a.attisdropped",
            &[&table.name.to_string(), column],
        )
        .await
        .map_err(|e| PostgresError::query("reading the outbox position column's type", &e))?;
    let name = &table.name;
    let fix = format!(
        "run ALTER TABLE {name} ADD COLUMN seq bigint GENERATED ALWAYS AS IDENTITY; CREATE INDEX ON {name} (seq); \
         and set source.columns.position = \"seq\" (map a uuid id as source.columns.event_id), \
         or use source.mode = \"replication\" with published.mode = \"none\", which needs no position column"
    );
    Ok(match row {
        None => Some(format!("source.columns.position = {column:?}: {name} has no such column; polling needs an integer column that grows with inserts: {fix}")),
        Some(row) if !row.get::<_, bool>(1) => {
            let ty: String = row.get(0);
            Some(format!(
                "source.columns.position = {column:?} is a {ty} column; polling needs an integer column that grows with inserts: {fix}"
            ))
        }
        Some(_) => None,
    })
}

/// Detects rows deleted by someone else before polling could see them (the
/// Quarkus/Debezium outbox extensions insert and delete in one transaction):
/// the table is empty, Postgres counted inserts, and either the relay never
/// deletes (`published.mode` mark/none) or it published fewer events than
/// were inserted (`published_by_relay`, e.g. from the metrics). Returns the
/// finding for `check`, or None. Statistics are cumulative since the last
/// stats reset and arrive with a delay of about a second.
pub async fn deleted_by_others_problem(
    client: &tokio_postgres::Client,
    table: &OutboxTable,
    published_by_relay: Option<u64>,
) -> Result<Option<String>, PostgresError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(s.n_tup_ins), 0)::int8, coalesce(sum(s.n_tup_del), 0)::int8 \
             FROM pg_stat_user_tables s \
             WHERE s.relid = $1::text::regclass \
                OR s.relid IN (SELECT relid FROM pg_partition_tree($1::text::regclass))",
            &[&table.name.to_string()],
        )
        .await
        .map_err(|e| PostgresError::query("reading the outbox table's statistics", &e))?;
    let (inserted, deleted): (i64, i64) = (row.get(0), row.get(1));
    let empty = client
        .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {})", table.name), &[])
        .await
        .map_err(|e| PostgresError::query("reading the outbox table", &e))?
        .get::<_, bool>(0);
    let relay_deletes = table.published == PublishedMode::Delete;
    let suspicious = empty
        && inserted > 0
        && deleted > 0
        && (!relay_deletes || published_by_relay.is_some_and(|p| (p as i64) < inserted));
    Ok(suspicious.then(|| {
        format!(
            "{} is empty although Postgres counted {inserted} inserts and {deleted} deletes{}: rows deleted in the \
             transaction that inserted them (the Quarkus/Debezium outbox extensions' default, \
             quarkus.debezium-outbox.remove-after-insert = true) are never visible to polling, so they are never published. \
             Use source.mode = \"replication\" (which sees them in the WAL), or stop deleting them \
             (remove-after-insert = false) and let the relay delete them with published.mode = \"delete\"",
            table.name,
            if relay_deletes { "" } else { " and the relay never deletes rows in this published.mode" }
        )
    }))
}

/// Which events to replay; all given filters must match.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Lowest position, inclusive.
    pub from_id: Option<i64>,
    /// Highest position, inclusive.
    pub to_id: Option<i64>,
    /// Written at or after.
    pub since: Option<DateTime<Utc>>,
    /// Written before.
    pub until: Option<DateTime<Utc>>,
    /// One aggregate.
    pub aggregate_id: Option<String>,
    /// One event type.
    pub event_type: Option<String>,
    /// Re-drive dead-lettered rows (instead of published ones): on success
    /// their `dead_lettered_at` is cleared (delete mode: the row is deleted).
    pub dead_lettered: bool,
}

/// The statements of one replay (see [`OutboxTable::replay_query`]).
pub struct ReplayQuery {
    /// `$1` unused (numbering as `page`): count, lowest and highest position.
    pub count: String,
    /// `$1` cursor: the next page of up to 1,000 matching rows, [`select_list`] columns.
    pub page: String,
    /// `$1::int8[]` positions re-driven from the dead letters: done again
    /// (stamp cleared, or deleted in delete mode). None unless re-driving.
    pub redrive: Option<String>,
    /// The selection's values, `$2` onwards.
    pub params: Vec<Box<dyn ToSql + Sync + Send>>,
}

/// Which claim statement: holding every lane skips the per-row lane test;
/// while aggregates are blocked the claim also leaves their rows out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimStatement {
    /// Every lane, nothing blocked: `$4` lanes, `$5` floor.
    AllLanes,
    /// Every lane, some aggregates blocked: `$4` aggregates, `$5` their failed positions, `$6` lanes, `$7` floor.
    AllLanesBlocked,
    /// Some lanes, nothing blocked (as [`ClaimStatement::AllLanes`]).
    SomeLanes,
    /// Some lanes, some aggregates blocked (as [`ClaimStatement::AllLanesBlocked`]).
    SomeLanesBlocked,
}

/// Decodes [`select_list`]'s columns starting at column `first`; None for
/// an all-NULL row (an outer join that found nothing).
pub fn decode(row: &Row, first: usize) -> Result<Option<RawRow>, PostgresError> {
    let get_err = |e: tokio_postgres::Error| PostgresError::query("decoding an outbox row", &e);
    let Some(position) = row.try_get::<_, Option<i64>>(first).map_err(get_err)? else {
        return Ok(None);
    };
    let at = |i: usize| first + i;
    let (payload, payload_binary) = match row.try_get(at(6)).map_err(get_err)? {
        PayloadColumn(Some((text, bytes))) => (Some(text), bytes),
        PayloadColumn(None) => (None, None),
    };
    Ok(Some(RawRow {
        position,
        event_id: row.try_get(at(1)).map_err(get_err)?,
        aggregate_type: row.try_get(at(2)).map_err(get_err)?,
        aggregate_id: row.try_get(at(3)).map_err(get_err)?,
        event_type: row.try_get(at(4)).map_err(get_err)?,
        event_version: row.try_get(at(5)).map_err(get_err)?,
        payload,
        payload_binary,
        headers: row.try_get(at(7)).map_err(get_err)?,
        actor: row.try_get(at(8)).map_err(get_err)?,
        traceparent: row.try_get(at(9)).map_err(get_err)?,
        topic: row.try_get(at(10)).map_err(get_err)?,
        created_at: row.try_get(at(11)).map_err(get_err)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn selection_builds_numbered_parameters_after_the_cursor() {
        let mut config = Config::default();
        config.postgres.url = "postgres://a@b/c".into();
        let selection = Selection {
            from_id: Some(10),
            aggregate_id: Some("42".into()),
            event_type: Some("OrderPlaced".into()),
            ..Selection::default()
        };
        let dead = Selection { dead_lettered: true, ..selection.clone() };
        let table = OutboxTable::from_config(&config).unwrap();
        let query = table.replay_query(&dead).unwrap();
        assert!(
            query.page.contains("WHERE \"id\" > $1::int8 AND \"dead_lettered_at\" IS NOT NULL AND"),
            "{}",
            query.page
        );
        assert!(query.redrive.is_some());
        let query = table.replay_query(&selection).unwrap();
        assert!(
            query.count.ends_with(
                "\"published_at\" IS NOT NULL AND \"id\" >= $2::int8 AND \"aggregate_id\"::text = $3::text AND \"event_type\"::text = $4::text"
            ),
            "{}",
            query.count
        );
        assert_eq!(query.params.len(), 3);
    }

    #[test]
    fn debezium_mapping_selects_nulls_for_absent_columns() {
        let columns = ColumnMapping {
            position: "id".into(),
            event_id: "".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            event_version: "".into(),
            payload: "payload".into(),
            headers: "".into(),
            actor: "".into(),
            traceparent: "".into(),
            topic: "".into(),
            created_at: "".into(),
            published_at: "".into(),
            attempts: "".into(),
            last_error: "".into(),
            failed_at: "".into(),
            dead_lettered_at: "".into(),
        };
        let table = TableName::parse("public.outbox").unwrap();
        let q = OutboxTable::build(&table, &columns, PublishedMode::Delete, true, None);
        assert!(q.claim.contains("\"aggregatetype\"::text"));
        assert!(q.claim.contains("NULL::int4"));
        assert!(q.claim.contains("WHERE true AND \"id\" > $1::int8"));
        assert!(!q.claim.contains("$4"), "the common claim never reads the heap for the aggregate");
        assert!(q
            .claim_blocked
            .contains("coalesce(\"aggregateid\"::text = ANY($4::text[]), false) OR \"id\" = ANY($5::int8[])"));
        assert_eq!(q.checkpoint, "DELETE FROM \"public\".\"outbox\" WHERE \"id\" = ANY($1::int8[])");
        assert!(q.record_failures.is_none());
    }

    #[test]
    fn claims_are_fenced_by_the_lease_and_lanes_filter_by_aggregate() {
        let table = TableName::parse("outbox.events").unwrap();
        let scope = ClaimScope { resource: "outbox.events".into(), lanes: 8, instance: Uuid::nil(), by_lane: true };
        let q = OutboxTable::build(&table, &ColumnMapping::default(), PublishedMode::Mark, false, Some(&scope));
        for sql in [&q.claim, &q.claim_lanes] {
            assert!(sql.contains(
                "resource = 'outbox.events' AND lanes = 8 AND instance = '00000000-0000-0000-0000-000000000000'"
            ));
            assert!(sql.contains("cardinality($4::int4[])"));
        }
        assert!(!q.claim.contains("hashtextextended"), "holding every lane skips the per-row test");
        assert!(q.claim_lanes.contains("% 8)::int4 = ANY($4::int4[])"));
        assert!(q.claim_lanes_blocked.contains("% 8)::int4 = ANY($6::int4[])"));
        assert!(!q.claim_lanes_blocked.contains("$4::int4[]"));
    }
}
