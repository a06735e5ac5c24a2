//! Benchmark harness: the relay against the raw limits of its own machine.
//!
//! `cargo bench --bench harness -- [--events N] [--reps R] [--rates 1000,5000,20000,max|none] [--relays 1,2,4] [--quick]`
//!
//! Starts a private Postgres and a Kafka-protocol broker (tansu), then per
//! repetition measures, in the same run:
//! - raw broker limit: librdkafka producing pre-built envelopes (no database);
//! - raw database limits: bulk INSERT rate, and a bare keyset `SELECT` of the
//!   same columns the relay reads (no publishing);
//! - backlog drain: the relay binary draining N pre-loaded events, in mark and
//!   delete modes (time from process start to the last row marked);
//! - live: writers committing single-row transactions at fixed rates while the
//!   relay runs; latency from the writer's commit to the consumer receiving it.
//! - several relays (`--relays 1,2,4`): each polling scenario's drain again
//!   with N relay processes sharing the lanes (started together on the
//!   loaded outbox, so the time includes their hand-overs), with the CPU
//!   seconds of the relays, Postgres and the broker: where the time goes;
//! - Pub/Sub: the relay (poll/mark) draining the backlog to Google's Pub/Sub
//!   emulator, next to the emulator's raw publish rate (`--no-pubsub` skips).
//!
//! Relay peak RSS (VmHWM) and CPU seconds come from /proc. Results: medians
//! with min-max over the repetitions, as a Markdown table on stdout and in
//! `target/bench/results.md`.

#[path = "../tests/common/mod.rs"]
mod common;
use common::pubsub as pubsub_harness;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::TestBroker;
use outbox_relay::demo::postgres::ThrowawayPostgres;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::{Client, NoTls};

const TOPIC: &str = "outbox.Order";
const PARTITIONS: i32 = 8;
const AGGREGATES: usize = 1000;

struct Options {
    events: usize,
    reps: usize,
    rates: Vec<Option<u64>>,
    live_secs: u64,
    scenarios: Vec<Scenario>,
    /// Relay counts for the scale-out drains of polling scenarios (none by default).
    relays: Vec<usize>,
    /// Also drain to the Pub/Sub emulator (`--no-pubsub` skips it).
    pubsub: bool,
    /// Rows per transaction of the backlog loads (0: one bulk INSERT).
    shapes: Vec<usize>,
    /// Also drain the 1-row backlog under a CPU hog (`--no-hog` skips).
    hog: bool,
    /// Also run the Debezium-style table (`--no-debezium` skips).
    debezium: bool,
}

/// How a backlog shape is named in the results.
fn shape_name(per_txn: usize) -> String {
    match per_txn {
        0 => "bulk".into(),
        1 => "1 row/txn".into(),
        n => format!("{n} rows/txn"),
    }
}

/// A capture mode, a published mode and optionally exactly-once delivery,
/// e.g. `replication/none` or `poll/delete/exactly_once`.
#[derive(Debug, Clone)]
struct Scenario {
    capture: String,
    published: String,
    /// `sink.kafka.delivery` when not the default (`exactly_once`).
    delivery: Option<String>,
}

impl Scenario {
    fn parse(spec: &str) -> Option<Scenario> {
        let mut parts = spec.split('/');
        let capture = parts.next()?.to_owned();
        let published = parts.next()?.to_owned();
        let delivery = parts.next().map(str::to_owned);
        Some(Scenario { capture, published, delivery })
    }

    fn name(&self) -> String {
        match &self.delivery {
            Some(delivery) => format!("{}/{}/{delivery}", self.capture, self.published),
            None => format!("{}/{}", self.capture, self.published),
        }
    }

    fn replication(&self) -> bool {
        self.capture == "replication"
    }
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let quick = args.iter().any(|a| a == "--quick");
    let events = value("--events").and_then(|v| v.parse().ok()).unwrap_or(if quick { 100_000 } else { 1_000_000 });
    let reps = value("--reps").and_then(|v| v.parse().ok()).unwrap_or(if quick { 1 } else { 3 });
    let rates = value("--rates")
        .unwrap_or_else(|| if quick { "5000".into() } else { "1000,5000,20000,max".into() })
        .split(',')
        .filter(|r| *r != "none")
        .map(|r| if r == "max" { None } else { r.parse().ok() })
        .collect();
    let live_secs = value("--live-secs").and_then(|v| v.parse().ok()).unwrap_or(if quick { 5 } else { 10 });
    let scenarios = value("--scenarios")
        .unwrap_or_else(|| "poll/mark,poll/delete,replication/none,replication/mark".into())
        .split(',')
        .filter_map(Scenario::parse)
        .collect();
    let pubsub = !args.iter().any(|a| a == "--no-pubsub");
    let relays =
        value("--relays").unwrap_or_default().split(',').filter_map(|n| n.parse().ok()).filter(|n| *n >= 1).collect();
    let shapes = value("--shapes")
        .unwrap_or_else(|| "1,10,bulk".into())
        .split(',')
        .filter_map(|s| if s == "bulk" { Some(0) } else { s.parse().ok() })
        .collect();
    let hog = !args.iter().any(|a| a == "--no-hog");
    let debezium = !args.iter().any(|a| a == "--no-debezium");
    Options { events, reps, rates, live_secs, scenarios, relays, pubsub, shapes, hog, debezium }
}

fn main() {
    let opts = options();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(run(opts));
}

/// Per-repetition numbers, keyed by row label.
#[derive(Default)]
struct Samples {
    values: HashMap<String, Vec<f64>>,
    order: Vec<String>,
}

impl Samples {
    fn add(&mut self, label: &str, value: f64) {
        if !self.values.contains_key(label) {
            self.order.push(label.to_owned());
        }
        self.values.entry(label.to_owned()).or_default().push(value);
    }

    fn median(&self, label: &str) -> Option<f64> {
        let mut v = self.values.get(label)?.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        Some(v[v.len() / 2])
    }

    fn cell(&self, label: &str, digits: usize) -> String {
        let Some(v) = self.values.get(label) else { return "-".into() };
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let median = self.median(label).unwrap_or(0.0);
        if v.len() == 1 {
            format!("{median:.digits$}")
        } else {
            format!("{median:.digits$} ({min:.digits$}-{max:.digits$})")
        }
    }
}

async fn run(opts: Options) {
    let pg = ThrowawayPostgres::start().expect("postgres");
    let mut broker = TestBroker::start();
    migrate(&pg.url());
    let client = connect(&pg.url()).await;
    let mut samples = Samples::default();
    eprintln!("bench: {} events, {} repetitions, machine: {}", opts.events, opts.reps, machine());
    for rep in 0..opts.reps {
        eprintln!("bench: repetition {}/{} (load average {})", rep + 1, opts.reps, load_average());
        samples.add("load average (1 min) at start", load_average());
        // Raw broker limit.
        restart_broker(&mut broker);
        let produce_rate = raw_produce(&broker.bootstrap(), opts.events).await;
        samples.add("raw: librdkafka produce (events/s)", produce_rate);
        // The floor under any commit->consumer latency: the broker alone.
        restart_broker(&mut broker);
        let floor = broker_floor(&broker.bootstrap(), 5000, opts.live_secs).await;
        samples.add("broker floor 5000/s produce->consume: p50 latency (ms)", floor.0);
        samples.add("broker floor 5000/s produce->consume: p99 latency (ms)", floor.1);
        let mut quiet_1row: HashMap<String, f64> = HashMap::new();
        for &per_txn in &opts.shapes {
            let shape = shape_name(per_txn);
            // Raw database limits for this shape.
            reset(&client).await;
            let insert_rate = preload(&client, opts.events, per_txn).await;
            samples.add(&format!("{shape}: raw postgres INSERT (events/s)"), insert_rate);
            let select_rate = bare_select(&client, opts.events).await;
            samples.add(&format!("{shape}: raw postgres keyset SELECT (events/s)"), select_rate);
            // Raw logical replication read: the relay's wire client and pgoutput decoder, no publishing.
            reset(&client).await;
            recreate_slot(&client, "bench_raw").await;
            preload(&client, opts.events, per_txn).await;
            let read_rate = bare_replication_read(&pg.url(), "bench_raw", opts.events).await;
            drop_slot(&client, "bench_raw").await;
            samples
                .add(&format!("{shape}: raw pgoutput read, relay's wire client, no publishing (events/s)"), read_rate);
            // Backlog drain per scenario.
            for scenario in &opts.scenarios {
                let name = format!("{shape} {}", scenario.name());
                let drain = backlog_run(&pg.url(), &mut broker, &client, scenario, opts.events, per_txn).await;
                let rate = opts.events as f64 / drain.seconds;
                if per_txn == 1 {
                    quiet_1row.insert(scenario.name(), rate);
                }
                samples.add(&format!("{name} drain (events/s)"), rate);
                samples
                    .add(&format!("{name} drain relay CPU µs per event"), drain.cpu_seconds * 1e6 / opts.events as f64);
                if let Some((cpu, events)) = drain.steady {
                    samples.add(&format!("{name} drain relay CPU µs per event, start-up excluded"), cpu * 1e6 / events);
                }
                samples.add(&format!("{name} drain events per batch"), drain.events_per_batch);
                samples.add(&format!("{name} drain peak RSS (MiB)"), drain.peak_rss_mib);
                let db_limit = if scenario.replication() { read_rate } else { select_rate };
                samples.add(
                    &format!(
                        "{name} drain / bare {} read (%)",
                        if scenario.replication() { "pgoutput" } else { "SELECT" }
                    ),
                    100.0 * rate / db_limit,
                );
                samples
                    .add(&format!("{name} drain / tighter raw limit (%)"), 100.0 * rate / db_limit.min(produce_rate));
                if scenario.replication() || per_txn != 0 {
                    continue;
                }
                for &relays in &opts.relays {
                    reset(&client).await;
                    preload(&client, opts.events, per_txn).await;
                    restart_broker(&mut broker);
                    let shared = drain_shared(&pg.url(), &broker.bootstrap(), &client, scenario, relays).await;
                    let per_million = |cpu: f64| cpu * 1e6 / opts.events as f64;
                    let name = scenario.name();
                    samples
                        .add(&format!("{name} x{relays} relays drain (events/s)"), opts.events as f64 / shared.seconds);
                    samples.add(
                        &format!("{name} x{relays} relays: relays' CPU s per 1M events"),
                        per_million(shared.relays_cpu),
                    );
                    samples.add(
                        &format!("{name} x{relays} relays: Postgres CPU s per 1M events"),
                        per_million(shared.postgres_cpu),
                    );
                    samples.add(
                        &format!("{name} x{relays} relays: broker CPU s per 1M events"),
                        per_million(shared.broker_cpu),
                    );
                    samples.add(&format!("{name} x{relays} relays: machine CPU busy (%)"), shared.busy_percent);
                    samples.add(&format!("{name} x{relays} relays: peak RSS per relay (MiB)"), shared.peak_rss_mib);
                }
            }
        }
        // The 1-row backlog again with one busy process per core.
        if opts.hog {
            for scenario in &opts.scenarios {
                let hog = CpuHog::start();
                let drain = backlog_run(&pg.url(), &mut broker, &client, scenario, opts.events, 1).await;
                drop(hog);
                let name = format!("1 row/txn {} under CPU hog", scenario.name());
                let rate = opts.events as f64 / drain.seconds;
                samples.add(&format!("{name}: drain (events/s)"), rate);
                samples.add(&format!("{name}: events per batch"), drain.events_per_batch);
                if let Some(quiet) = quiet_1row.get(&scenario.name()) {
                    samples.add(&format!("{name}: / quiet rate (%)"), 100.0 * rate / quiet);
                }
            }
        }
        if opts.debezium {
            debezium_runs(&pg.url(), &mut broker, &client, opts.events, &mut samples).await;
        }
        // Backlog drain to the Pub/Sub emulator (its own functions, below).
        if opts.pubsub {
            pubsub_drain(&pg.url(), &client, opts.events, &mut samples).await;
        }
        // Live: fixed write rates.
        for scenario in &opts.scenarios {
            let name = scenario.name();
            for rate in &opts.rates {
                reset(&client).await;
                if scenario.replication() {
                    recreate_slot(&client, "outbox_relay").await;
                }
                restart_broker(&mut broker);
                let live = live(&pg.url(), &broker.bootstrap(), &client, scenario, *rate, opts.live_secs).await;
                if scenario.replication() {
                    drop_slot(&client, "outbox_relay").await;
                }
                let rate = rate.map(|r| format!("{r}/s")).unwrap_or_else(|| "max".into());
                samples.add(&format!("{name} live {rate}: achieved write rate (events/s)"), live.write_rate);
                samples.add(&format!("{name} live {rate}: p50 latency (ms)"), live.p50_ms);
                samples.add(&format!("{name} live {rate}: p99 latency (ms)"), live.p99_ms);
                samples.add(&format!("{name} live {rate}: p99.9 latency (ms)"), live.p999_ms);
                samples.add(&format!("{name} live {rate}: backlog 1 s after writers stop"), live.backlog_after as f64);
                samples.add(&format!("{name} live {rate}: peak RSS (MiB)"), live.peak_rss_mib);
                samples.add(
                    &format!("{name} live {rate}: relay CPU µs per event"),
                    live.cpu_seconds * 1e6 / live.events.max(1) as f64,
                );
                samples.add(&format!("{name} live {rate}: events per batch"), live.events_per_batch);
            }
        }
    }
    let report = render(&opts, &samples);
    println!("{report}");
    let _ = std::fs::create_dir_all("target/bench");
    let _ = std::fs::write("target/bench/results.md", &report);
}

fn render(opts: &Options, samples: &Samples) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Machine: {}. Events per backlog run: {}, payload ~300 B JSON, {} aggregates, {} partitions. Repetitions: {} (median, min-max).\n", machine(), opts.events, AGGREGATES, PARTITIONS, opts.reps);
    let _ = writeln!(out, "| measurement | value |\n|---|---|");
    for label in &samples.order {
        let digits = if label.contains("latency")
            || label.contains("CPU")
            || label.contains("per batch")
            || label.contains("load")
        {
            1
        } else {
            0
        };
        let _ = writeln!(out, "| {label} | {} |", samples.cell(label, digits));
    }
    out
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {:.0} GiB RAM", mem_kib as f64 / 1048576.0)
}

/// The relay binary: this build's, or `BENCH_RELAY_BIN` (e.g. an older
/// build, to compare two builds on the same machine back to back).
fn relay_bin() -> String {
    std::env::var("BENCH_RELAY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outbox-relay").to_owned())
}

fn migrate(url: &str) {
    let status = Command::new(env!("CARGO_BIN_EXE_outbox-relay"))
        .arg("migrate")
        .env("OUTBOX_RELAY_POSTGRES__URL", url)
        .env("OUTBOX_RELAY_SINK__KAFKA__BROKERS", "127.0.0.1:9")
        .stdout(Stdio::null())
        .status()
        .expect("migrate");
    assert!(status.success());
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

fn restart_broker(broker: &mut TestBroker) {
    broker.stop();
    broker.start_again();
    broker.create_topic(TOPIC, PARTITIONS);
    broker.create_topic("bench.raw", PARTITIONS);
}

async fn reset(client: &Client) {
    client.batch_execute("TRUNCATE outbox.events").await.expect("truncate");
    client.batch_execute("VACUUM ANALYZE outbox.events").await.expect("vacuum");
}

/// Loads `n` events, `per_txn` rows per transaction (0: the bulk INSERT an
/// application batch job would use, 100,000 rows per statement); returns
/// events/s (the raw write limit of that shape). Small transactions are
/// committed by a server-side procedure, so the load measures Postgres, not
/// client round trips.
async fn preload(client: &Client, n: usize, per_txn: usize) -> f64 {
    let started = Instant::now();
    if per_txn == 0 {
        let chunk = 100_000;
        let mut done = 0;
        while done < n {
            let upto = (done + chunk).min(n);
            client
                .execute(
                    "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'Order', 'order-' || (g % $3::int8), 'OrderUpdated', \
                            jsonb_build_object('seq', g / $3::int8, 'aggregate', g % $3::int8, 'sent_us', 0, 'pad', repeat('x', 220)) \
                     FROM generate_series($1::int8, $2::int8) g",
                    &[&(done as i64 + 1), &(upto as i64), &(AGGREGATES as i64)],
                )
                .await
                .expect("preload");
            done = upto;
        }
    } else {
        client
            .batch_execute(
                "CREATE OR REPLACE PROCEDURE public.bench_load(n int8, per int8, aggregates int8) LANGUAGE plpgsql AS $$ \
                 DECLARE g int8 := 1; BEGIN \
                   WHILE g <= n LOOP \
                     INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                     SELECT 'Order', 'order-' || (s % aggregates), 'OrderUpdated', \
                            jsonb_build_object('seq', s / aggregates, 'aggregate', s % aggregates, 'sent_us', 0, 'pad', repeat('x', 220)) \
                     FROM generate_series(g, least(g + per - 1, n)) s; \
                     COMMIT; g := g + per; \
                   END LOOP; END $$",
            )
            .await
            .expect("preload procedure");
        // Alone in its query string: a multi-statement string is one transaction, and the procedure commits.
        client
            .batch_execute(&format!("CALL public.bench_load({n}, {per_txn}, {AGGREGATES})"))
            .await
            .expect("preload in small transactions");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    client.batch_execute("VACUUM ANALYZE outbox.events").await.expect("vacuum");
    rate
}

/// Reads every unpublished row with the relay's columns in keyset batches of
/// 1000 and publishes nothing: how fast Postgres alone can hand rows out.
async fn bare_select(client: &Client, n: usize) -> f64 {
    let statement = client
        .prepare(
            "SELECT id::int8, event_id::text, aggregate_type::text, aggregate_id::text, event_type::text, \
                    event_version::int4, payload::text, headers::text, actor::text, traceparent::text, topic::text, created_at \
             FROM outbox.events WHERE published_at IS NULL AND id > $1 ORDER BY id LIMIT 1000",
        )
        .await
        .expect("prepare select");
    let started = Instant::now();
    let mut last = 0i64;
    let mut rows_read = 0usize;
    loop {
        let rows = client.query(&statement, &[&last]).await.expect("select");
        if rows.is_empty() {
            break;
        }
        rows_read += rows.len();
        for row in &rows {
            let payload: String = row.get(6);
            std::hint::black_box(payload);
        }
        last = rows[rows.len() - 1].get(0);
    }
    assert_eq!(rows_read, n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// librdkafka alone: pre-built envelopes of the relay's size, same keys and
/// producer settings as the relay; returns acknowledged events/s.
async fn raw_produce(bootstrap: &str, n: usize) -> f64 {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .create()
        .expect("producer");
    let value = vec![b'x'; 560];
    let keys: Vec<String> = (0..AGGREGATES).map(|a| format!("order-{a}")).collect();
    let started = Instant::now();
    let mut pending = Vec::with_capacity(10_000);
    for i in 0..n {
        let record = FutureRecord::to("bench.raw").key(&keys[i % AGGREGATES]).payload(&value);
        let mut record = record;
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((_, r)) => {
                    record = r;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        if pending.len() >= 10_000 {
            for d in pending.drain(..) {
                d.await.expect("delivery").expect("acked");
            }
        }
    }
    for d in pending.drain(..) {
        d.await.expect("delivery").expect("acked");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

struct RelayRun {
    child: Child,
    pid: u32,
    /// Where its /metrics listens (None: not known).
    http: Option<u16>,
}

/// A port free right now (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

impl RelayRun {
    fn start(url: &str, bootstrap: &str, scenario: &Scenario) -> RelayRun {
        RelayRun::start_with(url, bootstrap, scenario, &[])
    }

    fn start_with(url: &str, bootstrap: &str, scenario: &Scenario, extra: &[(&str, String)]) -> RelayRun {
        let port = free_port();
        let delivery = scenario.delivery.iter().map(|d| ("OUTBOX_RELAY_SINK__KAFKA__DELIVERY", d.as_str()));
        let child = Command::new(relay_bin())
            .arg("run")
            .envs(delivery)
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .env_remove("RUST_LOG")
            .env("OUTBOX_RELAY_POSTGRES__URL", url)
            .env("OUTBOX_RELAY_SINK__KAFKA__BROKERS", bootstrap)
            .env("OUTBOX_RELAY_SOURCE__MODE", &scenario.capture)
            .env("OUTBOX_RELAY_PUBLISHED__MODE", &scenario.published)
            .env("OUTBOX_RELAY_HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("OUTBOX_RELAY_LOG__LEVEL", std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start relay");
        let pid = child.id();
        RelayRun { child, pid, http: Some(port) }
    }

    /// Mean events per batch handed to the broker, from the relay's
    /// `outbox_relay_batch_size` histogram (NaN when unknown).
    fn events_per_batch(&self) -> f64 {
        match self.batches() {
            Some((batches, events)) if batches > 0.0 => events / batches,
            _ => f64::NAN,
        }
    }

    /// Batches handed to the broker so far and the events in them, from
    /// the relay's `outbox_relay_batch_size` histogram.
    fn batches(&self) -> Option<(f64, f64)> {
        use std::io::{Read, Write};
        let port = self.http?;
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
        socket.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        let _ = socket.read_to_string(&mut text);
        let metric = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        Some((metric("outbox_relay_batch_size_count")?, metric("outbox_relay_batch_size_sum")?))
    }

    /// Peak RSS in MiB (VmHWM).
    fn peak_rss_mib(&self) -> f64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kib| kib / 1024.0)
            .unwrap_or(0.0)
    }

    /// User + system CPU seconds so far.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
        let after = stat.rsplit(')').next().unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        (ticks(11) + ticks(12)) / hz
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct Drain {
    seconds: f64,
    peak_rss_mib: f64,
    cpu_seconds: f64,
    /// CPU seconds from the first batch sent to the end, and the events
    /// sent in that time: the drain without the relay's start-up.
    steady: Option<(f64, f64)>,
    events_per_batch: f64,
}

/// A fresh outbox (and slot) loaded with `events` in transactions of
/// `per_txn` rows, an empty broker, then the relay's drain of it.
async fn backlog_run(
    url: &str,
    broker: &mut TestBroker,
    client: &Client,
    scenario: &Scenario,
    events: usize,
    per_txn: usize,
) -> Drain {
    reset(client).await;
    if scenario.replication() {
        recreate_slot(client, "outbox_relay").await;
    }
    preload(client, events, per_txn).await;
    restart_broker(broker);
    let drain = drain_backlog(url, &broker.bootstrap(), client, scenario).await;
    if scenario.replication() {
        drop_slot(client, "outbox_relay").await;
    }
    drain
}

/// One busy process per core (`sh` spinning), stopped on drop: a loaded box.
struct CpuHog {
    children: Vec<Child>,
}

impl CpuHog {
    fn start() -> CpuHog {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        let children = (0..cores)
            .filter_map(|_| Command::new("sh").arg("-c").arg("while :; do :; done").stdout(Stdio::null()).spawn().ok())
            .collect();
        CpuHog { children }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The 1-minute load average from /proc/loadavg.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// The broker's own produce->consume latency at `rate` messages/s for
/// `secs` (same producer settings as the relay, same consumer as the live
/// runs): the floor under any commit->consumer figure. Returns (p50, p99) ms.
async fn broker_floor(bootstrap: &str, rate: u64, secs: u64) -> (f64, f64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let bootstrap = bootstrap.to_owned();
        let stop = stop.clone();
        std::thread::spawn(move || consume_latencies(&bootstrap, stop))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let keys: Vec<String> = (0..AGGREGATES).map(|a| format!("order-{a}")).collect();
    let pad = "x".repeat(400);
    let started = Instant::now();
    let total = rate * secs;
    let mut pending = Vec::new();
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let value = format!(r#"{{"payload":{{"sent_us":{},"pad":"{pad}"}}}}"#, now_us());
        let record = FutureRecord::to(TOPIC).key(&keys[i as usize % AGGREGATES]).payload(&value);
        if let Ok(delivery) = producer.send_result(record) {
            pending.push(delivery);
        }
    }
    for d in pending {
        let _ = d.await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut latencies = consumer.join().unwrap_or_default();
    let warm = (latencies.len() as f64 / secs as f64) as usize;
    let mut measured: Vec<f64> = latencies.drain(warm.min(latencies.len())..).collect();
    measured.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        measured
            .get(((measured.len() as f64 * p) as usize).min(measured.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    eprintln!("bench:   broker floor {rate}/s: p50 {:.1} ms, p99 {:.1} ms", pct(0.5), pct(0.99));
    (pct(0.5), pct(0.99))
}

/// Whether the scenario still has work: unpublished rows, rows left (delete
/// mode), or (replication/none) a slot behind `target` LSN.
async fn remaining(client: &Client, scenario: &Scenario, target: &str) -> bool {
    let sql = match scenario.published.as_str() {
        "delete" => "SELECT EXISTS (SELECT 1 FROM outbox.events) AND $1::text IS NOT NULL",
        "none" => {
            "SELECT coalesce(pg_wal_lsn_diff($1::text::pg_lsn, confirmed_flush_lsn) > 0, true) \
             FROM pg_replication_slots WHERE slot_name = 'outbox_relay'"
        }
        _ => "SELECT EXISTS (SELECT 1 FROM outbox.events WHERE published_at IS NULL) AND $1::text IS NOT NULL",
    };
    client.query_one(sql, &[&target]).await.expect("remaining").get(0)
}

async fn current_lsn(client: &Client) -> String {
    client.query_one("SELECT pg_current_wal_lsn()::text", &[]).await.expect("lsn").get(0)
}

async fn drop_slot(client: &Client, slot: &str) {
    client
        .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
        .await
        .expect("drop slot");
}

async fn recreate_slot(client: &Client, slot: &str) {
    drop_slot(client, slot).await;
    client
        .batch_execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_relay_pub') THEN \
               CREATE PUBLICATION outbox_relay_pub FOR TABLE outbox.events WITH (publish = 'insert'); END IF; END $$",
        )
        .await
        .expect("publication");
    client.execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&slot]).await.expect("create slot");
}

/// Reads `n` inserts from `slot` with the relay's own wire client and
/// decoder, publishing nothing: the physical limit of replication capture.
async fn bare_replication_read(url: &str, slot: &str, n: usize) -> f64 {
    use outbox_relay::source::replication::pgoutput::{Logical, WalMessage};
    use outbox_relay::source::replication::wire::{ConnectParams, ReplicationConnection};
    let config: tokio_postgres::Config = url.parse().expect("url");
    let params = ConnectParams::from_config(&config, "bench").expect("params");
    let started = Instant::now();
    let connection = ReplicationConnection::connect(&params).await.expect("replication connection");
    let command =
        format!("START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names 'outbox_relay_pub')");
    let mut stream = connection.start_replication(&command).await.expect("start replication");
    let mut inserts = 0usize;
    while inserts < n {
        let data = stream.reader.next_copy_data().await.expect("copy data").expect("stream open");
        match WalMessage::parse(data).expect("wal message") {
            WalMessage::XLogData { data, .. } => {
                if let Logical::Insert { values, .. } = Logical::parse(data).expect("pgoutput") {
                    std::hint::black_box(values);
                    inserts += 1;
                }
            }
            WalMessage::Keepalive { wal_end, reply } => {
                if reply {
                    stream.send_status(wal_end, false).await.expect("status");
                }
            }
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = stream.finish().await;
    drop(stream);
    tokio::time::sleep(Duration::from_millis(200)).await;
    rate
}

async fn drain_backlog(url: &str, bootstrap: &str, client: &Client, scenario: &Scenario) -> Drain {
    let target = current_lsn(client).await;
    let started = Instant::now();
    let relay = RelayRun::start(url, bootstrap, scenario);
    // The first batch: CPU and events so far (start-up is what came before it).
    let mut first_batch: Option<(f64, f64)> = None;
    while remaining(client, scenario, &target).await {
        if first_batch.is_none() {
            let cpu = relay.cpu_seconds();
            if let Some((_, events)) = relay.batches().filter(|(batches, _)| *batches > 0.0) {
                first_batch = Some((cpu, events));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < Duration::from_secs(900), "drain took over 15 minutes");
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = relay.cpu_seconds();
    let sent = relay.batches().map(|(_, events)| events);
    let steady = match (first_batch, sent) {
        (Some((cpu0, events0)), Some(events1)) if events1 > events0 => Some((cpu_seconds - cpu0, events1 - events0)),
        _ => None,
    };
    let drain = Drain {
        seconds,
        peak_rss_mib: relay.peak_rss_mib(),
        cpu_seconds,
        steady,
        events_per_batch: relay.events_per_batch(),
    };
    relay.stop();
    eprintln!(
        "bench:   {} drain {:.1} s, peak RSS {:.1} MiB, CPU {:.2} s, {:.0} events/batch (load {:.1})",
        scenario.name(),
        drain.seconds,
        drain.peak_rss_mib,
        drain.cpu_seconds,
        drain.events_per_batch,
        load_average()
    );
    drain
}

/// A drain by several relays sharing the lanes, and where the CPU went.
struct SharedDrain {
    seconds: f64,
    relays_cpu: f64,
    postgres_cpu: f64,
    broker_cpu: f64,
    /// All CPU used by relays, Postgres and broker over the machine's capacity.
    busy_percent: f64,
    /// The largest relay's peak RSS.
    peak_rss_mib: f64,
}

/// CPU seconds used so far by every live process whose name starts with
/// `name` (from /proc; processes that already exited are not counted).
fn cpu_by_name(name: &str) -> f64 {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    let mut total = 0.0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[open + 1..close].starts_with(name) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        total += (ticks(11) + ticks(12)) / hz;
    }
    total
}

/// Drains the preloaded backlog with `relays` relay processes started
/// together: the time includes their joining and the lane hand-overs.
async fn drain_shared(url: &str, bootstrap: &str, client: &Client, scenario: &Scenario, relays: usize) -> SharedDrain {
    let (postgres_before, broker_before) = (cpu_by_name("postgres"), cpu_by_name("tansu"));
    let started = Instant::now();
    let runs: Vec<RelayRun> = (0..relays).map(|_| RelayRun::start(url, bootstrap, scenario)).collect();
    while remaining(client, scenario, "0/0").await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < Duration::from_secs(900), "drain took over 15 minutes");
    }
    let seconds = started.elapsed().as_secs_f64();
    let relays_cpu: f64 = runs.iter().map(RelayRun::cpu_seconds).sum();
    let postgres_cpu = cpu_by_name("postgres") - postgres_before;
    let broker_cpu = cpu_by_name("tansu") - broker_before;
    let peak_rss_mib = runs.iter().map(RelayRun::peak_rss_mib).fold(0.0, f64::max);
    for run in runs {
        run.stop();
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    let busy_percent = 100.0 * (relays_cpu + postgres_cpu + broker_cpu) / (seconds * cores);
    eprintln!(
        "bench:   {} x{relays} relays drain {seconds:.1} s; CPU s relays {relays_cpu:.1}, postgres {postgres_cpu:.1}, broker {broker_cpu:.1}",
        scenario.name()
    );
    SharedDrain { seconds, relays_cpu, postgres_cpu, broker_cpu, busy_percent, peak_rss_mib }
}

struct Live {
    write_rate: f64,
    events: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    backlog_after: i64,
    peak_rss_mib: f64,
    cpu_seconds: f64,
    events_per_batch: f64,
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

/// Writers commit single-row transactions at `rate` (None: as fast as 4
/// connections can) for `secs`; a consumer timestamps arrivals.
async fn live(url: &str, bootstrap: &str, client: &Client, scenario: &Scenario, rate: Option<u64>, secs: u64) -> Live {
    let relay = RelayRun::start(url, bootstrap, scenario);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Start-up is not live traffic: CPU counts from here.
    let cpu_at_start = relay.cpu_seconds();
    let stop_consumer = Arc::new(AtomicBool::new(false));
    let consumer = {
        let bootstrap = bootstrap.to_owned();
        let stop = stop_consumer.clone();
        std::thread::spawn(move || consume_latencies(&bootstrap, stop))
    };
    let writers = 4usize;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move {
            let client = connect(&url).await;
            let insert = client
                .prepare(
                    "INSERT INTO outbox.events (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('sent_us', $2::int8, 'pad', repeat('x', 220)))",
                )
                .await
                .unwrap();
            let per_writer = rate.map(|r| r as f64 / writers as f64);
            let mut written = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                if let Some(per) = per_writer {
                    let due = started + Duration::from_secs_f64(written as f64 / per);
                    if due > Instant::now() {
                        tokio::time::sleep_until(due.into()).await;
                    }
                }
                client.execute(&insert, &[&format!("order-{}", i % AGGREGATES), &now_us()]).await.unwrap();
                written += 1;
                i += writers;
            }
            written
        }));
    }
    let mut written = 0u64;
    for t in tasks {
        written += t.await.unwrap();
    }
    let write_rate = written as f64 / started.elapsed().as_secs_f64();
    let target = current_lsn(client).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let backlog_after: i64 = client
        .query_one(
            match scenario.published.as_str() {
                "delete" => "SELECT count(*) FROM outbox.events",
                "none" => "SELECT count(*) FROM outbox.events WHERE false",
                _ => "SELECT count(*) FROM outbox.events WHERE published_at IS NULL",
            },
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let waited = Instant::now();
    while remaining(client, scenario, &target).await && waited.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_consumer.store(true, Ordering::Relaxed);
    let mut latencies = consumer.join().unwrap();
    // Warm-up: drop the first second of samples.
    let warm = (latencies.len() as f64 * (1.0 / secs as f64)) as usize;
    let mut measured: Vec<f64> = latencies.drain(warm.min(latencies.len())..).collect();
    measured.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        measured
            .get(((measured.len() as f64 * p) as usize).min(measured.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let result = Live {
        write_rate,
        events: written as usize,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        backlog_after,
        peak_rss_mib: relay.peak_rss_mib(),
        cpu_seconds: relay.cpu_seconds() - cpu_at_start,
        events_per_batch: relay.events_per_batch(),
    };
    relay.stop();
    eprintln!(
        "bench:   {} live {:?}: {:.0}/s written, p50 {:.1} ms, p99 {:.1} ms, backlog after {}",
        scenario.name(),
        rate,
        result.write_rate,
        result.p50_ms,
        result.p99_ms,
        result.backlog_after
    );
    result
}

/// Consumes until told to stop; returns per-message latency in ms from the
/// writer's commit (payload `sent_us`) to arrival here.
fn consume_latencies(bootstrap: &str, stop: Arc<AtomicBool>) -> Vec<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench")
        .set("enable.auto.commit", "false")
        // librdkafka's default, stated: exactly-once runs are measured as their consumers see them.
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "5")
        .set("fetch.min.bytes", "1")
        .create()
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(TOPIC, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let arrived = now_us();
            if let Some(payload) = m.payload() {
                if let Ok(value) = serde_json::from_slice::<serde_json::Value>(payload) {
                    if let Some(sent) = value["payload"]["sent_us"].as_i64() {
                        latencies.push((arrived - sent) as f64 / 1000.0);
                    }
                }
            }
        }
    }
    latencies
}

// ------------------------------------------------------------ Debezium table
//
// Debezium's documented outbox table (uuid id) plus the `seq` identity
// column with an index that polling needs, loaded one row per transaction,
// drained by poll/delete (position `seq`) and replication/none (position
// `id`) with the Debezium envelope.

const DEBEZIUM_TOPIC: &str = "outbox.event.Order";

/// The relay's configuration for the Debezium table.
fn debezium_config(position: &str) -> String {
    format!(
        r#"
[source]
table = "public.outbox"
[source.columns]
position = "{position}"
event_id = "id"
aggregate_type = "aggregatetype"
aggregate_id = "aggregateid"
event_type = "type"
payload = "payload"
created_at = "timestamp"
traceparent = "tracingspancontext"
event_version = ""
headers = ""
actor = ""
topic = ""
published_at = ""
attempts = ""
last_error = ""
failed_at = ""
dead_lettered_at = ""
[source.replication]
publication = "bench_dbz_pub"
[envelope]
format = "debezium"
"#
    )
}

async fn debezium_runs(url: &str, broker: &mut TestBroker, client: &Client, events: usize, samples: &mut Samples) {
    client
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pgcrypto; \
             CREATE TABLE IF NOT EXISTS public.outbox (
               id uuid NOT NULL PRIMARY KEY,
               aggregatetype varchar(255) NOT NULL,
               aggregateid varchar(255) NOT NULL,
               type varchar(255) NOT NULL,
               timestamp timestamp NOT NULL,
               payload jsonb,
               tracingspancontext varchar(256),
               seq bigint GENERATED ALWAYS AS IDENTITY);
             CREATE INDEX IF NOT EXISTS outbox_seq ON public.outbox (seq);
             DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'bench_dbz_pub') THEN \
               CREATE PUBLICATION bench_dbz_pub FOR TABLE public.outbox WITH (publish = 'insert'); END IF; END $$;
             CREATE OR REPLACE PROCEDURE public.bench_load_dbz(n int8, aggregates int8) LANGUAGE plpgsql AS $$
             BEGIN FOR s IN 1..n LOOP
               INSERT INTO public.outbox (id, aggregatetype, aggregateid, type, timestamp, payload)
               VALUES (gen_random_uuid(), 'Order', 'order-' || (s % aggregates), 'OrderUpdated', now(),
                       jsonb_build_object('seq', s / aggregates, 'aggregate', s % aggregates, 'sent_us', 0, 'pad', repeat('x', 220)));
               COMMIT;
             END LOOP; END $$;",
        )
        .await
        .expect("debezium table");
    let dir = std::env::temp_dir().join(format!("bench-dbz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for (capture, published, position) in [("poll", "delete", "seq"), ("replication", "none", "id")] {
        let scenario = Scenario { capture: capture.into(), published: published.into(), delivery: None };
        let path = dir.join(format!("{capture}.toml"));
        std::fs::write(&path, debezium_config(position)).expect("write config");
        client.batch_execute("TRUNCATE public.outbox").await.expect("truncate");
        client.batch_execute("VACUUM ANALYZE public.outbox").await.expect("vacuum");
        if scenario.replication() {
            drop_slot(client, "outbox_relay").await;
            client
                .execute("SELECT pg_create_logical_replication_slot('outbox_relay', 'pgoutput')", &[])
                .await
                .expect("slot");
        }
        let started = Instant::now();
        client.batch_execute(&format!("CALL public.bench_load_dbz({events}, {AGGREGATES})")).await.expect("load");
        let load_rate = events as f64 / started.elapsed().as_secs_f64();
        client.batch_execute("VACUUM ANALYZE public.outbox").await.expect("vacuum");
        restart_broker(broker);
        broker.create_topic(DEBEZIUM_TOPIC, PARTITIONS);
        let target = current_lsn(client).await;
        let started = Instant::now();
        let relay = RelayRun::start_with(
            url,
            &broker.bootstrap(),
            &scenario,
            &[("OUTBOX_RELAY_CONFIG", path.display().to_string())],
        );
        loop {
            let left: bool = if scenario.replication() {
                remaining(client, &scenario, &target).await
            } else {
                client.query_one("SELECT EXISTS (SELECT 1 FROM public.outbox)", &[]).await.expect("remaining").get(0)
            };
            if !left {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert!(started.elapsed() < Duration::from_secs(900), "Debezium drain took over 15 minutes");
        }
        let seconds = started.elapsed().as_secs_f64();
        let (cpu, per_batch, rss) = (relay.cpu_seconds(), relay.events_per_batch(), relay.peak_rss_mib());
        relay.stop();
        if scenario.replication() {
            drop_slot(client, "outbox_relay").await;
        }
        let name = format!("Debezium table (uuid id + seq), 1 row/txn, {}", scenario.name());
        eprintln!("bench:   {name}: drain {seconds:.1} s, CPU {cpu:.2} s, {per_batch:.0} events/batch");
        samples.add(&format!("{name}: load (events/s)"), load_rate);
        samples.add(&format!("{name}: drain (events/s)"), events as f64 / seconds);
        samples.add(&format!("{name}: relay CPU µs per event"), cpu * 1e6 / events as f64);
        samples.add(&format!("{name}: events per batch"), per_batch);
        samples.add(&format!("{name}: peak RSS (MiB)"), rss);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ------------------------------------------------------------------ Pub/Sub
//
// Backlog drain to Google's Pub/Sub emulator, reported as its own rows next
// to the emulator's raw REST publish rate measured in the same run. The
// emulator is one Java process on this machine: its throughput says nothing
// about Pub/Sub in GCP (where the limits are per ordering key, ~1 MB/s, and
// scale with keys and concurrent requests).

const PUBSUB_PROJECT: &str = "outbox-relay-bench";

/// poll/mark draining `events` pre-loaded rows to the emulator.
async fn pubsub_drain(url: &str, client: &Client, events: usize, samples: &mut Samples) {
    let bin = std::env::var("PUBSUB_EMULATOR_BIN")
        .unwrap_or_else(|_| "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator".into());
    if !std::path::Path::new(&bin).is_file() {
        eprintln!("bench: Pub/Sub emulator not found at {bin} (apt-get install google-cloud-cli-pubsub-emulator); skipping the Pub/Sub rows");
        return;
    }
    let emulator = pubsub_harness::PubSubEmulator::start();
    pubsub_harness::PubSubClient::new(&emulator.host(), PUBSUB_PROJECT).create_topic(TOPIC).await;
    let raw = pubsub_raw_publish(&emulator.host(), events).await;
    samples.add("raw: Pub/Sub emulator REST publish (events/s)", raw);
    reset(client).await;
    preload(client, events, 0).await;
    let scenario = Scenario { capture: "poll".into(), published: "mark".into(), delivery: None };
    let started = Instant::now();
    let child = Command::new(relay_bin())
        .arg("run")
        .env_remove("RUST_LOG")
        .env("OUTBOX_RELAY_POSTGRES__URL", url)
        .env("OUTBOX_RELAY_SINK__KIND", "pubsub")
        .env("OUTBOX_RELAY_SINK__PUBSUB__PROJECT", PUBSUB_PROJECT)
        .env("PUBSUB_EMULATOR_HOST", emulator.host())
        .env("OUTBOX_RELAY_HTTP__LISTEN", "127.0.0.1:0")
        .env("OUTBOX_RELAY_LOG__LEVEL", std::env::var("BENCH_RELAY_LOG").unwrap_or_else(|_| "warn".into()))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start relay");
    let relay = RelayRun { pid: child.id(), child, http: None };
    while remaining(client, &scenario, "0/0").await {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(started.elapsed() < Duration::from_secs(900), "Pub/Sub drain took over 15 minutes");
    }
    let seconds = started.elapsed().as_secs_f64();
    let (rss, cpu) = (relay.peak_rss_mib(), relay.cpu_seconds());
    relay.stop();
    eprintln!("bench:   poll/mark -> Pub/Sub emulator drain {seconds:.1} s, peak RSS {rss:.1} MiB");
    samples.add("poll/mark -> Pub/Sub emulator drain (events/s)", events as f64 / seconds);
    samples.add("poll/mark -> Pub/Sub emulator drain peak RSS (MiB)", rss);
    samples.add("poll/mark -> Pub/Sub emulator drain CPU s per 1M events", cpu * 1e6 / events as f64);
    samples
        .add("poll/mark -> Pub/Sub emulator drain / raw emulator publish (%)", 100.0 * events as f64 / seconds / raw);
}

/// The emulator's own limit: pre-built publish requests of 100 messages
/// (one ordering key each, as Pub/Sub requires), 64 in flight, envelopes
/// like the relay's; events/s.
async fn pubsub_raw_publish(host: &str, events: usize) -> f64 {
    use base64::Engine as _;
    use futures::StreamExt as _;
    use http_body_util::{BodyExt, Full};
    let http: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let per_request = 100;
    let bodies: Vec<(String, bytes::Bytes, usize)> = (0..events.div_ceil(per_request))
        .map(|r| {
            let key = format!("order-{}", r % AGGREGATES);
            let count = per_request.min(events - r * per_request);
            let messages: Vec<serde_json::Value> = (0..count)
                .map(|i| {
                    let value = format!(
                        r#"{{"envelope_version":"1","event_id":"{:08x}-0000-4000-8000-000000000000","event_type":"OrderUpdated","event_version":1,"aggregate_type":"Order","aggregate_id":"{key}","timestamp":"2026-01-01T00:00:00.000000Z","actor":null,"headers":{{}},"payload":{{"seq":{i},"pad":"{}"}}}}"#,
                        r * per_request + i,
                        "x".repeat(220)
                    );
                    serde_json::json!({
                        "data": base64::engine::general_purpose::STANDARD.encode(value),
                        "attributes": {"event_type": "OrderUpdated", "event_version": "1", "envelope_version": "1", "aggregate_type": "Order", "aggregate_id": key},
                        "orderingKey": key,
                    })
                })
                .collect();
            let body = serde_json::json!({ "messages": messages }).to_string();
            (format!("http://{host}/v1/projects/{PUBSUB_PROJECT}/topics/{TOPIC}:publish"), bytes::Bytes::from(body), count)
        })
        .collect();
    let started = Instant::now();
    let published: usize = futures::stream::iter(bodies)
        .map(|(url, body, count)| {
            let http = http.clone();
            async move {
                let request = hyper::Request::post(url)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .expect("request");
                let response = http.request(request).await.expect("emulator publish");
                let ok = response.status().is_success();
                let _ = response.into_body().collect().await;
                if ok {
                    count
                } else {
                    0
                }
            }
        })
        .buffer_unordered(64)
        .fold(0, |sum, n| async move { sum + n })
        .await;
    let rate = published as f64 / started.elapsed().as_secs_f64();
    eprintln!("bench:   raw Pub/Sub emulator publish {rate:.0} events/s ({published} events)");
    rate
}
