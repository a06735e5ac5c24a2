//! Background probes that feed readiness and the backlog gauges: is the
//! broker answering, how many rows wait, how old is the oldest.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{interval, MissedTickBehavior};
use tracing::{debug, warn};

use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outbox::OutboxTable;
use crate::postgres;
use crate::shutdown::Shutdown;
use crate::sink::Sink;

/// How often the broker is probed.
const BROKER_EVERY: Duration = Duration::from_secs(5);
/// How often the backlog is measured.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// Probes the broker until shutdown, updating readiness.
pub async fn watch_broker<S: Sink>(sink: Arc<S>, health: Health, mut shutdown: Shutdown) {
    let mut tick = interval(BROKER_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut was_up = true;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let result = sink.reachable(Duration::from_secs(3)).await;
        health.set_broker(result.is_ok());
        match result {
            Err(error) if was_up => {
                warn!(%error, "broker not reachable; readiness is failing");
                was_up = false;
            }
            Ok(()) if !was_up => {
                warn!("broker reachable again");
                was_up = true;
            }
            _ => {}
        }
    }
}

/// Measures the backlog until shutdown, on its own connection (mark and
/// delete modes; in none mode the slot lag is the backlog).
pub async fn watch_backlog(config: Config, metrics: Metrics, mut shutdown: Shutdown) {
    if config.published.mode == crate::config::PublishedMode::None {
        // Rows are never marked in none mode: a row count would grow on a
        // healthy relay. The replication session measures the slot's lag instead.
        return;
    }
    let sql = match OutboxTable::from_config(&config) {
        Ok(table) => table.backlog_sql(),
        // Validated at start-up; nothing to measure otherwise.
        Err(_) => return,
    };
    let mut tick = interval(BACKLOG_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connection = None;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        if connection.as_ref().is_none_or(|c: &postgres::Connection| c.client.is_closed()) {
            connection = postgres::connect(&config.postgres, "outbox-relay monitor").await.ok();
        }
        let Some(conn) = &connection else { continue };
        match conn.client.query_one(&sql, &[]).await {
            Ok(row) => {
                let count: i64 = row.try_get(0).unwrap_or(0);
                let age: Option<f64> = row.try_get(1).unwrap_or(None);
                metrics.backlog_events.set(count);
                metrics.oldest_unpublished_age.set(age.unwrap_or(0.0).max(0.0));
            }
            Err(error) => {
                debug!(error = %postgres::describe(&error), "backlog probe failed");
                connection = None;
            }
        }
    }
}
