//! Mutual TLS against a real server on loopback: who gets in, who is refused.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::post;
use axum::{Extension, Json, Router};
use haven_net::ca::CertRole;
use haven_net::{ClusterCa, Peer, RpcClient, RpcError, TlsIdentity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn identity(ca: &ClusterCa, name: &str, role: CertRole) -> TlsIdentity {
    let issued = ca.issue(name, role).unwrap();
    TlsIdentity::from_pem(ca.cert_pem(), &issued.cert_pem, &issued.key_pem, name).unwrap()
}

async fn whoami(Extension(peer): Extension<Peer>) -> Json<bool> {
    Json(peer.authenticated)
}

async fn is_node(Extension(peer): Extension<Peer>) -> Json<bool> {
    Json(peer.node)
}

/// Starts a server; returns its address and a sender that stops it.
async fn server(
    ca: &ClusterCa,
    allow_anonymous: bool,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let tls = identity(ca, "n1", CertRole::Node)
        .server_config(allow_anonymous)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = Router::new().route("/whoami", post(whoami));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(haven_net::rpc::serve(listener, tls, router, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn client(config: Arc<rustls::ClientConfig>) -> RpcClient {
    RpcClient::new(config, Duration::from_secs(5))
}

#[tokio::test]
async fn a_cluster_client_is_served_and_authenticated() {
    let ca = ClusterCa::generate("t").unwrap();
    let (addr, _stop) = server(&ca, false).await;
    let c = client(
        identity(&ca, "cli", CertRole::Client)
            .client_config()
            .unwrap(),
    );
    let authenticated: bool = c.call(&addr, "/whoami", &()).await.unwrap();
    assert!(authenticated);
    // The second call reuses the connection and still works.
    let again: bool = c.call(&addr, "/whoami", &()).await.unwrap();
    assert!(again);
}

#[tokio::test]
async fn a_plaintext_connection_gets_no_http_answer() {
    let ca = ClusterCa::generate("t").unwrap();
    let (addr, _stop) = server(&ca, true).await;
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"POST /whoami HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nnull")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // The server closes the connection after a TLS alert; bound the wait anyway.
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "plaintext got an HTTP answer: {answer:?}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let ca = ClusterCa::generate("t").unwrap();
    let other = ClusterCa::generate("evil").unwrap();
    // Even the server that admits anonymous joiners refuses a foreign certificate.
    let (addr, _stop) = server(&ca, true).await;
    // The foreign client trusts our CA (so the server side is what refuses).
    let foreign = other.issue("intruder", CertRole::Client).unwrap();
    let id =
        TlsIdentity::from_pem(ca.cert_pem(), &foreign.cert_pem, &foreign.key_pem, "x").unwrap();
    let c = client(id.client_config().unwrap());
    let r: Result<bool, RpcError> = c.call(&addr, "/whoami", &()).await;
    assert!(r.is_err(), "foreign certificate was accepted");
    assert!(!matches!(r, Err(RpcError::Remote { .. })));
}

#[tokio::test]
async fn without_a_certificate_the_strict_server_refuses_and_the_join_server_marks_anonymous() {
    let ca = ClusterCa::generate("t").unwrap();
    let fp = ca.fingerprint().unwrap();
    let anon = client(haven_net::tls::pinned_client_config(&fp).unwrap());

    let (strict, _s1) = server(&ca, false).await;
    let r: Result<bool, RpcError> = anon.call(&strict, "/whoami", &()).await;
    assert!(r.is_err(), "a client without a certificate got through");

    let (lenient, _s2) = server(&ca, true).await;
    let authenticated: bool = anon.call(&lenient, "/whoami", &()).await.unwrap();
    assert!(!authenticated);
}

#[tokio::test]
async fn a_joiner_refuses_a_server_whose_ca_is_not_the_pinned_one() {
    let ca = ClusterCa::generate("t").unwrap();
    let other = ClusterCa::generate("u").unwrap();
    let (addr, _stop) = server(&ca, true).await;
    let anon = client(haven_net::tls::pinned_client_config(&other.fingerprint().unwrap()).unwrap());
    let r: Result<bool, RpcError> = anon.call(&addr, "/whoami", &()).await;
    assert!(matches!(r, Err(RpcError::Tls { .. })), "{r:?}");
}

#[tokio::test]
async fn node_certificates_are_told_from_client_certificates() {
    let ca = ClusterCa::generate("t").unwrap();
    let server_id = identity(&ca, "n1", CertRole::Node);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = Router::new().route("/node", post(is_node));
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(haven_net::rpc::serve_with_roles(
        listener,
        server_id.server_config(false).unwrap(),
        Some(Arc::new(server_id.node_check().unwrap())),
        router,
        async {
            let _ = stopped.await;
        },
    ));
    let node = client(identity(&ca, "n2", CertRole::Node).client_config().unwrap());
    let cli = client(
        identity(&ca, "cli", CertRole::Client)
            .client_config()
            .unwrap(),
    );
    assert!(node.call::<_, bool>(&addr, "/node", &()).await.unwrap());
    assert!(!cli.call::<_, bool>(&addr, "/node", &()).await.unwrap());
}

async fn who(Extension(peer): Extension<Peer>) -> Json<Option<String>> {
    Json(peer.identity.map(|id| id.uri()))
}

/// A server that checks roles and answers with the caller's identity URI.
async fn identity_server(ca: &ClusterCa) -> (String, tokio::sync::oneshot::Sender<()>) {
    let server_id = identity(ca, "n1", CertRole::Node);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let router = Router::new().route("/who", post(who));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(haven_net::rpc::serve_with_roles(
        listener,
        server_id.server_config(true).unwrap(),
        Some(Arc::new(server_id.node_check().unwrap())),
        router,
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

#[tokio::test]
async fn each_request_carries_the_identity_its_certificate_names() {
    let ca = ClusterCa::generate("t").unwrap();
    let (addr, _stop) = identity_server(&ca).await;
    for (name, role, uri) in [
        ("n2", CertRole::Node, "haven://t/node/n2"),
        ("w1", CertRole::Witness, "haven://t/witness/w1"),
        ("operator", CertRole::Client, "haven://t/client/operator"),
    ] {
        let c = client(identity(&ca, name, role).client_config().unwrap());
        let got: Option<String> = c.call(&addr, "/who", &()).await.unwrap();
        assert_eq!(got.as_deref(), Some(uri));
    }
    // Without a certificate (the join server admits the handshake) there is no one.
    let anon = client(haven_net::tls::pinned_client_config(&ca.fingerprint().unwrap()).unwrap());
    let got: Option<String> = anon.call(&addr, "/who", &()).await.unwrap();
    assert_eq!(got, None);
}

#[tokio::test]
async fn a_call_to_a_named_node_refuses_a_server_whose_certificate_names_another() {
    let ca = ClusterCa::generate("t").unwrap();
    // The server is n1.
    let (addr, _stop) = identity_server(&ca).await;
    let c = client(identity(&ca, "n2", CertRole::Node).client_config().unwrap());
    let who: Option<String> = c.call_node(None, &addr, "n1", "/who", &()).await.unwrap();
    assert_eq!(who.as_deref(), Some("haven://t/node/n2"));
    let r: Result<Option<String>, RpcError> = c.call_node(None, &addr, "n3", "/who", &()).await;
    match r {
        Err(RpcError::WrongPeer {
            expected, found, ..
        }) => {
            assert_eq!(expected, "n3");
            assert!(found.contains("\"n1\""), "{found}");
        }
        other => panic!("a server naming n1 was taken for n3: {other:?}"),
    }
}
