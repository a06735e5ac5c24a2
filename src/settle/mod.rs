//! The settlement core: the one place that decides what a batch outcome
//! means, for both capture modes.
//!
//! ```text
//!   publish stage ──BatchOutcome──▶ plan() ──Plan──▶ session loop (poll / replication)
//!                                     ▲                 mark rows, record failures,
//!                    Rules + Ledger ──┘                 dead-letter, park, confirm LSN,
//!                                                       or end the session (End)
//! ```
//!
//! The session loops only carry a [`Plan`] out; none of them decides policy.
//! Three pieces of state make the decisions safe across a session's life:
//!
//! * [`Ledger`] outlives sessions (it belongs to the relay process): what
//!   the broker already acknowledged but is not yet marked or confirmed, so
//!   a session that restarts because of a persistent failure re-marks those
//!   events instead of publishing them again; and how often each event
//!   failed, so `failures.max_attempts` counts across restarts.
//! * [`LsnProgress`] (replication): the confirmed LSN only ever covers an
//!   unbroken prefix of batches that were acknowledged *and* marked.
//! * [`crate::holdback::Blocked`] (poll): aggregates held back behind a
//!   failed event, also kept across sessions by the relay.
//!
//! # Error handling
//! A failure maps to exactly one [`Action`] by [`decide`]; the most severe
//! action of a batch ends the session ([`End`]): a fence beats a halt, a halt
//! beats a restart. Nothing here loses an event: delivered events are marked,
//! dead-lettered ones are marked only after the dead-letter topic
//! acknowledged them, and everything else stays unpublished.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::config::{FailurePolicy, FailuresConfig};
use crate::failure::{FailedRow, FailureKind};
use crate::pipeline::BatchOutcome;

/// How the outbox is captured: decides what "hold back" can mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    /// Polling: one aggregate can be held back while others flow.
    Poll,
    /// Logical replication: the slot confirms a prefix of the stream, so a
    /// failure that must be waited for stops the whole stream.
    Replication,
}

/// The failure policy as the core needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// The capture mode.
    pub capture: Capture,
    /// `failures.policy`.
    pub policy: FailurePolicy,
    /// `failures.max_attempts`: transient failures before dead-lettering.
    pub max_attempts: u32,
}

impl Rules {
    /// The rules of `failures` for `capture`.
    pub fn new(capture: Capture, failures: &FailuresConfig) -> Rules {
        Rules { capture, policy: failures.policy, max_attempts: failures.max_attempts.max(1) }
    }
}

/// What happens to one failed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Record the failure on the row and try again after
    /// `source.retry_failed_after` (polling; its aggregate waits for it).
    Retry,
    /// Publish it to the dead-letter topic; once acknowledged it is done.
    DeadLetter,
    /// Record the failure and restart the session from the oldest
    /// unpublished event (the broker client gave up, or a shared cause).
    Restart,
    /// Stop the stream before this event (replication, `block`): it retries
    /// from the same place until the cause is fixed.
    Halt,
}

/// Decides what happens to a failure of `kind` after `attempts` tries
/// (this one included).
pub fn decide(rules: Rules, kind: FailureKind, attempts: u32) -> Action {
    if kind == FailureKind::TooManyBlocked {
        return Action::Restart;
    }
    let exhausted = kind != FailureKind::BrokerTransient || attempts >= rules.max_attempts;
    match (rules.policy, rules.capture) {
        (FailurePolicy::DeadLetter, _) if exhausted => Action::DeadLetter,
        // librdkafka retries transient errors itself: one that reaches us means
        // the client gave up, so the session starts over with a fresh one.
        (_, _) if kind == FailureKind::BrokerTransient => Action::Restart,
        (FailurePolicy::DeadLetter, Capture::Poll) => Action::Retry,
        (FailurePolicy::DeadLetter, Capture::Replication) => Action::Restart,
        (FailurePolicy::Block, Capture::Poll) => Action::Retry,
        (FailurePolicy::Block, Capture::Replication) => Action::Halt,
    }
}

/// Why a session must end after settling a batch.
#[derive(Debug, Clone)]
pub enum End {
    /// Nothing was sent: this relay's lease lapsed.
    Fenced,
    /// Stop the stream at this event (replication, `block`).
    Halt(Box<FailedRow>),
    /// Start over from the oldest unpublished event.
    Restart(Box<FailedRow>),
}

impl End {
    fn severity(&self) -> u8 {
        match self {
            End::Fenced => 3,
            End::Halt(_) => 2,
            End::Restart(_) => 1,
        }
    }
}

/// What the session loop must do with one batch outcome, in this order:
/// mark `mark`, publish `dead_letter` (each acknowledged letter is then done,
/// each refused one retried), record and park `retry`, then end if `end`.
#[derive(Debug, Default)]
pub struct Plan {
    /// Positions the broker acknowledged: mark or delete them.
    pub mark: Vec<i64>,
    /// Failures to publish to the dead-letter topic.
    pub dead_letter: Vec<FailedRow>,
    /// Failures to record on their rows and retry later.
    pub retry: Vec<FailedRow>,
    /// The session ends after carrying out the rest.
    pub end: Option<End>,
    /// Events of the batch were held back behind an earlier failure: they
    /// are not published, so nothing from this batch on may be confirmed.
    pub holds_back: bool,
}

impl Plan {
    fn end_with(&mut self, end: End) {
        if self.end.as_ref().is_none_or(|current| end.severity() > current.severity()) {
            self.end = Some(end);
        }
    }

    /// Every failure of the plan that should be recorded on its row now.
    pub fn to_record(&self) -> impl Iterator<Item = &FailedRow> {
        let ending = match &self.end {
            Some(End::Halt(row)) | Some(End::Restart(row)) => Some(row.as_ref()),
            _ => None,
        };
        self.retry.iter().chain(ending.filter(|e| !self.retry.iter().any(|r| r.row.position == e.row.position)))
    }
}

/// Exactly-once delivery (`sink.kafka.delivery = "exactly_once"`): the
/// events that are in a committed Kafka transaction but whose rows are not
/// yet marked (or whose transaction the slot has not yet confirmed). Every
/// transaction also writes this set, as the relay's position, to the
/// offsets topic, so after a crash or a takeover the last committed
/// position names every event the broker holds and Postgres does not know
/// about. The Kafka sink adds to it at commit; the [`Ledger`] it is shared
/// with removes what was marked or confirmed, so it stays bounded by the
/// unsettled window.
#[derive(Debug, Clone, Default)]
pub struct Committed(std::sync::Arc<std::sync::Mutex<CommittedState>>);

/// What [`Committed`] guards.
#[derive(Debug, Default)]
struct CommittedState {
    /// Events in committed transactions, not yet settled.
    keys: std::collections::HashSet<EventKey>,
    /// Replication: the highest LSN this relay confirmed to the slot. A
    /// Postgres crash can move the slot back behind it (its position is only
    /// as durable as the last checkpoint); what lies behind it was settled.
    confirmed: u64,
}

impl Committed {
    fn with<T>(&self, f: impl FnOnce(&mut CommittedState) -> T) -> T {
        // Only a panic inside these short critical sections could poison the lock.
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    /// `keys` are now in a committed transaction.
    pub fn add(&self, keys: impl IntoIterator<Item = EventKey>) {
        self.with(|state| state.keys.extend(keys));
    }

    /// Every event committed and not yet settled, in stream order, and the
    /// highest LSN confirmed to the slot (0 when polling).
    pub fn snapshot(&self) -> (Vec<EventKey>, u64) {
        let (mut keys, confirmed) =
            self.with(|state| (state.keys.iter().copied().collect::<Vec<_>>(), state.confirmed));
        keys.sort_unstable_by_key(|k| (k.txn, k.message, k.position));
        (keys, confirmed)
    }

    fn marked(&self, positions: &[i64]) {
        self.with(|state| {
            for position in positions {
                state.keys.remove(&EventKey::row(*position));
            }
        });
    }

    fn confirmed(&self, lsn: u64) {
        // An event whose transaction committed before the confirmed LSN is
        // never streamed again. Polled rows (txn 0) are only settled by marking.
        self.with(|state| {
            state.keys.retain(|k| k.txn == 0 || k.txn >= lsn);
            state.confirmed = state.confirmed.max(lsn);
        });
    }

    fn settled(&self, key: &EventKey) {
        self.with(|state| state.keys.remove(key));
    }
}

/// Identifies one event across sessions: a row (by position) or a logical
/// message (by LSN), within the transaction that carried it (its commit
/// LSN in replication, 0 when polling), so a row id written again later is
/// a different event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventKey {
    /// The row's position, or the message's LSN.
    pub position: i64,
    /// The commit LSN of the event's transaction (replication), else 0.
    pub txn: u64,
    /// A logical decoding message rather than an outbox row.
    pub message: bool,
}

impl EventKey {
    /// An outbox row found by polling.
    pub fn row(position: i64) -> EventKey {
        EventKey { position, txn: 0, message: false }
    }
}

/// Most acknowledged-but-unsettled events remembered (about 40 bytes each):
/// 25 default in-flight windows. Past it new acknowledgements are not
/// remembered, and a restart may publish those again (at least once holds).
pub const LEDGER_CAPACITY: usize = 100_000;

/// What the broker already acknowledged, and how often events failed,
/// across the sessions of one relay process (see the module docs).
///
/// Replication enters every acknowledged event and forgets it once the slot
/// confirmed past its commit, as often as every 100 ms: `by_commit` orders
/// the entries by commit LSN so forgetting costs what is forgotten, not a
/// walk over everything remembered.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Acknowledged, not yet marked/confirmed -> the LSN after which it can
    /// no longer be streamed again (0 when polling).
    acknowledged: HashMap<EventKey, u64>,
    /// The entries of `acknowledged` with a commit LSN, by that LSN. May
    /// hold keys already forgotten (marked, settled) or re-entered at another
    /// LSN: an entry is dropped only when `acknowledged` still maps it to an
    /// LSN below the confirmed one.
    by_commit: BTreeMap<u64, Vec<EventKey>>,
    /// Keys in `by_commit` (stale ones included), to keep it bounded.
    indexed: usize,
    /// Entries of `acknowledged` at LSN 0 (polling), which any confirmed
    /// LSN also forgets.
    uncommitted: usize,
    /// Failed attempts per event still unpublished.
    attempts: HashMap<EventKey, u32>,
    /// Exactly once: the sink's committed-but-unsettled set, settled here too.
    committed: Option<Committed>,
    /// Exactly once, replication: transactions committing before this LSN
    /// were settled by an earlier leader (its position says so) although the
    /// slot may stand behind it after a Postgres crash: not sent again.
    settled_below: u64,
}

impl Ledger {
    /// Remembers that the broker acknowledged `key`; `lsn` is its
    /// transaction's commit LSN in replication (0 when polling).
    pub fn acknowledged(&mut self, key: EventKey, lsn: u64) {
        if !self.attempts.is_empty() {
            self.attempts.remove(&key);
        }
        if self.acknowledged.len() >= LEDGER_CAPACITY && !self.acknowledged.contains_key(&key) {
            return;
        }
        let previous = self.acknowledged.insert(key, lsn);
        if previous == Some(0) {
            self.uncommitted -= 1;
        }
        if lsn == 0 {
            self.uncommitted += 1;
        } else if previous != Some(lsn) {
            if self.indexed >= 2 * LEDGER_CAPACITY {
                self.reindex();
            }
            self.by_commit.entry(lsn).or_default().push(key);
            self.indexed += 1;
        }
    }

    /// Rebuilds `by_commit` from `acknowledged`, dropping stale keys.
    fn reindex(&mut self) {
        self.by_commit.clear();
        self.indexed = 0;
        for (key, &lsn) in &self.acknowledged {
            if lsn != 0 {
                self.by_commit.entry(lsn).or_default().push(*key);
                self.indexed += 1;
            }
        }
    }

    /// Forgets `key` (marked or settled).
    fn forget(&mut self, key: &EventKey) {
        if self.acknowledged.remove(key) == Some(0) {
            self.uncommitted -= 1;
        }
    }

    /// Whether `key` was acknowledged and not yet settled: do not send it
    /// again, only mark it.
    pub fn was_acknowledged(&self, key: &EventKey) -> bool {
        (key.txn != 0 && key.txn < self.settled_below)
            || (!self.acknowledged.is_empty() && self.acknowledged.contains_key(key))
    }

    /// Exactly once: settles `committed` (the sink's set) together with the ledger.
    pub fn track(&mut self, committed: Committed) {
        self.committed = Some(committed);
    }

    /// Exactly once: `keys` are in transactions the broker committed (read
    /// back from the position after a restart or takeover): remember them as
    /// acknowledged so they are marked and confirmed, not sent again, and
    /// keep naming them in positions until then. Transactions before
    /// `confirmed` (the LSN the writer of the position had confirmed) were
    /// settled: never sent again, even if the slot fell behind it.
    pub fn recovered(&mut self, keys: &[EventKey], confirmed: u64) {
        if let Some(committed) = &self.committed {
            committed.add(keys.iter().copied());
            committed.confirmed(confirmed);
        }
        self.settled_below = self.settled_below.max(confirmed);
        for key in keys {
            self.acknowledged(*key, key.txn);
        }
    }

    /// The rows at `positions` are marked: forget them (polling).
    pub fn marked(&mut self, positions: &[i64]) {
        if let Some(committed) = &self.committed {
            committed.marked(positions);
        }
        if self.acknowledged.is_empty() {
            return;
        }
        for position in positions {
            self.forget(&EventKey::row(*position));
        }
    }

    /// The slot confirmed `lsn`: what committed before it is never streamed
    /// again. Costs the entries forgotten (see `by_commit`).
    pub fn confirmed(&mut self, lsn: u64) {
        if let Some(committed) = &self.committed {
            committed.confirmed(lsn);
        }
        if lsn > 0 && self.uncommitted > 0 {
            self.acknowledged.retain(|_, commit| *commit != 0);
            self.uncommitted = 0;
        }
        if self.by_commit.first_key_value().is_none_or(|(&oldest, _)| oldest >= lsn) {
            return;
        }
        let kept = self.by_commit.split_off(&lsn);
        let gone = std::mem::replace(&mut self.by_commit, kept);
        for key in gone.into_values().flatten() {
            self.indexed -= 1;
            if let std::collections::hash_map::Entry::Occupied(entry) = self.acknowledged.entry(key) {
                if *entry.get() < lsn {
                    entry.remove();
                }
            }
        }
    }

    /// Counts one more failed attempt of `key`; returns the attempts so far.
    pub fn failed(&mut self, key: EventKey) -> u32 {
        if self.attempts.len() >= LEDGER_CAPACITY && !self.attempts.contains_key(&key) {
            // Bounded: a flood of distinct failures restarts the counts.
            self.attempts.clear();
        }
        let attempts = self.attempts.entry(key).or_insert(0);
        *attempts = attempts.saturating_add(1);
        *attempts
    }

    /// How often `key` failed so far (0: never, or it was settled since).
    pub fn failures(&self, key: &EventKey) -> u32 {
        if self.attempts.is_empty() {
            return 0;
        }
        self.attempts.get(key).copied().unwrap_or(0)
    }

    /// `key` is done (dead-lettered): forget its failures.
    pub fn settled(&mut self, key: &EventKey) {
        if let Some(committed) = &self.committed {
            committed.settled(key);
        }
        self.attempts.remove(key);
        self.forget(key);
    }

    /// Events remembered as acknowledged and not yet settled.
    pub fn unsettled(&self) -> usize {
        self.acknowledged.len()
    }
}

/// Turns one outcome into a plan. `key_of` names each position's event;
/// `stored_attempts` adds what the table remembers (an `attempts` column)
/// to the ledger's count. Acknowledged events are entered in the ledger at
/// `lsn` (the batch's commit LSN in replication, 0 when polling).
pub fn plan(
    rules: Rules,
    outcome: &BatchOutcome,
    ledger: &mut Ledger,
    key_of: impl Fn(i64) -> Option<EventKey>,
    stored_attempts: impl Fn(i64) -> u32,
    lsn: u64,
) -> Plan {
    let mut plan = Plan::default();
    if outcome.fenced {
        plan.end_with(End::Fenced);
        return plan;
    }
    for &position in &outcome.delivered {
        if let Some(key) = key_of(position) {
            ledger.acknowledged(key, lsn);
        }
    }
    plan.mark = outcome.delivered.clone();
    plan.holds_back = !outcome.held.is_empty();
    for failure in &outcome.failed {
        let counted = key_of(failure.row.position).map_or(1, |key| ledger.failed(key));
        let attempts = counted.max(stored_attempts(failure.row.position).saturating_add(1));
        match decide(rules, failure.kind, attempts) {
            Action::DeadLetter => plan.dead_letter.push(failure.clone()),
            Action::Retry => plan.retry.push(failure.clone()),
            Action::Restart => plan.end_with(End::Restart(Box::new(failure.clone()))),
            Action::Halt => plan.end_with(End::Halt(Box::new(failure.clone()))),
        }
    }
    plan
}

/// One step of replication progress: a batch handed to the publish stage.
#[derive(Debug, Clone, Copy)]
struct Step {
    id: u64,
    /// The highest commit end LSN this step completes.
    lsn: Option<u64>,
    /// Acknowledged and marked.
    settled: bool,
}

/// Replication progress: which LSN may be confirmed to the slot.
///
/// A batch becomes a step when it is handed to the publish stage and is
/// settled once the broker acknowledged it and its rows are marked; the
/// confirmed LSN is the highest commit LSN of the unbroken settled prefix.
/// A commit that carried nothing of ours attaches to the newest open step
/// (it is "done" exactly when everything before it is), or confirms at once
/// when nothing is open.
#[derive(Debug)]
pub struct LsnProgress {
    confirmed: u64,
    steps: VecDeque<Step>,
    /// The stream ends at a step (see [`LsnProgress::stop_before`]).
    stopped: bool,
}

impl LsnProgress {
    /// Progress starting at the slot's confirmed position.
    pub fn new(confirmed: u64) -> LsnProgress {
        LsnProgress { confirmed, steps: VecDeque::new(), stopped: false }
    }

    /// The LSN that may be confirmed now.
    pub fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// True when no step is open.
    pub fn is_idle(&self) -> bool {
        self.steps.is_empty()
    }

    /// A batch `id` was handed to the stage; it completes commit `lsn` if any.
    pub fn open(&mut self, id: u64, lsn: Option<u64>) {
        let lsn = if self.stopped { None } else { lsn };
        self.steps.push_back(Step { id, lsn, settled: false });
    }

    /// A transaction committed at `lsn` with nothing of it still being built.
    pub fn commit(&mut self, lsn: u64) {
        if self.stopped {
            return;
        }
        match self.steps.back_mut() {
            Some(last) => last.lsn = Some(last.lsn.unwrap_or(0).max(lsn)),
            None => self.confirmed = self.confirmed.max(lsn),
        }
    }

    /// Nothing from step `id` on may be confirmed: it holds an event that
    /// is not published, and the stream ends there. The steps before it
    /// still confirm as they settle.
    pub fn stop_before(&mut self, id: u64) {
        self.stopped = true;
        for step in self.steps.iter_mut().filter(|s| s.id >= id) {
            step.lsn = None;
        }
    }

    /// The server's keepalive said it sent everything up to `wal_end`; valid
    /// only when nothing is open, being built or inside a transaction.
    pub fn caught_up(&mut self, wal_end: u64) {
        if self.steps.is_empty() && !self.stopped {
            self.confirmed = self.confirmed.max(wal_end);
        }
    }

    /// Step `id` is acknowledged and marked: confirm the settled prefix.
    pub fn settle(&mut self, id: u64) {
        if let Some(step) = self.steps.iter_mut().find(|s| s.id == id) {
            step.settled = true;
        }
        while let Some(step) = self.steps.front() {
            if !step.settled {
                break;
            }
            if let Some(lsn) = step.lsn {
                self.confirmed = self.confirmed.max(lsn);
            }
            self.steps.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Rejected;

    fn rules(capture: Capture, policy: FailurePolicy) -> Rules {
        Rules { capture, policy, max_attempts: 3 }
    }

    #[test]
    fn every_kind_policy_and_capture_has_one_action() {
        use Action::*;
        use FailureKind::*;
        let table = [
            // (capture, policy, kind, attempts) -> action
            (Capture::Poll, FailurePolicy::Block, Envelope, 1, Retry),
            (Capture::Poll, FailurePolicy::Block, BrokerPermanent, 1, Retry),
            (Capture::Poll, FailurePolicy::Block, BrokerTransient, 1, Restart),
            (Capture::Poll, FailurePolicy::Block, BrokerTransient, 9, Restart),
            (Capture::Poll, FailurePolicy::Block, TooManyBlocked, 1, Restart),
            (Capture::Poll, FailurePolicy::DeadLetter, Envelope, 1, DeadLetter),
            (Capture::Poll, FailurePolicy::DeadLetter, BrokerPermanent, 1, DeadLetter),
            (Capture::Poll, FailurePolicy::DeadLetter, BrokerTransient, 2, Restart),
            (Capture::Poll, FailurePolicy::DeadLetter, BrokerTransient, 3, DeadLetter),
            (Capture::Poll, FailurePolicy::DeadLetter, TooManyBlocked, 1, Restart),
            (Capture::Replication, FailurePolicy::Block, Envelope, 1, Halt),
            (Capture::Replication, FailurePolicy::Block, BrokerPermanent, 1, Halt),
            (Capture::Replication, FailurePolicy::Block, BrokerTransient, 1, Restart),
            (Capture::Replication, FailurePolicy::Block, TooManyBlocked, 1, Restart),
            (Capture::Replication, FailurePolicy::DeadLetter, Envelope, 1, DeadLetter),
            (Capture::Replication, FailurePolicy::DeadLetter, BrokerPermanent, 1, DeadLetter),
            (Capture::Replication, FailurePolicy::DeadLetter, BrokerTransient, 2, Restart),
            (Capture::Replication, FailurePolicy::DeadLetter, BrokerTransient, 3, DeadLetter),
        ];
        for (capture, policy, kind, attempts, expected) in table {
            assert_eq!(
                decide(rules(capture, policy), kind, attempts),
                expected,
                "{capture:?} {policy:?} {kind:?} {attempts}"
            );
        }
    }

    fn failure(position: i64, kind: FailureKind) -> FailedRow {
        FailedRow { row: Rejected::new(position, "boom"), kind, letter: None }
    }

    #[test]
    fn max_attempts_count_across_sessions_through_the_ledger() {
        let rules = rules(Capture::Replication, FailurePolicy::DeadLetter);
        let mut ledger = Ledger::default();
        let outcome =
            BatchOutcome { failed: vec![failure(7, FailureKind::BrokerTransient)], ..BatchOutcome::default() };
        for _ in 0..2 {
            let plan = plan(rules, &outcome, &mut ledger, |p| Some(EventKey::row(p)), |_| 0, 0);
            assert!(matches!(plan.end, Some(End::Restart(_))));
        }
        let plan = plan(rules, &outcome, &mut ledger, |p| Some(EventKey::row(p)), |_| 0, 0);
        assert!(plan.end.is_none());
        assert_eq!(plan.dead_letter.len(), 1, "the third attempt is dead-lettered");
    }

    #[test]
    fn stored_attempts_count_too() {
        let rules = rules(Capture::Poll, FailurePolicy::DeadLetter);
        let outcome =
            BatchOutcome { failed: vec![failure(7, FailureKind::BrokerTransient)], ..BatchOutcome::default() };
        let plan = plan(rules, &outcome, &mut Ledger::default(), |p| Some(EventKey::row(p)), |_| 2, 0);
        assert_eq!(plan.dead_letter.len(), 1);
    }

    #[test]
    fn the_most_severe_end_wins_and_deliveries_are_still_marked() {
        let rules = rules(Capture::Replication, FailurePolicy::Block);
        let outcome = BatchOutcome {
            delivered: vec![1, 2],
            failed: vec![failure(3, FailureKind::BrokerTransient), failure(4, FailureKind::Envelope)],
            ..BatchOutcome::default()
        };
        let mut ledger = Ledger::default();
        let plan = plan(rules, &outcome, &mut ledger, |p| Some(EventKey::row(p)), |_| 0, 0);
        assert_eq!(plan.mark, vec![1, 2]);
        assert!(matches!(&plan.end, Some(End::Halt(row)) if row.row.position == 4));
        assert_eq!(plan.to_record().count(), 1);
        assert!(ledger.was_acknowledged(&EventKey::row(1)));
        let fenced = BatchOutcome { fenced: true, ..BatchOutcome::default() };
        assert!(matches!(
            super::plan(rules, &fenced, &mut ledger, |p| Some(EventKey::row(p)), |_| 0, 0).end,
            Some(End::Fenced)
        ));
    }

    #[test]
    fn the_ledger_forgets_marked_rows_and_confirmed_transactions() {
        let mut ledger = Ledger::default();
        ledger.acknowledged(EventKey::row(1), 0);
        ledger.marked(&[1]);
        assert!(!ledger.was_acknowledged(&EventKey::row(1)));
        let key = EventKey { position: 5, txn: 100, message: false };
        ledger.acknowledged(key, 100);
        ledger.confirmed(100);
        assert!(ledger.was_acknowledged(&key), "confirming the commit LSN itself keeps it (the server may resend it)");
        ledger.confirmed(101);
        assert!(!ledger.was_acknowledged(&key));
    }

    #[test]
    fn the_ledger_is_bounded() {
        let mut ledger = Ledger::default();
        for i in 0..(LEDGER_CAPACITY as i64 + 10) {
            ledger.acknowledged(EventKey::row(i), 0);
            ledger.failed(EventKey::row(-i - 1));
        }
        assert_eq!(ledger.unsettled(), LEDGER_CAPACITY);
        assert!(ledger.attempts.len() <= LEDGER_CAPACITY);
    }

    /// The ledger against the plain map it replaced (retain on confirm),
    /// over random operations: same answers, and the index stays bounded.
    #[test]
    fn the_ordered_ledger_answers_like_a_plain_map() {
        let mut ledger = Ledger::default();
        let mut model: HashMap<EventKey, u64> = HashMap::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..20_000 {
            let position = next(50) as i64;
            let txn = next(6) * 10;
            let key = EventKey { position, txn, message: next(5) == 0 };
            match next(10) {
                0..=4 => {
                    let lsn = if next(8) == 0 { 0 } else { txn + next(3) };
                    ledger.acknowledged(key, lsn);
                    model.insert(key, lsn);
                }
                5 => {
                    ledger.marked(&[position]);
                    model.remove(&EventKey::row(position));
                }
                6 => {
                    ledger.settled(&key);
                    model.remove(&key);
                }
                _ => {
                    let lsn = next(70);
                    ledger.confirmed(lsn);
                    model.retain(|_, commit| *commit >= lsn);
                }
            }
            assert_eq!(ledger.unsettled(), model.len());
            for (k, _) in model.iter() {
                assert!(ledger.was_acknowledged(k));
            }
            assert_eq!(ledger.uncommitted, model.values().filter(|v| **v == 0).count());
            assert_eq!(ledger.indexed, ledger.by_commit.values().map(Vec::len).sum::<usize>());
        }
    }

    #[test]
    fn the_ledger_index_is_rebuilt_before_it_outgrows_its_bound() {
        let mut ledger = Ledger::default();
        // The same few keys acknowledged again and again at new LSNs, never confirmed.
        for lsn in 1..=(3 * LEDGER_CAPACITY as u64) {
            ledger.acknowledged(EventKey { position: (lsn % 4) as i64, txn: 1, message: false }, lsn);
        }
        assert!(ledger.indexed <= 2 * LEDGER_CAPACITY);
        assert_eq!(ledger.unsettled(), 4);
        ledger.confirmed(u64::MAX);
        assert_eq!(ledger.unsettled(), 0);
    }

    #[test]
    fn a_commit_with_nothing_of_ours_waits_for_the_open_marks() {
        // The defect: a commit arriving while a mark job is outstanding confirmed at once.
        let mut progress = LsnProgress::new(10);
        progress.open(0, Some(20));
        progress.commit(30);
        assert_eq!(progress.confirmed(), 10, "batch 0 is not marked yet");
        progress.settle(0);
        assert_eq!(progress.confirmed(), 30);
        progress.commit(40);
        assert_eq!(progress.confirmed(), 40, "nothing open: confirm at once");
    }

    #[test]
    fn only_a_settled_prefix_is_confirmed() {
        let mut progress = LsnProgress::new(0);
        progress.open(0, Some(10));
        progress.open(1, None);
        progress.open(2, Some(30));
        progress.settle(2);
        assert_eq!(progress.confirmed(), 0);
        progress.settle(0);
        assert_eq!(progress.confirmed(), 10);
        progress.caught_up(99);
        assert_eq!(progress.confirmed(), 10, "a keepalive never jumps over open steps");
        progress.settle(1);
        assert_eq!(progress.confirmed(), 30);
        progress.caught_up(99);
        assert_eq!(progress.confirmed(), 99);
    }
}

#[cfg(test)]
mod model_tests;
