//! Haven's node-to-node and client transport: mutual TLS with a cluster CA, join tokens.
//!
//! Every connection to a Haven daemon is TLS. The server asks every client for a
//! certificate signed by the cluster CA; a certificate from any other CA fails the
//! handshake. The only thing a client without a certificate can reach is the join
//! endpoint, and only with a valid join token (the daemon checks that; this crate only
//! tells the handler whether the peer was authenticated, see [`rpc::Peer`]).
//!
//! A joining host has no certificate and no CA yet: it trusts the cluster by the CA
//! fingerprint carried inside the join token (as kubeadm's discovery hash does).
//!
//! Every certificate names the party it speaks for ([`identity`]); the server hands
//! that verified identity to each request ([`Peer::identity`]) so handlers can check
//! that a message claiming to come from node X comes from X's certificate.

pub mod ca;
pub mod identity;
pub mod rpc;
pub mod tls;
pub mod token;

pub use ca::{CaError, ClusterCa, IssuedCert};
pub use identity::{CertRole, PeerIdentity};
pub use rpc::{Peer, RpcClient, RpcError, ServeError};
pub use tls::{NodeCheck, TlsError, TlsIdentity};
pub use token::{JoinToken, TokenError};

/// The name every node certificate carries and every client asks for. Nodes are
/// authenticated by the cluster CA's signature, not by address, so a node may change
/// or add links without new certificates.
pub const SERVER_NAME: &str = "haven-node";
