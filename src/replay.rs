//! `outbox-relay replay`: re-publish already-published events, chosen by id
//! range, time range, aggregate id or event type, through the same sink and
//! envelope as the relay. Rows are not modified.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use crate::config::Config;
use crate::envelope::{EnvelopeMapper, TopicTemplate};
use crate::postgres::{self, PostgresError};
use crate::sink::Sink;
use crate::source::poll::{decode, select_list};
use crate::source::table::{quote_ident, TableName};

/// Which events to replay; all given filters must match.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Lowest position, inclusive.
    pub from_id: Option<i64>,
    /// Highest position, inclusive.
    pub to_id: Option<i64>,
    /// Written at or after.
    pub since: Option<DateTime<Utc>>,
    /// Written before.
    pub until: Option<DateTime<Utc>>,
    /// One aggregate.
    pub aggregate_id: Option<String>,
    /// One event type.
    pub event_type: Option<String>,
    /// Re-drive dead-lettered rows (instead of published ones): on success
    /// their `dead_lettered_at` is cleared (delete mode: the row is deleted).
    pub dead_lettered: bool,
}

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
    Failed { failed: usize, total: usize, first: String },
}

/// Counts of one replay.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events matched by the selection.
    pub matched: i64,
    /// Events re-published and acknowledged.
    pub published: usize,
}

struct Query {
    filter: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

fn build(config: &Config, selection: &Selection) -> Result<(TableName, Query), ReplayError> {
    let table = TableName::parse(&config.source.table).map_err(ReplayError::Selection)?;
    let c = &config.source.columns;
    let mut clauses = Vec::new();
    let mut params: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut add = |clause: String, value: Box<dyn ToSql + Sync + Send>, clauses: &mut Vec<String>| {
        params.push(value);
        clauses.push(clause.replace('?', &format!("${}", params.len() + 1)));
    };
    if selection.dead_lettered {
        if c.dead_lettered_at.is_empty() {
            return Err(ReplayError::Selection(
                "--dead-lettered needs source.columns.dead_lettered_at, but it is empty".into(),
            ));
        }
        clauses.push(format!("{} IS NOT NULL", quote_ident(&c.dead_lettered_at)));
    } else if !c.published_at.is_empty() {
        clauses.push(format!("{} IS NOT NULL", quote_ident(&c.published_at)));
    }
    let position = quote_ident(&c.position);
    if let Some(v) = selection.from_id {
        add(format!("{position} >= ?::int8"), Box::new(v), &mut clauses);
    }
    if let Some(v) = selection.to_id {
        add(format!("{position} <= ?::int8"), Box::new(v), &mut clauses);
    }
    let need = |column: &str, flag: &str| {
        if column.is_empty() {
            Err(ReplayError::Selection(format!("{flag} needs a mapped column, but source.columns has none for it")))
        } else {
            Ok(quote_ident(column))
        }
    };
    if let Some(v) = selection.since {
        add(format!("{} >= ?::timestamptz", need(&c.created_at, "--since")?), Box::new(v), &mut clauses);
    }
    if let Some(v) = selection.until {
        add(format!("{} < ?::timestamptz", need(&c.created_at, "--until")?), Box::new(v), &mut clauses);
    }
    if let Some(v) = &selection.aggregate_id {
        add(format!("{}::text = ?::text", quote_ident(&c.aggregate_id)), Box::new(v.clone()), &mut clauses);
    }
    if let Some(v) = &selection.event_type {
        add(format!("{}::text = ?::text", quote_ident(&c.event_type)), Box::new(v.clone()), &mut clauses);
    }
    let filter = if clauses.is_empty() { "true".into() } else { clauses.join(" AND ") };
    Ok((table, Query { filter, params }))
}

/// Counts the matching events (the dry run) and their id range.
pub async fn count(config: &Config, selection: &Selection) -> Result<(i64, Option<i64>, Option<i64>), ReplayError> {
    let (table, query) = build(config, selection)?;
    let connection = postgres::connect(&config.postgres, "outbox-relay replay").await?;
    let position = quote_ident(&config.source.columns.position);
    // $1 is unused in the count; keep numbering identical to the page query.
    let sql = format!(
        "SELECT count(*), min({position})::int8, max({position})::int8 FROM {table} WHERE $1::int8 IS NOT NULL AND {}",
        query.filter
    );
    let zero: i64 = 0;
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&zero];
    params.extend(query.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
    let row = connection.client.query_one(&sql, &params).await.map_err(|e| PostgresError::query("counting replay rows", &e))?;
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
    let (table, query) = build(config, selection)?;
    let template = TopicTemplate::parse(&config.sink.topic).map_err(ReplayError::Selection)?;
    let mapper = EnvelopeMapper::new(template, &config.envelope, &config.source.table).map_err(|e| ReplayError::Selection(e.to_string()))?;
    let connection = postgres::connect(&config.postgres, "outbox-relay replay").await?;
    let position = quote_ident(&config.source.columns.position);
    let sql = format!(
        "SELECT {} FROM {table} WHERE {position} > $1::int8 AND {} ORDER BY {position} LIMIT 1000",
        select_list(&config.source.columns),
        query.filter
    );
    let statement = connection.client.prepare(&sql).await.map_err(|e| PostgresError::query("preparing replay", &e))?;
    // Re-driven dead letters are done once acknowledged: clear the stamp, or delete the row in delete mode.
    let redriven = if !selection.dead_lettered {
        None
    } else {
        let sql = match config.published.mode {
            crate::config::PublishedMode::Delete => format!("DELETE FROM {table} WHERE {position} = ANY($1::int8[])"),
            _ => format!(
                "UPDATE {table} SET {} = NULL WHERE {position} = ANY($1::int8[])",
                quote_ident(&config.source.columns.dead_lettered_at)
            ),
        };
        Some(connection.client.prepare(&sql).await.map_err(|e| PostgresError::query("preparing replay", &e))?)
    };
    let mut cursor = i64::MIN;
    let mut summary = Summary { matched, published: 0 };
    let mut failures: Vec<String> = Vec::new();
    let mut last_report = Instant::now();
    loop {
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&cursor];
        params.extend(query.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)));
        let rows = connection.client.query(&statement, &params).await.map_err(|e| PostgresError::query("reading replay rows", &e))?;
        if rows.is_empty() {
            break;
        }
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            let Some(raw) = decode(row, 0)? else { continue };
            cursor = raw.position;
            match raw.into_event(&config.source.table).map_err(|r| r.reason).and_then(|e| mapper.to_message(&e).map_err(|e| e.to_string())) {
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
    fn selection_builds_numbered_parameters_after_the_cursor() {
        let mut config = Config::default();
        config.postgres.url = "postgres://a@b/c".into();
        let selection = Selection {
            from_id: Some(10),
            aggregate_id: Some("42".into()),
            event_type: Some("OrderPlaced".into()),
            ..Selection::default()
        };
        let dead = Selection { dead_lettered: true, ..selection.clone() };
        let (_, query) = build(&config, &dead).unwrap();
        assert!(query.filter.starts_with("\"dead_lettered_at\" IS NOT NULL AND"), "{}", query.filter);
        let (_, query) = build(&config, &selection).unwrap();
        assert_eq!(
            query.filter,
            "\"published_at\" IS NOT NULL AND \"id\" >= $2::int8 AND \"aggregate_id\"::text = $3::text AND \"event_type\"::text = $4::text"
        );
        assert_eq!(query.params.len(), 3);
    }

    #[test]
    fn times_parse_as_rfc3339_or_duration_ago() {
        assert_eq!(parse_time("2026-11-22T07:00:00Z").unwrap().to_rfc3339(), "2026-11-22T07:00:00+00:00");
        let ago = parse_time("1h").unwrap();
        assert!((Utc::now() - ago).num_minutes() == 60 || (Utc::now() - ago).num_minutes() == 59);
        assert!(parse_time("yesterday").is_err());
    }
}
