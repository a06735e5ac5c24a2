//! The Pub/Sub REST API (`https://pubsub.googleapis.com/v1/...`), the few
//! calls the relay needs: publish, get topic, create topic. Plain HTTP for
//! the emulator, HTTPS (rustls, ring provider, system roots, HTTP/2) for
//! Google. Every answer is classified here as transient (retry) or
//! permanent (tied to the data or the setup: retrying cannot help).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::auth::TokenSource;
use super::topic::resource_name;

/// An HTTP client for the API and the token endpoints.
#[derive(Clone)]
pub struct Http {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// The whole body.
    pub body: Bytes,
}

impl Http {
    /// A client with the system trust store. Without CA certificates it
    /// still speaks plain HTTP (the emulator); `https` then says why it fails.
    pub fn new() -> Result<Http, String> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = match hyper_rustls::HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone())
        {
            Ok(builder) => builder,
            Err(e) => {
                tracing::warn!(error = %e, "no system CA certificates: https to Google will fail (install ca-certificates or set SSL_CERT_FILE)");
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| format!("cannot set up TLS: {e}"))?
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config)
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = builder.https_or_http().enable_http1().enable_http2().wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(60)).build(connector);
        Ok(Http { client })
    }

    /// Sends one request; any transport failure or timeout is an `Err` (transient).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Response, String> {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request =
            request.body(Full::new(Bytes::from(body))).map_err(|e| format!("invalid request to {url}: {e}"))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| describe_hyper_error(&e))?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes();
            Ok::<_, String>(Response { status, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result.map_err(|e| format!("{url}: {e}")),
            Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        }
    }
}

/// The error chain of a hyper client error (its Display is only the top).
fn describe_hyper_error(error: &hyper_util::client::legacy::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why an API call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No answer: connection refused or reset, timeout, TLS failure.
    #[error("Pub/Sub did not answer: {0}")]
    Transport(String),
    /// No access token could be had (metadata server, token endpoint).
    #[error("no Google access token: {0}")]
    Auth(String),
    /// The API answered with an error status.
    #[error("Pub/Sub answered {code} {status}: {message}")]
    Status {
        /// HTTP status code.
        code: u16,
        /// The canonical gRPC status name, e.g. `NOT_FOUND`.
        status: String,
        /// Google's message.
        message: String,
    },
    /// A 200 answer that is not what the API documents.
    #[error("unexpected answer from Pub/Sub: {0}")]
    BadResponse(String),
}

impl ApiError {
    /// Whether retrying the same request can never succeed. Transient:
    /// no answer, no token, 401 (token refreshed on retry), 408, 409
    /// ABORTED, 429, 499 and 5xx; permanent: the other 4xx.
    pub fn is_permanent(&self) -> bool {
        match self {
            ApiError::Transport(_) | ApiError::Auth(_) | ApiError::BadResponse(_) => false,
            ApiError::Status { code, .. } => match code {
                401 | 408 | 409 | 429 | 499 => false,
                400..=499 => true,
                _ => false,
            },
        }
    }

    /// Whether the topic does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ApiError::Status { code: 404, .. })
    }

    /// Whether the access token was refused (and must be renewed).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, ApiError::Status { code: 401, .. })
    }

    /// The error with what to do about it, for `topic` (a full resource name).
    pub fn explain(&self, topic: &str) -> String {
        match self {
            ApiError::Status { code: 404, .. } => {
                let (project, id) = topic
                    .strip_prefix("projects/")
                    .and_then(|rest| rest.split_once("/topics/"))
                    .unwrap_or(("PROJECT", topic));
                format!(
                    "Pub/Sub topic {topic} does not exist: create it (gcloud pubsub topics create {id} --project {project}) \
                     or set sink.pubsub.create_topics = true"
                )
            }
            ApiError::Status { code: 403, message, .. } => format!(
                "permission denied publishing to {topic} ({message}): grant the relay's service account \
                 roles/pubsub.publisher on the topic or project (and enable the Pub/Sub API)"
            ),
            ApiError::Status { code: 413, .. } => {
                format!("Pub/Sub refused a request to {topic} as too large ({self}): lower sink.pubsub.max_bytes_per_request")
            }
            ApiError::Status { code: 400, message, status, .. } => {
                format!("Pub/Sub rejected a publish to {topic} as invalid ({status}: {message})")
            }
            other => format!("{topic}: {other}"),
        }
    }
}

/// Google's JSON error body.
#[derive(serde::Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
}

/// Turns a non-2xx answer into an [`ApiError::Status`].
pub fn status_error(response: &Response) -> ApiError {
    let (status, message) = match serde_json::from_slice::<ErrorBody>(&response.body) {
        Ok(body) => (body.error.status, body.error.message),
        Err(_) => (String::new(), String::from_utf8_lossy(&response.body).chars().take(300).collect()),
    };
    let status = if status.is_empty() { canonical_status(response.status).to_owned() } else { status };
    ApiError::Status { code: response.status, status, message }
}

/// The gRPC status name HTTP codes map to, when the body names none.
fn canonical_status(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        413 => "REQUEST_TOO_LARGE",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "UNIMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// The publish answer.
#[derive(serde::Deserialize)]
struct PublishResponse {
    #[serde(rename = "messageIds", default)]
    message_ids: Vec<String>,
}

/// The API for one project.
pub struct Api {
    http: Http,
    /// `https://pubsub.googleapis.com` or `http://host:port` (no trailing slash).
    base: String,
    project: String,
    auth: TokenSource,
    timeout: Duration,
}

impl Api {
    /// An API client; `base` is the endpoint root.
    pub fn new(http: Http, base: String, project: String, auth: TokenSource, timeout: Duration) -> Api {
        Api { http, base: base.trim_end_matches('/').to_owned(), project, auth, timeout }
    }

    /// The endpoint root, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The project id.
    pub fn project(&self) -> &str {
        &self.project
    }

    /// Full resource name of a topic id in this project.
    pub fn topic_name(&self, topic: &str) -> String {
        resource_name(&self.project, topic)
    }

    async fn call(&self, method: Method, path: &str, body: Vec<u8>, timeout: Duration) -> Result<Response, ApiError> {
        let token = self.auth.authorization(&self.http).await.map_err(ApiError::Auth)?;
        let url = format!("{}/v1/{path}", self.base);
        let mut headers = vec![("content-type", "application/json")];
        if let Some(token) = token.as_deref() {
            headers.push(("authorization", token));
        }
        if let Some(project) = self.auth.quota_project() {
            headers.push(("x-goog-user-project", project));
        }
        let response = self.http.send(method, &url, &headers, body, timeout).await.map_err(ApiError::Transport)?;
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        let error = status_error(&response);
        if error.is_unauthenticated() {
            self.auth.invalidate().await;
        }
        Err(error)
    }

    /// Publishes one request body (`{"messages":[..]}`, `count` messages);
    /// returns the message ids, one per message, or an error.
    pub async fn publish(&self, topic: &str, body: Vec<u8>, count: usize) -> Result<Vec<String>, ApiError> {
        let path = format!("{}:publish", self.topic_name(topic));
        let response = self.call(Method::POST, &path, body, self.timeout).await?;
        let answer: PublishResponse = serde_json::from_slice(&response.body)
            .map_err(|e| ApiError::BadResponse(format!("publish answer is not JSON with messageIds: {e}")))?;
        if answer.message_ids.len() != count {
            return Err(ApiError::BadResponse(format!(
                "publish returned {} message ids for {count} messages",
                answer.message_ids.len()
            )));
        }
        Ok(answer.message_ids)
    }

    /// Whether the topic exists (Ok) or why not.
    pub async fn get_topic(&self, topic: &str, timeout: Duration) -> Result<(), ApiError> {
        self.call(Method::GET, &self.topic_name(topic), Vec::new(), timeout).await.map(|_| ())
    }

    /// Creates the topic; one that already exists is fine.
    pub async fn create_topic(&self, topic: &str) -> Result<(), ApiError> {
        match self.call(Method::PUT, &self.topic_name(topic), b"{}".to_vec(), self.timeout).await {
            Ok(_) => Ok(()),
            Err(ApiError::Status { code: 409, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Proves the endpoint answers and a token can be had: any HTTP answer
    /// but 401 counts (a publisher-only role may not read topics).
    pub async fn probe(&self, topic: &str, timeout: Duration) -> Result<(), ApiError> {
        match self.get_topic(topic, timeout).await {
            Ok(()) => Ok(()),
            Err(e @ (ApiError::Transport(_) | ApiError::Auth(_))) => Err(e),
            Err(e) if e.is_unauthenticated() => Err(e),
            Err(ApiError::Status { code, .. }) if code >= 500 => {
                Err(ApiError::Transport(format!("{} answered {code}", self.base)))
            }
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(code: u16, body: &str) -> Response {
        Response { status: code, body: Bytes::from(body.to_owned()) }
    }

    #[test]
    fn errors_are_classified_like_googles_publish_retry_settings() {
        let error = |code, status: &str| ApiError::Status { code, status: status.into(), message: String::new() };
        for transient in [
            error(401, "UNAUTHENTICATED"),
            error(409, "ABORTED"),
            error(429, "RESOURCE_EXHAUSTED"),
            error(499, "CANCELLED"),
            error(500, "INTERNAL"),
            error(502, "UNKNOWN"),
            error(503, "UNAVAILABLE"),
            error(504, "DEADLINE_EXCEEDED"),
            ApiError::Transport("connection refused".into()),
            ApiError::Auth("metadata server".into()),
            ApiError::BadResponse("ids".into()),
        ] {
            assert!(!transient.is_permanent(), "{transient:?}");
        }
        for permanent in [
            error(400, "INVALID_ARGUMENT"),
            error(400, "FAILED_PRECONDITION"),
            error(403, "PERMISSION_DENIED"),
            error(404, "NOT_FOUND"),
            error(413, "REQUEST_TOO_LARGE"),
        ] {
            assert!(permanent.is_permanent(), "{permanent:?}");
        }
    }

    #[test]
    fn google_error_bodies_are_parsed_and_explained_with_the_fix() {
        let e =
            status_error(&response(404, r#"{"error":{"code":404,"message":"Topic not found","status":"NOT_FOUND"}}"#));
        assert_eq!(e, ApiError::Status { code: 404, status: "NOT_FOUND".into(), message: "Topic not found".into() });
        let text = e.explain("projects/my-proj/topics/outbox.Order");
        assert!(text.contains("gcloud pubsub topics create outbox.Order --project my-proj"), "{text}");
        assert!(text.contains("sink.pubsub.create_topics = true"), "{text}");
        let e = status_error(&response(
            403,
            r#"{"error":{"code":403,"message":"User not authorized","status":"PERMISSION_DENIED"}}"#,
        ));
        assert!(e.explain("projects/p/topics/t").contains("roles/pubsub.publisher"));
        let e = status_error(&response(503, "<html>upstream</html>"));
        assert_eq!(
            e,
            ApiError::Status { code: 503, status: "UNAVAILABLE".into(), message: "<html>upstream</html>".into() }
        );
    }
}
