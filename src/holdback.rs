//! Aggregates held back behind a failed event (`failures.policy = "block"`).
//!
//! When an event of aggregate X cannot be published, X's later events must
//! wait for it, or a consumer would see X's history with a hole that is
//! filled later, out of order. The publish stage consults this set before
//! sending each event and holds back (leaves unpublished, unrecorded) every
//! later event of a blocked aggregate; the polling claim leaves them out of
//! its queries; the failed event itself is retried on its schedule, and once
//! it is acknowledged the aggregate is released and its held events follow,
//! in order. Other aggregates keep flowing.
//!
//! Logical replication cannot hold one aggregate back (the slot only
//! confirms a prefix of the stream), so there the set *halts*: after the
//! first failure every later event waits, and the session stops there.
//!
//! What cannot be held back: events already handed to the broker before a
//! failure was known (the broker refused one only after it was sent). At
//! most the in-flight window can overtake the failed event that way; mapping
//! failures and rows the relay rejects are always caught before sending.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most aggregates blocked at once. Past this, so many aggregates fail that
/// the cause is systemic (a topic, a permission): the session stops and
/// retries instead of tracking an unbounded set.
pub const MAX_BLOCKED: usize = 10_000;

/// Shared between the publish stage and the claim loop of one session.
#[derive(Debug, Clone, Default)]
pub struct Blocked {
    inner: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Replication: the first failure holds back everything after it.
    halting: bool,
    /// A halting set saw its first failure.
    halted: bool,
    /// Aggregate id -> position of its failed event (the lowest one).
    by_aggregate: HashMap<String, i64>,
    /// Position of a failed event -> its aggregate, to release on delivery.
    by_position: HashMap<i64, String>,
}

/// The set grew past [`MAX_BLOCKED`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "more than {MAX_BLOCKED} aggregates are blocked behind events that cannot be published; \
     the cause is probably shared (a topic, a permission, the broker): see the errors above, \
     or set failures.policy = \"dead_letter\""
)]
pub struct TooManyBlocked;

impl Blocked {
    /// A set where the first failure holds back every later event, of any
    /// aggregate (logical replication).
    pub fn halting() -> Blocked {
        let blocked = Blocked::default();
        blocked.state().halting = true;
        blocked
    }

    /// Whether this set halts the whole stream (see [`Blocked::halting`]).
    pub fn halts(&self) -> bool {
        self.state().halting
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half-updated
        // in a way that loses events (worst case: an aggregate stays blocked
        // until the session restarts), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Blocks `aggregate_id` behind the failed event at `position`; an
    /// aggregate already blocked keeps its earliest failed event.
    pub fn block(&self, aggregate_id: &str, position: i64) -> Result<(), TooManyBlocked> {
        let mut state = self.state();
        state.halted = state.halting;
        match state.by_aggregate.get(aggregate_id).copied() {
            Some(existing) if existing <= position => return Ok(()),
            Some(existing) => {
                state.by_position.remove(&existing);
            }
            None if state.by_aggregate.len() >= MAX_BLOCKED => return Err(TooManyBlocked),
            None => {}
        }
        state.by_aggregate.insert(aggregate_id.to_owned(), position);
        state.by_position.insert(position, aggregate_id.to_owned());
        Ok(())
    }

    /// Whether the event at `position` of `aggregate_id` must wait: its
    /// aggregate is blocked behind an earlier event.
    pub fn holds(&self, aggregate_id: &str, position: i64) -> bool {
        let state = self.state();
        if state.halting {
            return state.halted;
        }
        !state.by_aggregate.is_empty() && state.by_aggregate.get(aggregate_id).is_some_and(|&failed| position > failed)
    }

    /// Releases the aggregates whose failed event is among `positions`
    /// (delivered, dead-lettered or gone); returns how many were released.
    pub fn release(&self, positions: &[i64]) -> usize {
        let mut state = self.state();
        if state.by_position.is_empty() {
            return 0;
        }
        let mut released = 0;
        for position in positions {
            if let Some(aggregate) = state.by_position.remove(position) {
                state.by_aggregate.remove(&aggregate);
                released += 1;
            }
        }
        released
    }

    /// Blocked aggregates and their failed events' positions, for claims.
    pub fn snapshot(&self) -> (Vec<String>, Vec<i64>) {
        let state = self.state();
        state.by_aggregate.iter().map(|(a, p)| (a.clone(), *p)).unzip()
    }

    /// How many aggregates are blocked.
    pub fn len(&self) -> usize {
        self.state().by_aggregate.len()
    }

    /// True when nothing is blocked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_events_of_a_blocked_aggregate_wait_and_others_do_not() {
        let blocked = Blocked::default();
        blocked.block("order-1", 10).unwrap();
        assert!(blocked.holds("order-1", 11));
        assert!(!blocked.holds("order-1", 10), "the failed event itself is retried");
        assert!(!blocked.holds("order-1", 9), "earlier events were never behind it");
        assert!(!blocked.holds("order-2", 11));
    }

    #[test]
    fn delivering_the_failed_event_releases_the_aggregate() {
        let blocked = Blocked::default();
        blocked.block("order-1", 10).unwrap();
        assert_eq!(blocked.release(&[3, 4]), 0);
        assert_eq!(blocked.release(&[10]), 1);
        assert!(!blocked.holds("order-1", 11));
        assert!(blocked.is_empty());
    }

    #[test]
    fn an_aggregate_stays_blocked_behind_its_earliest_failure() {
        let blocked = Blocked::default();
        blocked.block("order-1", 20).unwrap();
        blocked.block("order-1", 10).unwrap();
        blocked.block("order-1", 30).unwrap();
        assert_eq!(blocked.snapshot(), (vec!["order-1".to_owned()], vec![10]));
        assert!(blocked.holds("order-1", 20));
        assert_eq!(blocked.release(&[20]), 0, "a later failure is not the one that blocks");
        assert_eq!(blocked.release(&[10]), 1);
    }

    #[test]
    fn a_halting_set_holds_everything_after_the_first_failure() {
        let blocked = Blocked::halting();
        assert!(!blocked.holds("order-1", 5));
        blocked.block("order-1", 10).unwrap();
        assert!(blocked.holds("order-2", 3), "positions of rows and messages are not comparable: hold all");
    }

    #[test]
    fn the_set_is_bounded() {
        let blocked = Blocked::default();
        for i in 0..MAX_BLOCKED as i64 {
            blocked.block(&format!("a{i}"), i).unwrap();
        }
        assert_eq!(blocked.block("one-more", 1), Err(TooManyBlocked));
        assert!(blocked.block("a1", 0).is_ok(), "moving an existing block is not growth");
    }
}
