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

use std::sync::RwLock;
use std::time::Duration;

use futures::FutureExt;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::{OutgoingMessage, PendingDelivery, PublishError, Sink};
use crate::config::KafkaConfig;

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
    Unreachable { brokers: String, source: KafkaError },
}

/// Publishes to Kafka.
pub struct KafkaSink {
    /// Replaced only by [`Sink::recover`], between sessions.
    producer: RwLock<FutureProducer>,
    /// What `recover` builds a new producer from.
    client: ClientConfig,
    brokers: String,
}

impl KafkaSink {
    /// Builds the producer; `queue_capacity` must cover every in-flight message.
    pub fn new(config: &KafkaConfig, queue_capacity: usize) -> Result<KafkaSink, KafkaSinkError> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", queue_capacity.max(100_000).to_string())
            .set("queue.buffering.max.kbytes", "1048576")
            .set("partitioner", "murmur2_random");
        for (key, value) in &config.properties {
            client.set(key, value);
        }
        for (key, path) in &config.properties_from_files {
            let value = std::fs::read_to_string(path).map_err(|e| {
                KafkaSinkError::SecretFile(format!("sink.kafka.properties_from_files.{key}: cannot read {}: {e}", path.display()))
            })?;
            client.set(key, value.trim_end_matches(['\n', '\r']));
        }
        let producer: FutureProducer = client.create().map_err(KafkaSinkError::Config)?;
        Ok(KafkaSink { producer: RwLock::new(producer), client, brokers: config.brokers.clone() })
    }

    /// The underlying producer (metadata look-ups, statistics).
    pub fn producer(&self) -> FutureProducer {
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
                reason: format!("the Kafka producer failed fatally: {fatal}; the relay restarts its session with a new producer"),
                permanent: false,
            };
            let results = vec![Err(error); messages.len()];
            return async move { results }.boxed();
        }
        let producer = self.producer();
        let mut slots = Vec::with_capacity(messages.len());
        for message in &messages {
            slots.push(Self::enqueue_one(&producer, message).await);
        }
        async move {
            let mut results = Vec::with_capacity(slots.len());
            // Deliveries complete roughly in order, so awaiting them in order costs nothing.
            for slot in slots {
                results.push(match slot {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((error, _))) => Err(classify(&error)),
                        Err(_canceled) => Err(PublishError {
                            reason: "the Kafka producer was shut down before the broker answered".into(),
                            permanent: false,
                        }),
                    },
                    Err(failure) => Err(failure),
                });
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

    async fn recover(&self) {
        let Some(fatal) = self.fatal() else { return };
        match self.client.create::<FutureProducer>() {
            Ok(fresh) => {
                *self.producer.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                tracing::warn!(error = %fatal, "the Kafka producer had failed fatally; replaced it with a new one");
            }
            Err(error) => tracing::error!(%error, "cannot create a new Kafka producer; the next session tries again"),
        }
    }
}

impl KafkaSink {
    /// Enqueues one message, waiting while librdkafka's queue is full.
    async fn enqueue_one(producer: &FutureProducer, message: &OutgoingMessage) -> Result<DeliveryFuture, PublishError> {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in &message.headers {
            headers = headers.insert(Header { key: name.as_ref(), value: Some(value.as_slice()) });
        }
        if !crate::envelope::is_valid_topic(&message.topic) {
            return Err(PublishError {
                reason: format!("topic {:?} is not a valid Kafka topic name ({})", message.topic, crate::envelope::KAFKA_TOPIC_RULE),
                permanent: true,
            });
        }
        let mut record = FutureRecord::to(&message.topic).key(message.key.as_bytes()).headers(headers);
        if !message.tombstone {
            record = record.payload(message.value.as_slice());
        }
        if let Some(timestamp) = message.timestamp_ms {
            record = record.timestamp(timestamp);
        }
        let mut backoff = Duration::from_millis(1);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => return Ok(delivery),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                    // Backpressure: librdkafka's queue is full until deliveries complete.
                    record = returned;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err((error, _)) => return Err(classify(&error)),
            }
        }
    }
}

/// Splits Kafka errors into ones a later retry may fix and ones it cannot.
fn classify(error: &KafkaError) -> PublishError {
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::TopicAuthorizationFailed
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
    fn invalid_property_is_a_config_error_naming_the_section() {
        let config = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            properties: [("no.such.property".to_string(), "1".to_string())].into(),
            properties_from_files: Default::default(),
        };
        let err = KafkaSink::new(&config, 1000).err().expect("must fail").to_string();
        assert!(err.contains("sink.kafka.properties"), "{err}");
    }
}
