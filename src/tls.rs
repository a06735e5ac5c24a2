//! TLS for every Postgres connection: the tokio-postgres ones (polling,
//! marking, `check`, `migrate`, ...) and the replication wire client.
//!
//! libpq's `sslmode` semantics over rustls (ring provider, nothing else
//! compiled in):
//!
//! | sslmode       | TLS                          | certificate checked                        |
//! |---------------|------------------------------|--------------------------------------------|
//! | `disable`     | never                        | -                                          |
//! | `prefer`      | if the server offers it      | no (chain only if `sslrootcert` is a file) |
//! | `require`     | always                       | no (chain only if `sslrootcert` is a file) |
//! | `verify-ca`   | always                       | chain, not the host name                   |
//! | `verify-full` | always                       | chain and host name                        |
//!
//! The handshake signature is always verified, so even `require` talks to
//! the holder of the certificate's key. A `verify-*` mode without
//! `sslrootcert` trusts the operating system's store (rustls-native-certs:
//! `/etc/ssl/certs`, `SSL_CERT_FILE`, `SSL_CERT_DIR`); `sslrootcert=system`
//! says so explicitly and, as in libpq, then defaults to `verify-full`.
//!
//! Users paste libpq URLs, but tokio-postgres only knows
//! `sslmode=disable|prefer|require` and rejects `sslrootcert` & co, so
//! [`split_connection_string`] takes the TLS parameters out of `postgres.url`
//! (URL or key=value form) before tokio-postgres sees it. The `[postgres]`
//! keys `sslmode`, `sslrootcert`, `sslcert`, `sslkey` win over the URL's.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::PostgresConfig;

/// The `sslmode` values the relay accepts, for error messages.
pub const SSLMODES: &str = "disable, prefer, require, verify-ca, verify-full";

/// libpq's `sslmode` (without `allow`, which prefers plaintext).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// TLS if the server offers it, else plaintext. The default.
    Prefer,
    /// TLS, certificate not verified.
    Require,
    /// TLS, certificate chain verified, host name not.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    /// Parses a libpq spelling; the error says which values exist.
    pub fn parse(value: &str) -> Result<SslMode, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            "allow" => Err(format!(
                "\"allow\" is not supported (it prefers plaintext): use one of {SSLMODES}"
            )),
            other => Err(format!("\"{other}\" is not a valid sslmode: use one of {SSLMODES}")),
        }
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS parameters taken out of a connection string (raw values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UrlTls {
    /// `sslmode`.
    pub sslmode: Option<String>,
    /// `sslrootcert`: a PEM file, or `system`.
    pub sslrootcert: Option<String>,
    /// `sslcert`: the client certificate (PEM).
    pub sslcert: Option<String>,
    /// `sslkey`: the client certificate's private key (PEM).
    pub sslkey: Option<String>,
    /// `sslpassword` was given (its value is dropped: rustls cannot decrypt keys).
    pub sslpassword: bool,
}

impl UrlTls {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            "sslpassword" => {
                self.sslpassword = true;
                return true;
            }
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits a libpq connection string (URL or key=value) into the string
/// tokio-postgres can parse and the TLS parameters it cannot. Other
/// parameters are kept verbatim. The error never quotes the input (it may
/// hold a password).
pub fn split_connection_string(input: &str) -> Result<(String, UrlTls), String> {
    if input.starts_with("postgres://") || input.starts_with("postgresql://") {
        split_url(input)
    } else {
        split_key_values(input)
    }
}

fn split_url(input: &str) -> Result<(String, UrlTls), String> {
    let scheme_end = input.find("://").map(|i| i + 3).unwrap_or(0);
    // Credentials end at an '@' before the first '/' (as libpq reads it), so
    // a '?' in a password is not the start of the query.
    let authority_end = input[scheme_end..].find('/').map(|i| i + scheme_end).unwrap_or(input.len());
    let after_credentials = input[scheme_end..authority_end].rfind('@').map(|i| i + scheme_end + 1).unwrap_or(scheme_end);
    let Some(query_start) = input[after_credentials..].find('?').map(|i| i + after_credentials) else {
        return Ok((input.to_owned(), UrlTls::default()));
    };
    let mut tls = UrlTls::default();
    let mut kept = Vec::new();
    for pair in input[query_start + 1..].split('&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key)?;
        if !tls.take(&key, percent_decode(value)?) {
            kept.push(pair);
        }
    }
    let base = &input[..query_start];
    let rest = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    Ok((rest, tls))
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let byte = hex
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("has an invalid percent-encoding in its parameters")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "has a parameter that is not UTF-8 after percent-decoding".to_owned())
}

/// libpq key=value syntax: `key = value`, values optionally in single
/// quotes, backslash escapes.
fn split_key_values(input: &str) -> Result<(String, UrlTls), String> {
    let bytes = input.as_bytes();
    let mut tls = UrlTls::default();
    let mut kept: Vec<&str> = Vec::new();
    let mut i = 0;
    let skip_space = |mut i: usize| {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_space(i);
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = &input[start..i];
        i = skip_space(i);
        if i >= bytes.len() || bytes[i] != b'=' || key.is_empty() {
            return Err("is not a valid connection string (expected key=value pairs)".into());
        }
        i = skip_space(i + 1);
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            loop {
                match bytes.get(i) {
                    None => return Err("has an unterminated quoted value".into()),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < bytes.len() => {
                        value.push(bytes[i + 1]);
                        i += 2;
                    }
                    Some(&b) => {
                        value.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| "has a value that is not UTF-8".to_owned())?;
        if !tls.take(key, value) {
            kept.push(&input[start..i]);
        }
    }
    Ok((kept.join(" "), tls))
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The operating system's trust store (rustls-native-certs).
    System,
    /// A PEM file of one or more CA certificates (or the server's own
    /// self-signed certificate).
    File(PathBuf),
}

/// How much of the server certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    Nothing,
    Chain,
    ChainAndName,
}

/// A value and the configuration key it came from (for error messages).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sourced<T> {
    value: T,
    key: &'static str,
}

/// The TLS settings of `[postgres]`, resolved: config keys over URL
/// parameters over defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The effective sslmode.
    pub mode: SslMode,
    roots: Option<Sourced<Roots>>,
    client: Option<(Sourced<PathBuf>, Sourced<PathBuf>)>,
    sslpassword: bool,
}

/// A TLS setting that cannot work; `key` is the configuration key to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {problem}")]
pub struct TlsConfigError {
    /// `postgres.sslmode`, `postgres.url`, ...
    pub key: &'static str,
    /// What is wrong and how to fix it.
    pub problem: String,
}

fn config_error(key: &'static str, problem: impl Into<String>) -> TlsConfigError {
    TlsConfigError { key, problem: problem.into() }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn non_empty_path(value: &Option<PathBuf>) -> Option<&Path> {
    value.as_deref().filter(|p| !p.as_os_str().is_empty())
}

/// Resolves `postgres.url` and the `[postgres]` TLS keys: returns the
/// connection string for tokio-postgres (TLS parameters removed) and the
/// settings. Does not read any file (see [`TlsSettings::load`]).
pub fn resolve(config: &PostgresConfig) -> Result<(String, TlsSettings), TlsConfigError> {
    let (rest, url) = split_connection_string(&config.url).map_err(|problem| config_error("postgres.url", problem))?;
    let pick_path = |key: &'static str, from_config: &Option<PathBuf>, from_url: &Option<String>| {
        non_empty_path(from_config)
            .map(|p| Sourced { value: p.to_path_buf(), key })
            .or_else(|| non_empty(from_url).map(|p| Sourced { value: PathBuf::from(p), key: "postgres.url" }))
    };
    let roots = pick_path("postgres.sslrootcert", &config.sslrootcert, &url.sslrootcert).map(|s| Sourced {
        value: if s.value == Path::new("system") { Roots::System } else { Roots::File(s.value) },
        key: s.key,
    });
    let explicit_system = matches!(roots, Some(Sourced { value: Roots::System, .. }));
    let mode = match (non_empty(&config.sslmode), non_empty(&url.sslmode)) {
        (Some(mode), _) => SslMode::parse(mode).map_err(|p| config_error("postgres.sslmode", p))?,
        (None, Some(mode)) => SslMode::parse(mode).map_err(|p| config_error("postgres.url", format!("has sslmode {p}")))?,
        // libpq: sslrootcert=system makes verify-full the default.
        (None, None) if explicit_system => SslMode::VerifyFull,
        (None, None) => SslMode::Prefer,
    };
    if explicit_system && !matches!(mode, SslMode::VerifyFull | SslMode::VerifyCa | SslMode::Disable) {
        let key = roots.as_ref().map_or("postgres.sslrootcert", |r| r.key);
        return Err(config_error(
            key,
            format!("is \"system\", which needs sslmode verify-ca or verify-full (sslmode is {mode}): a weaker mode would not use it"),
        ));
    }
    let cert = pick_path("postgres.sslcert", &config.sslcert, &url.sslcert);
    let key = pick_path("postgres.sslkey", &config.sslkey, &url.sslkey);
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(config_error(
                "postgres.sslkey",
                format!(
                    "is not set, but a client certificate is ({}): set sslkey to the certificate's private key (PEM)",
                    cert.key
                ),
            ))
        }
        (None, Some(key)) => {
            return Err(config_error(
                "postgres.sslcert",
                format!("is not set, but a client key is ({}): set sslcert to the client certificate (PEM)", key.key),
            ))
        }
    };
    Ok((rest, TlsSettings { mode, roots, client, sslpassword: url.sslpassword }))
}

impl TlsSettings {
    /// Plaintext only (tests, tools).
    pub fn disabled() -> TlsSettings {
        TlsSettings { mode: SslMode::Disable, roots: None, client: None, sslpassword: false }
    }

    /// No verification (libpq's `prefer`/`require` without a root file).
    pub fn unverified(mode: SslMode) -> TlsSettings {
        TlsSettings { mode, roots: None, client: None, sslpassword: false }
    }

    fn check(&self) -> Check {
        match (self.mode, &self.roots) {
            (SslMode::Disable, _) => Check::Nothing,
            (SslMode::VerifyFull, _) => Check::ChainAndName,
            (SslMode::VerifyCa, _) => Check::Chain,
            // libpq: with a root certificate file, require (and prefer) check the chain.
            (SslMode::Prefer | SslMode::Require, Some(Sourced { value: Roots::File(_), .. })) => Check::Chain,
            (SslMode::Prefer | SslMode::Require, _) => Check::Nothing,
        }
    }

    /// Whether the server's certificate chain is verified.
    pub fn verifies_certificate(&self) -> bool {
        self.check() != Check::Nothing
    }

    /// `sslmode=verify-full`, or `sslmode=require with sslrootcert` when
    /// libpq's compatibility rule turns on chain checks.
    pub fn label(&self) -> String {
        match (self.mode, self.check()) {
            (SslMode::Prefer | SslMode::Require, Check::Chain) => format!("sslmode={} with sslrootcert", self.mode),
            (mode, _) => format!("sslmode={mode}"),
        }
    }

    /// Reads the certificate files and builds the client configuration;
    /// `None` for `disable`. Called at config load (to fail early) and at
    /// every connect (so rotated certificates are picked up).
    pub fn load(&self) -> Result<Option<Arc<ClientConfig>>, TlsConfigError> {
        if self.mode == SslMode::Disable {
            return Ok(None);
        }
        let provider = provider();
        let check = self.check();
        let (roots, pinned, roots_label) = if check == Check::Nothing {
            (None, Vec::new(), String::new())
        } else {
            match &self.roots {
                Some(Sourced { value: Roots::File(path), key }) => {
                    let certs = read_certificates(path, key, "CA certificate")?;
                    let mut store = RootCertStore::empty();
                    let (added, _) = store.add_parsable_certificates(certs.iter().cloned());
                    if added == 0 {
                        return Err(config_error(
                            key,
                            format!("{}: no usable CA certificate in the file (PEM, X.509 v3)", path.display()),
                        ));
                    }
                    (Some(Arc::new(store)), certs, format!("sslrootcert {}", path.display()))
                }
                _ => {
                    let store = system_roots().map_err(|problem| {
                        let key = self.roots.as_ref().map_or("postgres.sslrootcert", |r| r.key);
                        config_error(key, problem)
                    })?;
                    (Some(store), Vec::new(), "the system trust store".to_owned())
                }
            }
        };
        let verifier = Verifier {
            check,
            roots,
            pinned,
            roots_label,
            label: self.label(),
            algorithms: provider.signature_verification_algorithms,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| config_error("postgres.sslmode", format!("TLS set-up failed: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match &self.client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = read_certificates(&cert.value, cert.key, "client certificate")?;
                let private = read_private_key(&key.value, key.key, self.sslpassword)?;
                builder.with_client_auth_cert(chain, private).map_err(|e| {
                    config_error(key.key, format!("{}: does not fit the client certificate: {e}", key.value.display()))
                })?
            }
        };
        // What libpq 17 sends; servers before 17 ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// The one crypto provider: ring (builds without cmake or nasm). Also
/// installed as the process default, so nothing else picks another.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            // Err only if a default is installed already; ours is then unused by others.
            let _ = CryptoProvider::install_default((*provider).clone());
            provider
        })
        .clone()
}

/// The operating system's CA certificates, read once per process.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(|e| format!(" ({e})")).unwrap_or_default();
                return Err(format!(
                    "is not set and the system trust store has no CA certificates{why}: set sslrootcert to the CA \
                     certificate that signed the server's certificate, or install the ca-certificates package"
                ));
            }
            Ok(Arc::new(store))
        })
        .clone()
}

fn read_certificates(path: &Path, key: &'static str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = std::fs::read(path).map_err(|e| config_error(key, format!("{}: cannot read the {what}: {e}", path.display())))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| config_error(key, format!("{}: not a PEM {what} file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(config_error(
            key,
            format!("{}: no \"BEGIN CERTIFICATE\" block found (the {what} must be PEM)", path.display()),
        ));
    }
    Ok(certs)
}

fn read_private_key(path: &Path, key: &'static str, sslpassword: bool) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = std::fs::read(path).map_err(|e| config_error(key, format!("{}: cannot read the private key: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&pem);
    if text.contains("ENCRYPTED") {
        let why = if sslpassword { "sslpassword is not supported" } else { "no password can be given" };
        return Err(config_error(
            key,
            format!(
                "{}: the private key is encrypted and {why} (rustls reads only plain keys): decrypt it once with \
                 `openssl pkey -in KEY -out KEY.plain` and protect that file (mode 0600)",
                path.display()
            ),
        ));
    }
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        config_error(
            key,
            format!("{}: no PEM private key found (PKCS#8, RSA or EC): {e}", path.display()),
        )
    })
}

/// `tls-server-end-point` channel binding data (RFC 5929 section 4.1): the
/// server certificate hashed with its signature's hash (MD5 and SHA-1 are
/// upgraded to SHA-256). `None` for other algorithms (e.g. Ed25519, RSA-PSS),
/// which then authenticate with plain SCRAM-SHA-256, as tokio-postgres does.
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
    let (0x30, fields, _) = der_element(certificate)? else { return None };
    let (0x30, _, after_tbs) = der_element(fields)? else { return None };
    let (0x30, algorithm, _) = der_element(after_tbs)? else { return None };
    let (0x06, oid, _) = der_element(algorithm)? else { return None };
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01]; // 1.2.840.113549.1.1
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03]; // 1.2.840.10045.4.3
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01]; // 1.2.840.10045.4.1
    let digest = match oid {
        [rsa @ .., 0x04 | 0x05 | 0x0b] if rsa == RSA => &ring::digest::SHA256,
        [rsa @ .., 0x0c] if rsa == RSA => &ring::digest::SHA384,
        [rsa @ .., 0x0d] if rsa == RSA => &ring::digest::SHA512,
        [ec @ .., 0x02] if ec == ECDSA_SHA2 => &ring::digest::SHA256,
        [ec @ .., 0x03] if ec == ECDSA_SHA2 => &ring::digest::SHA384,
        [ec @ .., 0x04] if ec == ECDSA_SHA2 => &ring::digest::SHA512,
        ec if ec == ECDSA_SHA1 => &ring::digest::SHA256,
        _ => return None,
    };
    Some(ring::digest::digest(digest, certificate).as_ref().to_vec())
}

/// One DER element: (tag, contents, what follows).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let count = (first & 0x7f) as usize;
        if count == 0 || count > 4 {
            return None;
        }
        let (bytes, rest) = rest.split_at_checked(count)?;
        (bytes.iter().fold(0usize, |n, &b| (n << 8) | b as usize), rest)
    };
    let (contents, rest) = rest.split_at_checked(length)?;
    Some((tag, contents, rest))
}

/// libpq's certificate checks, with messages that name the host, the mode
/// and the fix. The handshake signature is verified in every mode.
#[derive(Debug)]
struct Verifier {
    check: Check,
    roots: Option<Arc<RootCertStore>>,
    /// The root file's certificates: a server certificate identical to one
    /// of them is trusted (self-signed servers, as OpenSSL allows).
    pinned: Vec<CertificateDer<'static>>,
    roots_label: String,
    label: String,
    algorithms: WebPkiSupportedAlgorithms,
}

/// A certificate the relay refuses, explained. Carried inside
/// `rustls::Error::InvalidCertificate(CertificateError::Other(..))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateProblem(pub String);

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CertificateProblem {}

fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(CertificateProblem(message)))))
}

/// `DnsName("db")` / `IpAddress(10.0.0.1)` (webpki's spelling) -> `db` / `10.0.0.1`.
fn pretty_name(presented: &str) -> Option<String> {
    if let Some(dns) = presented.strip_prefix("DnsName(\"").and_then(|s| s.strip_suffix("\")")) {
        return Some(dns.to_owned());
    }
    presented.strip_prefix("IpAddress(").and_then(|s| s.strip_suffix(')')).map(str::to_owned)
}

impl Verifier {
    fn chain_error(&self, host: &str, error: rustls::Error) -> rustls::Error {
        let (label, roots) = (&self.label, &self.roots_label);
        let message = match &error {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => format!(
                "the certificate of {host} is not signed by a CA in {roots} ({label}): set sslrootcert to the CA \
                 certificate that issued the server's certificate"
            ),
            rustls::Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
                format!("the certificate of {host} has expired ({label}): renew the server's certificate ({error})")
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => format!("the certificate of {host} is not valid yet ({label}): check the clocks ({error})"),
            _ => format!("the certificate of {host} was refused ({label}, roots from {roots}): {error}"),
        };
        refuse(message)
    }

    fn name_error(&self, host: &str, error: rustls::Error) -> rustls::Error {
        let label = &self.label;
        let message = match &error {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { presented, .. }) => {
                let names: Vec<String> = presented.iter().filter_map(|p| pretty_name(p)).collect();
                if names.is_empty() {
                    format!(
                        "the certificate of {host} names no host in its subjectAltName extension ({label}; the common \
                         name is not used): reissue it with subjectAltName DNS:{host}, or use sslmode=verify-ca"
                    )
                } else {
                    format!(
                        "certificate for {} is not valid for host {host} ({label}): use the host name in the \
                         certificate, or sslmode=verify-ca",
                        names.join(", ")
                    )
                }
            }
            _ => format!(
                "the certificate is not valid for host {host} ({label}): use the host name in the certificate, or \
                 sslmode=verify-ca ({error})"
            ),
        };
        refuse(message)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = self.roots.as_deref().filter(|_| self.check != Check::Nothing) else {
            return Ok(ServerCertVerified::assertion());
        };
        let host = server_name.to_str();
        let cert = ParsedCertificate::try_from(end_entity)
            .map_err(|e| refuse(format!("the certificate of {host} cannot be parsed ({}): {e}", self.label)))?;
        let pinned = self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref());
        if !pinned {
            verify_server_cert_signed_by_trust_anchor(&cert, roots, intermediates, now, self.algorithms.all)
                .map_err(|e| self.chain_error(&host, e))?;
        }
        if self.check == Check::ChainAndName {
            verify_server_name(&cert, server_name).map_err(|e| self.name_error(&host, e))?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An operator-worded message for a TLS failure anywhere in `error`'s
/// source chain (a refused certificate, an alert from the server), or None
/// if TLS is not what failed.
pub fn explain(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(message) = explain_one(e) {
            return Some(message);
        }
        // io::Error::source() skips the wrapped error itself: look inside.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(message) = explain(inner) {
                return Some(message);
            }
        }
        current = e.source();
    }
    None
}

fn explain_one(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    if let Some(problem) = error.downcast_ref::<CertificateProblem>() {
        return Some(problem.0.clone());
    }
    let error = error.downcast_ref::<rustls::Error>()?;
    Some(match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
            let inner: &(dyn std::error::Error + 'static) = &*other.0;
            match inner.downcast_ref::<CertificateProblem>() {
                Some(problem) => problem.0.clone(),
                None => format!("TLS: {error}"),
            }
        }
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => format!(
            "the server refused the TLS connection ({alert:?}): it asks for a client certificate it trusts; set sslcert \
             and sslkey to a certificate signed by a CA in the server's ssl_ca_file"
        ),
        rustls::Error::AlertReceived(alert @ (AlertDescription::HandshakeFailure | AlertDescription::ProtocolVersion)) => {
            format!(
                "the TLS handshake failed ({alert:?}): the server and the relay share no TLS version or cipher suite \
                 (the relay speaks TLS 1.2 and 1.3)"
            )
        }
        other => format!("TLS handshake failed: {other}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> (String, UrlTls) {
        split_connection_string(s).unwrap()
    }

    fn postgres(url: &str) -> PostgresConfig {
        PostgresConfig { url: url.into(), ..PostgresConfig::default() }
    }

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "postgres://relay:s3cret@db.internal:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&sslcert=/c.pem&sslkey=/k.pem&sslpassword=pw",
        );
        assert_eq!(rest, "postgres://relay:s3cret@db.internal:5432/app?application_name=x&connect_timeout=5");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(tls.sslcert.as_deref(), Some("/c.pem"));
        assert_eq!(tls.sslkey.as_deref(), Some("/k.pem"));
        assert!(tls.sslpassword);
        assert!(rest.parse::<tokio_postgres::Config>().is_ok());
    }

    #[test]
    fn url_without_query_or_tls_is_unchanged() {
        for url in ["postgres://a@b/c", "postgresql://a@b:1/c?connect_timeout=3", "postgres://u:p%3Fx@h/db"] {
            assert_eq!(split(url), (url.to_owned(), UrlTls::default()), "{url}");
        }
        let (rest, tls) = split("postgres://u:pa?ss@h/db?sslmode=require");
        assert_eq!(rest, "postgres://u:pa?ss@h/db");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
        let (rest, tls) = split("postgres://h?sslmode=disable");
        assert_eq!((rest.as_str(), tls.sslmode.as_deref()), ("postgres://h", Some("disable")));
    }

    #[test]
    fn key_value_form_is_split_too() {
        let (rest, tls) = split("host=db port=5432 sslmode = verify-ca sslrootcert='/etc/my ca.pem' user=relay password='it\\'s'");
        assert_eq!(rest, "host=db port=5432 user=relay password='it\\'s'");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/my ca.pem"));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_password(), Some(&b"it's"[..]));
        assert!(split_connection_string("host=db sslmode").is_err());
    }

    #[test]
    fn errors_never_quote_the_connection_string() {
        let err = split_connection_string("postgres://u:s3cret@h/db?sslrootcert=%zz").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn sslmodes_parse_like_libpq_and_unknown_ones_list_the_allowed() {
        for (text, mode) in [
            ("disable", SslMode::Disable),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(SslMode::parse(text), Ok(mode));
            assert_eq!(mode.as_str(), text);
        }
        let err = SslMode::parse("verify_full").unwrap_err();
        assert!(err.contains(SSLMODES), "{err}");
        assert!(SslMode::parse("allow").unwrap_err().contains("not supported"));
    }

    #[test]
    fn default_is_prefer_and_config_keys_win_over_the_url() {
        let (_, s) = resolve(&postgres("postgres://a@b/c")).unwrap();
        assert_eq!(s.mode, SslMode::Prefer);
        assert!(!s.verifies_certificate());

        let mut c = postgres("postgres://a@b/c?sslmode=require&sslrootcert=/url-ca.pem");
        let (rest, s) = resolve(&c).unwrap();
        assert_eq!(rest, "postgres://a@b/c");
        assert_eq!(s.mode, SslMode::Require);
        assert_eq!(s.roots.as_ref().unwrap().value, Roots::File("/url-ca.pem".into()));
        assert_eq!(s.label(), "sslmode=require with sslrootcert", "libpq: require + root file checks the chain");

        c.sslmode = Some("verify-full".into());
        c.sslrootcert = Some("/key-ca.pem".into());
        let (_, s) = resolve(&c).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.roots.unwrap(), Sourced { value: Roots::File("/key-ca.pem".into()), key: "postgres.sslrootcert" });

        c.sslmode = Some(String::new());
        assert_eq!(resolve(&c).unwrap().1.mode, SslMode::Require, "an empty key is unset");
    }

    #[test]
    fn verify_modes_without_root_cert_use_the_system_store() {
        let (_, s) = resolve(&postgres("postgres://a@b/c?sslmode=verify-ca")).unwrap();
        assert_eq!((s.mode, s.roots.clone()), (SslMode::VerifyCa, None));
        assert!(s.verifies_certificate());
        let (_, s) = resolve(&postgres("postgres://a@b/c?sslrootcert=system")).unwrap();
        assert_eq!(s.mode, SslMode::VerifyFull, "libpq: sslrootcert=system defaults to verify-full");
        let err = resolve(&postgres("postgres://a@b/c?sslrootcert=system&sslmode=require")).unwrap_err();
        assert_eq!(err.key, "postgres.url");
    }

    #[test]
    fn bad_modes_and_half_client_certificates_name_the_key() {
        let mut c = postgres("postgres://a@b/c");
        c.sslmode = Some("verify".into());
        let err = resolve(&c).unwrap_err();
        assert_eq!(err.key, "postgres.sslmode");
        assert!(err.to_string().contains("postgres.sslmode") && err.problem.contains(SSLMODES), "{err}");

        let err = resolve(&postgres("postgres://a@b/c?sslmode=verify")).unwrap_err();
        assert_eq!(err.key, "postgres.url");
        assert!(err.problem.contains(SSLMODES), "{err}");

        let mut c = postgres("postgres://a@b/c");
        c.sslcert = Some("/client.pem".into());
        let err = resolve(&c).unwrap_err();
        assert_eq!(err.key, "postgres.sslkey");
        let err = resolve(&postgres("postgres://a@b/c?sslkey=/k.pem")).unwrap_err();
        assert_eq!(err.key, "postgres.sslcert");
    }

    #[test]
    fn missing_files_are_reported_with_their_key() {
        let mut c = postgres("postgres://a@b/c?sslmode=verify-full");
        c.sslrootcert = Some("/nonexistent/ca.pem".into());
        let err = resolve(&c).unwrap().1.load().unwrap_err();
        assert_eq!(err.key, "postgres.sslrootcert");
        assert!(err.problem.contains("/nonexistent/ca.pem"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        c.sslrootcert = Some(not_pem);
        let err = resolve(&c).unwrap().1.load().unwrap_err();
        assert!(err.problem.contains("BEGIN CERTIFICATE"), "{err}");

        let encrypted = dir.path().join("key.pem");
        std::fs::write(&encrypted, "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n").unwrap();
        let err = read_private_key(&encrypted, "postgres.sslkey", true).unwrap_err();
        assert!(err.problem.contains("encrypted") && err.problem.contains("sslpassword"), "{err}");
    }

    #[test]
    fn prefer_and_require_build_without_any_file() {
        for mode in [SslMode::Prefer, SslMode::Require] {
            let config = TlsSettings::unverified(mode).load().unwrap().unwrap();
            assert_eq!(config.alpn_protocols, vec![b"postgresql".to_vec()]);
        }
        assert!(TlsSettings::disabled().load().unwrap().is_none());
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        // A skeleton certificate: SEQUENCE { SEQUENCE {} (tbs), SEQUENCE { OID }, BIT STRING }.
        let cert = |oid: &[u8]| {
            let mut algorithm = vec![0x06, oid.len() as u8];
            algorithm.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, algorithm.len() as u8];
            body.extend_from_slice(&algorithm);
            body.extend_from_slice(&[0x03, 0x01, 0x00]);
            let mut der = vec![0x30, body.len() as u8];
            der.extend_from_slice(&body);
            der
        };
        let sha256_rsa = cert(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b]);
        let hash = tls_server_end_point(&sha256_rsa).unwrap();
        assert_eq!(hash, ring::digest::digest(&ring::digest::SHA256, &sha256_rsa).as_ref());
        let ecdsa_sha384 = cert(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]);
        assert_eq!(tls_server_end_point(&ecdsa_sha384).unwrap().len(), 48);
        let ed25519 = cert(&[0x2b, 0x65, 0x70]);
        assert_eq!(tls_server_end_point(&ed25519), None);
        assert_eq!(tls_server_end_point(&sha256_rsa[..5]), None, "truncated");
    }

    #[test]
    fn webpki_names_are_shown_plainly() {
        assert_eq!(pretty_name("DnsName(\"localhost\")").as_deref(), Some("localhost"));
        assert_eq!(pretty_name("IpAddress(127.0.0.1)").as_deref(), Some("127.0.0.1"));
        assert_eq!(pretty_name("DirectoryName"), None);
    }

    #[test]
    fn refused_certificates_explain_themselves_through_io_errors() {
        let rustls_error = refuse("certificate for localhost is not valid for host 127.0.0.1".into());
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        assert_eq!(explain(&io).as_deref(), Some("certificate for localhost is not valid for host 127.0.0.1"));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain(&plain), None);
    }
}
