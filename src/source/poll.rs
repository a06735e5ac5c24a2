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

use super::table::quote_ident;
use super::ClaimedBatch;
use crate::config::SourceConfig;
use crate::coordination::ClaimScope;
use crate::event::{RawRow, Rejected};
use crate::holdback::Blocked;
use crate::outbox::{decode, ClaimStatement, OutboxTable};
use crate::postgres::{Connection, PostgresError};

/// Most rows kept out of claims at once after a failed publish; past this,
/// rows are simply retried sooner.
const MAX_PARKED: usize = 10_000;

/// The claimed batches still waiting for the broker, as the next claim
/// must know them: it claims above `top`, and if fewer than `rows` rows
/// remain at or below it, rows appeared behind the window (a resync).
#[derive(Debug, Clone, Copy, Default)]
pub struct InFlightWindow {
    /// The highest position in flight (None: nothing, claim from the start).
    pub top: Option<i64>,
    /// Rows in flight.
    pub rows: usize,
    /// The lowest position in flight.
    pub bottom: Option<i64>,
}

/// Which unpublished rows a claim may take.
#[derive(Clone, Copy)]
pub struct ClaimFilter<'a> {
    /// Rows waiting for a retry, left out.
    pub parked: &'a [i64],
    /// Aggregates held back behind a failed event, left out.
    pub blocked: &'a Blocked,
    /// The lanes this relay holds (their leases are checked in the statement).
    pub lanes: &'a [i32],
    /// This relay holds every lane: the per-row lane test is skipped.
    pub all_lanes: bool,
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
}

impl Parked {
    /// Keeps `position` out of claims for `delay`.
    pub fn park(&mut self, position: i64, delay: Duration) {
        if self.until.len() < MAX_PARKED {
            self.until.insert(position, Instant::now() + delay);
        }
    }

    /// Forgets `position` (it was dead-lettered).
    pub fn forget(&mut self, position: i64) {
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
    table: OutboxTable,
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
        table: &OutboxTable,
        scope: &ClaimScope,
    ) -> Result<PollSource, PostgresError> {
        let queries = table.fenced_by(scope);
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
        let prepare = |which| client.prepare(queries.claim_sql(which));
        let claim = prepare(ClaimStatement::AllLanes).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_blocked =
            prepare(ClaimStatement::AllLanesBlocked).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_lanes = prepare(ClaimStatement::SomeLanes).await.map_err(|e| PostgresError::query(&context, &e))?;
        let claim_lanes_blocked =
            prepare(ClaimStatement::SomeLanesBlocked).await.map_err(|e| PostgresError::query(&context, &e))?;
        let checkpoint =
            client.prepare(queries.checkpoint_sql()).await.map_err(|e| PostgresError::query(&context, &e))?;
        let record_failures = match queries.record_failures_sql() {
            Some(sql) => Some(client.prepare(sql).await.map_err(|e| PostgresError::query(&context, &e))?),
            None => None,
        };
        client
            .batch_execute(&format!("LISTEN {}", quote_ident(&config.notify_channel)))
            .await
            .map_err(|e| PostgresError::query("LISTEN", &e))?;
        Ok(PollSource {
            connection,
            table: queries,
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

    /// Claims the next rows above what is in flight (`window.top`, None:
    /// from the start), only of the lanes and rows `filter` lets through.
    pub async fn claim(&mut self, window: InFlightWindow, filter: ClaimFilter<'_>) -> Result<Claim, PostgresError> {
        let InFlightWindow { top: in_flight_top, rows: in_flight_rows, bottom: in_flight_bottom } = window;
        let ClaimFilter { parked, blocked, lanes, all_lanes: all } = filter;
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
            match raw.into_event(self.table.label()) {
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
            .query(self.table.still_pending_sql(), &[&positions])
            .await
            .map_err(|e| PostgresError::query("checking failed rows", &e))?;
        rows.iter().map(|r| r.try_get(0).map_err(|e| PostgresError::query("checking failed rows", &e))).collect()
    }

    /// Reads failed rows back with their attempts so far (for dead-lettering).
    pub async fn failed_rows(&self, positions: &[i64]) -> Result<HashMap<i64, (RawRow, Option<i64>)>, PostgresError> {
        self.table.read_failed_rows(&self.connection.client, positions).await
    }

    /// Marks dead-lettered rows done (see [`OutboxTable::dead_lettered_sql`]).
    pub async fn mark_dead_lettered(&self, positions: &[i64]) -> Result<(), PostgresError> {
        if positions.is_empty() {
            return Ok(());
        }
        self.connection
            .client
            .execute(self.table.dead_lettered_sql(), &[&positions])
            .await
            .map_err(|e| PostgresError::query("marking dead-lettered rows", &e))?;
        Ok(())
    }

    /// True once the connection is gone; the session must end.
    pub fn is_closed(&self) -> bool {
        self.connection.client.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            floor.position, 4001,
            "settled through the claim up to 4000; the one up to 5000 (xmax 310) is not yet"
        );
    }

    #[test]
    fn parked_rows_expire() {
        let mut parked = Parked::default();
        parked.park(5, Duration::from_secs(60));
        parked.park(6, Duration::ZERO);
        assert_eq!(parked.current(), vec![5]);
    }
}
