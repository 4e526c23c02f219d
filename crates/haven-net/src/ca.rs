//! The cluster certificate authority: created once at `haven cluster init`, it signs
//! every node's and every client's certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

pub use crate::identity::CertRole;
use crate::identity::{PeerIdentity, valid_cluster_name, valid_name};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA key in {source_name} is not a PEM private key: {reason}")]
    BadKey { source_name: String, reason: String },
    #[error("the cluster name must be 1–64 characters of [A-Za-z0-9._-], got {0:?}")]
    BadClusterName(String),
    #[error("a certificate's name must be 1–63 characters of [A-Za-z0-9._-], got {0:?}")]
    BadName(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster CA. Its certificate can be rebuilt from the cluster name and key alone,
/// so only those two are needed to sign (the stored certificate is what peers trust).
pub struct ClusterCa {
    cluster: String,
    cert_pem: String,
    key_pem: String,
}

fn ca_params(cluster: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Haven cluster CA {cluster}"));
    dn.push(DnType::OrganizationName, "Haven");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive DER integer: the top bit must be clear.
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl ClusterCa {
    /// A new CA for the cluster `cluster`.
    pub fn generate(cluster: &str) -> Result<Self, CaError> {
        if !valid_cluster_name(cluster) {
            return Err(CaError::BadClusterName(cluster.to_string()));
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params(cluster)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(ClusterCa {
            cluster: cluster.to_string(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CA loaded from its stored certificate and key; `source_name` names the key's file
    /// in errors.
    pub fn from_pem(
        cluster: &str,
        cert_pem: String,
        key_pem: String,
        source_name: &str,
    ) -> Result<Self, CaError> {
        if !valid_cluster_name(cluster) {
            return Err(CaError::BadClusterName(cluster.to_string()));
        }
        KeyPair::from_pem(&key_pem).map_err(|e| CaError::BadKey {
            source_name: source_name.to_string(),
            reason: e.to_string(),
        })?;
        Ok(ClusterCa {
            cluster: cluster.to_string(),
            cert_pem,
            key_pem,
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The SHA-256 of the CA certificate (DER), hex: what a join token carries so a new
    /// host can recognise the cluster before it has the CA.
    pub fn fingerprint(&self) -> Result<String, crate::tls::TlsError> {
        let der = crate::tls::first_cert_der(&self.cert_pem, "the cluster CA")?;
        Ok(crate::tls::fingerprint_der(&der))
    }

    /// A certificate for `name` in `role`, signed by this CA. The identity goes in as a
    /// `haven://` URI name (see [`crate::identity`]); daemons' certificates also carry
    /// the shared server name that peers dial.
    pub fn issue(&self, name: &str, role: CertRole) -> Result<IssuedCert, CaError> {
        if !valid_name(name) {
            return Err(CaError::BadName(name.to_string()));
        }
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| CaError::BadKey {
            source_name: "the cluster CA".to_string(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::new(ca_params(&self.cluster)?, ca_key);
        let key = KeyPair::generate()?;
        let dns = if role.is_daemon() {
            vec![crate::SERVER_NAME.to_string()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(dns)?;
        let uri = PeerIdentity::new(&self.cluster, role, name).uri();
        params
            .subject_alt_names
            .push(SanType::URI(uri.as_str().try_into()?));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Haven");
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            CertRole::Node | CertRole::Witness => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            CertRole::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A certificate this CA signs with whatever `params` say: for tests that need a
/// certificate `issue` would never make.
#[cfg(test)]
pub(crate) fn sign_by_hand(ca: &ClusterCa, params: CertificateParams) -> IssuedCert {
    let ca_key = KeyPair::from_pem(&ca.key_pem).unwrap();
    let issuer = Issuer::new(ca_params(&ca.cluster).unwrap(), ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    IssuedCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_cluster_name_is_refused() {
        assert!(matches!(
            ClusterCa::generate("a b"),
            Err(CaError::BadClusterName(_))
        ));
    }

    #[test]
    fn a_reloaded_ca_issues_certificates_under_the_same_fingerprint() {
        let ca = ClusterCa::generate("lab").unwrap();
        let again = ClusterCa::from_pem(
            "lab",
            ca.cert_pem().to_string(),
            ca.key_pem().to_string(),
            "ca-key.pem",
        )
        .unwrap();
        assert_eq!(ca.fingerprint().unwrap(), again.fingerprint().unwrap());
        let issued = again.issue("n1", CertRole::Node).unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn an_issued_certificate_carries_its_cluster_role_and_name() {
        let ca = ClusterCa::generate("lab").unwrap();
        for (name, role) in [
            ("n1", CertRole::Node),
            ("w", CertRole::Witness),
            ("operator", CertRole::Client),
        ] {
            let issued = ca.issue(name, role).unwrap();
            let der = crate::tls::first_cert_der(&issued.cert_pem, name).unwrap();
            assert_eq!(
                PeerIdentity::of_cert(&der),
                Some(PeerIdentity::new("lab", role, name))
            );
        }
    }

    #[test]
    fn a_name_that_cannot_be_an_identity_is_not_issued() {
        let ca = ClusterCa::generate("lab").unwrap();
        for bad in ["", "a/b", "n 1", &"x".repeat(64)] {
            assert!(
                matches!(ca.issue(bad, CertRole::Node), Err(CaError::BadName(_))),
                "{bad:?}"
            );
        }
    }
}
