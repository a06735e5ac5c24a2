//! Several relay processes on one outbox, for scenarios that kill, add and
//! freeze relays: a private Postgres and tansu shared by relays named by
//! `replicas.relay_id`, who holds what (from `outbox-relay status`), and
//! waits for the lanes or the slot to settle.
//!
//! Used by `tests/replicas.rs` and, with extra relay settings (another
//! delivery mode), by `tests/exactly_once.rs`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::relay::{cli, migrate_with, relay_env, RelayProcess};
use super::{Consumed, TestBroker, ThrowawayPostgres};

/// The topic the relays publish to.
pub const TOPIC: &str = "outbox.Order";
/// `replicas.takeover_within` in these tests ([`relay_env`]).
pub const TAKEOVER: Duration = Duration::from_secs(4);
/// Lanes: few enough to read in a failure message.
pub const LANES: usize = 12;

/// A Postgres, a broker with [`TOPIC`] (6 partitions), migrated for
/// several relays in one capture mode.
pub struct Cluster {
    pub pg: ThrowawayPostgres,
    pub broker: TestBroker,
    replication: bool,
    extra: Vec<(&'static str, String)>,
}

impl Cluster {
    /// Starts both and runs `migrate`; every relay also gets `extra` settings.
    pub fn start(replication: bool, extra: Vec<(&'static str, String)>) -> Cluster {
        let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
        let broker = TestBroker::start();
        broker.create_topic(TOPIC, 6);
        let cluster = Cluster { pg, broker, replication, extra };
        migrate_with(&cluster.env("migrate"));
        cluster
    }

    /// A relay's environment under `relay_id`.
    pub fn env(&self, relay_id: &str) -> Vec<(&'static str, String)> {
        let mut env = relay_env(&self.pg.url(), &self.broker.bootstrap());
        env.push(("OUTBOX_RELAY_REPLICAS__RELAY_ID", relay_id.to_owned()));
        env.push(("OUTBOX_RELAY_REPLICAS__LANES", LANES.to_string()));
        if self.replication {
            env.push(("OUTBOX_RELAY_SOURCE__MODE", "replication".into()));
            env.push(("OUTBOX_RELAY_PUBLISHED__MODE", "mark".into()));
        }
        env.extend(self.extra.iter().cloned());
        env
    }

    /// Starts `outbox-relay run` as `relay_id`.
    pub fn relay(&self, relay_id: &str) -> RelayProcess {
        RelayProcess::start(&["run"], &self.env(relay_id))
    }

    /// `outbox-relay status --json`.
    pub fn status(&self) -> serde_json::Value {
        let (code, out, err) = cli(&["status", "--json"], &self.env("status"));
        assert_eq!(code, 0, "status: {err}");
        serde_json::from_str(&out).expect("status --json")
    }

    /// relay_id -> lanes held, from `status` (replication: 1 for the relay streaming the slot).
    pub fn holdings(&self) -> Vec<(String, usize)> {
        let status = self.status();
        status["relays"]
            .as_array()
            .expect("relays")
            .iter()
            .map(|r| {
                let held = r["lanes"].as_array().map_or(usize::from(r["role"] == "streaming"), Vec::len);
                (r["relay_id"].as_str().unwrap_or_default().to_owned(), held)
            })
            .collect()
    }

    /// The relays `status` shows streaming the slot.
    pub fn streaming(&self) -> Vec<String> {
        let status = self.status();
        status["relays"]
            .as_array()
            .expect("relays")
            .iter()
            .filter(|r| r["role"] == "streaming")
            .filter_map(|r| r["relay_id"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `status` shows `relay_id` in `role` (`waiting`, `standby`, `claiming`, `streaming`).
    pub fn wait_role(&self, relay_id: &str, role: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.status();
            let relays = status["relays"].as_array().expect("relays");
            if relays.iter().any(|r| r["relay_id"] == relay_id && r["role"] == role) {
                return;
            }
            assert!(Instant::now() < deadline, "{relay_id} not {role} after {timeout:?}: {status}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until exactly `relays` relays are live and every lane is held,
    /// spread evenly (counts differ by at most one); returns the spread.
    pub fn wait_evenly_spread(&self, relays: &[&str], timeout: Duration) -> Vec<(String, usize)> {
        let deadline = Instant::now() + timeout;
        loop {
            let holdings = self.holdings();
            let total: usize = holdings.iter().map(|(_, n)| n).sum();
            let counts: Vec<usize> = holdings.iter().map(|(_, n)| *n).collect();
            let mut names: Vec<&str> = holdings.iter().map(|(id, _)| id.as_str()).collect();
            names.sort_unstable();
            let mut want = relays.to_vec();
            want.sort_unstable();
            let even = counts.iter().max().zip(counts.iter().min()).is_some_and(|(max, min)| max - min <= 1);
            if total == LANES && even && names == want {
                return holdings;
            }
            assert!(
                Instant::now() < deadline,
                "lanes not evenly spread over {relays:?} after {timeout:?}: {holdings:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Index in `relays` of the one relay that streams the slot (per
    /// `status`, and its log says it streams), other than `not`.
    pub fn wait_leader(&self, relays: &[(String, RelayProcess)], not: Option<&str>, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let holdings = self.holdings();
            let leaders: Vec<&String> =
                holdings.iter().filter(|(id, n)| *n > 0 && Some(id.as_str()) != not).map(|(id, _)| id).collect();
            if let [leader] = leaders.as_slice() {
                if let Some(index) = relays.iter().position(|(id, _)| id == *leader) {
                    if relays[index].1.log().contains("streaming from the replication slot") {
                        return index;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no single leader after {timeout:?}: {holdings:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Timestamps of the log lines that contain `needle`.
pub fn lines_with(log: &str, needle: &str) -> Vec<DateTime<Utc>> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .collect()
}

/// Copies of an event sent again (by the producer's clock, the record's
/// CreateTime) after `from` and before `until`: every copy of an event but
/// its first. Once a takeover is over, the relays holding the work send each
/// event once, so such a copy can only come from a relay that lost its
/// lease and sent anyway. Returns `event_id @ time` for the failure message.
pub fn copies_sent_within(consumed: &[Consumed], from: DateTime<Utc>, until: Option<DateTime<Utc>>) -> Vec<String> {
    let mut sent: HashMap<String, Vec<i64>> = HashMap::new();
    for message in consumed {
        let value: serde_json::Value = serde_json::from_slice(&message.value).expect("envelope is JSON");
        let id = value["event_id"].as_str().expect("event_id").to_owned();
        sent.entry(id).or_default().push(message.timestamp_ms.expect("every message has a timestamp"));
    }
    let inside = |ms: i64| ms > from.timestamp_millis() && until.is_none_or(|until| ms < until.timestamp_millis());
    let mut late = Vec::new();
    for (id, mut times) in sent {
        times.sort_unstable();
        late.extend(times.into_iter().skip(1).filter(|ms| inside(*ms)).map(|ms| format!("{id} @ {ms}")));
    }
    late
}
