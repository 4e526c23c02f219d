//! rustls configurations for mutual TLS under the cluster CA (ring backend).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "{source_name}: no PEM certificate found (expected a -----BEGIN CERTIFICATE----- block)"
    )]
    NoCertificate { source_name: String },
    #[error("{source_name}: not a PEM certificate: {reason}")]
    BadCertificate { source_name: String, reason: String },
    #[error("{source_name}: not a PEM private key: {reason}")]
    BadKey { source_name: String, reason: String },
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn certs_der(
    pem: &str,
    source_name: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            source_name: source_name.to_string(),
        });
    }
    Ok(certs)
}

pub(crate) fn first_cert_der(
    pem: &str,
    source_name: &str,
) -> Result<CertificateDer<'static>, TlsError> {
    let mut certs = certs_der(pem, source_name)?;
    Ok(certs.swap_remove(0))
}

/// SHA-256 of a DER certificate, lowercase hex.
pub fn fingerprint_der(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A node's or client's identity: the cluster CA it trusts, and its own certificate and
/// key, all PEM. `source_name` says where they came from, for errors.
#[derive(Clone)]
pub struct TlsIdentity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl TlsIdentity {
    pub fn from_pem(
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        source_name: &str,
    ) -> Result<Self, TlsError> {
        let ca = first_cert_der(ca_pem, &format!("{source_name} (CA)"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .map_err(|e| TlsError::BadCertificate {
                source_name: format!("{source_name} (CA)"),
                reason: e.to_string(),
            })?;
        let mut chain = certs_der(cert_pem, &format!("{source_name} (certificate)"))?;
        // The CA travels in the chain so a joining host can match it against the
        // fingerprint in its token.
        chain.push(ca);
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::BadKey {
                source_name: format!("{source_name} (key)"),
                reason: e.to_string(),
            })?;
        Ok(TlsIdentity {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        })
    }

    /// The identity this certificate carries, if it carries one (certificates issued
    /// before identities were added do not).
    pub fn identity(&self) -> Option<crate::PeerIdentity> {
        crate::PeerIdentity::of_cert(self.chain.first()?)
    }

    /// The daemon's server side. Clients must present a certificate from the cluster CA,
    /// except that `allow_anonymous` lets a client with no certificate at all through
    /// the handshake (for the join endpoint; the request handler sees [`crate::Peer`]).
    /// A certificate from another CA is refused either way.
    pub fn server_config(&self, allow_anonymous: bool) -> Result<Arc<ServerConfig>, TlsError> {
        let mut verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if allow_anonymous {
            verifier = verifier.allow_unauthenticated();
        }
        let verifier = verifier.build()?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A client that presents this identity and trusts only the cluster CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Tells a node's certificate from a client's: only a node's is valid for serving
/// (extended key usage serverAuth) under the cluster CA.
#[derive(Debug)]
pub struct NodeCheck {
    verifier: Arc<rustls::client::WebPkiServerVerifier>,
}

impl NodeCheck {
    /// Whether `chain` (as the TLS handshake received it) is a node's.
    pub fn is_node(&self, chain: &[CertificateDer<'_>]) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        let Ok(name) = ServerName::try_from(crate::SERVER_NAME) else {
            return false;
        };
        self.verifier
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .is_ok()
    }
}

impl TlsIdentity {
    /// A [`NodeCheck`] under this identity's cluster CA.
    pub fn node_check(&self) -> Result<NodeCheck, TlsError> {
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        Ok(NodeCheck { verifier })
    }
}

/// A client with no certificate that trusts a server whose chain contains the CA with
/// the given SHA-256 fingerprint, and whose certificate that CA signed: how a joining
/// host reaches the cluster before it has the CA.
pub fn pinned_client_config(ca_fingerprint: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = PinnedCaVerifier {
        fingerprint: ca_fingerprint.to_ascii_lowercase(),
        provider: provider(),
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| fingerprint_der(c) == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the server's chain does not contain the CA named by the join token"
                        .to_string(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
