//! Exactly-once delivery, the relay's part (`sink.kafka.delivery =
//! "exactly_once"`; the Kafka side is [`crate::sink::transactions`]).
//!
//! Before a session publishes anything it becomes the Kafka producer of
//! what it holds, fencing earlier ones, and reconciles with the position
//! their committed transactions wrote:
//!
//! * **Polling**: rows the broker already holds but that are still
//!   unpublished in the table are marked (or deleted) at once, so they are
//!   never claimed again. This runs at the session's first quiet point and
//!   again whenever the relay gained lanes (the producers of relays whose
//!   expired leases it took over are fenced first).
//! * **Replication**: the events named by the slot's position go into the
//!   ledger, so the stream skips them (they are only marked, and the slot
//!   confirmed past them) instead of publishing them again.

use std::collections::BTreeSet;

use tracing::info;

use super::{Relay, RelayError};
use crate::coordination::Assignment;
use crate::sink::Sink;
use crate::source::poll::PollSource;

/// Where a session's exactly-once reconciliation stands.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    /// Lanes read back for so far (empty: the session has not become the
    /// producer of what it holds yet).
    lanes: BTreeSet<i32>,
    /// The session became the producer of what it holds.
    held: bool,
    /// Previous holders already fenced.
    fenced: BTreeSet<String>,
}

impl<S: Sink> Relay<S> {
    /// The holder name (transactional id suffix) of this relay's lanes, or of
    /// the replication slot when `slot` (its recovery drain polls).
    fn holder(&self, relay_id: &str, slot: bool) -> String {
        if slot {
            format!("slot.{}", self.config.source.replication.slot)
        } else {
            format!("poll.{}.{relay_id}", self.config.source.table)
        }
    }

    /// Polling, at a quiet point before claiming from `assignment`'s lanes:
    /// the first time, and whenever lanes were added, becomes the producer
    /// of its lanes, fences the relays whose expired leases it took over,
    /// reads the positions of every polling relay of this outbox (a relay
    /// that handed its lanes back after a failed session may have left
    /// committed rows unmarked) and marks the rows they name that are still
    /// unpublished. A no-op with at-least-once delivery.
    pub(super) async fn reconcile_lanes(
        &mut self,
        source: &PollSource,
        assignment: &Assignment,
        done: &mut Reconciled,
        slot: bool,
    ) -> Result<(), RelayError> {
        let me = self.identity.relay_id.clone();
        let claimable: BTreeSet<i32> = assignment.claimable().into_iter().collect();
        let fresh: Vec<String> =
            assignment.taken_from.iter().filter(|r| **r != me && !done.fenced.contains(*r)).cloned().collect();
        if done.held && fresh.is_empty() && claimable.is_subset(&done.lanes) {
            return Ok(());
        }
        let holder = self.holder(&me, slot);
        let previous: Vec<String> =
            if slot { Vec::new() } else { fresh.iter().map(|r| self.holder(r, false)).collect() };
        let scope = if slot { holder.clone() } else { format!("poll.{}.", self.config.source.table) };
        let Some(position) = self.sink.hold(&holder, &previous, &scope).await.map_err(RelayError::Broker)? else {
            done.held = true;
            done.lanes = claimable;
            return Ok(());
        };
        let positions: Vec<i64> = position.events.iter().filter(|k| !k.message).map(|k| k.position).collect();
        let pending = if positions.is_empty() { Vec::new() } else { source.still_pending(&positions).await? };
        source.checkpoint(&pending).await?;
        // Settled now: later positions stop naming them.
        self.ledger.marked(&positions);
        done.held = true;
        done.lanes = claimable;
        done.fenced.extend(fresh.iter().cloned());
        info!(
            named = positions.len(),
            marked = pending.len(),
            fenced = ?fresh,
            "exactly-once: reconciled with the committed positions; rows the broker already held are marked, not published again"
        );
        Ok(())
    }

    /// Replication: becomes the slot's producer (fencing the previous
    /// leader's) and has the stream skip what the position names.
    pub(super) async fn reconcile_slot(&mut self) -> Result<(), RelayError> {
        let holder = self.holder(&self.identity.relay_id.clone(), true);
        let Some(position) = self.sink.hold(&holder, &[], &holder).await.map_err(RelayError::Broker)? else {
            return Ok(());
        };
        info!(
            events = position.events.len(),
            settled_below = position.confirmed,
            "exactly-once: events the broker already holds are skipped by the stream (marked and confirmed only)"
        );
        self.ledger.recovered(&position.events, position.confirmed);
        Ok(())
    }
}
