//! `outbox-relay migrate`: applies the versioned SQL in `sql/` in order,
//! once each, recording what was applied. Safe to run concurrently and
//! repeatedly (an advisory lock serializes runs; applied versions are skipped).

use tokio_postgres::Client;
use tracing::info;

use crate::config::{Config, SourceMode};
use crate::postgres::PostgresError;

/// Every migration, in the order it must be applied.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "outbox", sql: include_str!("../sql/0001_outbox.sql") },
    Migration { version: 2, name: "dead_letter", sql: include_str!("../sql/0002_dead_letter.sql") },
    Migration { version: 3, name: "relay_leases", sql: include_str!("../sql/0003_relay_leases.sql") },
];

/// One schema change.
#[derive(Debug)]
pub struct Migration {
    /// Applied in ascending order; never reused.
    pub version: i32,
    /// Short label for logs and the history table.
    pub name: &'static str,
    /// The statements.
    pub sql: &'static str,
}

/// Applies what is missing; returns the versions applied by this call.
pub async fn run(client: &mut Client) -> Result<Vec<i32>, PostgresError> {
    let fail = |what: &str, e: tokio_postgres::Error| PostgresError::query(&format!("migrate: {what}"), &e);
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS outbox; \
             CREATE TABLE IF NOT EXISTS outbox.schema_migrations ( \
               version integer PRIMARY KEY, name text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .or_else(|e| {
            // Two concurrent first runs may race on CREATE; the loser retries below.
            if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) {
                Ok(())
            } else {
                Err(e)
            }
        })
        .map_err(|e| fail("creating the outbox schema", e))?;
    let mut applied = Vec::new();
    for migration in MIGRATIONS {
        let tx = client.transaction().await.map_err(|e| fail("starting a transaction", e))?;
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('outbox-relay:migrate'))", &[])
            .await
            .map_err(|e| fail("taking the migration lock", e))?;
        let done = tx
            .query_opt("SELECT 1 FROM outbox.schema_migrations WHERE version = $1", &[&migration.version])
            .await
            .map_err(|e| fail("reading applied migrations", e))?
            .is_some();
        if done {
            continue;
        }
        tx.batch_execute(migration.sql)
            .await
            .map_err(|e| fail(&format!("applying {:04}_{}", migration.version, migration.name), e))?;
        tx.execute(
            "INSERT INTO outbox.schema_migrations (version, name) VALUES ($1, $2)",
            &[&migration.version, &migration.name],
        )
        .await
        .map_err(|e| fail("recording the migration", e))?;
        tx.commit().await.map_err(|e| fail("committing", e))?;
        info!(version = migration.version, name = migration.name, "applied migration");
        applied.push(migration.version);
    }
    Ok(applied)
}

/// Installs or removes the NOTIFY trigger on `outbox.events` to match the
/// configuration, and says what it did. A transaction that sent a NOTIFY
/// cannot be prepared (`PREPARE TRANSACTION` fails), so the trigger is only
/// there in poll mode with `source.notify = true` (where it buys latency);
/// replication mode does not need it.
pub async fn reconcile_notify_trigger(client: &Client, config: &Config) -> Result<String, PostgresError> {
    let wanted = config.source.mode == SourceMode::Poll && config.source.notify;
    let sql = if wanted {
        "DROP TRIGGER IF EXISTS events_notify_relay ON outbox.events; \
         CREATE TRIGGER events_notify_relay AFTER INSERT ON outbox.events \
         FOR EACH STATEMENT EXECUTE FUNCTION outbox.notify_relay()"
    } else {
        "DROP TRIGGER IF EXISTS events_notify_relay ON outbox.events"
    };
    client
        .batch_execute(sql)
        .await
        .map_err(|e| PostgresError::query("migrate: setting up the NOTIFY trigger on outbox.events", &e))?;
    Ok(if wanted {
        "NOTIFY trigger on outbox.events: installed (wakes the relay at commit; set source.notify = false if applications \
         use PREPARE TRANSACTION on transactions that write outbox rows)"
            .into()
    } else if config.source.mode == SourceMode::Replication {
        "NOTIFY trigger on outbox.events: not installed (replication mode does not need it; PREPARE TRANSACTION works)"
            .into()
    } else {
        "NOTIFY trigger on outbox.events: not installed (source.notify = false; latency is bounded by source.poll_interval; \
         PREPARE TRANSACTION works)"
            .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_strictly_increasing() {
        assert!(MIGRATIONS.windows(2).all(|w| w[0].version < w[1].version));
        assert_eq!(MIGRATIONS[0].version, 1);
    }
}
