//! `outbox-relay status`: the 3 a.m. questions in one screen. Is the outbox
//! backing up? How old is the oldest event? Is anything publishing? Which
//! relay holds which lanes, or the replication slot?

use serde::Serialize;

use crate::config::{Config, PublishedMode, SourceMode};
use crate::coordination::{holdings, Holding, Resource};
use crate::outbox::OutboxTable;
use crate::postgres::{self, PostgresError};
use crate::source::table;

/// The status report.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Outbox table.
    pub table: String,
    /// `poll` or `replication`.
    pub source_mode: &'static str,
    /// `mark`, `delete` or `none`.
    pub published_mode: &'static str,
    /// Unpublished rows; `null` in none mode, where rows are never marked
    /// (see `slot_lag_bytes`).
    pub backlog: Option<i64>,
    /// Age of the oldest unpublished row, seconds (`null`: none, or none mode).
    pub oldest_unpublished_age_seconds: Option<f64>,
    /// WAL bytes the slot has not confirmed yet (replication mode): the
    /// backlog as Postgres sees it.
    pub slot_lag_bytes: Option<i64>,
    /// Rows stamped published in the last minute (mark mode; among the newest rows).
    pub published_last_minute: Option<i64>,
    /// Unpublished rows whose publish failed at least once.
    pub failing: Option<i64>,
    /// What the relays share: the outbox table (polling) or `slot:<name>`.
    pub coordinated_on: String,
    /// Lanes the outbox is split into (polling only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lanes: Option<i32>,
    /// Every live relay and what it does.
    pub relays: Vec<RelayStatus>,
    /// Lanes nobody holds right now (polling only): their events wait.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unheld_lanes: Option<Vec<i32>>,
}

/// One live relay as `status` shows it.
#[derive(Debug, Serialize)]
pub struct RelayStatus {
    /// Its name (`replicas.relay_id`).
    pub relay_id: String,
    /// Its process.
    pub instance: String,
    /// `streaming` (holds the slot), `claiming` (holds lanes), `standby`,
    /// or `waiting` (running, but its broker was not reachable yet at start-up).
    pub role: &'static str,
    /// The lanes it holds (polling only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lanes: Option<Vec<i32>>,
    /// Seconds until its membership expires unless renewed.
    pub expires_in_seconds: f64,
}

fn mode_name<T: Serialize>(mode: &T) -> &'static str {
    match serde_json::to_value(mode).ok().and_then(|v| v.as_str().map(str::to_owned)).as_deref() {
        Some("poll") => "poll",
        Some("replication") => "replication",
        Some("mark") => "mark",
        Some("delete") => "delete",
        Some("none") => "none",
        _ => "unknown",
    }
}

/// Gathers the report.
pub async fn gather(config: &Config) -> Result<Status, PostgresError> {
    let connection = postgres::connect(&config.postgres, "outbox-relay status").await?;
    let client = &connection.client;
    let outbox = OutboxTable::from_config(config).map_err(PostgresError::Query)?;
    let table = outbox.name();
    let q = |e: tokio_postgres::Error| PostgresError::query("status", &e);
    let none_mode = config.published.mode == PublishedMode::None;
    let (backlog, age) = if none_mode {
        (None, None)
    } else {
        let row = client.query_one(&outbox.backlog_sql(), &[]).await.map_err(q)?;
        let backlog: i64 = row.try_get(0).map_err(q)?;
        let age: Option<f64> = row.try_get(1).map_err(q)?;
        (Some(backlog), age.filter(|_| backlog > 0))
    };
    let slot_lag_bytes = match config.source.mode {
        SourceMode::Replication => client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = $1",
                &[&config.source.replication.slot],
            )
            .await
            .map_err(q)?
            .and_then(|row| row.try_get::<_, Option<i64>>(0).ok().flatten()),
        SourceMode::Poll => None,
    };
    let published_last_minute = match outbox.published_last_minute_sql() {
        Some(sql) if config.published.mode == PublishedMode::Mark => {
            Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?)
        }
        _ => None,
    };
    let failing = match outbox.failing_sql() {
        Some(sql) if !none_mode => Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?),
        _ => None,
    };
    let slot = config.source.mode == SourceMode::Replication;
    let resource = match config.source.mode {
        SourceMode::Poll => Resource::lanes_of(table::resolve(client, table).await?, config.replicas.lanes),
        SourceMode::Replication => Resource::slot(&config.source.replication.slot),
    };
    // Relays that run but wait for their broker at start-up.
    let waiting = holdings(client, &resource.waiting_room().name).await?;
    let holdings: Vec<Holding> =
        holdings(client, &resource.name).await?.into_iter().filter(|h| h.lane_count == resource.lanes).collect();
    let held: std::collections::BTreeSet<i32> = holdings.iter().flat_map(|r| r.lanes.iter().copied()).collect();
    let unheld_lanes: Vec<i32> = (0..resource.lanes).filter(|lane| !held.contains(lane)).collect();
    let relays = waiting
        .into_iter()
        .map(|h| RelayStatus {
            role: "waiting",
            lanes: (!slot).then(Vec::new),
            relay_id: h.relay_id,
            instance: h.instance,
            expires_in_seconds: h.expires_in_seconds,
        })
        .chain(holdings.into_iter().map(|h| RelayStatus {
            role: match (slot, h.lanes.is_empty()) {
                (_, true) => "standby",
                (true, false) => "streaming",
                (false, false) => "claiming",
            },
            lanes: (!slot).then(|| h.lanes.clone()),
            relay_id: h.relay_id,
            instance: h.instance,
            expires_in_seconds: h.expires_in_seconds,
        }))
        .collect();
    Ok(Status {
        table: config.source.table.clone(),
        source_mode: mode_name(&config.source.mode),
        published_mode: mode_name(&config.published.mode),
        backlog,
        oldest_unpublished_age_seconds: age,
        slot_lag_bytes,
        published_last_minute,
        failing,
        coordinated_on: resource.name,
        lanes: (!slot).then_some(resource.lanes),
        relays,
        unheld_lanes: (!slot).then_some(unheld_lanes),
    })
}

/// Human-readable rendering.
pub fn print(status: &Status) {
    println!(
        "outbox                {} ({} mode, published.mode = {})",
        status.table, status.source_mode, status.published_mode
    );
    match status.backlog {
        Some(backlog) => println!("backlog               {backlog} unpublished"),
        None => println!("backlog               n/a (rows are not marked in none mode; see slot lag)"),
    }
    match (status.backlog, status.oldest_unpublished_age_seconds) {
        (None, _) => println!("oldest unpublished    n/a (none mode)"),
        (Some(_), Some(age)) => println!("oldest unpublished    {age:.1} s old"),
        (Some(_), None) => println!("oldest unpublished    -"),
    }
    if status.source_mode == "replication" {
        match status.slot_lag_bytes {
            Some(lag) => println!("slot lag              {lag} bytes of WAL not yet confirmed"),
            None => println!("slot lag              - (the slot does not exist yet)"),
        }
    }
    match status.published_last_minute {
        Some(n) => println!("published last minute {n}"),
        None => println!("published last minute n/a ({} mode: only mark mode stamps rows)", status.published_mode),
    }
    if let Some(failing) = status.failing {
        println!("failing rows          {failing}");
    }
    if status.relays.is_empty() {
        println!("relays                none running");
    }
    for relay in &status.relays {
        let holds = match (relay.role, &relay.lanes) {
            ("streaming", _) => format!("streaming {}", status.coordinated_on),
            ("claiming", Some(lanes)) => format!("claiming {} lanes {}", lanes.len(), lane_ranges(lanes)),
            ("waiting", _) => "waiting for the broker (start-up; see its /readyz)".to_owned(),
            _ => "standby".to_owned(),
        };
        let renewed = if relay.role == "waiting" { "entry renewed" } else { "lease renewed" };
        println!("relay {:<16} {holds} ({renewed}, expires in {:.1} s)", relay.relay_id, relay.expires_in_seconds);
    }
    if let (Some(unheld), Some(lanes)) = (&status.unheld_lanes, status.lanes) {
        if !unheld.is_empty() {
            println!(
                "unheld lanes          {} of {lanes}: {} (taken over within replicas.takeover_within)",
                unheld.len(),
                lane_ranges(unheld)
            );
        }
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
