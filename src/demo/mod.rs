//! `outbox-relay demo`: the zero-setup first run.
//!
//! Starts a throwaway Postgres from the system's binaries and librdkafka's
//! in-process mock Kafka cluster, installs the schema, enqueues sample order
//! events the way an application would (inside its own transactions), runs
//! the real relay, consumes everything back and checks it. `--config` is
//! honoured for everything but the Postgres URL and the brokers (the demo's
//! own); `--mode replication` captures through a logical replication slot.

pub mod postgres;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_postgres::NoTls;

use self::postgres::ThrowawayPostgres;
use crate::config::{Config, SinkKind, SourceMode};
use crate::metrics::Metrics;
use crate::relay::Relay;
use crate::shutdown;
use crate::sink::kafka::KafkaSink;

/// The sample's (aggregate_type, event_type) pairs; topics are rendered from them.
const SAMPLE_TYPES: [(&str, &str); 6] = [
    ("Order", "OrderPlaced"),
    ("Order", "OrderPaid"),
    ("Order", "OrderPacked"),
    ("Order", "OrderShipped"),
    ("Order", "OrderDelivered"),
    ("Customer", "CustomerContacted"),
];
const PARTITIONS: i32 = 6;

/// Runs the demo and prints a summary to stdout. `config` is the user's
/// `--config` (unvalidated: the demo supplies Postgres and the brokers);
/// `mode` overrides `source.mode`.
pub async fn run(events: usize, config: Config, mode: Option<SourceMode>) -> anyhow::Result<()> {
    let events = events.clamp(10, 100_000);
    let mut config = config;
    if let Some(mode) = mode {
        config.source.mode = mode;
    }
    println!("outbox-relay demo\n");
    println!("1. starting a throwaway PostgreSQL cluster ...");
    let pg = tokio::task::spawn_blocking(ThrowawayPostgres::start).await.context("demo task")??;
    println!("   postgres on 127.0.0.1:{} (wal_level=logical)", pg.port());
    println!("2. starting librdkafka's in-process mock Kafka cluster (3 brokers) ...");
    let cluster = MockCluster::new(3).context("cannot start the mock Kafka cluster")?;
    let template = crate::envelope::TopicTemplate::parse(&config.sink.topic)
        .map_err(|problem| anyhow::anyhow!("sink.topic {problem}"))?;
    let topics: Vec<String> = SAMPLE_TYPES
        .iter()
        .map(|(aggregate_type, event_type)| template.render(aggregate_type, event_type))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for topic in &topics {
        cluster.create_topic(topic, PARTITIONS, 3).context("cannot create demo topic")?;
    }
    let brokers = cluster.bootstrap_servers();
    println!("   bootstrap servers {brokers}");

    config.postgres = crate::config::PostgresConfig { url: pg.url(), ..crate::config::PostgresConfig::default() };
    config.sink.kind = SinkKind::Kafka;
    config.sink.kafka.brokers = brokers.clone();
    config.http.listen = "127.0.0.1:0".into();
    crate::startup::validate(&config)?;
    let capture = match config.source.mode {
        SourceMode::Poll => "source.mode = \"poll\": claiming unpublished rows, woken by NOTIFY at commit",
        SourceMode::Replication => "source.mode = \"replication\": tailing a logical replication slot (pgoutput)",
    };

    println!("3. installing the outbox schema (outbox-relay migrate) ...");
    let (mut client, connection) = tokio_postgres::connect(&pg.url(), NoTls).await?;
    let driver = tokio::spawn(connection);
    crate::migrate::run(&mut client).await?;
    if config.source.mode == SourceMode::Replication {
        // The slot must exist before the events are written, or they are not in it.
        for step in crate::source::replication::setup(&client, &config).await? {
            println!("   {step}");
        }
    }

    println!("4. enqueueing {events} events the way an application does (outbox.enqueue in its transaction) ...");
    enqueue_sample(&mut client, events).await?;

    println!("5. relaying ({capture}) ...");
    let (trigger, shutdown) = shutdown::channel();
    let queue = config.source.batch_size * (config.source.max_in_flight_batches + 1);
    let sink = Arc::new(KafkaSink::new(&config.sink.kafka, queue)?);
    let published_mode = config.published.mode;
    let relay = Relay::new(config, sink.clone(), Metrics::new(), crate::health::Health::new(), shutdown)?;
    let started = Instant::now();
    let relay_task = tokio::spawn(relay.run());
    let deadline = Instant::now() + Duration::from_secs(60);
    // Start-up (until the first event is published) and the steady rate after it, apart.
    let mut first: Option<(Duration, i64)> = None;
    let sql = match published_mode {
        crate::config::PublishedMode::Mark => "SELECT count(*) FILTER (WHERE published_at IS NULL) FROM outbox.events",
        _ => "SELECT count(*) FROM outbox.events",
    };
    loop {
        let left: i64 = if published_mode == crate::config::PublishedMode::None {
            // Rows are never marked: count what the slot has confirmed instead.
            let lag: Option<i64> = client
                .query_one("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots LIMIT 1", &[])
                .await?
                .get(0);
            if lag.unwrap_or(1) <= 0 {
                0
            } else {
                events as i64
            }
        } else {
            client.query_one(sql, &[]).await?.get(0)
        };
        if first.is_none() && left < events as i64 {
            first = Some((started.elapsed(), events as i64 - left));
        }
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} events still unpublished after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    trigger.trigger();
    relay_task.await.context("relay task")??;

    println!("6. consuming everything back from Kafka ...\n");
    let expected_topics = topics.clone();
    let consumed = tokio::task::spawn_blocking(move || consume(&brokers, &expected_topics, events))
        .await
        .context("consumer task")??;
    let report = verify(&consumed);
    let timing =
        Timing { first: first.map_or(elapsed, |(at, _)| at), first_count: first.map_or(0, |(_, n)| n), total: elapsed };
    print_summary(&consumed, &report, events, &timing, capture);
    // The producer goes before the cluster, or it logs the brokers vanishing.
    drop(sink);
    drop(cluster);
    driver.abort();
    if report.lost > 0 || report.out_of_order > 0 {
        bail!("verification failed: {} lost, {} out of order", report.lost, report.out_of_order);
    }
    Ok(())
}

async fn enqueue_sample(client: &mut tokio_postgres::Client, events: usize) -> anyhow::Result<()> {
    let steps = ["OrderPlaced", "OrderPaid", "OrderPacked", "OrderShipped", "OrderDelivered"];
    let orders = (events / 6).max(1);
    let mut seq: HashMap<String, i64> = HashMap::new();
    let statement = client.prepare("SELECT outbox.enqueue($1, $2, $3, $4::jsonb, 1, $5::jsonb, $6)").await?;
    for i in 0..events {
        // Interleave aggregates so the relay really has to keep order per key.
        let (aggregate_type, aggregate_id, event_type) = if i % 6 == 5 {
            ("Customer", format!("c-{}", (i / 6) % 25), "CustomerContacted")
        } else {
            let order = i % orders;
            let n = seq.get(&format!("o-{order}")).copied().unwrap_or(0) as usize;
            ("Order", format!("o-{order}"), steps[n.min(steps.len() - 1)])
        };
        let n = seq.entry(aggregate_id.clone()).or_insert(0);
        *n += 1;
        let payload = serde_json::json!({
            "sequence": *n,
            "order_id": aggregate_id,
            "total_cents": 1000 + (i * 37) % 9000,
            "currency": "EUR",
        });
        let headers = serde_json::json!({ "source": "demo-shop" });
        let tx = client.transaction().await?;
        tx.query_one(&statement, &[&aggregate_type, &aggregate_id, &event_type, &payload, &headers, &"demo-user"])
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

/// One message read back.
struct Received {
    topic: String,
    partition: i32,
    key: String,
    value: serde_json::Value,
    headers: Vec<(String, String)>,
}

fn consume(brokers: &str, topics: &[String], expected: usize) -> anyhow::Result<Vec<Received>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "outbox-relay-demo")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for partition in 0..PARTITIONS {
            assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
        }
    }
    consumer.assign(&assignment)?;
    let mut received = Vec::with_capacity(expected);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                quiet_since = Instant::now();
                let headers = message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| {
                                (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                received.push(Received {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                    key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                    value: serde_json::from_slice(message.payload().unwrap_or_default())?,
                    headers,
                });
            }
            Some(Err(e)) => bail!("consumer error: {e}"),
            None if received.len() >= expected && quiet_since.elapsed() > Duration::from_millis(500) => break,
            None => {}
        }
    }
    Ok(received)
}

/// What the consumer saw, checked.
struct Report {
    unique: usize,
    duplicates: usize,
    lost: usize,
    out_of_order: usize,
    aggregates: usize,
}

fn verify(consumed: &[Received]) -> Report {
    // Partition order is consumption order; check each aggregate's sequence.
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    let mut out_of_order = 0;
    let mut duplicates = 0;
    let mut max_seq: HashMap<&str, i64> = HashMap::new();
    for message in consumed {
        let event_id = message.value["event_id"].as_str().unwrap_or_default().to_owned();
        if !seen.insert(event_id) {
            duplicates += 1;
            continue;
        }
        let seq = message.value["payload"]["sequence"].as_i64().unwrap_or(0);
        let prev = last.insert(&message.key, seq).unwrap_or(0);
        if seq != prev + 1 {
            out_of_order += 1;
        }
        let max = max_seq.entry(&message.key).or_insert(0);
        *max = (*max).max(seq);
    }
    let expected: i64 = max_seq.values().sum();
    Report {
        unique: seen.len(),
        duplicates,
        lost: (expected as usize).saturating_sub(seen.len()),
        out_of_order,
        aggregates: max_seq.len(),
    }
}

/// When the relay published: its first event, and everything.
struct Timing {
    /// Relay start to the first published event (start-up: connect, join, first claim).
    first: Duration,
    /// Events already published at that moment (the first batch).
    first_count: i64,
    /// Relay start to the last event published.
    total: Duration,
}

fn print_summary(consumed: &[Received], report: &Report, enqueued: usize, timing: &Timing, capture: &str) {
    println!("A few envelopes as consumers see them:\n");
    for message in consumed.iter().filter(|m| m.key == "o-0").take(2) {
        println!("  topic {}  partition {}  key {:?}", message.topic, message.partition, message.key);
        let headers: Vec<String> = message.headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  headers {}", headers.join(" "));
        let pretty = serde_json::to_string_pretty(&message.value).unwrap_or_default();
        for line in pretty.lines() {
            println!("    {line}");
        }
        println!();
    }
    let mut per_topic: BTreeMap<&str, usize> = BTreeMap::new();
    for message in consumed {
        *per_topic.entry(&message.topic).or_default() += 1;
    }
    let order =
        if report.out_of_order == 0 { "verified".to_owned() } else { format!("{} violations", report.out_of_order) };
    let mut lines: Vec<(String, String)> =
        vec![("capture".into(), capture.to_owned()), ("enqueued".into(), enqueued.to_string())];
    for (topic, count) in &per_topic {
        lines.push((format!("received on {topic}"), count.to_string()));
    }
    lines.push(("unique events".into(), report.unique.to_string()));
    lines.push(("duplicates".into(), report.duplicates.to_string()));
    lines.push(("lost".into(), report.lost.max(enqueued.saturating_sub(report.unique)).to_string()));
    lines.push(("aggregates".into(), report.aggregates.to_string()));
    lines.push(("per-aggregate order".into(), order));
    lines.push((
        "start-up".into(),
        format!("{:.0} ms from relay start to the first event published", timing.first.as_secs_f64() * 1000.0),
    ));
    let rest = (enqueued as i64 - timing.first_count).max(0) as f64;
    let steady = timing.total.saturating_sub(timing.first).as_secs_f64();
    let rate = if steady > 0.0 && rest > 0.0 {
        format!("{:.0} events/s after start-up", rest / steady)
    } else {
        "all in the first batch".to_owned()
    };
    lines.push((
        "steady rate".into(),
        format!("{rate} ({} events in {:.0} ms)", enqueued, timing.total.as_secs_f64() * 1000.0),
    ));
    let width = lines.iter().map(|(label, _)| label.len()).max().unwrap_or(0) + 2;
    println!("Summary");
    for (label, value) in &lines {
        println!("  {label:<width$}{value}");
    }
    println!();
    println!("Next: point it at your own Postgres and Kafka (README, \"Quick start\"):");
    println!("  outbox-relay --config relay.toml migrate && outbox-relay --config relay.toml check && outbox-relay --config relay.toml run");
}
