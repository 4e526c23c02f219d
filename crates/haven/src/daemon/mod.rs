//! The daemon's runtime wiring: Raft over mTLS RPC, the API, heartbeats.
//!
//! Logic lives elsewhere: consensus in openraft (haven-store), failure detection in
//! haven-ha; this module only connects them to sockets, files and the clock.

pub mod api;
pub mod bench;
pub mod client;
pub mod failover_bench;
pub mod fence;
pub mod files;
pub mod ha;
pub mod heartbeat;
pub mod node_cmd;
pub mod protocol;
pub mod raft_net;
pub mod resource_cmd;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use haven_ha::membership::{Liveness, Membership, Timeouts};
use haven_ha::time::Time;
use haven_net::{ClusterCa, RpcClient, TlsIdentity};
use haven_store::{NodeInfo, Raft, Request, Response, StateView};
use openraft::error::{ClientWriteError, RaftError};

use files::{NodeDir, NodeToml};
use protocol::Promote;

/// How long a write may wait for a quorum before the caller is told there is none.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// A refusal or failure as the API reports it: an HTTP status and a sentence.
#[derive(Debug)]
pub struct ApiFailure(pub axum::http::StatusCode, pub String);

impl ApiFailure {
    pub fn refused(msg: impl Into<String>) -> Self {
        ApiFailure(axum::http::StatusCode::CONFLICT, msg.into())
    }
    pub fn unavailable(msg: impl Into<String>) -> Self {
        ApiFailure(axum::http::StatusCode::SERVICE_UNAVAILABLE, msg.into())
    }
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiFailure(axum::http::StatusCode::BAD_REQUEST, msg.into())
    }
    pub fn forbidden(msg: impl Into<String>) -> Self {
        ApiFailure(axum::http::StatusCode::FORBIDDEN, msg.into())
    }
}

impl axum::response::IntoResponse for ApiFailure {
    fn into_response(self) -> axum::response::Response {
        (self.0, self.1).into_response()
    }
}

pub struct Daemon {
    pub node: NodeToml,
    pub raft: Raft,
    pub view: StateView,
    /// Raft and API calls.
    pub rpc: RpcClient,
    /// Heartbeats: a timeout shorter than the detection time, so a stuck peer cannot
    /// hold a heartbeat open past the point where it should count as silent.
    pub hb_rpc: RpcClient,
    pub ca: ClusterCa,
    /// Shared with the Raft network, which routes by it (see [`peer_addr`]).
    pub membership: Arc<Mutex<Membership>>,
    /// Senders into the coordinator and agent loops.
    pub ha: ha::Handles,
    /// The node's directory; resource agents keep their state under it.
    pub state_dir: std::path::PathBuf,
    /// The lab's fault switch (inert unless started with `--lab`).
    pub lab: Arc<fence::LabSwitch>,
    /// Peers this node fenced whose marks the replicated state does not hold yet.
    pub local_marks: fence::LocalMarks,
    /// Random at each start (never 0, which means "not told"); sent with heartbeats.
    pub incarnation: u64,
    started: std::time::Instant,
}

pub fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Daemon {
    /// Monotonic time since the daemon started, for the failure detector.
    pub fn now(&self) -> Time {
        Time::from_millis(self.started.elapsed().as_millis() as u64)
    }

    pub fn heard(&self, node: &str, link: &str, incarnation: u64) {
        // An answer that crossed a link the lab has cut since (or before this daemon
        // read its switch) proves nothing about the link now.
        if self.lab.link_cut(link) {
            return;
        }
        let now = self.now();
        if let Ok(mut m) = self.membership.lock() {
            m.handle_heartbeat(node, link, now);
        }
        // Only the leader's coordinator uses it; elsewhere the loop drops it.
        let _ = self.ha.coord.send(ha::CoordInput::Heartbeat {
            node: node.to_string(),
            link: link.to_string(),
            incarnation,
        });
    }

    /// Raft members (voters and learners) by name.
    pub fn members(&self) -> Vec<(String, NodeInfo)> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .nodes()
            .map(|(_, info)| (info.name.clone(), info.clone()))
            .collect()
    }

    pub fn voters(&self) -> BTreeSet<u64> {
        let metrics = self.raft.metrics().borrow().clone();
        metrics.membership_config.membership().voter_ids().collect()
    }

    pub fn leader(&self) -> Option<(u64, NodeInfo)> {
        let metrics = self.raft.metrics().borrow().clone();
        let id = metrics.current_leader?;
        let info = metrics
            .membership_config
            .membership()
            .get_node(&id)?
            .clone();
        Some((id, info))
    }

    pub fn is_leader(&self) -> bool {
        self.leader().map(|(id, _)| id) == Some(self.node.id)
    }

    /// The leader, and a majority has acknowledged this leadership since it began
    /// (openraft's quorum-acked clock). openraft restores the vote of a daemon that
    /// restarts, so a former leader may call itself leader again at once; until the
    /// others confirm it (they would not if they have moved on) it must not coordinate.
    pub fn is_confirmed_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(self.node.id) && m.millis_since_quorum_ack.is_some()
    }

    /// Where to reach `info`'s node now (see [`peer_addr`]).
    pub fn peer_addr(&self, info: &NodeInfo) -> Option<String> {
        peer_addr(&self.membership, info)
    }

    pub fn liveness(&self, name: &str) -> Option<Liveness> {
        self.membership.lock().ok()?.liveness(name)
    }

    /// Quorum as this node sees it: a majority of the Raft voters alive (the Raft
    /// majority rule, judged from heartbeats).
    pub fn quorate(&self) -> bool {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let alive = voters
            .iter()
            .filter(|id| {
                membership
                    .get_node(id)
                    .is_some_and(|n| self.liveness(&n.name) == Some(Liveness::Alive))
            })
            .count();
        !voters.is_empty() && alive * 2 > voters.len()
    }

    /// Commits `req`, on the leader (forwarding if this node is not it).
    pub async fn write(&self, req: Request) -> Result<Response, ApiFailure> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(req.clone())).await {
            Err(_) => Err(ApiFailure::unavailable(format!(
                "the write was not committed within {WRITE_TIMEOUT:?}: the cluster has no quorum"
            ))),
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                let Some(addr) = f.leader_node.and_then(|n| self.peer_addr(&n)) else {
                    return Err(ApiFailure::unavailable(
                        "no leader is known: the cluster has no quorum (yet)",
                    ));
                };
                self.rpc
                    .call(&addr, api::WRITE_LOCAL, &req)
                    .await
                    .map_err(|e| ApiFailure::unavailable(format!("forwarding to the leader: {e}")))
            }
            Ok(Err(e)) => Err(ApiFailure::unavailable(format!("the write failed: {e}"))),
        }
    }

    /// Where to send something only the leader can do: the leader if known, else the
    /// seeds.
    pub fn leader_candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .leader()
            .and_then(|(_, n)| self.peer_addr(&n))
            .into_iter()
            .collect();
        out.extend(self.node.seeds.iter().cloned());
        out
    }
}

/// The address to reach a peer at: that of its first link the failure detector has up,
/// so RPC (Raft, operations, fencing) follows the heartbeats onto a redundant link
/// when link0 is cut; link0's when none is up or the detector has not heard it yet.
pub fn peer_addr(membership: &Mutex<Membership>, info: &NodeInfo) -> Option<String> {
    let links = membership
        .lock()
        .map(|m| m.links(&info.name))
        .unwrap_or_default();
    info.addrs
        .iter()
        .enumerate()
        .find(|(i, _)| {
            let name = heartbeat::link_name(*i);
            links.iter().any(|(l, up)| *up && *l == name)
        })
        .or_else(|| info.addrs.iter().enumerate().next())
        .map(|(_, a)| a.clone())
}

/// Runs the daemon of the node in `dir` until SIGTERM or SIGINT.
pub async fn run(dir: &Path, witness: bool, lab: bool) -> anyhow::Result<()> {
    let nd = NodeDir::new(dir);
    let node = nd.load()?;
    if witness && !node.witness {
        anyhow::bail!(
            "{}: node {} did not join as a witness (field witness = false); a witness joins with `haven cluster join --witness`",
            nd.node_toml().display(),
            node.name
        );
    }
    let ca_pem = nd.read_pem(&nd.ca())?;
    let identity = TlsIdentity::from_pem(
        &ca_pem,
        &nd.read_pem(&nd.cert())?,
        &nd.read_pem(&nd.key())?,
        &nd.dir.display().to_string(),
    )?;
    let ca = ClusterCa::from_pem(
        &node.cluster,
        ca_pem,
        nd.read_pem(&nd.ca_key())?,
        &nd.ca_key().display().to_string(),
    )?;
    let client_tls = identity.client_config()?;
    let server_tls = identity.server_config(true)?;
    let node_check = Arc::new(identity.node_check()?);
    let (log, sm) = haven_store::open(&nd.db())?;
    let view = sm.view();
    let rpc = RpcClient::new(client_tls.clone(), Duration::from_secs(3));
    let hb_timeout = Duration::from_millis(node.timers.dead_after_ms / 2);
    let hb_rpc = RpcClient::new(client_tls, hb_timeout);

    let raft_config = openraft::Config {
        cluster_name: node.cluster.clone(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(node.timers.snapshot_after_logs),
        max_in_snapshot_log_to_keep: node.timers.logs_kept_after_snapshot,
        ..Default::default()
    }
    .validate()
    .context("Raft timers")?;
    let lab = Arc::new(fence::LabSwitch::new(lab));
    // Before Raft starts: openraft restores a restarted leader and replicates at once,
    // so a node restarted inside a lab partition would otherwise reach its peers first.
    lab.load(&nd.dir);
    let refused_as_fenced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timeouts = Timeouts {
        heartbeat_interval: Duration::from_millis(node.timers.heartbeat_ms),
        dead_after: Duration::from_millis(node.timers.dead_after_ms),
    };
    let membership = Arc::new(Mutex::new(Membership::new(timeouts, Time::from_millis(0))));
    let raft = Raft::new(
        node.id,
        Arc::new(raft_config),
        raft_net::Network {
            rpc: rpc.clone(),
            lab: lab.clone(),
            membership: membership.clone(),
            refused_as_fenced: refused_as_fenced.clone(),
        },
        log,
        sm,
    )
    .await
    .context("starting Raft")?;

    if node.bootstrap && !raft.is_initialized().await? {
        let mut members = BTreeMap::new();
        members.insert(
            node.id,
            NodeInfo {
                name: node.name.clone(),
                addrs: node.addrs.clone(),
            },
        );
        raft.initialize(members)
            .await
            .context("founding the Raft group")?;
        tracing::info!("founded cluster {} as node {}", node.cluster, node.name);
    }

    let local_marks = fence::LocalMarks::load(&nd.dir)?;
    for (peer, reason) in local_marks.all() {
        if peer == node.name {
            tracing::warn!(
                "this node was fenced ({reason}) and the mark is not committed yet: it stays out until `haven node online {peer}`"
            );
        } else {
            tracing::warn!(
                "{peer} was fenced by this node ({reason}) and its mark is not committed yet: it stays out"
            );
        }
    }
    let (ha_handles, ha_receivers) = ha::channels();
    let daemon = Arc::new(Daemon {
        ha: ha_handles,
        local_marks,
        state_dir: nd.dir.clone(),
        lab,
        membership,
        node,
        raft,
        view,
        rpc,
        hb_rpc,
        ca,
        incarnation: rand::random::<u64>().max(1),
        started: std::time::Instant::now(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let router = api::router(daemon.clone());
    for addr in &daemon.node.addrs {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        let mut stop = stop_rx.clone();
        let tls = server_tls.clone();
        let router = router.clone();
        let nodes = Some(node_check.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            let served = haven_net::rpc::serve_with_roles(listener, tls, nodes, router, shutdown);
            if let Err(e) = served.await {
                tracing::error!("{e}");
            }
        });
        tracing::info!("listening on {addr}");
    }

    tokio::spawn(heartbeat::run(daemon.clone()));
    ha::spawn(daemon.clone(), ha_receivers);
    fence::spawn(daemon.clone());
    tokio::spawn(fence::pause_elections(daemon.clone(), refused_as_fenced));
    if daemon.node.bootstrap {
        tokio::spawn(bootstrap_records(daemon.clone()));
    }
    if !daemon.node.learner && !daemon.node.bootstrap {
        tokio::spawn(become_voter(daemon.clone()));
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping: stopping this node's resources first");
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    if daemon
        .ha
        .agent
        .send(ha::AgentInput::Shutdown(done_tx))
        .is_ok()
    {
        // Each stop is bounded by its own timeout; this bounds the whole shutdown too.
        let _ = tokio::time::timeout(Duration::from_secs(120), done_rx).await;
    }
    let _ = stop_tx.send(true);
    let _ = daemon.raft.shutdown().await;
    Ok(())
}

/// The founder's first records: itself, and configuration version 1.
async fn bootstrap_records(daemon: Arc<Daemon>) {
    loop {
        let state = daemon.view.state();
        let need_node = !state.nodes.contains_key(&daemon.node.name);
        let need_config = state.config.version == 0;
        if !need_node && !need_config {
            return;
        }
        if daemon.is_leader() {
            if need_node {
                let r = daemon
                    .write(Request::RegisterNode {
                        name: daemon.node.name.clone(),
                        id: daemon.node.id,
                        addrs: daemon.node.addrs.clone(),
                        witness: daemon.node.witness,
                    })
                    .await;
                tracing::info!("registering {}: {r:?}", daemon.node.name);
            }
            if need_config {
                let r = daemon
                    .write(Request::ApplyConfig {
                        based_on: 0,
                        text: initial_config(),
                    })
                    .await;
                tracing::info!("configuration version 1: {r:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Configuration version 1: valid and empty, to be replaced with `haven config apply`.
pub fn initial_config() -> String {
    "# Haven cluster configuration. Edit and `haven config apply` it.\n[options]\n".to_string()
}

/// A node that joined as a voter asks the leader to promote it once it is running
/// (and so can catch up), then stops asking.
async fn become_voter(daemon: Arc<Daemon>) {
    loop {
        if daemon.voters().contains(&daemon.node.id) {
            tracing::info!("{} is a voter", daemon.node.name);
            return;
        }
        for addr in daemon.leader_candidates() {
            let r: Result<protocol::Empty, _> = daemon
                .rpc
                .call(&addr, api::PROMOTE, &Promote { id: daemon.node.id })
                .await;
            match r {
                Ok(_) => break,
                Err(e) => tracing::debug!("promotion via {addr}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
