//! `outbox-relay status`: the 3 a.m. questions in one screen. Is the outbox
//! backing up? How old is the oldest event? Is anything publishing? Who?

use serde::Serialize;

use crate::config::{Config, PublishedMode};
use crate::postgres::{self, PostgresError};
use crate::source::poll::{backlog_sql, lock_key};
use crate::source::table::{quote_ident, TableName};

/// Rows the "published in the last minute" count looks at (newest first),
/// so it stays cheap on a large table.
const RECENT_WINDOW: i64 = 100_000;

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
    /// The relay holding the outbox lock, if any.
    pub publisher: Option<Publisher>,
}

/// The relay currently publishing.
#[derive(Debug, Serialize)]
pub struct Publisher {
    /// `application_name` of its session (includes its relay id).
    pub application_name: String,
    /// Client address.
    pub client_addr: Option<String>,
    /// Backend pid.
    pub pid: i32,
    /// Seconds since its session started.
    pub connected_seconds: f64,
}

/// Gathers the report.
pub async fn gather(config: &Config) -> Result<Status, PostgresError> {
    let connection = postgres::connect(&config.postgres, "outbox-relay status").await?;
    let client = &connection.client;
    let table = TableName::parse(&config.source.table).map_err(PostgresError::Query)?;
    let c = &config.source.columns;
    let q = |e: tokio_postgres::Error| PostgresError::query("status", &e);
    let row = client.query_one(&backlog_sql(&table, c), &[]).await.map_err(q)?;
    let backlog: i64 = row.try_get(0).map_err(q)?;
    let age: Option<f64> = row.try_get(1).map_err(q)?;
    let published_last_minute = if config.published.mode == PublishedMode::Mark && !c.published_at.is_empty() {
        let sql = format!(
            "SELECT count(*) FROM (SELECT {p} AS p FROM {table} ORDER BY {pos} DESC LIMIT {RECENT_WINDOW}) s \
             WHERE p > now() - interval '1 minute'",
            p = quote_ident(&c.published_at),
            pos = quote_ident(&c.position),
        );
        Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?)
    } else {
        None
    };
    let failing = if c.attempts.is_empty() {
        None
    } else {
        let unpublished = if c.published_at.is_empty() { "true".into() } else { format!("{} IS NULL", quote_ident(&c.published_at)) };
        let sql = format!("SELECT count(*) FROM {table} WHERE {unpublished} AND {} > 0", quote_ident(&c.attempts));
        Some(client.query_one(&sql, &[]).await.map_err(q)?.try_get(0).map_err(q)?)
    };
    let holder = client
        .query_opt(
            "WITH k AS (SELECT hashtext($1)::bigint AS key) \
             SELECT a.application_name, host(a.client_addr), a.pid, \
                    extract(epoch FROM now() - a.backend_start)::float8 \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid, k \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
               AND l.classid::bigint = ((k.key >> 32) & 4294967295) \
               AND l.objid::bigint = (k.key & 4294967295)",
            &[&lock_key(&table)],
        )
        .await
        .map_err(q)?;
    let publisher = match holder {
        Some(row) => Some(Publisher {
            application_name: row.try_get(0).map_err(q)?,
            client_addr: row.try_get(1).map_err(q)?,
            pid: row.try_get(2).map_err(q)?,
            connected_seconds: row.try_get(3).map_err(q)?,
        }),
        None => None,
    };
    Ok(Status {
        table: config.source.table.clone(),
        backlog,
        oldest_unpublished_age_seconds: age.filter(|_| backlog > 0),
        published_last_minute,
        failing,
        publisher,
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
    match &status.publisher {
        Some(p) => println!(
            "publishing relay      {} (pid {}, from {}, connected {:.0} s)",
            p.application_name,
            p.pid,
            p.client_addr.as_deref().unwrap_or("local socket"),
            p.connected_seconds
        ),
        None => println!("publishing relay      none: no relay holds the outbox lock"),
    }
}
