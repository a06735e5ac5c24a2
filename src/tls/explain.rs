//! Error explanations: a TLS failure found anywhere in an error's source
//! chain, worded for the operator (what was refused, and what to change).

use rustls::{AlertDescription, CertificateError};

use super::verifier::CertificateProblem;

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
    use crate::tls::verifier::refuse;

    #[test]
    fn refused_certificates_explain_themselves_through_io_errors() {
        let rustls_error = refuse("certificate for localhost is not valid for host 127.0.0.1".into());
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_error);
        assert_eq!(explain(&io).as_deref(), Some("certificate for localhost is not valid for host 127.0.0.1"));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(explain(&plain), None);
    }
}
