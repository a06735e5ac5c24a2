//! Postgres connections: connect, drive the connection, surface NOTIFY, and
//! turn driver errors into messages that name the fix.

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, warn};

use crate::config::PostgresConfig;

/// Failures talking to Postgres, worded for operators.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// Could not open a connection.
    #[error("cannot connect to Postgres at {target}: {detail}")]
    Connect { target: String, detail: String },
    /// A statement failed.
    #[error("{0}")]
    Query(String),
}

impl PostgresError {
    /// Wraps a driver error from a statement with an actionable description.
    pub fn query(context: &str, error: &tokio_postgres::Error) -> PostgresError {
        PostgresError::Query(format!("{context}: {}", describe(error)))
    }
}

/// An open connection whose driver task forwards notifications.
pub struct Connection {
    /// The query handle.
    pub client: Client,
    /// Signalled on every NOTIFY this connection LISTENs to.
    pub notifications: Arc<Notify>,
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Connection {
    /// The query handle, mutably (transactions need it).
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Opens one connection (no retry; callers decide how to retry).
pub async fn connect(config: &PostgresConfig, application_name: &str) -> Result<Connection, PostgresError> {
    let target = redacted_target(&config.url);
    let mut pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e| PostgresError::Connect { target: target.clone(), detail: format!("invalid postgres.url: {e}") })?;
    if let Some(path) = &config.password_file {
        let password = std::fs::read_to_string(path).map_err(|e| PostgresError::Connect {
            target: target.clone(),
            detail: format!("cannot read postgres.password_file {}: {e}", path.display()),
        })?;
        pg.password(password.trim_end_matches(['\n', '\r']));
    }
    pg.application_name(&format!("{application_name} {}", relay_id()).chars().take(63).collect::<String>());
    pg.connect_timeout(config.connect_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(std::time::Duration::from_secs(30));
    let (client, mut connection) = pg
        .connect(NoTls)
        .await
        .map_err(|e| PostgresError::Connect { target: target.clone(), detail: describe(&e) })?;
    let notifications = Arc::new(Notify::new());
    let notify = notifications.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => notify.notify_one(),
                Ok(AsyncMessage::Notice(notice)) => debug!(message = notice.message(), "postgres notice"),
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %describe(&e), "postgres connection closed");
                    break;
                }
            }
        }
        // Wake anyone waiting so they notice the closed connection quickly.
        notify.notify_one();
    });
    Ok(Connection { client, notifications, driver })
}

/// This relay's name in `pg_stat_activity` and logs: the host (pod) name.
pub fn relay_id() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return format!("pid-{}", std::process::id());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The driver error with the server's message and a hint for common causes.
pub fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        let text = error.to_string();
        return match std::error::Error::source(error) {
            Some(source) if !text.contains(&source.to_string()) => format!("{text}: {source}"),
            _ => text,
        };
    };
    let hint = match *db.code() {
        SqlState::UNDEFINED_TABLE => " (is the schema installed? run `outbox-relay migrate`, or check source.table)",
        SqlState::UNDEFINED_COLUMN => " (check source.columns against the outbox table)",
        SqlState::INSUFFICIENT_PRIVILEGE => " (grant the relay's role SELECT, UPDATE and DELETE on the outbox table)",
        SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            " (check the user and password in postgres.url)"
        }
        SqlState::INVALID_CATALOG_NAME => " (check the database name in postgres.url)",
        _ => "",
    };
    format!("{} [SQLSTATE {}]{hint}", db.message(), db.code().code())
}

/// `host:port/db` of a connection string, never its password.
pub fn redacted_target(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(config) => {
            let host = config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(name) => name.clone(),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(",");
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let db = config.get_dbname().unwrap_or("");
            let user = config.get_user().unwrap_or("");
            format!("{user}@{host}:{port}/{db}")
        }
        Err(_) => "<unparseable postgres.url>".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_drops_the_password() {
        let shown = redacted_target("postgres://relay:s3cret@db.internal:6432/app");
        assert_eq!(shown, "relay@db.internal:6432/app");
        assert!(!shown.contains("s3cret"));
    }
}
