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

use crate::envelope::EnvelopeMapper;
use crate::metrics::Metrics;
use crate::event::Rejected;
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
}

/// A row that was not published.
#[derive(Debug, Clone)]
pub struct FailedRow {
    /// Position and reason.
    pub row: Rejected,
    /// Where it failed, which also says whether retrying can help.
    pub kind: FailureKind,
}

/// Where a row failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The row cannot form a valid message (bad column, bad topic).
    Envelope,
    /// The broker refused it and a retry may succeed.
    BrokerTransient,
    /// The broker refused it for good (too large, not authorized...).
    BrokerPermanent,
}

impl FailureKind {
    /// Label value for `outbox_relay_publish_failures_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Envelope => "envelope",
            FailureKind::BrokerTransient => "broker_transient",
            FailureKind::BrokerPermanent => "broker_permanent",
        }
    }
}

/// Runs until `batches` closes and every enqueued batch has an outcome.
pub async fn publish_stage<S: Sink>(
    sink: Arc<S>,
    mapper: EnvelopeMapper,
    metrics: Metrics,
    mut batches: mpsc::Receiver<ClaimedBatch>,
    outcomes: mpsc::Sender<BatchOutcome>,
    max_in_flight: usize,
) {
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
                Some(batch) => pending.push_back(publish(sink.as_ref(), &mapper, &metrics, batch).await),
                None => open = false,
            },
        }
    }
}

/// Enqueues one batch; the returned future resolves with its outcome.
async fn publish<S: Sink>(
    sink: &S,
    mapper: &EnvelopeMapper,
    metrics: &Metrics,
    batch: ClaimedBatch,
) -> impl std::future::Future<Output = BatchOutcome> + Send + 'static {
    let mut failed: Vec<FailedRow> =
        batch.rejected.into_iter().map(|row| FailedRow { row, kind: FailureKind::Envelope }).collect();
    let mut messages = Vec::with_capacity(batch.events.len());
    // Per message: creation time (for latency) and an index into `labels`.
    let mut sent: Vec<(i64, i64, usize)> = Vec::with_capacity(batch.events.len());
    let mut labels: Vec<(String, String)> = Vec::new();
    for event in &batch.events {
        match mapper.to_message(event) {
            Ok(message) => {
                let label = match labels.iter().position(|(t, e)| *t == message.topic && *e == event.event_type) {
                    Some(index) => index,
                    None => {
                        labels.push((message.topic.clone(), event.event_type.clone()));
                        labels.len() - 1
                    }
                };
                sent.push((message.position, event.created_at.timestamp_micros(), label));
                messages.push(message);
            }
            Err(error) => failed.push(FailedRow {
                row: Rejected { position: event.position, reason: error.to_string() },
                kind: FailureKind::Envelope,
            }),
        }
    }
    let enqueued_at = std::time::Instant::now();
    let delivery = sink.enqueue(messages).await;
    let sequence = batch.sequence;
    let metrics = metrics.clone();
    async move {
        let results = delivery.await;
        metrics.broker_ack_latency.observe(enqueued_at.elapsed().as_secs_f64());
        let now = chrono::Utc::now().timestamp_micros();
        let mut counts = vec![0u64; labels.len()];
        let mut delivered = Vec::with_capacity(sent.len());
        for ((position, created, label), result) in sent.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    delivered.push(position);
                    counts[label] += 1;
                    metrics.end_to_end_latency.observe((now - created).max(0) as f64 / 1e6);
                }
                Err(error) => failed.push(FailedRow {
                    row: Rejected { position, reason: error.reason },
                    kind: if error.permanent { FailureKind::BrokerPermanent } else { FailureKind::BrokerTransient },
                }),
            }
        }
        for ((topic, event_type), count) in labels.iter().zip(counts) {
            if count > 0 {
                metrics.published(topic, event_type, count);
            }
        }
        BatchOutcome { sequence, delivered, failed }
    }
}
