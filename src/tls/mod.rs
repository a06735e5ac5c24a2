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
//!
//! # Layout
//!
//! - [`connection_string`]: libpq URL and key=value parsing; takes the TLS
//!   parameters out.
//! - [`policy`]: `sslmode` and the `[postgres]` keys resolved into
//!   [`TlsSettings`], and the rustls configuration loaded from them.
//! - [`verifier`]: the certificate checks each mode makes.
//! - [`channel_binding`]: `tls-server-end-point` data for SCRAM.
//! - [`explain`](mod@explain): a TLS failure worded for the operator.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub mod channel_binding;
pub mod connection_string;
pub mod explain;
pub mod policy;
pub mod verifier;

pub use channel_binding::tls_server_end_point;
pub use connection_string::{split_connection_string, UrlTls};
pub use explain::explain;
pub use policy::{resolve, Roots, SslMode, TlsConfigError, TlsSettings, SSLMODES};
pub use verifier::CertificateProblem;

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
