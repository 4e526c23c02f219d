//! Mutual TLS for the replication channel.
//!
//! The configurations come from the caller (the `haven` binary builds them with
//! haven-net's `TlsIdentity`, from the node's cluster certificate), so a replica trusts
//! exactly what the cluster's RPC trusts. Both ends present a certificate; the dialer
//! checks the listener's against the cluster CA and the node server name, the listener
//! checks the dialer's against the CA; then each asks `node_name` which node the
//! other's certificate names (`haven://CLUSTER/node/NAME`). An operator's client
//! certificate (same CA, client-only) names no node and cannot feed writes into a
//! replica; a node's names that node only, so it cannot pass for another replica (the
//! dialer compares it with the peer it dialled, the listener with the hello's name).
//! The ALPN is replaced by [`ALPN`]: an RPC client that reached this port by mistake
//! (or a replica that reached an RPC port) fails the handshake instead of talking.

use std::fmt;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub const ALPN: &[u8] = b"haven-volume/1";

pub type PeerRead = Box<dyn AsyncRead + Send + Unpin>;
pub type PeerWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The node of this cluster a verified chain names; `None` for anything else (an
/// operator's certificate, a witness's, one that names no node).
pub type PeerCheck = Arc<dyn Fn(&[CertificateDer<'_>]) -> Option<String> + Send + Sync>;

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
    node_name: PeerCheck,
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
        node_name: PeerCheck,
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
            node_name,
        })
    }
}

/// Bytes read from the socket per system call under TLS. rustls asks its transport for
/// at most 4 KiB at a time, which cost a `recv` per 4 KiB on the replica's data path;
/// one read of this size serves a whole run of records.
const READ_AHEAD: usize = 256 << 10;

/// A socket whose reads go through a buffer and whose writes (vectored ones included,
/// which tokio's `BufReader` does not pass on) go straight through.
struct ReadAhead {
    io: TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
}

impl ReadAhead {
    fn new(io: TcpStream) -> Self {
        ReadAhead {
            io,
            buf: vec![0u8; READ_AHEAD].into_boxed_slice(),
            pos: 0,
            end: 0,
        }
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.pos == me.end {
            let mut rb = ReadBuf::new(&mut me.buf);
            std::task::ready!(Pin::new(&mut me.io).poll_read(cx, &mut rb))?;
            me.pos = 0;
            me.end = rb.filled().len();
        }
        let n = out.remaining().min(me.end - me.pos);
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

fn plain(s: TcpStream) -> (PeerRead, PeerWrite) {
    let (r, w) = s.into_split();
    (Box::new(r), Box::new(w))
}

/// The accepting side of a replication connection: the streams, and the node the
/// dialer's certificate names, which its hello must claim (`None` without TLS: `haven
/// volume serve --plaintext` takes the stream as it is).
pub(crate) async fn accept(
    tls: Option<&ReplicationTls>,
    s: TcpStream,
) -> Result<(PeerRead, PeerWrite, Option<String>), String> {
    let _ = s.set_nodelay(true);
    let Some(tls) = tls else {
        let (r, w) = plain(s);
        return Ok((r, w, None));
    };
    let stream = tls
        .acceptor
        .accept(ReadAhead::new(s))
        .await
        .map_err(|e| format!("TLS handshake refused: {e}"))?;
    let node = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| (tls.node_name)(chain));
    let Some(node) = node else {
        return Err("TLS: the peer's certificate is not a cluster node's".into());
    };
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w), Some(node)))
}

/// The dialing side of a replication connection to the replica of node `peer`: the
/// listener's certificate must name that node.
pub(crate) async fn connect(
    tls: Option<&ReplicationTls>,
    s: TcpStream,
    peer: &str,
) -> Result<(PeerRead, PeerWrite), String> {
    let _ = s.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(plain(s));
    };
    let stream = tls
        .connector
        .connect(tls.server_name.clone(), ReadAhead::new(s))
        .await
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
    let node = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| (tls.node_name)(chain));
    match node {
        Some(n) if n == peer => {}
        Some(n) => {
            return Err(format!(
                "TLS: the replica dialled as `{peer}` holds node `{n}`'s certificate; refused"
            ));
        }
        None => return Err("TLS: the peer's certificate is not a cluster node's".into()),
    }
    let (r, w) = tokio::io::split(stream);
    Ok((Box::new(r), Box::new(w)))
}

/// Whether an accepted connection's hello names the node its certificate names; the
/// refusal says both.
pub(crate) fn check_claim(verified: Option<&str>, claimed: &str) -> Result<(), String> {
    match verified {
        Some(n) if n != claimed => Err(format!(
            "the hello claims node `{claimed}` but the TLS certificate is node `{n}`'s; refused"
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_net::ca::CertRole;
    use haven_net::{ClusterCa, TlsIdentity};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn identity(ca: &ClusterCa, name: &str, role: CertRole) -> ReplicationTls {
        let issued = ca.issue(name, role).unwrap();
        let id =
            TlsIdentity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem, name).unwrap();
        let check = Arc::new(id.node_check().unwrap());
        ReplicationTls::new(
            &id.server_config(false).unwrap(),
            &id.client_config().unwrap(),
            haven_net::SERVER_NAME,
            Arc::new(move |chain| {
                if !check.is_node(chain) {
                    return None;
                }
                let id = haven_net::PeerIdentity::of_cert(chain.first()?)?;
                (id.role == CertRole::Node).then_some(id.name)
            }),
        )
        .unwrap()
    }

    /// Dials `server` as `client`; returns what each side made of it.
    async fn handshake(
        server: Option<ReplicationTls>,
        client: Option<ReplicationTls>,
    ) -> (Result<(), String>, Result<(), String>) {
        let (a, d, _) = handshake_as(server, client, "b").await;
        (a, d)
    }

    /// Dials `server` as `client`, which expects node `expect` there; also returns the
    /// node the listener found in the dialer's certificate.
    async fn handshake_as(
        server: Option<ReplicationTls>,
        client: Option<ReplicationTls>,
        expect: &str,
    ) -> (Result<(), String>, Result<(), String>, Option<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (name_tx, name_rx) = tokio::sync::oneshot::channel();
        let accepting = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut rd, _wr, name) = accept(server.as_ref(), s).await?;
            let _ = name_tx.send(name);
            let mut b = [0u8; 5];
            rd.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            (b == *b"hello").then_some(()).ok_or("garbled".to_string())
        });
        let s = TcpStream::connect(addr).await.unwrap();
        let dialed = match connect(client.as_ref(), s, expect).await {
            Ok((_rd, mut wr)) => {
                let _ = wr.write_all(b"hello").await;
                let _ = wr.flush().await;
                Ok(())
            }
            Err(e) => Err(e),
        };
        let accepted = tokio::time::timeout(std::time::Duration::from_secs(10), accepting)
            .await
            .expect("the listener decides in time")
            .unwrap();
        (accepted, dialed, name_rx.await.ok().flatten())
    }

    #[tokio::test]
    async fn only_nodes_of_the_same_cluster_get_through() {
        let ca = ClusterCa::generate("lab").unwrap();
        let node = |n: &str| identity(&ca, n, CertRole::Node);
        let (a, d) = handshake(Some(node("b")), Some(node("a"))).await;
        assert_eq!((a, d), (Ok(()), Ok(())));

        // An operator's certificate is from the same CA but is not a node's.
        let operator = identity(&ca, "admin", CertRole::Client);
        let (a, _) = handshake(Some(node("b")), Some(operator)).await;
        assert!(a.unwrap_err().contains("not a cluster node's"));

        // Another cluster's node: refused on both sides.
        let other = ClusterCa::generate("other").unwrap();
        let (a, d) = handshake(Some(node("b")), Some(identity(&other, "a", CertRole::Node))).await;
        assert!(a.is_err() && d.unwrap_err().contains("TLS"));

        // A plaintext dialer never looks like a hello to a TLS listener.
        let (a, _) = handshake(Some(node("b")), None).await;
        assert!(a.unwrap_err().contains("TLS"));
    }

    /// Payloads of many records, split unevenly across vectored writes and reads, come
    /// out of the read-ahead buffer exactly as they went in.
    #[tokio::test]
    async fn large_and_small_writes_cross_tls_intact() {
        let ca = ClusterCa::generate("lab").unwrap();
        let (server, client) = (
            identity(&ca, "b", CertRole::Node),
            identity(&ca, "a", CertRole::Node),
        );
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let expect = data.clone();
        let reading = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (mut rd, _wr, _) = accept(Some(&server), s).await.unwrap();
            let mut got = vec![0u8; expect.len()];
            let mut at = 0;
            for step in [1usize, 5, 4096, 70_000, 300_000].iter().cycle() {
                let n = (*step).min(got.len() - at);
                rd.read_exact(&mut got[at..at + n]).await.unwrap();
                at += n;
                if at == got.len() {
                    break;
                }
            }
            got == expect
        });
        let s = TcpStream::connect(addr).await.unwrap();
        let (_rd, mut wr) = connect(Some(&client), s, "b").await.unwrap();
        let mut at = 0;
        for (head, body) in [(5usize, 262_144usize), (21, 3), (0, 100_000)]
            .iter()
            .cycle()
        {
            let end = (at + head + body).min(data.len());
            let mid = (at + head).min(end);
            let mut bufs = [
                std::io::IoSlice::new(&data[at..mid]),
                std::io::IoSlice::new(&data[mid..end]),
            ];
            let mut left: &mut [std::io::IoSlice<'_>] = &mut bufs;
            while !left.is_empty() {
                let n = wr.write_vectored(left).await.unwrap();
                std::io::IoSlice::advance_slices(&mut left, n);
            }
            at = end;
            if at == data.len() {
                break;
            }
        }
        wr.flush().await.unwrap();
        assert!(
            reading.await.unwrap(),
            "the bytes read differ from those written"
        );
    }

    #[tokio::test]
    async fn each_side_learns_which_node_the_other_is() {
        let ca = ClusterCa::generate("lab").unwrap();
        let node = |n: &str| identity(&ca, n, CertRole::Node);
        // The listener learns the dialer's node from its certificate.
        let (a, d, name) = handshake_as(Some(node("b")), Some(node("a")), "b").await;
        assert_eq!((a, d, name.as_deref()), (Ok(()), Ok(()), Some("a")));
        assert!(check_claim(name.as_deref(), "a").is_ok());
        let e = check_claim(name.as_deref(), "c").unwrap_err();
        assert!(e.contains("`c`") && e.contains("`a`"), "{e}");
        assert!(
            check_claim(None, "c").is_ok(),
            "plaintext has nothing to check"
        );
        // The dialer refuses a listener whose certificate is another member's.
        let (_, d, _) = handshake_as(Some(node("c")), Some(node("a")), "b").await;
        let e = d.unwrap_err();
        assert!(e.contains("`b`") && e.contains("`c`"), "{e}");
    }
}
