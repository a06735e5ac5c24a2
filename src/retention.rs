//! Mark mode keeps published rows for a while (for audits and `replay`);
//! this task deletes the ones older than `published.retention`, in small
//! batches so it never holds long locks or writes a burst of WAL.
//!
//! Every relay runs it, in both capture modes, but only one deletes at a
//! time: the one holding the table's retention lock (a session-level
//! advisory lock on the cleaner's own connection). When that relay dies its
//! connection closes, the lock is free, and another relay's next round
//! takes it.

use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::outbox::OutboxTable;
use crate::postgres;
use crate::shutdown::Shutdown;

/// Deletes expired published rows every `cleanup_interval` until shutdown.
pub async fn run(config: Config, table: OutboxTable, mut shutdown: Shutdown) {
    let Some(sql) = table.retention_sql() else { return };
    let lock_key = format!("outbox-relay retention {}", table.name());
    let retention_secs = config.published.retention.as_secs_f64();
    let batch = config.published.cleanup_batch_size as i64;
    let mut held: Option<postgres::Connection> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(config.published.cleanup_interval) => {}
        }
        if held.as_ref().is_some_and(|c| c.client.is_closed()) {
            held = None;
        }
        if held.is_none() {
            let connection = match postgres::connect(&config.postgres, "outbox-relay retention").await {
                Ok(connection) => connection,
                Err(error) => {
                    warn!(%error, "retention cleanup skipped this round");
                    continue;
                }
            };
            match connection
                .client
                .query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&lock_key])
                .await
            {
                Ok(row) if row.try_get::<_, bool>(0).unwrap_or(false) => {
                    debug!("this relay cleans up published rows past retention");
                    held = Some(connection);
                }
                Ok(_) => {
                    debug!("another relay cleans up published rows past retention");
                    continue;
                }
                Err(error) => {
                    warn!(error = %postgres::describe(&error), "retention cleanup skipped this round");
                    continue;
                }
            }
        }
        let Some(connection) = held.as_ref() else { continue };
        let mut total = 0u64;
        loop {
            match connection.client.execute(&sql, &[&retention_secs, &batch]).await {
                Ok(deleted) => {
                    total += deleted;
                    if deleted < batch as u64 || shutdown.is_triggered() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => {
                    warn!(error = %postgres::describe(&error), "retention cleanup failed; will try again");
                    break;
                }
            }
        }
        if total > 0 {
            info!(deleted = total, "deleted published rows past retention");
        } else {
            debug!("no published rows past retention");
        }
    }
}
