//! The operations endpoint: `/metrics` for Prometheus, `/healthz` for
//! liveness, `/readyz` for readiness (both JSON).
//!
//! Hostile or broken clients are bounded: a header-read timeout, a lifetime
//! per connection, and a cap on open connections that evicts idle ones
//! first, so a flood of half-sent requests neither exhausts the process's
//! descriptors (Postgres and Kafka need them) nor starves a probe.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::health::Health;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// A request's headers must arrive within this long after the connection
/// opened (or the previous response): a client that sends half a request
/// and waits holds nothing for longer.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection is closed after this long whatever it does (Prometheus and
/// probes simply reconnect): no client keeps a descriptor for good.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Open connections at most. The relay's descriptors (Postgres, Kafka) must
/// not run out because of idle HTTP clients: when the cap is reached, the
/// oldest connection that has not sent a complete request yet is closed to
/// make room, so a flood of half-sent requests cannot starve a probe.
pub const MAX_CONNECTIONS: usize = 128;

/// One open connection, for eviction.
struct Open {
    id: u64,
    /// Set once a complete request was received on it.
    served: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

/// Binds `listen` (port 0 picks a free port) and serves until shutdown;
/// returns the bound address.
pub async fn serve(
    listen: &str,
    metrics: Metrics,
    health: Health,
    mut shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let address = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    info!(%address, "http endpoint listening (/metrics, /healthz, /readyz)");
    tokio::spawn(async move {
        let open: Arc<Mutex<Vec<Open>>> = Arc::default();
        let mut next_id = 0u64;
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors (EMFILE) or a connection reset before accept: wait, do not spin.
                    debug!(%error, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let id = next_id;
            next_id += 1;
            make_room(&open);
            let served = Arc::new(AtomicBool::new(false));
            let flag = served.clone();
            let router = app.clone();
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                flag.store(true, Ordering::Relaxed);
                let mut router = router.clone();
                async move { tower::Service::call(&mut router, request.map(axum::body::Body::new)).await }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let registry = open.clone();
            // Registered before it can finish, so its own removal below always finds it.
            let mut list = open.lock().unwrap_or_else(|p| p.into_inner());
            let task = tokio::spawn(async move {
                let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
                registry.lock().unwrap_or_else(|p| p.into_inner()).retain(|o| o.id != id);
            });
            list.push(Open { id, served, task: task.abort_handle() });
        }
    });
    Ok(address)
}

/// At the cap, closes the oldest connection that has not sent a complete
/// request (else the oldest of all).
fn make_room(open: &Mutex<Vec<Open>>) {
    let mut list = open.lock().unwrap_or_else(|p| p.into_inner());
    if list.len() < MAX_CONNECTIONS {
        return;
    }
    let victim = list.iter().position(|o| !o.served.load(Ordering::Relaxed)).unwrap_or(0);
    let evicted = list.remove(victim);
    evicted.task.abort();
}

async fn metrics_handler(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    let report = state.health.liveness();
    let code = if report.status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(report))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let report = state.health.readiness();
    let code = if report.status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(report))
}
