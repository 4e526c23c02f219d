//! Mutual TLS for the replication channel.
//!
//! The configurations come from the caller (the `haven` binary builds them with
//! haven-net's `TlsIdentity`, from the node's cluster certificate), so a replica trusts
//! exactly what the cluster's RPC trusts. Both ends present a certificate; the dialer
//! checks the listener's against the cluster CA and the node server name, the listener
//! checks the dialer's against the CA and then asks `peer_is_node`, so an operator's
//! client certificate (same CA, client-only) cannot feed writes into a replica.
//! The ALPN is replaced by [`ALPN`]: an RPC client that reached this port by mistake
//! (or a replica that reached an RPC port) fails the handshake instead of talking.

use std::fmt;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const ALPN: &[u8] = b"haven-volume/1";

pub type PeerRead = Box<dyn AsyncRead + Send + Unpin>;
pub type PeerWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Whether a verified client chain belongs to a cluster node (not an operator).
pub type PeerCheck = Arc<dyn Fn(&[CertificateDer<'_>]) -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("replication TLS: server name {0:?} is not a valid DNS name")]
    ServerName(String),
}

/// What a replica needs to speak mutual TLS with its peers.
#[derive(Clone)]
pub struct ReplicationTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    peer_is_node: PeerCheck,
}

impl fmt::Debug for ReplicationTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ReplicationTls {
    /// `server` must require client certificates; `server_name` is the name every
    /// node's certificate is issued for.
    pub fn new(
        server: &ServerConfig,
        client: &ClientConfig,
        server_name: &str,
        peer_is_node: PeerCheck,
    ) -> Result<Self, TlsSetupError> {
        let mut server = server.clone();
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = client.clone();
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsSetupError::ServerName(server_name.to_string()))?;
        Ok(ReplicationTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
            peer_is_node,
        })
    }
}

fn plain(s: TcpStream) -> (PeerRead, PeerWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

/// The accepting side of a replication connection. Without `tls` the stream is used
/// as it is (`haven volume serve --plaintext`).
pub(crate) async fn accept(
    tls: Option<&ReplicationTls>,
    s: TcpStream,
) -> Result<(PeerRead, PeerWrite), String> {
    let _ = s.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(plain(s));
    };
    let stream = tls
        .acceptor
        .accept(s)
        .await
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
    let is_node = stream
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|chain| (tls.peer_is_node)(chain));
    if !is_node {
        return Err("TLS: the peer's certificate is not a cluster node's".into());
    }
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w)))
}

/// The dialing side of a replication connection.
pub(crate) async fn connect(
    tls: Option<&ReplicationTls>,
    s: TcpStream,
) -> Result<(PeerRead, PeerWrite), String> {
    let _ = s.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(plain(s));
    };
    let stream = tls
        .connector
        .connect(tls.server_name.clone(), s)
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w)))
}
