//! The relay: sessions of capture → publish → checkpoint, reconnecting
//! with backoff when Postgres goes away. `poll` and `replication` hold the
//! two capture modes' session loops; both feed the same publish stage.
//!
//! # Error handling
//! A lost connection or failed statement ends the session: the publish
//! stage finishes what it had enqueued (those acks are discarded, the rows
//! stay unmarked), then a new session reconnects after an exponential
//! backoff with jitter. Shutdown stops claiming and waits up to
//! `shutdown.drain_timeout` for in-flight events to be acknowledged and marked.
//!
//! # Several relays
//! Every session runs under leases ([`crate::coordination`]): polling
//! sessions claim only the lanes they hold, replication sessions stream only
//! while they hold the slot's lease. A session whose lease lapsed ends
//! without publishing or confirming anything more, and the relay rejoins.

mod exactly_once;
mod poll;
mod replication;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::time::sleep;
use tracing::Instrument;

use crate::config::{Config, PublishedMode, SourceMode};
use crate::coordination::{CoordinationError, Identity, Resource};
use crate::envelope::{EnvelopeMapper, TopicTemplate};
use crate::event::RawRow;
use crate::failure::{self, DeadLetter, FailedRow};
use crate::health::Health;
use crate::holdback::Blocked;
use crate::internal_events::{DeadLetterRefused, EventDeadLettered, InternalEvent, SessionFailed};
use crate::metrics::Metrics;
use crate::outbox::OutboxTable;
use crate::postgres::PostgresError;
use crate::retention;
use crate::settle::Ledger;
use crate::shutdown::Shutdown;
use crate::sink::Sink;
use crate::source::table;

/// Errors that end a relay session (the relay itself reconnects).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres failed; reconnecting may help.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The sink configuration cannot work (bad template).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The publish stage ended unexpectedly.
    #[error("the publish stage stopped unexpectedly")]
    StageStopped,
    /// A prerequisite is missing (wal_level, privilege, publication, slot).
    #[error("{0}")]
    Prerequisite(String),
    /// The replication stream failed; reconnecting may help.
    #[error("replication stream: {0}")]
    Stream(String),
    /// The broker client failed in a way only a new session can fix (a
    /// Kafka producer's fatal error); the rows stay unpublished.
    #[error("{0}")]
    Broker(String),
    /// An event cannot be published and `failures.policy = "block"` keeps
    /// everything behind it waiting; the session retries from the same place.
    #[error("{0}")]
    Blocked(String),
    /// The slot cannot decode with its publication: it was dropped, or
    /// dropped and created again after the slot's position.
    #[error("{0}")]
    Publication(String),
    /// This relay's lease ran out (or could not be kept): it stops
    /// publishing and rejoins; another relay may have taken over.
    #[error("{0}")]
    Lease(String),
}

impl RelayError {
    /// Whether only an operator can end this failure: a bad configuration,
    /// a missing prerequisite or publication, an event that cannot be
    /// published under `block`, or Postgres refusing with a SQLSTATE that
    /// retrying cannot change (a privilege, a table, a password). Everything
    /// else passes on its own: a restart, a lost connection, a lease.
    pub fn needs_operator(&self) -> bool {
        match self {
            RelayError::Postgres(error) => error.needs_operator(),
            RelayError::Config(_)
            | RelayError::Prerequisite(_)
            | RelayError::Publication(_)
            | RelayError::Blocked(_) => true,
            RelayError::StageStopped | RelayError::Stream(_) | RelayError::Broker(_) | RelayError::Lease(_) => false,
        }
    }
}

impl From<CoordinationError> for RelayError {
    fn from(error: CoordinationError) -> Self {
        match error {
            CoordinationError::Postgres(e) => RelayError::Postgres(e),
            CoordinationError::LeaseLost(_) => RelayError::Lease(error.to_string()),
        }
    }
}

/// Relays one outbox to one sink until shutdown.
pub struct Relay<S: Sink> {
    config: Config,
    /// The outbox table and every statement on it, built once.
    table: OutboxTable,
    sink: Arc<S>,
    mapper: EnvelopeMapper,
    metrics: Metrics,
    health: Health,
    shutdown: Shutdown,
    /// This process in the lease table.
    identity: Identity,
    /// What the broker acknowledged and what failed, across this process's
    /// sessions (see [`crate::settle`]).
    ledger: Ledger,
    /// Polling, `failures.policy = "block"`: aggregates held back behind a
    /// failed event, kept across sessions so a restart cannot let their
    /// later events overtake it.
    blocked: Blocked,
    /// Replication with `failures.policy = "block"`: the highest commit LSN
    /// settled before the stream stopped at an event it cannot publish; the
    /// blocked gauge clears once a later one settles.
    blocked_behind_lsn: u64,
}

/// Why a session ended without error.
enum SessionEnd {
    /// Shutdown was requested and the drain finished.
    Stopped,
    /// A recovery drain found nothing left to publish.
    CaughtUp,
}

impl<S: Sink> Relay<S> {
    /// A relay over `sink`; validates the topic template.
    pub fn new(
        config: Config,
        sink: Arc<S>,
        metrics: Metrics,
        health: Health,
        shutdown: Shutdown,
    ) -> Result<Self, RelayError> {
        let template =
            TopicTemplate::parse(&config.sink.topic).map_err(|p| RelayError::Config(format!("sink.topic {p}")))?;
        let mapper =
            EnvelopeMapper::with_columns(template, &config.envelope, &config.source.table, &config.source.columns)
                .map_err(|e| RelayError::Config(e.to_string()))?;
        let identity = Identity::new(config.replicas.resolved_relay_id());
        let table = OutboxTable::from_config(&config).map_err(RelayError::Config)?;
        let mut ledger = Ledger::default();
        if let Some(committed) = sink.exactly_once(&metrics) {
            ledger.track(committed);
        }
        Ok(Relay {
            config,
            table,
            sink,
            mapper,
            metrics,
            health,
            shutdown,
            identity,
            ledger,
            blocked: Blocked::default(),
            blocked_behind_lsn: 0,
        })
    }

    /// What this relay coordinates on: the outbox table's lanes, or the slot.
    async fn resource(&self, client: &tokio_postgres::Client) -> Result<Resource, RelayError> {
        Ok(match self.config.source.mode {
            SourceMode::Poll => {
                Resource::lanes_of(table::resolve(client, self.table.name()).await?, self.config.replicas.lanes)
            }
            SourceMode::Replication => Resource::slot(&self.config.source.replication.slot),
        })
    }

    /// Start-up cannot take work yet (the broker is unreachable): show this
    /// relay in `status` as running and waiting, for `expires_after`.
    /// Without the lease tables (not migrated yet) it stays invisible.
    pub async fn announce_waiting(
        &self,
        client: &tokio_postgres::Client,
        expires_after: Duration,
    ) -> Result<(), RelayError> {
        let resource = self.resource(client).await?;
        Ok(crate::coordination::announce_waiting(client, &resource, &self.identity, expires_after).await?)
    }

    /// Start-up stopped waiting: the relay now joins as a member.
    pub async fn stop_waiting(&self, client: &tokio_postgres::Client) -> Result<(), RelayError> {
        let resource = self.resource(client).await?;
        Ok(crate::coordination::stop_waiting(client, &resource, &self.identity).await?)
    }

    /// Runs sessions until shutdown; errors are logged and retried.
    pub async fn run(mut self) -> Result<(), RelayError> {
        let mut backoff = reconnect_backoff();
        // One cleaner per outbox, whatever the capture mode: it runs on every
        // relay but deletes only while holding the table's retention lock.
        let retention = (self.config.published.mode == PublishedMode::Mark
            && !self.config.published.retention.is_zero())
        .then(|| {
            tokio::spawn(
                retention::run(self.config.clone(), self.table.clone(), self.shutdown.clone()).in_current_span(),
            )
        });
        let result = self.sessions(&mut backoff).await;
        if let Some(task) = retention {
            task.abort();
        }
        result
    }

    async fn sessions(&mut self, backoff: &mut backon::ExponentialBackoff) -> Result<(), RelayError> {
        loop {
            if self.shutdown.is_triggered() {
                return Ok(());
            }
            self.sink.recover().await;
            let result = match self.config.source.mode {
                SourceMode::Poll => self.poll_session(backoff, None).await,
                SourceMode::Replication => self.replication_session(backoff).await,
            };
            self.health.set_postgres(false);
            self.health.set_role("starting");
            self.metrics.leader.set(0);
            self.metrics.lanes_owned.set(0);
            match result {
                Ok(SessionEnd::Stopped) => return Ok(()),
                Ok(SessionEnd::CaughtUp) => continue,
                Err(RelayError::Config(message)) => {
                    self.health.fail(message.clone());
                    return Err(RelayError::Config(message));
                }
                Err(error) => {
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    let needs_operator = error.needs_operator();
                    SessionFailed { error: &error, needs_operator, retry_in: delay }.emit(&self.metrics);
                    if needs_operator {
                        self.health.set_needs_operator(Some(error.to_string()));
                    }
                    self.health.beat();
                    tokio::select! {
                        _ = self.shutdown.wait() => return Ok(()),
                        _ = sleep(delay) => {}
                    }
                }
            }
        }
    }
}

/// A running publish stage: where batches go, where outcomes come back.
struct Stage {
    batches: tokio::sync::mpsc::Sender<crate::source::ClaimedBatch>,
    outcomes: tokio::sync::mpsc::Receiver<crate::pipeline::BatchOutcome>,
    task: tokio::task::JoinHandle<()>,
}

impl<S: Sink> Relay<S> {
    /// Starts a session's publish stage, bounded by `source.max_in_flight_batches`,
    /// sending only while `fence` holds.
    fn start_stage(&self, blocked: Option<crate::holdback::Blocked>, fence: crate::coordination::Fence) -> Stage {
        use tracing::Instrument;
        let max_in_flight = self.config.source.max_in_flight_batches;
        let (batches, batch_rx) = tokio::sync::mpsc::channel(max_in_flight);
        let (outcome_tx, outcomes) = tokio::sync::mpsc::channel(max_in_flight + 1);
        let setup = crate::pipeline::StageSetup {
            sink: self.sink.clone(),
            mapper: self.mapper.clone(),
            metrics: self.metrics.clone(),
            max_in_flight,
            blocked,
            fence,
        };
        let task = tokio::spawn(crate::pipeline::publish_stage(setup, batch_rx, outcome_tx).in_current_span());
        Stage { batches, outcomes, task }
    }
}

impl<S: Sink> Relay<S> {
    /// Publishes dead letters for `failures` and waits for the dead-letter
    /// topic's answers, one per failure in order (Err: why it was refused).
    /// A letter carries the event as the publish stage had it, else the row
    /// `read_back` finds, else what the failure itself knows.
    async fn dead_letter(
        &self,
        failures: &[FailedRow],
        read_back: impl Fn(i64) -> Option<RawRow>,
    ) -> Vec<Result<(), String>> {
        if failures.is_empty() {
            return Vec::new();
        }
        let topic = &self.config.failures.dead_letter_topic;
        let letters: Vec<DeadLetter> = failures
            .iter()
            .map(|f| match (&f.letter, read_back(f.row.position)) {
                (Some(letter), _) => (**letter).clone(),
                (None, Some(raw)) => DeadLetter::from_row(&raw, &f.row.reason),
                (None, None) => DeadLetter {
                    aggregate_id: f.row.aggregate_id.clone(),
                    payload: f.row.original.clone(),
                    ..DeadLetter::bare(f.row.position, &f.row.reason)
                },
            })
            .collect();
        let results =
            failure::publish(self.sink.as_ref(), &self.config.failures, &self.config.source.table, &letters).await;
        letters
            .iter()
            .zip(results)
            .map(|(letter, result)| match result {
                Ok(()) => {
                    EventDeadLettered { letter, topic }.emit(&self.metrics);
                    Ok(())
                }
                Err(error) => {
                    DeadLetterRefused { letter, topic, error: &error.reason }.emit(&self.metrics);
                    Err(format!("{} (dead-lettering failed: {})", letter.error, error.reason))
                }
            })
            .collect()
    }
}

/// The session's lease lapsed before a batch was sent.
fn lease_lapsed_before_send() -> RelayError {
    RelayError::Lease(
        "this relay's lease lapsed before a batch was sent (frozen, overloaded or cut off from Postgres); \
         nothing more is published and the relay rejoins"
            .into(),
    )
}

/// Exponential backoff with jitter, 0.5 s to 30 s, never giving up: what
/// every reconnect loop uses.
pub fn reconnect_backoff() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}
