//! RPC over mutual TLS: an axum router served over tokio-rustls (HTTP/2, JSON bodies),
//! and a small typed client that keeps one multiplexed connection per peer and link.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::PeerIdentity;

/// Who is on the other end of a request, as the TLS handshake established it. Every
/// handler except the join endpoint must refuse a peer that is not `authenticated`.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The peer presented a certificate signed by the cluster CA.
    pub authenticated: bool,
    /// That certificate is a node's (it may serve), not a client's (CLI, API).
    pub node: bool,
    /// The party that certificate speaks for; `None` without a certificate, for a
    /// certificate that names no one, or (when roles are checked) for one whose named
    /// role disagrees with its key usage.
    pub identity: Option<PeerIdentity>,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("accepting connections on {addr} failed: {source}")]
    Accept {
        addr: String,
        source: std::io::Error,
    },
}

/// How long a client may take to finish the TLS handshake before it is dropped: a
/// silent plaintext client must not hold a task forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` on `listener` until `shutdown` completes. Plaintext and foreign
/// certificates fail the handshake and never reach the router.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    serve_with_roles(listener, tls, None, router, shutdown).await
}

/// As [`serve`], and tells nodes from clients with `nodes` (see [`Peer::node`]).
pub async fn serve_with_roles(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    nodes: Option<Arc<crate::tls::NodeCheck>>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let acceptor = TlsAcceptor::from(tls);
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = listener.accept() => r.map_err(|source| ServeError::Accept { addr: local.clone(), source })?,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let nodes = nodes.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%addr, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let peer = peer_of(tls.get_ref().1.peer_certificates(), nodes.as_deref(), addr);
            let service =
                hyper_util::service::TowerToHyperService::new(router.layer(axum::Extension(peer)));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%addr, "connection ended: {e}");
            }
        });
    }
}

/// The [`Peer`] behind a chain the handshake verified (so the CA vouches for the name
/// in it).
fn peer_of(
    chain: Option<&[CertificateDer<'static>]>,
    nodes: Option<&crate::tls::NodeCheck>,
    addr: SocketAddr,
) -> Peer {
    let node = match (chain, nodes) {
        (Some(chain), Some(check)) => check.is_node(chain),
        _ => false,
    };
    let identity = chain
        .and_then(|c| c.first())
        .and_then(PeerIdentity::of_cert)
        .filter(|id| nodes.is_none() || id.role.is_daemon() == node);
    Peer {
        authenticated: chain.is_some(),
        node,
        identity,
        addr,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: HTTP/2 failed: {reason}")]
    Http { addr: String, reason: String },
    #[error("{addr} did not answer {path} within {after:?}")]
    Timeout {
        addr: String,
        path: String,
        after: Duration,
    },
    #[error("{addr} refused {path} ({status}): {message}")]
    Remote {
        addr: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("{addr} answered {path} with a body that is not the expected JSON: {reason}")]
    Decode {
        addr: String,
        path: String,
        reason: String,
    },
    #[error("{0:?} is not an address of the form IP:PORT")]
    BadAddress(String),
    #[error("{addr} should be node {expected:?}, but its certificate is {found}")]
    WrongPeer {
        addr: String,
        expected: String,
        found: String,
    },
}

impl RpcError {
    /// The server answered and said no (as opposed to: it could not be reached).
    pub fn is_remote(&self) -> bool {
        matches!(self, RpcError::Remote { .. })
    }
}

type ConnKey = (Option<IpAddr>, String);

/// A connection, and the daemon its server certificate names.
type Conn = (SendRequest<Full<Bytes>>, Option<PeerIdentity>);

/// A client for Haven's RPC. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RpcClient {
    tls: Arc<ClientConfig>,
    timeout: Duration,
    conns: Arc<Mutex<HashMap<ConnKey, Conn>>>,
}

impl RpcClient {
    pub fn new(tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        RpcClient {
            tls,
            timeout,
            conns: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// POSTs `req` as JSON to `path` on `addr` and decodes the JSON answer.
    pub async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Q,
    ) -> Result<R, RpcError> {
        self.call_from(None, addr, path, req).await
    }

    /// As [`RpcClient::call`], with the connection's source address bound to `local`:
    /// that is what makes a heartbeat travel one particular link.
    pub async fn call_from<Q: Serialize, R: DeserializeOwned>(
        &self,
        local: Option<IpAddr>,
        addr: &str,
        path: &str,
        req: &Q,
    ) -> Result<R, RpcError> {
        self.call_checked(local, addr, None, path, req).await
    }

    /// As [`RpcClient::call_from`], to the daemon of node `node` only: if the server's
    /// certificate names another node (an address reused, a misdirected link, or an
    /// impersonator), nothing is sent and the call fails with [`RpcError::WrongPeer`].
    pub async fn call_node<Q: Serialize, R: DeserializeOwned>(
        &self,
        local: Option<IpAddr>,
        addr: &str,
        node: &str,
        path: &str,
        req: &Q,
    ) -> Result<R, RpcError> {
        self.call_checked(local, addr, Some(node), path, req).await
    }

    async fn call_checked<Q: Serialize, R: DeserializeOwned>(
        &self,
        local: Option<IpAddr>,
        addr: &str,
        node: Option<&str>,
        path: &str,
        req: &Q,
    ) -> Result<R, RpcError> {
        let body = serde_json::to_vec(req).map_err(|e| RpcError::Decode {
            addr: addr.to_string(),
            path: path.to_string(),
            reason: format!("encoding the request: {e}"),
        })?;
        let key = (local, addr.to_string());
        let attempt = self.exchange(&key, node, path, body);
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(bytes)) => serde_json::from_slice(&bytes).map_err(|e| RpcError::Decode {
                addr: addr.to_string(),
                path: path.to_string(),
                reason: e.to_string(),
            }),
            Ok(Err(e)) => {
                if !e.is_remote() {
                    self.forget(&key);
                }
                Err(e)
            }
            Err(_) => {
                self.forget(&key);
                Err(RpcError::Timeout {
                    addr: addr.to_string(),
                    path: path.to_string(),
                    after: self.timeout,
                })
            }
        }
    }

    fn forget(&self, key: &ConnKey) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.remove(key);
        }
    }

    async fn sender(&self, key: &ConnKey) -> Result<Conn, RpcError> {
        let cached = self
            .conns
            .lock()
            .ok()
            .and_then(|c| c.get(key).cloned())
            .filter(|(s, _)| !s.is_closed());
        if let Some(s) = cached {
            return Ok(s);
        }
        let (local, addr) = key;
        let sockaddr: SocketAddr = addr
            .parse()
            .map_err(|_| RpcError::BadAddress(addr.clone()))?;
        let connect_err = |source| RpcError::Connect {
            addr: addr.clone(),
            source,
        };
        let socket = if sockaddr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(connect_err)?;
        if let Some(ip) = local {
            socket.bind(SocketAddr::new(*ip, 0)).map_err(connect_err)?;
        }
        let tcp = socket.connect(sockaddr).await.map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(crate::SERVER_NAME).map_err(|e| RpcError::Http {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|source| RpcError::Tls {
                addr: addr.clone(),
                source,
            })?;
        // The handshake verified the server's chain (and that it may serve).
        let server = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(PeerIdentity::of_cert)
            .filter(|id| id.role.is_daemon());
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| RpcError::Http {
                    addr: addr.clone(),
                    reason: e.to_string(),
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let conn = (sender, server);
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(key.clone(), conn.clone());
        }
        Ok(conn)
    }

    async fn exchange(
        &self,
        key: &ConnKey,
        node: Option<&str>,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, RpcError> {
        let addr = &key.1;
        let http_err = |e: &dyn std::fmt::Display| RpcError::Http {
            addr: addr.clone(),
            reason: e.to_string(),
        };
        let (mut sender, server) = self.sender(key).await?;
        if let Some(node) = node
            && server.as_ref().map(|s| s.name.as_str()) != Some(node)
        {
            return Err(RpcError::WrongPeer {
                addr: addr.clone(),
                expected: node.to_string(),
                found: server.map_or("one that names no node".to_string(), |s| s.to_string()),
            });
        }
        sender.ready().await.map_err(|e| http_err(&e))?;
        let request = hyper::Request::post(format!("https://{}{path}", crate::SERVER_NAME))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http_err(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        if !status.is_success() {
            return Err(RpcError::Remote {
                addr: addr.clone(),
                path: path.to_string(),
                status: status.as_u16(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{CertRole, sign_by_hand};
    use crate::{ClusterCa, TlsIdentity};
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType};

    fn chain_of(ca: &ClusterCa, cert_pem: &str) -> Vec<CertificateDer<'static>> {
        let mut chain = crate::tls::certs_der(cert_pem, "test").unwrap();
        chain.push(crate::tls::first_cert_der(ca.cert_pem(), "ca").unwrap());
        chain
    }

    fn hand_made(ca: &ClusterCa, uri: &str, serve: bool) -> Vec<CertificateDer<'static>> {
        let mut params = CertificateParams::new(vec![crate::SERVER_NAME.to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(uri.try_into().unwrap()));
        params.extended_key_usages = if serve {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        chain_of(ca, &sign_by_hand(ca, params).cert_pem)
    }

    #[test]
    fn a_named_role_that_contradicts_the_key_usage_names_no_one() {
        let ca = ClusterCa::generate("t").unwrap();
        let n1 = ca.issue("n1", CertRole::Node).unwrap();
        let check = TlsIdentity::from_pem(ca.cert_pem(), &n1.cert_pem, &n1.key_pem, "n1")
            .unwrap()
            .node_check()
            .unwrap();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let name = |chain: &[CertificateDer<'static>]| {
            peer_of(Some(chain), Some(&check), addr)
                .identity
                .map(|i| i.uri())
        };
        // Says node but may not serve; says client but may serve: neither is trusted.
        assert_eq!(name(&hand_made(&ca, "haven://t/node/n2", false)), None);
        assert_eq!(name(&hand_made(&ca, "haven://t/client/ops", true)), None);
        // Consistent ones are who they say.
        assert_eq!(
            name(&hand_made(&ca, "haven://t/node/n2", true)).as_deref(),
            Some("haven://t/node/n2")
        );
        assert_eq!(
            name(&hand_made(&ca, "haven://t/client/ops", false)).as_deref(),
            Some("haven://t/client/ops")
        );
        // Two identities in one certificate: it speaks for no one.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        for uri in ["haven://t/client/a", "haven://t/client/b"] {
            params
                .subject_alt_names
                .push(SanType::URI(uri.try_into().unwrap()));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let two = chain_of(&ca, &sign_by_hand(&ca, params).cert_pem);
        assert_eq!(name(&two), None);
        // No certificate at all.
        let anon = peer_of(None, Some(&check), addr);
        assert!(!anon.authenticated && anon.identity.is_none());
    }
}
