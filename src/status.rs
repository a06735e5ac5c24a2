//! `outbox-relay status`: the 3 a.m. questions in one screen. Is the outbox
//! backing up? How old is the oldest event? Is anything publishing? Which
//! relay holds which lanes, or the replication slot?

use serde::Serialize;

use crate::config::{Config, PublishedMode, SourceMode};
use crate::coordination::{holdings, Holding, Resource};
use crate::postgres::{self, PostgresError};
use crate::outbox::OutboxTable;
use crate::source::table;

/// The status report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Outbox table.
    pub table: String,
    /// Unpublished rows.
    pub backlog: i64,
    /// Age of the oldest unpublished row, seconds.
    pub oldest_unpublished_age_seconds: Option<f64>,
    /// Rows stamped published in the last minute (mark mode; among the newest rows).
    pub published_last_minute: Option<i64>,
    /// Unpublished rows whose publish failed at least once.
    pub failing: Option<i64>,
    /// What the relays share: the outbox table (polling) or `slot:<name>`.
    pub coordinated_on: String,
    /// Lanes the outbox is split into (polling; 1 for the slot).
    pub lanes: i32,
    /// Every live relay and what it holds; an empty `lanes` is a standby.
    pub relays: Vec<Holding>,
    /// Lanes nobody holds right now (polling): their events wait.
    pub unheld_lanes: Vec<i32>,
}

/// Gathers the report.
pub async fn gather(config: &Config) -> Result<Status, PostgresError> {
    let connection = postgres::connect(&config.postgres, "outbox-relay status").await?;
    let client = &connection.client;
    let outbox = OutboxTable::from_config(config).map_err(PostgresError::Query)?;
    let table = outbox.name();
    let q = |e: tokio_postgres::Error| PostgresError::query("status", &e);
    let row = client.query_one(&outbox.backlog_sql(), &[]).await.map_err(q)?;
    let backlog: i64 = row.try_get(0).map_err(q)?;
    let age: Option<f64> = row.try_get(1).map_err(q)?;
    let published_last_minute = match outbox.published_last_minute_sql() {
        Some(sql) if config.published.mode == PublishedMode::Mark => {
            Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?)
        }
        _ => None,
    };
    let failing = match outbox.failing_sql() {
        Some(sql) => Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?),
        None => None,
    };
    let resource = match config.source.mode {
        SourceMode::Poll => Resource::lanes_of(table::resolve(client, table).await?, config.replicas.lanes),
        SourceMode::Replication => Resource::slot(&config.source.replication.slot),
    };
    let relays: Vec<Holding> = holdings(client, &resource.name).await?.into_iter().filter(|h| h.lane_count == resource.lanes).collect();
    let held: std::collections::BTreeSet<i32> = relays.iter().flat_map(|r| r.lanes.iter().copied()).collect();
    let unheld_lanes = (0..resource.lanes).filter(|lane| !held.contains(lane)).collect();
    Ok(Status {
        table: config.source.table.clone(),
        backlog,
        oldest_unpublished_age_seconds: age.filter(|_| backlog > 0),
        published_last_minute,
        failing,
        coordinated_on: resource.name,
        lanes: resource.lanes,
        relays,
        unheld_lanes,
    })
}

/// Human-readable rendering.
pub fn print(status: &Status) {
    println!("outbox                {}", status.table);
    println!("backlog               {} unpublished", status.backlog);
    match status.oldest_unpublished_age_seconds {
        Some(age) => println!("oldest unpublished    {age:.1} s old"),
        None => println!("oldest unpublished    -"),
    }
    match status.published_last_minute {
        Some(n) => println!("published last minute {n}"),
        None => println!("published last minute n/a (delete mode)"),
    }
    if let Some(failing) = status.failing {
        println!("failing rows          {failing}");
    }
    let slot = status.coordinated_on.starts_with("slot:");
    if status.relays.is_empty() {
        println!("relays                none running");
    }
    for relay in &status.relays {
        let holds = match (slot, relay.lanes.is_empty()) {
            (_, true) => "standby".to_owned(),
            (true, false) => format!("streams {}", status.coordinated_on),
            (false, false) => format!("{} lanes {}", relay.lanes.len(), lane_ranges(&relay.lanes)),
        };
        println!("relay {:<16} {holds} (lease renewed, expires in {:.1} s)", relay.relay_id, relay.expires_in_seconds);
    }
    if !slot && !status.unheld_lanes.is_empty() {
        println!("unheld lanes          {} of {}: {} (taken over within replicas.takeover_within)", status.unheld_lanes.len(), status.lanes, lane_ranges(&status.unheld_lanes));
    }
}

/// `0-3,7,9-10`: sorted lanes, runs collapsed.
fn lane_ranges(lanes: &[i32]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < lanes.len() {
        let start = lanes[i];
        let mut end = start;
        while i + 1 < lanes.len() && lanes[i + 1] == end + 1 {
            i += 1;
            end = lanes[i];
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_ranges_collapse_runs() {
        assert_eq!(lane_ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3,7,9-10");
        assert_eq!(lane_ranges(&[]), "");
    }
}
