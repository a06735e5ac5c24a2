//! Polling sessions.
//!
//! # Progress tracking
//! A session claims batches in position order and keeps at most
//! `max_in_flight_batches` of them unacknowledged. Outcomes return in claim
//! order; delivered rows are marked (or deleted) on the connection that
//! claims. Only rows of the lanes this relay holds are claimed (see
//! [`crate::coordination`]); the claimed set changes only when nothing is in
//! flight, so a lane is handed back with all its events acknowledged and
//! marked. Failed rows are recorded and parked for a retry
//! with their aggregate blocked behind them (`failures.policy = "block"`,
//! see [`crate::holdback`]), or published to the dead-letter topic.
//! Nothing is marked before the broker acknowledged it, so a crash at any
//! point re-publishes at most the in-flight window and never loses an event.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use super::{reconnect_backoff, Relay, RelayError, SessionEnd};
use crate::config::FailurePolicy;
use crate::coordination::{Assignment, Coordinator, Resource};
use crate::event::Rejected;
use crate::failure::FailureKind;
use crate::holdback::Blocked;
use crate::internal_events::{BatchSent, EventFailed, EventRetried, InternalEvent};
use crate::pipeline::BatchOutcome;
use crate::postgres::{self, PostgresError};
use crate::settle::{self, Capture, End, EventKey, Rules};
use crate::sink::Sink;
use crate::source::poll::{Claim, ClaimFilter, InFlightWindow, Parked, PollSource};
use crate::source::table;

/// One claimed batch the broker has not answered yet.
#[derive(Debug, Clone, Copy)]
struct ClaimedRange {
    /// The batch's sequence number in this session.
    sequence: u64,
    /// Its lowest and highest outbox positions.
    first_position: i64,
    last_position: i64,
    /// Events in it.
    rows: usize,
}

/// Batches claimed and not yet acknowledged, oldest first.
#[derive(Debug, Default)]
struct InFlight {
    batches: VecDeque<ClaimedRange>,
    rows: usize,
}

impl InFlight {
    fn push(&mut self, batch: ClaimedRange) {
        self.rows += batch.rows;
        self.batches.push_back(batch);
    }

    fn complete(&mut self, sequence: u64) {
        if let Some(oldest) = self.batches.pop_front() {
            debug_assert_eq!(oldest.sequence, sequence, "outcomes arrive in claim order");
            self.rows -= oldest.rows;
        }
    }

    fn top(&self) -> Option<i64> {
        self.batches.back().map(|b| b.last_position)
    }

    fn bottom(&self) -> Option<i64> {
        self.batches.front().map(|b| b.first_position)
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

/// The claim loop's ends of its publish stage: batches go out on one,
/// outcomes come back on the other. Dropping `batches` ends the stage.
struct StageLink<'a> {
    batches: mpsc::Sender<crate::source::ClaimedBatch>,
    outcomes: &'a mut mpsc::Receiver<BatchOutcome>,
}

/// The lanes a claim loop claims from.
#[derive(Debug, Default)]
struct Lanes {
    claiming: Vec<i32>,
    /// Every lane of the layout: claims skip the per-row lane test.
    all: bool,
}

impl Lanes {
    /// Takes on `assignment` at a quiet point; logs what changed.
    fn adopt(&mut self, assignment: &Assignment, relay_id: &str, drain: bool) {
        let claiming = assignment.claimable();
        if claiming != self.claiming && !drain {
            match claiming.is_empty() {
                true => info!(relay_id, "holding no lanes: standing by"),
                false => {
                    info!(relay_id, lanes = ?claiming, count = claiming.len(), of = assignment.lanes, "claiming lanes")
                }
            }
        }
        self.all = claiming.len() == assignment.lanes as usize;
        self.claiming = claiming;
    }
}

impl<S: Sink> Relay<S> {
    /// One polling session: connect, join the relays on this outbox
    /// (leases on a fair share of its lanes), then claim → publish →
    /// checkpoint until shutdown or an error. With `leader` (the replication
    /// leader's slot lease), claims every row and returns once nothing is
    /// left unpublished (the replication mode's recovery drain).
    pub(super) async fn poll_session(
        &mut self,
        backoff: &mut backon::ExponentialBackoff,
        leader: Option<&mut Coordinator>,
    ) -> Result<SessionEnd, RelayError> {
        let connection = postgres::connect(&self.config.postgres, "outbox-relay").await?;
        let until_caught_up = leader.is_some();
        let mut own = None;
        let coordinator = match leader {
            Some(leader) => leader,
            None => {
                let name = table::resolve(&connection.client, self.table.name()).await?;
                let resource = Resource::lanes_of(name, self.config.replicas.lanes);
                own.insert(Coordinator::start(&self.config, resource, self.identity.clone()).await?)
            }
        };
        if !until_caught_up {
            if let Some(problem) = crate::outbox::position_column_problem(&connection.client, &self.table).await? {
                return Err(RelayError::Prerequisite(problem));
            }
        }
        let scope = coordinator.claim_scope();
        let mut source = PollSource::prepare(connection, &self.config.source, &self.table, &scope).await?;
        self.health.set_postgres(true);
        info!(table = %self.config.source.table, relay_id = %self.identity.relay_id, lanes = scope.lanes, "joined the relays on this outbox");
        *backoff = reconnect_backoff();

        // Blocked aggregates outlive the session: a session that restarts
        // still holds their later events back behind the failed one.
        let blocked = self.blocked.clone();
        let policy_blocks = self.config.failures.policy == FailurePolicy::Block;
        let super::Stage { batches: batch_tx, outcomes: mut outcome_rx, task: stage } =
            self.start_stage(policy_blocks.then(|| blocked.clone()), coordinator.fence());

        let link = StageLink { batches: batch_tx, outcomes: &mut outcome_rx };
        let result = self.claim_loop(&mut source, coordinator, link, until_caught_up, &blocked).await;

        // Whatever is still enqueued finishes first, so the next session
        // cannot overtake it. Its acknowledgements are remembered (the rows
        // stay unmarked and are claimed again, then marked without being
        // published again).
        let mut unmarked = 0usize;
        let mut beat = interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                outcome = outcome_rx.recv() => match outcome {
                    Some(outcome) => {
                        unmarked += outcome.delivered.len();
                        for &position in &outcome.delivered {
                            self.ledger.acknowledged(EventKey::row(position), 0);
                        }
                    }
                    None => break,
                },
                _ = beat.tick() => self.health.beat(),
            }
        }
        let _ = stage.await;
        if unmarked > 0 {
            warn!(
                events = unmarked,
                "acknowledged events left unmarked; the next session marks them without publishing them again"
            );
        }
        // Nothing of this session is in flight any more: its lanes can go to
        // another relay at once (the rows left unmarked are claimed again).
        if let Some(own) = own {
            own.leave().await;
        }
        self.metrics.events_in_flight.set(0);
        result
    }

    async fn claim_loop(
        &mut self,
        source: &mut PollSource,
        coordinator: &mut Coordinator,
        link: StageLink<'_>,
        until_caught_up: bool,
        blocked: &Blocked,
    ) -> Result<SessionEnd, RelayError> {
        let StageLink { batches, outcomes } = link;
        let max_in_flight = self.config.source.max_in_flight_batches;
        let batch_size = self.config.source.batch_size;
        let notify = source.notifications();
        let mut poll = interval(self.config.source.poll_interval);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut in_flight = InFlight::default();
        let mut parked = Parked::default();
        let mut resync = false;
        let mut want_claim = true;
        let mut drain_deadline: Option<Instant> = None;
        let mut shutdown = self.shutdown.clone();
        let mut review = interval(self.config.source.retry_failed_after);
        review.set_missed_tick_behavior(MissedTickBehavior::Delay);
        // The lanes claimed from; they change only at a quiet point (nothing
        // in flight), so a lane is handed back with nothing of it unacknowledged.
        let mut assignment = coordinator.assignment();
        let fence = coordinator.fence();
        let mut lanes = Lanes::default();
        let mut reassign = true;
        let mut reconciled = super::exactly_once::Reconciled::default();

        loop {
            self.health.beat();
            let stopping = drain_deadline.is_some();
            if stopping && in_flight.is_empty() {
                return Ok(SessionEnd::Stopped);
            }
            if source.is_closed() {
                return Err(PostgresError::Query("the outbox connection closed".into()).into());
            }
            if reassign && in_flight.is_empty() && !stopping {
                let current = assignment.borrow_and_update().clone();
                // Exactly once: before claiming for lanes it holds now, fence and read back.
                self.reconcile_lanes(source, &current, &mut reconciled, until_caught_up).await?;
                lanes.adopt(&current, &self.identity.relay_id, until_caught_up);
                coordinator.adopt(current.version, &lanes.claiming);
                self.metrics.lanes_owned.set(if until_caught_up { 0 } else { lanes.claiming.len() as i64 });
                self.metrics.leader.set(i64::from(!lanes.claiming.is_empty()));
                self.health.set_role(if lanes.claiming.is_empty() { "standby" } else { "leader" });
                reassign = false;
                // Claim the new set from its oldest unpublished row.
                resync = true;
                want_claim = true;
            }
            let can_claim = !stopping
                && !reassign
                && !lanes.claiming.is_empty()
                && in_flight.len() < max_in_flight
                && (!resync || in_flight.is_empty());
            if can_claim && want_claim && !fence.holds() {
                // The lease lapsed without being lost (a slow renewal): claim
                // nothing until it is renewed; the coordinator ends the session if it is lost.
                want_claim = false;
            }
            if can_claim && want_claim {
                let top = if resync { None } else { in_flight.top() };
                let claim_started = std::time::Instant::now();
                let window = InFlightWindow { top, rows: in_flight.rows, bottom: in_flight.bottom() };
                let parked_now = parked.current();
                let filter = ClaimFilter { parked: &parked_now, blocked, lanes: &lanes.claiming, all_lanes: lanes.all };
                let claim = source.claim(window, filter).await?;
                tracing::trace!(took_us = claim_started.elapsed().as_micros() as u64, "claim");
                match claim {
                    Claim::Resync => {
                        debug!("rows appeared behind the in-flight window; draining before claiming from the start");
                        resync = true;
                    }
                    Claim::Batch(mut batch) => {
                        resync = false;
                        if self.ledger.unsettled() > 0 {
                            batch.set_aside(|event| self.ledger.was_acknowledged(&EventKey::row(event.position)));
                        }
                        if until_caught_up && batch.is_empty() && in_flight.is_empty() {
                            return Ok(SessionEnd::CaughtUp);
                        }
                        want_claim = batch.len() >= batch_size;
                        if batch.is_empty() && in_flight.is_empty() && self.ledger.unsettled() == 0 {
                            // Caught up with nothing owed: whatever needed an operator is fixed.
                            self.health.set_needs_operator(None);
                        }
                        if !batch.is_empty() {
                            BatchSent { events: batch.len() }.emit(&self.metrics);
                            let first = batch.first_position().unwrap_or(batch.last_position);
                            in_flight.push(ClaimedRange {
                                sequence: batch.sequence,
                                first_position: first,
                                last_position: batch.last_position,
                                rows: batch.len(),
                            });
                            batches.send(batch).await.map_err(|_| RelayError::StageStopped)?;
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                biased;
                _ = shutdown.wait(), if !stopping => {
                    drain_deadline = Some(Instant::now() + self.config.shutdown.drain_timeout);
                    info!(in_flight = in_flight.rows, "draining in-flight events");
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(Instant::now)), if stopping => {
                    warn!(in_flight = in_flight.rows, "drain timeout passed; unacknowledged events stay unmarked and will be published again");
                    return Ok(SessionEnd::Stopped);
                }
                outcome = outcomes.recv() => {
                    let outcome = outcome.ok_or(RelayError::StageStopped)?;
                    let apply_started = std::time::Instant::now();
                    self.apply(source, &outcome, &mut parked, blocked).await?;
                    tracing::trace!(rows = outcome.delivered.len(), took_us = apply_started.elapsed().as_micros() as u64, "checkpoint");
                    in_flight.complete(outcome.sequence);
                    if (resync || until_caught_up) && in_flight.is_empty() {
                        want_claim = true;
                    }
                }
                changed = assignment.changed(), if !reassign => match changed {
                    Ok(()) => reassign = true,
                    // The coordinator stopped: its error says why.
                    Err(_) => return Err(coordinator.failed().await.into()),
                },
                error = coordinator.failed() => return Err(error.into()),
                _ = notify.notified(), if !stopping => want_claim = true,
                _ = poll.tick(), if !stopping => want_claim = true,
                _ = review.tick(), if !stopping && !blocked.is_empty() => {
                    self.release_resolved(source, blocked).await?;
                    want_claim = true;
                }
            }
        }
    }

    /// Checkpoints one outcome as the settlement core plans it: mark
    /// delivered rows, dead-letter, record and park failed ones, or end the session.
    async fn apply(
        &mut self,
        source: &PollSource,
        outcome: &BatchOutcome,
        parked: &mut Parked,
        blocked: &Blocked,
    ) -> Result<(), RelayError> {
        let rules = Rules::new(Capture::Poll, &self.config.failures);
        // The table's own attempts count (and the rows, for dead letters).
        let stored = if rules.policy == FailurePolicy::DeadLetter && !outcome.failed.is_empty() {
            let positions: Vec<i64> = outcome.failed.iter().map(|f| f.row.position).collect();
            source.failed_rows(&positions).await?
        } else {
            Default::default()
        };
        let stored_attempts =
            |p: i64| stored.get(&p).and_then(|(_, a)| *a).map_or(0, |a| a.clamp(0, i64::from(u32::MAX)) as u32);
        let plan = settle::plan(rules, outcome, &mut self.ledger, |p| Some(EventKey::row(p)), stored_attempts, 0);
        if matches!(plan.end, Some(End::Fenced)) {
            return Err(super::lease_lapsed_before_send());
        }
        // The ledger remembers these until the mark succeeds: a failing
        // mark restarts the session, which marks them again without publishing.
        source.checkpoint(&plan.mark).await?;
        self.ledger.marked(&plan.mark);
        self.metrics.events_in_flight.sub((outcome.delivered.len() + outcome.failed.len() + outcome.held.len()) as i64);
        if !plan.mark.is_empty() {
            self.health.set_needs_operator(None);
            self.metrics.last_publish_timestamp.set(chrono::Utc::now().timestamp());
            if blocked.release(&plan.mark) > 0 {
                info!(blocked = blocked.len(), "a failed event was published; its aggregate's held-back events follow");
            }
        }
        if !outcome.held.is_empty() {
            debug!(events = outcome.held.len(), "events held back behind a failed event of their aggregate");
        }
        for failure in &outcome.failed {
            EventFailed { kind: failure.kind }.emit(&self.metrics);
        }
        let letters = self.dead_letter(&plan.dead_letter, |p| stored.get(&p).map(|(raw, _)| raw.clone())).await;
        let mut recorded: Vec<Rejected> = Vec::new();
        let mut dead: Vec<i64> = Vec::new();
        let mut retry: Vec<Rejected> = plan.to_record().map(|f| f.row.clone()).collect();
        for (failure, result) in plan.dead_letter.iter().zip(letters) {
            match result {
                Ok(()) => {
                    parked.forget(failure.row.position);
                    self.ledger.settled(&EventKey::row(failure.row.position));
                    recorded.push(failure.row.clone());
                    dead.push(failure.row.position);
                }
                Err(reason) => retry.push(Rejected { reason, ..failure.row.clone() }),
            }
        }
        let retry_after = self.config.source.retry_failed_after;
        for row in &retry {
            let aggregate_id = row.aggregate_id.as_deref().or_else(|| {
                outcome.failed.iter().find(|f| f.row.position == row.position).and_then(|f| f.aggregate_id())
            });
            EventRetried {
                position: row.position,
                holds_back: aggregate_id.filter(|_| rules.policy == FailurePolicy::Block),
                reason: &row.reason,
                retry_in: retry_after,
            }
            .emit(&self.metrics);
            parked.park(row.position, retry_after);
        }
        recorded.extend(retry);
        source.record_failures(&recorded).await?;
        source.mark_dead_lettered(&dead).await?;
        self.metrics.blocked_aggregates.set(blocked.len() as i64);
        match plan.end {
            Some(End::Restart(row)) if row.kind == FailureKind::TooManyBlocked => Err(RelayError::Blocked(row.row.reason)),
            Some(End::Restart(row)) | Some(End::Halt(row)) => Err(RelayError::Broker(format!(
                "event at position {} was not acknowledged ({}); restarting the session so nothing is skipped or reordered",
                row.row.position, row.row.reason
            ))),
            Some(End::Fenced) | None => Ok(()),
        }
    }

    /// Releases blocked aggregates whose failed row is no longer waiting
    /// (fixed and published by hand, deleted, or dead-lettered elsewhere).
    async fn release_resolved(&self, source: &PollSource, blocked: &Blocked) -> Result<(), RelayError> {
        let (_, behind) = blocked.snapshot();
        if behind.is_empty() {
            return Ok(());
        }
        let pending: std::collections::HashSet<i64> = source.still_pending(&behind).await?.into_iter().collect();
        let gone: Vec<i64> = behind.into_iter().filter(|p| !pending.contains(p)).collect();
        if blocked.release(&gone) > 0 {
            info!(positions = ?gone, "failed rows are no longer waiting; their aggregates flow again");
        }
        self.metrics.blocked_aggregates.set(blocked.len() as i64);
        Ok(())
    }
}
