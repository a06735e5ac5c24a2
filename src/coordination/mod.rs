//! Several relays on one outbox (one per application pod), coordinated
//! through Postgres alone: no extra coordinator to deploy.
//!
//! ```text
//!   relay a ─┐  every tick: heartbeat,   outbox.relay_members  who is alive
//!   relay b ─┼─ renew, take or hand ───▶ outbox.relay_leases   who holds lane k,
//!   relay c ─┘  back lanes                                     until when
//! ```
//!
//! **Polling** splits the outbox into `replicas.lanes` lanes by a hash of
//! aggregate_id ([`lane_sql`]): all events of one aggregate are in one lane,
//! and only the lane's holder claims them. Each relay aims for its fair share
//! ([`quota::fair_share`]) of the live relays: below it, it takes free or
//! expired lanes; above it, it hands lanes back, but only at a quiet point:
//! its claim loop stops claiming the lane, waits until everything it had in
//! flight is acknowledged and marked, and reports that ([`Coordinator::adopt`]);
//! only then is the lease released. A dead relay's lanes are taken once its
//! leases expire, and the new holder claims from the lane's oldest unmarked
//! row. Either way an aggregate's events go out in order across hand-overs.
//!
//! **Replication** has a single lease, the slot's: its holder (the leader)
//! streams, the others stand by and take it over once it expires.
//!
//! # Fencing
//! Expiry is decided by the database clock. A holder counts its leases as
//! valid until the moment it *sent* its last successful renewal plus the
//! lease minus one tick, on its own monotonic clock, which always ends before
//! the database's expiry. Past that ([`Fence::holds`] is false) it claims,
//! publishes and confirms nothing: a relay frozen beyond its lease (SIGSTOP,
//! a stalled VM, a partition) wakes up fenced and its session ends. Claims
//! also test the lease by the database clock in the same statement.

pub mod quota;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tracing::{info, warn, Instrument};
use uuid::Uuid;

pub use store::{holdings, Holding};

use crate::config::Config;
use crate::postgres::{self, PostgresError};

/// The lane an aggregate belongs to, as SQL over `aggregate` (a text
/// expression). `hashtextextended` is the hash Postgres itself uses for hash
/// partitioning, so it is the same on every relay and stays stable across
/// upgrades.
pub fn lane_sql(aggregate: &str, lanes: i32) -> String {
    format!("((hashtextextended(coalesce({aggregate}, ''), 0) & 9223372036854775807) % {lanes})::int4")
}

/// What a claim may take, and under which lease (see [`crate::coordination`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimScope {
    /// The lease rows' resource (the outbox table, or the slot in replication).
    pub resource: String,
    /// Lanes of that resource's layout.
    pub lanes: i32,
    /// This relay process.
    pub instance: Uuid,
    /// Split rows into lanes by aggregate (polling); else every row belongs
    /// to lane 0 (the replication leader's recovery drain).
    pub by_lane: bool,
}

/// A SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

impl ClaimScope {
    /// SQL that is true only while every lane in `lanes` (an int4[]
    /// parameter such as `$4`) is still leased to this relay, by the
    /// database clock: a claim fenced by it cannot read rows of a lane
    /// another relay took over.
    pub fn fence_sql(&self, lanes: &str) -> String {
        format!(
            " AND (SELECT count(*) = cardinality({lanes}::int4[]) AND cardinality({lanes}::int4[]) > 0 \
               FROM outbox.relay_leases WHERE resource = {} AND lanes = {} AND instance = {} \
               AND expires_at > now() AND lane = ANY({lanes}::int4[]))",
            literal(&self.resource),
            self.lanes,
            literal(&self.instance.to_string()),
        )
    }

    /// SQL that keeps only rows whose aggregate (`aggregate`, a text
    /// expression) falls in `lanes`; empty when rows are not split by lane.
    pub fn lane_test_sql(&self, aggregate: &str, lanes: &str) -> String {
        if self.by_lane {
            format!(" AND {} = ANY({lanes}::int4[])", lane_sql(aggregate, self.lanes))
        } else {
            String::new()
        }
    }
}

/// Errors that end a coordinated session.
#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    /// The lease tables could not be read or written.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// A lease ran out before it was renewed; someone else may hold it now.
    #[error("lost the lease on {0}: this relay stopped renewing it in time (frozen, overloaded or cut off from Postgres) and another relay may hold it now; rejoining")]
    LeaseLost(String),
}

/// Lease timing from `replicas.takeover_within`: renew every tenth of it,
/// leases last seven tenths, so a dead holder's work is taken over within
/// about the whole.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How often leases are renewed and free lanes looked for.
    pub tick: Duration,
    /// How long a renewal lasts by the database clock.
    pub lease: Duration,
}

impl Timing {
    /// Timing for `takeover_within`.
    pub fn new(takeover_within: Duration) -> Timing {
        Timing { tick: takeover_within / 10, lease: takeover_within * 7 / 10 }
    }

    /// How long after sending a renewal its holder may still act on it.
    fn valid_for(&self) -> Duration {
        self.lease.saturating_sub(self.tick)
    }
}

/// What a group of relays shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// The outbox table (`schema.table`) or `slot:<name>`.
    pub name: String,
    /// Lanes it is split into (1 for the slot).
    pub lanes: i32,
    /// Share the lanes fairly (polling); else hold the single lease whenever it is free.
    pub share: bool,
}

impl Resource {
    /// The lanes of a polled outbox table.
    pub fn lanes_of(table: String, lanes: u32) -> Resource {
        Resource { name: table, lanes: lanes as i32, share: true }
    }

    /// The replication slot's single lease.
    pub fn slot(slot: &str) -> Resource {
        Resource { name: format!("slot:{slot}"), lanes: 1, share: false }
    }

    /// Where a relay that runs but cannot take work yet (its broker is not
    /// reachable at start-up) shows itself: a resource of its own, so it is
    /// visible to `status` but never counted in the fair share of lanes.
    pub fn waiting_room(&self) -> Resource {
        Resource { name: format!("{WAITING_ROOM}{}", self.name), lanes: self.lanes, share: false }
    }
}

/// Prefix of [`Resource::waiting_room`] names.
const WAITING_ROOM: &str = "waiting:";

/// Shows `me` as running but waiting (see [`Resource::waiting_room`]) for
/// `expires_after`; renew before then.
pub async fn announce_waiting(
    client: &tokio_postgres::Client,
    resource: &Resource,
    me: &Identity,
    expires_after: Duration,
) -> Result<(), PostgresError> {
    store::heartbeat(client, &resource.waiting_room(), me, expires_after).await
}

/// Stops showing `me` as waiting: it joins the real resource now.
pub async fn stop_waiting(
    client: &tokio_postgres::Client,
    resource: &Resource,
    me: &Identity,
) -> Result<(), PostgresError> {
    store::leave(client, &resource.waiting_room(), me).await
}

/// This relay process, as the lease table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Unique per process, so a mistakenly shared relay_id never shares a lease.
    pub instance: Uuid,
    /// `replicas.relay_id`.
    pub relay_id: String,
}

impl Identity {
    /// A new process identity named `relay_id`.
    pub fn new(relay_id: String) -> Identity {
        Identity { instance: Uuid::new_v4(), relay_id }
    }
}

/// Whether this relay may still act on its leases. Lock-free: replication
/// checks it for every message it reads.
#[derive(Debug, Clone, Default)]
pub struct Fence(Arc<AtomicU64>);

/// The instant fence deadlines are measured from (nanoseconds after it; 0 = none).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Fence {
    /// True while the last renewal still covers now.
    pub fn holds(&self) -> bool {
        let deadline = self.0.load(Ordering::Acquire);
        deadline != 0 && (Instant::now().saturating_duration_since(epoch()).as_nanos() as u64) < deadline
    }

    fn extend_to(&self, deadline: Instant) {
        let nanos = deadline.saturating_duration_since(epoch()).as_nanos() as u64;
        self.0.store(nanos.max(1), Ordering::Release);
    }

    fn revoke(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// The lanes this relay holds, as the claim loop should see them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Bumped on every change.
    pub version: u64,
    /// Lanes leased to this relay.
    pub held: BTreeSet<i32>,
    /// Held lanes to hand back once nothing of theirs is in flight.
    pub releasing: BTreeSet<i32>,
    /// Lanes in the layout.
    pub lanes: i32,
    /// Relays (`relay_id`) whose expired leases this relay took over, so
    /// far: exactly-once delivery fences their Kafka producers and reads
    /// their position before publishing for those lanes.
    pub taken_from: BTreeSet<String>,
}

impl Assignment {
    /// The lanes to claim from.
    pub fn claimable(&self) -> Vec<i32> {
        self.held.difference(&self.releasing).copied().collect()
    }
}

/// A running coordinator: a task with its own connection that keeps this
/// relay's membership and leases, so a claim loop held up by a slow broker
/// still renews in time.
pub struct Coordinator {
    assignment: watch::Receiver<Assignment>,
    adopted: watch::Sender<(u64, BTreeSet<i32>)>,
    fence: Fence,
    leave: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), CoordinationError>>,
    resource: Resource,
    me: Identity,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Coordinator {
    /// Joins `resource` as `me` and runs the first round before returning,
    /// so the assignment and fence already reflect the database.
    pub async fn start(config: &Config, resource: Resource, me: Identity) -> Result<Coordinator, CoordinationError> {
        let timing = Timing::new(config.replicas.takeover_within);
        let connection = postgres::connect(&config.postgres, "outbox-relay leases").await?;
        store::ensure_lanes(&connection.client, &resource).await?;
        let fence = Fence::default();
        let mut state = State::new(resource.clone(), me.clone(), timing, fence.clone());
        let (adopted, mut adopted_rx) = watch::channel((0u64, BTreeSet::new()));
        let mut connection = connection;
        let initial = adopted_rx.borrow_and_update().clone();
        state.round(&mut connection.client, &initial).await?;
        let (assignment_tx, assignment) = watch::channel(state.assignment.clone());
        let (leave, mut leave_rx) = oneshot::channel();
        let task = tokio::spawn(
            async move {
                let mut tick = interval(timing.tick);
                tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    let full = tokio::select! {
                        _ = tick.tick() => true,
                        changed = adopted_rx.changed() => {
                            if changed.is_err() {
                                return Ok(());
                            }
                            false
                        }
                        _ = &mut leave_rx => {
                            state.leave(&connection.client).await;
                            return Ok(());
                        }
                    };
                    let adopted = { adopted_rx.borrow_and_update().clone() };
                    let result = if full {
                        state.round(&mut connection.client, &adopted).await
                    } else {
                        state.release_quiet(&connection.client, &adopted).await
                    };
                    if let Err(error) = result {
                        state.fence.revoke();
                        return Err(error);
                    }
                    assignment_tx.send_if_modified(|current| {
                        let changed = *current != state.assignment;
                        if changed {
                            *current = state.assignment.clone();
                        }
                        changed
                    });
                }
            }
            .in_current_span(),
        );
        Ok(Coordinator { assignment, adopted, fence, leave: Some(leave), task, resource, me })
    }

    /// What this relay's claims may take, fenced by these leases.
    pub fn claim_scope(&self) -> ClaimScope {
        ClaimScope {
            resource: self.resource.name.clone(),
            lanes: self.resource.lanes,
            instance: self.me.instance,
            by_lane: self.resource.share,
        }
    }

    /// Follows the assignment.
    pub fn assignment(&self) -> watch::Receiver<Assignment> {
        self.assignment.clone()
    }

    /// The fence every claim, publish and confirmation checks.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The claim loop reached a quiet point (nothing in flight) at
    /// assignment `version` and now claims exactly `lanes`; lanes it no
    /// longer claims can be handed back.
    pub fn adopt(&self, version: u64, lanes: &[i32]) {
        let _ = self.adopted.send((version, lanes.iter().copied().collect()));
    }

    /// Resolves when the coordinator fails (the session must end).
    pub async fn failed(&mut self) -> CoordinationError {
        match (&mut self.task).await {
            Ok(Err(error)) => error,
            Ok(Ok(())) => CoordinationError::LeaseLost(format!("{} (the coordinator stopped)", self.resource.name)),
            Err(join) => {
                CoordinationError::LeaseLost(format!("{} (the coordinator task failed: {join})", self.resource.name))
            }
        }
    }

    /// Leaves after the session drained: hands every lease back at once so
    /// the others need not wait for expiry. Best effort: on failure the
    /// leases simply expire.
    pub async fn leave(mut self) {
        if let Some(leave) = self.leave.take() {
            if leave.send(()).is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(3), &mut self.task).await;
            }
        }
    }
}

/// The coordinator task's state.
struct State {
    resource: Resource,
    me: Identity,
    timing: Timing,
    fence: Fence,
    assignment: Assignment,
    /// Releasing lanes, with the assignment version that first said so.
    releasing_since: BTreeMap<i32, u64>,
    /// Whether the "other lane count" warning was logged.
    warned_layout: bool,
    /// Whether the "more relays than lanes" note was logged.
    warned_idle: bool,
    /// Rounds run so far: the first one only announces this relay.
    rounds: u64,
}

impl State {
    fn new(resource: Resource, me: Identity, timing: Timing, fence: Fence) -> State {
        let assignment = Assignment { lanes: resource.lanes, ..Assignment::default() };
        State {
            resource,
            me,
            timing,
            fence,
            assignment,
            releasing_since: BTreeMap::new(),
            warned_layout: false,
            warned_idle: false,
            rounds: 0,
        }
    }

    fn bump(&mut self) {
        self.assignment.version += 1;
    }

    /// Heartbeat, renew, rebalance, release what is quiet.
    async fn round(
        &mut self,
        client: &mut tokio_postgres::Client,
        adopted: &(u64, BTreeSet<i32>),
    ) -> Result<(), CoordinationError> {
        let sent = Instant::now();
        store::heartbeat(client, &self.resource, &self.me, self.timing.lease).await?;
        let renewed = store::renew(client, &self.resource, &self.me, self.timing.lease).await?;
        let lost: Vec<i32> = self.assignment.held.difference(&renewed).copied().collect();
        if !lost.is_empty() {
            return Err(CoordinationError::LeaseLost(format!("{} lanes {lost:?}", self.resource.name)));
        }
        if renewed != self.assignment.held {
            // A new session of this process finds its still-valid leases.
            self.assignment.held = renewed;
            self.bump();
        }
        if !self.assignment.held.is_empty() {
            self.fence.extend_to(sent + self.timing.valid_for());
        }
        let members = store::members(client, &self.resource).await?;
        let same: Vec<&store::Member> = members.iter().filter(|m| m.lanes == self.resource.lanes).collect();
        let index = same.iter().position(|m| m.instance == self.me.instance).unwrap_or(same.len());
        let share = if self.resource.share {
            quota::fair_share(self.resource.lanes as usize, same.len().max(index + 1), index)
        } else {
            1
        };
        let held = self.assignment.held.len();
        // The first round only announces this relay when other relays are
        // alive: relays started together (a deployment rolling out) then see
        // each other before anyone takes lanes, instead of one taking every
        // lane, racing ahead on a backlog and handing most of them back a
        // tick later. A relay that finds no other live member takes its work
        // at once (a lone relay streams within milliseconds of starting, not
        // a tick later); one started a moment after it sees it and waits.
        let alone = members.iter().all(|m| m.instance == self.me.instance);
        let joining = self.rounds == 0 && !alone;
        self.rounds += 1;
        if joining {
            return self.release_quiet(client, adopted).await;
        }
        if held < share {
            let acquired = store::acquire(client, &self.resource, &self.me, share - held, self.timing.lease).await?;
            if let Some(other) = acquired.other_layout {
                if !self.warned_layout {
                    warn!(
                        outbox = %self.resource.name,
                        lanes = self.resource.lanes,
                        other_lanes = other,
                        "relays with another replicas.lanes still hold lanes of this outbox; this relay waits until they are gone \
                         (two lane counts at once would split an aggregate's events between relays); set the same replicas.lanes everywhere"
                    );
                    self.warned_layout = true;
                }
            } else if !acquired.lanes.is_empty() {
                self.warned_layout = false;
                let taken: Vec<i32> = acquired.lanes.iter().map(|(lane, _)| *lane).collect();
                let from: BTreeSet<&str> =
                    acquired.lanes.iter().filter_map(|(_, previous)| previous.as_deref()).collect();
                self.fence.extend_to(sent + self.timing.valid_for());
                self.assignment.held.extend(taken.iter().copied());
                self.assignment.taken_from.extend(from.iter().map(|r| (*r).to_owned()));
                self.bump();
                if self.resource.share {
                    info!(outbox = %self.resource.name, lanes = ?taken, previous_holders = ?from, holding = self.assignment.held.len(), share, "took lanes");
                }
            }
        } else if held > share && self.resource.share {
            let keep = self.assignment.held.len() - self.assignment.releasing.len();
            if keep > share {
                let kept: Vec<i32> = self.assignment.held.difference(&self.assignment.releasing).copied().collect();
                let give: Vec<i32> = kept.iter().rev().take(keep - share).copied().collect();
                self.bump();
                for lane in &give {
                    self.assignment.releasing.insert(*lane);
                    self.releasing_since.insert(*lane, self.assignment.version);
                }
                info!(outbox = %self.resource.name, lanes = ?give, relays = same.len(), share, "handing lanes back once their in-flight events are acknowledged");
            }
        }
        if self.resource.share && share == 0 && !self.warned_idle {
            info!(outbox = %self.resource.name, relays = same.len(), lanes = self.resource.lanes, "more relays than lanes: this one stands by (raise replicas.lanes to use it)");
            self.warned_idle = true;
        }
        self.release_quiet(client, adopted).await
    }

    /// Releases the lanes the claim loop stopped claiming at a quiet point
    /// after being told to.
    async fn release_quiet(
        &mut self,
        client: &tokio_postgres::Client,
        adopted: &(u64, BTreeSet<i32>),
    ) -> Result<(), CoordinationError> {
        let (version, claiming) = adopted;
        let quiet: Vec<i32> = self
            .releasing_since
            .iter()
            .filter(|(lane, since)| **since <= *version && !claiming.contains(lane))
            .map(|(lane, _)| *lane)
            .collect();
        if quiet.is_empty() {
            return Ok(());
        }
        store::release(client, &self.resource, &self.me, &quiet).await?;
        for lane in &quiet {
            self.releasing_since.remove(lane);
            self.assignment.releasing.remove(lane);
            self.assignment.held.remove(lane);
        }
        self.bump();
        info!(outbox = %self.resource.name, lanes = ?quiet, holding = self.assignment.held.len(), "handed lanes back");
        Ok(())
    }

    async fn leave(&mut self, client: &tokio_postgres::Client) {
        self.fence.revoke();
        match store::leave(client, &self.resource, &self.me).await {
            Ok(()) => info!(outbox = %self.resource.name, "left: leases handed back"),
            Err(error) => warn!(%error, "could not hand leases back; they expire by themselves"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_takes_over_within_the_configured_time() {
        let t = Timing::new(Duration::from_secs(10));
        assert_eq!(t.tick, Duration::from_secs(1));
        assert_eq!(t.lease, Duration::from_secs(7));
        // A dead holder's lease runs out at most `lease` after its last
        // renewal; the next tick of another relay takes it.
        assert!(t.lease + t.tick < Duration::from_secs(10));
        assert!(t.valid_for() < t.lease);
    }

    #[test]
    fn a_fence_holds_only_until_its_deadline() {
        let fence = Fence::default();
        assert!(!fence.holds(), "nothing renewed yet");
        fence.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(fence.holds());
        fence.extend_to(Instant::now() - Duration::from_millis(1));
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + Duration::from_secs(60));
        fence.revoke();
        assert!(!fence.holds());
    }

    #[test]
    fn releasing_lanes_are_not_claimable() {
        let a =
            Assignment { version: 3, held: [1, 2, 3].into(), releasing: [3].into(), lanes: 4, ..Assignment::default() };
        assert_eq!(a.claimable(), vec![1, 2]);
    }

    #[test]
    fn a_quote_in_a_name_cannot_escape_its_literal() {
        assert_eq!(literal("a'b"), "'a''b'");
    }

    #[test]
    fn lane_sql_hashes_like_hash_partitioning_and_never_yields_a_negative_lane() {
        let sql = lane_sql("\"aggregate_id\"::text", 32);
        assert!(
            sql.starts_with("((hashtextextended(coalesce(\"aggregate_id\"::text, ''), 0) & 9223372036854775807) % 32)")
        );
    }
}
