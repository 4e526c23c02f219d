//! The daemon's RPC and client API: routes, and the thin handlers behind them. Every
//! route but `/join` requires a certificate from the cluster CA, and every request is
//! checked against the identity that certificate names (see [`authorize`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Json, Router};
use haven_net::{CertRole, JoinToken, Peer, PeerIdentity};
use haven_store::{NodeInfo, Request, Response};
use openraft::ChangeMembers;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};

use super::protocol::*;
use super::{ApiFailure, Daemon, WRITE_TIMEOUT, ha, heartbeat, raft_net, wall_ms};

pub const STATUS: &str = "/api/status";
pub const CONFIG: &str = "/api/config";
pub const CONFIG_APPLY: &str = "/api/config/apply";
pub const JOIN_TOKEN: &str = "/api/join-token";
pub const PROMOTE: &str = "/api/promote";
pub const JOIN: &str = "/join";
pub const CLEANUP: &str = "/api/cleanup";
const CLEANUP_LOCAL: &str = "/local/cleanup";
pub const WRITE_LOCAL: &str = "/local/write";
const ADD_LEARNER: &str = "/api/add-learner";
const ADD_LEARNER_LOCAL: &str = "/local/add-learner";
const PROMOTE_LOCAL: &str = "/local/promote";

type D = State<Arc<Daemon>>;
type ApiResult<T> = Result<Json<T>, ApiFailure>;

pub fn router(daemon: Arc<Daemon>) -> Router {
    let protected = Router::new()
        .route(raft_net::APPEND, post(raft_append))
        .route(raft_net::VOTE, post(raft_vote))
        .route(raft_net::SNAPSHOT, post(raft_snapshot))
        .route(heartbeat::PATH, post(heartbeat_in))
        .route(STATUS, post(status))
        .route(CONFIG, post(config_show))
        .route(CONFIG_APPLY, post(config_apply))
        .route(JOIN_TOKEN, post(join_token))
        .route(PROMOTE, post(promote))
        .route(PROMOTE_LOCAL, post(promote_local))
        .route(ADD_LEARNER, post(add_learner))
        .route(ADD_LEARNER_LOCAL, post(add_learner_local))
        .route(WRITE_LOCAL, post(write_local))
        .route(CLEANUP, post(cleanup))
        .route(CLEANUP_LOCAL, post(cleanup_local))
        .route(ha::OP_PATH, post(ha_op))
        .route(ha::REPORT_PATH, post(ha_report))
        .merge(super::fence::routes())
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            authorize,
        ))
        .layer(axum::middleware::from_fn_with_state(
            daemon.clone(),
            super::fence::lab_cut,
        ));
    let public = Router::new().route(JOIN, post(join));
    protected.merge(public).with_state(daemon)
}

/// Who sent a request: the identity its certificate names (verified by the TLS
/// handshake), and from where. [`authorize`] puts it in every protected request.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: PeerIdentity,
    pub addr: SocketAddr,
}

impl Caller {
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// A refusal of a request whose content speaks for someone this caller is not;
    /// logged, since it means a misbehaving or impersonating peer.
    pub fn refuse(&self, path: &str, claim: &str) -> ApiFailure {
        tracing::warn!(
            "refused {path} from {} ({}): {claim}",
            self.identity,
            self.addr
        );
        ApiFailure::forbidden(format!(
            "{path} refused: {claim}, but the request comes with the certificate of {}",
            self.identity
        ))
    }

    /// Refuses unless the node the request's `field` names is the caller itself.
    pub fn must_be(&self, path: &str, field: &str, claimed: &str) -> Result<(), ApiFailure> {
        if claimed == self.name() {
            Ok(())
        } else {
            Err(self.refuse(
                path,
                &format!("it claims to come from node {claimed:?} (field {field})"),
            ))
        }
    }
}

/// How long a request that only the leader may send waits for this node's Raft view to
/// name its sender as leader: just after an election the new leader can reach a
/// follower before its first append does. Many Raft heartbeats, and under the 3 s the
/// sender waits for an answer.
const LEADER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// Middleware: admits a request only if its certificate names a party of this cluster
/// that may use the endpoint, and hands that [`Caller`] to the handler (which checks
/// what the body claims). Peer endpoints need a daemon's certificate whose name is a
/// member; operator endpoints need a client certificate; `/ha/op` and `/ha/fence` only
/// come from the leader.
async fn authorize(
    State(d): D,
    Extension(peer): Extension<Peer>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req.uri().path().to_string();
    let refuse = |why: String| {
        tracing::warn!("refused {path} from {}: {why}", peer.addr);
        ApiFailure::forbidden(why).into_response()
    };
    if !peer.authenticated {
        return refuse("this endpoint requires a certificate from the cluster CA".into());
    }
    let Some(identity) = peer
        .identity
        .clone()
        .filter(|i| i.cluster == d.node.cluster)
    else {
        return refuse(format!(
            "{path} refused: the certificate does not name a node or client of cluster {} (certificates issued before identities were added must be reissued)",
            d.node.cluster
        ));
    };
    let caller = Caller {
        identity,
        addr: peer.addr,
    };
    if for_peers(&path) {
        if !caller.identity.role.is_daemon() {
            return refuse(format!(
                "{path} is for cluster nodes; the certificate of {} cannot use it",
                caller.identity
            ));
        }
        if !may_be_member(&d, &path, caller.name()) {
            return refuse(format!(
                "{path} refused: {} is not a member of this cluster",
                caller.identity
            ));
        }
        if sent_by_leader(&path)
            && let Err(e) = from_leader(&d, &caller, &path).await
        {
            return e.into_response();
        }
    } else if caller.identity.role != CertRole::Client {
        return refuse(format!(
            "{path} is for operators (client certificates, as in client.toml); the certificate of {} cannot use it",
            caller.identity
        ));
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Node-to-node endpoints: Raft, heartbeats, leader-local operations, agent and fence
/// traffic, membership changes. Operators (CLI, API) use the rest, which forward.
fn for_peers(path: &str) -> bool {
    ["/raft/", "/local/", "/ha/"]
        .iter()
        .any(|p| path.starts_with(p))
        || [heartbeat::PATH, PROMOTE, ADD_LEARNER].contains(&path)
}

/// Orders to run something here: only the coordinator, on the leader, gives them.
fn sent_by_leader(path: &str) -> bool {
    [ha::OP_PATH, super::fence::FENCE_RUN].contains(&path)
}

/// Whether `name` may be a member, as far as this node can tell: it is in the Raft
/// membership or the registry of joined nodes, or this node has no membership yet (a
/// fresh joiner first hears from the leader), or the request is a Raft RPC: a node
/// whose log predates a member's admission must still accept that member's appends if
/// it leads, or it could never catch up ([`raft_sender`] still binds the claimed id to
/// the name wherever either is known).
fn may_be_member(d: &Daemon, path: &str, name: &str) -> bool {
    let metrics = d.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    membership.nodes().next().is_none()
        || membership.nodes().any(|(_, n)| n.name == name)
        || d.view.state().nodes.contains_key(name)
        || path.starts_with("/raft/")
}

/// Refuses unless `caller` is the leader as this node knows it (waiting briefly for
/// this node to learn of a new leader).
async fn from_leader(d: &Daemon, caller: &Caller, path: &str) -> Result<(), ApiFailure> {
    let leads = |m: &openraft::RaftMetrics<u64, NodeInfo>| {
        m.current_leader
            .and_then(|id| m.membership_config.membership().get_node(&id))
            .is_some_and(|n| n.name == caller.name())
    };
    let mut rx = d.raft.metrics();
    if let Ok(Ok(_)) = tokio::time::timeout(LEADER_CATCH_UP, rx.wait_for(leads)).await {
        return Ok(());
    }
    let leader = d.leader().map(|(_, n)| n.name);
    Err(caller.refuse(
        path,
        &format!(
            "only the leader sends {path}, and this node's leader is {}",
            leader.map_or("unknown".to_string(), |l| format!("node {l:?}"))
        ),
    ))
}

/// Binds a Raft RPC's sender (the node id in its vote) to the caller: refused if this
/// node knows that id under another name, or the caller's name under another id.
fn raft_sender(
    d: &Daemon,
    caller: &Caller,
    path: &str,
    claimed: Option<u64>,
) -> Result<(), ApiFailure> {
    let Some(claimed) = claimed else {
        return Err(caller.refuse(path, "it names no sending node"));
    };
    let metrics = d.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let state = d.view.state();
    let name_of_claimed = membership
        .get_node(&claimed)
        .map(|n| n.name.clone())
        .or_else(|| {
            state
                .nodes
                .iter()
                .find(|(_, r)| r.id == claimed)
                .map(|(n, _)| n.clone())
        });
    let id_of_caller = membership
        .nodes()
        .find(|(_, n)| n.name == caller.name())
        .map(|(id, _)| *id)
        .or_else(|| state.nodes.get(caller.name()).map(|r| r.id));
    let mismatch = name_of_claimed
        .as_deref()
        .is_some_and(|n| n != caller.name())
        || id_of_caller.is_some_and(|id| id != claimed);
    if mismatch {
        let known = name_of_claimed.map_or(String::new(), |n| format!(" ({n:?})"));
        return Err(caller.refuse(
            path,
            &format!("it claims to come from node id {claimed}{known}"),
        ));
    }
    Ok(())
}

async fn raft_append(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(req): Json<AppendEntriesRequest<haven_store::TypeConfig>>,
) -> ApiResult<serde_json::Value> {
    raft_sender(
        &d,
        &caller,
        raft_net::APPEND,
        req.vote.leader_id().voted_for(),
    )?;
    Ok(Json(to_json(&d.raft.append_entries(req).await)))
}

async fn raft_vote(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(req): Json<VoteRequest<u64>>,
) -> ApiResult<serde_json::Value> {
    raft_sender(
        &d,
        &caller,
        raft_net::VOTE,
        req.vote.leader_id().voted_for(),
    )?;
    // A peer this node fenced must not lead before its mark is committed: as leader it
    // would know nothing of it and let itself back in.
    if let Some(why) = super::fence::vote_refusal(&d, caller.name()) {
        tracing::info!("vote refused: {why}");
        return Err(ApiFailure::refused(why));
    }
    Ok(Json(to_json(&d.raft.vote(req).await)))
}

async fn raft_snapshot(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(req): Json<InstallSnapshotRequest<haven_store::TypeConfig>>,
) -> ApiResult<serde_json::Value> {
    raft_sender(
        &d,
        &caller,
        raft_net::SNAPSHOT,
        req.vote.leader_id().voted_for(),
    )?;
    Ok(Json(to_json(&d.raft.install_snapshot(req).await)))
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

async fn heartbeat_in(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(hb): Json<Heartbeat>,
) -> ApiResult<HeartbeatAck> {
    caller.must_be(heartbeat::PATH, "from", &hb.from)?;
    if d.lab.link_cut(&hb.link) {
        return Err(ApiFailure::unavailable("lab partition: this link is cut"));
    }
    // The sender's certificate names it; its heartbeat shows that this link carries
    // traffic in its direction too.
    d.heard(&hb.from, &hb.link, hb.incarnation);
    Ok(Json(HeartbeatAck {
        name: d.node.name.clone(),
        incarnation: d.incarnation,
    }))
}

async fn config_show(State(d): D) -> Json<ConfigReply> {
    let c = d.view.state().config;
    Json(ConfigReply {
        version: c.version,
        text: c.text,
    })
}

async fn config_apply(State(d): D, Json(req): Json<ApplyConfig>) -> ApiResult<ConfigReply> {
    let next = haven_model::Config::from_toml("the submitted configuration", &req.text)
        .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
    super::fence::refuse_node_removal(&d, &next)?;
    match d
        .write(Request::ApplyConfig {
            based_on: req.based_on,
            text: req.text.clone(),
        })
        .await?
    {
        Response::ConfigVersion(version) => Ok(Json(ConfigReply {
            version,
            text: req.text,
        })),
        Response::Refused(why) => Err(ApiFailure::refused(why)),
        other => Err(ApiFailure::unavailable(format!(
            "unexpected answer {other:?}"
        ))),
    }
}

async fn join_token(State(d): D, Json(req): Json<JoinTokenRequest>) -> ApiResult<JoinTokenReply> {
    if req.ttl_secs == 0 || req.ttl_secs > 7 * 24 * 3600 {
        return Err(ApiFailure::bad_request(
            "ttl_secs must be between 1 second and 7 days",
        ));
    }
    let fp =
        d.ca.fingerprint()
            .map_err(|e| ApiFailure::unavailable(e.to_string()))?;
    let token = JoinToken::generate(&fp);
    let expires_at_ms = wall_ms() + req.ttl_secs * 1000;
    d.write(Request::AddToken {
        id: token.id.clone(),
        secret_hash: token.secret_hash(),
        expires_at_ms,
    })
    .await?;
    Ok(Json(JoinTokenReply {
        token: token.to_string(),
        expires_at_ms,
    }))
}

async fn join(State(d): D, Json(req): Json<JoinRequest>) -> ApiResult<JoinReply> {
    let token: JoinToken = req
        .token
        .parse()
        .map_err(|e: haven_net::TokenError| ApiFailure::forbidden(e.to_string()))?;
    let fp =
        d.ca.fingerprint()
            .map_err(|e| ApiFailure::unavailable(e.to_string()))?;
    if token.ca_fingerprint != fp {
        return Err(ApiFailure::forbidden(
            "join refused: the token was issued by another cluster",
        ));
    }
    for (i, a) in req.addrs.iter().enumerate() {
        a.parse::<SocketAddr>()
            .map_err(|_| ApiFailure::bad_request(format!("addrs[{i}]: {a:?} is not IP:PORT")))?;
    }
    let id = match d
        .write(Request::Join {
            token_id: token.id.clone(),
            secret_hash: token.secret_hash(),
            now_ms: wall_ms(),
            name: req.name.clone(),
            addrs: req.addrs.clone(),
            witness: req.witness,
            learner: req.learner,
        })
        .await?
    {
        Response::NodeId(id) => id,
        Response::Refused(why) => return Err(ApiFailure::forbidden(why)),
        other => {
            return Err(ApiFailure::unavailable(format!(
                "unexpected answer {other:?}"
            )));
        }
    };
    tracing::info!("admitted {} as node {id}", req.name);
    // The certificate names the node the join just registered; the registry refuses a
    // second join under a name that is already a member, so no two certificates of
    // members name the same node.
    let role = if req.witness {
        CertRole::Witness
    } else {
        CertRole::Node
    };
    let issued =
        d.ca.issue(&req.name, role)
            .map_err(|e| ApiFailure::unavailable(e.to_string()))?;
    let learner = AddLearner {
        id,
        name: req.name.clone(),
        addrs: req.addrs.clone(),
    };
    let _: Empty = leader_call(&d, ADD_LEARNER_LOCAL, &learner).await?;
    let seeds = d
        .members()
        .into_iter()
        .filter_map(|(_, n)| n.addrs.first().cloned())
        .collect();
    Ok(Json(JoinReply {
        id,
        cluster: d.node.cluster.clone(),
        ca_pem: d.ca.cert_pem().to_string(),
        ca_key_pem: d.ca.key_pem().to_string(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        seeds,
    }))
}

/// Runs a leader-only operation: here if this node leads, else on the leader.
pub(super) async fn leader_call<Q: serde::Serialize, R: serde::de::DeserializeOwned>(
    d: &Daemon,
    local_path: &str,
    req: &Q,
) -> Result<R, ApiFailure> {
    let Some((_, leader)) = d.leader() else {
        return Err(ApiFailure::unavailable(
            "no leader: the cluster has no quorum",
        ));
    };
    let Some(addr) = d.peer_addr(&leader) else {
        return Err(ApiFailure::unavailable("the leader has no address"));
    };
    // Forwarded operator actions go to the leader's own daemon, by its certificate.
    d.rpc
        .call_node(None, &addr, &leader.name, local_path, req)
        .await
        .map_err(|e| match e {
            haven_net::RpcError::Remote {
                status, message, ..
            } => ApiFailure(
                axum::http::StatusCode::from_u16(status)
                    .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                message,
            ),
            e => ApiFailure::unavailable(format!("the leader: {e}")),
        })
}

pub(super) fn require_leader(d: &Daemon) -> Result<(), ApiFailure> {
    if d.is_leader() {
        Ok(())
    } else {
        Err(ApiFailure::unavailable("this node is not the leader"))
    }
}

async fn add_learner(State(d): D, Json(req): Json<AddLearner>) -> ApiResult<Empty> {
    leader_call(&d, ADD_LEARNER_LOCAL, &req).await.map(Json)
}

async fn add_learner_local(State(d): D, Json(req): Json<AddLearner>) -> ApiResult<Empty> {
    require_leader(&d)?;
    // Only a node the join admitted (committed with its id) becomes a learner, whichever
    // member forwards the request.
    if d.view.state().nodes.get(&req.name).map(|n| n.id) != Some(req.id) {
        return Err(ApiFailure::forbidden(format!(
            "node {:?} with id {} was not admitted by a join",
            req.name, req.id
        )));
    }
    let info = NodeInfo {
        name: req.name,
        addrs: req.addrs,
    };
    // Not blocking: the new host is not running yet and cannot catch up until it is.
    membership_change("adding the learner", || {
        d.raft.add_learner(req.id, info.clone(), false)
    })
    .await?;
    Ok(Json(Empty {}))
}

/// Runs a membership change, retrying while another one is still in progress (Raft
/// allows one at a time, and joins can overlap), within the write timeout.
async fn membership_change<F, Fut, T>(what: &str, mut change: F) -> Result<T, ApiFailure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RaftError<u64, ClientWriteError<u64, NodeInfo>>>>,
{
    let deadline = tokio::time::Instant::now() + WRITE_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, change()).await {
            Err(_) => {
                return Err(ApiFailure::unavailable(format!(
                    "{what} timed out after {WRITE_TIMEOUT:?}: no quorum"
                )));
            }
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                ChangeMembershipError::InProgress(_),
            )))) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => return Err(ApiFailure::unavailable(format!("{what}: {e}"))),
        }
    }
}

async fn promote(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(req): Json<Promote>,
) -> ApiResult<Empty> {
    // A node asks for its own promotion; the leader then trusts the forwarding member.
    let state = d.view.state();
    let Some((name, _)) = state.nodes.iter().find(|(_, n)| n.id == req.id) else {
        return Err(ApiFailure::forbidden(format!(
            "node id {} never joined this cluster",
            req.id
        )));
    };
    caller.must_be(PROMOTE, "id", name)?;
    leader_call(&d, PROMOTE_LOCAL, &req).await.map(Json)
}

async fn promote_local(State(d): D, Json(req): Json<Promote>) -> ApiResult<Empty> {
    require_leader(&d)?;
    let state = d.view.state();
    let Some((name, rec)) = state.nodes.iter().find(|(_, n)| n.id == req.id) else {
        return Err(ApiFailure::forbidden(format!(
            "node id {} never joined this cluster",
            req.id
        )));
    };
    if rec.learner {
        return Err(ApiFailure::forbidden(format!(
            "node {name} joined as a learner and stays one"
        )));
    }
    let in_membership = d.members().iter().any(|(n, _)| n == name);
    if !in_membership {
        let info = NodeInfo {
            name: name.clone(),
            addrs: rec.addrs.clone(),
        };
        membership_change("adding the learner", || {
            d.raft.add_learner(req.id, info.clone(), true)
        })
        .await?;
    }
    membership_change("promotion", || {
        d.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([req.id])), false)
    })
    .await?;
    tracing::info!("{name} is now a voter");
    Ok(Json(Empty {}))
}

async fn write_local(State(d): D, Json(req): Json<Request>) -> ApiResult<Response> {
    require_leader(&d)?;
    match tokio::time::timeout(WRITE_TIMEOUT, d.raft.client_write(req)).await {
        Err(_) => Err(ApiFailure::unavailable("the write timed out: no quorum")),
        Ok(Ok(r)) => Ok(Json(r.data)),
        Ok(Err(e)) => Err(ApiFailure::unavailable(format!("the write failed: {e}"))),
    }
}

async fn cleanup(State(d): D, Json(req): Json<Cleanup>) -> ApiResult<Empty> {
    d.write(Request::ClearFailures {
        resource: req.resource.clone(),
        node: None,
    })
    .await?;
    leader_call(&d, CLEANUP_LOCAL, &req).await.map(Json)
}

async fn cleanup_local(State(d): D, Json(req): Json<Cleanup>) -> ApiResult<Empty> {
    require_leader(&d)?;
    let _ = d.ha.coord.send(ha::CoordInput::Cleanup {
        resource: req.resource,
    });
    Ok(Json(Empty {}))
}

async fn ha_op(State(d): D, Json(req): Json<haven_ha::OpRequest>) -> ApiResult<Empty> {
    if d.node.witness {
        return Err(ApiFailure::refused(format!(
            "{} is a witness and runs no resources",
            d.node.name
        )));
    }
    d.ha.agent
        .send(ha::AgentInput::Request(req))
        .map_err(|_| ApiFailure::unavailable("the node agent has stopped"))?;
    Ok(Json(Empty {}))
}

async fn ha_report(
    State(d): D,
    Extension(caller): Extension<Caller>,
    Json(msg): Json<ha::ReportMsg>,
) -> ApiResult<Empty> {
    caller.must_be(ha::REPORT_PATH, "node", &msg.node)?;
    if caller.identity.role == CertRole::Witness {
        return Err(caller.refuse(
            ha::REPORT_PATH,
            "it reports an operation, and a witness runs none",
        ));
    }
    if !d.is_leader() {
        return Err(ApiFailure::unavailable("this node is not the leader"));
    }
    let _ = d.ha.coord.send(ha::CoordInput::Report {
        node: msg.node,
        report: msg.report,
    });
    Ok(Json(Empty {}))
}

async fn status(State(d): D) -> Json<StatusReport> {
    let live = super::fence::live_ls(&d).await;
    Json(build_status(&d, live.as_ref()))
}

fn agent_name(p: &haven_model::config::Primitive) -> String {
    match &p.provider {
        Some(prov) => format!("{}:{}:{}", p.class, prov, p.agent),
        None => format!("{}:{}", p.class, p.agent),
    }
}

/// What is known of a node's fencing: the coordinator's live picture when it answered,
/// else the committed fence marks and the coordinator's last published node states.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fencing {
    Clear,
    /// Lost or being fenced, not yet confirmed down: whatever it ran may still run.
    InDoubt {
        reason: String,
        why: String,
    },
    /// Confirmed down; kept out until an operator allows it back.
    Fenced {
        reason: String,
    },
}

/// The state the coordinator gives `name`: live if it answered, else as last committed.
fn coordinator_state<'a>(
    name: &str,
    state: &'a haven_store::ClusterState,
    live: Option<&'a super::fence::FenceLs>,
) -> Option<&'a str> {
    match live {
        Some(ls) => ls
            .members
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_str()),
        None => state.node_states.get(name).map(String::as_str),
    }
}

fn fencing_of(
    name: &str,
    state: &haven_store::ClusterState,
    live: Option<&super::fence::FenceLs>,
    config: Option<&haven_model::Config>,
) -> Fencing {
    let victim = live.and_then(|ls| ls.victims.iter().find(|v| v.name == name));
    match (victim, state.fencing.get(name)) {
        (Some(v), _) if v.state == "confirmed" => Fencing::Fenced {
            reason: v.reason.clone(),
        },
        (Some(v), _) => Fencing::InDoubt {
            reason: v.reason.clone(),
            why: victim_why(name, &v.state, &v.detail),
        },
        (None, Some(m)) if m.confirmed => Fencing::Fenced {
            reason: m.reason.clone(),
        },
        (None, Some(m)) => Fencing::InDoubt {
            reason: m.reason.clone(),
            why: configured_why(name, config),
        },
        (None, None) if coordinator_state(name, state, live) == Some("unclean") => {
            Fencing::InDoubt {
                reason: "lost".into(),
                why: configured_why(name, config),
            }
        }
        (None, None) => Fencing::Clear,
    }
}

/// Where the coordinator's fencer stands with a victim, for an operator.
fn victim_why(name: &str, state: &str, detail: &str) -> String {
    match state {
        "waiting-ack" => format!(
            "waiting for an operator: power {name} off, then run `haven fence ack {name}` ({detail})"
        ),
        "exhausted" => format!(
            "every fence level failed ({detail}); once {name} is down, `haven fence ack {name}` ends it"
        ),
        "fencing" => format!("being fenced: {detail}"),
        "waiting-watchdog" => format!("waiting for its watchdog to reset it: {detail}"),
        "delaying" => format!("about to be fenced: {detail}"),
        other => format!("{other}: {detail}"),
    }
}

/// What fencing `name` takes, from the configuration alone (when the coordinator did
/// not answer): the devices that can fence it.
fn configured_why(name: &str, config: Option<&haven_model::Config>) -> String {
    use haven_ha::StepKind;
    let levels = config
        .map(|c| haven_ha::adapter::fence_levels(c, name))
        .unwrap_or_default();
    let steps: Vec<&haven_ha::FenceStep> = levels.iter().flatten().collect();
    if steps.is_empty() {
        format!("no fence device can fence {name}: power it off, then run `haven fence ack {name}`")
    } else if steps.iter().all(|s| s.kind == StepKind::Manual) {
        format!(
            "only an operator can fence {name}: power it off, then run `haven fence ack {name}`"
        )
    } else {
        format!(
            "being fenced (`haven fence ls` shows how far; `haven fence ack {name}` once it is down)"
        )
    }
}

/// A node's state and why, from its fencing, what this node's detector hears, the
/// coordinator's judgement and the configuration's standby/maintenance.
fn node_state(
    name: &str,
    fencing: &Fencing,
    liveness: Option<haven_ha::Liveness>,
    coordinator: Option<&str>,
    standby: bool,
    maintenance: bool,
) -> (&'static str, Option<String>) {
    use haven_ha::Liveness;
    let heard = liveness == Some(Liveness::Alive);
    match fencing {
        Fencing::InDoubt { reason, why } => {
            let back = if heard {
                "; heard again, but what it ran may still run"
            } else {
                ""
            };
            ("unclean", Some(format!("in doubt ({reason}){back}: {why}")))
        }
        Fencing::Fenced { reason } if heard => (
            "fenced",
            Some(format!(
                "fenced ({reason}); its daemon is back and stays out until `haven node online {name}`"
            )),
        ),
        Fencing::Fenced { reason } => ("fenced", Some(format!("fenced ({reason}); down"))),
        Fencing::Clear => match liveness {
            // The coordinator keeps it out (a node lost without fencing, or one whose
            // mark was just removed and is being let in).
            Some(Liveness::Alive) if matches!(coordinator, Some("offline" | "fenced")) => (
                "offline",
                Some(format!(
                    "heard, but the coordinator keeps it out until `haven node online {name}`"
                )),
            ),
            Some(Liveness::Alive) if maintenance => ("maintenance", None),
            Some(Liveness::Alive) if standby => ("standby", None),
            Some(Liveness::Alive) => ("online", None),
            Some(Liveness::Lost { .. }) => ("offline", None),
            Some(Liveness::Pending) | None => ("pending", None),
        },
    }
}

/// `running_on` and `in_doubt_on` of a resource: the nodes it was seen running on,
/// split by whether they are in doubt. A node in doubt counts if the coordinator
/// judges it may still run there (`frozen_on`: a start was in flight when it was
/// lost), or its committed placement or the last committed operation there has it
/// running (a new leader may not have seen it run).
fn split_placement(
    placed: &[String],
    records: Option<&BTreeMap<String, haven_store::state::ResourceRecord>>,
    in_doubt: &BTreeMap<String, String>,
    frozen_on: &[&str],
) -> (Vec<String>, Vec<String>) {
    let running_on = placed
        .iter()
        .filter(|n| !in_doubt.contains_key(*n))
        .cloned()
        .collect();
    let in_doubt_on = in_doubt
        .keys()
        .filter(|n| {
            placed.contains(n)
                || frozen_on.contains(&n.as_str())
                || records
                    .and_then(|r| r.get(*n))
                    .is_some_and(|rec| rec.running)
        })
        .cloned()
        .collect();
    (running_on, in_doubt_on)
}

/// Whether the last recorded operation leaves the resource Promoted there: a promote
/// that succeeded, or a monitor that found it promoted (OCF's 8); a demote or a plain
/// monitor's 0 does not.
fn promoted(rec: &haven_store::state::ResourceRecord) -> bool {
    rec.running && (rec.rc == 8 || (rec.last_op == "promote" && rec.rc == 0))
}

pub fn build_status(d: &Daemon, live: Option<&super::fence::FenceLs>) -> StatusReport {
    let state = d.view.state();
    let metrics = d.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let links_of = |name: &str| -> Vec<(String, bool)> {
        d.membership
            .lock()
            .map(|m| m.links(name))
            .unwrap_or_default()
    };
    let config = haven_model::Config::from_toml("cluster configuration", &state.config.text).ok();
    let mut nodes = Vec::new();
    // Node in doubt → why it is not yet confirmed down.
    let mut in_doubt: BTreeMap<String, String> = BTreeMap::new();
    for (id, info) in membership.nodes() {
        let rec = state.nodes.get(&info.name);
        let configured = config
            .as_ref()
            .and_then(|c| c.nodes.iter().find(|n| n.name == info.name));
        let fencing = fencing_of(&info.name, &state, live, config.as_ref());
        if let Fencing::InDoubt { why, .. } = &fencing {
            in_doubt.insert(info.name.clone(), why.clone());
        }
        let (state_name, detail) = node_state(
            &info.name,
            &fencing,
            d.liveness(&info.name),
            coordinator_state(&info.name, &state, live),
            configured.is_some_and(|n| n.standby),
            configured.is_some_and(|n| n.maintenance),
        );
        let role = if rec.is_some_and(|r| r.witness) {
            "witness"
        } else if voters.contains(id) {
            "voter"
        } else {
            "learner"
        };
        let up: BTreeMap<String, bool> = links_of(&info.name).into_iter().collect();
        let links = info
            .addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let name = heartbeat::link_name(i);
                LinkStatus {
                    up: up.get(&name).copied().unwrap_or(false),
                    name,
                    addr: addr.clone(),
                }
            })
            .collect();
        nodes.push(NodeStatus {
            name: info.name.clone(),
            id: *id,
            state: state_name.to_string(),
            role: role.to_string(),
            links,
            detail,
        });
    }
    let mut resources = Vec::new();
    let mut failed_actions = Vec::new();
    if let Some(config) = &config {
        for p in &config.resources {
            let records = state.resources.get(&p.id);
            let placed = state.placement.get(&p.id).cloned().unwrap_or_default();
            let frozen_on: Vec<&str> = live
                .map(|ls| {
                    ls.frozen
                        .iter()
                        .filter(|(r, _)| *r == p.id)
                        .map(|(_, n)| n.as_str())
                        .collect()
                })
                .unwrap_or_default();
            let (running_on, in_doubt_on) =
                split_placement(&placed, records, &in_doubt, &frozen_on);
            let frozen = (!in_doubt_on.is_empty()).then(|| {
                let whys: Vec<&str> = in_doubt_on
                    .iter()
                    .filter_map(|n| in_doubt.get(n).map(String::as_str))
                    .collect();
                format!(
                    "frozen until {} {} confirmed down: {}",
                    in_doubt_on.join(" and "),
                    if in_doubt_on.len() == 1 { "is" } else { "are" },
                    whys.join("; ")
                )
            });
            let failcounts = records
                .map(|r| {
                    r.iter()
                        .filter(|(_, rec)| rec.failcount > 0)
                        .map(|(n, rec)| (n.clone(), rec.failcount))
                        .collect()
                })
                .unwrap_or_default();
            let unpromotable = state
                .volumes_outdated
                .get(&p.id)
                .map(|m| {
                    m.iter()
                        .map(|(n, r)| {
                            let why = format!(
                                "replica outdated since generation {} (recorded by {}); not promoted until resynced",
                                r.generation, r.by
                            );
                            (n.clone(), why)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let promoted_on = running_on
                .iter()
                .filter(|n| records.and_then(|r| r.get(*n)).is_some_and(promoted))
                .cloned()
                .collect();
            resources.push(ResourceStatus {
                id: p.id.clone(),
                agent: agent_name(p),
                promoted_on,
                running_on,
                in_doubt_on,
                frozen,
                failcounts,
                unpromotable,
            });
        }
    }
    for (rsc, per_node) in &state.resources {
        for (node, rec) in per_node {
            if let Some(f) = &rec.last_failure {
                failed_actions.push(FailedAction {
                    resource: rsc.clone(),
                    node: node.clone(),
                    detail: format!("{f} (failcount {})", rec.failcount),
                });
            }
        }
    }
    let leader = metrics
        .current_leader
        .and_then(|id| membership.get_node(&id).map(|n| n.name.clone()));
    StatusReport {
        cluster: d.node.cluster.clone(),
        reported_by: d.node.name.clone(),
        quorate: d.quorate(),
        leader,
        term: metrics.current_term,
        config_version: state.config.version,
        nodes,
        resources,
        failed_actions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_ha::Liveness;
    use haven_store::FenceMark;

    fn config(fencing: &str) -> haven_model::Config {
        let text = format!(
            "[options]\nstonith-enabled = true\n\n[[nodes]]\nname = \"n1\"\naddrs = [\"127.0.0.1\"]\n\n[[nodes]]\nname = \"n2\"\naddrs = [\"127.0.0.2\"]\n{fencing}"
        );
        haven_model::Config::from_toml("test", &text).expect("valid configuration")
    }

    fn mark(state: &mut haven_store::ClusterState, node: &str, confirmed: bool) {
        state.fencing.insert(
            node.into(),
            FenceMark {
                confirmed,
                reason: "it stopped heartbeating".into(),
            },
        );
    }

    #[test]
    fn a_node_in_doubt_is_unclean_and_says_who_can_end_it() {
        let mut state = haven_store::ClusterState::default();
        mark(&mut state, "n2", false);
        let manual = config("\n[[fencing.devices]]\nid = \"op\"\nagent = \"manual\"\n");
        let f = fencing_of("n2", &state, None, Some(&manual));
        let (s, detail) = node_state("n2", &f, Some(Liveness::Alive), None, false, false);
        assert_eq!(s, "unclean", "heard again, it is still in doubt");
        let detail = detail.expect("a reason");
        assert!(
            detail.contains("only an operator") && detail.contains("haven fence ack n2"),
            "{detail}"
        );
        let none = config("");
        let Fencing::InDoubt { why, .. } = fencing_of("n2", &state, None, Some(&none)) else {
            panic!("not in doubt");
        };
        assert!(why.contains("no fence device can fence n2"), "{why}");
        // Lost and judged unclean before any mark is committed: in doubt too.
        let mut lost = haven_store::ClusterState::default();
        lost.node_states.insert("n2".into(), "unclean".into());
        assert!(matches!(
            fencing_of("n2", &lost, None, Some(&none)),
            Fencing::InDoubt { .. }
        ));
    }

    #[test]
    fn the_coordinators_live_picture_wins_over_what_was_committed() {
        let mut state = haven_store::ClusterState::default();
        mark(&mut state, "n2", false);
        let mut ls = super::super::fence::FenceLs {
            leader: "n1".into(),
            members: vec![
                ("n1".into(), "online".into()),
                ("n2".into(), "unclean".into()),
            ],
            heard: vec!["n1".into()],
            victims: vec![super::super::fence::VictimInfo {
                name: "n2".into(),
                reason: "it stopped heartbeating".into(),
                state: "exhausted".into(),
                detail: "every level failed; retrying in 5000 ms".into(),
            }],
            victim_now: Some("n2".into()),
            wait_state: "fencing".into(),
            frozen: vec![],
        };
        let Fencing::InDoubt { why, .. } = fencing_of("n2", &state, Some(&ls), None) else {
            panic!("not in doubt");
        };
        assert!(
            why.contains("every fence level failed") && why.contains("retrying"),
            "{why}"
        );
        ls.victims[0].state = "confirmed".into();
        assert!(matches!(
            fencing_of("n2", &state, Some(&ls), None),
            Fencing::Fenced { .. }
        ));
    }

    #[test]
    fn a_fenced_node_that_is_heard_again_is_kept_out_not_online() {
        let mut state = haven_store::ClusterState::default();
        mark(&mut state, "n2", true);
        let f = fencing_of("n2", &state, None, None);
        let (s, detail) = node_state(
            "n2",
            &f,
            Some(Liveness::Alive),
            Some("offline"),
            false,
            false,
        );
        assert_eq!(s, "fenced");
        assert!(
            detail.is_some_and(|d| d.contains("haven node online n2")),
            "the operator is told how to let it back"
        );
        // Its mark removed, the coordinator still keeps it out until it lets it in.
        let (s, _) = node_state(
            "n2",
            &Fencing::Clear,
            Some(Liveness::Alive),
            Some("offline"),
            false,
            false,
        );
        assert_eq!(s, "offline");
        let (s, detail) = node_state(
            "n2",
            &Fencing::Clear,
            Some(Liveness::Alive),
            Some("online"),
            true,
            false,
        );
        assert_eq!((s, detail), ("standby", None));
    }

    #[test]
    fn a_resource_on_a_node_in_doubt_is_in_doubt_there_not_stopped() {
        let in_doubt = BTreeMap::from([("n2".to_string(), "waiting".to_string())]);
        let placed = vec!["n2".to_string()];
        let (on, doubt) = split_placement(&placed, None, &in_doubt, &[]);
        assert_eq!((on, doubt), (vec![], vec!["n2".to_string()]));
        // The coordinator's word: a start was in flight there when it was lost.
        let (on, doubt) = split_placement(&[], None, &in_doubt, &["n2"]);
        assert_eq!((on, doubt), (vec![], vec!["n2".to_string()]));
        // A new leader's placement may have lost it: the last committed operation
        // still says it ran there.
        let records = BTreeMap::from([(
            "n2".to_string(),
            haven_store::state::ResourceRecord {
                running: true,
                ..Default::default()
            },
        )]);
        let (on, doubt) = split_placement(&[], Some(&records), &in_doubt, &[]);
        assert_eq!((on, doubt), (vec![], vec!["n2".to_string()]));
        let (on, doubt) = split_placement(&["n1".to_string()], None, &in_doubt, &[]);
        assert_eq!((on, doubt), (vec!["n1".to_string()], vec![]));
    }
}
