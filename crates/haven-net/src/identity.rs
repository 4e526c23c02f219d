//! Who a certificate speaks for: its cluster, role and name, carried as a URI subject
//! alternative name `haven://CLUSTER/ROLE/NAME` in every certificate the cluster CA
//! issues.
//!
//! A URI rather than a DNS name because nodes still dial each other by the one shared
//! server name ([`crate::SERVER_NAME`]), so links can change without new certificates,
//! and because a URI cannot be mistaken for a host to connect to. The name is trusted
//! only after the TLS handshake verified the chain up to the cluster CA: then the CA
//! vouches for it, and nothing the peer sends in a request can change it.

use std::fmt;

use rustls::pki_types::CertificateDer;

const SCHEME: &str = "haven://";

/// What a certificate is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertRole {
    /// A daemon: serves and connects to peers.
    Node,
    /// A witness daemon: serves and votes, runs nothing.
    Witness,
    /// A CLI or API client (an operator): connects only.
    Client,
}

impl CertRole {
    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Node => "node",
            CertRole::Witness => "witness",
            CertRole::Client => "client",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "node" => Some(CertRole::Node),
            "witness" => Some(CertRole::Witness),
            "client" => Some(CertRole::Client),
            _ => None,
        }
    }

    /// A daemon's certificate (node or witness): it may serve, and talk to peers.
    pub fn is_daemon(self) -> bool {
        matches!(self, CertRole::Node | CertRole::Witness)
    }
}

/// The identity a verified certificate carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub cluster: String,
    pub role: CertRole,
    pub name: String,
}

impl PeerIdentity {
    pub fn new(cluster: &str, role: CertRole, name: &str) -> Self {
        PeerIdentity {
            cluster: cluster.to_string(),
            role,
            name: name.to_string(),
        }
    }

    /// The URI as written into the certificate.
    pub fn uri(&self) -> String {
        format!(
            "{SCHEME}{}/{}/{}",
            self.cluster,
            self.role.as_str(),
            self.name
        )
    }

    /// Parses a URI written by [`PeerIdentity::uri`]; anything else is `None`.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(SCHEME)?;
        let mut parts = rest.split('/');
        let (Some(cluster), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !valid_cluster_name(cluster) || !valid_name(name) {
            return None;
        }
        Some(PeerIdentity {
            cluster: cluster.to_string(),
            role: CertRole::parse(role)?,
            name: name.to_string(),
        })
    }

    /// The identity in a DER certificate: its one well-formed `haven://` URI name.
    /// `None` if it has none, or several (a certificate speaks for one party only).
    /// This does not verify the certificate; use it on chains the handshake verified.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Option<Self> {
        let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
        let mut found = parsed
            .valid_uri_names()
            .filter(|u| u.starts_with(SCHEME))
            .map(PeerIdentity::from_uri);
        let first = found.next()??;
        found.next().is_none().then_some(first)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?}", self.role.as_str(), self.name)
    }
}

fn name_chars(name: &str) -> bool {
    name.chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Node and client names: 1–63 characters of `[A-Za-z0-9._-]` (the rule the replicated
/// state applies to node names), so they sit in a URI path unescaped.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 63 && name_chars(name)
}

/// Cluster names: 1–64 characters of `[A-Za-z0-9._-]`.
pub fn valid_cluster_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name_chars(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_round_trips_and_malformed_ones_are_not_identities() {
        for role in [CertRole::Node, CertRole::Witness, CertRole::Client] {
            let id = PeerIdentity::new("lab", role, "n1");
            assert_eq!(PeerIdentity::from_uri(&id.uri()), Some(id));
        }
        for bad in [
            "haven://lab/node",
            "haven://lab/node/n1/x",
            "haven://lab/admin/n1",
            "haven://lab/node/",
            "haven:///node/n1",
            "spiffe://lab/node/n1",
            "haven://lab/node/n 1",
        ] {
            assert_eq!(PeerIdentity::from_uri(bad), None, "{bad}");
        }
    }
}
