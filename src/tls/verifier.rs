//! The certificate verifier: libpq's checks over rustls, refusing with a
//! message that names the host, the mode and the fix.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::policy::Check;

/// libpq's certificate checks, with messages that name the host, the mode
/// and the fix. The handshake signature is verified in every mode.
#[derive(Debug)]
pub(super) struct Verifier {
    pub(super) check: Check,
    pub(super) roots: Option<Arc<RootCertStore>>,
    /// The root file's certificates: a server certificate identical to one
    /// of them is trusted (self-signed servers, as OpenSSL allows).
    pub(super) pinned: Vec<CertificateDer<'static>>,
    pub(super) roots_label: String,
    pub(super) label: String,
    pub(super) algorithms: WebPkiSupportedAlgorithms,
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

pub(super) fn refuse(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(CertificateProblem(
        message,
    )))))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webpki_names_are_shown_plainly() {
        assert_eq!(pretty_name("DnsName(\"localhost\")").as_deref(), Some("localhost"));
        assert_eq!(pretty_name("IpAddress(127.0.0.1)").as_deref(), Some("127.0.0.1"));
        assert_eq!(pretty_name("DirectoryName"), None);
    }
}
