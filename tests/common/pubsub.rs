#![allow(dead_code)]

//! Google's Pub/Sub emulator as a child process, and a small REST client
//! (independent of the relay's) to create topics and ordered
//! subscriptions and pull messages back.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::common::Consumed;

/// Where Debian's google-cloud-cli-pubsub-emulator package puts it;
/// `PUBSUB_EMULATOR_BIN` overrides.
fn emulator_path() -> PathBuf {
    match std::env::var_os("PUBSUB_EMULATOR_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from("/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"),
    }
}

/// The emulator on a private loopback port. It keeps everything in memory:
/// never restart it in a test, freeze it ([`freeze`](PubSubEmulator::freeze)).
pub struct PubSubEmulator {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl PubSubEmulator {
    /// Starts the emulator on a free port and waits until `GET /` says Ok.
    /// Panics, saying how to install it, if it is missing.
    pub fn start() -> PubSubEmulator {
        let bin = emulator_path();
        assert!(
            bin.is_file(),
            "Pub/Sub emulator not found at {}: install it with `apt-get install google-cloud-cli-pubsub-emulator` \
             (from Google's Cloud SDK apt repository; it needs a Java 17 runtime), or set PUBSUB_EMULATOR_BIN",
            bin.display()
        );
        let dir = tempfile::tempdir().expect("temp dir for the emulator log");
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let log = std::fs::File::create(dir.path().join("emulator.log")).expect("emulator log");
        let child = Command::new(&bin)
            .args(["--host=127.0.0.1", &format!("--port={port}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("emulator log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn the Pub/Sub emulator");
        let mut emulator = PubSubEmulator { child: Some(child), port, dir };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if crate::common::relay::http_get(&emulator.host(), "/").1.trim() == "Ok" {
                return emulator;
            }
            let exited = emulator.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(emulator.dir.path().join("emulator.log")).unwrap_or_default();
                emulator.stop();
                panic!("Pub/Sub emulator did not become ready on port {port} ({exited:?}); log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:PORT`, the value for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The emulator's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("emulator.log")).unwrap_or_default()
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // The emulator's process group (its script execs java).
            unsafe { libc::kill(-(child.id() as i32), signal) };
        }
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(-(child.id() as i32), libc::SIGCONT) };
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }
}

impl Drop for PubSubEmulator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message pulled back.
#[derive(Debug, Clone)]
pub struct Received {
    pub data: Vec<u8>,
    pub attributes: BTreeMap<String, String>,
    pub ordering_key: String,
    pub message_id: String,
}

impl Received {
    /// As a [`Consumed`] so the Kafka tests' checks apply: one "partition",
    /// offsets in arrival order, the ordering key as the key.
    pub fn to_consumed(&self, topic: &str, arrival: usize) -> Consumed {
        Consumed {
            topic: topic.to_owned(),
            partition: 0,
            offset: arrival as i64,
            key: Some(self.ordering_key.clone().into_bytes()),
            value: self.data.clone(),
            headers: self.attributes.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())).collect(),
            timestamp_ms: None,
        }
    }
}

/// A REST client for the emulator, for one project.
pub struct PubSubClient {
    base: String,
    project: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl PubSubClient {
    /// A client for `project` on the emulator at `host`.
    pub fn new(host: &str, project: &str) -> PubSubClient {
        PubSubClient {
            base: format!("http://{host}/v1"),
            project: project.to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}/projects/{}/{path}", self.base, self.project))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let response = tokio::time::timeout(Duration::from_secs(60), self.http.request(request))
            .await
            .expect("emulator answers within 60 s")
            .expect("emulator request");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("emulator body").to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// Creates a topic; panics unless created.
    pub async fn create_topic(&self, topic: &str) {
        let (status, body) = self.call("PUT", &format!("topics/{topic}"), json!({})).await;
        assert_eq!(status, 200, "create topic {topic}: {body}");
    }

    /// Whether the topic exists.
    pub async fn topic_exists(&self, topic: &str) -> bool {
        self.call("GET", &format!("topics/{topic}"), Value::Null).await.0 == 200
    }

    /// Creates a subscription with message ordering enabled.
    pub async fn create_ordered_subscription(&self, subscription: &str, topic: &str) {
        let body = json!({
            "topic": format!("projects/{}/topics/{topic}", self.project),
            "enableMessageOrdering": true,
            "ackDeadlineSeconds": 120,
        });
        let (status, answer) = self.call("PUT", &format!("subscriptions/{subscription}"), body).await;
        assert_eq!(status, 200, "create subscription {subscription}: {answer}");
        assert_eq!(answer["enableMessageOrdering"], true, "{answer}");
    }

    /// One pull (returns at once when nothing waits), acknowledging what arrived.
    pub async fn pull_once(&self, subscription: &str) -> Vec<Received> {
        let (status, body) = self
            .call(
                "POST",
                &format!("subscriptions/{subscription}:pull"),
                json!({"maxMessages": 1000, "returnImmediately": true}),
            )
            .await;
        assert_eq!(status, 200, "pull: {body}");
        let mut out = Vec::new();
        let mut ack_ids = Vec::new();
        for item in body["receivedMessages"].as_array().cloned().unwrap_or_default() {
            ack_ids.push(item["ackId"].clone());
            let message = &item["message"];
            out.push(Received {
                data: base64::engine::general_purpose::STANDARD
                    .decode(message["data"].as_str().unwrap_or_default())
                    .expect("data is base64"),
                attributes: message["attributes"]
                    .as_object()
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
                    .unwrap_or_default(),
                ordering_key: message["orderingKey"].as_str().unwrap_or_default().to_owned(),
                message_id: message["messageId"].as_str().unwrap_or_default().to_owned(),
            });
        }
        if !ack_ids.is_empty() {
            let (status, body) = self
                .call("POST", &format!("subscriptions/{subscription}:acknowledge"), json!({"ackIds": ack_ids}))
                .await;
            assert_eq!(status, 200, "acknowledge: {body}");
        }
        out
    }

    /// Pulls (and acknowledges) until `expected` distinct messages (by data)
    /// arrived and nothing more for two seconds, or until `timeout`.
    pub async fn pull_all(&self, subscription: &str, expected: usize, timeout: Duration) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        let mut received = Vec::new();
        let mut distinct = std::collections::HashSet::new();
        let mut last = Instant::now();
        while Instant::now() < deadline {
            let batch = self.pull_once(subscription).await;
            if batch.is_empty() {
                if distinct.len() >= expected && last.elapsed() >= Duration::from_secs(2) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            last = Instant::now();
            for message in batch {
                distinct.insert(message.data.clone());
                received.push(message);
            }
        }
        received
    }
}
