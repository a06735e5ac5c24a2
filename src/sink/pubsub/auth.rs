//! Google credentials, found the way Application Default Credentials are:
//!
//! 1. `PUBSUB_EMULATOR_HOST` set: the emulator, no credentials at all.
//! 2. `sink.pubsub.credentials_file`, else `GOOGLE_APPLICATION_CREDENTIALS`,
//!    else gcloud's ADC file (`gcloud auth application-default login`):
//!    - `service_account` keys sign a self-signed JWT (RS256, with `ring`)
//!      whose audience is the Pub/Sub API; no token endpoint is involved;
//!    - `authorized_user` files trade their refresh token at `token_uri`.
//! 3. Otherwise the GCE/GKE metadata server (Workload Identity on GKE).
//!
//! Tokens are cached and renewed five minutes before they expire; a 401
//! from the API drops the cached token so the retry gets a fresh one.
//!
//! # Why not `gcp_auth`
//!
//! `gcp_auth` 0.12 (djc/gcp_auth, maintained; `default-features = false,
//! features = ["ring"]` keeps it on hyper 1 / rustls / ring, no aws-lc-rs)
//! was weighed in issue 21 and not adopted, because it cannot do what this
//! module is for:
//! - an `authorized_user` file at an explicit path (`sink.pubsub.credentials_file`,
//!   `GOOGLE_APPLICATION_CREDENTIALS`): it reads those only from the fixed
//!   gcloud path, and explicit paths only as service-account keys;
//! - `GCE_METADATA_HOST`: its metadata URL is a constant, so neither a
//!   non-default metadata endpoint nor the fake one in our tests can be used;
//! - lazy, transient failures: its metadata provider asks the server when it
//!   is built, so a relay started before the network is up would fail at
//!   start instead of retrying the first publish;
//! - self-signed JWTs: a service account always goes through the token
//!   endpoint (one more network dependency) rather than signing for the
//!   Pub/Sub audience;
//! - dropping a token after a 401, the quota project header, and errors
//!   that say which credential source to fix (its `NoAuthMethod` does not).
//!
//! It would also add 31 packages to Cargo.lock (`url` with the ICU/IDNA
//! stack, `async-trait`, `tracing-futures`) and a second HTTP client beside
//! [`Http`]. What was hand-written here and does have a crate now uses it:
//! the PEM block is read by `rustls-pki-types` and the form body encoded by
//! `percent-encoding`. What remains (about 150 lines without tests) is the
//! ADC search order, the JWT (two JSON objects and a ring signature) and the
//! cache.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hyper::Method;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use ring::signature::RsaKeyPair;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivatePkcs8KeyDer;
use tokio::sync::Mutex;

use super::client::Http;

/// Audience of self-signed JWTs: the Pub/Sub API.
pub const PUBSUB_AUDIENCE: &str = "https://pubsub.googleapis.com/";
/// OAuth scope asked of the metadata server and token endpoint.
const SCOPE: &str = "https://www.googleapis.com/auth/pubsub";
/// Default OAuth token endpoint.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Lifetime of a self-signed JWT (Google's maximum is one hour).
const JWT_LIFETIME: Duration = Duration::from_secs(3600);
/// Renew a token this long before it expires.
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Time limit of one token request.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A credentials file that cannot be used (a configuration error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CredentialsError(pub String);

/// Where access tokens come from.
pub enum Credentials {
    /// The emulator: no `authorization` header.
    None,
    /// A service-account key: self-signed JWTs.
    ServiceAccount {
        /// `client_email`.
        email: String,
        /// `private_key_id`, sent as the JWT `kid`.
        key_id: String,
        /// The RSA key from `private_key`.
        key: Box<RsaKeyPair>,
    },
    /// An `authorized_user` file (gcloud ADC): refresh-token grant.
    AuthorizedUser {
        /// OAuth client id.
        client_id: String,
        /// OAuth client secret.
        client_secret: String,
        /// Long-lived refresh token.
        refresh_token: String,
        /// Token endpoint.
        token_uri: String,
        /// `quota_project_id` of the file: the project billed for the
        /// calls (user credentials have no project of their own).
        quota_project: Option<String>,
    },
    /// The metadata server at `host` (GCE_METADATA_HOST or metadata.google.internal).
    Metadata {
        /// `host[:port]`.
        host: String,
    },
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The fields of a credentials JSON file the relay reads.
#[derive(serde::Deserialize)]
struct CredentialsFile {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    client_email: String,
    #[serde(default)]
    private_key_id: String,
    #[serde(default)]
    private_key: String,
    #[serde(default)]
    client_id: String,
    #[serde(default)]
    client_secret: String,
    #[serde(default)]
    refresh_token: String,
    #[serde(default)]
    token_uri: String,
    #[serde(default)]
    quota_project_id: String,
}

impl Credentials {
    /// Finds credentials as described in the module docs. `emulator` is
    /// whether `PUBSUB_EMULATOR_HOST` is set; `configured` is
    /// `sink.pubsub.credentials_file`.
    pub fn discover(emulator: bool, configured: Option<&Path>) -> Result<Credentials, CredentialsError> {
        if emulator {
            return Ok(Credentials::None);
        }
        if let Some(path) = configured {
            return Credentials::from_file(path, "sink.pubsub.credentials_file");
        }
        if let Some(path) = std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty()) {
            return Credentials::from_file(Path::new(&path), "GOOGLE_APPLICATION_CREDENTIALS");
        }
        if let Some(path) = gcloud_adc_file().filter(|p| p.is_file()) {
            return Credentials::from_file(&path, "gcloud's application default credentials");
        }
        let host = std::env::var("GCE_METADATA_HOST").ok().filter(|h| !h.is_empty());
        Ok(Credentials::Metadata { host: host.unwrap_or_else(|| "metadata.google.internal".into()) })
    }

    /// Reads a service-account or authorized-user JSON file; `origin` says
    /// where its path came from, for the message.
    pub fn from_file(path: &Path, origin: &str) -> Result<Credentials, CredentialsError> {
        let fail = |why: String| CredentialsError(format!("{origin}: {}: {why}", path.display()));
        let text = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read it: {e}")))?;
        Credentials::from_json(&text).map_err(fail)
    }

    /// Parses credentials JSON (see [`Credentials::from_file`]).
    pub fn from_json(text: &str) -> Result<Credentials, String> {
        let file: CredentialsFile =
            serde_json::from_str(text).map_err(|e| format!("not a Google credentials JSON file: {e}"))?;
        let token_uri = if file.token_uri.is_empty() { DEFAULT_TOKEN_URI.to_owned() } else { file.token_uri };
        match file.kind.as_str() {
            "service_account" => {
                if file.client_email.is_empty() || file.private_key.is_empty() {
                    return Err(
                        "service_account key without client_email or private_key: download a new JSON key".into()
                    );
                }
                let der = pem_to_der(&file.private_key)?;
                let key = RsaKeyPair::from_pkcs8(&der)
                    .map_err(|e| format!("private_key is not an RSA PKCS#8 key ring accepts: {e}"))?;
                Ok(Credentials::ServiceAccount {
                    email: file.client_email,
                    key_id: file.private_key_id,
                    key: Box::new(key),
                })
            }
            "authorized_user" => {
                if file.refresh_token.is_empty() || file.client_id.is_empty() {
                    return Err("authorized_user file without refresh_token or client_id: run `gcloud auth application-default login` again".into());
                }
                Ok(Credentials::AuthorizedUser {
                    client_id: file.client_id,
                    client_secret: file.client_secret,
                    refresh_token: file.refresh_token,
                    token_uri,
                    quota_project: Some(file.quota_project_id).filter(|p| !p.is_empty()),
                })
            }
            other => Err(format!(
                "credentials of type {other:?} are not supported: use a service_account key or an authorized_user \
                 file, or leave credentials unset on GKE/GCE to use the metadata server (Workload Identity)"
            )),
        }
    }

    /// One line for logs (never a secret).
    pub fn describe(&self) -> String {
        match self {
            Credentials::None => "no credentials (emulator)".into(),
            Credentials::ServiceAccount { email, .. } => format!("service account {email} (self-signed JWT)"),
            Credentials::AuthorizedUser { client_id, .. } => format!("authorized user (OAuth client {client_id})"),
            Credentials::Metadata { host } => format!("metadata server {host} (GCE/GKE Workload Identity)"),
        }
    }
}

/// gcloud's ADC file: `$CLOUDSDK_CONFIG/application_default_credentials.json`,
/// default `~/.config/gcloud/`.
fn gcloud_adc_file() -> Option<PathBuf> {
    let dir = match std::env::var_os("CLOUDSDK_CONFIG").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".config/gcloud"),
    };
    Some(dir.join("application_default_credentials.json"))
}

/// The DER bytes of a `-----BEGIN PRIVATE KEY-----` (PKCS#8) PEM block.
fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
        .map(|key| key.secret_pkcs8_der().to_vec())
        .map_err(|e| format!("private_key is not a PEM \"BEGIN PRIVATE KEY\" block: {e}"))
}

/// Base64url without padding, as JWTs use.
fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A self-signed service-account JWT for `audience`, valid from `now` for
/// an hour: `header.claims.signature`, RS256.
pub fn self_signed_jwt(
    email: &str,
    key_id: &str,
    key: &RsaKeyPair,
    audience: &str,
    now: u64,
) -> Result<String, String> {
    let header = serde_json::json!({ "alg": "RS256", "typ": "JWT", "kid": key_id });
    let claims = serde_json::json!({
        "iss": email,
        "sub": email,
        "aud": audience,
        "iat": now,
        "exp": now + JWT_LIFETIME.as_secs(),
    });
    let signing_input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| "RSA signing failed".to_owned())?;
    Ok(format!("{signing_input}.{}", b64url(&signature)))
}

/// A cached `authorization` header value and when it must be renewed.
struct Cached {
    header: String,
    renew_at: SystemTime,
}

/// Hands out `authorization` header values, cached until shortly before expiry.
pub struct TokenSource {
    credentials: Credentials,
    cached: Mutex<Option<Cached>>,
}

/// An OAuth token answer.
#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: u64,
}

impl TokenSource {
    /// A token source over `credentials`.
    pub fn new(credentials: Credentials) -> TokenSource {
        TokenSource { credentials, cached: Mutex::new(None) }
    }

    /// The credentials, for tests.
    #[cfg(test)]
    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// The project to bill (`x-goog-user-project`), only when the
    /// credentials file names one: sending it otherwise would need
    /// `serviceusage.services.use` on that project.
    pub fn quota_project(&self) -> Option<&str> {
        match &self.credentials {
            Credentials::AuthorizedUser { quota_project, .. } => quota_project.as_deref(),
            _ => None,
        }
    }

    /// `Bearer <token>`, or `None` for the emulator. Err (transient) when no
    /// token could be had; the message says where it was asked.
    pub async fn authorization(&self, http: &Http) -> Result<Option<String>, String> {
        if matches!(self.credentials, Credentials::None) {
            return Ok(None);
        }
        // One renewal at a time: concurrent requests wait for it instead of all asking.
        let mut cached = self.cached.lock().await;
        let now = SystemTime::now();
        if let Some(c) = cached.as_ref().filter(|c| c.renew_at > now) {
            return Ok(Some(c.header.clone()));
        }
        let (token, lifetime) = self.fetch(http).await?;
        let header = format!("Bearer {token}");
        let renew_at = now + lifetime.saturating_sub(RENEW_BEFORE).max(Duration::from_secs(30));
        *cached = Some(Cached { header: header.clone(), renew_at });
        Ok(Some(header))
    }

    /// Drops the cached token (after a 401).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch(&self, http: &Http) -> Result<(String, Duration), String> {
        match &self.credentials {
            Credentials::None => Ok((String::new(), Duration::from_secs(u64::MAX / 4))),
            Credentials::ServiceAccount { email, key_id, key } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                let jwt = self_signed_jwt(email, key_id, key, PUBSUB_AUDIENCE, now)?;
                Ok((jwt, JWT_LIFETIME))
            }
            Credentials::AuthorizedUser { client_id, client_secret, refresh_token, token_uri, .. } => {
                let body = form(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id),
                    ("client_secret", client_secret),
                    ("refresh_token", refresh_token),
                    ("scope", SCOPE),
                ]);
                let response = http
                    .send(
                        Method::POST,
                        token_uri,
                        &[("content-type", "application/x-www-form-urlencoded")],
                        body.into_bytes(),
                        TOKEN_TIMEOUT,
                    )
                    .await
                    .map_err(|e| format!("token endpoint {token_uri}: {e}"))?;
                parse_token(&response, &format!("token endpoint {token_uri}"))
            }
            Credentials::Metadata { host } => {
                let url =
                    format!("http://{host}/computeMetadata/v1/instance/service-accounts/default/token?scopes={SCOPE}");
                let response = http
                    .send(Method::GET, &url, &[("metadata-flavor", "Google")], Vec::new(), TOKEN_TIMEOUT)
                    .await
                    .map_err(|e| {
                        format!(
                            "no Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS and sink.pubsub.credentials_file \
                             are unset and the metadata server did not answer ({e}); outside GCE/GKE set one of them, \
                             on GKE enable Workload Identity for the pod's service account"
                        )
                    })?;
                parse_token(&response, &format!("metadata server {host}"))
            }
        }
    }
}

fn parse_token(response: &super::client::Response, origin: &str) -> Result<(String, Duration), String> {
    if response.status != 200 {
        let body: String = String::from_utf8_lossy(&response.body).chars().take(300).collect();
        return Err(format!("{origin} answered {}: {body}", response.status));
    }
    let token: TokenResponse =
        serde_json::from_slice(&response.body).map_err(|e| format!("{origin}: answer without access_token: {e}"))?;
    let lifetime = if token.expires_in == 0 { Duration::from_secs(300) } else { Duration::from_secs(token.expires_in) };
    Ok((token.access_token, lifetime))
}

/// What a form value keeps as is (RFC 3986 unreserved); everything else
/// is percent-encoded, which every form decoder accepts.
const FORM_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// `application/x-www-form-urlencoded` body.
fn form(pairs: &[(&str, &str)]) -> String {
    let pairs = pairs.iter().map(|(name, value)| {
        format!("{}={}", utf8_percent_encode(name, FORM_VALUE), utf8_percent_encode(value, FORM_VALUE))
    });
    pairs.collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair as _;

    /// A throwaway 2048-bit RSA key (PKCS#8), generated for these tests only.
    const TEST_KEY: &str = include_str!("testdata/test-key.pem");

    fn service_account_json() -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "my-proj",
            "private_key_id": "kid-1",
            "private_key": TEST_KEY,
            "client_email": "relay@my-proj.iam.gserviceaccount.com",
            "token_uri": "https://oauth2.googleapis.com/token",
        })
        .to_string()
    }

    #[test]
    fn service_account_jwt_is_rs256_with_pubsub_audience_and_verifies() {
        let Credentials::ServiceAccount { email, key_id, key } =
            Credentials::from_json(&service_account_json()).unwrap()
        else {
            panic!("not a service account");
        };
        let jwt = self_signed_jwt(&email, &key_id, &key, PUBSUB_AUDIENCE, 1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(s).unwrap();
        let header: serde_json::Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "kid-1"}));
        let claims: serde_json::Value = serde_json::from_slice(&decode(parts[1])).unwrap();
        assert_eq!(claims["iss"], "relay@my-proj.iam.gserviceaccount.com");
        assert_eq!(claims["sub"], claims["iss"]);
        assert_eq!(claims["aud"], "https://pubsub.googleapis.com/");
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 3600);
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.public_key().as_ref().to_vec(),
        );
        public
            .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &decode(parts[2]))
            .expect("signature verifies with the key's public half");
    }

    #[test]
    fn credentials_files_are_recognised_or_rejected_clearly() {
        let user = r#"{"type":"authorized_user","client_id":"c","client_secret":"s","refresh_token":"r","quota_project_id":"billing-proj"}"#;
        let source = TokenSource::new(Credentials::from_json(user).unwrap());
        assert_eq!(source.quota_project(), Some("billing-proj"));
        match source.credentials() {
            Credentials::AuthorizedUser { token_uri, .. } => assert_eq!(token_uri, DEFAULT_TOKEN_URI),
            other => panic!("{other:?}"),
        }
        let err = Credentials::from_json(r#"{"type":"external_account"}"#).unwrap_err();
        assert!(err.contains("\"external_account\" are not supported"), "{err}");
        let err = Credentials::from_json("not json").unwrap_err();
        assert!(err.contains("not a Google credentials JSON file"), "{err}");
        let broken = service_account_json().replace("MII", "MIX");
        assert!(Credentials::from_json(&broken).is_err());
        let err =
            Credentials::from_file(Path::new("/nonexistent/key.json"), "sink.pubsub.credentials_file").unwrap_err();
        assert!(err.0.starts_with("sink.pubsub.credentials_file: /nonexistent/key.json: cannot read it"), "{err}");
        assert!(matches!(Credentials::discover(true, Some(Path::new("/nonexistent"))), Ok(Credentials::None)));
    }

    #[test]
    fn form_encoding_escapes_reserved_characters() {
        assert_eq!(form(&[("a", "1/2+3"), ("b", "x y")]), "a=1%2F2%2B3&b=x%20y");
    }

    #[tokio::test]
    async fn metadata_server_tokens_are_fetched_with_the_flavor_header_and_cached() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A fake metadata server on loopback that counts requests.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = vec![0u8; 4096];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let text = String::from_utf8_lossy(&request[..n]).to_ascii_lowercase();
                let ok = text.contains("metadata-flavor: google") && text.contains("/service-accounts/default/token");
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let body =
                    if ok { r#"{"access_token":"ya29.test","expires_in":3599,"token_type":"Bearer"}"# } else { "{}" };
                let status = if ok { "200 OK" } else { "403 Forbidden" };
                let response =
                    format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = socket.write_all(response.as_bytes()).await;
            }
        });
        let source = TokenSource::new(Credentials::Metadata { host });
        let http = Http::new().unwrap();
        assert_eq!(source.authorization(&http).await.unwrap().as_deref(), Some("Bearer ya29.test"));
        assert_eq!(source.authorization(&http).await.unwrap().as_deref(), Some("Bearer ya29.test"));
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1, "second call is served from the cache");
        source.invalidate().await;
        source.authorization(&http).await.unwrap();
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2, "invalidate forces a new token");
    }

    #[tokio::test]
    async fn unreachable_metadata_server_says_how_to_configure_credentials() {
        let source = TokenSource::new(Credentials::Metadata { host: "127.0.0.1:9".into() });
        let err = source.authorization(&Http::new().unwrap()).await.unwrap_err();
        assert!(err.contains("GOOGLE_APPLICATION_CREDENTIALS") && err.contains("Workload Identity"), "{err}");
    }
}
