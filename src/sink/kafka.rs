//! Kafka sink on librdkafka's idempotent producer.
//!
//! Ordering: one key always maps to one partition, and the idempotent
//! producer (`enable.idempotence=true`, `acks=all`) keeps a partition's
//! messages in order across its internal retries. Messages never time out
//! by default (`message.timeout.ms=0`): while the broker is away they wait in
//! librdkafka's bounded queue, the relay stops claiming, and nothing is
//! reordered by a give-up-and-retry cycle.
//!
//! A producer that hit a fatal error (for example `UnknownProducerId` from a
//! broker that lost its idempotence state) refuses everything after it. The
//! sink then fails new messages at once, the relay ends its session, and the
//! next session [`recover`](Sink::recover)s with a fresh producer and claims
//! again from the oldest unpublished event, so order survives the swap.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::acks::{Ack, Acks};
use super::transactions::Transactions;
use super::{OutgoingMessage, PendingDelivery, Position, PublishError, Sink};
use crate::config::{Delivery, KafkaConfig};
use crate::settle::{Committed, EventKey};

/// Exactly once: `transaction.timeout.ms` (and the message timeout inside a
/// transaction). A relay frozen with a transaction open holds back
/// `read_committed` consumers of its partitions until the transaction is
/// aborted: by a takeover's fencing, or by the broker after this long.
const TRANSACTION_TIMEOUT_MS: &str = "30000";

/// Kafka producer failures at start-up.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSinkError {
    /// librdkafka rejected the configuration.
    #[error("invalid Kafka producer configuration: {0} (check sink.kafka.properties)")]
    Config(KafkaError),
    /// A secret file could not be read.
    #[error("invalid configuration: {0}")]
    SecretFile(String),
    /// No broker answered a metadata request.
    #[error("cannot reach Kafka brokers {brokers}: {source} (check sink.kafka.brokers and network access)")]
    Unreachable {
        /// `sink.kafka.brokers`.
        brokers: String,
        /// librdkafka's error.
        source: KafkaError,
    },
}

/// The relay's producer type: librdkafka's log and error callbacks go
/// through [`QuietContext`], and its delivery reports to each batch's
/// [`Acks`] (one wake-up per batch, not a future per message).
pub type RelayProducer = ThreadedProducer<QuietContext>;

/// Publishes to Kafka.
pub struct KafkaSink {
    /// Replaced only by [`Sink::recover`], between sessions.
    producer: RwLock<RelayProducer>,
    /// What `recover` builds a new producer from.
    client: ClientConfig,
    brokers: String,
    /// `delivery = "exactly_once"`: batches go out as Kafka transactions
    /// (see [`super::transactions`]); dead letters and replays still use `producer`.
    exactly_once: Option<Transactions>,
}

impl KafkaSink {
    /// Builds the producer; `queue_capacity` must cover every in-flight message.
    pub fn new(config: &KafkaConfig, queue_capacity: usize) -> Result<KafkaSink, KafkaSinkError> {
        let exactly_once = config.delivery == Delivery::ExactlyOnce;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // In a transaction a message that cannot be delivered must fail in
            // time for its transaction to abort and be retried as a whole.
            .set("message.timeout.ms", if exactly_once { TRANSACTION_TIMEOUT_MS } else { "0" })
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", queue_capacity.max(100_000).to_string())
            .set("queue.buffering.max.kbytes", "1048576")
            .set("partitioner", "murmur2_random");
        if exactly_once {
            client.set("transaction.timeout.ms", TRANSACTION_TIMEOUT_MS);
        }
        for (key, value) in &config.properties {
            client.set(key, value);
        }
        for (key, path) in &config.properties_from_files {
            let value = std::fs::read_to_string(path).map_err(|e| {
                KafkaSinkError::SecretFile(format!(
                    "sink.kafka.properties_from_files.{key}: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            client.set(key, value.trim_end_matches(['\n', '\r']));
        }
        // The transactional settings are checked on this producer too, so a bad one fails at start-up.
        let producer: RelayProducer =
            client.create_with_context(QuietContext::default()).map_err(KafkaSinkError::Config)?;
        let exactly_once = exactly_once
            .then(|| Transactions::new(client.clone(), &config.transactional_id_prefix, &config.offsets_topic));
        Ok(KafkaSink { producer: RwLock::new(producer), client, brokers: config.brokers.clone(), exactly_once })
    }

    /// The underlying producer (metadata look-ups, statistics).
    pub fn producer(&self) -> RelayProducer {
        // Only a panic inside the two-line critical sections below could poison this lock.
        self.producer.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The fatal error the current producer hit, if any.
    fn fatal(&self) -> Option<String> {
        self.producer().client().fatal_error().map(|(code, reason)| format!("{reason} ({code:?})"))
    }

    /// Asks the cluster for metadata, proving at least one broker answers.
    pub async fn check_reachable(&self, timeout: Duration) -> Result<(), KafkaSinkError> {
        let producer = self.producer();
        let result = match tokio::task::spawn_blocking(move || {
            producer.client().fetch_metadata(None, timeout).map(|_| ())
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(KafkaError::Canceled),
        };
        result.map_err(|source| KafkaSinkError::Unreachable { brokers: self.brokers.clone(), source })
    }
}

impl Sink for KafkaSink {
    async fn enqueue(&self, messages: Vec<OutgoingMessage>) -> PendingDelivery {
        if let Some(fatal) = self.fatal() {
            // Sending on a new producer now could overtake the messages the old one failed.
            let error = PublishError {
                reason: format!(
                    "the Kafka producer failed fatally: {fatal}; the relay restarts its session with a new producer"
                ),
                permanent: false,
            };
            let results = vec![Err(error); messages.len()];
            return async move { results }.boxed();
        }
        let producer = self.producer();
        let (acks, answered) = Acks::new();
        let mut results: Vec<Result<(), PublishError>> = vec![Ok(()); messages.len()];
        for (index, message) in messages.iter().enumerate() {
            if let Err(failure) = Self::enqueue_one(&producer, message, acks.ack(index)).await {
                results[index] = Err(failure);
            }
        }
        acks.seal();
        async move {
            match answered.await {
                Ok(answers) => {
                    for (index, answer) in answers {
                        if let (Err(error), Some(slot)) = (answer, results.get_mut(index)) {
                            *slot = Err(delivery_failure(&error));
                        }
                    }
                }
                // Unreachable while every Ack answers on drop; failing the batch is the safe reading.
                Err(_) => results.fill(Err(delivery_failure(&KafkaError::Canceled))),
            }
            results
        }
        .boxed()
    }

    async fn reachable(&self, timeout: Duration) -> Result<(), String> {
        self.check_reachable(timeout).await.map_err(|e| e.to_string())
    }

    async fn flush(&self, timeout: Duration) {
        let producer = self.producer();
        let _ = tokio::task::spawn_blocking(move || producer.flush(timeout)).await;
    }

    async fn enqueue_keyed(&self, messages: Vec<OutgoingMessage>, keys: Vec<EventKey>) -> PendingDelivery {
        let Some(transactions) = &self.exactly_once else { return self.enqueue(messages).await };
        if messages.is_empty() {
            return async { Vec::new() }.boxed();
        }
        let results = transactions.publish(messages, keys).await;
        async move { results }.boxed()
    }

    fn exactly_once(&self, metrics: &crate::metrics::Metrics) -> Option<Committed> {
        self.exactly_once.as_ref().map(|t| t.committed(metrics))
    }

    async fn hold(&self, holder: &str, previous: &[String], scope: &str) -> Result<Option<Position>, String> {
        match &self.exactly_once {
            Some(transactions) => transactions
                .hold(self, holder, previous, scope)
                .await
                .map(|(events, confirmed)| Some(Position { events, confirmed })),
            None => Ok(None),
        }
    }

    async fn recover(&self) {
        if let Some(transactions) = &self.exactly_once {
            transactions.recover().await;
        }
        let Some(fatal) = self.fatal() else { return };
        match self.client.create_with_context::<_, RelayProducer>(QuietContext::default()) {
            Ok(fresh) => {
                *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::warn!(error = %fatal, "the Kafka producer had failed fatally; replaced it with a new one");
            }
            Err(error) => tracing::error!(%error, "cannot create a new Kafka producer; the next session tries again"),
        }
    }
}

impl KafkaSink {
    /// Enqueues one message, waiting while librdkafka's queue is full; the
    /// broker's answer goes to `ack`. A message that could not be enqueued
    /// withdraws its ack and returns why.
    pub(super) async fn enqueue_one(
        producer: &RelayProducer,
        message: &OutgoingMessage,
        ack: Box<Ack>,
    ) -> Result<(), PublishError> {
        if !crate::envelope::is_valid_topic(&message.topic) {
            ack.withdraw();
            return Err(PublishError {
                reason: format!(
                    "topic {:?} is not a valid Kafka topic name ({})",
                    message.topic,
                    crate::envelope::KAFKA_TOPIC_RULE
                ),
                permanent: true,
            });
        }
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in &message.headers {
            headers = headers.insert(Header { key: name.as_ref(), value: Some(value.as_slice()) });
        }
        let mut record = BaseRecord::with_opaque_to(&message.topic, ack).key(message.key.as_bytes()).headers(headers);
        if !message.tombstone {
            record = record.payload(message.value.as_slice());
        }
        if let Some(timestamp) = message.timestamp_ms {
            record = record.timestamp(timestamp);
        }
        let mut backoff = Duration::from_millis(1);
        loop {
            match producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // Backpressure: librdkafka's queue is full until deliveries complete.
                    record = returned;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err((error, returned)) => {
                    returned.delivery_opaque.withdraw();
                    return Err(classify(&error));
                }
            }
        }
    }
}

/// A broker's (or librdkafka's) answer that a message was not delivered.
fn delivery_failure(error: &KafkaError) -> PublishError {
    match error {
        KafkaError::Canceled => PublishError {
            reason: "the Kafka producer was shut down before the broker answered".into(),
            permanent: false,
        },
        error => classify(error),
    }
}

/// How long one kind of librdkafka message stays quiet after it was logged.
const LOG_QUIET_FOR: Duration = Duration::from_secs(60);

/// A librdkafka client context that logs each kind of message (level,
/// facility and text with the numbers left out) once, then at most once per
/// [`LOG_QUIET_FOR`] with the count of what it held back. With the brokers
/// down librdkafka repeats the same lines many times a second (and reports
/// each failure twice, as a log line and as an error): one line per state
/// change is what an operator can read.
#[derive(Default)]
pub struct QuietContext {
    seen: Mutex<HashMap<String, Seen>>,
}

/// When a kind of message was last logged and how many were held back since.
struct Seen {
    logged_at: Instant,
    held_back: u64,
}

impl QuietContext {
    /// Whether to log a message of this kind now, and how many like it were held back.
    fn admit(&self, kind: String) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if seen.len() > 1000 {
            seen.retain(|_, s| now.duration_since(s.logged_at) < LOG_QUIET_FOR);
        }
        match seen.get_mut(&kind) {
            Some(s) if now.duration_since(s.logged_at) < LOG_QUIET_FOR => {
                s.held_back += 1;
                None
            }
            Some(s) => {
                let held_back = s.held_back;
                *s = Seen { logged_at: now, held_back: 0 };
                Some(held_back)
            }
            None => {
                seen.insert(kind, Seen { logged_at: now, held_back: 0 });
                Some(0)
            }
        }
    }
}

/// A message's kind: its text without digits (ports, counts, durations)
/// and without bracketed details (librdkafka's "[thrd:...]" and "(after
/// 12ms in state CONNECT, 3 identical error(s) suppressed)").
fn kind_of(prefix: &str, text: &str) -> String {
    let mut stripped = String::with_capacity(text.len());
    let mut depth = 0usize;
    for c in text.chars() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            _ if depth > 0 || c.is_ascii_digit() => {}
            _ => stripped.push(c),
        }
    }
    format!("{prefix}{}", stripped.trim_start_matches([':', ' ']))
}

/// The same condition reported by `log` and `error`: "all brokers down"
/// arrives both ways; keep one.
fn all_brokers_down(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("brokers are down") || text.contains("allbrokersdown") || text.contains("all brokers down")
}

impl ClientContext for QuietContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // Keyed by text only: the same failure arrives as a log line and as an error.
        let key = if all_brokers_down(message) { "all-brokers-down".to_owned() } else { kind_of("", message) };
        let Some(held_back) = self.admit(key) else { return };
        let suffix = if held_back > 0 {
            format!(" ({held_back} similar lines held back in the last {LOG_QUIET_FOR:?})")
        } else {
            String::new()
        };
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}{suffix}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}{suffix}"),
            RDKafkaLogLevel::Notice => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}{suffix}"),
            RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}{suffix}"),
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}{suffix}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            // The exactly-once position reader asks for end-of-partition events; not an error.
            return;
        }
        let text = format!("{error}: {reason}");
        let key = if all_brokers_down(&text) { "all-brokers-down".to_owned() } else { kind_of("", reason) };
        let Some(held_back) = self.admit(key) else { return };
        let suffix = if held_back > 0 {
            format!(" ({held_back} similar errors held back in the last {LOG_QUIET_FOR:?})")
        } else {
            String::new()
        };
        tracing::error!(target: "librdkafka", "librdkafka: {text}{suffix}");
    }
}

/// Each delivery report goes to the batch its message belongs to.
impl ProducerContext for QuietContext {
    type DeliveryOpaque = Box<Ack>;

    fn delivery(&self, delivery: &DeliveryResult<'_>, ack: Box<Ack>) {
        ack.answer(delivery.as_ref().map(|_| ()).map_err(|(error, _)| error.clone()));
    }
}

/// The exactly-once position reader logs through the same quiet window.
impl rdkafka::consumer::ConsumerContext for QuietContext {}

/// Splits Kafka errors into ones a later retry may fix and ones it cannot:
/// a missing topic, an ACL denial, a message the broker refuses fail that
/// event (per `failures.policy`), not the whole session.
pub(super) fn classify(error: &KafkaError) -> PublishError {
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::UnknownTopicOrPartition
                | RDKafkaErrorCode::UnknownTopic
                | RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::UnknownTopicId
                | RDKafkaErrorCode::PolicyViolation
                | RDKafkaErrorCode::InvalidRequiredAcks
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::MessageBatchTooLarge
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidMessage
        )
    );
    PublishError { reason: error.to_string(), permanent }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_too_large_is_permanent_and_timeouts_are_not() {
        let big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(classify(&big).permanent);
        let timeout = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(!classify(&timeout).permanent);
    }

    #[test]
    fn missing_topics_and_acl_denials_are_permanent() {
        for code in [
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert!(classify(&KafkaError::MessageProduction(code)).permanent, "{code:?}");
        }
        assert!(!classify(&KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown)).permanent);
        assert!(!classify(&KafkaError::MessageProduction(RDKafkaErrorCode::NotLeaderForPartition)).permanent);
    }

    #[test]
    fn repeated_librdkafka_lines_are_logged_once_per_window() {
        let context = QuietContext::default();
        let first = kind_of("FAIL", "127.0.0.1:9092/bootstrap: Connect failed (after 0ms in state CONNECT)");
        let again = kind_of(
            "FAIL",
            "127.0.0.1:9092/bootstrap: Connect failed (after 12ms in state CONNECT, 3 identical error(s) suppressed)",
        );
        assert_eq!(context.admit(first), Some(0));
        assert_eq!(context.admit(again.clone()), None);
        assert_eq!(context.admit(again), None);
        assert_eq!(context.admit(kind_of("FAIL", "another problem")), Some(0));
        assert!(all_brokers_down("1/1 brokers are down"));
        // A log line and an error with the same text are one kind.
        let logged =
            kind_of("", "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms)");
        assert_eq!(context.admit(logged.clone()), Some(0));
        assert_eq!(context.admit(logged), None);
        let with_thread = kind_of("", "[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: Connect failed");
        assert_eq!(
            with_thread,
            kind_of("", "127.0.0.1:9/bootstrap: Connect failed"),
            "the log's thread prefix is not part of the kind"
        );
    }

    #[test]
    fn invalid_property_is_a_config_error_naming_the_section() {
        let config = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            properties: [("no.such.property".to_string(), "1".to_string())].into(),
            properties_from_files: Default::default(),
            ..KafkaConfig::default()
        };
        let err = KafkaSink::new(&config, 1000).err().expect("must fail").to_string();
        assert!(err.contains("sink.kafka.properties"), "{err}");
    }
}
