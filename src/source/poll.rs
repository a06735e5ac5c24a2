//! Polling capture: claim unpublished rows in position order.
//!
//! # Claiming without skipping or reordering
//!
//! Identity values are handed out at insert but become visible at commit, so
//! a reader that remembers "the last id I saw" can skip a row whose
//! transaction committed late. We never rely on such a high-water mark for
//! correctness. Each claim asks, in a single statement (one snapshot):
//!
//! * `behind`: how many unpublished rows sit at or below the highest position
//!   still in flight, and
//! * `next`: the next unpublished rows above that position.
//!
//! If `behind` equals the number of rows in flight, nothing new appeared
//! below the window, and `next` continues in order. Otherwise a row committed
//! late (or a failed row is due for retry): the relay stops claiming, lets
//! the in-flight batches finish, and claims again from the lowest
//! unpublished row, so that row goes out before anything after it.
//!
//! Several relays share one outbox by lanes ([`crate::coordination`]): a
//! claim only returns rows of the lanes this relay holds, and only while the
//! lease table says, by the database clock and in the same statement, that
//! it still holds them. A relay holding every lane skips the per-row lane
//! test (the common single-relay case costs nothing extra).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement};
use uuid::Uuid;

use super::table::{quote_ident, TableName};
use super::ClaimedBatch;
use crate::blocking::Blocked;
use crate::config::{ColumnMapping, PublishedMode, SourceConfig};
use crate::event::{RawRow, Rejected};
use crate::postgres::{Connection, PostgresError};

/// Most rows kept out of claims at once after a failed publish; past this,
/// rows are simply retried sooner.
const MAX_PARKED: usize = 10_000;

/// SQL text for one outbox table and column mapping, built once.
#[derive(Debug, Clone)]
pub struct PollQueries {
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

/// What a claim may take, and under which lease (see [`crate::coordination`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimScope {
    /// The lease rows' resource (the outbox table, or the slot in replication).
    pub resource: String,
    /// Lanes of that resource's layout.
    pub lanes: i32,
    /// This relay process.
    pub instance: Uuid,
    /// Split rows into lanes by aggregate (polling); else every row belongs
    /// to lane 0 (the replication leader's recovery drain).
    pub by_lane: bool,
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl PollQueries {
    /// Builds the statements; names were validated by `Config::validate`.
    /// With `exclude_dead_lettered` (policy dead_letter and a mapped
    /// `dead_lettered_at` column), dead-lettered rows are never claimed.
    /// Claims are fenced by `scope`'s lease (None: unfenced, for callers
    /// that never claim).
    pub fn new(
        table: &TableName,
        columns: &ColumnMapping,
        published: PublishedMode,
        exclude_dead_lettered: bool,
        scope: Option<&ClaimScope>,
    ) -> PollQueries {
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
        let fence = |lanes: &str| match scope {
            None => String::new(),
            Some(scope) => format!(
                " AND (SELECT count(*) = cardinality({lanes}::int4[]) AND cardinality({lanes}::int4[]) > 0 \
                   FROM outbox.relay_leases WHERE resource = {} AND lanes = {} AND instance = {} \
                   AND expires_at > now() AND lane = ANY({lanes}::int4[]))",
                literal(&scope.resource),
                scope.lanes,
                literal(&scope.instance.to_string()),
            ),
        };
        let lane_test = |lanes: &str| match scope {
            Some(scope) if scope.by_lane => {
                format!(" AND {} = ANY({lanes}::int4[])", crate::coordination::lane_sql(&aggregate, scope.lanes))
            }
            _ => String::new(),
        };
        let parked_only = format!("NOT ({position} = ANY($3::int8[]))");
        let claim = claim_sql(&parked_only, &fence("$4"), "$5");
        let claim_blocked = claim_sql(&eligible, &fence("$6"), "$7");
        let claim_lanes = claim_sql(&parked_only, &format!("{}{}", lane_test("$4"), fence("$4")), "$5");
        let claim_lanes_blocked = claim_sql(&eligible, &format!("{}{}", lane_test("$6"), fence("$6")), "$7");
        let still_pending = format!(
            "SELECT {position}::int8 FROM {table} WHERE {unpublished} AND {position} = ANY($1::int8[])"
        );
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
            (PublishedMode::Delete, Some(d)) => format!("UPDATE {table} SET {d} = now() WHERE {position} = ANY($1::int8[])"),
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
        PollQueries {
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
        col(&columns.payload, "text"),
        col(&columns.headers, "text"),
        col(&columns.actor, "text"),
        col(&columns.traceparent, "text"),
        col(&columns.topic, "text"),
        col(&columns.created_at, "timestamptz"),
    ]
    .join(", ")
}

/// SQL returning (unpublished rows, age in seconds of the oldest one).
/// Counting stops at ten million so a huge backlog cannot make it slow.
pub fn backlog_sql(table: &TableName, columns: &ColumnMapping) -> String {
    let position = quote_ident(&columns.position);
    let unpublished = if columns.published_at.is_empty() {
        "true".to_owned()
    } else {
        format!("{} IS NULL", quote_ident(&columns.published_at))
    };
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

impl PollQueries {
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
}

/// Reads failed rows back (for dead-lettering): the raw row and its attempts so far.
pub async fn read_failed_rows(
    client: &tokio_postgres::Client,
    queries: &PollQueries,
    positions: &[i64],
) -> Result<HashMap<i64, (RawRow, Option<i64>)>, PostgresError> {
    let mut found = HashMap::new();
    if positions.is_empty() {
        return Ok(found);
    }
    let rows = client
        .query(queries.failed_rows_sql(), &[&positions])
        .await
        .map_err(|e| PostgresError::query("reading failed rows", &e))?;
    for row in &rows {
        let Some(raw) = decode(row, 0)? else { continue };
        let attempts: Option<i64> = row.try_get(12).map_err(|e| PostgresError::query("reading failed rows", &e))?;
        found.insert(raw.position, (raw, attempts));
    }
    Ok(found)
}

/// What one claim found.
#[derive(Debug)]
pub enum Claim {
    /// The next rows in order (possibly none).
    Batch(ClaimedBatch),
    /// Rows appeared below the in-flight window: drain, then claim from the start.
    Resync,
}

/// Rows kept out of claims until their retry time, after a failed publish.
#[derive(Debug, Default)]
pub struct Parked {
    until: HashMap<i64, Instant>,
    /// Failed attempts seen by this session, for tables without an attempts column.
    attempts: HashMap<i64, i64>,
}

impl Parked {
    /// Keeps `position` out of claims for `delay`.
    pub fn park(&mut self, position: i64, delay: Duration) {
        if self.until.len() < MAX_PARKED {
            self.until.insert(position, Instant::now() + delay);
        }
    }

    /// Counts one more failed attempt of `position` in this session; returns the count.
    pub fn count_attempt(&mut self, position: i64) -> i64 {
        if self.attempts.len() >= MAX_PARKED {
            self.attempts.clear();
        }
        let n = self.attempts.entry(position).or_insert(0);
        *n += 1;
        *n
    }

    /// Forgets `position` (it was dead-lettered).
    pub fn forget(&mut self, position: i64) {
        self.attempts.remove(&position);
        self.until.remove(&position);
    }

    /// Positions still parked now, forgetting the expired ones.
    pub fn current(&mut self) -> Vec<i64> {
        let now = Instant::now();
        self.until.retain(|_, until| *until > now);
        self.until.keys().copied().collect()
    }
}

/// How long a claim's snapshot must be past before rows below it count as
/// settled: covers a transaction that took an id just before it got its xid.
const SETTLE_AFTER: Duration = Duration::from_secs(1);
/// Claims remembered while waiting to settle (older ones are dropped: a later
/// one settling implies they did).
const MAX_UNSETTLED: usize = 10_000;

/// Where the count of unpublished rows below the window starts.
///
/// Counting every unpublished row up to the window's top is what catches a
/// row that committed late (its id was taken before rows already claimed).
/// With lanes that count also reads the other relays' unpublished rows, which
/// a relay running ahead of a slower one would read again on every claim.
/// But only a transaction already running at a claim can still commit an id
/// at or below that claim's rows (ids are handed out in time order). Once a
/// later claim's snapshot shows all of those transactions ended (its xmin
/// passed the first claim's xmax) and its count still matched, nothing new can
/// appear at or below the first claim's top, and the count may start above it
/// (never above a row still in flight or waiting for a retry).
#[derive(Debug)]
pub struct Floor {
    position: i64,
    /// Claims not yet settled: (when, their snapshot's xmax, their top).
    unsettled: VecDeque<(Instant, i64, i64)>,
}

impl Default for Floor {
    fn default() -> Self {
        Floor { position: i64::MIN, unsettled: VecDeque::new() }
    }
}

impl Floor {
    /// After a claim whose count matched: settle what its snapshot allows,
    /// remember the claim itself.
    fn advance(&mut self, horizon: i64, next_xid: i64, top: i64, lowest_live: Option<i64>) {
        let mut settled = None;
        while let Some(&(at, xid, upto)) = self.unsettled.front() {
            if horizon < xid || at.elapsed() < SETTLE_AFTER {
                break;
            }
            settled = Some(upto);
            self.unsettled.pop_front();
        }
        if let Some(upto) = settled {
            self.position = self.position.max(upto.saturating_add(1));
        }
        if let Some(live) = lowest_live {
            self.position = self.position.min(live);
        }
        if top > i64::MIN {
            if self.unsettled.len() >= MAX_UNSETTLED {
                self.unsettled.pop_front();
            }
            self.unsettled.push_back((Instant::now(), next_xid, top));
        }
    }
}

/// A polling connection to one outbox table.
pub struct PollSource {
    connection: Connection,
    table_label: String,
    queries: PollQueries,
    claim: Statement,
    claim_blocked: Statement,
    claim_lanes: Statement,
    claim_lanes_blocked: Statement,
    checkpoint: Statement,
    record_failures: Option<Statement>,
    batch_size: i64,
    next_sequence: u64,
    /// Where the count below the window starts (see [`Floor`]).
    floor: Floor,
}

impl PollSource {
    /// Prepares statements on `connection` and LISTENs on the channel.
    /// A missing table, column or privilege fails here with the fix.
    pub async fn prepare(
        connection: Connection,
        config: &SourceConfig,
        published: PublishedMode,
        exclude_dead_lettered: bool,
        scope: &ClaimScope,
    ) -> Result<PollSource, PostgresError> {
        let table = TableName::parse(&config.table).map_err(PostgresError::Query)?;
        let queries = PollQueries::new(&table, &config.columns, published, exclude_dead_lettered, Some(scope));
        let client = &connection.client;
        // The relay's statements are small and latency-bound: parallel
        // workers and JIT only add start-up cost. A mark lost in a Postgres
        // crash only means that event is published again, so the relay's own
        // commits need not wait for the WAL flush.
        client
            .batch_execute("SET max_parallel_workers_per_gather = 0; SET jit = off; SET synchronous_commit = off")
            .await
            .map_err(|e| PostgresError::query("configuring the relay session", &e))?;
        let context = format!("outbox table {}", config.table);
        let claim = client.prepare(&queries.claim).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_blocked = client.prepare(&queries.claim_blocked).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_lanes = client.prepare(&queries.claim_lanes).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_lanes_blocked =
            client.prepare(&queries.claim_lanes_blocked).await.map_err(|e| PostgresError::query(&context, &e))?;
        let checkpoint =
            client.prepare(&queries.checkpoint).await.map_err(|e| PostgresError::query(&context, &e))?;
        let record_failures = match &queries.record_failures {
            Some(sql) => Some(client.prepare(sql).await.map_err(|e| PostgresError::query(&context, &e))?),
            None => None,
        };
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&config.notify_channel)))
            .await
            .map_err(|e| PostgresError::query("LISTEN", &e))?;
        Ok(PollSource {
            connection,
            table_label: config.table.clone(),
            queries,
            claim,
            claim_blocked,
            claim_lanes,
            claim_lanes_blocked,
            checkpoint,
            record_failures,
            batch_size: config.batch_size as i64,
            next_sequence: 0,
            floor: Floor::default(),
        })
    }

    /// Signalled when the outbox trigger sends NOTIFY.
    pub fn notifications(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.connection.notifications.clone()
    }

    /// Claims the next rows above `in_flight_top` (None: from the start),
    /// given that `in_flight_rows` rows at or below it are still in flight,
    /// the lowest at `in_flight_bottom`. Only rows of `lanes` (`all`: this
    /// relay holds every lane) while their leases hold; rows parked for a
    /// retry and rows of `blocked` aggregates are left out.
    #[allow(clippy::too_many_arguments)]
    pub async fn claim(
        &mut self,
        in_flight_top: Option<i64>,
        in_flight_rows: usize,
        in_flight_bottom: Option<i64>,
        parked: &[i64],
        blocked: &Blocked,
        lanes: &[i32],
        all: bool,
    ) -> Result<Claim, PostgresError> {
        let top = in_flight_top.unwrap_or(i64::MIN);
        if in_flight_top.is_none() {
            // A claim from the start (new lanes, or after a resync) settles nothing yet.
            self.floor = Floor::default();
        }
        let floor = self.floor.position;
        let mut lowest_waiting = parked.iter().copied().min();
        let rows = if blocked.is_empty() {
            let params: [&(dyn ToSql + Sync); 5] = [&top, &self.batch_size, &parked, &lanes, &floor];
            let statement = if all { &self.claim } else { &self.claim_lanes };
            self.connection.client.query(statement, &params).await
        } else {
            let (blocked_aggregates, blocked_behind) = blocked.snapshot();
            lowest_waiting = lowest_waiting.into_iter().chain(blocked_behind.iter().copied()).min();
            let params: [&(dyn ToSql + Sync); 7] =
                [&top, &self.batch_size, &parked, &blocked_aggregates, &blocked_behind, &lanes, &floor];
            let statement = if all { &self.claim_blocked } else { &self.claim_lanes_blocked };
            self.connection.client.query(statement, &params).await
        }
        .map_err(|e| PostgresError::query("claiming outbox rows", &e))?;
        let read = |row: &Row, i: usize| -> Result<i64, PostgresError> {
            row.try_get(i).map_err(|e| PostgresError::query("reading the claim", &e))
        };
        let (behind, horizon, next_xid) = match rows.first() {
            Some(row) => (read(row, 0)?, read(row, 1)?, read(row, 2)?),
            None => (0, 0, 0),
        };
        if behind != in_flight_rows as i64 {
            self.floor = Floor::default();
            return Ok(Claim::Resync);
        }
        let mut batch = ClaimedBatch {
            sequence: self.next_sequence,
            events: Vec::with_capacity(rows.len()),
            ..ClaimedBatch::default()
        };
        for row in &rows {
            // The LEFT JOIN yields one row of NULLs when nothing is unpublished.
            let Some(raw) = decode(row, 3)? else { continue };
            batch.last_position = raw.position;
            match raw.into_event(&self.table_label) {
                Ok(event) => batch.events.push(event),
                Err(rejected) => batch.rejected.push(rejected),
            }
        }
        if !batch.is_empty() {
            self.next_sequence += 1;
        }
        let lowest_live = [in_flight_bottom, batch.first_position(), lowest_waiting].into_iter().flatten().min();
        let claimed_top = if batch.is_empty() { top } else { batch.last_position };
        self.floor.advance(horizon, next_xid, claimed_top, lowest_live);
        Ok(Claim::Batch(batch))
    }

    /// Marks or deletes acknowledged rows, per `published.mode`.
    pub async fn checkpoint(&self, positions: &[i64]) -> Result<u64, PostgresError> {
        if positions.is_empty() {
            return Ok(0);
        }
        self.connection
            .client
            .execute(&self.checkpoint, &[&positions])
            .await
            .map_err(|e| PostgresError::query("marking published rows", &e))
    }

    /// Records failed or rejected rows (attempts, last_error, failed_at).
    pub async fn record_failures(&self, failures: &[Rejected]) -> Result<(), PostgresError> {
        let Some(statement) = &self.record_failures else { return Ok(()) };
        if failures.is_empty() {
            return Ok(());
        }
        let positions: Vec<i64> = failures.iter().map(|f| f.position).collect();
        let reasons: Vec<&str> = failures.iter().map(|f| f.reason.as_str()).collect();
        self.connection
            .client
            .execute(statement, &[&positions, &reasons])
            .await
            .map_err(|e| PostgresError::query("recording failed rows", &e))?;
        Ok(())
    }

    /// Which of `positions` are still unpublished (a blocked aggregate
    /// whose failed row was fixed by hand, deleted or replayed is released).
    pub async fn still_pending(&self, positions: &[i64]) -> Result<Vec<i64>, PostgresError> {
        let rows = self
            .connection
            .client
            .query(&self.queries.still_pending, &[&positions])
            .await
            .map_err(|e| PostgresError::query("checking failed rows", &e))?;
        rows.iter().map(|r| r.try_get(0).map_err(|e| PostgresError::query("checking failed rows", &e))).collect()
    }

    /// Reads failed rows back with their attempts so far (for dead-lettering).
    pub async fn failed_rows(&self, positions: &[i64]) -> Result<HashMap<i64, (RawRow, Option<i64>)>, PostgresError> {
        read_failed_rows(&self.connection.client, &self.queries, positions).await
    }

    /// Marks dead-lettered rows done (see [`PollQueries::dead_lettered_sql`]).
    pub async fn mark_dead_lettered(&self, positions: &[i64]) -> Result<(), PostgresError> {
        if positions.is_empty() {
            return Ok(());
        }
        self.connection
            .client
            .execute(self.queries.dead_lettered_sql(), &[&positions])
            .await
            .map_err(|e| PostgresError::query("marking dead-lettered rows", &e))?;
        Ok(())
    }

    /// True once the connection is gone; the session must end.
    pub fn is_closed(&self) -> bool {
        self.connection.client.is_closed()
    }
}

/// Decodes [`select_list`]'s columns starting at column `first`; None for
/// an all-NULL row (an outer join that found nothing).
pub fn decode(row: &Row, first: usize) -> Result<Option<RawRow>, PostgresError> {
    let get_err = |e: tokio_postgres::Error| PostgresError::query("decoding an outbox row", &e);
    let Some(position) = row.try_get::<_, Option<i64>>(first).map_err(get_err)? else {
        return Ok(None);
    };
    let at = |i: usize| first + i;
    Ok(Some(RawRow {
        position,
        event_id: row.try_get(at(1)).map_err(get_err)?,
        aggregate_type: row.try_get(at(2)).map_err(get_err)?,
        aggregate_id: row.try_get(at(3)).map_err(get_err)?,
        event_type: row.try_get(at(4)).map_err(get_err)?,
        event_version: row.try_get(at(5)).map_err(get_err)?,
        payload: row.try_get(at(6)).map_err(get_err)?,
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
        let q = PollQueries::new(&table, &columns, PublishedMode::Delete, true, None);
        assert!(q.claim.contains("\"aggregatetype\"::text"));
        assert!(q.claim.contains("NULL::int4"));
        assert!(q.claim.contains("WHERE true AND \"id\" > $1::int8"));
        assert!(!q.claim.contains("$4"), "the common claim never reads the heap for the aggregate");
        assert!(q.claim_blocked.contains("coalesce(\"aggregateid\"::text = ANY($4::text[]), false) OR \"id\" = ANY($5::int8[])"));
        assert_eq!(q.checkpoint, "DELETE FROM \"public\".\"outbox\" WHERE \"id\" = ANY($1::int8[])");
        assert!(q.record_failures.is_none());
    }

    #[test]
    fn claims_are_fenced_by_the_lease_and_lanes_filter_by_aggregate() {
        let table = TableName::parse("outbox.events").unwrap();
        let scope = ClaimScope { resource: "outbox.events".into(), lanes: 8, instance: Uuid::nil(), by_lane: true };
        let q = PollQueries::new(&table, &ColumnMapping::default(), PublishedMode::Mark, false, Some(&scope));
        for sql in [&q.claim, &q.claim_lanes] {
            assert!(sql.contains("resource = 'outbox.events' AND lanes = 8 AND instance = '00000000-0000-0000-0000-000000000000'"));
            assert!(sql.contains("cardinality($4::int4[])"));
        }
        assert!(!q.claim.contains("hashtextextended"), "holding every lane skips the per-row test");
        assert!(q.claim_lanes.contains("% 8)::int4 = ANY($4::int4[])"));
        assert!(q.claim_lanes_blocked.contains("% 8)::int4 = ANY($6::int4[])"));
        assert!(!q.claim_lanes_blocked.contains("$4::int4[]"));
    }

    #[test]
    fn a_quote_in_a_name_cannot_escape_its_literal() {
        assert_eq!(literal("a'b"), "'a''b'");
    }

    #[test]
    fn the_floor_rises_only_behind_settled_claims_and_never_above_a_live_row() {
        let mut floor = Floor::default();
        let old = Instant::now() - Duration::from_secs(5);
        // Claim 1 (xmax 100) up to row 1000; its transactions may still run.
        floor.advance(90, 100, 1000, Some(1));
        assert_eq!(floor.position, i64::MIN);
        floor.unsettled[0].0 = old;
        // A later claim whose snapshot still has a transaction older than 100 running: nothing settles.
        floor.advance(99, 120, 2000, Some(900));
        assert_eq!(floor.position, i64::MIN);
        // All of claim 1's transactions ended: rows up to 1000 are settled, but row 900 is still in flight.
        floor.advance(100, 130, 3000, Some(900));
        assert_eq!(floor.position, 900);
        for entry in floor.unsettled.iter_mut() {
            entry.0 = old;
        }
        floor.advance(200, 210, 4000, Some(2500));
        assert_eq!(floor.position, 2500);
        floor.advance(300, 310, 5000, None);
        assert_eq!(floor.position, 2500, "the claim up to 4000 is under a second old");
        for entry in floor.unsettled.iter_mut() {
            entry.0 = old;
        }
        floor.advance(300, 320, 6000, None);
        assert_eq!(floor.position, 4001, "settled through the claim up to 4000; the one up to 5000 (xmax 310) is not yet");
    }

    #[test]
    fn parked_rows_expire() {
        let mut parked = Parked::default();
        parked.park(5, Duration::from_secs(60));
        parked.park(6, Duration::ZERO);
        assert_eq!(parked.current(), vec![5]);
    }
}
