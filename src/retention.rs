//! Mark mode keeps published rows for a while (for audits and `replay`);
//! this task deletes the ones older than `published.retention`, in small
//! batches so it never holds long locks or writes a burst of WAL.

use std::time::Duration;

use tracing::{debug, info, warn};

use crate::config::Config;
use crate::postgres;
use crate::shutdown::Shutdown;
use crate::outbox::OutboxTable;

/// Deletes expired published rows every `cleanup_interval` until shutdown.
pub async fn run(config: Config, mut shutdown: Shutdown) {
    let Some(sql) = OutboxTable::from_config(&config).ok().and_then(|t| t.retention_sql()) else { return };
    let retention_secs = config.published.retention.as_secs_f64();
    let batch = config.published.cleanup_batch_size as i64;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tokio::time::sleep(config.published.cleanup_interval) => {}
        }
        let connection = match postgres::connect(&config.postgres, "outbox-relay retention").await {
            Ok(connection) => connection,
            Err(error) => {
                warn!(%error, "retention cleanup skipped this round");
                continue;
            }
        };
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
