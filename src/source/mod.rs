//! Capture: where outbox events come from.
//!
//! A source hands out [`ClaimedBatch`]es in outbox order and later learns,
//! through the checkpoint, which of their events the broker acknowledged.

pub(crate) mod poll;
pub mod replication;
pub mod table;

use crate::event::{OutboxEvent, Rejected};
use crate::settle::EventKey;

/// Events read from the outbox in one go, in position order.
#[derive(Debug, Default)]
pub(crate) struct ClaimedBatch {
    /// Monotonic per session; outcomes come back in this order.
    pub sequence: u64,
    /// Valid events to publish.
    pub events: Vec<OutboxEvent>,
    /// Rows that cannot be published as they stand; recorded, not dropped.
    pub rejected: Vec<Rejected>,
    /// Positions of events the broker acknowledged in an earlier session of
    /// this relay (see [`crate::settle::Ledger`]): not sent again, only
    /// reported delivered so they are marked.
    pub already_delivered: Vec<i64>,
    /// Highest position the batch covers (valid or rejected).
    pub last_position: i64,
    /// Exactly once (replication): each of `events`' keys, in the same
    /// order, so the transaction's position names them as the ledger does.
    /// Empty when polling: every event is then [`EventKey::row`].
    pub keys: Vec<EventKey>,
}

impl ClaimedBatch {
    /// Rows the batch covers.
    pub fn len(&self) -> usize {
        self.events.len() + self.rejected.len() + self.already_delivered.len()
    }

    /// Lowest position the batch covers; both lists are in position order.
    pub fn first_position(&self) -> Option<i64> {
        let event = self.events.first().map(|e| e.position);
        let rejected = self.rejected.first().map(|r| r.position);
        let delivered = self.already_delivered.first().copied();
        event.into_iter().chain(rejected).chain(delivered).min()
    }

    /// Moves the events `acknowledged` says the broker already has out of
    /// the batch into [`ClaimedBatch::already_delivered`].
    pub fn set_aside(&mut self, acknowledged: impl Fn(&OutboxEvent) -> bool) {
        if self.events.iter().any(&acknowledged) {
            if !self.keys.is_empty() {
                let keys = std::mem::take(&mut self.keys);
                self.keys =
                    keys.into_iter().zip(&self.events).filter(|(_, e)| !acknowledged(e)).map(|(k, _)| k).collect();
            }
            let (done, send): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.events).into_iter().partition(|e| acknowledged(e));
            self.already_delivered.extend(done.iter().map(|e| e.position));
            self.already_delivered.sort_unstable();
            self.events = send;
        }
    }

    /// True when the claim found nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
