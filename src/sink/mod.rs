//! Sinks publish messages and report, per message, whether the broker
//! acknowledged it. Nothing downstream of a sink may treat an event as
//! published until that report says so.

pub mod acks;
pub mod kafka;
pub mod pubsub;
pub mod transactions;

use std::future::Future;

use futures::future::BoxFuture;

use crate::settle::{Committed, EventKey};

/// One message ready for the broker.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Outbox position of the event, so acknowledgements can be matched back.
    pub position: i64,
    /// Destination topic.
    pub topic: String,
    /// Partitioning key (the aggregate id), which keeps an aggregate in order.
    pub key: String,
    /// Encoded envelope.
    pub value: Vec<u8>,
    /// Message headers (name, value). Names are mostly fixed strings, but
    /// some formats derive them (CloudEvents binary mode: `ce_<extension>`).
    pub headers: Vec<(std::borrow::Cow<'static, str>, Vec<u8>)>,
    /// Record timestamp (ms since the epoch) the Debezium format sets from
    /// the event time; None: the producer's clock (Kafka only).
    pub timestamp_ms: Option<i64>,
    /// Send a null value (a Kafka tombstone) instead of `value`.
    pub tombstone: bool,
}

/// Exactly once: what the committed positions of a holder (or holders) say.
#[derive(Debug, Default)]
pub struct Position {
    /// Events in committed transactions that may not be settled in Postgres yet.
    pub events: Vec<EventKey>,
    /// Replication: the highest LSN the writers had confirmed to the slot
    /// (the slot can fall behind it after a Postgres crash); 0 when polling.
    pub confirmed: u64,
}

/// Why one message was not acknowledged.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{reason}")]
pub struct PublishError {
    /// What the broker or client said, for logs and the row's last_error.
    pub reason: String,
    /// Retrying the same message cannot succeed (too large, not authorized...).
    pub permanent: bool,
}

/// Per-message results of one enqueued batch, in the batch's order.
pub type PendingDelivery = BoxFuture<'static, Vec<Result<(), PublishError>>>;

/// A broker the relay can publish to.
pub trait Sink: Send + Sync + 'static {
    /// Hands the messages to the broker client in order and returns a future
    /// of their acknowledgements. Waits (backpressure) while the client's own
    /// queue is full; never drops a message.
    fn enqueue(&self, messages: Vec<OutgoingMessage>) -> impl Future<Output = PendingDelivery> + Send;

    /// Whether the broker answers within `timeout` (readiness probes).
    fn reachable(&self, timeout: std::time::Duration) -> impl Future<Output = Result<(), String>> + Send;

    /// Waits up to `timeout` for everything enqueued to be acknowledged.
    fn flush(&self, timeout: std::time::Duration) -> impl Future<Output = ()> + Send;

    /// Like [`Sink::enqueue`]; `keys[i]` names the event of `messages[i]`.
    /// With exactly-once delivery the batch and the relay's position (which
    /// names those events) commit in one transaction before this returns.
    fn enqueue_keyed(
        &self,
        messages: Vec<OutgoingMessage>,
        keys: Vec<EventKey>,
    ) -> impl Future<Output = PendingDelivery> + Send {
        let _ = keys;
        self.enqueue(messages)
    }

    /// Exactly-once delivery: the set of committed-but-unsettled events the
    /// relay's ledger must settle; transaction metrics go to `metrics`.
    /// None: this sink delivers at least once.
    fn exactly_once(&self, metrics: &crate::metrics::Metrics) -> Option<Committed> {
        let _ = metrics;
        None
    }

    /// Exactly-once delivery, before a session publishes: become the
    /// producer of `holder` (what this relay holds: its lanes or the slot),
    /// fence the producers of `previous` (holders whose leases this relay
    /// took over), and return the events that committed transactions of the
    /// holders `scope` names (one holder, or with a trailing `.` every
    /// holder it starts) delivered and Postgres may not know about yet.
    /// None: at least once.
    fn hold(
        &self,
        holder: &str,
        previous: &[String],
        scope: &str,
    ) -> impl Future<Output = Result<Option<Position>, String>> + Send {
        let _ = (holder, previous, scope);
        async { Ok(None) }
    }

    /// Called before each relay session: a client that failed for good
    /// (a Kafka producer's fatal error) is replaced here, between sessions,
    /// so nothing sent on the new one can overtake what the old one failed.
    fn recover(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// The sink the configuration chose (`sink.kind`), so every command (run,
/// check, replay, the broker monitor) works with either broker.
// One per process, built once and never moved on a hot path: boxing the
// larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnySink {
    /// `kind = "kafka"`.
    Kafka(kafka::KafkaSink),
    /// `kind = "pubsub"`.
    PubSub(pubsub::PubSubSink),
}

impl AnySink {
    /// The broker's name for messages: "Kafka" or "Pub/Sub".
    pub fn name(&self) -> &'static str {
        match self {
            AnySink::Kafka(_) => "Kafka",
            AnySink::PubSub(_) => "Pub/Sub",
        }
    }
}

impl Sink for AnySink {
    async fn enqueue(&self, messages: Vec<OutgoingMessage>) -> PendingDelivery {
        match self {
            AnySink::Kafka(sink) => sink.enqueue(messages).await,
            AnySink::PubSub(sink) => sink.enqueue(messages).await,
        }
    }

    async fn reachable(&self, timeout: std::time::Duration) -> Result<(), String> {
        match self {
            AnySink::Kafka(sink) => sink.reachable(timeout).await,
            AnySink::PubSub(sink) => sink.reachable(timeout).await,
        }
    }

    async fn flush(&self, timeout: std::time::Duration) {
        match self {
            AnySink::Kafka(sink) => sink.flush(timeout).await,
            AnySink::PubSub(sink) => sink.flush(timeout).await,
        }
    }

    async fn enqueue_keyed(&self, messages: Vec<OutgoingMessage>, keys: Vec<EventKey>) -> PendingDelivery {
        match self {
            AnySink::Kafka(sink) => sink.enqueue_keyed(messages, keys).await,
            AnySink::PubSub(sink) => sink.enqueue(messages).await,
        }
    }

    fn exactly_once(&self, metrics: &crate::metrics::Metrics) -> Option<Committed> {
        match self {
            AnySink::Kafka(sink) => sink.exactly_once(metrics),
            AnySink::PubSub(_) => None,
        }
    }

    async fn hold(&self, holder: &str, previous: &[String], scope: &str) -> Result<Option<Position>, String> {
        match self {
            AnySink::Kafka(sink) => sink.hold(holder, previous, scope).await,
            AnySink::PubSub(_) => Ok(None),
        }
    }

    async fn recover(&self) {
        match self {
            AnySink::Kafka(sink) => sink.recover().await,
            AnySink::PubSub(sink) => sink.recover().await,
        }
    }
}
