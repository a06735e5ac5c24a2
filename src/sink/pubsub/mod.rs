//! Google Cloud Pub/Sub sink (`[sink] kind = "pubsub"`, see `docs/pubsub.md`).
//!
//! ```text
//! enqueue ──(flow control: outstanding messages/bytes)──▶ scheduler task
//!                                                          │ one queue per (topic, ordering key)
//!                                                          │ ready keys ──▶ up to max_concurrent_requests
//!                                                          ▼
//!                                    POST projects/P/topics/T:publish  (one key per request)
//!                                                          │
//!                 message ids ──▶ Ok per message; transient error ──▶ batch back at the head
//!                                                             of its key, key paused (backoff)
//! ```
//!
//! # Ordering
//! Pub/Sub orders messages per ordering key (the aggregate id) in the order
//! the service received them, and rejects a request that mixes keys. So
//! each key has its own queue and at most one request in flight; the next
//! request of a key is sent only after the previous one returned message
//! ids. A request that fails transiently goes back to the head of its key's
//! queue and the key waits (exponential backoff with jitter, retried without
//! bound, like librdkafka with `message.timeout.ms=0`): the key is paused
//! until its failed messages are re-published, and other keys keep flowing.
//!
//! # Acknowledgement
//! A message is reported Ok only after Pub/Sub returned a message id for
//! it. A request that timed out may still have been published: its retry
//! can duplicate it (at least once), never reorder a first delivery.
//!
//! # Error handling
//! Transient (retried, never reported): no answer, timeouts, 401 (token
//! renewed), 409 ABORTED, 429, 499, 5xx. Permanent (reported to the relay,
//! which keeps the row unpublished and records why): 400, 403, 404 (unless
//! `create_topics`), 413, and messages Pub/Sub could never accept (invalid
//! topic name, over 10 MB, attribute limits), which fail at enqueue.

pub mod auth;
pub mod client;
pub mod message;
pub mod topic;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
#[cfg(test)]
use base64::Engine as _;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::auth::{Credentials, TokenSource};
use self::client::{Api, ApiError, Http};
use self::message::Prepared;
use super::{OutgoingMessage, PendingDelivery, PublishError, Sink};
use crate::config::PubSubConfig;

/// Google's production endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://pubsub.googleapis.com";
/// How often, at most, a failing publish is logged at warn level.
const WARN_EVERY: Duration = Duration::from_secs(5);

/// A `[sink.pubsub]` value that cannot work; `key` names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {problem}")]
pub struct PubSubConfigError {
    /// The configuration key.
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

/// Checks `[sink.pubsub]` and the topic template for Pub/Sub.
pub fn validate_config(config: &PubSubConfig, template: &str) -> Result<(), PubSubConfigError> {
    let invalid = |key: &'static str, problem: String| Err(PubSubConfigError { key, problem });
    let project = config.project.trim();
    if project.is_empty() {
        return invalid(
            "sink.pubsub.project",
            "is not set: set the Google Cloud project id that owns the topics, e.g. project = \"my-project\" \
             (or OUTBOX_RELAY_SINK__PUBSUB__PROJECT)"
                .into(),
        );
    }
    let well_formed = project.as_bytes()[0].is_ascii_lowercase()
        && project.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b':'));
    if !well_formed {
        return invalid(
            "sink.pubsub.project",
            format!("{project:?} is not a project id (lowercase letters, digits and hyphens, starting with a letter): use the id, not the display name or number"),
        );
    }
    if let Ok(parsed) = crate::envelope::TopicTemplate::parse(template) {
        topic::check_template(&parsed).map_err(|e| PubSubConfigError {
            key: "sink.topic",
            problem: format!("renders names Pub/Sub rejects: {e}"),
        })?;
    }
    let scheme_ok = config.endpoint.starts_with("https://") || config.endpoint.starts_with("http://");
    if !config.endpoint.is_empty() && !scheme_ok {
        return invalid(
            "sink.pubsub.endpoint",
            format!("{:?} must start with https:// (or http:// for an emulator), e.g. \"https://us-east1-pubsub.googleapis.com\"", config.endpoint),
        );
    }
    if let Some(path) = &config.credentials_file {
        if !path.is_file() {
            return invalid("sink.pubsub.credentials_file", format!("{} is not a readable file", path.display()));
        }
    }
    if !(1..=PubSubConfig::MAX_MESSAGES_PER_REQUEST).contains(&config.max_messages_per_request) {
        return invalid("sink.pubsub.max_messages_per_request", "must be between 1 and 1000 (Pub/Sub's limit)".into());
    }
    if !(1000..=PubSubConfig::MAX_BYTES_PER_REQUEST).contains(&config.max_bytes_per_request) {
        return invalid(
            "sink.pubsub.max_bytes_per_request",
            "must be between 1000 and 10000000 (Pub/Sub's 10 MB limit)".into(),
        );
    }
    if !(1..=10_000).contains(&config.max_concurrent_requests) {
        return invalid("sink.pubsub.max_concurrent_requests", "must be between 1 and 10000".into());
    }
    if config.linger > Duration::from_secs(1) {
        return invalid("sink.pubsub.linger", "must be at most 1s (it delays every idle key's first message)".into());
    }
    if config.request_timeout < Duration::from_secs(1) || config.request_timeout > Duration::from_secs(600) {
        return invalid("sink.pubsub.request_timeout", "must be between 1s and 10m".into());
    }
    if config.max_outstanding_messages < config.max_messages_per_request || config.max_outstanding_messages > 10_000_000
    {
        return invalid(
            "sink.pubsub.max_outstanding_messages",
            "must be at least max_messages_per_request and at most 10000000".into(),
        );
    }
    if config.max_outstanding_bytes < config.max_bytes_per_request || config.max_outstanding_bytes > u32::MAX as usize {
        return invalid(
            "sink.pubsub.max_outstanding_bytes",
            "must be at least max_bytes_per_request and at most 4294967295".into(),
        );
    }
    if config.retry_min_delay < Duration::from_millis(1) || config.retry_max_delay < config.retry_min_delay {
        return invalid("sink.pubsub.retry_max_delay", "needs 1ms <= retry_min_delay <= retry_max_delay".into());
    }
    Ok(())
}

/// Why the sink could not be created.
#[derive(Debug, thiserror::Error)]
pub enum PubSubSinkError {
    /// Credentials or TLS set-up failed: a configuration problem.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// The endpoint root and whether it is the emulator (no credentials).
fn resolve_endpoint(config: &PubSubConfig) -> (String, bool) {
    let emulator = std::env::var("PUBSUB_EMULATOR_HOST").ok().filter(|h| !h.trim().is_empty());
    match (config.endpoint.is_empty(), emulator) {
        (false, emulator) => (config.endpoint.clone(), emulator.is_some()),
        (true, Some(host)) if host.starts_with("http://") || host.starts_with("https://") => (host, true),
        (true, Some(host)) => (format!("http://{host}"), true),
        (true, None) => (DEFAULT_ENDPOINT.to_owned(), false),
    }
}

/// State shared by the sink handle, the scheduler and request tasks.
struct Shared {
    api: Api,
    config: PubSubConfig,
    /// Messages accepted and not yet answered.
    outstanding: AtomicUsize,
    /// Woken when `outstanding` drops to zero (flush).
    idle: Notify,
}

/// Counts one outstanding message until dropped.
struct OutstandingGuard(Arc<Shared>);

impl Drop for OutstandingGuard {
    fn drop(&mut self) {
        if self.0.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// A message waiting for Pub/Sub, with its answer channel and its share
/// of the flow-control budget (released when it is dropped).
struct Pending {
    prepared: Prepared,
    reply: oneshot::Sender<Result<(), PublishError>>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
    _outstanding: OutstandingGuard,
}

/// Publishes to Google Cloud Pub/Sub.
pub struct PubSubSink {
    shared: Arc<Shared>,
    queue: mpsc::UnboundedSender<Pending>,
    messages: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    byte_budget: usize,
    probe_topic: String,
}

impl PubSubSink {
    /// Builds the client and starts the scheduler (needs a tokio runtime).
    /// `template` is `sink.topic`: a static topic is what readiness probes.
    pub fn new(config: &PubSubConfig, template: &str) -> Result<PubSubSink, PubSubSinkError> {
        let (_, emulator) = resolve_endpoint(config);
        let credentials = Credentials::discover(emulator, config.credentials_file.as_deref())
            .map_err(|e| PubSubSinkError::Config(e.to_string()))?;
        PubSubSink::with_credentials(config, template, credentials)
    }

    /// As [`PubSubSink::new`], with the credentials given instead of
    /// discovered (tests, and callers that manage credentials themselves).
    pub fn with_credentials(
        config: &PubSubConfig,
        template: &str,
        credentials: Credentials,
    ) -> Result<PubSubSink, PubSubSinkError> {
        let (base, _) = resolve_endpoint(config);
        let http = Http::new().map_err(PubSubSinkError::Config)?;
        info!(endpoint = %base, credentials = %credentials.describe(), project = %config.project, "Pub/Sub sink");
        let api = Api::new(
            http,
            base,
            config.project.trim().to_owned(),
            TokenSource::new(credentials),
            config.request_timeout,
        );
        let shared =
            Arc::new(Shared { api, config: config.clone(), outstanding: AtomicUsize::new(0), idle: Notify::new() });
        let (queue, receiver) = mpsc::unbounded_channel();
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| PubSubSinkError::Config("the Pub/Sub sink needs a tokio runtime".into()))?;
        handle.spawn(Scheduler::new(shared.clone(), receiver).run());
        let probe_topic = if template.contains('{') { "outbox-relay-probe".to_owned() } else { template.to_owned() };
        Ok(PubSubSink {
            shared,
            queue,
            messages: Arc::new(Semaphore::new(config.max_outstanding_messages)),
            bytes: Arc::new(Semaphore::new(config.max_outstanding_bytes)),
            byte_budget: config.max_outstanding_bytes,
            probe_topic,
        })
    }

    /// The endpoint root in use (for messages).
    pub fn endpoint(&self) -> &str {
        self.shared.api.base()
    }

    /// Proves the endpoint answers and credentials yield a token.
    pub async fn check_reachable(&self, timeout: Duration) -> Result<(), String> {
        self.shared.api.probe(&self.probe_topic, timeout).await.map_err(|e| match e {
            ApiError::Status { .. } => e.explain(&self.shared.api.topic_name(&self.probe_topic)),
            other => format!("cannot reach Pub/Sub at {}: {other}", self.shared.api.base()),
        })
    }

    /// Whether `topic` exists: Ok, or the error with its fix.
    pub async fn check_topic(&self, topic: &str, timeout: Duration) -> Result<(), ApiError> {
        self.shared.api.get_topic(topic, timeout).await
    }

    /// The explanation of `error` for `topic`, with the fix.
    pub fn explain(&self, error: &ApiError, topic: &str) -> String {
        error.explain(&self.shared.api.topic_name(topic))
    }

    /// Whether topics are created on first use.
    pub fn creates_topics(&self) -> bool {
        self.shared.config.create_topics
    }

    /// The project id.
    pub fn project(&self) -> &str {
        self.shared.api.project()
    }

    /// Messages accepted and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.shared.outstanding.load(Ordering::Acquire)
    }

    async fn enqueue_one(
        &self,
        message: &OutgoingMessage,
    ) -> Result<oneshot::Receiver<Result<(), PublishError>>, PublishError> {
        let stopped = || PublishError { reason: "the Pub/Sub publisher stopped".into(), permanent: false };
        let prepared = message::prepare(message)?;
        // Backpressure: wait while too much is outstanding. A message larger
        // than the whole byte budget takes all of it, so it still fits.
        let cost = message::encoded_len(&prepared).min(self.byte_budget) as u32;
        let message_permit = self.messages.clone().acquire_owned().await.map_err(|_| stopped())?;
        let byte_permit = self.bytes.clone().acquire_many_owned(cost).await.map_err(|_| stopped())?;
        self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        let guard = OutstandingGuard(self.shared.clone());
        let (reply, answer) = oneshot::channel();
        let pending = Pending { prepared, reply, _permits: (message_permit, byte_permit), _outstanding: guard };
        self.queue.send(pending).map_err(|_| stopped())?;
        Ok(answer)
    }
}

impl Sink for PubSubSink {
    async fn enqueue(&self, messages: Vec<OutgoingMessage>) -> PendingDelivery {
        let mut answers = Vec::with_capacity(messages.len());
        for message in &messages {
            answers.push(self.enqueue_one(message).await);
        }
        async move {
            let mut results = Vec::with_capacity(answers.len());
            for answer in answers {
                results.push(match answer {
                    Ok(receiver) => receiver.await.unwrap_or_else(|_| {
                        Err(PublishError {
                            reason: "the Pub/Sub publisher stopped before Pub/Sub answered".into(),
                            permanent: false,
                        })
                    }),
                    Err(failure) => Err(failure),
                });
            }
            results
        }
        .boxed()
    }

    async fn reachable(&self, timeout: Duration) -> Result<(), String> {
        self.check_reachable(timeout).await
    }

    async fn flush(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.shared.idle.notified();
            if self.outstanding() == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return;
            }
        }
    }
}

/// (topic, ordering key): the unit of ordering.
type KeyId = (String, String);

/// One ordering key's queue.
#[derive(Default)]
struct KeyState {
    queue: VecDeque<Pending>,
    queued_bytes: usize,
    /// A request of this key is in flight.
    busy: bool,
    /// The key waits in `ready` or `retries`.
    scheduled: bool,
    /// Present while the key is failing.
    backoff: Option<backon::ExponentialBackoff>,
    /// Consecutive failed attempts.
    failures: u32,
}

/// What a request task returns.
type Flight = (u64, Result<Vec<String>, ApiError>);

/// Owns every queue; decides what is sent when.
struct Scheduler {
    shared: Arc<Shared>,
    receiver: mpsc::UnboundedReceiver<Pending>,
    keys: HashMap<KeyId, KeyState>,
    /// Keys with messages and nothing in flight, with the time they may go.
    ready: VecDeque<(Instant, KeyId)>,
    /// Paused keys and when they retry.
    retries: BinaryHeap<Reverse<(Instant, KeyId)>>,
    /// Batches in flight, by request id.
    flights: HashMap<u64, (KeyId, Vec<Pending>)>,
    running: FuturesUnordered<futures::future::BoxFuture<'static, Flight>>,
    next_id: u64,
    last_warn: Option<Instant>,
    /// The last answer was a transient failure: only one request goes out
    /// at a time, so a stalled service is probed, not flooded with retries
    /// it would all process (as duplicates) once it recovers.
    degraded: bool,
}

impl Scheduler {
    fn new(shared: Arc<Shared>, receiver: mpsc::UnboundedReceiver<Pending>) -> Scheduler {
        Scheduler {
            shared,
            receiver,
            keys: HashMap::new(),
            ready: VecDeque::new(),
            retries: BinaryHeap::new(),
            flights: HashMap::new(),
            running: FuturesUnordered::new(),
            next_id: 0,
            last_warn: None,
            degraded: false,
        }
    }

    async fn run(mut self) {
        let mut open = true;
        loop {
            let now = Instant::now();
            while let Some(Reverse((at, _))) = self.retries.peek() {
                if *at > now {
                    break;
                }
                if let Some(Reverse((_, key))) = self.retries.pop() {
                    self.ready.push_back((now, key));
                }
            }
            self.dispatch_ready(now);
            if !open && self.keys.is_empty() && self.running.is_empty() {
                return;
            }
            let can_send = self.running.len() < self.concurrency();
            let wake = [
                self.ready.front().filter(|_| can_send).map(|(at, _)| *at),
                self.retries.peek().map(|Reverse((at, _))| *at),
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                Some(flight) = self.running.next(), if !self.running.is_empty() => self.complete(flight),
                received = self.receiver.recv(), if open => match received {
                    Some(pending) => {
                        self.accept(pending);
                        // Take what else is waiting: one wake-up, many messages.
                        while let Ok(pending) = self.receiver.try_recv() {
                            self.accept(pending);
                        }
                    }
                    None => open = false,
                },
                _ = tokio::time::sleep_until(wake.unwrap_or(now)), if wake.is_some() => {}
            }
        }
    }

    fn accept(&mut self, pending: Pending) {
        let key = (pending.prepared.topic.clone(), pending.prepared.key.clone());
        let state = self.keys.entry(key.clone()).or_default();
        state.queued_bytes += message::encoded_len(&pending.prepared);
        state.queue.push_back(pending);
        if !state.busy && !state.scheduled {
            state.scheduled = true;
            self.ready.push_back((Instant::now() + self.shared.config.linger, key));
        }
    }

    /// Requests allowed in flight: `max_concurrent_requests`, or one while degraded.
    fn concurrency(&self) -> usize {
        if self.degraded {
            1
        } else {
            self.shared.config.max_concurrent_requests
        }
    }

    /// Sends ready keys while request slots are free: a key goes when its
    /// linger is over or it already fills a request.
    fn dispatch_ready(&mut self, now: Instant) {
        let shared = self.shared.clone();
        let config = &shared.config;
        while self.running.len() < self.concurrency() {
            let Some((at, key)) = self.ready.front() else { return };
            let full = self.keys.get(key).is_some_and(|s| {
                s.queue.len() >= config.max_messages_per_request || s.queued_bytes >= config.max_bytes_per_request
            });
            if *at > now && !full {
                return;
            }
            if let Some((_, key)) = self.ready.pop_front() {
                self.send(key);
            }
        }
    }

    /// Takes the head of a key's queue as one request and starts it.
    fn send(&mut self, key: KeyId) {
        let shared = self.shared.clone();
        let config = &shared.config;
        let Some(state) = self.keys.get_mut(&key) else { return };
        state.scheduled = false;
        let mut batch = Vec::new();
        let mut bytes = "{\"messages\":[]}".len();
        while let Some(next) = state.queue.front() {
            let size = message::encoded_len(&next.prepared);
            if !batch.is_empty()
                && (batch.len() >= config.max_messages_per_request || bytes + size > config.max_bytes_per_request)
            {
                break;
            }
            bytes += size;
            state.queued_bytes -= size;
            if let Some(pending) = state.queue.pop_front() {
                batch.push(pending);
            }
        }
        if batch.is_empty() {
            self.keys.remove(&key);
            return;
        }
        state.busy = true;
        let body = message::request_body(batch.iter().map(|p| p.prepared.json.as_slice()));
        let count = batch.len();
        let id = self.next_id;
        self.next_id += 1;
        let shared = self.shared.clone();
        let topic = key.0.clone();
        self.flights.insert(id, (key, batch));
        // Its own task: encoding, TLS and waiting run on any worker thread.
        let task = tokio::spawn(async move { publish(&shared, &topic, body, count).await });
        self.running.push(
            async move {
                let result =
                    task.await.unwrap_or_else(|e| Err(ApiError::Transport(format!("publish task failed: {e}"))));
                (id, result)
            }
            .boxed(),
        );
    }

    fn complete(&mut self, (id, result): Flight) {
        let Some((key, batch)) = self.flights.remove(&id) else { return };
        let now = Instant::now();
        let shared = self.shared.clone();
        let config = &shared.config;
        let topic_name = self.shared.api.topic_name(&key.0);
        let state = self.keys.entry(key.clone()).or_default();
        state.busy = false;
        match result {
            Ok(_ids) => {
                if state.failures > 0 {
                    info!(topic = %topic_name, ordering_key = %key.1, attempts = state.failures + 1, "Pub/Sub publish succeeded after retries");
                }
                state.failures = 0;
                state.backoff = None;
                for pending in batch {
                    let _ = pending.reply.send(Ok(()));
                }
                if self.degraded {
                    self.degraded = false;
                    info!(endpoint = %shared.api.base(), "Pub/Sub answers again; publishing at full concurrency");
                }
            }
            Err(error) if error.is_permanent() => {
                state.failures = 0;
                state.backoff = None;
                let reason = error.explain(&topic_name);
                warn!(topic = %topic_name, ordering_key = %key.1, messages = batch.len(), first_position = batch[0].prepared.position, %reason, "Pub/Sub refused messages (permanent)");
                for pending in batch {
                    let _ = pending.reply.send(Err(PublishError { reason: reason.clone(), permanent: true }));
                }
            }
            Err(error) => {
                // Back to the head of the key, in order; the key waits.
                state.failures += 1;
                self.degraded = true;
                for pending in batch.into_iter().rev() {
                    state.queued_bytes += message::encoded_len(&pending.prepared);
                    state.queue.push_front(pending);
                }
                let backoff = state.backoff.get_or_insert_with(|| {
                    backon::ExponentialBuilder::default()
                        .with_min_delay(config.retry_min_delay)
                        .with_max_delay(config.retry_max_delay)
                        .with_jitter()
                        .without_max_times()
                        .build()
                });
                let delay = backoff.next().unwrap_or(config.retry_max_delay);
                state.scheduled = true;
                let failures = state.failures;
                self.retries.push(Reverse((now + delay, key.clone())));
                let reason = error.explain(&topic_name);
                if self.last_warn.is_none_or(|at| now.duration_since(at) >= WARN_EVERY) {
                    self.last_warn = Some(now);
                    warn!(%reason, paused_keys = self.retries.len(), retry_in = ?delay, "Pub/Sub publish failed; retrying (the ordering key waits, others keep flowing)");
                } else {
                    debug!(topic = %topic_name, ordering_key = %key.1, attempt = failures, %reason, retry_in = ?delay, "Pub/Sub publish failed; retrying");
                }
                return;
            }
        }
        if let Some(state) = self.keys.get_mut(&key) {
            if state.queue.is_empty() {
                self.keys.remove(&key);
            } else if !state.scheduled {
                // What queued up meanwhile goes at once: it has waited long enough.
                state.scheduled = true;
                self.ready.push_back((now, key));
            }
        }
    }
}

/// One publish request, creating the topic first if it is missing and
/// `create_topics` is set.
async fn publish(shared: &Shared, topic: &str, body: Vec<u8>, count: usize) -> Result<Vec<String>, ApiError> {
    if !shared.config.create_topics {
        return shared.api.publish(topic, body, count).await;
    }
    match shared.api.publish(topic, body.clone(), count).await {
        Err(e) if e.is_not_found() => {
            info!(topic = %shared.api.topic_name(topic), "creating Pub/Sub topic (sink.pubsub.create_topics = true)");
            shared.api.create_topic(topic).await?;
            shared.api.publish(topic, body, count).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// One accepted request: its ordering keys, the seqs of its messages, its body size.
    type Accepted = (Vec<String>, Vec<u64>, usize);

    /// A fake Pub/Sub publish endpoint: fails every third attempt with 503,
    /// answers 403 for topic `forbidden`, and records what it saw.
    #[derive(Default)]
    struct FakePubSub {
        /// Successful requests: (ordering keys, seqs, body bytes).
        accepted: StdMutex<Vec<Accepted>>,
        attempts: AtomicUsize,
        keys_in_flight: StdMutex<std::collections::HashSet<String>>,
        overlapped: std::sync::atomic::AtomicBool,
    }

    async fn fake_publish(
        axum::extract::State(fake): axum::extract::State<Arc<FakePubSub>>,
        uri: axum::http::Uri,
        body: bytes::Bytes,
    ) -> (axum::http::StatusCode, String) {
        use axum::http::StatusCode;
        if uri.path().contains("/topics/forbidden") {
            let error = r#"{"error":{"code":403,"message":"denied","status":"PERMISSION_DENIED"}}"#;
            return (StatusCode::FORBIDDEN, error.into());
        }
        let request: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let messages = request["messages"].as_array().unwrap();
        let keys: Vec<String> = messages.iter().map(|m| m["orderingKey"].as_str().unwrap().to_owned()).collect();
        let seqs: Vec<u64> = messages
            .iter()
            .map(|m| {
                let data = base64::engine::general_purpose::STANDARD.decode(m["data"].as_str().unwrap()).unwrap();
                serde_json::from_slice::<serde_json::Value>(&data).unwrap()["seq"].as_u64().unwrap()
            })
            .collect();
        let key = keys[0].clone();
        if !fake.keys_in_flight.lock().unwrap().insert(key.clone()) {
            fake.overlapped.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        fake.keys_in_flight.lock().unwrap().remove(&key);
        if fake.attempts.fetch_add(1, Ordering::SeqCst) % 3 == 1 {
            let error = r#"{"error":{"code":503,"message":"try again","status":"UNAVAILABLE"}}"#;
            return (StatusCode::SERVICE_UNAVAILABLE, error.into());
        }
        let ids: Vec<String> = (0..messages.len()).map(|i| i.to_string()).collect();
        fake.accepted.lock().unwrap().push((keys, seqs, body.len()));
        (StatusCode::OK, serde_json::json!({ "messageIds": ids }).to_string())
    }

    async fn fake_server() -> (Arc<FakePubSub>, String) {
        let fake = Arc::new(FakePubSub::default());
        let app = axum::Router::new().fallback(axum::routing::post(fake_publish)).with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, format!("http://{address}"))
    }

    fn message(topic: &str, key: &str, seq: u64) -> OutgoingMessage {
        OutgoingMessage {
            position: seq as i64,
            topic: topic.into(),
            key: key.into(),
            value: serde_json::to_vec(&serde_json::json!({"aggregate_type": "T", "seq": seq, "pad": "x".repeat(100)}))
                .unwrap(),
            headers: vec![(std::borrow::Cow::Borrowed("event_id"), format!("{key}-{seq}").into_bytes())],
            timestamp_ms: None,
            tombstone: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_per_key_within_limits_and_retries_keep_each_key_in_order() {
        // GIVEN a sink with small request limits and outstanding bounds over a flaky endpoint
        let (fake, endpoint) = fake_server().await;
        let config = PubSubConfig {
            project: "test-project".into(),
            endpoint,
            max_messages_per_request: 7,
            max_bytes_per_request: 2000,
            max_outstanding_messages: 50,
            max_outstanding_bytes: 20_000,
            linger: Duration::from_millis(1),
            retry_min_delay: Duration::from_millis(1),
            retry_max_delay: Duration::from_millis(5),
            ..PubSubConfig::default()
        };
        validate_config(&config, "orders").unwrap();
        let sink = PubSubSink::with_credentials(&config, "orders", Credentials::None).unwrap();

        // WHEN 3 batches of 200 messages over 10 keys are enqueued back to back
        let mut seq_of_key = [0u64; 10];
        let mut deliveries = Vec::new();
        for _ in 0..3 {
            let batch: Vec<OutgoingMessage> = (0..200)
                .map(|i| {
                    seq_of_key[i % 10] += 1;
                    message("orders", &format!("k{}", i % 10), seq_of_key[i % 10])
                })
                .collect();
            deliveries.push(sink.enqueue(batch).await);
        }
        let mut results = Vec::new();
        for delivery in deliveries {
            results.extend(delivery.await);
        }

        // THEN every message is acknowledged,
        assert_eq!(results.len(), 600);
        assert!(results.iter().all(Result::is_ok), "{:?}", results.iter().find(|r| r.is_err()));
        tokio::time::timeout(Duration::from_secs(5), sink.flush(Duration::from_secs(5))).await.unwrap();
        assert_eq!(sink.outstanding(), 0);
        let accepted = fake.accepted.lock().unwrap().clone();
        // AND no request mixed keys, exceeded a limit, or overlapped another of its key,
        assert!(!fake.overlapped.load(Ordering::SeqCst), "two requests of one key were in flight at once");
        for (keys, seqs, bytes) in &accepted {
            assert!(keys.iter().all(|k| k == &keys[0]), "a request mixed ordering keys: {keys:?}");
            assert!(seqs.len() <= 7 && *bytes <= 2000, "{} messages, {bytes} bytes", seqs.len());
        }
        // AND although a third of the attempts failed, each key's messages were accepted once, in order.
        assert!(fake.attempts.load(Ordering::SeqCst) > accepted.len(), "no retries happened");
        for k in 0..10 {
            let key = format!("k{k}");
            let order: Vec<u64> =
                accepted.iter().filter(|(keys, _, _)| keys[0] == key).flat_map(|(_, s, _)| s.clone()).collect();
            assert_eq!(order, (1..=60).collect::<Vec<u64>>(), "key {key}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permanent_errors_fail_only_their_messages_with_the_fix() {
        let (_fake, endpoint) = fake_server().await;
        let config = PubSubConfig { project: "test-project".into(), endpoint, ..PubSubConfig::default() };
        let sink = PubSubSink::with_credentials(&config, "orders", Credentials::None).unwrap();
        let mut big = message("orders", "k", 2);
        big.value = vec![b'x'; message::MAX_MESSAGE_BYTES + 1];
        let results = sink
            .enqueue(vec![message("forbidden", "k", 1), big, message("1nvalid", "k", 3), message("orders", "k", 4)])
            .await
            .await;
        let forbidden = results[0].as_ref().unwrap_err();
        assert!(
            forbidden.permanent && forbidden.reason.contains("projects/test-project/topics/forbidden"),
            "{forbidden:?}"
        );
        assert!(forbidden.reason.contains("roles/pubsub.publisher"), "{forbidden:?}");
        assert!(results[1].as_ref().unwrap_err().reason.contains("at most 10000000"));
        assert!(results[2].as_ref().unwrap_err().reason.contains("start with a letter"));
        // The one valid message is published.
        assert_eq!(results[3], Ok(()));
    }

    fn valid() -> PubSubConfig {
        PubSubConfig { project: "my-project".into(), ..PubSubConfig::default() }
    }

    #[test]
    fn defaults_with_a_project_are_valid() {
        validate_config(&valid(), "outbox.{aggregate_type}").unwrap();
    }

    #[test]
    fn missing_project_names_the_key_and_env_var() {
        let err = validate_config(&PubSubConfig::default(), "outbox.{aggregate_type}").unwrap_err();
        assert_eq!(err.key, "sink.pubsub.project");
        assert!(err.problem.contains("OUTBOX_RELAY_SINK__PUBSUB__PROJECT"), "{err}");
        let err = validate_config(&PubSubConfig { project: "My Project".into(), ..valid() }, "t-topic").unwrap_err();
        assert_eq!(err.key, "sink.pubsub.project");
    }

    #[test]
    fn bad_static_topic_is_a_config_error_naming_the_rule() {
        let err = validate_config(&valid(), "1-orders").unwrap_err();
        assert_eq!(err.key, "sink.topic");
        assert!(err.problem.contains("start with a letter"), "{err}");
        assert_eq!(validate_config(&valid(), "goog.{aggregate_type}").unwrap_err().key, "sink.topic");
    }

    #[test]
    fn batching_limits_are_bounded_by_pubsubs() {
        for (config, key) in [
            (PubSubConfig { max_messages_per_request: 1001, ..valid() }, "sink.pubsub.max_messages_per_request"),
            (PubSubConfig { max_messages_per_request: 0, ..valid() }, "sink.pubsub.max_messages_per_request"),
            (PubSubConfig { max_bytes_per_request: 10_000_001, ..valid() }, "sink.pubsub.max_bytes_per_request"),
            (PubSubConfig { max_concurrent_requests: 0, ..valid() }, "sink.pubsub.max_concurrent_requests"),
            (PubSubConfig { linger: Duration::from_secs(2), ..valid() }, "sink.pubsub.linger"),
            (PubSubConfig { max_outstanding_messages: 10, ..valid() }, "sink.pubsub.max_outstanding_messages"),
            (PubSubConfig { max_outstanding_bytes: 10, ..valid() }, "sink.pubsub.max_outstanding_bytes"),
            (PubSubConfig { endpoint: "pubsub.googleapis.com".into(), ..valid() }, "sink.pubsub.endpoint"),
            (
                PubSubConfig { credentials_file: Some("/nonexistent.json".into()), ..valid() },
                "sink.pubsub.credentials_file",
            ),
        ] {
            assert_eq!(validate_config(&config, "topic").unwrap_err().key, key);
        }
    }
}
