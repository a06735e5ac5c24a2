//! A minimal Postgres wire client for a `replication=database` connection:
//! TLS (SSLRequest, then rustls, per `sslmode`), startup, authentication
//! (trust, cleartext, MD5, SCRAM-SHA-256), simple queries, and the CopyBoth
//! stream that carries logical replication.
//!
//! Upstream tokio-postgres cannot speak replication, so this module frames
//! backend messages itself (postgres-protocol's parser rejects
//! CopyBothResponse) and uses postgres-protocol for frontend messages and
//! the authentication math.
//!
//! # Kept, bounded (decided in issue 21)
//!
//! This module stays hand-written, and stays this size: connection,
//! authentication, simple query, CopyBoth. It does not decode what the
//! stream carries (that is `pgoutput.rs`) nor decide anything about
//! progress (that is the relay). The crates weighed were:
//! - tokio-postgres forks that speak replication: git-only, not on crates.io;
//! - `pgwire-replication`: works, but hands Relation/Insert over as raw
//!   bytes (we would keep our decoder anyway) and is young;
//! - `pg_walstream`: large, and pulls aws-lc-rs (cmake) or libpq.
//!
//! What it does not write itself it takes from `postgres-protocol` (every
//! frontend message, SCRAM, MD5) and `crate::tls` (sslmode, certificates,
//! channel binding). Its protocol-level tests run against a real server in
//! `tests/wire.rs` (authentication methods, server errors, IDENTIFY_SYSTEM,
//! a CopyBoth session with keepalives and status updates); the framing is
//! tested below. Revisit when tokio-postgres releases replication support.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS};
use postgres_protocol::message::frontend;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::postgres::liveness::{self, NetSettings, Watched};
use crate::tls::{SslMode, TlsSettings};

/// The socket, plain or TLS; split into reader and writer halves.
trait Duplex: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Duplex for T {}
type Stream = Box<dyn Duplex>;
type Reader = ReadHalf<Stream>;
type Writer = WriteHalf<Stream>;

/// Microseconds between the Unix epoch and Postgres's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Errors on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket failure or the server went away.
    #[error("replication connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server reported an error.
    #[error("{message} [SQLSTATE {code}]")]
    Server {
        /// SQLSTATE.
        code: String,
        /// Server message.
        message: String,
    },
    /// Something the client cannot handle.
    #[error("replication protocol: {0}")]
    Protocol(String),
    /// TLS could not be set up: the server refused it, or the certificate
    /// was refused (the message names the host, the sslmode and the fix).
    #[error("{0}")]
    Tls(String),
}

impl WireError {
    /// The SQLSTATE if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            WireError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One backend message: tag and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Message type byte.
    pub tag: u8,
    /// Everything after the length word.
    pub body: Bytes,
}

/// Splits complete frames off the front of `buffer`.
pub fn next_frame(buffer: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buffer.len() < 5 {
        return Ok(None);
    }
    let tag = buffer[0];
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if len < 4 {
        return Err(WireError::Protocol(format!("invalid message length {len}")));
    }
    if buffer.len() < 1 + len {
        buffer.reserve(1 + len - buffer.len());
        return Ok(None);
    }
    let mut frame = buffer.split_to(1 + len);
    frame.advance(5);
    Ok(Some(Frame { tag, body: frame.freeze() }))
}

/// Parses an ErrorResponse/NoticeResponse body into (SQLSTATE, message).
pub fn parse_error(body: &[u8]) -> (String, String) {
    let (mut code, mut message, mut detail, mut hint) = (String::new(), String::new(), None, None);
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        let value = String::from_utf8_lossy(&tail[..end]).into_owned();
        match field {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = Some(value),
            b'H' => hint = Some(value),
            _ => {}
        }
        rest = tail.get(end + 1..).unwrap_or_default();
    }
    if let Some(detail) = detail {
        message.push_str(&format!(" ({detail})"));
    }
    if let Some(hint) = hint {
        message.push_str(&format!(" hint: {hint}"));
    }
    (code, message)
}

/// TLS for the replication connection: the mode and, unless `disable`,
/// the rustls client configuration (see [`crate::tls`]).
#[derive(Debug, Clone)]
pub struct WireTls {
    /// sslmode and certificate settings (for messages).
    pub settings: TlsSettings,
    /// `None` for `disable`.
    pub config: Option<Arc<rustls::ClientConfig>>,
}

impl WireTls {
    /// Plaintext.
    pub fn disabled() -> WireTls {
        WireTls { settings: TlsSettings::disabled(), config: None }
    }
}

/// Where and as whom to connect.
#[derive(Clone)]
pub struct ConnectParams {
    /// The hosts of `postgres.url` with their ports, tried in order (as
    /// tokio-postgres does for the other connections).
    pub hosts: Vec<(String, u16)>,
    /// Keepalives, TCP_USER_TIMEOUT and the silence limit (`postgres.io_timeout`).
    pub net: NetSettings,
    /// sslmode and certificates.
    pub tls: WireTls,
    /// Limit for TCP connect plus TLS handshake.
    pub connect_timeout: Option<Duration>,
    /// Role.
    pub user: String,
    /// Password, if any.
    pub password: Option<Vec<u8>>,
    /// Database.
    pub database: String,
    /// Shown in pg_stat_activity / pg_stat_replication.
    pub application_name: String,
}

impl std::fmt::Debug for ConnectParams {
    /// Everything but the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectParams")
            .field("hosts", &self.hosts)
            .field("net", &self.net)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("application_name", &self.application_name)
            .field("sslmode", &self.tls.settings.mode)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ConnectParams {
    /// From a tokio-postgres config. Its `sslmode` (disable, prefer,
    /// require) is honoured without certificate checks; the relay replaces
    /// that with [`with_tls`](Self::with_tls) and the full `[postgres]`
    /// settings.
    pub fn from_config(config: &tokio_postgres::Config, application_name: &str) -> Result<ConnectParams, WireError> {
        let ports = config.get_ports();
        let count = config.get_hosts().len().max(config.get_hostaddrs().len());
        let mut hosts = Vec::with_capacity(count);
        for i in 0..count {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            // A hostaddr is where to connect; the host name is what the certificate names.
            // The replication client connects to the name (TLS checks it).
            let host = match (config.get_hosts().get(i), config.get_hostaddrs().get(i)) {
                (Some(tokio_postgres::config::Host::Tcp(host)), _) => host.clone(),
                (None, Some(ip)) => ip.to_string(),
                (Some(tokio_postgres::config::Host::Unix(_)), _) | (None, None) => {
                    return Err(WireError::Protocol(
                        "replication mode needs TCP hosts in postgres.url (unix sockets are not supported): use host=127.0.0.1 or a host name"
                            .into(),
                    ))
                }
            };
            hosts.push((host, port));
        }
        if hosts.is_empty() {
            hosts.push(("localhost".into(), ports.first().copied().unwrap_or(5432)));
        }
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let settings = match config.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => TlsSettings::disabled(),
            tokio_postgres::config::SslMode::Require => TlsSettings::unverified(SslMode::Require),
            _ => TlsSettings::unverified(SslMode::Prefer),
        };
        let tls_config = settings.load().map_err(|e| WireError::Tls(e.to_string()))?;
        Ok(ConnectParams {
            hosts,
            net: NetSettings::from_pg(config),
            tls: WireTls { settings, config: tls_config },
            connect_timeout: config.get_connect_timeout().copied(),
            database: config.get_dbname().unwrap_or(&user).to_owned(),
            user,
            password: config.get_password().map(<[u8]>::to_vec),
            application_name: application_name.to_owned(),
        })
    }

    /// The same, with these TLS settings (the relay's resolved `[postgres]`).
    pub fn with_tls(mut self, tls: WireTls) -> ConnectParams {
        self.tls = tls;
        self
    }
}

/// An open socket and, over TLS, the `tls-server-end-point` channel
/// binding data (RFC 5929) for SCRAM-SHA-256-PLUS.
struct Opened {
    stream: Stream,
    channel_binding: Option<Vec<u8>>,
}

/// TCP connect, then SSLRequest and the TLS handshake unless `disable`.
async fn open(params: &ConnectParams, host: &str, port: u16) -> Result<Opened, WireError> {
    let tcp = liveness::open_tcp(host, port, None, &params.net).await?;
    let mut tcp = Watched::new(tcp, params.net.io_timeout);
    let address = format!("{host}:{port}");
    let mode = params.tls.settings.mode;
    let plain = |tcp: Watched<TcpStream>| Opened { stream: Box::new(tcp), channel_binding: None };
    let Some(config) = params.tls.config.clone() else { return Ok(plain(tcp)) };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    // Exactly one byte, straight from the socket: nothing the server (or a
    // man in the middle) sends before the handshake can end up buffered.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' => {}
        b'N' if mode == SslMode::Prefer => return Ok(plain(tcp)),
        b'N' => {
            return Err(WireError::Tls(format!(
                "the server at {} does not accept TLS connections ({}): turn ssl on in the server, or use sslmode=prefer or disable",
                address,
                params.tls.settings.label()
            )))
        }
        b'E' => {
            // A server that cannot even answer the SSLRequest (e.g. too many connections).
            let mut length = [0u8; 4];
            tcp.read_exact(&mut length).await?;
            let length = (u32::from_be_bytes(length) as usize).clamp(4, 64 * 1024);
            let mut body = vec![0u8; length - 4];
            tcp.read_exact(&mut body).await?;
            return Err(server_error(&body));
        }
        other => return Err(WireError::Protocol(format!("unexpected answer {other:#04x} to SSLRequest"))),
    }
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|_| {
        WireError::Tls(format!("{host:?} is not a host name TLS can verify ({})", params.tls.settings.label()))
    })?;
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| {
        WireError::Tls(crate::tls::explain(&e).unwrap_or_else(|| format!("TLS handshake with {} failed: {e}", address)))
    })?;
    let channel_binding = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|certificate| crate::tls::tls_server_end_point(certificate));
    Ok(Opened { stream: Box::new(stream), channel_binding })
}

/// An authenticated replication connection, before streaming starts.
pub struct ReplicationConnection {
    reader: Reader,
    writer: Writer,
    buffer: BytesMut,
}

/// A row of a simple query result (text format).
pub type TextRow = Vec<Option<String>>;

impl ReplicationConnection {
    /// Connects (over TLS per `params.tls`), sends the startup message with
    /// `replication=database`, and authenticates.
    pub async fn connect(params: &ConnectParams) -> Result<ReplicationConnection, WireError> {
        let mut last_error = None;
        for (host, port) in &params.hosts {
            match Self::connect_host(params, host, *port).await {
                Ok(connection) => return Ok(connection),
                // A server that answered with an error (bad password, no such database) is not worth
                // hiding behind the next host's error: say which host said it.
                Err(error) if params.hosts.len() > 1 => {
                    tracing::debug!(host = %host, port, error = %error, "replication connection: host refused, trying the next");
                    last_error = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| WireError::Protocol("postgres.url names no host".into())))
    }

    async fn connect_host(params: &ConnectParams, host: &str, port: u16) -> Result<ReplicationConnection, WireError> {
        let opened = match params.connect_timeout.filter(|t| !t.is_zero()) {
            None => open(params, host, port).await?,
            Some(limit) => tokio::time::timeout(limit, open(params, host, port)).await.map_err(|_| {
                WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {host}:{port} timed out after {limit:?}"),
                ))
            })??,
        };
        let (reader, writer) = tokio::io::split(opened.stream);
        let mut conn = ReplicationConnection { reader, writer, buffer: BytesMut::with_capacity(64 * 1024) };
        let mut out = BytesMut::new();
        frontend::startup_message(
            [
                ("user", params.user.as_str()),
                ("database", params.database.as_str()),
                ("replication", "database"),
                ("application_name", params.application_name.as_str()),
                ("client_encoding", "UTF8"),
                ("DateStyle", "ISO"),
                ("TimeZone", "UTC"),
            ],
            &mut out,
        )?;
        conn.send(&out).await?;
        conn.authenticate(params, opened.channel_binding).await?;
        // Parameter status, backend key data, then ReadyForQuery.
        loop {
            let frame = conn.read_frame().await?;
            match frame.tag {
                b'Z' => return Ok(conn),
                b'E' => return Err(server_error(&frame.body)),
                _ => {}
            }
        }
    }

    async fn authenticate(
        &mut self,
        params: &ConnectParams,
        channel_binding: Option<Vec<u8>>,
    ) -> Result<(), WireError> {
        let missing_password = || {
            WireError::Protocol(
                "the server asks for a password but postgres.url has none (or set postgres.password_file)".into(),
            )
        };
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'E' => return Err(server_error(&frame.body)),
                b'R' => {}
                other => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message {:?} during authentication",
                        other as char
                    )))
                }
            }
            let mut body = frame.body.clone();
            if body.len() < 4 {
                return Err(WireError::Protocol("short authentication message".into()));
            }
            let kind = body.get_i32();
            let mut out = BytesMut::new();
            match kind {
                0 => return Ok(()),
                3 => {
                    let password = params.password.as_deref().ok_or_else(missing_password)?;
                    frontend::password_message(password, &mut out)?;
                }
                5 => {
                    let password = params.password.as_deref().ok_or_else(missing_password)?;
                    if body.len() < 4 {
                        return Err(WireError::Protocol("short MD5 salt".into()));
                    }
                    let salt = [body[0], body[1], body[2], body[3]];
                    let hash = md5_hash(params.user.as_bytes(), password, salt);
                    frontend::password_message(hash.as_bytes(), &mut out)?;
                }
                10 => {
                    let password = params.password.as_deref().ok_or_else(missing_password)?;
                    let mechanisms = String::from_utf8_lossy(&body);
                    let offered: Vec<&str> = mechanisms.split('\0').filter(|m| !m.is_empty()).collect();
                    let Some((mechanism, binding)) = choose_scram(&offered, channel_binding.clone()) else {
                        return Err(WireError::Protocol(format!("no supported SASL mechanism in {offered:?}")));
                    };
                    self.scram(password, mechanism, binding).await?;
                    continue;
                }
                other => return Err(WireError::Protocol(format!("unsupported authentication method {other}"))),
            }
            self.send(&out).await?;
        }
    }

    async fn scram(&mut self, password: &[u8], mechanism: &str, binding: ChannelBinding) -> Result<(), WireError> {
        let mut scram = ScramSha256::new(password, binding);
        let mut out = BytesMut::new();
        frontend::sasl_initial_response(mechanism, scram.message(), &mut out)?;
        self.send(&out).await?;
        let continue_body = self.expect_auth(11).await?;
        scram.update(&continue_body)?;
        let mut out = BytesMut::new();
        frontend::sasl_response(scram.message(), &mut out)?;
        self.send(&out).await?;
        let final_body = self.expect_auth(12).await?;
        scram.finish(&final_body)?;
        Ok(())
    }

    async fn expect_auth(&mut self, kind: i32) -> Result<Bytes, WireError> {
        let frame = self.read_frame().await?;
        if frame.tag == b'E' {
            return Err(server_error(&frame.body));
        }
        let mut body = frame.body;
        if frame.tag != b'R' || body.len() < 4 || body.get_i32() != kind {
            return Err(WireError::Protocol("unexpected SASL exchange".into()));
        }
        Ok(body)
    }

    /// Runs a simple query and returns its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, WireError> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'D' => rows.push(parse_data_row(&frame.body)?),
                b'E' => error = Some(server_error(&frame.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(error) => Err(error),
            None => Ok(rows),
        }
    }

    /// Sends START_REPLICATION and waits for CopyBothResponse.
    pub async fn start_replication(mut self, command: &str) -> Result<ReplicationStream, WireError> {
        let mut out = BytesMut::new();
        frontend::query(command, &mut out)?;
        self.send(&out).await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                b'W' => {
                    return Ok(ReplicationStream {
                        reader: FrameReader { reader: self.reader, buffer: self.buffer },
                        writer: self.writer,
                    })
                }
                b'E' => return Err(server_error(&frame.body)),
                b'N' | b'S' => {}
                other => {
                    return Err(WireError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.writer.write_all(bytes).await?;
        // TLS buffers records: flush, or the message may sit in the client.
        self.writer.flush().await?;
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<Frame, WireError> {
        loop {
            if let Some(frame) = next_frame(&mut self.buffer)? {
                return Ok(frame);
            }
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// SCRAM-SHA-256-PLUS when TLS gives channel binding data and the server
/// offers it (as tokio-postgres does); else SCRAM-SHA-256, telling the
/// server whether the client could have bound the channel.
fn choose_scram(offered: &[&str], channel_binding: Option<Vec<u8>>) -> Option<(&'static str, ChannelBinding)> {
    match channel_binding {
        Some(data) if offered.contains(&SCRAM_SHA_256_PLUS) => {
            Some((SCRAM_SHA_256_PLUS, ChannelBinding::tls_server_end_point(data)))
        }
        _ if !offered.contains(&SCRAM_SHA_256) => None,
        Some(_) => Some((SCRAM_SHA_256, ChannelBinding::unrequested())),
        None => Some((SCRAM_SHA_256, ChannelBinding::unsupported())),
    }
}

fn server_error(body: &[u8]) -> WireError {
    let (code, message) = parse_error(body);
    WireError::Server { code, message }
}

fn parse_data_row(body: &[u8]) -> Result<TextRow, WireError> {
    let mut buf = body;
    let short = || WireError::Protocol("short DataRow".into());
    if buf.len() < 2 {
        return Err(short());
    }
    let count = buf.get_i16() as usize;
    let mut row = Vec::with_capacity(count);
    for _ in 0..count {
        if buf.len() < 4 {
            return Err(short());
        }
        let len = buf.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if buf.len() < len {
                return Err(short());
            }
            row.push(Some(String::from_utf8_lossy(&buf[..len]).into_owned()));
            buf.advance(len);
        }
    }
    Ok(row)
}

/// Reads CopyData payloads from the stream.
pub struct FrameReader {
    reader: Reader,
    buffer: BytesMut,
}

impl FrameReader {
    /// The next CopyData payload if it is already buffered whole, without
    /// touching the socket, so a burst the server sent together is handled
    /// in one pass of the caller's loop. Anything else (the end of the copy,
    /// an error, a partial frame) is left for [`next_copy_data`](Self::next_copy_data).
    pub fn buffered_copy_data(&mut self) -> Result<Option<Bytes>, WireError> {
        if self.buffer.first() != Some(&b'd') {
            return Ok(None);
        }
        Ok(next_frame(&mut self.buffer)?.map(|frame| frame.body))
    }

    /// The next CopyData payload; None when the server ended the copy.
    /// Cancel-safe: a partially read frame stays buffered.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>, WireError> {
        loop {
            while let Some(frame) = next_frame(&mut self.buffer)? {
                match frame.tag {
                    b'd' => return Ok(Some(frame.body)),
                    b'c' => return Ok(None),
                    b'E' => return Err(server_error(&frame.body)),
                    _ => {}
                }
            }
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

/// A streaming replication session: read CopyData, write status updates.
pub struct ReplicationStream {
    /// Incoming WAL data and keepalives.
    pub reader: FrameReader,
    writer: Writer,
}

impl ReplicationStream {
    /// Sends a Standby Status Update: everything up to `flushed` may be
    /// released by the server. It always asks for a reply (whatever
    /// `_reply_requested` says): the server's answer is what proves the
    /// stream alive when no WAL flows, so a silent connection fails within
    /// `postgres.io_timeout` ([`liveness`]).
    pub async fn send_status(&mut self, flushed: u64, _reply_requested: bool) -> Result<(), WireError> {
        let mut message = BytesMut::with_capacity(34);
        message.put_u8(b'r');
        message.put_u64(flushed);
        message.put_u64(flushed);
        message.put_u64(flushed);
        message.put_i64(now_pg_micros());
        message.put_u8(1);
        let mut out = BytesMut::with_capacity(40);
        out.put_u8(b'd');
        out.put_i32(4 + message.len() as i32);
        out.extend_from_slice(&message);
        self.writer.write_all(&out).await?;
        self.writer.flush().await?;
        Ok(())
    }

    /// Ends the copy politely (the server then closes the stream).
    pub async fn finish(&mut self) -> Result<(), WireError> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        self.writer.write_all(&out).await?;
        self.writer.flush().await?;
        Ok(())
    }
}

/// Now, in microseconds since 2000-01-01 (Postgres timestamps).
pub fn now_pg_micros() -> i64 {
    chrono::Utc::now().timestamp_micros() - PG_EPOCH_OFFSET_MICROS
}

/// Formats an LSN the way Postgres prints it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Parses `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_split_only_when_complete() {
        let mut buf = BytesMut::from(&b"W\x00\x00\x00\x07\x00\x00\x00d\x00\x00\x00\x05x"[..]);
        let frame = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!(frame.tag, b'W');
        assert_eq!(&frame.body[..], b"\x00\x00\x00");
        let frame = next_frame(&mut buf).unwrap().unwrap();
        assert_eq!((frame.tag, &frame.body[..]), (b'd', &b"x"[..]));
        let mut partial = BytesMut::from(&b"d\x00\x00\x00\x09ab"[..]);
        assert!(next_frame(&mut partial).unwrap().is_none());
        assert_eq!(partial.len(), 7, "partial frame stays buffered");
    }

    #[test]
    fn error_fields_become_code_and_message() {
        let body = b"SERROR\0C42704\0Mreplication slot \"x\" does not exist\0\0";
        assert_eq!(parse_error(body), ("42704".into(), "replication slot \"x\" does not exist".into()));
    }

    #[test]
    fn scram_binds_the_channel_only_when_both_sides_can() {
        let both = [SCRAM_SHA_256_PLUS, SCRAM_SHA_256];
        assert_eq!(choose_scram(&both, Some(vec![1, 2])).unwrap().0, SCRAM_SHA_256_PLUS);
        assert_eq!(choose_scram(&both, None).unwrap().0, SCRAM_SHA_256);
        assert_eq!(choose_scram(&[SCRAM_SHA_256], Some(vec![1])).unwrap().0, SCRAM_SHA_256);
        assert!(choose_scram(&["SCRAM-SHA-1"], None).is_none());
    }

    #[test]
    fn lsn_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
    }

    #[test]
    fn data_rows_decode_nulls_and_text() {
        let body = b"\x00\x02\xff\xff\xff\xff\x00\x00\x00\x03abc";
        assert_eq!(parse_data_row(body).unwrap(), vec![None, Some("abc".into())]);
    }
}
