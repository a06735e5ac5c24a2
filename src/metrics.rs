//! Prometheus metrics the relay updates as it works.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The relay's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    /// Where everything is registered; scraped by the HTTP endpoint.
    pub registry: Registry,
    /// Events the broker acknowledged.
    pub events_published: IntCounter,
    /// Events that could not be published, by whether retrying can help.
    pub publish_failures: IntCounterVec,
    /// Batches claimed from the outbox.
    pub batches_claimed: IntCounter,
    /// Events published but not yet acknowledged.
    pub events_in_flight: IntGauge,
    /// Unix time of the last acknowledged event.
    pub last_publish_timestamp: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let events_published =
            IntCounter::new("outbox_relay_events_published_total", "Events acknowledged by the broker").expect("metric names are valid constants");
        let publish_failures = IntCounterVec::new(
            Opts::new("outbox_relay_publish_failures_total", "Events that failed to publish"),
            &["kind"],
        )
        .expect("metric names are valid constants");
        let batches_claimed =
            IntCounter::new("outbox_relay_batches_claimed_total", "Batches claimed from the outbox").expect("metric names are valid constants");
        let events_in_flight =
            IntGauge::new("outbox_relay_events_in_flight", "Events sent but not yet acknowledged").expect("metric names are valid constants");
        let last_publish_timestamp = IntGauge::new(
            "outbox_relay_last_publish_timestamp_seconds",
            "Unix time of the last broker acknowledgement",
        )
        .expect("metric names are valid constants");
        for collector in [
            Box::new(events_published.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(publish_failures.clone()),
            Box::new(batches_claimed.clone()),
            Box::new(events_in_flight.clone()),
            Box::new(last_publish_timestamp.clone()),
        ] {
            // Names are distinct constants, so registration cannot collide.
            let _ = registry.register(collector);
        }
        Metrics { registry, events_published, publish_failures, batches_claimed, events_in_flight, last_publish_timestamp }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
