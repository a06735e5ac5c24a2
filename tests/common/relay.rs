//! Running the real `outbox-relay` binary, writing events the way
//! applications do, and checking what consumers received.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use super::{Consumed, TestBroker, ThrowawayPostgres};

/// The relay binary as a child process, its output in a log file.
pub struct RelayProcess {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RelayProcess {
    /// Starts `outbox-relay <args>` with the given environment.
    pub fn start(args: &[&str], env: &[(&str, String)]) -> RelayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("relay.log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
        command
            .args(args)
            .env_remove("RUST_LOG")
            .env("OUTBOX_RELAY_LOG__LEVEL", "info,outbox_relay=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start outbox-relay");
        RelayProcess { child: Some(child), log, _dir: dir }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no chance to drain or mark anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal without waiting.
    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Waits for exit up to `timeout`; None if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log) {
            let _ = file.read_to_string(&mut text);
        }
        text
    }

    /// The address of the relay's HTTP endpoint, from its log.
    pub fn http_address(&self, timeout: Duration) -> String {
        assert!(self.wait_for_log("http endpoint listening", timeout), "{}", self.log());
        let log = self.log();
        let line = log.lines().find(|l| l.contains("http endpoint listening")).unwrap_or_default();
        let start = line.find("address=").map(|i| i + "address=".len()).unwrap_or(0);
        line[start..].split_whitespace().next().unwrap_or_default().to_owned()
    }

    /// Peak resident memory (VmHWM) of the relay process, MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        let Some(child) = &self.child else { return 0.0 };
        std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Standard environment for a relay against `pg_url` and `brokers`.
pub fn relay_env(pg_url: &str, brokers: &str) -> Vec<(&'static str, String)> {
    vec![
        ("OUTBOX_RELAY_POSTGRES__URL", pg_url.to_owned()),
        ("OUTBOX_RELAY_SINK__KAFKA__BROKERS", brokers.to_owned()),
        ("OUTBOX_RELAY_SOURCE__POLL_INTERVAL", "200ms".to_owned()),
        ("OUTBOX_RELAY_SHUTDOWN__DRAIN_TIMEOUT", "10s".to_owned()),
        ("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0".to_owned()),
        // Takeovers in seconds, not the default 10 s, so tests stay quick.
        ("OUTBOX_RELAY_REPLICAS__TAKEOVER_WITHIN", "4s".to_owned()),
    ]
}

/// Runs `outbox-relay migrate` and asserts it succeeded.
pub fn migrate(pg_url: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("migrate")
        .env("OUTBOX_RELAY_POSTGRES__URL", pg_url)
        .env("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9")
        .output()
        .expect("run migrate");
    assert!(output.status.success(), "migrate failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// Runs `outbox-relay migrate` with a whole relay environment (in
/// replication mode it creates the publication and the slot too, so it runs
/// before any event is written) and asserts it succeeded.
pub fn migrate_with(env: &[(&str, String)]) {
    let (code, _, err) = cli(&["migrate"], env);
    assert_eq!(code, 0, "migrate failed: {err}");
}

/// A private Postgres, migrated, and a broker with topic `topic`: what most
/// end-to-end tests start from.
pub struct Stack {
    pub pg: ThrowawayPostgres,
    pub broker: TestBroker,
}

impl Stack {
    /// Starts both, creates `topic` with `partitions` and runs `migrate`.
    pub fn start(topic: &str, partitions: i32) -> Stack {
        let pg = ThrowawayPostgres::start().expect("start throwaway postgres");
        let broker = TestBroker::start();
        broker.create_topic(topic, partitions);
        migrate(&pg.url());
        Stack { pg, broker }
    }
}

/// Polls `condition` every 50 ms until it holds (true) or `timeout` passes
/// (false): for states only a log or an HTTP answer shows.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Where the replication slot `outbox_relay` has confirmed up to, as a byte
/// position (`confirmed_flush_lsn - '0/0'`).
pub async fn slot_confirmed(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'outbox_relay'",
            &[],
        )
        .await
        .expect("read the slot's confirmed_flush_lsn")
        .get(0)
}

/// A connected client whose connection is driven in the background.
pub async fn connect(pg_url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(pg_url, NoTls).await.expect("connect to test postgres");
    tokio::spawn(connection);
    client
}

/// Creates the login role `relay` with what a polling relay needs on the
/// lease tables, and `privileges` (e.g. "SELECT, DELETE") on outbox.events:
/// a least-privilege relay whose grants a test can then change.
pub async fn create_relay_role(admin: &Client, privileges: &str) {
    admin
        .batch_execute(&format!(
            "CREATE ROLE relay LOGIN; \
             GRANT USAGE ON SCHEMA outbox TO relay; \
             GRANT {privileges} ON outbox.events TO relay; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON outbox.relay_leases, outbox.relay_members TO relay;"
        ))
        .await
        .expect("create the relay role");
}

/// Writes `per_aggregate` events for each of `aggregates` aggregates from
/// `writers` concurrent connections. Writer `w` owns the aggregates whose
/// number is `w` mod `writers`, so each aggregate's sequence numbers commit
/// in order while different writers' transactions interleave and commit out
/// of id order, as real applications do. `pause` slows writers down to make
/// a steady stream.
pub async fn write_events(pg_url: &str, aggregates: usize, per_aggregate: usize, writers: usize, pause: Duration) {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = pg_url.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let owned: Vec<usize> = (0..aggregates).filter(|a| a % writers == w).collect();
            let insert = client
                .prepare(
                    "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload, traceparent) \
                     VALUES ('Order', $1, 'OrderUpdated', $2, $3)",
                )
                .await
                .expect("prepare insert");
            for seq in 1..=per_aggregate {
                // A few aggregates per transaction, like a service handling a burst.
                for chunk in owned.chunks(3) {
                    let tx = client.transaction().await.expect("begin");
                    for a in chunk {
                        let payload = serde_json::json!({ "seq": seq, "aggregate": a, "pad": "x".repeat(64) });
                        let traceparent = (seq % 10 == 0).then(|| format!("00-{:032x}-{:016x}-01", a + 1, seq));
                        tx.execute(&insert, &[&format!("order-{a}"), &payload, &traceparent])
                            .await
                            .expect("insert event");
                    }
                    tx.commit().await.expect("commit");
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer task");
    }
}

/// Rows not yet published.
pub async fn unpublished(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NULL", &[])
        .await
        .expect("count unpublished")
        .get(0)
}

/// Waits until no row is unpublished; panics with the count after `timeout`.
pub async fn wait_all_published(client: &Client, timeout: Duration) {
    wait_all_published_or(client, timeout, String::new).await
}

/// Like [`wait_all_published`]; a timeout also prints `context()` (a relay's log).
pub async fn wait_all_published_or(client: &Client, timeout: Duration, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    loop {
        let left = unpublished(client).await;
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} events still unpublished after {timeout:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Rows marked published so far.
pub async fn published(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM outbox.events WHERE published_at IS NOT NULL", &[])
        .await
        .expect("count published")
        .get(0)
}

/// Waits until at least `n` rows are published (a state, where a test would
/// otherwise sleep "long enough" for work to be under way); a timeout
/// panics with `context()` (a relay's log).
pub async fn wait_published_at_least(client: &Client, n: i64, timeout: Duration, context: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    loop {
        let done = published(client).await;
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{done} of at least {n} events published after {timeout:?}\n{}", context());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `outbox-relay <args>` to completion: (exit code, stdout, stderr).
pub fn cli(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_outbox-relay"));
    command.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("run outbox-relay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What consumers received, checked against what was written.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Distinct events received.
    pub unique: usize,
    /// Extra copies (allowed after crashes, bounded by the in-flight window).
    pub duplicates: usize,
    /// Events written but never received.
    pub lost: usize,
    /// Times an aggregate's first-seen sequence did not follow its predecessor.
    pub order_violations: usize,
}

/// How the writer numbered each aggregate's events (`payload.seq`), which
/// decides what "in order" can demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbering {
    /// 1, 2, 3, ... per aggregate ([`write_events`]): each first-seen event
    /// must be its predecessor plus one, so a gap is caught too.
    Contiguous,
    /// Increasing, with gaps (one counter shared by all aggregates): each
    /// first-seen event must be larger than the one before.
    Increasing,
}

/// The one order checker. Walks the messages in partition/offset order and
/// looks at each `(key, payload.seq)` the first time it appears (a later
/// copy is a duplicate, which at-least-once allows, not a violation).
/// Messages without `payload.seq` are skipped.
pub fn check_order(consumed: &[Consumed], numbering: Numbering) -> Verdict {
    let mut messages: Vec<&Consumed> = consumed.iter().collect();
    messages.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut seen = HashSet::new();
    let mut last: HashMap<Vec<u8>, i64> = HashMap::new();
    let mut verdict = Verdict::default();
    for message in messages {
        let value: serde_json::Value = serde_json::from_slice(&message.value).expect("envelope is JSON");
        let Some(seq) = value["payload"]["seq"].as_i64() else { continue };
        let key = message.key.clone().expect("message has a key");
        assert_eq!(value["aggregate_id"].as_str().map(str::as_bytes), Some(key.as_slice()), "key is the aggregate id");
        if !seen.insert((key.clone(), seq)) {
            verdict.duplicates += 1;
            continue;
        }
        let previous = last.insert(key, seq);
        let in_order = match numbering {
            Numbering::Contiguous => seq == previous.unwrap_or(0) + 1,
            Numbering::Increasing => previous.is_none_or(|previous| seq > previous),
        };
        if !in_order {
            verdict.order_violations += 1;
        }
    }
    verdict.unique = seen.len();
    verdict
}

/// Checks delivery of [`write_events`]' events: every `(aggregate,
/// 1..=per_aggregate)` present, and each aggregate's events, first
/// occurrences only, in sequence order with no gap.
pub fn verify(consumed: &[Consumed], aggregates: usize, per_aggregate: usize) -> Verdict {
    let mut verdict = check_order(consumed, Numbering::Contiguous);
    verdict.lost = aggregates * per_aggregate - verdict.unique.min(aggregates * per_aggregate);
    verdict
}

/// A plain HTTP/1.1 GET; returns (status code, body).
pub fn http_get(address: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = match std::net::TcpStream::connect(address) {
        Ok(stream) => stream,
        Err(_) => return (0, String::new()),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// Sum of a metric's samples (all label sets) in Prometheus text format.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{')))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}
