//! Prometheus metrics: what an on-call engineer needs to see whether the
//! outbox is flowing, backing up, or failing. Names follow Prometheus
//! conventions (`outbox_relay_` prefix, base units, `_total` counters); the
//! list is mirrored in `deploy/metrics.txt`, which the dashboard and alert
//! rules are checked against.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Most distinct (topic, event_type) label pairs kept; later ones share
/// `other`, so a buggy template cannot explode the series count.
const MAX_EVENT_LABELS: usize = 200;

/// The relay's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    /// Where everything is registered; scraped by `/metrics`.
    pub registry: Registry,
    /// Events acknowledged by the broker, by topic and event type.
    pub events_published: IntCounterVec,
    /// Events not published, by reason (`envelope`, `broker_transient`,
    /// `broker_permanent`, `dead_letter` when the dead-letter topic refused one).
    pub publish_failures: IntCounterVec,
    /// Sessions that ended in an error, by cause: `transient` (the relay
    /// reconnects) or `needs_operator` (it retries until someone fixes a
    /// privilege, table, publication or setting).
    pub session_failures: IntCounterVec,
    /// Events retried after a failure.
    pub retries: IntCounter,
    /// Events sent to the dead-letter topic.
    pub dead_lettered: IntCounter,
    /// Aggregates held back behind a failed event (`failures.policy = "block"`):
    /// anything above zero needs an operator.
    pub blocked_aggregates: IntGauge,
    /// Batches claimed from the outbox.
    pub batches: IntCounter,
    /// Events per claimed batch.
    pub batch_size: Histogram,
    /// Row written to broker acknowledgement.
    pub end_to_end_latency: Histogram,
    /// Batch handed to the broker client to its last acknowledgement.
    pub broker_ack_latency: Histogram,
    /// Unpublished rows in the outbox.
    pub backlog_events: IntGauge,
    /// Age of the oldest unpublished row.
    pub oldest_unpublished_age: prometheus::Gauge,
    /// Replication slot lag (logical replication mode).
    pub replication_slot_lag: IntGauge,
    /// Unix time of the last broker acknowledgement.
    pub last_publish_timestamp: IntGauge,
    /// 1 while this relay publishes: it holds lanes (polling) or the slot (replication).
    pub leader: IntGauge,
    /// Lanes this relay holds and claims from (polling).
    pub lanes_owned: IntGauge,
    /// Events sent but not yet acknowledged.
    pub events_in_flight: IntGauge,
    /// Exactly once: Kafka transactions committed (one per batch).
    pub transactions_committed: IntCounter,
    /// Exactly once: Kafka transactions aborted (each is retried, or its
    /// session restarts; a steady rate means the broker keeps refusing).
    pub transactions_aborted: IntCounter,
    /// Exactly once: how long committing a transaction took.
    pub transaction_commit_latency: Histogram,
    labels_seen: Arc<Mutex<HashSet<(String, String)>>>,
}

fn seconds_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
}

impl Metrics {
    /// The metrics that mean something for this configuration: no
    /// `replication_slot_lag_bytes` when polling (there is no slot), and with
    /// `published.mode = "none"` no row-based backlog or age (rows are never
    /// marked, so they would grow on a healthy relay): the slot lag measures
    /// the backlog there.
    pub fn for_config(config: &crate::config::Config) -> Metrics {
        use crate::config::{PublishedMode, SourceMode};
        let metrics = Metrics::new();
        let mut hidden: Vec<Box<dyn prometheus::core::Collector>> = Vec::new();
        if config.source.mode == SourceMode::Poll {
            hidden.push(Box::new(metrics.replication_slot_lag.clone()));
        }
        if config.sink.kafka.delivery != crate::config::Delivery::ExactlyOnce
            || config.sink.kind != crate::config::SinkKind::Kafka
        {
            // No transactions: counters that could only ever read 0.
            hidden.push(Box::new(metrics.transactions_committed.clone()));
            hidden.push(Box::new(metrics.transactions_aborted.clone()));
            hidden.push(Box::new(metrics.transaction_commit_latency.clone()));
        }
        if config.published.mode == PublishedMode::None {
            hidden.push(Box::new(metrics.backlog_events.clone()));
            hidden.push(Box::new(metrics.oldest_unpublished_age.clone()));
        }
        for collector in hidden {
            let _ = metrics.registry.unregister(collector);
        }
        metrics
    }

    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events_published = IntCounterVec::new(
            Opts::new("outbox_relay_events_published_total", "Events acknowledged by the broker"),
            &["topic", "event_type"],
        )
        .expect("valid metric");
        let publish_failures = IntCounterVec::new(
            Opts::new("outbox_relay_publish_failures_total", "Events that could not be published, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let session_failures = IntCounterVec::new(
            Opts::new(
                "outbox_relay_session_failures_total",
                "Relay sessions that ended in an error, by cause (transient or needs_operator)",
            ),
            &["cause"],
        )
        .expect("valid metric");
        // Both series exist from the start, so a rate or an alert on either
        // has a zero to compare with.
        for cause in ["transient", "needs_operator"] {
            session_failures.with_label_values(&[cause]);
        }
        let retries = IntCounter::new("outbox_relay_retries_total", "Events retried after a failed publish")
            .expect("valid metric");
        let dead_lettered = IntCounter::new("outbox_relay_dead_lettered_total", "Events sent to the dead-letter topic")
            .expect("valid metric");
        let blocked_aggregates = IntGauge::new(
            "outbox_relay_blocked_aggregates",
            "Aggregates whose events wait behind one that cannot be published (failures.policy = block)",
        )
        .expect("valid metric");
        let batches =
            IntCounter::new("outbox_relay_batches_total", "Batches claimed from the outbox").expect("valid metric");
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("outbox_relay_batch_size", "Events per claimed batch")
                .buckets(vec![1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0]),
        )
        .expect("valid metric");
        let end_to_end_latency = Histogram::with_opts(
            HistogramOpts::new("outbox_relay_end_to_end_latency_seconds", "Row created to broker acknowledgement")
                .buckets(seconds_buckets()),
        )
        .expect("valid metric");
        let broker_ack_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_relay_broker_ack_latency_seconds",
                "Batch handed to the broker to its last acknowledgement",
            )
            .buckets(seconds_buckets()),
        )
        .expect("valid metric");
        let backlog_events =
            IntGauge::new("outbox_relay_backlog_events", "Unpublished rows in the outbox").expect("valid metric");
        let oldest_unpublished_age = prometheus::Gauge::new(
            "outbox_relay_oldest_unpublished_age_seconds",
            "Age of the oldest unpublished row (0 when none)",
        )
        .expect("valid metric");
        let replication_slot_lag = IntGauge::new(
            "outbox_relay_replication_slot_lag_bytes",
            "WAL bytes between the server's current LSN and the slot's confirmed flush LSN",
        )
        .expect("valid metric");
        let last_publish_timestamp = IntGauge::new(
            "outbox_relay_last_publish_timestamp_seconds",
            "Unix time of the last broker acknowledgement",
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "outbox_relay_leader",
            "1 while this relay publishes: it holds lanes (polling) or the replication slot's lease",
        )
        .expect("valid metric");
        let lanes_owned =
            IntGauge::new("outbox_relay_lanes_owned", "Outbox lanes this relay holds and claims from (polling)")
                .expect("valid metric");
        let events_in_flight = IntGauge::new("outbox_relay_events_in_flight", "Events sent but not yet acknowledged")
            .expect("valid metric");
        let transactions_committed = IntCounter::new(
            "outbox_relay_transactions_committed_total",
            "Kafka transactions committed (delivery = exactly_once)",
        )
        .expect("valid metric");
        let transactions_aborted = IntCounter::new(
            "outbox_relay_transactions_aborted_total",
            "Kafka transactions aborted and retried (delivery = exactly_once)",
        )
        .expect("valid metric");
        let transaction_commit_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outbox_relay_transaction_commit_seconds",
                "Time to commit one Kafka transaction (delivery = exactly_once)",
            )
            .buckets(seconds_buckets()),
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("outbox_relay_build_info", "Relay build information and its replicas.relay_id"),
            &["version", "relay_id"],
        )
        .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), &crate::postgres::relay_id()]).set(1);
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(events_published.clone()),
            Box::new(publish_failures.clone()),
            Box::new(session_failures.clone()),
            Box::new(retries.clone()),
            Box::new(dead_lettered.clone()),
            Box::new(blocked_aggregates.clone()),
            Box::new(batches.clone()),
            Box::new(batch_size.clone()),
            Box::new(end_to_end_latency.clone()),
            Box::new(broker_ack_latency.clone()),
            Box::new(backlog_events.clone()),
            Box::new(oldest_unpublished_age.clone()),
            Box::new(replication_slot_lag.clone()),
            Box::new(last_publish_timestamp.clone()),
            Box::new(leader.clone()),
            Box::new(lanes_owned.clone()),
            Box::new(events_in_flight.clone()),
            Box::new(transactions_committed.clone()),
            Box::new(transactions_aborted.clone()),
            Box::new(transaction_commit_latency.clone()),
            Box::new(build_info.clone()),
        ];
        for collector in collectors {
            // Distinct constant names: registration cannot collide.
            let _ = registry.register(collector);
        }
        Metrics {
            registry,
            events_published,
            publish_failures,
            session_failures,
            retries,
            dead_lettered,
            blocked_aggregates,
            batches,
            batch_size,
            end_to_end_latency,
            broker_ack_latency,
            backlog_events,
            oldest_unpublished_age,
            replication_slot_lag,
            last_publish_timestamp,
            leader,
            lanes_owned,
            events_in_flight,
            transactions_committed,
            transactions_aborted,
            transaction_commit_latency,
            labels_seen: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Counts `count` published events, capping label cardinality.
    pub fn published(&self, topic: &str, event_type: &str, count: u64) {
        let known = {
            let mut seen = match self.labels_seen.lock() {
                Ok(seen) => seen,
                Err(poisoned) => poisoned.into_inner(),
            };
            let key = (topic.to_owned(), event_type.to_owned());
            seen.contains(&key) || (seen.len() < MAX_EVENT_LABELS && seen.insert(key))
        };
        let (topic, event_type) = if known { (topic, event_type) } else { ("other", "other") };
        self.events_published.with_label_values(&[topic, event_type]).inc_by(count);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let encoder = prometheus::TextEncoder::new();
        let _ = encoder.encode_utf8(&self.registry.gather(), &mut out);
        out
    }

    /// Names of every metric this relay exports, for consistency checks.
    #[cfg(test)]
    pub fn names(&self) -> Vec<String> {
        self.registry.gather().iter().map(|family| family.name().to_owned()).collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_pairs_past_the_cap_fold_into_other() {
        let metrics = Metrics::new();
        for i in 0..(MAX_EVENT_LABELS + 10) {
            metrics.published(&format!("topic-{i}"), "E", 1);
        }
        let other = metrics.events_published.with_label_values(&["other", "other"]).get();
        assert_eq!(other, 10);
        assert_eq!(metrics.events_published.with_label_values(&["topic-0", "E"]).get(), 1);
    }

    #[test]
    fn exported_names_match_what_dashboards_and_alerts_are_checked_against() {
        let metrics = Metrics::new();
        // Labelled families only appear once a label set exists.
        metrics.publish_failures.with_label_values(&["envelope"]);
        metrics.published("t", "e", 0);
        let mut exported = metrics.names();
        exported.sort();
        let mut listed: Vec<String> = include_str!("../deploy/metrics.txt")
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
        listed.sort();
        assert_eq!(exported, listed, "deploy/metrics.txt must list exactly what the relay exports");
    }

    #[test]
    fn only_metrics_that_mean_something_in_this_mode_are_exported() {
        let mut config = crate::config::Config::default();
        let names = |config: &crate::config::Config| Metrics::for_config(config).names();
        let poll = names(&config);
        assert!(!poll.iter().any(|n| n.contains("replication_slot_lag")), "{poll:?}");
        assert!(poll.iter().any(|n| n == "outbox_relay_oldest_unpublished_age_seconds"));
        config.source.mode = crate::config::SourceMode::Replication;
        config.published.mode = crate::config::PublishedMode::None;
        let none = names(&config);
        assert!(none.iter().any(|n| n.contains("replication_slot_lag")), "{none:?}");
        assert!(!none.iter().any(|n| n.contains("oldest_unpublished_age") || n.contains("backlog_events")), "{none:?}");
        assert!(!none.iter().any(|n| n.contains("transaction")), "{none:?}");
        config.sink.kafka.delivery = crate::config::Delivery::ExactlyOnce;
        let exactly_once = names(&config);
        for name in [
            "outbox_relay_transactions_committed_total",
            "outbox_relay_transactions_aborted_total",
            "outbox_relay_transaction_commit_seconds",
        ] {
            assert!(exactly_once.iter().any(|n| n == name), "{name} missing from {exactly_once:?}");
        }
    }

    #[test]
    fn render_includes_build_info_and_counters() {
        let metrics = Metrics::new();
        metrics.published("outbox.Order", "OrderPlaced", 3);
        let text = metrics.render();
        assert!(text.contains("outbox_relay_build_info{relay_id=\""), "{text}");
        assert!(text.contains(concat!("version=\"", env!("CARGO_PKG_VERSION"), "\"")), "{text}");
        assert!(
            text.contains("outbox_relay_events_published_total{event_type=\"OrderPlaced\",topic=\"outbox.Order\"} 3")
        );
    }
}
