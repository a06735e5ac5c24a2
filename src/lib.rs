//! outbox-relay: publishes a Postgres transactional outbox to Kafka, at
//! least once, in per-aggregate order.
//!
//! # Layout
//! ```text
//! source/     capture: poll.rs claims unpublished rows, replication/ tails a pgoutput slot
//! event       a captured row, validated (RawRow -> OutboxEvent | Rejected)
//! envelope/   OutboxEvent -> message: topic template, key, headers, native v1 JSON or CloudEvents
//! sink/       brokers: kafka.rs (idempotent librdkafka producer), pubsub/ (REST, ordering keys)
//! pipeline    publish stage: enqueue batches, return outcomes in claim order
//! holdback    failures.policy = "block": hold an aggregate back behind its failed event
//! failure     the failure vocabulary (FailureKind, FailedRow) and dead letters
//! settle      the settlement core: a batch outcome + the failure policy -> marks, dead letters, retries, or the session's end
//! relay/      sessions (poll.rs, replication.rs): capture -> publish -> checkpoint, reconnect, drain
//! coordination/  several relays on one outbox: members, lane and slot leases in Postgres, fair shares (quota.rs)
//! retention   deletes published rows past retention (mark mode)
//! outbox      the outbox table: its name, column mapping and every statement on it
//! migrate     applies sql/ migrations
//! postgres    connections, NOTIFY, operator-friendly errors
//! tls/        sslmode over rustls (ring) for tokio-postgres and the replication client: connection strings,
//!             sslmode policy, the certificate verifier, channel binding, error explanations
//! startup     the configuration checks that need the feature modules (config stays the bottom layer)
//! config      figment: defaults < TOML < OUTBOX_RELAY_* env, validation
//! metrics     Prometheus counters, gauges, histograms
//! internal_events  what the relay reports about itself: each event's log line and metric in one place
//! http        /metrics, /healthz, /readyz
//! health      liveness and readiness state; systemd watchdog
//! monitor     broker probe and backlog gauges
//! systemd     sd_notify
//! shutdown    SIGTERM/SIGINT -> one watch channel
//! cli         subcommands: run, migrate, demo, check, status, replay
//! check, status, replay   the operator commands
//! demo/       zero-setup demo: throwaway Postgres + librdkafka mock cluster
//! ```

// The library's public face is what the binary, the tests and the benchmark
// use: the command line, configuration, the demo's throwaway Postgres, the
// outbox table's checks, Postgres connections (with TLS) and the replication
// wire client. Everything else is crate-internal, so the compiler reports
// what nothing uses.
pub mod cli;
pub mod config;
pub mod demo;
pub mod outbox;
pub mod postgres;
pub mod source;
pub mod tls;

pub(crate) mod check;
pub(crate) mod coordination;
pub(crate) mod envelope;
pub(crate) mod event;
pub(crate) mod failure;
pub(crate) mod health;
pub(crate) mod holdback;
pub(crate) mod http;
mod internal_events;
pub(crate) mod metrics;
pub(crate) mod migrate;
pub(crate) mod monitor;
pub(crate) mod pipeline;
pub(crate) mod relay;
pub(crate) mod replay;
pub(crate) mod retention;
pub(crate) mod settle;
pub(crate) mod shutdown;
pub(crate) mod sink;
pub(crate) mod startup;
pub(crate) mod status;
pub(crate) mod systemd;
