//! The publish stage: envelope mapping, sink enqueue, and acknowledgements
//! returned in claim order.
//!
//! ```text
//!   source ──ClaimedBatch──▶ publish stage ──enqueue──▶ sink (broker)
//!     ▲                          │ (FuturesOrdered: acks in claim order)
//!     └──────BatchOutcome────────┘
//!   checkpoint: mark/delete delivered rows, record failed ones
//! ```
//!
//! Both channels are bounded by `max_in_flight_batches`, so a slow broker
//! stops the source from claiming instead of growing memory.

use std::sync::Arc;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;

use crate::coordination::Fence;
use crate::envelope::EnvelopeMapper;
use crate::event::Rejected;
use crate::failure::{DeadLetter, FailedRow, FailureKind};
use crate::holdback::Blocked;
use crate::metrics::Metrics;
use crate::settle::EventKey;
use crate::sink::Sink;
use crate::source::ClaimedBatch;

/// What happened to every row of one claimed batch.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// The batch's sequence number.
    pub sequence: u64,
    /// Positions the broker acknowledged: safe to mark.
    pub delivered: Vec<i64>,
    /// Rows not published, with the reason (rejected rows and failed sends).
    pub failed: Vec<FailedRow>,
    /// Events not sent because an earlier event of their aggregate failed
    /// (`failures.policy = "block"`): they stay unpublished and unrecorded.
    pub held: Vec<i64>,
    /// Nothing was sent: this relay's lease no longer covered it (see
    /// [`crate::coordination`]); the session must end without marking anything.
    pub fenced: bool,
}

/// What a publish stage works with, besides the two channels that connect
/// it to its session.
pub struct StageSetup<S> {
    /// Where events go.
    pub sink: Arc<S>,
    /// Rows to messages.
    pub mapper: EnvelopeMapper,
    /// Publish counters and latencies.
    pub metrics: Metrics,
    /// Batches sent and not yet answered, at most.
    pub max_in_flight: usize,
    /// `failures.policy = "block"`: aggregates held back behind a failed event.
    pub blocked: Option<Blocked>,
    /// The session's lease: nothing is sent once it lapsed.
    pub fence: Fence,
}

/// Runs until `batches` closes and every enqueued batch has an outcome.
/// With `blocked`, later events of an aggregate whose event failed are held
/// back (see [`crate::holdback`]). A batch is sent only while `fence` holds.
pub async fn publish_stage<S: Sink>(
    setup: StageSetup<S>,
    mut batches: mpsc::Receiver<ClaimedBatch>,
    outcomes: mpsc::Sender<BatchOutcome>,
) {
    let StageSetup { sink, mapper, metrics, max_in_flight, blocked, fence } = setup;
    let mut pending = FuturesOrdered::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            biased;
            Some(outcome) = pending.next(), if !pending.is_empty() => {
                // The source stopped listening only when its session ended;
                // the rows stay unmarked and will be claimed again.
                let _ = outcomes.send(outcome).await;
            }
            batch = batches.recv(), if open && pending.len() < max_in_flight => match batch {
                Some(batch) => pending.push_back(publish(sink.as_ref(), &mapper, &metrics, blocked.as_ref(), &fence, batch).await),
                None => open = false,
            },
        }
    }
}

/// Blocks the aggregate of `failure` (if any); past the bound the failure
/// says so, and the session's checkpoint ends it.
fn block(blocked: Option<&Blocked>, failure: &mut FailedRow) {
    let Some(blocked) = blocked else { return };
    // An event without a usable aggregate holds nothing back by its
    // aggregate, but still halts a halting set (its key stands for itself).
    let aggregate = match failure.aggregate_id() {
        Some(aggregate) => aggregate.to_owned(),
        None if blocked.halts() => format!("position {}", failure.row.position),
        None => return,
    };
    if let Err(too_many) = blocked.block(&aggregate, failure.row.position) {
        failure.row.reason = format!("{}; {too_many}", failure.row.reason);
        failure.kind = FailureKind::TooManyBlocked;
    }
}

/// At debug level, a `publish` span per event that carries W3C trace
/// context, naming the row's trace and parent span, so the relay's hop can
/// be found in the logs by the trace id the application started. The header
/// itself always travels unchanged.
fn trace_publish(event: &crate::event::OutboxEvent, topic: &str) {
    let Some(traceparent) = event.traceparent.as_deref() else { return };
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let mut parts = traceparent.split('-');
    let (trace_id, parent_span_id) = match (parts.next(), parts.next(), parts.next()) {
        (Some(_version), Some(trace), Some(parent)) => (trace, parent),
        _ => ("invalid", "invalid"),
    };
    let span = tracing::debug_span!("publish", trace_id, parent_span_id, event_id = %event.event_id, topic);
    span.in_scope(|| tracing::debug!(position = event.position, "event handed to the broker"));
}

/// Enqueues one batch; the returned future resolves with its outcome.
async fn publish<S: Sink>(
    sink: &S,
    mapper: &EnvelopeMapper,
    metrics: &Metrics,
    blocked: Option<&Blocked>,
    fence: &Fence,
    batch: ClaimedBatch,
) -> impl std::future::Future<Output = BatchOutcome> + Send + 'static {
    // Checked per batch, just before enqueueing: a relay that lost its lease
    // (frozen past it, cut off from Postgres) sends nothing more.
    let fenced = !fence.holds();
    let (events, rejected, mut already_delivered) =
        if fenced { Default::default() } else { (batch.events, batch.rejected, batch.already_delivered) };
    let event_keys = batch.keys;
    let mut failed: Vec<FailedRow> = Vec::new();
    for row in rejected {
        let mut failure = FailedRow { row, kind: FailureKind::Envelope, letter: None };
        block(blocked, &mut failure);
        failed.push(failure);
    }
    let mut held = Vec::new();
    let mut messages = Vec::with_capacity(events.len());
    // Which event each message carries, for an exactly-once sink's position.
    let mut keys = Vec::with_capacity(events.len());
    // Per message: index into `events`, creation time (for latency) and an index into `labels`.
    let mut sent: Vec<(usize, i64, usize)> = Vec::with_capacity(events.len());
    let mut labels: Vec<(String, String)> = Vec::new();
    for (index, event) in events.iter().enumerate() {
        if blocked.is_some_and(|b| b.holds(&event.aggregate_id, event.position)) {
            held.push(event.position);
            continue;
        }
        match mapper.to_message(event) {
            Ok(message) => {
                let label = match labels.iter().position(|(t, e)| *t == message.topic && *e == event.event_type) {
                    Some(index) => index,
                    None => {
                        labels.push((message.topic.clone(), event.event_type.clone()));
                        labels.len() - 1
                    }
                };
                sent.push((index, event.created_at.timestamp_micros(), label));
                trace_publish(event, &message.topic);
                messages.push(message);
                keys.push(event_keys.get(index).copied().unwrap_or_else(|| EventKey::row(event.position)));
            }
            Err(error) => {
                let reason = error.to_string();
                let mut failure = FailedRow {
                    letter: Some(Box::new(DeadLetter::from_event(event, &reason))),
                    row: Rejected::new(event.position, reason).of_aggregate(Some(event.aggregate_id.clone())),
                    kind: FailureKind::Envelope,
                };
                block(blocked, &mut failure);
                failed.push(failure);
            }
        }
    }
    let enqueued_at = std::time::Instant::now();
    let delivery = sink.enqueue_keyed(messages, keys).await;
    let sequence = batch.sequence;
    let metrics = metrics.clone();
    let blocked = blocked.cloned();
    async move {
        let results = delivery.await;
        metrics.broker_ack_latency.observe(enqueued_at.elapsed().as_secs_f64());
        let now = chrono::Utc::now().timestamp_micros();
        let mut counts = vec![0u64; labels.len()];
        let mut delivered = Vec::with_capacity(sent.len() + already_delivered.len());
        delivered.append(&mut already_delivered);
        for ((index, created, label), result) in sent.into_iter().zip(results) {
            let event = &events[index];
            match result {
                Ok(()) => {
                    delivered.push(event.position);
                    counts[label] += 1;
                    metrics.end_to_end_latency.observe((now - created).max(0) as f64 / 1e6);
                }
                Err(error) => {
                    let mut failure = FailedRow {
                        letter: Some(Box::new(DeadLetter::from_event(event, &error.reason))),
                        row: Rejected::new(event.position, error.reason).of_aggregate(Some(event.aggregate_id.clone())),
                        kind: if error.permanent { FailureKind::BrokerPermanent } else { FailureKind::BrokerTransient },
                    };
                    block(blocked.as_ref(), &mut failure);
                    failed.push(failure);
                }
            }
        }
        for ((topic, event_type), count) in labels.iter().zip(counts) {
            if count > 0 {
                metrics.published(topic, event_type, count);
            }
        }
        BatchOutcome { sequence, delivered, failed, held, fenced }
    }
}
