//! Detects a Postgres connection that went silent: a frozen NAT entry, a
//! dead VM, a stuck proxy. Such a connection raises no error by itself: the
//! relay would wait on it forever.
//!
//! Two layers, both on every connection (tokio-postgres and the replication
//! client):
//! - the kernel's: TCP keepalives and `TCP_USER_TIMEOUT` ([`open_tcp`]) end
//!   a connection whose peer stops acknowledging;
//! - ours ([`Watched`]): a request (bytes written) that gets no byte back
//!   within `postgres.io_timeout` fails the socket, which fails every query
//!   pending on it. Only this one catches a middlebox that keeps
//!   acknowledging at the TCP level but forwards nothing.
//!
//! Every request the relay sends gets an answer: statements end with
//! ReadyForQuery, and the replication client asks for a reply with each
//! standby status update. A statement that legitimately runs longer than
//! `io_timeout` is cut too: that is the bound on every query.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Socket-level settings shared by every Postgres connection (`[postgres]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSettings {
    /// No answer this long after a request: the connection is dead. Also the
    /// kernel's `TCP_USER_TIMEOUT` (unacknowledged data). Zero: off.
    pub io_timeout: Duration,
    /// TCP keepalive: idle time before the first probe.
    pub keepalive_idle: Duration,
    /// TCP keepalive: time between probes.
    pub keepalive_interval: Duration,
    /// TCP keepalive: unanswered probes before the kernel drops the connection.
    pub keepalive_retries: u32,
}

impl NetSettings {
    /// The settings tokio-postgres carries in its `Config` (set by
    /// [`crate::postgres::prepare`]), so the replication client reads the
    /// same values from the same place.
    pub fn from_pg(config: &tokio_postgres::Config) -> NetSettings {
        NetSettings {
            io_timeout: config.get_tcp_user_timeout().copied().unwrap_or(Duration::ZERO),
            keepalive_idle: config.get_keepalives_idle(),
            keepalive_interval: config.get_keepalives_interval().unwrap_or(Duration::from_secs(5)),
            keepalive_retries: config.get_keepalives_retries().unwrap_or(3),
        }
    }
}

/// Connects to `host:port` (every address it resolves to, in order) within
/// `connect_timeout`, with `TCP_NODELAY`, keepalives and `TCP_USER_TIMEOUT`.
pub async fn open_tcp(
    host: &str,
    port: u16,
    connect_timeout: Option<Duration>,
    net: &NetSettings,
) -> io::Result<TcpStream> {
    let connect = async {
        let mut last = None;
        for address in tokio::net::lookup_host((host, port)).await? {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"))))
    };
    let stream = match connect_timeout.filter(|t| !t.is_zero()) {
        None => connect.await?,
        Some(limit) => tokio::time::timeout(limit, connect).await.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {host}:{port} timed out after {limit:?}"))
        })??,
    };
    stream.set_nodelay(true)?;
    let socket = SockRef::from(&stream);
    let keepalive = TcpKeepalive::new()
        .with_time(net.keepalive_idle)
        .with_interval(net.keepalive_interval)
        .with_retries(net.keepalive_retries);
    socket.set_tcp_keepalive(&keepalive)?;
    if !net.io_timeout.is_zero() {
        socket.set_tcp_user_timeout(Some(net.io_timeout))?;
    }
    Ok(stream)
}

/// A socket that fails with [`io::ErrorKind::TimedOut`] when a write gets
/// no byte back within the timeout (see the module docs).
pub struct Watched<S> {
    inner: S,
    timeout: Duration,
    /// Set by the first write after the last read: the request waiting for an answer.
    waiting_since: Option<Instant>,
    timer: Pin<Box<Sleep>>,
}

impl<S> Watched<S> {
    /// Watches `inner`; a zero `timeout` turns the check off.
    pub fn new(inner: S, timeout: Duration) -> Watched<S> {
        Watched { inner, timeout, waiting_since: None, timer: Box::pin(tokio::time::sleep(Duration::ZERO)) }
    }

    /// The wrapped socket.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// The error a silent connection ends with: names the setting.
pub fn silent_error(timeout: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "no answer from Postgres for {timeout:?} after a request (postgres.io_timeout): the connection is considered dead \
             (network path, proxy or server stalled); reconnecting"
        ),
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.waiting_since = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                let Some(since) = this.waiting_since.filter(|_| !this.timeout.is_zero()) else { return Poll::Pending };
                let deadline = since + this.timeout;
                if this.timer.deadline() != deadline {
                    this.timer.as_mut().reset(deadline);
                }
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(silent_error(this.timeout))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) && this.waiting_since.is_none() {
            this.waiting_since = Some(Instant::now());
            // The reader may already be parked without a timer: have it
            // polled again so it arms one.
            cx.waker().wake_by_ref();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) && this.waiting_since.is_none() {
            this.waiting_since = Some(Instant::now());
            cx.waker().wake_by_ref();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_request_without_answer_times_out_and_an_idle_socket_does_not() {
        let (client, mut server) = tokio::io::duplex(1024);
        let mut watched = Watched::new(client, Duration::from_millis(200));
        let mut buf = [0u8; 16];
        // Idle: nothing written, nothing expected.
        assert!(tokio::time::timeout(Duration::from_millis(400), watched.read(&mut buf)).await.is_err());
        // Answered request.
        watched.write_all(b"ping").await.unwrap();
        server.write_all(b"pong").await.unwrap();
        assert_eq!(watched.read(&mut buf).await.unwrap(), 4);
        assert!(tokio::time::timeout(Duration::from_millis(400), watched.read(&mut buf)).await.is_err());
        // Unanswered request.
        watched.write_all(b"ping").await.unwrap();
        let started = std::time::Instant::now();
        let error = watched.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(error.to_string().contains("postgres.io_timeout"));
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut drain = [0u8; 16];
        let _ = server.read(&mut drain).await;
    }
}
