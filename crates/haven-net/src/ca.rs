//! The cluster certificate authority: created once at `haven cluster init`, it signs
//! every node's and every client's certificate.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the CA key in {source_name} is not a PEM private key: {reason}")]
    BadKey { source_name: String, reason: String },
    #[error("the cluster name must be 1–64 characters of [A-Za-z0-9._-], got {0:?}")]
    BadClusterName(String),
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    /// A daemon: serves and connects to peers.
    Node,
    /// A CLI or API client: connects only.
    Client,
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

fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
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

    /// A certificate for `name` signed by this CA.
    pub fn issue(&self, name: &str, role: CertRole) -> Result<IssuedCert, CaError> {
        let ca_key = KeyPair::from_pem(&self.key_pem).map_err(|e| CaError::BadKey {
            source_name: "the cluster CA".to_string(),
            reason: e.to_string(),
        })?;
        let issuer = Issuer::new(ca_params(&self.cluster)?, ca_key);
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![crate::SERVER_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "Haven");
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            CertRole::Node => vec![
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
}
