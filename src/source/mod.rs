//! Capture: where outbox events come from.
//!
//! A source hands out [`ClaimedBatch`]es in outbox order and later learns,
//! through the checkpoint, which of their events the broker acknowledged.

pub mod poll;
pub mod replication;
pub mod table;

use crate::event::{OutboxEvent, Rejected};

/// Events read from the outbox in one go, in position order.
#[derive(Debug, Default)]
pub struct ClaimedBatch {
    /// Monotonic per session; outcomes come back in this order.
    pub sequence: u64,
    /// Valid events to publish.
    pub events: Vec<OutboxEvent>,
    /// Rows that cannot be published as they stand; recorded, not dropped.
    pub rejected: Vec<Rejected>,
    /// Highest position the batch covers (valid or rejected).
    pub last_position: i64,
}

impl ClaimedBatch {
    /// Rows the batch covers.
    pub fn len(&self) -> usize {
        self.events.len() + self.rejected.len()
    }

    /// Lowest position the batch covers; both lists are in position order.
    pub fn first_position(&self) -> Option<i64> {
        let event = self.events.first().map(|e| e.position);
        let rejected = self.rejected.first().map(|r| r.position);
        event.into_iter().chain(rejected).min()
    }

    /// True when the claim found nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
