//! Replication sessions: validate prerequisites, recover a lost slot, then
//! stream pgoutput from the slot into the publish stage and confirm LSNs
//! only behind fully acknowledged (and marked) transactions.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{interval, sleep, sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use super::{reconnect_backoff, Relay, RelayError, SessionEnd};
use crate::coordination::{Coordinator, Fence, Resource};
use crate::blocking::Blocked;
use crate::config::{FailurePolicy, PublishedMode};
use crate::failure::{self as dead_letter, DeadLetter, FailedRow, FailureKind};
use crate::event::Rejected;
use crate::pipeline::BatchOutcome;
use crate::postgres::{self, PostgresError};
use crate::sink::Sink;
use crate::outbox::OutboxTable;
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

/// A batch handed to the publish stage, with what confirming it means.
struct PendingBatch {
    sequence: u64,
    /// End LSN of the last transaction this batch completes, if any.
    commit_lsn: Option<u64>,
    /// Outbox row positions in the batch (to mark or delete).
    rows: Vec<i64>,
}

/// Events read from the stream and not yet handed to the stage.
#[derive(Default)]
struct Building {
    batch: ClaimedBatch,
    rows: Vec<i64>,
    /// End LSN of the last transaction completed inside this batch.
    commit_lsn: Option<u64>,
    /// When the batch must be sent even if not full.
    send_by: Option<Instant>,
}

impl Building {
    fn push(&mut self, decoded: Decoded) {
        if !matches!(decoded, Decoded::Ignored) && self.send_by.is_none() {
            self.send_by = Some(Instant::now() + LINGER);
        }
        match decoded {
            Decoded::Event { event, row } => {
                if row {
                    self.rows.push(event.position);
                }
                self.batch.last_position = event.position;
                self.batch.events.push(*event);
            }
            Decoded::Rejected { rejected, row } => {
                if row {
                    self.rows.push(rejected.position);
                }
                self.batch.rejected.push(rejected);
            }
            Decoded::Ignored => {}
        }
    }
}

/// What one acknowledged batch leaves to do in the database.
#[derive(Debug, Default)]
struct MarkJob {
    /// Delivered outbox rows to stamp or delete.
    rows: Vec<i64>,
    /// Rows that cannot be published, to record.
    failed: Vec<Rejected>,
    /// Rows whose event went to the dead-letter topic, to stamp as done.
    dead_lettered: Vec<i64>,
    /// LSN that may be confirmed once this job is done.
    commit_lsn: Option<u64>,
}

/// Marks rows off the streaming loop, coalescing queued jobs into one
/// statement, and reports back (jobs done, highest LSN now safe).
struct Marker {
    jobs: mpsc::Sender<MarkJob>,
    done: mpsc::Receiver<(usize, Option<u64>)>,
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
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while let Ok(job) = incoming.try_recv() {
                    batch.push(job);
                }
                let rows: Vec<i64> = batch.iter().flat_map(|j| j.rows.iter().copied()).collect();
                let failed: Vec<&Rejected> = batch.iter().flat_map(|j| j.failed.iter()).collect();
                let lsn = batch.iter().filter_map(|j| j.commit_lsn).max();
                if !rows.is_empty() {
                    if let Err(e) = connection.client.execute(queries.checkpoint_sql(), &[&rows]).await {
                        error!(error = %postgres::describe(&e), "marking published rows failed");
                        return;
                    }
                }
                if let (Some(sql), false) = (queries.record_failures_sql(), failed.is_empty()) {
                    let positions: Vec<i64> = failed.iter().map(|f| f.position).collect();
                    let reasons: Vec<&str> = failed.iter().map(|f| f.reason.as_str()).collect();
                    if let Err(e) = connection.client.execute(sql, &[&positions, &reasons]).await {
                        error!(error = %postgres::describe(&e), "recording failed rows failed");
                        return;
                    }
                }
                let dead: Vec<i64> = batch.iter().flat_map(|j| j.dead_lettered.iter().copied()).collect();
                if !dead.is_empty() {
                    if let Err(e) = connection.client.execute(queries.dead_lettered_sql(), &[&dead]).await {
                        error!(error = %postgres::describe(&e), "stamping dead-lettered rows failed");
                        return;
                    }
                }
                if done_tx.send((batch.len(), lsn)).await.is_err() {
                    return;
                }
            }
        });
        Marker { jobs, done, task }
    }
}

/// What the operator reads when replication stops at an event it cannot publish.
fn blocked_message(what: &str, position: &str, aggregate_id: Option<&str>, reason: &str, dead_letter_topic: &str) -> String {
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

fn stream_error(error: WireError) -> RelayError {
    RelayError::Stream(error.to_string())
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
    pub(super) async fn replication_session(&mut self, backoff: &mut backon::ExponentialBackoff) -> Result<SessionEnd, RelayError> {
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
    async fn await_leadership(&mut self, coordinator: &mut Coordinator, backoff: &mut backon::ExponentialBackoff) -> Result<bool, RelayError> {
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
                let what = if state == SlotState::Lost { "was invalidated (its WAL is gone)" } else { "does not exist" };
                if config.published.mode == PublishedMode::None {
                    return Err(RelayError::Prerequisite(format!(
                        "replication slot {} {what}; with published.mode = \"none\" the slot was the only record of what was published, \
                         so the relay stops rather than skip events: recreate it with `outbox-relay migrate`, re-publish the gap with \
                         `outbox-relay replay` or by polling, or run with published.mode = \"mark\" so the relay can recover by itself",
                        r.slot
                    )));
                }
                error!(
                    slot = %r.slot,
                    "replication slot {what}: recreating it, then draining every unpublished row by polling before streaming, so nothing is lost"
                );
                replication::create_slot(&control.client, &r.slot).await?;
                match self.poll_session(backoff, Some(coordinator)).await? {
                    SessionEnd::Stopped => return Ok(SessionEnd::Stopped),
                    SessionEnd::CaughtUp => info!("recovery drain finished; streaming from the new slot"),
                }
                return Ok(SessionEnd::CaughtUp);
            }
        }

        // Same URL, password file and TLS settings as every other connection.
        let prepared = postgres::prepare(&config.postgres)?;
        let params = ConnectParams::from_config(&prepared.config, &format!("outbox-relay {}", postgres::relay_id()))
            .map_err(|e| RelayError::Config(e.to_string()))?
            .with_tls(WireTls { settings: prepared.tls, config: prepared.rustls });
        let fence = coordinator.fence();
        let stream = self.take_slot(control, &params, &fence).await?;
        // Checked after START_REPLICATION: before it, another session could still move the slot.
        let confirmed: String = control
            .client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&r.slot])
            .await
            .map_err(|e| PostgresError::query("reading the slot position", &e))?
            .get(0);
        let confirmed = parse_lsn(&confirmed).unwrap_or(0);
        info!(slot = %r.slot, resume_from = %format_lsn(confirmed), "streaming from the replication slot");
        self.health.set_role("leader");
        self.metrics.leader.set(1);
        *backoff = reconnect_backoff();

        let policy_blocks = config.failures.policy == FailurePolicy::Block;
        let super::Stage { batches: batch_tx, outcomes: mut outcome_rx, task: stage } =
            self.start_stage(policy_blocks.then(Blocked::halting), fence.clone());
        let result = self.stream_loop(control, stream, confirmed, batch_tx, &mut outcome_rx, coordinator).await;
        let mut beat = interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                outcome = outcome_rx.recv() => if outcome.is_none() { break },
                _ = beat.tick() => self.health.beat(),
            }
        }
        let _ = stage.await;
        self.metrics.events_in_flight.set(0);
        result
    }

    async fn stream_loop(
        &mut self,
        control: &postgres::Connection,
        mut stream: ReplicationStream,
        mut confirmed: u64,
        batches: mpsc::Sender<ClaimedBatch>,
        outcomes: &mut mpsc::Receiver<BatchOutcome>,
        coordinator: &mut Coordinator,
    ) -> Result<SessionEnd, RelayError> {
        let fence = coordinator.fence();
        let config = self.config.clone();
        let r = &config.source.replication;
        let queries = self.table.clone();
        let mut decoder = EventDecoder::new(&config).map_err(RelayError::Config)?;
        let max_in_flight = config.source.max_in_flight_batches;
        let batch_size = config.source.batch_size;
        let mut status = interval(r.status_interval);
        status.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut lag = interval(LAG_EVERY);
        lag.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut heartbeat = interval(if r.heartbeat_interval.is_zero() { Duration::from_secs(3600) } else { r.heartbeat_interval });
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut pending: VecDeque<PendingBatch> = VecDeque::new();
        let mut building = Building::default();
        let mut next_sequence = 0u64;
        let mut in_transaction = false;
        let mut commit_time = chrono::Utc::now();
        let mut last_keepalive = 0u64;
        let mut drain_deadline: Option<Instant> = None;
        let mut shutdown = self.shutdown.clone();
        let mut marker = if replication::marks_rows(&config) {
            let connection = postgres::connect(&config.postgres, "outbox-relay marker").await?;
            Some(Marker::start(connection, queries.clone(), max_in_flight))
        } else {
            None
        };
        let mut marking = 0usize;
        // Last confirmed LSN sent to the server, and when.
        let mut reported = confirmed;
        let mut last_report = Instant::now();
        // Highest commit LSN whose batch settled: where a block is recorded.
        let mut settled_lsn = confirmed;
        // Set when the stream reached an event that cannot be published
        // under failures.policy = "block": nothing after it is read.
        let mut halt: Option<String> = None;

        loop {
            self.health.beat();
            if !fence.holds() {
                return Err(lease_lapsed());
            }
            let stopping = drain_deadline.is_some();
            if stopping && pending.is_empty() && marking == 0 {
                if fence.holds() { let _ = stream.send_status(confirmed, false).await; }
                let _ = stream.finish().await;
                info!(confirmed = %format_lsn(confirmed), "replication stopped");
                return Ok(SessionEnd::Stopped);
            }
            if let (Some(stop), true) = (&halt, pending.is_empty() && marking == 0) {
                // Everything before the event that cannot be published is settled: confirm it, then stop.
                if fence.holds() { let _ = stream.send_status(confirmed, false).await; }
                self.metrics.blocked_aggregates.set(1);
                self.blocked_behind_lsn = self.blocked_behind_lsn.max(settled_lsn);
                return Err(RelayError::Blocked(stop.clone()));
            }
            let idle = pending.is_empty() && marking == 0 && building.batch.is_empty() && !in_transaction;
            if idle && last_keepalive > confirmed {
                // Nothing read is unacknowledged: everything the server sent up to its last keepalive is done.
                confirmed = last_keepalive;
            }
            if confirmed > reported && last_report.elapsed() >= PROMPT_STATUS_EVERY {
                // Tell the server soon after progress, not only on the status timer: a relay
                // killed between timer ticks would otherwise re-stream everything since the last one.
                confirm(&mut stream, &fence, confirmed).await?;
                reported = confirmed;
                last_report = Instant::now();
            }
            let can_read = !stopping && halt.is_none() && pending.len() < max_in_flight;
            tokio::select! {
                biased;
                _ = shutdown.wait(), if !stopping => {
                    drain_deadline = Some(Instant::now() + config.shutdown.drain_timeout);
                    if !building.batch.is_empty() {
                        self.flush(&mut building, &mut next_sequence, &mut pending, &batches).await?;
                    }
                    info!(in_flight = pending.len(), "draining in-flight events");
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if stopping => {
                    warn!("drain timeout passed; unconfirmed events will be streamed again by the next relay");
                    if fence.holds() { let _ = stream.send_status(confirmed, false).await; }
                    return Ok(SessionEnd::Stopped);
                }
                outcome = outcomes.recv() => {
                    let outcome = outcome.ok_or(RelayError::StageStopped)?;
                    if outcome.fenced {
                        return Err(lease_lapsed());
                    }
                    let batch = pending.pop_front().ok_or(RelayError::StageStopped)?;
                    let commit_lsn = batch.commit_lsn;
                    let job = match self.settle(control, batch, &outcome).await {
                        Ok(job) => job,
                        Err(error @ RelayError::Blocked(_)) => {
                            self.metrics.blocked_aggregates.set(1);
                            self.blocked_behind_lsn = self.blocked_behind_lsn.max(settled_lsn);
                            return Err(error);
                        }
                        Err(error) => return Err(error),
                    };
                    if let Some(lsn) = commit_lsn {
                        settled_lsn = settled_lsn.max(lsn);
                        if lsn > self.blocked_behind_lsn && self.metrics.blocked_aggregates.get() > 0 {
                            info!("the stream moved past the event it was blocked on");
                            self.metrics.blocked_aggregates.set(0);
                        }
                    }
                    match &marker {
                        // No rows to stamp: the acknowledgement alone completes the batch.
                        None => {
                            if let Some(lsn) = job.commit_lsn {
                                confirmed = confirmed.max(lsn);
                            }
                        }
                        Some(marker) => {
                            marking += 1;
                            marker.jobs.send(job).await.map_err(|_| RelayError::Stream("the marker stopped".into()))?;
                        }
                    }
                }
                marked = async { match marker.as_mut() { Some(m) => m.done.recv().await, None => std::future::pending().await } }, if marking > 0 => {
                    let (jobs, lsn) = marked.ok_or_else(|| RelayError::Stream("marking published rows failed (see the log)".into()))?;
                    marking -= jobs;
                    if let Some(lsn) = lsn {
                        confirmed = confirmed.max(lsn);
                    }
                }
                _ = status.tick() => confirm(&mut stream, &fence, confirmed).await?,
                // Wakes the loop to send the prompt status update above.
                _ = sleep_until(last_report + PROMPT_STATUS_EVERY), if confirmed > reported => {}
                _ = lag.tick() => self.measure_lag(control, &r.slot).await,
                error = coordinator.failed() => return Err(error.into()),
                _ = heartbeat.tick(), if !r.heartbeat_interval.is_zero() => {
                    if let Err(e) = control.client.execute("SELECT pg_logical_emit_message(false, $1, '')", &[&HEARTBEAT_PREFIX]).await {
                        debug!(error = %postgres::describe(&e), "heartbeat message failed");
                    }
                }
                data = stream.reader.next_copy_data(), if can_read => {
                    let Some(data) = data.map_err(stream_error)? else {
                        return Err(RelayError::Stream("the server ended the replication stream".into()));
                    };
                    match WalMessage::parse(data).map_err(|e| RelayError::Stream(e.to_string()))? {
                        WalMessage::Keepalive { wal_end, reply } => {
                            last_keepalive = last_keepalive.max(wal_end);
                            if reply {
                                confirm(&mut stream, &fence, confirmed).await?;
                            }
                        }
                        WalMessage::XLogData { data, .. } => {
                            match Logical::parse(data).map_err(|e| RelayError::Stream(e.to_string()))? {
                                Logical::Begin { commit_time: time, .. } => {
                                    in_transaction = true;
                                    commit_time = pg_time(time);
                                }
                                Logical::Commit { end_lsn, .. } => {
                                    in_transaction = false;
                                    if !building.batch.is_empty() {
                                        building.commit_lsn = Some(end_lsn);
                                    } else if let Some(last) = pending.back_mut() {
                                        last.commit_lsn = Some(last.commit_lsn.unwrap_or(0).max(end_lsn));
                                    } else {
                                        confirmed = confirmed.max(end_lsn);
                                    }
                                }
                                Logical::Relation { oid, namespace, name, columns } => decoder.relation(oid, &namespace, &name, &columns),
                                Logical::Insert { oid, values } => {
                                    let decoded = decoder.insert(oid, &values, commit_time);
                                    if let Some(stop) = self.halt_on(&decoded, true) {
                                        halt = Some(stop);
                                    } else {
                                        building.push(decoded);
                                    }
                                }
                                Logical::Message { prefix, content, lsn, transactional } => {
                                    let time = if transactional { commit_time } else { chrono::Utc::now() };
                                    let decoded = decoder.message(&prefix, &content, lsn, time);
                                    if let Some(stop) = self.halt_on(&decoded, false) {
                                        halt = Some(stop);
                                    } else {
                                        building.push(decoded);
                                    }
                                }
                                Logical::Origin | Logical::Type | Logical::OtherChange => {}
                            }
                            if (halt.is_some() && !building.batch.is_empty()) || building.batch.len() >= batch_size {
                                self.flush(&mut building, &mut next_sequence, &mut pending, &batches).await?;
                            }
                        }
                    }
                }
                // After the data branch (biased): a batch is sent when the socket has
                // nothing more to give right now, or when it is full.
                _ = sleep_until(building.send_by.unwrap_or_else(Instant::now)), if building.send_by.is_some() && pending.len() < max_in_flight => {
                    self.flush(&mut building, &mut next_sequence, &mut pending, &batches).await?;
                }
            }
        }
    }

    /// Hands the building batch to the publish stage.
    async fn flush(
        &self,
        building: &mut Building,
        next_sequence: &mut u64,
        pending: &mut VecDeque<PendingBatch>,
        batches: &mpsc::Sender<ClaimedBatch>,
    ) -> Result<(), RelayError> {
        let mut done = std::mem::take(building);
        done.batch.sequence = *next_sequence;
        *next_sequence += 1;
        self.metrics.batches.inc();
        self.metrics.batch_size.observe(done.batch.len() as f64);
        self.metrics.events_in_flight.add(done.batch.len() as i64);
        pending.push_back(PendingBatch { sequence: done.batch.sequence, commit_lsn: done.commit_lsn, rows: done.rows });
        batches.send(done.batch).await.map_err(|_| RelayError::StageStopped)
    }

    /// Turns one acknowledged batch into a mark job (rows to stamp, rows
    /// that failed, the LSN it completes). Transient failures end the
    /// session; events that cannot be published stop the stream
    /// (`failures.policy = "block"`) or go to the dead-letter topic first.
    async fn settle(&self, control: &postgres::Connection, batch: PendingBatch, outcome: &BatchOutcome) -> Result<MarkJob, RelayError> {
        debug_assert_eq!(batch.sequence, outcome.sequence);
        self.metrics
            .events_in_flight
            .sub((outcome.delivered.len() + outcome.failed.len() + outcome.held.len()) as i64);
        if !outcome.delivered.is_empty() {
            self.metrics.last_publish_timestamp.set(chrono::Utc::now().timestamp());
        }
        if let Some(transient) = outcome.failed.iter().find(|f| f.kind == FailureKind::BrokerTransient) {
            return Err(RelayError::Stream(format!(
                "event at position {} was not acknowledged ({}); restarting from the slot so nothing is skipped",
                transient.row.position, transient.row.reason
            )));
        }
        let rows: HashSet<i64> = batch.rows.iter().copied().collect();
        let mut job = MarkJob { commit_lsn: batch.commit_lsn, ..MarkJob::default() };
        if !rows.is_empty() {
            job.rows = outcome.delivered.iter().copied().filter(|p| rows.contains(p)).collect();
        }
        if outcome.failed.is_empty() {
            return Ok(job);
        }
        for failure in &outcome.failed {
            self.metrics.publish_failures.with_label_values(&[failure.kind.label()]).inc();
        }
        if self.config.failures.policy == FailurePolicy::Block {
            let failure = &outcome.failed[0];
            let what = if rows.contains(&failure.row.position) { "outbox row" } else { "logical message at LSN" };
            let position = if rows.contains(&failure.row.position) {
                failure.row.position.to_string()
            } else {
                format_lsn(failure.row.position as u64)
            };
            return Err(RelayError::Blocked(blocked_message(
                what,
                &position,
                failure.aggregate_id(),
                &failure.row.reason,
                &self.config.failures.dead_letter_topic,
            )));
        }
        let letters = self.dead_letters(control, &rows, &outcome.failed).await?;
        let results = dead_letter::publish(self.sink.as_ref(), &self.config.failures, &self.config.source.table, &letters).await;
        for (letter, result) in letters.iter().zip(results) {
            if let Err(error) = result {
                return Err(RelayError::Stream(format!(
                    "publishing event {} to the dead-letter topic {} failed ({}); restarting from the slot so it is not lost",
                    letter.position, self.config.failures.dead_letter_topic, error.reason
                )));
            }
            self.metrics.dead_lettered.inc();
            let is_row = rows.contains(&letter.position);
            error!(
                position = letter.position,
                aggregate_id = letter.aggregate_id.as_deref().unwrap_or(""),
                reason = %letter.error,
                source = if is_row { "outbox row" } else { "logical message (position is its LSN)" },
                topic = %self.config.failures.dead_letter_topic,
                "event dead-lettered: published to the dead-letter topic; the stream moves on"
            );
            if is_row {
                job.failed.push(Rejected::new(letter.position, letter.error.clone()));
                job.dead_lettered.push(letter.position);
            }
        }
        Ok(job)
    }

    /// Under `failures.policy = "block"`, the message that stops the stream
    /// at a rejected event (`row`: an outbox row, else a logical message).
    fn halt_on(&self, decoded: &Decoded, row: bool) -> Option<String> {
        let Decoded::Rejected { rejected, .. } = decoded else { return None };
        if self.config.failures.policy != FailurePolicy::Block {
            return None;
        }
        self.metrics.publish_failures.with_label_values(&[FailureKind::Envelope.label()]).inc();
        let position = if row { rejected.position.to_string() } else { format_lsn(rejected.position as u64) };
        Some(blocked_message(
            if row { "outbox row" } else { "logical message at LSN" },
            &position,
            rejected.aggregate_id.as_deref(),
            &rejected.reason,
            &self.config.failures.dead_letter_topic,
        ))
    }

    /// The dead letters for `failed`: the event as the publish stage had it,
    /// else the row read back from the table, else what the stream carried.
    async fn dead_letters(
        &self,
        control: &postgres::Connection,
        rows: &HashSet<i64>,
        failed: &[FailedRow],
    ) -> Result<Vec<DeadLetter>, RelayError> {
        let unread: Vec<i64> =
            failed.iter().filter(|f| f.letter.is_none() && rows.contains(&f.row.position)).map(|f| f.row.position).collect();
        let read = if unread.is_empty() {
            Default::default()
        } else {
            self.table.read_failed_rows(&control.client, &unread).await?
        };
        Ok(failed
            .iter()
            .map(|f| match (&f.letter, read.get(&f.row.position)) {
                (Some(letter), _) => (**letter).clone(),
                (None, Some((raw, _))) => DeadLetter::from_row(raw, &f.row.reason),
                (None, None) => DeadLetter {
                    aggregate_id: f.row.aggregate_id.clone(),
                    payload: f.row.original.clone(),
                    ..DeadLetter::bare(f.row.position, &f.row.reason)
                },
            })
            .collect())
    }

    /// Starts streaming the slot. A deposed leader's walsender may still hold
    /// it (a frozen process keeps its socket open): it is terminated, which
    /// also fences that leader off the slot for good.
    async fn take_slot(&self, control: &postgres::Connection, params: &ConnectParams, fence: &Fence) -> Result<ReplicationStream, RelayError> {
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
