//! sslmode policy: which `sslmode` the `[postgres]` keys and the URL ask
//! for, what that means for the server certificate (the table in the
//! [module docs](super)), and the rustls client configuration built from
//! it, certificate files read and checked with messages that name the key
//! to fix.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::connection_string::split_connection_string;
use super::verifier::Verifier;
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
            "allow" => Err(format!("\"allow\" is not supported (it prefers plaintext): use one of {SSLMODES}")),
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
pub(super) enum Check {
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
        (None, Some(mode)) => {
            SslMode::parse(mode).map_err(|p| config_error("postgres.url", format!("has sslmode {p}")))?
        }
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
        let provider = super::provider();
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

fn read_certificates(
    path: &Path,
    key: &'static str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| config_error(key, format!("{}: cannot read the {what}: {e}", path.display())))?;
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

fn read_private_key(
    path: &Path,
    key: &'static str,
    sslpassword: bool,
) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| config_error(key, format!("{}: cannot read the private key: {e}", path.display())))?;
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
        config_error(key, format!("{}: no PEM private key found (PKCS#8, RSA or EC): {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres(url: &str) -> PostgresConfig {
        PostgresConfig { url: url.into(), ..PostgresConfig::default() }
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
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
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
}
