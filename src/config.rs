//! Configuration: defaults < TOML file < `OUTBOX_RELAY_<SECTION>__<KEY>` environment.
//!
//! Every section is a plain serde struct that rejects unknown keys, so a typo
//! is an error that names the key instead of a silently ignored setting.
//! [`Config::validate`] checks what serde cannot (ranges, templates,
//! identifiers) and names the bad key and the fix.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Environment variable prefix; nesting uses `__`, e.g. `OUTBOX_RELAY_POSTGRES__URL`.
pub const ENV_PREFIX: &str = "OUTBOX_RELAY_";

/// A configuration that could not be loaded or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, an environment variable or a key's type was wrong.
    #[error("invalid configuration: {0}")]
    Load(String),
    /// A value parsed but is not acceptable; names the key and the fix.
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid {
        /// The dotted key, e.g. `source.batch_size`.
        key: &'static str,
        /// What is wrong with its value, and the fix.
        problem: String,
    },
}

impl ConfigError {
    /// A value that parsed but cannot work: names the key and what to do.
    pub(crate) fn invalid(key: &'static str, problem: impl Into<String>) -> Self {
        ConfigError::Invalid { key, problem: problem.into() }
    }
}

/// The whole relay configuration, one field per TOML section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the outbox lives.
    pub postgres: PostgresConfig,
    /// How events are captured from the outbox.
    pub source: SourceConfig,
    /// Where events are published.
    pub sink: SinkConfig,
    /// What happens to a row once the broker acknowledged it.
    pub published: PublishedConfig,
    /// How the relay stops.
    pub shutdown: ShutdownConfig,
    /// Log level and format.
    pub log: LogConfig,
    /// The operations endpoint (metrics, health).
    pub http: HttpConfig,
    /// How events are encoded on the broker (native envelope v1 or CloudEvents).
    pub envelope: EnvelopeConfig,
    /// What happens to events that cannot be published (retry or dead-letter).
    pub failures: FailuresConfig,
    /// How several relays on one outbox share the work and take over.
    pub replicas: ReplicasConfig,
}

/// The `[replicas]` section: several relays (one per application pod) on one
/// outbox, coordinated through leases in Postgres (`src/coordination`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicasConfig {
    /// This relay's name in logs, metrics, `status` and the lease table;
    /// `""` uses the host name (the pod name in Kubernetes).
    pub relay_id: String,
    /// Polling: the outbox is split into this many lanes by a hash of
    /// aggregate_id, and relays share the lanes. Every relay on one outbox
    /// must use the same number (a relay with another one waits until the
    /// relays with the old number are gone).
    pub lanes: u32,
    /// When a relay dies, freezes or loses its database, its lanes (or the
    /// replication slot) are taken over by another relay within about this long.
    #[serde(with = "humantime_serde")]
    pub takeover_within: Duration,
}

impl Default for ReplicasConfig {
    fn default() -> Self {
        ReplicasConfig { relay_id: String::new(), lanes: 32, takeover_within: Duration::from_secs(10) }
    }
}

impl ReplicasConfig {
    /// `relay_id`, or the host (pod) name when it is not set.
    pub fn resolved_relay_id(&self) -> String {
        if self.relay_id.trim().is_empty() {
            host_name()
        } else {
            self.relay_id.trim().to_owned()
        }
    }
}

/// What the relay does with an event whose publish failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Record the failure on the row and retry the event every
    /// `source.retry_failed_after`, holding back its aggregate's later events
    /// until it is published (the default: nothing is skipped or reordered).
    /// Polling keeps other aggregates flowing; replication, which cannot
    /// hold one aggregate back, stops the stream at that event and retries it.
    #[default]
    Block,
    /// Publish the event to `failures.dead_letter_topic` (at once for permanent
    /// failures, after `failures.max_attempts` for transient ones) and treat it as done.
    DeadLetter,
}

/// The `[failures]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailuresConfig {
    /// `block` or `dead_letter`.
    pub policy: FailurePolicy,
    /// Topic dead-lettered events are published to.
    pub dead_letter_topic: String,
    /// With `dead_letter`: attempts after which a transiently failing event is dead-lettered.
    pub max_attempts: u32,
}

impl Default for FailuresConfig {
    fn default() -> Self {
        FailuresConfig { policy: FailurePolicy::Block, dead_letter_topic: "outbox.dead-letter".into(), max_attempts: 5 }
    }
}

/// How an event is laid out in a broker message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnvelopeFormat {
    /// outbox-relay's own envelope v1 (`docs/envelope.md`); the default.
    #[serde(rename = "native")]
    Native,
    /// CloudEvents 1.0 JSON event format in the message value.
    #[serde(rename = "cloudevents-structured")]
    CloudEventsStructured,
    /// CloudEvents 1.0 Kafka binding, binary mode: attributes in `ce_` headers, payload as value.
    #[serde(rename = "cloudevents-binary")]
    CloudEventsBinary,
    /// Debezium's Outbox Event Router output: topic `outbox.event.<aggregate
    /// type>`, key the aggregate id, value the payload as is, header `id`
    /// (`docs/debezium.md`), so Debezium consumers need no change.
    #[serde(rename = "debezium")]
    Debezium,
}

/// How `event_version` shows in the CloudEvents `type` (and `dataschema`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeVersion {
    /// `type = "<event_type>.v<event_version>"`, e.g. `OrderPlaced.v2`.
    Suffix,
    /// `type = "<event_type>"`; the version is in `dataschema` (template required).
    Dataschema,
    /// `type = "<event_type>"`; the version is only in the `eventversion` extension.
    None,
}

/// The `[envelope]` section: message format and CloudEvents attributes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EnvelopeConfig {
    /// `native`, `cloudevents-structured` or `cloudevents-binary`.
    pub format: EnvelopeFormat,
    /// CloudEvents `source` (a URI-reference); `""` derives `/outbox-relay/<source.table>`.
    pub source: String,
    /// How the event version is carried in `type`.
    pub type_version: TypeVersion,
    /// `dataschema` template, e.g. `https://schemas.example.com/{event_type}/v{event_version}.json`;
    /// `""` sends no `dataschema`. Required when `type_version = "dataschema"`.
    pub dataschema: String,
    /// Extra CloudEvents extensions copied from the row's `headers` object:
    /// extension name -> header field, e.g. `tenant = "tenant_id"`.
    pub header_extensions: BTreeMap<String, String>,
    /// Options of `format = "debezium"` (Event Router equivalents).
    pub debezium: DebeziumConfig,
}

/// `[envelope.debezium]`: the Debezium Outbox Event Router options users
/// set, under our names (`docs/debezium.md` maps each one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct DebeziumConfig {
    /// `route.by.field`: the column whose value routes (a mapped column,
    /// by its table name or our name); default `aggregatetype`'s mapping.
    pub route_by_field: String,
    /// `route.topic.replacement`: the topic, `${routedByValue}` replaced.
    pub route_topic_replacement: String,
    /// `route.tombstone.on.empty.payload`: a NULL or empty payload becomes a tombstone.
    pub route_tombstone_on_empty_payload: bool,
    /// `table.fields.additional.placement` as a list of `column:header[:alias]`.
    pub additional_placement: Vec<String>,
}

impl Default for DebeziumConfig {
    fn default() -> Self {
        Self {
            route_by_field: "aggregate_type".into(),
            route_topic_replacement: "outbox.event.${routedByValue}".into(),
            route_tombstone_on_empty_payload: false,
            additional_placement: Vec::new(),
        }
    }
}

impl Default for EnvelopeConfig {
    fn default() -> Self {
        Self {
            format: EnvelopeFormat::Native,
            source: String::new(),
            type_version: TypeVersion::Suffix,
            dataschema: String::new(),
            header_extensions: BTreeMap::new(),
            debezium: DebeziumConfig::default(),
        }
    }
}

/// Where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port`; port 0 picks a free port (logged). Containers use `0.0.0.0:9187`.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: "127.0.0.1:9187".into() }
    }
}

/// Connection to the database that holds the outbox.
/// `Debug` shows `user@host:port/db`, never the URL's password.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq-style URL or key=value string, e.g. `postgres://relay@db:5432/app`.
    pub url: String,
    /// File holding the password (Kubernetes/systemd credentials); overrides the URL's.
    pub password_file: Option<std::path::PathBuf>,
    /// Give up on one connection attempt after this long (it is then retried).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// libpq sslmode: `disable`, `prefer` (default), `require`, `verify-ca`,
    /// `verify-full`; wins over the URL's `sslmode`.
    pub sslmode: Option<String>,
    /// CA certificate(s) (PEM) to verify the server with, or `system`; wins
    /// over the URL's. Unset with a `verify-*` mode: the system trust store.
    pub sslrootcert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for certificate authentication; needs `sslkey`.
    pub sslcert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM, unencrypted).
    pub sslkey: Option<std::path::PathBuf>,
    /// A request that gets no byte back this long ends its connection (which
    /// is then reopened): catches a network path or proxy that went silent
    /// without a reset. Bounds every statement and the replication stream;
    /// also the kernel's TCP_USER_TIMEOUT.
    #[serde(with = "humantime_serde")]
    pub io_timeout: Duration,
    /// TCP keepalive: idle time before the kernel's first probe.
    #[serde(with = "humantime_serde")]
    pub keepalive_idle: Duration,
    /// TCP keepalive: time between probes.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// TCP keepalive: unanswered probes before the kernel drops the connection.
    pub keepalive_retries: u32,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &redact_password(&self.url))
            .field("password_file", &self.password_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("sslcert", &self.sslcert)
            .field("sslkey", &self.sslkey)
            .finish()
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            password_file: None,
            connect_timeout: Duration::from_secs(10),
            sslmode: None,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            io_timeout: Duration::from_secs(30),
            keepalive_idle: Duration::from_secs(15),
            keepalive_interval: Duration::from_secs(5),
            keepalive_retries: 3,
        }
    }
}

/// Which capture mechanism reads the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceMode {
    /// Claim batches of unpublished rows, woken by LISTEN/NOTIFY.
    Poll,
    /// Tail logical replication (pgoutput) from a slot.
    Replication,
}

/// The capture side: which table, how much at a time, how often.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    /// Capture mechanism.
    pub mode: SourceMode,
    /// Outbox table, `schema.table` (or just `table` for the search path).
    pub table: String,
    /// Rows claimed per query; also the unit of marking.
    pub batch_size: usize,
    /// Fallback poll when no NOTIFY arrives (NOTIFY gives the low latency).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Batches published but not yet acknowledged; bounds memory and duplicates.
    pub max_in_flight_batches: usize,
    /// LISTEN channel the outbox trigger notifies.
    pub notify_channel: String,
    /// Poll mode: whether `migrate` installs the NOTIFY trigger that wakes the
    /// relay at commit. `false` lets applications use `PREPARE TRANSACTION`
    /// (two-phase commit) on transactions that write outbox rows; latency is
    /// then bounded by `poll_interval`. Replication mode never installs it.
    pub notify: bool,
    /// A row whose publish failed is retried no sooner than this.
    #[serde(with = "humantime_serde")]
    pub retry_failed_after: Duration,
    /// Column names of the outbox table (change them for a Debezium-style table).
    pub columns: ColumnMapping,
    /// Logical replication settings, used when `mode = "replication"`.
    pub replication: ReplicationConfig,
}

/// Logical replication: slot, publication, message prefix, pacing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Replication slot name (created by `migrate` or on first start).
    pub slot: String,
    /// Publication covering the outbox table.
    pub publication: String,
    /// `pg_logical_emit_message` prefix whose messages are events.
    pub message_prefix: String,
    /// Standby status updates at least this often (keep under wal_sender_timeout / 2).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Emit a heartbeat message this often so an idle database still lets the slot advance (`0s`: off).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            slot: "outbox_relay".into(),
            publication: "outbox_relay_pub".into(),
            message_prefix: "outbox".into(),
            status_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::ZERO,
        }
    }
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            mode: SourceMode::Poll,
            table: "outbox.events".into(),
            batch_size: 1000,
            poll_interval: Duration::from_secs(1),
            max_in_flight_batches: 4,
            notify_channel: "outbox_events".into(),
            notify: true,
            retry_failed_after: Duration::from_secs(30),
            columns: ColumnMapping::default(),
            replication: ReplicationConfig::default(),
        }
    }
}

/// Outbox column names. Optional fields may be set to `""` when the table
/// does not have the column; the relay then uses the documented fallback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ColumnMapping {
    /// Integer column giving publication order (required).
    pub position: String,
    /// uuid column; absent: a uuid derived from table and position.
    pub event_id: String,
    /// Required.
    pub aggregate_type: String,
    /// Required; becomes the message key.
    pub aggregate_id: String,
    /// Required.
    pub event_type: String,
    /// Integer; absent: 1.
    pub event_version: String,
    /// json, jsonb or text holding JSON (required).
    pub payload: String,
    /// json/jsonb object; absent: `{}`.
    pub headers: String,
    /// Text; absent: null.
    pub actor: String,
    /// Text (W3C traceparent); absent: none.
    pub traceparent: String,
    /// Text, per-row topic override; absent: the template always applies.
    pub topic: String,
    /// timestamptz; absent: the time the relay read the row.
    pub created_at: String,
    /// timestamptz stamped in mark mode; absent: only delete mode works.
    pub published_at: String,
    /// Failure bookkeeping columns (attempts, last_error, failed_at); absent:
    /// failures are logged only.
    pub attempts: String,
    /// See `attempts`.
    pub last_error: String,
    /// See `attempts`.
    pub failed_at: String,
    /// timestamptz set when a row was dead-lettered; with
    /// `failures.policy = "dead_letter"` such rows are never claimed again.
    /// Absent: dead-lettered rows are deleted in delete mode.
    pub dead_lettered_at: String,
}

impl Default for ColumnMapping {
    fn default() -> Self {
        Self {
            position: "id".into(),
            event_id: "event_id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            event_version: "event_version".into(),
            payload: "payload".into(),
            headers: "headers".into(),
            actor: "actor".into(),
            traceparent: "traceparent".into(),
            topic: "topic".into(),
            created_at: "created_at".into(),
            published_at: "published_at".into(),
            attempts: "attempts".into(),
            last_error: "last_error".into(),
            failed_at: "failed_at".into(),
            dead_lettered_at: "dead_lettered_at".into(),
        }
    }
}

/// Which broker the relay publishes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// Apache Kafka or any Kafka-protocol broker, through librdkafka.
    Kafka,
    /// Google Cloud Pub/Sub (or its emulator), through its REST API; see `docs/pubsub.md`.
    #[serde(rename = "pubsub")]
    PubSub,
}

/// The publishing side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// Broker type.
    pub kind: SinkKind,
    /// Topic template; `{aggregate_type}` and `{event_type}` are replaced.
    pub topic: String,
    /// Kafka settings, used when `kind = "kafka"`.
    pub kafka: KafkaConfig,
    /// Pub/Sub settings, used when `kind = "pubsub"`.
    pub pubsub: PubSubConfig,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            kind: SinkKind::Kafka,
            topic: "outbox.{aggregate_type}".into(),
            kafka: KafkaConfig::default(),
            pubsub: PubSubConfig::default(),
        }
    }
}

/// Google Cloud Pub/Sub publisher settings (`[sink.pubsub]`, see `docs/pubsub.md`).
/// Requests carry one topic and one ordering key each (Pub/Sub's rule), so
/// `max_concurrent_requests` is what spreads the load over many aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PubSubConfig {
    /// Google Cloud project id that owns the topics (required).
    pub project: String,
    /// API root, e.g. `https://us-east1-pubsub.googleapis.com` (a locational
    /// endpoint keeps ordering across regions); `""`: the emulator at
    /// `PUBSUB_EMULATOR_HOST` if set, else `https://pubsub.googleapis.com`.
    pub endpoint: String,
    /// Service-account or authorized-user JSON key; unset: Application Default
    /// Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's ADC file, the
    /// metadata server). Ignored with `PUBSUB_EMULATOR_HOST`.
    pub credentials_file: Option<std::path::PathBuf>,
    /// Create a topic that does not exist on first use (needs `pubsub.topics.create`).
    pub create_topics: bool,
    /// Messages per publish request (Pub/Sub allows at most 1000).
    pub max_messages_per_request: usize,
    /// Encoded bytes per publish request (the API limit is 10 MB); a bigger
    /// single message is sent alone.
    pub max_bytes_per_request: usize,
    /// Publish requests in flight at once, over all topics and ordering keys.
    pub max_concurrent_requests: usize,
    /// How long a key's first message waits for more to fill its request.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// One attempt of one request; a timed-out request is retried.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Messages accepted but not yet acknowledged; enqueue waits above this (backpressure).
    pub max_outstanding_messages: usize,
    /// Encoded bytes accepted but not yet acknowledged; enqueue waits above this.
    pub max_outstanding_bytes: usize,
    /// First retry delay of a failing ordering key (then doubling, with jitter).
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    /// Longest retry delay; retries never stop (order is never given up).
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
}

impl PubSubConfig {
    /// Pub/Sub's limit on messages per publish request.
    pub const MAX_MESSAGES_PER_REQUEST: usize = 1000;
    /// Pub/Sub's limit on the size of a publish request.
    pub const MAX_BYTES_PER_REQUEST: usize = 10_000_000;
}

impl Default for PubSubConfig {
    fn default() -> Self {
        Self {
            project: String::new(),
            endpoint: String::new(),
            credentials_file: None,
            create_topics: false,
            max_messages_per_request: 1000,
            max_bytes_per_request: 8_000_000,
            max_concurrent_requests: 64,
            linger: Duration::from_millis(5),
            request_timeout: Duration::from_secs(30),
            max_outstanding_messages: 100_000,
            max_outstanding_bytes: 256 * 1024 * 1024,
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(10),
        }
    }
}

/// librdkafka producer settings.
/// `Debug` hides the values of secret properties (`sasl.*`, `ssl.key.*`, passwords).
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, comma separated `host:port`.
    pub brokers: String,
    /// Any librdkafka producer property, passed through (TLS, SASL, compression...).
    pub properties: BTreeMap<String, String>,
    /// Properties whose values are read from files, e.g. `"sasl.password" = "/run/secrets/kafka"`.
    pub properties_from_files: BTreeMap<String, std::path::PathBuf>,
    /// At least once (the default) or exactly once through Kafka transactions.
    pub delivery: Delivery,
    /// Exactly once: the compacted topic the relay commits its position to,
    /// in the same transaction as the events (created if missing and allowed).
    pub offsets_topic: String,
    /// Exactly once: prefix of every transactional id (and position key);
    /// unique per outbox database within the Kafka cluster.
    pub transactional_id_prefix: String,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: String::new(),
            properties: BTreeMap::new(),
            properties_from_files: BTreeMap::new(),
            delivery: Delivery::AtLeastOnce,
            offsets_topic: "outbox-relay.offsets".into(),
            transactional_id_prefix: "outbox-relay".into(),
        }
    }
}

/// What a consumer can count on (`sink.kafka.delivery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every event at least once; a crash re-publishes the in-flight window.
    #[default]
    AtLeastOnce,
    /// Every event once for `read_committed` consumers: each batch and the
    /// relay's position commit in one Kafka transaction.
    ExactlyOnce,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> = self
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), if is_secret_key(k) { "<redacted>" } else { v.as_str() }))
            .collect();
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &properties)
            .field("properties_from_files", &self.properties_from_files)
            .field("delivery", &self.delivery)
            .field("offsets_topic", &self.offsets_topic)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .finish()
    }
}

/// What "published" means for a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishedMode {
    /// Stamp `published_at`; old stamped rows are deleted after `retention`.
    Mark,
    /// Delete the row once acknowledged.
    Delete,
    /// Replication mode only: the slot's confirmed LSN is the only mark.
    None,
}

/// Marking and retention of published rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishedConfig {
    /// Mark or delete.
    pub mode: PublishedMode,
    /// In mark mode, published rows older than this are deleted (`0s` keeps them).
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the retention cleanup runs.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Rows deleted per cleanup statement, to keep locks and WAL bursts small.
    pub cleanup_batch_size: usize,
}

impl Default for PublishedConfig {
    fn default() -> Self {
        Self {
            mode: PublishedMode::Mark,
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(60),
            cleanup_batch_size: 1000,
        }
    }
}

/// Graceful stop on SIGTERM/SIGINT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long to wait for in-flight events to be acknowledged and marked.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self { drain_timeout: Duration::from_secs(30) }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `outbox_relay=debug`; `RUST_LOG` wins.
    pub level: String,
    /// Text or JSON.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text }
    }
}

impl Config {
    /// Loads defaults, then the file (if given), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Config::extract(file)?;
        config.validate()?;
        Ok(config)
    }

    /// Like [`Config::load`] without [`Config::validate`]: for the demo, which
    /// fills in its own Postgres and broker before validating.
    pub fn extract(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Load(format!(
                    "config file {} does not exist (pass an existing file to --config)",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(&["config"]));
        figment.extract().map_err(|e| ConfigError::Load(describe_figment_error(e)))
    }

    /// Checks the values serde accepted but the relay cannot work with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.postgres.url.trim().is_empty() {
            return Err(ConfigError::invalid(
                "postgres.url",
                "is not set: set it in the config file or OUTBOX_RELAY_POSTGRES__URL, e.g. postgres://relay@localhost:5432/app",
            ));
        }
        let pg = &self.postgres;
        if pg.io_timeout < Duration::from_secs(1) || pg.io_timeout > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "postgres.io_timeout",
                "must be between 1s and 1h (longer than your slowest statement; 30s by default)",
            ));
        }
        if pg.keepalive_idle < Duration::from_secs(1) || pg.keepalive_idle > Duration::from_secs(7200) {
            return Err(ConfigError::invalid("postgres.keepalive_idle", "must be between 1s and 2h"));
        }
        if pg.keepalive_interval < Duration::from_secs(1) || pg.keepalive_interval > Duration::from_secs(600) {
            return Err(ConfigError::invalid("postgres.keepalive_interval", "must be between 1s and 10m"));
        }
        if !(1..=30).contains(&pg.keepalive_retries) {
            return Err(ConfigError::invalid("postgres.keepalive_retries", "must be between 1 and 30"));
        }
        if !(1..=50_000).contains(&self.source.batch_size) {
            return Err(ConfigError::invalid("source.batch_size", "must be between 1 and 50000"));
        }
        if !(1..=64).contains(&self.source.max_in_flight_batches) {
            return Err(ConfigError::invalid("source.max_in_flight_batches", "must be between 1 and 64"));
        }
        self.validate_durations()?;
        validate_log_level(&self.log.level)?;
        if !is_identifier(&self.source.notify_channel) {
            return Err(ConfigError::invalid(
                "source.notify_channel",
                "must be a plain identifier (letters, digits, underscore)",
            ));
        }
        self.validate_columns()?;
        if self.sink.kind == SinkKind::Kafka && self.sink.kafka.brokers.trim().is_empty() {
            return Err(ConfigError::invalid(
                "sink.kafka.brokers",
                "is not set: list the bootstrap brokers, e.g. \"kafka-1:9092,kafka-2:9092\"",
            ));
        }
        if self.sink.kafka.delivery == Delivery::ExactlyOnce {
            if self.sink.kind == SinkKind::PubSub {
                return Err(ConfigError::invalid(
                    "sink.kafka.delivery",
                    "is \"exactly_once\", but sink.kind = \"pubsub\": Pub/Sub has no transactions that could commit the events and the \
                     relay's position together; use kind = \"kafka\", or delivery = \"at_least_once\" with consumers that deduplicate on event_id",
                ));
            }
            if self.sink.kafka.offsets_topic.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "sink.kafka.offsets_topic",
                    "must name a topic when delivery = \"exactly_once\"",
                ));
            }
            let prefix = &self.sink.kafka.transactional_id_prefix;
            if prefix.trim().is_empty() || prefix.chars().count() > 100 || prefix.chars().any(char::is_control) {
                return Err(ConfigError::invalid(
                    "sink.kafka.transactional_id_prefix",
                    "must be 1-100 printable characters, unique per outbox database in the Kafka cluster",
                ));
            }
        }
        if self.published.mode == PublishedMode::Mark && self.source.columns.published_at.is_empty() {
            return Err(ConfigError::invalid(
                "published.mode",
                "is \"mark\" but source.columns.published_at is empty: add a published_at timestamptz column or use mode = \"delete\"",
            ));
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::invalid("http.listen", "must be host:port with a numeric IP, e.g. 0.0.0.0:9187"));
        }
        if let Some(path) = &self.postgres.password_file {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    "postgres.password_file",
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        for (property, path) in &self.sink.kafka.properties_from_files {
            if !path.is_file() {
                return Err(ConfigError::invalid(
                    "sink.kafka.properties_from_files",
                    format!("{property}: {} is not a readable file", path.display()),
                ));
            }
        }
        if self.published.mode == PublishedMode::None && self.source.mode != SourceMode::Replication {
            return Err(ConfigError::invalid(
                "published.mode",
                "is \"none\", which only works with source.mode = \"replication\" (the slot is the mark): use \"mark\" or \"delete\"",
            ));
        }
        if self.source.mode == SourceMode::Replication {
            let r = &self.source.replication;
            if !is_identifier(&r.slot) || r.slot.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(ConfigError::invalid(
                    "source.replication.slot",
                    "must be lowercase letters, digits and underscores",
                ));
            }
            if !is_identifier(&r.publication) {
                return Err(ConfigError::invalid("source.replication.publication", "must be a plain identifier"));
            }
            if r.message_prefix.is_empty() {
                return Err(ConfigError::invalid("source.replication.message_prefix", "must not be empty"));
            }
        }
        if !(1..=100_000).contains(&self.published.cleanup_batch_size) {
            return Err(ConfigError::invalid("published.cleanup_batch_size", "must be between 1 and 100000"));
        }
        if self.failures.policy == FailurePolicy::DeadLetter {
            if self.failures.dead_letter_topic.trim().is_empty() {
                return Err(ConfigError::invalid(
                    "failures.dead_letter_topic",
                    "must name a topic when failures.policy = \"dead_letter\"",
                ));
            }
            if self.failures.max_attempts == 0 {
                return Err(ConfigError::invalid("failures.max_attempts", "must be at least 1"));
            }
        }
        if !(1..=1024).contains(&self.replicas.lanes) {
            return Err(ConfigError::invalid(
                "replicas.lanes",
                "must be between 1 and 1024 (and the same on every relay of this outbox)",
            ));
        }
        if self.replicas.relay_id.chars().count() > 63 || self.replicas.relay_id.chars().any(char::is_control) {
            return Err(ConfigError::invalid(
                "replicas.relay_id",
                "must be at most 63 printable characters (the pod or host name)",
            ));
        }
        Ok(())
    }

    /// Every duration key against its allowed range (`0s` only where it means "off").
    /// A zero that reaches a timer panics (`period must be non-zero`), so ranges are checked here.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        const MS: Duration = Duration::from_millis(1);
        const S: Duration = Duration::from_secs(1);
        const MIN: Duration = Duration::from_secs(60);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(86_400);
        /// (key, value, zero allowed and meaning, min, max, human range)
        type Check = (&'static str, Duration, Option<&'static str>, Duration, Duration, &'static str);
        let checks: [Check; 9] = [
            (
                "postgres.connect_timeout",
                self.postgres.connect_timeout,
                None,
                100 * MS,
                10 * MIN,
                "between 100ms and 10m",
            ),
            ("source.poll_interval", self.source.poll_interval, None, 10 * MS, HOUR, "between 10ms and 1h"),
            ("source.retry_failed_after", self.source.retry_failed_after, None, 100 * MS, DAY, "between 100ms and 24h"),
            (
                "source.replication.status_interval",
                self.source.replication.status_interval,
                None,
                100 * MS,
                30 * S,
                "between 100ms and 30s",
            ),
            (
                "source.replication.heartbeat_interval",
                self.source.replication.heartbeat_interval,
                Some("off"),
                S,
                HOUR,
                "0s (off) or between 1s and 1h",
            ),
            (
                "published.retention",
                self.published.retention,
                Some("keep forever"),
                S,
                3650 * DAY,
                "0s (keep) or between 1s and 3650d",
            ),
            ("published.cleanup_interval", self.published.cleanup_interval, None, S, DAY, "between 1s and 24h"),
            (
                "shutdown.drain_timeout",
                self.shutdown.drain_timeout,
                Some("no drain"),
                Duration::ZERO,
                HOUR,
                "between 0s and 1h",
            ),
            ("replicas.takeover_within", self.replicas.takeover_within, None, S, 10 * MIN, "between 1s and 10m"),
        ];
        for (key, value, zero, min, max, range) in checks {
            if value.is_zero() && zero.is_some() {
                continue;
            }
            if value < min || value > max {
                return Err(ConfigError::invalid(
                    key,
                    format!("is {}, which is out of range: it must be {range}", humantime::format_duration(value)),
                ));
            }
        }
        Ok(())
    }

    fn validate_columns(&self) -> Result<(), ConfigError> {
        let c = &self.source.columns;
        let required = [
            ("source.columns.position", &c.position),
            ("source.columns.aggregate_type", &c.aggregate_type),
            ("source.columns.aggregate_id", &c.aggregate_id),
            ("source.columns.event_type", &c.event_type),
            ("source.columns.payload", &c.payload),
        ];
        for (key, name) in required {
            if name.is_empty() {
                return Err(ConfigError::invalid(key, "is required: name the outbox column that holds it"));
            }
        }
        let all = [
            ("source.columns.position", &c.position),
            ("source.columns.event_id", &c.event_id),
            ("source.columns.aggregate_type", &c.aggregate_type),
            ("source.columns.aggregate_id", &c.aggregate_id),
            ("source.columns.event_type", &c.event_type),
            ("source.columns.event_version", &c.event_version),
            ("source.columns.payload", &c.payload),
            ("source.columns.headers", &c.headers),
            ("source.columns.actor", &c.actor),
            ("source.columns.traceparent", &c.traceparent),
            ("source.columns.topic", &c.topic),
            ("source.columns.created_at", &c.created_at),
            ("source.columns.published_at", &c.published_at),
            ("source.columns.attempts", &c.attempts),
            ("source.columns.last_error", &c.last_error),
            ("source.columns.failed_at", &c.failed_at),
            ("source.columns.dead_lettered_at", &c.dead_lettered_at),
        ];
        for (key, name) in all {
            if !name.is_empty() && !is_identifier(name) {
                return Err(ConfigError::invalid(
                    key,
                    format!("\"{name}\" is not a plain column name (letters, digits, underscore)"),
                ));
            }
        }
        let failure = [&c.attempts, &c.last_error, &c.failed_at];
        let set = failure.iter().filter(|n| !n.is_empty()).count();
        if set != 0 && set != failure.len() {
            return Err(ConfigError::invalid(
                "source.columns.attempts",
                "attempts, last_error and failed_at must be all set or all empty",
            ));
        }
        Ok(())
    }
}

/// Levels a `log.level` directive may name.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `log.level` must be a level or `target=level` directives: tracing would
/// otherwise read a typo such as `verbose` as a target name and log nothing useful.
fn validate_log_level(level: &str) -> Result<(), ConfigError> {
    let fix =
        "use one of trace, debug, info, warn, error, off, or target=level directives, e.g. \"info,outbox_relay=debug\"";
    for directive in level.split(',').map(str::trim) {
        let named = directive.rsplit_once('=').map_or(directive, |(_, level)| level);
        if !LOG_LEVELS.contains(&named.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::invalid("log.level", format!("{directive:?} is not a level: {fix}")));
        }
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| ConfigError::invalid("log.level", format!("{level:?} is not a valid filter ({e}): {fix}")))?;
    Ok(())
}

/// `true` for names we can splice into SQL unquoted-safe (we still quote them).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// Whether a configuration key can hold a secret (a password in a URL, a
/// SASL or TLS key setting, credentials): its value never appears in an error.
pub fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["url", "password", "secret", "sasl.", "ssl.key", "credential", "token"].iter().any(|needle| key.contains(needle))
}

/// A TOML parse error without the source lines it echoes (`3 | url = "postgres://u:pw@…"`):
/// the position and the parser's complaint stay, the text of the file does not.
fn without_echoed_source(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .filter(|line| {
            let gutter = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
            !(gutter.starts_with('|') || line.starts_with('^'))
        })
        .collect::<Vec<_>>()
        .join(": ")
}

/// How a duration is written, appended when a duration key got a bare number.
const DURATION_HINT: &str = "write it with a unit, e.g. \"5s\", \"250ms\" or \"2m\" (in the environment too: OUTBOX_RELAY_SOURCE__POLL_INTERVAL=5s)";

fn describe_kind(key: &str, kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    let secret = is_secret_key(key);
    let hidden = "(value hidden: this key holds a secret)";
    match kind {
        Kind::Message(message) if key.is_empty() => without_echoed_source(message),
        Kind::Message(_) if secret => format!("invalid value {hidden}"),
        Kind::Message(message) if message.contains("duration") => format!("{message}: {DURATION_HINT}"),
        Kind::Message(message) => message.clone(),
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) if secret => {
            format!("invalid value {hidden}; expected {expected}")
        }
        Kind::InvalidType(actual, expected) if expected.contains("duration") => {
            format!("found {actual}, expected a duration: {DURATION_HINT}")
        }
        Kind::UnknownField(field, expected) => {
            format!("unknown key `{field}`; valid keys here: {}", expected.join(", "))
        }
        Kind::UnknownVariant(found, expected) => {
            format!(
                "unknown value \"{found}\"; use one of: {}",
                expected.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}

fn describe_figment_error(error: figment::Error) -> String {
    let mut parts = Vec::new();
    for e in error {
        let key = e.path.join(".");
        let origin = e.metadata.as_ref().map(|m| m.name.to_string()).unwrap_or_default();
        let kind = describe_kind(&key, &e.kind);
        let mut line = if key.is_empty() { kind } else { format!("`{key}`: {kind}") };
        if !origin.is_empty() {
            line.push_str(&format!(" (from {origin})"));
        }
        parts.push(line);
    }
    parts.join("; ")
}

/// The host name (in Kubernetes, the pod name): a relay's default id.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return format!("pid-{}", std::process::id());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A connection string with its password replaced, for `Debug` output:
/// `postgres://relay:<redacted>@db:5432/app`, and `password=<redacted>` in
/// the key/value form.
fn redact_password(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!("{}{}:<redacted>{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]);
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|part| if part.to_ascii_lowercase().starts_with("password=") { "password=<redacted>" } else { part })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut c = Config::default();
        c.postgres.url = "postgres://relay@localhost/app".into();
        c.sink.kafka.brokers = "localhost:9092".into();
        c
    }

    #[test]
    fn defaults_plus_url_and_brokers_are_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn missing_url_names_the_key_and_env_var() {
        let mut c = valid();
        c.postgres.url.clear();
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("postgres.url"), "{msg}");
        assert!(msg.contains("OUTBOX_RELAY_POSTGRES__URL"), "{msg}");
    }

    #[test]
    fn batch_size_out_of_range_is_rejected() {
        let mut c = valid();
        c.source.batch_size = 0;
        assert!(c.validate().unwrap_err().to_string().contains("source.batch_size"));
    }

    #[test]
    fn mark_mode_needs_published_at_column() {
        let mut c = valid();
        c.source.columns.published_at.clear();
        assert!(c.validate().unwrap_err().to_string().contains("published.mode"));
        c.published.mode = PublishedMode::Delete;
        c.validate().unwrap();
    }

    #[test]
    fn column_names_must_be_identifiers() {
        let mut c = valid();
        c.source.columns.payload = "payload; drop table x".into();
        assert!(c.validate().unwrap_err().to_string().contains("source.columns.payload"));
    }

    #[test]
    fn unknown_key_in_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, "[source]\nbatch_sise = 10\n").unwrap();
        let msg = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(msg.contains("batch_sise"), "{msg}");
    }

    #[test]
    fn durations_parse_from_human_strings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "[postgres]\nurl = \"postgres://a@b/c\"\n[source]\npoll_interval = \"250ms\"\n[sink.kafka]\nbrokers = \"k:9092\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.source.poll_interval, Duration::from_millis(250));
    }

    fn load_toml(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path))
    }

    const BASE: &str =
        "[postgres]\nurl = \"postgres://relay:TopSecretPw1@db/app\"\n[sink.kafka]\nbrokers = \"k:9092\"\n";

    #[test]
    fn a_toml_syntax_error_names_the_line_but_never_echoes_it() {
        let msg =
            load_toml("[postgres]\nurl = \"postgres://relay:TopSecretPw1@db/app\nx = 1\n").unwrap_err().to_string();
        assert!(!msg.contains("TopSecretPw1"), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn a_wrong_type_on_a_secret_key_hides_the_value() {
        let msg = load_toml(&format!("{BASE}[sink.kafka.properties]\n\"sasl.password\" = 987654321\n"))
            .unwrap_err()
            .to_string();
        assert!(!msg.contains("987654321"), "{msg}");
        assert!(msg.contains("sasl.password") && msg.contains("hidden"), "{msg}");
        let msg = load_toml("[postgres]\nurl = 987654321\n").unwrap_err().to_string();
        assert!(!msg.contains("987654321") && msg.contains("postgres.url"), "{msg}");
    }

    #[test]
    fn debug_never_shows_passwords_or_secret_properties() {
        let mut c = valid();
        c.postgres.url = "postgres://relay:TopSecretPw1@db/app".into();
        c.sink.kafka.properties.insert("sasl.password".into(), "KafkaSecret2".into());
        c.sink.kafka.properties.insert("compression.type".into(), "zstd".into());
        let debug = format!("{c:?}");
        assert!(!debug.contains("TopSecretPw1") && !debug.contains("KafkaSecret2"), "{debug}");
        assert!(debug.contains("relay:<redacted>@db") && debug.contains("zstd"), "{debug}");
    }

    #[test]
    fn an_invalid_log_level_is_an_error() {
        let mut c = valid();
        c.log.level = "verbose".into();
        assert!(c.validate().unwrap_err().to_string().contains("log.level"));
        c.log.level = "info,outbox_relay=debug".into();
        c.validate().unwrap();
    }

    #[test]
    fn every_duration_is_range_checked() {
        let mut c = valid();
        c.source.retry_failed_after = Duration::ZERO;
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.contains("source.retry_failed_after") && msg.contains("100ms"), "{msg}");
        let mut c = valid();
        c.published.retention = Duration::ZERO;
        c.source.replication.heartbeat_interval = Duration::ZERO;
        c.validate().unwrap();
        c.postgres.connect_timeout = Duration::from_secs(3600);
        assert!(c.validate().unwrap_err().to_string().contains("postgres.connect_timeout"));
    }

    #[test]
    fn a_bare_number_for_a_duration_suggests_a_unit_and_unknown_keys_read_cleanly() {
        let msg = load_toml(&format!("{BASE}[source]\npoll_interval = 5\n")).unwrap_err().to_string();
        assert!(msg.contains("source.poll_interval") && msg.contains("\"5s\""), "{msg}");
        let msg = load_toml(&format!("{BASE}[source]\nbatch_sise = 5\n")).unwrap_err().to_string();
        assert!(msg.contains("unknown key `batch_sise`") && !msg.contains("``"), "{msg}");
    }
}
