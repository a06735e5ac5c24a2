//! Several relays on one outbox, as sidecars run: three relay processes
//! under steady writes; one is SIGKILLed, a new one starts, another is
//! frozen (SIGSTOP) beyond its lease and woken again. At the end every event
//! is present, each aggregate's events arrived in order, duplicates are
//! bounded, and the work is spread evenly again.
//!
//! Fencing is judged on what every event carries, not on a log line: each
//! message's timestamp is the producer's clock when a relay handed it to
//! librdkafka, so a relay that sent anything after it woke without its
//! lease shows up as a second copy of an event, sent after the wake-up.

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::consume;
use common::relay::{connect, verify, wait_all_published_or, wait_published_at_least, write_events, RelayProcess};
use common::replicas::{copies_sent_within, lines_with, Cluster, TAKEOVER, TOPIC};

const AGGREGATES: usize = 300;
const PER_AGGREGATE: usize = 100;

/// Steady writes for the whole scenario: about 20 s of load.
fn steady_writes(url: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { write_events(&url, AGGREGATES, PER_AGGREGATE, 3, Duration::from_millis(3)).await })
}

fn report(mode: &str, verdict: &common::relay::Verdict, spread: &[(String, usize)]) {
    println!("replicas | mode | events | lost | duplicates | order violations | final spread");
    println!(
        "kill + join + freeze | {mode} | {} | {} | {} | {} | {spread:?}",
        AGGREGATES * PER_AGGREGATE,
        verdict.lost,
        verdict.duplicates,
        verdict.order_violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_polling_relays_share_lanes_and_survive_kill_join_and_freeze() {
    // GIVEN three relays on one outbox, the lanes spread evenly, writers running
    let c = Cluster::start(false, Vec::new());
    let mut a = c.relay("relay-a");
    let b = c.relay("relay-b");
    let _r3 = c.relay("relay-c");
    c.wait_evenly_spread(&["relay-a", "relay-b", "relay-c"], Duration::from_secs(30));
    let writers = steady_writes(c.pg.url());
    let client = connect(&c.pg.url()).await;
    wait_published_at_least(&client, 1000, Duration::from_secs(60), || b.log()).await;

    // WHEN one is killed, a new one joins, and another freezes beyond its lease
    a.kill();
    let spread = c.wait_evenly_spread(&["relay-b", "relay-c"], TAKEOVER * 3);
    println!("after SIGKILL of relay-a: {spread:?}");
    let _d = c.relay("relay-d");
    c.wait_evenly_spread(&["relay-b", "relay-c", "relay-d"], Duration::from_secs(30));
    b.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    let spread = c.wait_evenly_spread(&["relay-c", "relay-d"], TAKEOVER * 3);
    println!("relay-b frozen; its lanes taken over after {:?}: {spread:?}", frozen.elapsed());
    // Part of the scenario, not a wait for a state: the new holders work
    // the lanes for a while before the old holder wakes up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woken = Utc::now();
    b.signal(libc::SIGCONT);

    // THEN the frozen relay publishes nothing before it rejoins, the lanes
    // spread evenly over the three live relays again, and every event is
    // present once at least, in order per aggregate
    writers.await.expect("writers");
    wait_all_published_or(&client, Duration::from_secs(120), || b.log()).await;
    let spread = c.wait_evenly_spread(&["relay-b", "relay-c", "relay-d"], Duration::from_secs(30));
    let log = b.log();
    let rejoined = lines_with(&log, "joined the relays on this outbox").into_iter().find(|t| *t > woken);
    let rejoined = rejoined.unwrap_or_else(|| panic!("relay-b never rejoined after SIGCONT:\n{log}"));
    assert!(log.contains("lease"), "the frozen relay says it lost its lease:\n{log}");

    let total = AGGREGATES * PER_AGGREGATE;
    let consumed = consume(&c.broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let fenced = copies_sent_within(&consumed, woken + chrono::Duration::milliseconds(500), Some(rejoined));
    assert!(fenced.is_empty(), "events sent twice after relay-b woke, before it rejoined: {fenced:?}\n{log}");
    let verdict = verify(&consumed, AGGREGATES, PER_AGGREGATE);
    report("poll", &verdict, &spread);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    // At most the killed and the frozen relay's in-flight windows (5 batches of 1000) again.
    assert!(verdict.duplicates <= 2 * 5 * 1000, "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replication_relays_fail_over_and_fence_the_deposed_leader() {
    // GIVEN three relays on one slot: one streams, two stand by
    let c = Cluster::start(true, Vec::new());
    let mut relays: Vec<(String, RelayProcess)> =
        ["relay-a", "relay-b", "relay-c"].iter().map(|id| (id.to_string(), c.relay(id))).collect();
    let leader = c.wait_leader(&relays, None, Duration::from_secs(30));
    let writers = steady_writes(c.pg.url());
    let client = connect(&c.pg.url()).await;
    wait_published_at_least(&client, 1000, Duration::from_secs(60), || relays[leader].1.log()).await;

    // WHEN the leader is killed, a standby takes over within takeover_within
    let killed_at = Instant::now();
    relays[leader].1.kill();
    let killed = relays.remove(leader).0;
    let leader = c.wait_leader(&relays, Some(&killed), TAKEOVER * 3);
    let takeover = killed_at.elapsed();
    println!("leader {killed} killed; {} streams after {takeover:?}", relays[leader].0);
    assert!(takeover < TAKEOVER + Duration::from_secs(4), "takeover took {takeover:?}");

    // AND a new relay joins (as a standby), and the leader freezes beyond its lease
    relays.push(("relay-d".into(), c.relay("relay-d")));
    assert!(relays[2].1.wait_for_log("standing by", Duration::from_secs(30)), "{}", relays[2].1.log());
    let frozen_id = relays[leader].0.clone();
    relays[leader].1.signal(libc::SIGSTOP);
    let frozen_at = Instant::now();
    let new_leader = c.wait_leader(&relays, Some(&frozen_id), TAKEOVER * 3);
    println!("leader {frozen_id} frozen; {} streams after {:?}", relays[new_leader].0, frozen_at.elapsed());
    // The frozen leader's walsender still held the slot: the new leader cut it off.
    assert!(relays[new_leader].1.log().contains("terminated it"), "{}", relays[new_leader].1.log());
    // Part of the scenario: the new leader streams for a while before the old one wakes up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let woken = Utc::now();
    relays[leader].1.signal(libc::SIGCONT);

    // THEN the deposed leader publishes and confirms nothing after waking,
    // the new leader delivers everything, in order per aggregate
    writers.await.expect("writers");
    wait_all_published_or(&client, Duration::from_secs(120), || relays[new_leader].1.log()).await;
    // Give the deposed leader time to misbehave if it would (there is no state to wait for).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deposed = relays[leader].1.log();
    assert!(
        deposed.contains("lapsed") || deposed.contains("lost the lease"),
        "the deposed leader says why it stopped:\n{deposed}"
    );
    let streaming = c.streaming();
    assert_eq!(streaming, vec![relays[new_leader].0.clone()], "exactly one relay streams: {}", c.status());

    let total = AGGREGATES * PER_AGGREGATE;
    let consumed = consume(&c.broker.bootstrap(), &[TOPIC], total, Duration::from_secs(60));
    let late = copies_sent_within(&consumed, woken + chrono::Duration::milliseconds(500), None);
    assert!(late.is_empty(), "events sent twice after the deposed leader woke: {late:?}\n{deposed}");
    let verdict = verify(&consumed, AGGREGATES, PER_AGGREGATE);
    let spread: Vec<(String, usize)> = c.holdings();
    report("replication", &verdict, &spread);
    assert_eq!(verdict.lost, 0, "{verdict:?}");
    assert_eq!(verdict.order_violations, 0, "{verdict:?}");
    // Each failover re-streams what the slot had not confirmed yet.
    assert!(verdict.duplicates <= 2 * 5 * 1000, "{verdict:?}");
}
