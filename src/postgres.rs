//! Postgres connections: connect, drive the connection, surface NOTIFY, and
//! turn driver errors into messages that name the fix.

pub mod liveness;

use std::sync::Arc;

use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, Client, NoTls, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{debug, warn};

use crate::config::PostgresConfig;
use crate::tls::{SslMode as TlsMode, TlsSettings};

/// Failures talking to Postgres, worded for operators.
#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    /// Could not open a connection.
    #[error("cannot connect to Postgres at {target}: {detail}")]
    Connect {
        /// Host, port and database, without the password.
        target: String,
        /// Why, with the fix where one is known.
        detail: String,
        /// The server's SQLSTATE when it answered and refused (a wrong
        /// password, a missing database); `None` when it never answered.
        code: Option<SqlState>,
    },
    /// A statement failed.
    #[error("{0}")]
    Query(String),
    /// Postgres refused a statement with an error code.
    #[error("{message}")]
    Refused {
        /// What was being done, the server's message and the fix.
        message: String,
        /// The SQLSTATE, which says whether retrying can help.
        code: SqlState,
    },
}

impl PostgresError {
    /// Wraps a driver error from a statement with an actionable description.
    pub fn query(context: &str, error: &tokio_postgres::Error) -> PostgresError {
        let message = format!("{context}: {}", describe(error));
        match error.code() {
            Some(code) => PostgresError::Refused { message, code: code.clone() },
            None => PostgresError::Query(message),
        }
    }

    /// Whether only an operator can end this failure (a missing privilege,
    /// table, column or publication, a wrong password, `wal_level`), judged
    /// by SQLSTATE: retrying still happens, but the relay says it waits for
    /// a fix instead of for the network.
    pub fn needs_operator(&self) -> bool {
        match self {
            PostgresError::Refused { code, .. } => needs_operator(code),
            PostgresError::Connect { code: Some(code), .. } => needs_operator(code),
            PostgresError::Connect { code: None, .. } | PostgresError::Query(_) => false,
        }
    }
}

/// Whether a SQLSTATE names something retrying alone cannot fix. Passing
/// conditions (a lost connection, a restart or failover, a cancelled
/// statement, a serialization failure or deadlock, exhausted resources, a
/// lock or object in use, a read-only standby) are not; neither is any code
/// not listed, so an unknown error is retried as before.
pub fn needs_operator(code: &SqlState) -> bool {
    let code = code.code();
    // The server sends the code: never slice it blindly.
    match code.get(..2).unwrap_or(code) {
        // Invalid authorization (wrong password, no pg_hba entry, TLS required).
        "28" => true,
        // The database does not exist; the schema does not exist.
        "3D" | "3F" => true,
        // Syntax or access rule: a missing privilege, table, column,
        // function or publication, or a column of the wrong type.
        "42" => true,
        // Object not in prerequisite state (e.g. wal_level below logical),
        // but not "lock not available" (55P03) or "object in use" (55006).
        "55" => code == "55000",
        // Operator intervention: only a dropped database (57P04) stays.
        "57" => code == "57P04",
        _ => false,
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

/// The resolved connection settings: what tokio-postgres gets (TLS
/// parameters removed, password file applied, timeouts) and the TLS side.
#[derive(Debug)]
pub struct Prepared {
    /// For tokio-postgres.
    pub config: tokio_postgres::Config,
    /// sslmode, certificates.
    pub tls: TlsSettings,
    /// The rustls client configuration; `None` for `sslmode=disable`.
    pub rustls: Option<Arc<rustls::ClientConfig>>,
}

/// Resolves `[postgres]` into connection settings, reading the password and
/// certificate files (again at every call, so rotated secrets are picked up).
pub fn prepare(config: &PostgresConfig) -> Result<Prepared, PostgresError> {
    let target = redacted_target(&config.url);
    let connect_error = |detail: String| PostgresError::Connect { target: target.clone(), detail, code: None };
    let (url, tls) = crate::tls::resolve(config).map_err(|e| connect_error(e.to_string()))?;
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e| connect_error(format!("invalid postgres.url: {e}")))?;
    if let Some(path) = &config.password_file {
        let password = std::fs::read_to_string(path)
            .map_err(|e| connect_error(format!("cannot read postgres.password_file {}: {e}", path.display())))?;
        pg.password(password.trim_end_matches(['\n', '\r']));
    }
    pg.connect_timeout(config.connect_timeout);
    // Socket settings travel in the tokio-postgres config, where the
    // replication client reads them too (`liveness::NetSettings::from_pg`).
    pg.tcp_user_timeout(config.io_timeout);
    pg.keepalives(true);
    pg.keepalives_idle(config.keepalive_idle);
    pg.keepalives_interval(config.keepalive_interval);
    pg.keepalives_retries(config.keepalive_retries);
    // Unix sockets never use TLS (as in libpq); TCP hosts get the mode's nearest tokio-postgres mode:
    // the certificate checks themselves are in the rustls configuration.
    let only_unix =
        pg.get_hosts().iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_))) && !pg.get_hosts().is_empty();
    pg.ssl_mode(match tls.mode {
        _ if only_unix => SslMode::Disable,
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    let rustls = tls.load().map_err(|e| connect_error(e.to_string()))?;
    Ok(Prepared { config: pg, tls, rustls })
}

/// Opens one connection (no retry; callers decide how to retry): the hosts
/// of `postgres.url` in order, each socket watched for silence
/// ([`liveness`]).
pub async fn connect(config: &PostgresConfig, application_name: &str) -> Result<Connection, PostgresError> {
    let target = redacted_target(&config.url);
    let Prepared { config: mut pg, tls, rustls } = prepare(config)?;
    pg.application_name(format!("{application_name} {}", relay_id()).chars().take(63).collect::<String>());
    let net = liveness::NetSettings::from_pg(&pg);
    let hosts = pg.get_hosts().to_vec();
    let hostaddrs = pg.get_hostaddrs().to_vec();
    let ports = pg.get_ports().to_vec();
    let count = hosts.len().max(hostaddrs.len());
    if count == 0 {
        return Err(PostgresError::Connect {
            target,
            detail: "postgres.url names no host: add one, e.g. postgres://relay@db:5432/app".into(),
            code: None,
        });
    }
    let mut last_error = HostRefused::from("");
    for i in 0..count {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let host = hosts.get(i).cloned();
        let address = match (hostaddrs.get(i), &host) {
            (Some(ip), _) => Host::Tcp(ip.to_string()),
            (None, Some(host)) => host.clone(),
            (None, None) => continue,
        };
        match connect_host(&pg, &address, host.as_ref(), port, &net, &tls, rustls.as_ref()).await {
            Ok(connection) => return Ok(connection),
            Err(HostRefused { detail, code }) => {
                debug!(host = %host_label(&address, port), error = %detail, "postgres host refused");
                let detail = if count > 1 { format!("{}: {detail}", host_label(&address, port)) } else { detail };
                last_error = HostRefused { detail, code };
            }
        }
    }
    Err(PostgresError::Connect { target, detail: last_error.detail, code: last_error.code })
}

/// Why one host could not be used, and the server's SQLSTATE when it answered.
struct HostRefused {
    detail: String,
    code: Option<SqlState>,
}

impl From<String> for HostRefused {
    fn from(detail: String) -> Self {
        HostRefused { detail, code: None }
    }
}

impl From<&str> for HostRefused {
    fn from(detail: &str) -> Self {
        HostRefused { detail: detail.to_owned(), code: None }
    }
}

fn host_label(host: &Host, port: u16) -> String {
    match host {
        Host::Tcp(name) => format!("{name}:{port}"),
        Host::Unix(path) => format!("{}/.s.PGSQL.{port}", path.display()),
    }
}

/// The socket under tokio-postgres: TCP or a unix socket, watched.
type Socket = liveness::Watched<Box<dyn Duplex>>;
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}

/// One host: socket, startup (TLS per sslmode), and `target_session_attrs`.
fn connect_host<'a>(
    pg: &'a tokio_postgres::Config,
    address: &'a Host,
    host: Option<&'a Host>,
    port: u16,
    net: &'a liveness::NetSettings,
    tls: &'a TlsSettings,
    rustls: Option<&'a Arc<rustls::ClientConfig>>,
) -> futures::future::BoxFuture<'a, Result<Connection, HostRefused>> {
    use futures::FutureExt;
    async move {
        let connect_timeout = pg.get_connect_timeout().copied();
        let stream: Box<dyn Duplex> = match address {
            Host::Tcp(name) => {
                Box::new(liveness::open_tcp(name, port, connect_timeout, net).await.map_err(|e| e.to_string())?)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let open = tokio::net::UnixStream::connect(&path);
                let stream = match connect_timeout.filter(|t| !t.is_zero()) {
                    None => open.await,
                    Some(limit) => tokio::time::timeout(limit, open).await.unwrap_or_else(|_| {
                        Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("timed out after {limit:?}")))
                    }),
                };
                Box::new(stream.map_err(|e| format!("{}: {e}", path.display()))?)
            }
        };
        let socket: Socket = liveness::Watched::new(stream, net.io_timeout);
        let connect_error =
            |e: tokio_postgres::Error| HostRefused { detail: connect_detail(&e, tls), code: e.code().cloned() };
        let notifications = Arc::new(Notify::new());
        // The connect_raw futures are boxed: unboxed, they trip the compiler's
        // higher-ranked `Send` inference for every task that connects.
        let (client, driver) = match (host, rustls) {
            (Some(Host::Tcp(name)), Some(rustls)) => {
                let connector =
                    MakeTlsConnect::<Socket>::make_tls_connect(&mut MakeRustlsConnect::new((**rustls).clone()), name)
                        .map_err(|e| e.to_string())?;
                let (client, connection) = pg.connect_raw(socket, connector).boxed().await.map_err(connect_error)?;
                (client, drive(connection, notifications.clone()))
            }
            _ => {
                // Unix sockets never use TLS (as in libpq).
                let mut plain = pg.clone();
                if matches!(address, Host::Unix(_)) || rustls.is_none() {
                    plain.ssl_mode(SslMode::Disable);
                }
                let (client, connection) = plain.connect_raw(socket, NoTls).boxed().await.map_err(connect_error)?;
                (client, drive(connection, notifications.clone()))
            }
        };
        let connection = Connection { client, notifications, driver };
        let wanted = pg.get_target_session_attrs();
        if wanted != TargetSessionAttrs::Any {
            let rows =
                connection.client.simple_query("SHOW transaction_read_only").boxed().await.map_err(|e| describe(&e))?;
            let read_only = rows.iter().any(|m| matches!(m, SimpleQueryMessage::Row(row) if row.get(0) == Some("on")));
            if read_only && wanted == TargetSessionAttrs::ReadWrite {
                return Err(
                    "the server is read-only (a standby) and postgres.url asks for target_session_attrs=read-write"
                        .into(),
                );
            }
            if !read_only && wanted == TargetSessionAttrs::ReadOnly {
                return Err("the server accepts writes and postgres.url asks for target_session_attrs=read-only".into());
            }
        }
        Ok(connection)
    }
    .boxed()
}

/// How this session is protected, as the server sees it (`pg_stat_ssl`),
/// with the configured mode: e.g. `TLSv1.3 TLS_AES_256_GCM_SHA384,
/// sslmode=verify-full` or `no TLS, sslmode=prefer`. For `check`.
pub async fn tls_status(client: &Client, config: &PostgresConfig) -> String {
    let mode = crate::tls::resolve(config).map(|(_, tls)| tls.label()).unwrap_or_default();
    let sql = "SELECT ssl, coalesce(version, ''), coalesce(cipher, '') FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
    match client.query_opt(sql, &[]).await {
        Ok(Some(row)) if row.get::<_, bool>(0) => {
            format!("{} {}, {mode}", row.get::<_, String>(1), row.get::<_, String>(2))
        }
        Ok(Some(_)) => format!("no TLS, {mode}"),
        _ => mode,
    }
}

/// Runs the connection, forwarding notifications, until it closes.
fn drive<S, T>(mut connection: tokio_postgres::Connection<S, T>, notify: Arc<Notify>) -> JoinHandle<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
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
    })
}

/// A failed connect, with the TLS context when TLS is what failed.
fn connect_detail(error: &tokio_postgres::Error, tls: &TlsSettings) -> String {
    if let Some(message) = crate::tls::explain(error) {
        return message;
    }
    let text = describe(error);
    if text.contains("server does not support TLS") {
        return format!(
            "the server does not accept TLS connections ({}): turn ssl on in the server, or use sslmode=prefer or disable",
            tls.label()
        );
    }
    text
}

/// This relay's name (`replicas.relay_id`), set once at start-up so every
/// connection's `application_name` says which relay it belongs to.
static RELAY_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this process for every later connection; the first call wins.
pub fn set_relay_id(id: String) {
    let _ = RELAY_ID.set(id);
}

/// This relay's name in `pg_stat_activity` and logs: `replicas.relay_id`,
/// else the host (pod) name.
pub fn relay_id() -> String {
    RELAY_ID.get().cloned().unwrap_or_else(host_name)
}

pub use crate::config::host_name;

/// The driver error with the server's message and a hint for common causes.
pub fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        if let Some(message) = crate::tls::explain(error) {
            return message;
        }
        let text = error.to_string();
        return match std::error::Error::source(error) {
            Some(source) if !text.contains(&source.to_string()) => format!("{text}: {source}"),
            _ => text,
        };
    };
    let hint = match *db.code() {
        SqlState::UNDEFINED_TABLE => " (is the schema installed? run `outbox-relay migrate`, or check source.table)",
        SqlState::UNDEFINED_COLUMN => " (check source.columns against the outbox table)",
        SqlState::INSUFFICIENT_PRIVILEGE => {
            return format!("{} [SQLSTATE {}] ({})", db.message(), db.code().code(), privilege_fix(db.message()));
        }
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION if db.message().contains("no encryption") => {
            " (the server accepts this connection only over TLS: set postgres.sslmode, e.g. require or verify-full)"
        }
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION if db.message().contains("client certificate") => {
            " (the server authenticates by certificate: set postgres.sslcert and postgres.sslkey)"
        }
        SqlState::INVALID_PASSWORD | SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
            " (check the user and password in postgres.url)"
        }
        SqlState::INVALID_CATALOG_NAME => " (check the database name in postgres.url)",
        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE if db.message().contains("wal_level") => {
            " (logical replication needs wal_level = logical: run ALTER SYSTEM SET wal_level = logical; and restart Postgres, or use source.mode = \"poll\")"
        }
        _ => "",
    };
    format!("{} [SQLSTATE {}]{hint}", db.message(), db.code().code())
}

/// The grant that fixes "permission denied for <kind> <name>", naming the
/// object and the privilege the relay needs on it (Postgres names the object
/// but not the privilege, so the relay's needs per object are spelled out).
fn privilege_fix(message: &str) -> String {
    let rest = message.strip_prefix("permission denied for ").unwrap_or("");
    let (kind, name) = rest.split_once(' ').unwrap_or((rest, ""));
    let name = name.trim_matches('"');
    let roles = "see sql/roles/polling.sql or sql/roles/replication.sql for the mode you run";
    match kind {
        "database" => format!("grant the role CREATE on database {name} (`migrate` creates the outbox schema), or run `migrate` as the database owner"),
        "schema" => format!("grant the role USAGE on schema {name} (and CREATE for `migrate`), or run `migrate` as the schema owner"),
        "table" | "relation" if name.starts_with("relay_") => {
            format!("grant the relay's role SELECT, INSERT, UPDATE and DELETE on outbox.{name} (the lease tables); {roles}")
        }
        "table" | "relation" => {
            format!("grant the relay's role SELECT, UPDATE and DELETE on table {name} (SELECT alone with published.mode = \"none\"); {roles}")
        }
        "sequence" => format!("grant the role USAGE on sequence {name}; {roles}"),
        "function" => format!("grant the role EXECUTE on function {name}; {roles}"),
        _ => format!("the role lacks a privilege the statement needs; {roles}"),
    }
}

/// `host:port/db` of a connection string, never its password.
pub fn redacted_target(url: &str) -> String {
    let url = crate::tls::split_connection_string(url).map(|(rest, _)| rest).unwrap_or_default();
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
    fn a_permission_error_names_the_object_and_the_privilege() {
        assert!(privilege_fix("permission denied for database app").contains("CREATE on database app"));
        assert!(privilege_fix("permission denied for table relay_leases")
            .contains("INSERT, UPDATE and DELETE on outbox.relay_leases"));
        assert!(privilege_fix("permission denied for table events").contains("on table events"));
        assert!(privilege_fix("permission denied for schema outbox").contains("USAGE on schema outbox"));
    }

    #[test]
    fn sqlstates_are_classified_by_class_and_odd_codes_never_panic() {
        let needs = |code: &str| needs_operator(&SqlState::from_code(code));
        assert!(needs("42501") && needs("42P01") && needs("28P01") && needs("3D000") && needs("55000"));
        assert!(!needs("08006") && !needs("57P01") && !needs("40001") && !needs("55006") && !needs("53300"));
        assert!(!needs("") && !needs("4") && !needs("aé123") && !needs("XX000"));
    }

    #[test]
    fn redaction_drops_the_password() {
        let shown = redacted_target("postgres://relay:s3cret@db.internal:6432/app");
        assert_eq!(shown, "relay@db.internal:6432/app");
        assert!(!shown.contains("s3cret"));
    }

    #[test]
    fn redaction_understands_libpq_tls_parameters() {
        let shown = redacted_target("postgres://relay:s3cret@db:5432/app?sslmode=verify-full&sslrootcert=/ca.pem");
        assert_eq!(shown, "relay@db:5432/app");
    }

    #[test]
    fn prepare_maps_sslmodes_onto_tokio_postgres() {
        let config = |url: &str| PostgresConfig { url: url.into(), ..PostgresConfig::default() };
        let p = prepare(&config("postgres://a@b/c")).unwrap();
        assert_eq!((p.config.get_ssl_mode(), p.tls.mode), (SslMode::Prefer, TlsMode::Prefer));
        assert!(p.rustls.is_some());
        let p = prepare(&config("postgres://a@b/c?sslmode=disable")).unwrap();
        assert_eq!(p.config.get_ssl_mode(), SslMode::Disable);
        assert!(p.rustls.is_none());
        let p = prepare(&config("host=/run/postgresql user=a sslmode=require")).unwrap();
        assert_eq!(p.config.get_ssl_mode(), SslMode::Disable, "unix sockets never use TLS");
        let err = prepare(&config("postgres://a:pw@b/c?sslmode=bogus")).unwrap_err().to_string();
        assert!(err.contains("sslmode") && !err.contains("pw@"), "{err}");
    }
}
