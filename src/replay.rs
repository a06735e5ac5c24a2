//! `outbox-relay replay`: re-publish already-published events, chosen by id
//! range, time range, aggregate id or event type, through the same sink and
//! envelope as the relay. Published rows are not modified; re-driven dead
//! letters (`--dead-lettered`) are done again once acknowledged.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use crate::config::Config;
use crate::envelope::{EnvelopeMapper, TopicTemplate};
use crate::outbox::{decode, OutboxTable};
use crate::postgres::{self, PostgresError};
use crate::sink::Sink;

pub use crate::outbox::Selection;

/// Why replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading the outbox failed.
    #[error(transparent)]
    Postgres(#[from] PostgresError),
    /// The selection uses a column the mapping does not have.
    #[error("{0}")]
    Selection(String),
    /// Some events were not acknowledged.
    #[error("{failed} of {total} events were not re-published; first error: {first}")]
    Failed {
        /// Events not acknowledged.
        failed: usize,
        /// Events selected.
        total: usize,
        /// The first failure's reason.
        first: String,
    },
}

/// Counts of one replay.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events matched by the selection.
    pub matched: i64,
    /// Events re-published and acknowledged.
    pub published: usize,
}

/// Counts the matching events (the dry run) and their id range.
pub async fn count(config: &Config, selection: &Selection) -> Result<(i64, Option<i64>, Option<i64>), ReplayError> {
    let query =
        OutboxTable::from_config(config).and_then(|t| t.replay_query(selection)).map_err(ReplayError::Selection)?;
    let connection = postgres::connect(&config.postgres, "outbox-relay replay").await?;
    let sql = &query.count;
    let zero: i64 = 0;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&zero];
    params.extend(query.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
    let row = connection
        .client
        .query_one(sql, &params)
        .await
        .map_err(|e| PostgresError::query("counting replay rows", &e))?;
    let q = |e: tokio_postgres::Error| PostgresError::query("counting replay rows", &e);
    Ok((row.try_get(0).map_err(q)?, row.try_get(1).map_err(q)?, row.try_get(2).map_err(q)?))
}

/// Re-publishes the selection in position order; `progress` is called about
/// once a second with (done, total).
pub async fn run<S: Sink>(
    config: &Config,
    sink: &S,
    selection: &Selection,
    mut progress: impl FnMut(usize, i64),
) -> Result<Summary, ReplayError> {
    let (matched, _, _) = count(config, selection).await?;
    let query =
        OutboxTable::from_config(config).and_then(|t| t.replay_query(selection)).map_err(ReplayError::Selection)?;
    let template = TopicTemplate::parse(&config.sink.topic).map_err(ReplayError::Selection)?;
    let mapper = EnvelopeMapper::with_columns(template, &config.envelope, &config.source.table, &config.source.columns)
        .map_err(|e| ReplayError::Selection(e.to_string()))?;
    let connection = postgres::connect(&config.postgres, "outbox-relay replay").await?;
    let statement =
        connection.client.prepare(&query.page).await.map_err(|e| PostgresError::query("preparing replay", &e))?;
    // Re-driven dead letters are done once acknowledged: clear the stamp, or delete the row in delete mode.
    let redriven = match &query.redrive {
        Some(sql) => {
            Some(connection.client.prepare(sql).await.map_err(|e| PostgresError::query("preparing replay", &e))?)
        }
        None => None,
    };
    let mut cursor = i64::MIN;
    let mut summary = Summary { matched, published: 0 };
    let mut failures: Vec<String> = Vec::new();
    let mut last_report = Instant::now();
    loop {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&cursor];
        params.extend(query.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
        let rows = connection
            .client
            .query(&statement, &params)
            .await
            .map_err(|e| PostgresError::query("reading replay rows", &e))?;
        if rows.is_empty() {
            break;
        }
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(raw) = decode(row, 0)? else { continue };
            cursor = raw.position;
            match raw
                .into_event(&config.source.table)
                .map_err(|r| r.reason)
                .and_then(|e| mapper.to_message(&e).map_err(|e| e.to_string()))
            {
                Ok(message) => messages.push(message),
                Err(reason) => failures.push(format!("position {cursor}: {reason}")),
            }
        }
        let positions: Vec<i64> = messages.iter().map(|m| m.position).collect();
        let results = sink.enqueue(messages).await.await;
        let mut acknowledged = Vec::with_capacity(positions.len());
        for (position, result) in positions.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    summary.published += 1;
                    acknowledged.push(position);
                }
                Err(e) => failures.push(format!("position {position}: {}", e.reason)),
            }
        }
        if let (Some(statement), false) = (&redriven, acknowledged.is_empty()) {
            connection
                .client
                .execute(statement, &[&acknowledged])
                .await
                .map_err(|e| PostgresError::query("clearing re-driven dead letters", &e))?;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            progress(summary.published, matched);
            last_report = Instant::now();
        }
    }
    progress(summary.published, matched);
    if let Some(first) = failures.first() {
        return Err(ReplayError::Failed { failed: failures.len(), total: matched as usize, first: first.clone() });
    }
    Ok(summary)
}

/// Parses `--since/--until`: RFC 3339, or a duration ago such as `24h`.
pub fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither an RFC 3339 time (2026-11-22T07:00:00Z) nor a duration ago (24h)"))
        .and_then(|d| chrono::Duration::from_std(d).map_err(|e| e.to_string()))
        .map(|d| Utc::now() - d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_duration_ago() {
        assert_eq!(parse_time("2026-11-22T07:00:00Z").unwrap().to_rfc3339(), "2026-11-22T07:00:00+00:00");
        let ago = parse_time("1h").unwrap();
        assert!((Utc::now() - ago).num_minutes() == 60 || (Utc::now() - ago).num_minutes() == 59);
        assert!(parse_time("yesterday").is_err());
    }
}
