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
    /// Whether retrying can help.
    pub permanent: bool,
}

/// Runs until `batches` closes and every enqueued batch has an outcome.
pub async fn publish_stage<S: Sink>(
    sink: Arc<S>,
    mapper: EnvelopeMapper,
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
                Some(batch) => pending.push_back(publish(sink.as_ref(), &mapper, batch).await),
                None => open = false,
            },
        }
    }
}

/// Enqueues one batch; the returned future resolves with its outcome.
async fn publish<S: Sink>(
    sink: &S,
    mapper: &EnvelopeMapper,
    batch: ClaimedBatch,
) -> impl std::future::Future<Output = BatchOutcome> + Send + 'static {
    let mut failed: Vec<FailedRow> =
        batch.rejected.into_iter().map(|row| FailedRow { row, permanent: true }).collect();
    let mut messages = Vec::with_capacity(batch.events.len());
    for event in &batch.events {
        match mapper.to_message(event) {
            Ok(message) => messages.push(message),
            Err(error) => failed.push(FailedRow {
                row: Rejected { position: event.position, reason: error.to_string() },
                permanent: true,
            }),
        }
    }
    let positions: Vec<i64> = messages.iter().map(|m| m.position).collect();
    let delivery = sink.enqueue(messages).await;
    let sequence = batch.sequence;
    async move {
        let results = delivery.await;
        let mut delivered = Vec::with_capacity(positions.len());
        for (position, result) in positions.into_iter().zip(results) {
            match result {
                Ok(()) => delivered.push(position),
                Err(error) => failed.push(FailedRow {
                    row: Rejected { position, reason: error.reason },
                    permanent: error.permanent,
                }),
            }
        }
        BatchOutcome { sequence, delivered, failed }
    }
}
