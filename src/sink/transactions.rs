//! Exactly-once delivery to Kafka (`sink.kafka.delivery = "exactly_once"`).
//!
//! ```text
//!   batch ──▶ begin ─▶ events ─▶ position record ─▶ commit ──▶ BatchOutcome
//!                                (offsets topic,     │ abortable error: abort, retry the same
//!                                 key = holder)      │ messages in the same order (bounded)
//!                                                    └ fenced / fatal: drop the producer, end the session
//! ```
//!
//! # Holders and producers
//! A transactional id is derived from what the relay holds: `{prefix}.slot.{slot}`
//! in replication mode (every leader of the slot uses the same id), and
//! `{prefix}.poll.{table}.{relay_id}` in poll mode: **one producer per relay
//! for all of its lanes**, not one per lane. A claim spans every lane the
//! relay holds, so one transaction per batch covers them all; a producer per
//! lane would cost a thread set, broker connections and a transaction
//! coordinator round trip per lane per batch (32 lanes: 32 commits per batch).
//! Fencing follows the lanes anyway: a relay that takes a lane over from an
//! expired lease ([`crate::coordination`] reports the previous holder) first
//! calls `init_transactions` with the previous holder's id, which aborts its
//! open transaction and makes its next commit fail, then reads its position.
//! A relay restarted under the same `relay_id` fences its former self the same way.
//!
//! # Position
//! Each transaction also writes, keyed by the holder's id, every event that
//! is committed but not yet settled in Postgres ([`Committed`]: rows not yet
//! marked, transactions the slot has not yet confirmed), including this
//! batch. The last committed record per key therefore names everything the
//! broker holds that Postgres does not know about; the relay reads it
//! (`read_committed`) before publishing, after any crash or takeover.

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::acks::Acks;
use super::kafka::{KafkaSink, QuietContext, RelayProducer};
use super::{OutgoingMessage, PublishError};
use crate::metrics::Metrics;
use crate::settle::{Committed, EventKey};

/// How often one batch's transaction is tried before the session gives up
/// and restarts (a fresh producer, the position read again).
const MAX_ATTEMPTS: u32 = 5;
/// Bound on `init_transactions`, commit and abort calls.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on reading the committed positions.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most events one position record may name (about 24 bytes each decoded);
/// a record naming more is refused as corrupt.
const MAX_RECORD_EVENTS: u64 = 10_000_000;

/// The position record's value: the events in committed transactions of
/// this holder not yet settled, as runs of consecutive positions.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct PositionRecord {
    /// Format version.
    v: u32,
    /// `[txn, message (0/1), first position, last position]` per run.
    runs: Vec<(u64, u8, i64, i64)>,
    /// Replication: the highest LSN the writer had confirmed to the slot.
    #[serde(default)]
    confirmed: u64,
}

impl PositionRecord {
    fn of(keys: &[EventKey], confirmed: u64) -> PositionRecord {
        let mut runs: Vec<(u64, u8, i64, i64)> = Vec::new();
        for key in keys {
            let message = u8::from(key.message);
            match runs.last_mut() {
                Some((txn, m, _, last))
                    if *txn == key.txn && *m == message && key.position == last.saturating_add(1) =>
                {
                    *last = key.position
                }
                _ => runs.push((key.txn, message, key.position, key.position)),
            }
        }
        PositionRecord { v: 1, runs, confirmed }
    }

    fn keys(&self) -> Result<Vec<EventKey>, String> {
        let total: u64 =
            self.runs.iter().map(|(_, _, first, last)| last.saturating_sub(*first).max(0) as u64 + 1).sum();
        if self.v != 1 || total > MAX_RECORD_EVENTS {
            return Err(format!("unsupported position record (version {}, {total} events)", self.v));
        }
        Ok(self
            .runs
            .iter()
            .flat_map(|&(txn, message, first, last)| {
                (first..=last).map(move |position| EventKey { position, txn, message: message != 0 })
            })
            .collect())
    }
}

/// What a transaction attempt came to.
enum Attempt {
    /// Committed.
    Committed,
    /// Some messages can never be published (per message, permanent): the
    /// transaction was not committed; try again without them.
    Refused(Vec<(usize, PublishError)>),
    /// The transaction must be aborted and can be tried again.
    Abortable(String),
    /// The producer is fenced (another relay holds this id now) or failed
    /// for good: nothing more goes out on it.
    Fatal(String),
}

/// The producer of what this relay currently holds.
struct Held {
    id: String,
    producer: RelayProducer,
}

/// The exactly-once state of a [`KafkaSink`].
pub struct Transactions {
    /// Producer settings without a `transactional.id`.
    client: ClientConfig,
    prefix: String,
    topic: String,
    committed: Committed,
    held: tokio::sync::Mutex<Option<Held>>,
    metrics: OnceLock<Metrics>,
    /// The offsets topic exists (or could not be created: the read says so).
    topic_checked: std::sync::atomic::AtomicBool,
}

/// Turns a transactional API error into what happens next.
fn judge(what: &str, error: KafkaError) -> Attempt {
    match &error {
        KafkaError::Transaction(e) if e.is_fatal() => Attempt::Fatal(format!("{what}: {error}")),
        KafkaError::Transaction(e)
            if e.code() == RDKafkaErrorCode::ProducerFenced || e.code() == RDKafkaErrorCode::InvalidProducerEpoch =>
        {
            Attempt::Fatal(format!("{what}: {error}"))
        }
        _ => Attempt::Abortable(format!("{what}: {error}")),
    }
}

/// Runs a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(_) => Err(KafkaError::Canceled),
    }
}

impl Transactions {
    /// Exactly-once state over producer settings `client` (no transactional id yet).
    pub fn new(client: ClientConfig, prefix: &str, topic: &str) -> Transactions {
        Transactions {
            client,
            prefix: prefix.to_owned(),
            topic: topic.to_owned(),
            committed: Committed::default(),
            held: tokio::sync::Mutex::new(None),
            metrics: OnceLock::new(),
            topic_checked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The committed-but-unsettled set, shared with the relay's ledger.
    pub fn committed(&self, metrics: &Metrics) -> Committed {
        let _ = self.metrics.set(metrics.clone());
        self.committed.clone()
    }

    fn id_of(&self, holder: &str) -> String {
        format!("{}.{holder}", self.prefix)
    }

    /// A producer with `id` whose `init_transactions` succeeded: earlier
    /// producers with that id are fenced and their open transaction aborted.
    async fn init(&self, id: &str) -> Result<RelayProducer, String> {
        let mut client = self.client.clone();
        client.set("transactional.id", id);
        let producer: RelayProducer = client
            .create_with_context(QuietContext::default())
            .map_err(|e| format!("cannot create the transactional producer {id}: {e} (check sink.kafka.properties)"))?;
        let init = producer.clone();
        blocking(move || init.init_transactions(CALL_TIMEOUT)).await.map_err(|e| {
            format!(
                "init_transactions for transactional id {id} failed: {e} (the broker must support transactions; \
                 the relay's principal needs Write and Describe on that transactional id)"
            )
        })?;
        Ok(producer)
    }

    /// Becomes the producer of `holder` (fencing any earlier producer of it)
    /// after fencing each holder in `previous`, then reads what committed
    /// transactions of `holder` (and, when `holder` ends with `.*`, of every
    /// holder it names) delivered that Postgres may not know yet.
    pub async fn hold(
        &self,
        sink: &KafkaSink,
        holder: &str,
        previous: &[String],
        scope: &str,
    ) -> Result<(Vec<EventKey>, u64), String> {
        self.ensure_topic(sink).await;
        let id = self.id_of(holder);
        let mut held = self.held.lock().await;
        let current = held.as_ref().is_some_and(|h| h.id == id && h.producer.client().fatal_error().is_none());
        if !current {
            *held = None;
            let producer = self.init(&id).await?;
            tracing::info!(transactional_id = %id, "exactly-once: transactional producer ready; earlier producers with this id are fenced");
            *held = Some(Held { id: id.clone(), producer });
        }
        for other in previous.iter().filter(|p| p.as_str() != holder) {
            let other_id = self.id_of(other);
            // Dropped at once: its only job is to bump the id's epoch.
            let fencer = self.init(&other_id).await?;
            drop(fencer);
            tracing::info!(transactional_id = %other_id, "exactly-once: fenced the previous holder's producer");
        }
        drop(held);
        let scope = self.id_of(scope);
        self.read_positions(move |key: &str| key == scope || (scope.ends_with('.') && key.starts_with(&scope))).await
    }

    /// Creates the offsets topic (compacted, one partition) if it is
    /// missing; a refusal is logged, and reading the position says what is wrong.
    async fn ensure_topic(&self, sink: &KafkaSink) {
        use std::sync::atomic::Ordering;
        if self.topic_checked.load(Ordering::Acquire) {
            return;
        }
        let producer = sink.producer();
        let topic = self.topic.clone();
        let exists = blocking(move || {
            let metadata = producer.client().fetch_metadata(Some(&topic), Duration::from_secs(10))?;
            Ok(metadata.topics().iter().any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()))
        })
        .await;
        if matches!(exists, Ok(true)) {
            self.topic_checked.store(true, Ordering::Release);
            return;
        }
        let admin: AdminClient<DefaultClientContext> = match self.client.create() {
            Ok(admin) => admin,
            Err(error) => {
                tracing::warn!(%error, "cannot create an admin client to create the offsets topic");
                return;
            }
        };
        let new = NewTopic::new(&self.topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
        match admin.create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await {
            Ok(results) => match results.into_iter().next() {
                Some(Ok(_)) => {
                    tracing::info!(topic = %self.topic, "exactly-once: created the compacted offsets topic");
                    self.topic_checked.store(true, Ordering::Release);
                }
                Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => {
                    self.topic_checked.store(true, Ordering::Release)
                }
                Some(Err((_, code))) => tracing::warn!(
                    topic = %self.topic,
                    error = ?code,
                    "cannot create the offsets topic: create it yourself (cleanup.policy=compact, replicated like your other topics) \
                     or grant the relay Create on it"
                ),
                None => {}
            },
            Err(error) => tracing::warn!(topic = %self.topic, %error, "cannot create the offsets topic"),
        }
    }

    /// The events named by the last committed position record of each key `wanted` accepts.
    async fn read_positions(
        &self,
        wanted: impl Fn(&str) -> bool + Send + 'static,
    ) -> Result<(Vec<EventKey>, u64), String> {
        let mut client = ClientConfig::new();
        // Connection and security settings carry over; producer-only ones do not.
        let shared = [
            "bootstrap.servers",
            "security.",
            "ssl.",
            "sasl.",
            "socket.",
            "broker.",
            "client.",
            "api.version",
            "reconnect.",
        ];
        for (key, value) in self.client.config_map() {
            if shared.iter().any(|p| key.starts_with(p)) {
                client.set(key, value);
            }
        }
        client
            .set("group.id", format!("{}.position-reader", self.prefix))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer<QuietContext> = client
            .create_with_context(QuietContext::default())
            .map_err(|e| format!("cannot create the position reader: {e}"))?;
        let topic = self.topic.clone();
        let started = Instant::now();
        let latest = blocking(move || read_latest(&consumer, &topic, &wanted)).await.map_err(|e| {
            format!(
                "cannot read the committed position from {} ({e}); exactly-once delivery publishes nothing before it knows \
                 what the broker already holds: check that the topic exists and the relay may read it",
                self.topic
            )
        })?;
        let mut keys = Vec::new();
        let mut confirmed = 0;
        for (id, value) in latest {
            let record: PositionRecord =
                serde_json::from_slice(&value).map_err(|e| format!("position record of {id} is not readable: {e}"))?;
            let mut named = record.keys().map_err(|e| format!("position record of {id}: {e}"))?;
            keys.append(&mut named);
            confirmed = confirmed.max(record.confirmed);
        }
        tracing::info!(
            events = keys.len(),
            took_ms = started.elapsed().as_millis() as u64,
            confirmed,
            "exactly-once: read the committed position (events the broker holds that may not be settled yet)"
        );
        Ok((keys, confirmed))
    }

    /// Publishes `messages` and this holder's position in one transaction;
    /// `keys[i]` names the event of `messages[i]`. Per-message results in order.
    pub async fn publish(&self, messages: Vec<OutgoingMessage>, keys: Vec<EventKey>) -> Vec<Result<(), PublishError>> {
        let mut held = self.held.lock().await;
        let Some(Held { id, producer }) = held.as_ref() else {
            let error = PublishError {
                reason: "no transactional producer: this relay holds nothing it may publish for (yet)".into(),
                permanent: false,
            };
            return vec![Err(error); messages.len()];
        };
        let (id, producer) = (id.clone(), producer.clone());
        let mut refused: Vec<Option<PublishError>> = vec![None; messages.len()];
        let mut failures = 0u32;
        let mut backoff = Duration::from_millis(100);
        let last = loop {
            match self.attempt(&producer, &id, &messages, &keys, &refused).await {
                Attempt::Committed => {
                    self.committed.add(keys.iter().zip(&refused).filter(|(_, r)| r.is_none()).map(|(k, _)| *k));
                    return refused.into_iter().map(|r| r.map_or(Ok(()), Err)).collect();
                }
                Attempt::Refused(list) => {
                    self.abort(&producer).await;
                    for (index, error) in list {
                        tracing::warn!(position = messages[index].position, reason = %error.reason, "exactly-once: the broker refuses an event for good; the transaction is retried without it");
                        refused[index] = Some(error);
                    }
                    if refused.iter().all(Option::is_some) {
                        return refused.into_iter().map(|r| r.map_or(Ok(()), Err)).collect();
                    }
                }
                Attempt::Abortable(reason) => {
                    failures += 1;
                    if !self.abort(&producer).await {
                        *held = None;
                        break format!("{reason}; the abort failed too, so the producer is replaced");
                    }
                    if failures >= MAX_ATTEMPTS {
                        break format!("{reason} ({failures} attempts)");
                    }
                    tracing::warn!(%reason, retry_in = ?backoff, "exactly-once: transaction aborted; retrying the same events in the same order");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Attempt::Fatal(reason) => {
                    if let Some(m) = self.metrics.get() {
                        m.transactions_aborted.inc();
                    }
                    *held = None;
                    break format!(
                        "{reason}; this producer is fenced or failed for good (another relay may hold {id} now)"
                    );
                }
            }
        };
        let error =
            PublishError { reason: format!("the Kafka transaction could not commit: {last}"), permanent: false };
        refused.into_iter().map(|r| Err(r.unwrap_or_else(|| error.clone()))).collect()
    }

    /// Aborts the open transaction; false if even that failed.
    async fn abort(&self, producer: &RelayProducer) -> bool {
        if let Some(m) = self.metrics.get() {
            m.transactions_aborted.inc();
        }
        let p = producer.clone();
        match blocking(move || p.abort_transaction(CALL_TIMEOUT)).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "exactly-once: aborting the transaction failed");
                false
            }
        }
    }

    async fn attempt(
        &self,
        producer: &RelayProducer,
        id: &str,
        messages: &[OutgoingMessage],
        keys: &[EventKey],
        refused: &[Option<PublishError>],
    ) -> Attempt {
        if let Err(error) = producer.begin_transaction() {
            return judge("begin_transaction", error);
        }
        let (acks, answered) = Acks::new();
        let mut now_refused = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            if refused[index].is_some() {
                continue;
            }
            match KafkaSink::enqueue_one(producer, message, acks.ack(index)).await {
                Ok(()) => {}
                Err(error) if error.permanent => now_refused.push((index, error)),
                Err(error) => return Attempt::Abortable(error.reason),
            }
        }
        acks.seal();
        if !now_refused.is_empty() {
            return Attempt::Refused(now_refused);
        }
        let Ok(mut answers) = answered.await else {
            return Attempt::Abortable("the producer was shut down".into());
        };
        // The first failure in the batch's order decides, as the batch was sent.
        answers.sort_unstable_by_key(|(index, _)| *index);
        for (index, answer) in answers {
            match answer {
                Ok(()) => {}
                Err(KafkaError::Canceled) => return Attempt::Abortable("the producer was shut down".into()),
                Err(error) => {
                    let failure = super::kafka::classify(&error);
                    if failure.permanent {
                        now_refused.push((index, failure));
                    } else {
                        return judge("producing", error);
                    }
                }
            }
        }
        if !now_refused.is_empty() {
            return Attempt::Refused(now_refused);
        }
        // The position is written only once the broker holds every event it
        // names. Kafka never shows an aborted transaction's records to a
        // read_committed reader, so the order does not matter there; a broker
        // that does (tansu 0.6 reports no aborted transactions in Fetch)
        // would otherwise let a successor read the position of a transaction
        // that died half-sent and skip events the broker never received.
        // Costs one produce round trip per transaction.
        // The position: everything committed and unsettled, plus this batch.
        let (mut named, confirmed) = self.committed.snapshot();
        named.extend(keys.iter().zip(refused).filter(|(_, r)| r.is_none()).map(|(k, _)| *k));
        named.sort_unstable_by_key(|k| (k.txn, k.message, k.position));
        named.dedup();
        let value = match serde_json::to_vec(&PositionRecord::of(&named, confirmed)) {
            Ok(value) => value,
            Err(error) => return Attempt::Abortable(format!("encoding the position: {error}")),
        };
        let (acks, answered) = Acks::new();
        let record = BaseRecord::with_opaque_to(&self.topic, acks.ack(0)).key(id.as_bytes()).payload(value.as_slice());
        if let Err((error, returned)) = producer.send(record) {
            returned.delivery_opaque.withdraw();
            return Attempt::Abortable(format!("writing the position to {}: {error}", self.topic));
        }
        acks.seal();
        match answered.await.map(|mut answers| answers.pop()) {
            Ok(Some((_, Ok(())))) => {}
            Ok(Some((_, Err(KafkaError::Canceled)))) | Ok(None) | Err(_) => {
                return Attempt::Abortable("the producer was shut down".into())
            }
            Ok(Some((_, Err(error)))) => return judge(&format!("writing the position to {}", self.topic), error),
        }
        let started = Instant::now();
        let p = producer.clone();
        match blocking(move || p.commit_transaction(CALL_TIMEOUT)).await {
            Ok(()) => {
                if let Some(m) = self.metrics.get() {
                    m.transactions_committed.inc();
                    m.transaction_commit_latency.observe(started.elapsed().as_secs_f64());
                }
                Attempt::Committed
            }
            Err(KafkaError::Transaction(e)) if e.txn_requires_abort() && !e.is_fatal() => {
                Attempt::Abortable(format!("commit_transaction: {e}"))
            }
            // Any other commit error leaves the outcome unknown: only a new
            // producer (its init_transactions settles the transaction) and the
            // position read after it can tell, so the session starts over.
            Err(error) => Attempt::Fatal(format!("commit_transaction: {error}")),
        }
    }

    /// Drops a producer that failed for good, so the next session starts a new one.
    pub async fn recover(&self) {
        let mut held = self.held.lock().await;
        if held.as_ref().is_some_and(|h| h.producer.client().fatal_error().is_some()) {
            *held = None;
        }
    }
}

/// Reads `topic` from the beginning to its end (read_committed) and keeps
/// the last value of each key `wanted` accepts.
fn read_latest(
    consumer: &BaseConsumer<QuietContext>,
    topic: &str,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<BTreeMap<String, Vec<u8>>, KafkaError> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut latest = BTreeMap::new();
    if partitions.is_empty() {
        // Nothing was ever committed (the topic is created on first use).
        return Ok(latest);
    }
    let mut ends = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let (_, high) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(10))?;
        ends.insert(partition, high);
        assignment.add_partition_offset(topic, partition, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + READ_TIMEOUT;
    let mut done: HashSet<i32> = ends.iter().filter(|(_, high)| **high <= 0).map(|(p, _)| *p).collect();
    while done.len() < partitions.len() {
        if Instant::now() > deadline {
            return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut));
        }
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(message)) => {
                if let (Some(key), Some(value)) = (message.key(), message.payload()) {
                    if let Ok(key) = std::str::from_utf8(key) {
                        if wanted(key) {
                            latest.insert(key.to_owned(), value.to_vec());
                        }
                    }
                }
                if message.offset() + 1 >= ends.get(&message.partition()).copied().unwrap_or(0) {
                    done.insert(message.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                // The end as a read_committed reader sees it (transaction
                // markers are not messages, so the last offset may be short of the high mark).
                done.insert(partition);
            }
            Some(Err(error)) => return Err(error),
            None => {}
        }
    }
    Ok(latest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_record_round_trips_as_runs() {
        let keys = vec![
            EventKey::row(1),
            EventKey::row(2),
            EventKey::row(3),
            EventKey::row(7),
            EventKey { position: 8, txn: 500, message: false },
            EventKey { position: 9, txn: 500, message: false },
            EventKey { position: 9000, txn: 500, message: true },
        ];
        let record = PositionRecord::of(&keys, 0);
        assert_eq!(record.runs, vec![(0, 0, 1, 3), (0, 0, 7, 7), (500, 0, 8, 9), (500, 1, 9000, 9000)]);
        let text = serde_json::to_vec(&record).unwrap();
        let back: PositionRecord = serde_json::from_slice(&text).unwrap();
        assert_eq!(back.keys().unwrap(), keys);
    }

    #[test]
    fn a_record_naming_absurdly_many_events_is_refused() {
        let record = PositionRecord { v: 1, runs: vec![(0, 0, 0, i64::MAX)], confirmed: 0 };
        assert!(record.keys().is_err());
    }
}
