//! `tls-server-end-point` channel binding (RFC 5929 section 4.1) for SCRAM
//! over TLS: the server certificate hashed with the hash of its signature
//! algorithm. The certificate is decoded by `x509-cert` (already in the
//! tree through tokio-postgres-rustls, which does the same for the
//! tokio-postgres connections) and its algorithm named by `const-oid`'s
//! registry; only the hashing (ring) and the algorithm table are ours.

use x509_cert::der::oid::db::rfc5912::{
    ECDSA_WITH_SHA_256, ECDSA_WITH_SHA_384, ECDSA_WITH_SHA_512, MD_5_WITH_RSA_ENCRYPTION, SHA_1_WITH_RSA_ENCRYPTION,
    SHA_256_WITH_RSA_ENCRYPTION, SHA_384_WITH_RSA_ENCRYPTION, SHA_512_WITH_RSA_ENCRYPTION,
};
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::Decode as _;
use x509_cert::Certificate;

/// `ecdsa-with-SHA1` (1.2.840.10045.4.1), which `const-oid`'s RFC 5912
/// table does not list.
const ECDSA_WITH_SHA_1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.1");

/// `tls-server-end-point` channel binding data: the server certificate
/// (DER) hashed with its signature's hash, MD5 and SHA-1 upgraded to
/// SHA-256 as the RFC says. `None` for a certificate that does not decode
/// or whose algorithm names no such hash (Ed25519, RSA-PSS): the connection
/// then authenticates with plain SCRAM-SHA-256, as tokio-postgres does.
pub fn tls_server_end_point(certificate: &[u8]) -> Option<Vec<u8>> {
    let algorithm = Certificate::from_der(certificate).ok()?.signature_algorithm.oid;
    let digest = match algorithm {
        MD_5_WITH_RSA_ENCRYPTION
        | SHA_1_WITH_RSA_ENCRYPTION
        | SHA_256_WITH_RSA_ENCRYPTION
        | ECDSA_WITH_SHA_1
        | ECDSA_WITH_SHA_256 => &ring::digest::SHA256,
        SHA_384_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_384 => &ring::digest::SHA384,
        SHA_512_WITH_RSA_ENCRYPTION | ECDSA_WITH_SHA_512 => &ring::digest::SHA512,
        _ => return None,
    };
    Some(ring::digest::digest(digest, certificate).as_ref().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::CertificateDer;

    /// Self-signed certificates made once with `openssl req -x509` for
    /// these tests (RSA/SHA-256, ECDSA P-384/SHA-384, Ed25519).
    fn certificate(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("test certificate").to_vec()
    }

    #[test]
    fn channel_binding_hash_follows_the_signature_algorithm() {
        let rsa_sha256 = certificate(include_str!("testdata/rsa-sha256.pem"));
        let hash = tls_server_end_point(&rsa_sha256).expect("RSA/SHA-256 binds");
        assert_eq!(hash, ring::digest::digest(&ring::digest::SHA256, &rsa_sha256).as_ref());
        let ecdsa_sha384 = certificate(include_str!("testdata/ecdsa-sha384.pem"));
        let hash = tls_server_end_point(&ecdsa_sha384).expect("ECDSA/SHA-384 binds");
        assert_eq!(hash, ring::digest::digest(&ring::digest::SHA384, &ecdsa_sha384).as_ref());
        let ed25519 = certificate(include_str!("testdata/ed25519.pem"));
        assert_eq!(tls_server_end_point(&ed25519), None, "Ed25519 names no hash");
        assert_eq!(tls_server_end_point(&rsa_sha256[..rsa_sha256.len() / 2]), None, "truncated");
        assert_eq!(tls_server_end_point(b"not DER"), None);
    }

    #[test]
    fn sha1_and_md5_are_upgraded_to_sha256() {
        assert_eq!(ECDSA_WITH_SHA_1.to_string(), "1.2.840.10045.4.1");
        let rsa_sha1 = certificate(include_str!("testdata/rsa-sha1.pem"));
        let hash = tls_server_end_point(&rsa_sha1).expect("RSA/SHA-1 binds");
        assert_eq!(hash, ring::digest::digest(&ring::digest::SHA256, &rsa_sha1).as_ref());
    }
}
