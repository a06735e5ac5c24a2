//! Replication sessions: validate prerequisites, recover a lost slot, then
//! stream pgoutput from the slot into the publish stage and confirm LSNs
//! only behind fully acknowledged (and marked) transactions.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{interval, sleep, sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use super::{reconnect_backoff, Relay, RelayError, SessionEnd};
use crate::config::{FailurePolicy, PublishedMode};
use crate::coordination::{Coordinator, Fence, Resource};
use crate::event::Rejected;
use crate::holdback::Blocked;
use crate::internal_events::{BatchSent, EventFailed, InternalEvent};
use crate::outbox::OutboxTable;
use crate::pipeline::BatchOutcome;
use crate::postgres::{self, PostgresError};
use crate::settle::{self, Capture, End, EventKey, Ledger, LsnProgress, Rules};
use crate::sink::Sink;
use crate::source::replication::pgoutput::{Logical, WalMessage};
use crate::source::replication::wire::{
    format_lsn, parse_lsn, ConnectParams, ReplicationConnection, ReplicationStream, WireError, WireTls,
};
use crate::source::replication::{self, pg_time, Decoded, EventDecoder, SlotState, HEARTBEAT_PREFIX};
use crate::source::ClaimedBatch;

/// How often slot lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);
/// How long a partly filled batch waits for more events before it is sent:
/// batches span transactions, so small transactions still travel together.
const LINGER: Duration = Duration::from_millis(2);
/// SQLSTATE object_in_use: another session streams the slot.
const OBJECT_IN_USE: &str = "55006";
/// SQLSTATE undefined_object: for a stream, the publication it decodes with is gone.
const UNDEFINED_OBJECT: &str = "42704";

/// An event's position as an operator reads it: a row id, or a message's LSN.
fn describe_position(position: i64, row: bool) -> String {
    if row {
        format!("at outbox row {position}")
    } else {
        format!("at LSN {}", format_lsn(position as u64))
    }
}

/// Where the stream loop's batches go, and those still waiting for the
/// broker's answer, oldest first.
struct Outbound {
    /// To the publish stage.
    batches: mpsc::Sender<ClaimedBatch>,
    /// The next batch's sequence number in this session.
    next_sequence: u64,
    /// Sent and not yet answered.
    pending: VecDeque<PendingBatch>,
}

/// A batch handed to the publish stage, with what settling it takes.
struct PendingBatch {
    sequence: u64,
    /// Outbox row positions in the batch (to mark or delete), sorted, each once.
    rows: Vec<i64>,
    /// Each position's event, for the ledger, sorted by position; None where
    /// two events share a position in this batch (a row and a message: never
    /// remembered, so never skipped). A sorted Vec, not a map: built once per
    /// batch and searched per acknowledged event, without hashing.
    keys: Vec<(i64, Option<EventKey>)>,
    /// The highest commit LSN of the transactions the batch's events belong to.
    final_lsn: u64,
    /// Transactions (ids as pgoutput's Begin carries them) of the batch's rows.
    xids: Vec<u32>,
}

/// Events read from the stream and not yet handed to the stage.
#[derive(Default)]
struct Building {
    batch: ClaimedBatch,
    rows: Vec<i64>,
    /// Each change's position and event, in stream order.
    keys: Vec<(i64, EventKey)>,
    final_lsn: u64,
    /// End LSN of the last transaction completed inside this batch.
    commit_lsn: Option<u64>,
    /// When the batch must be sent even if not full.
    send_by: Option<Instant>,
    /// Transactions the batch's rows belong to (see [`MarkJob::xids`]).
    xids: Vec<u32>,
}

impl Building {
    /// The row just pushed belongs to transaction `xid`.
    fn row_of(&mut self, xid: u32) {
        if self.xids.last() != Some(&xid) {
            self.xids.push(xid);
        }
    }

    /// Adds one decoded change of the transaction committing at `txn`;
    /// an event the broker already acknowledged (`ledger`) is only marked.
    fn push(&mut self, decoded: Decoded, txn: u64, ledger: &Ledger) {
        let (position, row) = match &decoded {
            Decoded::Event { event, row } => (event.position, *row),
            Decoded::Rejected { rejected, row } => (rejected.position, *row),
            Decoded::Ignored => return,
        };
        if self.send_by.is_none() {
            self.send_by = Some(Instant::now() + LINGER);
        }
        let key = EventKey { position, txn, message: !row };
        self.keys.push((position, key));
        if row {
            self.rows.push(position);
        }
        self.final_lsn = self.final_lsn.max(txn);
        self.batch.last_position = position;
        match decoded {
            Decoded::Event { .. } if ledger.was_acknowledged(&key) => self.batch.already_delivered.push(position),
            Decoded::Event { event, .. } => {
                self.batch.events.push(*event);
                self.batch.keys.push(key);
            }
            Decoded::Rejected { rejected, .. } => self.batch.rejected.push(rejected),
            Decoded::Ignored => {}
        }
    }
}

/// The batch's events by position, sorted; a position held by two events
/// maps to None.
fn index_keys(mut keys: Vec<(i64, EventKey)>) -> Vec<(i64, Option<EventKey>)> {
    // Stream order is mostly position order: the sort is close to linear.
    keys.sort_by_key(|(position, _)| *position);
    let mut index: Vec<(i64, Option<EventKey>)> = Vec::with_capacity(keys.len());
    for (position, key) in keys {
        match index.last_mut() {
            Some((last, slot)) if *last == position => *slot = None,
            _ => index.push((position, Some(key))),
        }
    }
    index
}

/// Sorted, deduplicated positions, searched without hashing.
struct SortedPositions<'a>(&'a [i64]);

impl SortedPositions<'_> {
    fn contains(&self, position: &i64) -> bool {
        self.0.binary_search(position).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What one acknowledged batch leaves to do in the database.
#[derive(Debug, Default)]
struct MarkJob {
    /// The batch (its step in [`LsnProgress`]).
    sequence: u64,
    /// Delivered outbox rows to stamp or delete.
    rows: Vec<i64>,
    /// Rows that cannot be published (yet), to record.
    failed: Vec<Rejected>,
    /// Rows whose event went to the dead-letter topic, to stamp as done.
    dead_lettered: Vec<i64>,
    /// The transactions those rows were written by. A commit reaches the WAL,
    /// and so the stream, a moment before other sessions can see it: a
    /// statement in that moment misses the rows, so a short count waits for
    /// these to become visible and runs again.
    xids: Vec<u32>,
}

/// What a new leader hands its stream loop: the slot's stream, the position
/// it resumes from, and the marker (none when rows are not marked).
struct Streaming {
    stream: ReplicationStream,
    confirmed: u64,
    marker: Option<Marker>,
}

/// Marks rows off the streaming loop, coalescing queued jobs into one
/// statement, and reports back which batches are now marked.
struct Marker {
    jobs: mpsc::Sender<MarkJob>,
    done: mpsc::Receiver<Vec<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Marker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Marker {
    fn start(connection: postgres::Connection, queries: OutboxTable, capacity: usize) -> Marker {
        let (jobs, mut incoming) = mpsc::channel::<MarkJob>(capacity * 4);
        let (done_tx, done) = mpsc::channel(capacity * 4);
        let task = tokio::spawn(async move {
            let client = &connection.client;
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while let Ok(job) = incoming.try_recv() {
                    batch.push(job);
                }
                let xids: Vec<u32> = batch.iter().flat_map(|j| j.xids.iter().copied()).collect();
                let rows: Vec<i64> = batch.iter().flat_map(|j| j.rows.iter().copied()).collect();
                let failed: Vec<&Rejected> = batch.iter().flat_map(|j| j.failed.iter()).collect();
                if !rows.is_empty() {
                    if let Err(e) = execute_visible(client, queries.checkpoint_sql(), &[&rows], rows.len(), &xids).await
                    {
                        error!(error = %e, "marking published rows failed");
                        return;
                    }
                }
                if let (Some(sql), false) = (queries.record_failures_sql(), failed.is_empty()) {
                    let positions: Vec<i64> = failed.iter().map(|f| f.position).collect();
                    let reasons: Vec<&str> = failed.iter().map(|f| f.reason.as_str()).collect();
                    if let Err(e) = execute_visible(client, sql, &[&positions, &reasons], positions.len(), &xids).await
                    {
                        error!(error = %e, "recording failed rows failed");
                        return;
                    }
                }
                let dead: Vec<i64> = batch.iter().flat_map(|j| j.dead_lettered.iter().copied()).collect();
                if !dead.is_empty() {
                    if let Err(e) =
                        execute_visible(client, queries.dead_lettered_sql(), &[&dead], dead.len(), &xids).await
                    {
                        error!(error = %e, "stamping dead-lettered rows failed");
                        return;
                    }
                }
                if done_tx.send(batch.iter().map(|j| j.sequence).collect()).await.is_err() {
                    return;
                }
            }
        });
        Marker { jobs, done, task }
    }
}

/// How long a statement on streamed rows waits for their transactions to
/// become visible. Normally microseconds; a writer descheduled between
/// flushing its commit and publishing it can take longer on a loaded box.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

/// Runs `sql` over `expected` streamed rows. If it touched fewer, some may
/// belong to a transaction whose commit was streamed but is not visible yet
/// (rows deleted since, e.g. by their own transaction, are simply gone):
/// waits for `xids` to become visible, then runs it once more.
async fn execute_visible(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    expected: usize,
    xids: &[u32],
) -> Result<(), String> {
    let touched = client.execute(sql, params).await.map_err(|e| postgres::describe(&e))?;
    if touched as usize >= expected {
        return Ok(());
    }
    match replication::wait_visible(client, xids, VISIBLE_WITHIN).await {
        Ok(true) => {}
        // Settling now could confirm the slot past rows never marked: end the
        // session instead; the rows are streamed (and marked) again.
        Ok(false) => {
            return Err(format!(
                "transactions {xids:?} streamed from the slot are still not visible after {VISIBLE_WITHIN:?}; restarting from the slot"
            ))
        }
        Err(e) => return Err(e.to_string()),
    }
    client.execute(sql, params).await.map_err(|e| postgres::describe(&e))?;
    Ok(())
}

/// What the operator reads when replication stops at an event it cannot publish.
fn blocked_message(
    what: &str,
    position: &str,
    aggregate_id: Option<&str>,
    reason: &str,
    dead_letter_topic: &str,
) -> String {
    format!(
        "{what} {position} (aggregate {}) cannot be published: {reason}; with failures.policy = \"block\" the stream stops here \
         and retries (replication cannot hold one aggregate back): fix the cause, or set failures.policy = \"dead_letter\" \
         to publish it to {dead_letter_topic} and move on",
        aggregate_id.unwrap_or("unknown"),
    )
}

/// Soonest a standby status update follows progress (besides the regular
/// `status_interval` ones): prompt enough that a crash re-streams little,
/// rare enough to cost the walsender nothing at 100k events/s.
const PROMPT_STATUS_EVERY: Duration = Duration::from_millis(100);

/// A replication-connection failure: one the server refused with a code
/// only an operator can fix (a missing REPLICATION privilege, a wrong
/// password) is a prerequisite, anything else a stream failure worth a retry.
fn stream_error(error: WireError) -> RelayError {
    match error.code().map(tokio_postgres::error::SqlState::from_code) {
        Some(code) if postgres::needs_operator(&code) => RelayError::Prerequisite(error.to_string()),
        _ => RelayError::Stream(error.to_string()),
    }
}

fn lease_lapsed() -> RelayError {
    RelayError::Lease(
        "this relay's lease on the replication slot lapsed (frozen, overloaded or cut off from Postgres): it stops streaming \
         and confirms nothing more; another relay may lead now"
            .into(),
    )
}

/// A standby status update, only while the lease holds: a deposed leader
/// confirms nothing.
async fn confirm(stream: &mut ReplicationStream, fence: &Fence, lsn: u64) -> Result<(), RelayError> {
    if !fence.holds() {
        return Err(lease_lapsed());
    }
    stream.send_status(lsn, false).await.map_err(stream_error)
}

/// How long a new leader keeps asking for a slot still held by the
/// previous leader's connection.
const TAKE_SLOT_FOR: Duration = Duration::from_secs(10);

impl<S: Sink> Relay<S> {
    /// One replication session (see the module docs): validate, wait for
    /// the slot's lease (standing by meanwhile), then lead.
    pub(super) async fn replication_session(
        &mut self,
        backoff: &mut backon::ExponentialBackoff,
    ) -> Result<SessionEnd, RelayError> {
        let config = self.config.clone();
        let r = &config.source.replication;
        let control = postgres::connect(&config.postgres, "outbox-relay").await?;
        self.health.set_postgres(true);
        if let Err(missing) = replication::validate(&control.client, &config).await? {
            return Err(RelayError::Prerequisite(missing.0));
        }
        let mut coordinator = Coordinator::start(&config, Resource::slot(&r.slot), self.identity.clone()).await?;
        let result = match self.await_leadership(&mut coordinator, backoff).await {
            Ok(true) => self.lead(&control, &mut coordinator, backoff).await,
            Ok(false) => Ok(SessionEnd::Stopped),
            Err(error) => Err(error),
        };
        coordinator.leave().await;
        result
    }

    /// Stands by until this relay holds the slot's lease; false if asked to stop first.
    async fn await_leadership(
        &mut self,
        coordinator: &mut Coordinator,
        backoff: &mut backon::ExponentialBackoff,
    ) -> Result<bool, RelayError> {
        let slot = self.config.source.replication.slot.clone();
        let mut assignment = coordinator.assignment();
        let mut announced = false;
        while assignment.borrow_and_update().held.is_empty() {
            if !announced {
                info!(slot = %slot, relay_id = %self.identity.relay_id, "another relay holds the replication slot's lease; standing by");
                self.health.set_role("standby");
                announced = true;
            }
            *backoff = reconnect_backoff();
            self.health.beat();
            tokio::select! {
                _ = self.shutdown.wait() => return Ok(false),
                changed = assignment.changed() => if changed.is_err() {
                    return Err(coordinator.failed().await.into());
                },
                error = coordinator.failed() => return Err(error.into()),
                _ = sleep(Duration::from_secs(2)) => {}
            }
        }
        info!(slot = %slot, relay_id = %self.identity.relay_id, "holding the replication slot's lease: this relay streams");
        Ok(true)
    }

    /// The leader's part: recover a lost slot, take the slot over from a
    /// deposed leader's connection, stream.
    async fn lead(
        &mut self,
        control: &postgres::Connection,
        coordinator: &mut Coordinator,
        backoff: &mut backon::ExponentialBackoff,
    ) -> Result<SessionEnd, RelayError> {
        let config = self.config.clone();
        let r = &config.source.replication;
        match replication::slot_state(&control.client, &r.slot).await? {
            SlotState::Ready { .. } => {}
            state @ (SlotState::Missing | SlotState::Lost) => {
                let what =
                    if state == SlotState::Lost { "was invalidated (its WAL is gone)" } else { "does not exist" };
                return self.recover_slot(control, coordinator, backoff, what, false).await;
            }
        }

        // Same URL, password file and TLS settings as every other connection.
        let prepared = postgres::prepare(&config.postgres)?;
        let params = ConnectParams::from_config(&prepared.config, &format!("outbox-relay {}", postgres::relay_id()))
            .map_err(|e| RelayError::Config(e.to_string()))?
            .with_tls(WireTls { settings: prepared.tls, config: prepared.rustls });
        let fence = coordinator.fence();
        // The marker's connection opens while the slot is taken: one round of
        // connection set-up less before the first event.
        let marker_connection = replication::marks_rows(&config).then(|| {
            let postgres = config.postgres.clone();
            tokio::spawn(async move { postgres::connect(&postgres, "outbox-relay marker").await })
        });
        // Exactly once: fence the previous leader's producer, skip what the broker holds.
        self.reconcile_slot().await?;
        let stream = self.take_slot(control, &params, &fence).await?;
        // Checked after START_REPLICATION: before it, another session could still move the slot.
        let confirmed: String = control
            .client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&r.slot])
            .await
            .map_err(|e| PostgresError::query("reading the slot position", &e))?
            .get(0);
        let confirmed = parse_lsn(&confirmed).unwrap_or(0);
        let marker = match marker_connection {
            None => None,
            Some(connecting) => {
                let connection = connecting
                    .await
                    .map_err(|panicked| RelayError::Stream(format!("opening the marker's connection: {panicked}")))??;
                Some(Marker::start(connection, self.table.clone(), config.source.max_in_flight_batches))
            }
        };
        info!(slot = %r.slot, resume_from = %format_lsn(confirmed), "streaming from the replication slot");
        self.health.set_role("leader");
        self.metrics.leader.set(1);
        *backoff = reconnect_backoff();

        let policy_blocks = config.failures.policy == FailurePolicy::Block;
        let super::Stage { batches: batch_tx, outcomes: mut outcome_rx, task: stage } =
            self.start_stage(policy_blocks.then(Blocked::halting), fence.clone());
        let streaming = Streaming { stream, confirmed, marker };
        let result = self.stream_loop(control, streaming, batch_tx, &mut outcome_rx, coordinator).await;
        let mut beat = interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                outcome = outcome_rx.recv() => if outcome.is_none() { break },
                _ = beat.tick() => self.health.beat(),
            }
        }
        let _ = stage.await;
        self.metrics.events_in_flight.set(0);
        match result {
            Err(RelayError::Publication(cause)) => {
                if let Err(missing) = replication::validate(&control.client, &config).await? {
                    return Err(RelayError::Prerequisite(missing.0));
                }
                // The publication exists now, but the slot decodes from a position
                // older than it: the slot can never see it.
                let what = format!(
                    "cannot decode with publication {} ({cause}): it was dropped and created again after the slot's position",
                    r.publication
                );
                self.recover_slot(control, coordinator, backoff, &what, true).await
            }
            result => result,
        }
    }

    /// A slot that is missing, lost, or stale: with rows to mark, recreate
    /// it and drain every unpublished row by polling before streaming again,
    /// so nothing is lost; with published.mode = "none" the slot was the only
    /// record of what was published, so stop with the fix.
    async fn recover_slot(
        &mut self,
        control: &postgres::Connection,
        coordinator: &mut Coordinator,
        backoff: &mut backon::ExponentialBackoff,
        what: &str,
        drop_first: bool,
    ) -> Result<SessionEnd, RelayError> {
        let slot = self.config.source.replication.slot.clone();
        if self.config.published.mode == PublishedMode::None {
            let drop =
                if drop_first { format!("SELECT pg_drop_replication_slot('{slot}'); then ") } else { String::new() };
            return Err(RelayError::Prerequisite(format!(
                "replication slot {slot} {what}; with published.mode = \"none\" the slot was the only record of what was published, \
                 so the relay stops rather than skip events: {drop}recreate it with `outbox-relay migrate`, re-publish the gap with \
                 `outbox-relay replay` or by polling, or run with published.mode = \"mark\" so the relay can recover by itself"
            )));
        }
        error!(
            slot = %slot,
            "replication slot {what}: recreating it, then draining every unpublished row by polling before streaming, so nothing is lost"
        );
        if drop_first {
            replication::drop_slot(&control.client, &slot).await?;
        }
        replication::create_slot(&control.client, &slot).await?;
        match self.poll_session(backoff, Some(coordinator)).await? {
            SessionEnd::Stopped => return Ok(SessionEnd::Stopped),
            SessionEnd::CaughtUp => info!("recovery drain finished; streaming from the new slot"),
        }
        Ok(SessionEnd::CaughtUp)
    }

    /// Streams from the slot until the session ends (see the module docs).
    async fn stream_loop(
        &mut self,
        control: &postgres::Connection,
        streaming: Streaming,
        batches: mpsc::Sender<ClaimedBatch>,
        outcomes: &mut mpsc::Receiver<BatchOutcome>,
        coordinator: &mut Coordinator,
    ) -> Result<SessionEnd, RelayError> {
        let Streaming { mut stream, confirmed, mut marker } = streaming;
        let fence = coordinator.fence();
        let config = self.config.clone();
        let r = &config.source.replication;
        let mut decoder = EventDecoder::new(&config).map_err(RelayError::Config)?;
        let max_in_flight = config.source.max_in_flight_batches;
        let batch_size = config.source.batch_size;
        let rules = Rules::new(Capture::Replication, &config.failures);
        let mut status = interval(r.status_interval);
        status.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lag = interval(LAG_EVERY);
        lag.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeat =
            interval(if r.heartbeat_interval.is_zero() { Duration::from_secs(3600) } else { r.heartbeat_interval });
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // Nothing committed before the slot's position is streamed again.
        self.ledger.confirmed(confirmed);
        let mut progress = LsnProgress::new(confirmed);
        let mut out = Outbound { batches, next_sequence: 0, pending: VecDeque::new() };
        let mut building = Building::default();
        let mut in_transaction = false;
        let mut txn = 0u64;
        // The transaction being read (pgoutput's 32-bit id).
        let mut xid = 0u32;
        let mut commit_time = chrono::Utc::now();
        let mut last_keepalive = 0u64;
        let mut drain_deadline: Option<Instant> = None;
        let mut shutdown = self.shutdown.clone();
        // One future for the whole loop: built anew on every pass it cost
        // ~1,000 instructions per event (a pass per Begin, Insert, Commit).
        let shutdown_requested = shutdown.wait();
        tokio::pin!(shutdown_requested);
        // Last confirmed LSN sent to the server, and when.
        let mut reported = confirmed;
        let mut last_report = Instant::now();
        // Set when the session must end (a halt, a restart): nothing more is
        // read; what is in flight settles, the safe prefix is confirmed, then
        // the session returns this error.
        let mut ending: Option<RelayError> = None;
        // A batch holding an event that failed in an earlier session: it
        // travels alone and nothing is read until the broker answered it,
        // so a failure the broker reports only after sending cannot be
        // overtaken again.
        let mut probe: Option<u64> = None;

        loop {
            self.health.beat();
            if !fence.holds() {
                return Err(lease_lapsed());
            }
            let stopping = drain_deadline.is_some();
            let settled = out.pending.is_empty() && progress.is_idle();
            if settled && (stopping || ending.is_some()) {
                if fence.holds() {
                    let _ = stream.send_status(progress.confirmed(), false).await;
                }
                self.ledger.confirmed(progress.confirmed());
                if let Some(error) = ending {
                    return Err(error);
                }
                let _ = stream.finish().await;
                info!(confirmed = %format_lsn(progress.confirmed()), "replication stopped");
                return Ok(SessionEnd::Stopped);
            }
            if settled && building.batch.is_empty() && !in_transaction && ending.is_none() {
                // Nothing read is unsettled: everything the server sent up to its last keepalive is done.
                progress.caught_up(last_keepalive);
            }
            if progress.confirmed() > reported && last_report.elapsed() >= PROMPT_STATUS_EVERY {
                // Tell the server soon after progress, not only on the status timer: a relay
                // killed between timer ticks would otherwise re-stream everything since the last one.
                confirm(&mut stream, &fence, progress.confirmed()).await?;
                reported = progress.confirmed();
                last_report = Instant::now();
                self.ledger.confirmed(reported);
                // Work settled again: whatever needed an operator is fixed.
                self.health.set_needs_operator(None);
                if reported > self.blocked_behind_lsn && self.metrics.blocked_aggregates.get() > 0 {
                    info!("the stream moved past the event it was blocked on");
                    self.metrics.blocked_aggregates.set(0);
                    self.health.set_blocked(None);
                }
            }
            // With every batch in flight, reading goes on into the next batch
            // until it is full: under load batches grow instead of being sent
            // at each linger tick and then waiting, a few dozen events each.
            let room = |out: &Outbound, building: &Building| {
                out.pending.len() < max_in_flight || building.batch.len() < batch_size
            };
            let can_read = !stopping && ending.is_none() && probe.is_none() && room(&out, &building);
            tokio::select! {
                biased;
                _ = &mut shutdown_requested, if !stopping => {
                    drain_deadline = Some(Instant::now() + config.shutdown.drain_timeout);
                    if !building.batch.is_empty() && ending.is_none() {
                        self.flush(&mut building, &mut out, &mut progress).await?;
                    }
                    info!(in_flight = out.pending.len(), "draining in-flight events");
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if stopping => {
                    warn!("drain timeout passed; unconfirmed events will be streamed again by the next relay");
                    if fence.holds() { let _ = stream.send_status(progress.confirmed(), false).await; }
                    return Ok(SessionEnd::Stopped);
                }
                outcome = outcomes.recv() => {
                    let outcome = outcome.ok_or(RelayError::StageStopped)?;
                    let batch = out.pending.pop_front().ok_or(RelayError::StageStopped)?;
                    debug_assert_eq!(batch.sequence, outcome.sequence);
                    if probe == Some(batch.sequence) {
                        probe = None;
                    }
                    let (job, end, holds_back) = self.settle(control, rules, batch, &outcome).await?;
                    let end = end.or_else(|| holds_back.then(|| RelayError::Stream(
                        "events were held back behind an event that failed; restarting from the slot".into(),
                    )));
                    if let Some(error) = end {
                        // Nothing from this batch on may be confirmed: it holds an
                        // event that is not published.
                        progress.stop_before(job.sequence);
                        if let RelayError::Blocked(why) = &error {
                            self.health.set_blocked(Some(why.clone()));
                            self.metrics.blocked_aggregates.set(1);
                            self.blocked_behind_lsn = self.blocked_behind_lsn.max(progress.confirmed());
                        }
                        error!(%error, in_flight = out.pending.len(), "the stream stops here; settling what is in flight first");
                        ending.get_or_insert(error);
                    }
                    match &marker {
                        // No rows to stamp: the acknowledgement alone settles the batch.
                        None => progress.settle(job.sequence),
                        Some(marker) => marker.jobs.send(job).await.map_err(|_| RelayError::Stream("the marker stopped".into()))?,
                    }
                }
                marked = async { match marker.as_mut() { Some(m) => m.done.recv().await, None => std::future::pending().await } }, if !progress.is_idle() => {
                    let sequences = marked.ok_or_else(|| RelayError::Stream("marking published rows failed (see the log)".into()))?;
                    for sequence in sequences {
                        progress.settle(sequence);
                    }
                }
                _ = status.tick() => confirm(&mut stream, &fence, progress.confirmed()).await?,
                // Wakes the loop to send the prompt status update above.
                _ = sleep_until(last_report + PROMPT_STATUS_EVERY), if progress.confirmed() > reported => {}
                _ = lag.tick() => self.measure_lag(control, &r.slot).await,
                error = coordinator.failed() => return Err(error.into()),
                _ = heartbeat.tick(), if !r.heartbeat_interval.is_zero() => {
                    if let Err(e) = control.client.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&HEARTBEAT_PREFIX]).await {
                        debug!(error = %postgres::describe(&e), "heartbeat message failed");
                    }
                }
                data = stream.reader.next_copy_data(), if can_read => {
                    let Some(mut data) = data.map_err(|e| self.stream_failed(e))? else {
                        return Err(RelayError::Stream("the server ended the replication stream".into()));
                    };
                    // Frames already buffered are handled in this pass: one trip
                    // through the select! per socket read, not per frame.
                    loop {
                        match WalMessage::parse(data).map_err(|e| RelayError::Stream(e.to_string()))? {
                            WalMessage::Keepalive { wal_end, reply } => {
                                last_keepalive = last_keepalive.max(wal_end);
                                if out.pending.is_empty() && progress.is_idle() && building.batch.is_empty() && !in_transaction && ending.is_none() {
                                    // Streaming with nothing owed: whatever needed an operator is
                                    // fixed, even when no WAL flows to confirm (an idle database).
                                    self.health.set_needs_operator(None);
                                }
                                if reply {
                                    confirm(&mut stream, &fence, progress.confirmed()).await?;
                                }
                            }
                            WalMessage::XLogData { data, .. } => {
                                let mut alone = false;
                                match Logical::parse(data).map_err(|e| RelayError::Stream(e.to_string()))? {
                                    Logical::Begin { final_lsn, commit_time: time, xid: begun } => {
                                        in_transaction = true;
                                        txn = final_lsn;
                                        xid = begun;
                                        commit_time = pg_time(time);
                                    }
                                    Logical::Commit { end_lsn, .. } => {
                                        in_transaction = false;
                                        if building.batch.is_empty() {
                                            progress.commit(end_lsn);
                                        } else {
                                            building.commit_lsn = Some(end_lsn);
                                        }
                                    }
                                    Logical::Relation { oid, namespace, name, columns } => decoder.relation(oid, &namespace, &name, &columns),
                                    Logical::Insert { oid, values } => {
                                        let decoded = decoder.insert(oid, &values, commit_time);
                                        alone = self.push_change(&mut building, decoded, txn, true, &mut out, &mut progress).await?;
                                        building.row_of(xid);
                                    }
                                    Logical::Message { prefix, content, lsn, transactional } => {
                                        let time = if transactional { commit_time } else { chrono::Utc::now() };
                                        let decoded = decoder.message(&prefix, &content, lsn, time);
                                        let at = if transactional { txn } else { lsn };
                                        alone = self.push_change(&mut building, decoded, at, false, &mut out, &mut progress).await?;
                                    }
                                    Logical::Origin | Logical::Type | Logical::OtherChange => {}
                                }
                                if alone || (building.batch.len() >= batch_size && out.pending.len() < max_in_flight) {
                                    self.flush(&mut building, &mut out, &mut progress).await?;
                                    if alone {
                                        probe = out.pending.back().map(|b| b.sequence);
                                        debug!("an event that failed before travels alone; reading waits for the broker's answer");
                                    }
                                }
                            }
                        }
                        // The same rule as `can_read`, re-judged after this frame.
                        if !(probe.is_none() && ending.is_none() && fence.holds() && room(&out, &building)) {
                            break;
                        }
                        match stream.reader.buffered_copy_data().map_err(|e| self.stream_failed(e))? {
                            Some(next) => data = next,
                            None => break,
                        }
                    }
                }
                // After the data branch (biased): a batch is sent when the socket has
                // nothing more to give right now, or when it is full.
                _ = sleep_until(building.send_by.unwrap_or_else(Instant::now)), if building.send_by.is_some() && out.pending.len() < max_in_flight && ending.is_none() => {
                    self.flush(&mut building, &mut out, &mut progress).await?;
                }
            }
        }
    }

    /// Adds one decoded change to the building batch. An event that failed
    /// in an earlier session starts a batch of its own (returns true: send it
    /// now and read nothing more until it is answered).
    async fn push_change(
        &self,
        building: &mut Building,
        decoded: Decoded,
        txn: u64,
        row: bool,
        out: &mut Outbound,
        progress: &mut LsnProgress,
    ) -> Result<bool, RelayError> {
        let position = match &decoded {
            Decoded::Event { event, .. } => event.position,
            Decoded::Rejected { rejected, .. } => rejected.position,
            Decoded::Ignored => return Ok(false),
        };
        let failed_before = self.ledger.failures(&EventKey { position, txn, message: !row }) > 0;
        if failed_before && !building.batch.is_empty() {
            self.flush(building, out, progress).await?;
        }
        building.push(decoded, txn, &self.ledger);
        Ok(failed_before)
    }

    /// Hands the building batch to the publish stage.
    async fn flush(
        &self,
        building: &mut Building,
        out: &mut Outbound,
        progress: &mut LsnProgress,
    ) -> Result<(), RelayError> {
        let mut done = std::mem::take(building);
        done.batch.sequence = out.next_sequence;
        out.next_sequence += 1;
        BatchSent { events: done.batch.len() }.emit(&self.metrics);
        progress.open(done.batch.sequence, done.commit_lsn);
        let mut rows = done.rows;
        rows.sort_unstable();
        rows.dedup();
        out.pending.push_back(PendingBatch {
            sequence: done.batch.sequence,
            rows,
            keys: index_keys(done.keys),
            final_lsn: done.final_lsn,
            xids: done.xids,
        });
        out.batches.send(done.batch).await.map_err(|_| RelayError::StageStopped)
    }

    /// Settles one answered batch as the settlement core plans it: the mark
    /// job (delivered rows, failures to record, dead-lettered rows) and, when
    /// the stream must stop at this batch, why.
    async fn settle(
        &mut self,
        control: &postgres::Connection,
        rules: Rules,
        batch: PendingBatch,
        outcome: &BatchOutcome,
    ) -> Result<(MarkJob, Option<RelayError>, bool), RelayError> {
        self.metrics.events_in_flight.sub((outcome.delivered.len() + outcome.failed.len() + outcome.held.len()) as i64);
        let key_of = |position: i64| match batch.keys.binary_search_by_key(&position, |(p, _)| *p) {
            Ok(at) => batch.keys[at].1,
            Err(_) => None,
        };
        let plan = settle::plan(rules, outcome, &mut self.ledger, key_of, |_| 0, batch.final_lsn);
        if matches!(plan.end, Some(End::Fenced)) {
            return Err(lease_lapsed());
        }
        if !plan.mark.is_empty() {
            self.metrics.last_publish_timestamp.set(chrono::Utc::now().timestamp());
        }
        for failure in &outcome.failed {
            EventFailed { kind: failure.kind }.emit(&self.metrics);
        }
        let rows = SortedPositions(&batch.rows);
        let mut job = MarkJob { sequence: batch.sequence, xids: batch.xids, ..MarkJob::default() };
        if !rows.is_empty() {
            job.rows = plan.mark.iter().copied().filter(|p| rows.contains(p)).collect();
        }
        let unread: Vec<i64> = plan
            .dead_letter
            .iter()
            .filter(|f| f.letter.is_none() && rows.contains(&f.row.position))
            .map(|f| f.row.position)
            .collect();
        let read = self.table.read_failed_rows(&control.client, &unread).await?;
        let results = self.dead_letter(&plan.dead_letter, |p| read.get(&p).map(|(raw, _)| raw.clone())).await;
        let mut end = None;
        for (failure, result) in plan.dead_letter.iter().zip(results) {
            let is_row = rows.contains(&failure.row.position);
            match result {
                Ok(()) => {
                    if let Some(key) = key_of(failure.row.position) {
                        self.ledger.settled(&key);
                    }
                    if is_row {
                        job.failed.push(failure.row.clone());
                        job.dead_lettered.push(failure.row.position);
                    }
                }
                Err(reason) => {
                    end.get_or_insert(RelayError::Stream(format!(
                        "event {} could not be dead-lettered ({reason}); restarting from the slot so it is not lost",
                        describe_position(failure.row.position, is_row)
                    )));
                }
            }
        }
        // Record why the stream stops on the row, so `status` shows it failing.
        job.failed.extend(plan.to_record().filter(|f| rows.contains(&f.row.position)).map(|f| f.row.clone()));
        match plan.end {
            Some(End::Halt(failure)) => {
                let is_row = rows.contains(&failure.row.position);
                end = Some(RelayError::Blocked(blocked_message(
                    if is_row { "outbox row" } else { "logical message at LSN" },
                    &describe_position(failure.row.position, is_row),
                    failure.aggregate_id(),
                    &failure.row.reason,
                    &self.config.failures.dead_letter_topic,
                )));
            }
            Some(End::Restart(failure)) => {
                end.get_or_insert(RelayError::Stream(format!(
                    "event {} was not acknowledged ({}); restarting from the slot so nothing is skipped",
                    describe_position(failure.row.position, rows.contains(&failure.row.position)),
                    failure.row.reason
                )));
            }
            Some(End::Fenced) | None => {}
        }
        Ok((job, end, plan.holds_back))
    }

    /// The error a failed stream read ends the session with; a publication
    /// the slot cannot see (dropped, or recreated after the slot's position)
    /// is named as such.
    fn stream_failed(&self, error: WireError) -> RelayError {
        if error.code() == Some(UNDEFINED_OBJECT) && error.to_string().contains("publication") {
            return RelayError::Publication(error.to_string());
        }
        stream_error(error)
    }

    /// Starts streaming the slot. A deposed leader's walsender may still hold
    /// it (a frozen process keeps its socket open): it is terminated, which
    /// also fences that leader off the slot for good.
    async fn take_slot(
        &self,
        control: &postgres::Connection,
        params: &ConnectParams,
        fence: &Fence,
    ) -> Result<ReplicationStream, RelayError> {
        let slot = &self.config.source.replication.slot;
        let command = replication::start_command(&self.config.source.replication);
        let deadline = Instant::now() + TAKE_SLOT_FOR;
        loop {
            if !fence.holds() {
                return Err(lease_lapsed());
            }
            let terminated = control
                .client
                .query(
                    "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()",
                    &[slot],
                )
                .await;
            match terminated {
                Ok(rows) => {
                    for row in rows {
                        let pid: Option<i32> = row.try_get(0).unwrap_or(None);
                        warn!(slot = %slot, pid, "the slot was still streamed by a previous leader's connection; terminated it");
                    }
                }
                Err(e) => warn!(
                    slot = %slot,
                    error = %postgres::describe(&e),
                    "cannot terminate the previous leader's replication connection: grant the relay role pg_signal_backend, \
                     or wait for wal_sender_timeout to close it"
                ),
            }
            let connection = ReplicationConnection::connect(params).await.map_err(stream_error)?;
            match connection.start_replication(&command).await {
                Ok(stream) => return Ok(stream),
                Err(error) if error.code() == Some(OBJECT_IN_USE) && Instant::now() < deadline => {
                    debug!(slot = %slot, "slot still in use; retrying");
                    sleep(Duration::from_millis(200)).await;
                }
                Err(error) if error.code() == Some(OBJECT_IN_USE) => {
                    return Err(RelayError::Stream(format!(
                        "replication slot {slot} is still in use by another connection after {TAKE_SLOT_FOR:?} although this relay \
                         holds its lease: another program streams it, or the relay role may not terminate it (grant pg_signal_backend)"
                    )));
                }
                Err(error) => return Err(stream_error(error)),
            }
        }
    }

    async fn measure_lag(&self, control: &postgres::Connection, slot: &str) {
        match control
            .client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(Some(row)) => {
                let lag: Option<i64> = row.get(0);
                self.metrics.replication_slot_lag.set(lag.unwrap_or(0));
                debug!(slot, lag_bytes = lag.unwrap_or(0), "replication slot lag");
            }
            Ok(None) => warn!(slot, "replication slot disappeared while streaming"),
            Err(e) => debug!(error = %postgres::describe(&e), "slot lag query failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_indexed_by_position_and_shared_positions_are_never_remembered() {
        let row = |position, txn| (position, EventKey { position, txn, message: false });
        let message = |position, txn| (position, EventKey { position, txn, message: true });
        let index = index_keys(vec![row(7, 10), row(3, 10), message(5, 20), row(5, 20), row(9, 20)]);
        assert_eq!(index.iter().map(|(p, _)| *p).collect::<Vec<_>>(), vec![3, 5, 7, 9]);
        assert_eq!(index[0].1, Some(EventKey { position: 3, txn: 10, message: false }));
        assert_eq!(index[1].1, None, "a row and a message at one position");
        assert_eq!(index[3].1, Some(EventKey { position: 9, txn: 20, message: false }));
        assert!(SortedPositions(&[1, 4, 9]).contains(&4));
        assert!(!SortedPositions(&[1, 4, 9]).contains(&5));
    }
}
