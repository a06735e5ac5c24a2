//! The configuration checks that need the feature modules, run once at
//! start-up before anything is bound or connected.
//!
//! `config` is the bottom layer: it parses the file and the environment and
//! checks every value it can judge alone. Whether a TLS file loads, the
//! outbox table's name parses, a topic template renders, the envelope and
//! sink settings fit together, or the dead-letter topic is a valid name for
//! the configured sink is known only to the modules that use them; this
//! module asks each of them, so every command refuses a bad configuration
//! the same way (exit 2) and no feature module is imported by `config`.

use std::path::Path;

use crate::config::{Config, ConfigError, Delivery, FailurePolicy, SinkKind};

/// Loads the configuration and checks all of it (see the module docs).
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check_features(&config)?;
    Ok(config)
}

/// Checks a configuration built in code (the demo) as [`load`] would.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    check_features(config)
}

fn check_features(config: &Config) -> Result<(), ConfigError> {
    // TLS parameters (libpq spellings) come out of the URL first: tokio-postgres rejects most of them.
    let (url, tls) = crate::tls::resolve(&config.postgres).map_err(|e| ConfigError::invalid(e.key, e.problem))?;
    if url.parse::<tokio_postgres::Config>().is_err() {
        return Err(ConfigError::invalid(
            "postgres.url",
            "is not a valid connection string: use postgres://user:password@host:port/database",
        ));
    }
    // Reads the certificate files now, so a wrong path fails at start-up, not at the first connect.
    tls.load().map_err(|e| ConfigError::invalid(e.key, e.problem))?;
    crate::outbox::OutboxTable::from_config(config).map_err(|problem| {
        ConfigError::invalid("source.table", problem.trim_start_matches("source.table ").to_owned())
    })?;
    crate::envelope::TopicTemplate::parse(&config.sink.topic)
        .map_err(|problem| ConfigError::invalid("sink.topic", problem))?;
    crate::envelope::validate_config(&config.envelope, &config.source.table)
        .map_err(|e| ConfigError::invalid(e.key, e.problem))?;
    crate::envelope::debezium::validate_config(&config.envelope, &config.source.columns)
        .map_err(|e| ConfigError::invalid(e.key, e.problem))?;
    match config.sink.kind {
        SinkKind::Kafka => {
            crate::envelope::check_kafka_template(&config.sink.topic)
                .map_err(|problem| ConfigError::invalid("sink.topic", problem))?;
            let offsets = &config.sink.kafka.offsets_topic;
            if config.sink.kafka.delivery == Delivery::ExactlyOnce && !crate::envelope::is_valid_topic(offsets) {
                return Err(ConfigError::invalid(
                    "sink.kafka.offsets_topic",
                    format!("{offsets:?} is not a valid Kafka topic name ({}): name the compacted topic exactly-once delivery commits its position to", crate::envelope::KAFKA_TOPIC_RULE),
                ));
            }
        }
        SinkKind::PubSub => crate::sink::pubsub::validate_config(&config.sink.pubsub, &config.sink.topic)
            .map_err(|e| ConfigError::invalid(e.key, e.problem))?,
    }
    if config.failures.policy == FailurePolicy::DeadLetter {
        let topic = &config.failures.dead_letter_topic;
        let bad = match config.sink.kind {
            SinkKind::Kafka => (!crate::envelope::is_valid_topic(topic))
                .then(|| format!("{topic:?} is not a valid Kafka topic name (1-249 characters of a-z A-Z 0-9 . _ -)")),
            SinkKind::PubSub => crate::sink::pubsub::topic::check_topic_name(topic).err(),
        };
        if let Some(problem) = bad {
            return Err(ConfigError::invalid(
                "failures.dead_letter_topic",
                format!("{problem}: poison events could never be dead-lettered; name a valid topic"),
            ));
        }
    }
    Ok(())
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
    fn libpq_tls_parameters_in_the_url_are_accepted() {
        let mut c = valid();
        c.postgres.url = "postgres://relay@db/app?sslmode=require&application_name=x".into();
        validate(&c).unwrap();
        c.postgres.url = "postgres://relay@db/app?sslmode=verify-ca".into();
        if let Err(e) = validate(&c) {
            // Only on a machine without CA certificates (verify-ca falls back to the system store).
            assert!(e.to_string().contains("system trust store"), "{e}");
        }
        c.postgres.url = "postgres://relay@db/app?sslmode=verify-full&sslrootcert=/nonexistent.pem".into();
        let msg = validate(&c).unwrap_err().to_string();
        assert!(msg.contains("`postgres.url`") && msg.contains("/nonexistent.pem"), "{msg}");
    }

    #[test]
    fn exactly_once_needs_kafka_and_a_valid_offsets_topic() {
        let mut c = valid();
        c.sink.kafka.delivery = Delivery::ExactlyOnce;
        validate(&c).unwrap();
        c.sink.kafka.offsets_topic = "bad topic!".into();
        let msg = validate(&c).unwrap_err().to_string();
        assert!(msg.contains("sink.kafka.offsets_topic"), "{msg}");
        c.sink.kafka.offsets_topic = "outbox-relay.offsets".into();
        c.sink.kind = SinkKind::PubSub;
        c.sink.pubsub.project = "my-project".into();
        let msg = validate(&c).unwrap_err().to_string();
        assert!(msg.contains("sink.kafka.delivery") && msg.contains("Pub/Sub has no transactions"), "{msg}");
    }

    #[test]
    fn the_dead_letter_topic_must_be_valid_for_the_sink() {
        let mut c = valid();
        c.failures.policy = FailurePolicy::DeadLetter;
        c.failures.dead_letter_topic = "bad topic!".into();
        let msg = validate(&c).unwrap_err().to_string();
        assert!(msg.contains("failures.dead_letter_topic") && msg.contains("Kafka topic"), "{msg}");
    }

    #[test]
    fn tls_keys_load_from_the_file_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let base = "[sink.kafka]\nbrokers = \"k:9092\"\n[postgres]\nurl = \"postgres://a@b/c?sslmode=require\"\n";
        std::fs::write(&path, format!("{base}sslmode = \"disable\"\n")).unwrap();
        assert_eq!(load(Some(&path)).unwrap().postgres.sslmode.as_deref(), Some("disable"));
        std::fs::write(&path, format!("{base}sslmode = \"verify\"\n")).unwrap();
        let msg = load(Some(&path)).unwrap_err().to_string();
        assert!(msg.contains("`postgres.sslmode`") && msg.contains("verify-ca, verify-full"), "{msg}");
        std::fs::write(&path, format!("{base}sslcert = \"/client.pem\"\n")).unwrap();
        let msg = load(Some(&path)).unwrap_err().to_string();
        assert!(msg.contains("`postgres.sslkey`"), "{msg}");
    }
}
