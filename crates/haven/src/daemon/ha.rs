//! The coordinator on the Raft leader and the node agent on every node, driven with
//! real time, RPC and haven-exec. The decisions are haven-ha's; this is only their I/O.
//!
//! Coordinator loop (leader only): heartbeats and agent reports come in over a channel;
//! every tick it runs `handle_timeout`, dispatches `CoordinatorCommand::Op` to the
//! node's agent (locally or over `/ha/op`), and commits each reported result to Raft
//! (`RecordOp`: history, failcounts, where things run) for `haven status`.
//! Agent loop (every node but a witness): requests in, `AgentCommand::Run` executed with
//! `haven_exec::run_op`, reports sent to whoever leads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use haven_exec::{AgentClass, AgentSpec, Migration, Op, OpCode, OpResult};
use haven_ha::adapter::coordinator_config;
use haven_ha::membership::Timeouts;
use haven_ha::{
    AgentCommand, ClusterView, Coordinator, CoordinatorCommand, NoQuorumPolicy, NodeAgent,
    Observed, OpKind, OpOutcome, OpReport, OpRequest, Plan, Planner, QuorumAction, QuorumWatch,
    SchedPlanner,
};
use haven_store::Request;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::Daemon;

pub const OP_PATH: &str = "/ha/op";
pub const REPORT_PATH: &str = "/ha/report";

/// How often both loops wake to run their timers; well below every operation timeout
/// and the failure-detection time.
const TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportMsg {
    pub node: String,
    pub report: OpReport,
}

pub enum CoordInput {
    Heartbeat {
        node: String,
        link: String,
        incarnation: u64,
    },
    Cleanup {
        resource: String,
    },
    Report {
        node: String,
        report: OpReport,
    },
    Fence(super::fence::FenceInput),
}

pub enum AgentInput {
    Request(OpRequest),
    Done {
        token: u64,
        outcome: OpOutcome,
    },
    /// The daemon is stopping: stop every resource here, then answer.
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

/// The senders into both loops; the receivers go to [`spawn`].
pub struct Handles {
    pub coord: mpsc::UnboundedSender<CoordInput>,
    pub agent: mpsc::UnboundedSender<AgentInput>,
}

pub struct Receivers {
    coord: mpsc::UnboundedReceiver<CoordInput>,
    agent: mpsc::UnboundedReceiver<AgentInput>,
}

pub fn channels() -> (Handles, Receivers) {
    let (ctx, crx) = mpsc::unbounded_channel();
    let (atx, arx) = mpsc::unbounded_channel();
    (
        Handles {
            coord: ctx,
            agent: atx,
        },
        Receivers {
            coord: crx,
            agent: arx,
        },
    )
}

pub fn spawn(d: Arc<Daemon>, rx: Receivers) {
    tokio::spawn(coordinator_loop(d.clone(), rx.coord));
    if d.node.witness {
        // A witness votes and runs nothing: requests to it are refused at the API.
        drop(rx.agent);
    } else {
        tokio::spawn(agent_loop(d, rx.agent));
    }
}

/// The scheduler, with a configuration that is swapped when a new one commits.
#[derive(Clone)]
struct LivePlanner(Arc<Mutex<SchedPlanner>>);

impl Planner for LivePlanner {
    fn plan(&mut self, view: &ClusterView) -> Plan {
        match self.0.lock() {
            Ok(mut p) => p.plan(view),
            Err(_) => Plan::default(),
        }
    }
}

struct Leading {
    coordinator: Coordinator<LivePlanner>,
    planner: LivePlanner,
    config_version: u64,
    /// Fence confirmations already committed to Raft.
    fence_seen: std::collections::BTreeMap<String, haven_ha::Time>,
    /// Fenced nodes an operator let back in, whose marks are being removed.
    rejoining: std::collections::BTreeSet<String>,
    marks_in_flight: Arc<std::sync::atomic::AtomicBool>,
}

fn parse_config(d: &Daemon) -> Option<(u64, haven_model::Config)> {
    let state = d.view.state();
    match haven_model::Config::from_toml("cluster configuration", &state.config.text) {
        Ok(c) => Some((state.config.version, c)),
        Err(e) => {
            tracing::error!(
                "configuration version {} unusable: {e}",
                state.config.version
            );
            None
        }
    }
}

/// The coordinator's configuration, with what only the cluster's state knows: with
/// `startup-fencing = false`, the configured nodes that never joined (neither a Raft
/// member nor registered), which are taken as down and clean if not heard. A node that
/// was ever a member may have run something, and is fenced as ever.
fn coordinator_config_here(
    d: &Daemon,
    config: &haven_model::Config,
) -> haven_ha::CoordinatorConfig {
    let mut c = coordinator_config(config);
    if !config.options.startup_fencing {
        let registered = d.view.state().nodes;
        let members: std::collections::BTreeSet<String> =
            d.members().into_iter().map(|(n, _)| n).collect();
        c.unseen_clean = config
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| !members.contains(n) && !registered.contains_key(n))
            .collect();
    }
    c
}

/// Failure counts committed by earlier coordinators: a new leader keeps the bans.
fn committed_failcounts(d: &Daemon) -> BTreeMap<String, BTreeMap<String, u32>> {
    d.view
        .state()
        .resources
        .iter()
        .map(|(r, per_node)| {
            let counts = per_node
                .iter()
                .filter(|(_, rec)| rec.failcount > 0)
                .map(|(n, rec)| (n.clone(), rec.failcount))
                .collect();
            (r.clone(), counts)
        })
        .collect()
}

async fn coordinator_loop(d: Arc<Daemon>, mut rx: mpsc::UnboundedReceiver<CoordInput>) {
    let timeouts = Timeouts {
        heartbeat_interval: Duration::from_millis(d.node.timers.heartbeat_ms),
        dead_after: Duration::from_millis(d.node.timers.dead_after_ms),
    };
    let mut leading: Option<Leading> = None;
    let placement_in_flight = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            i = rx.recv() => match i { Some(i) => Some(i), None => return },
            _ = tick.tick() => None,
        };
        // A leader cut off from the majority must not act (it would fence the
        // majority): the coordinator runs only while this node sees quorum (or, in a
        // two-node cluster, has lost its peer and must fence it).
        if !super::fence::coordinating(&d) {
            if let Some(CoordInput::Fence(super::fence::FenceInput::Done(done))) = &input {
                super::fence::keep_orphaned_result(&d, done);
            }
            super::fence::sync_local_marks::<LivePlanner>(&d, None);
            if leading.take().is_some() {
                tracing::info!("no longer a leader with quorum: coordinator stopped");
            }
            continue;
        }
        let now = d.now();
        let version = d.view.state().config.version;
        match leading.as_mut() {
            None => {
                let Some((v, config)) = parse_config(&d) else {
                    continue;
                };
                let planner = LivePlanner(Arc::new(Mutex::new(SchedPlanner::new(config.clone()))));
                // Nodes this node's own detector hears are alive from the start. Every
                // other node gets a whole detection time from the takeover: a node that
                // just joined, or whose heartbeats have not reached the new leader yet,
                // must not be declared lost (and fenced) on the spot.
                let mut coordinator = Coordinator::new(
                    planner.clone(),
                    coordinator_config_here(&d, &config),
                    timeouts,
                    now,
                );
                coordinator.seed_fencing(d.node.id ^ super::wall_ms());
                // First what this node fenced without being able to commit it, and
                // what earlier leaders were fencing or had fenced: a node in doubt or
                // fenced must not pass for clean because it is heard.
                coordinator.handle_fence_marks(super::fence::starting_marks(&d), now);
                super::fence::seed_heartbeats(&d, &mut coordinator, now);
                coordinator.handle_failcounts(committed_failcounts(&d), now);
                tracing::info!("leader: coordinator started on configuration version {v}");
                leading = Some(Leading {
                    coordinator,
                    planner,
                    config_version: v,
                    fence_seen: Default::default(),
                    rejoining: Default::default(),
                    marks_in_flight: Default::default(),
                });
            }
            Some(l) if l.config_version != version => {
                if let Some((v, config)) = parse_config(&d) {
                    if let Ok(mut p) = l.planner.0.lock() {
                        *p = SchedPlanner::new(config.clone());
                    }
                    l.coordinator
                        .handle_config(coordinator_config_here(&d, &config), now);
                    l.config_version = v;
                    tracing::info!("coordinator: configuration version {v}");
                }
            }
            Some(_) => {}
        }
        let Some(l) = leading.as_mut() else { continue };
        let mut restart = false;
        outdated_replicas_unpromotable(&d, l, now);
        let c = &mut l.coordinator;
        match input {
            Some(CoordInput::Heartbeat {
                node,
                link,
                incarnation,
            }) => {
                c.handle_heartbeat(&node, &link, now);
                c.handle_incarnation(&node, incarnation, now);
            }
            Some(CoordInput::Cleanup { resource }) => c.handle_cleanup(&resource, now),
            Some(CoordInput::Fence(super::fence::FenceInput::AllowRejoin(node))) => {
                l.rejoining.insert(node.clone());
                d.local_marks.forget(&node);
                super::fence::remove_mark_then_rejoin(&d, node);
            }
            Some(CoordInput::Fence(f)) => {
                if let super::fence::FenceInput::RejoinCommitted { node, .. } = &f {
                    l.rejoining.remove(node);
                }
                // A success this coordinator did not order (an earlier one did).
                let orphan = match &f {
                    super::fence::FenceInput::Done(done) => Some(done.clone()),
                    _ => None,
                };
                super::fence::handle_input(&d, c, f, now);
                if let Some(done) = orphan
                    && !c.fencer().is_confirmed(&done.victim)
                    && super::fence::keep_orphaned_result(&d, &done)
                {
                    tracing::info!("coordinator: starting again from this node's fence marks");
                    restart = true;
                }
            }
            Some(CoordInput::Report { node, report }) => {
                let resource = report.resource.clone();
                let record = record_op(&node, &report);
                c.handle_report(&node, report, now);
                let running = matches!(
                    c.view().resources.get(&resource).and_then(|r| r.get(&node)),
                    Some(Observed::Started | Observed::Promoted)
                );
                if let Some(Request::RecordOp {
                    resource,
                    node,
                    op,
                    rc,
                    at_ms,
                    ok,
                    ..
                }) = record
                {
                    let d2 = d.clone();
                    tokio::spawn(async move {
                        let req = Request::RecordOp {
                            resource,
                            node,
                            op,
                            rc,
                            at_ms,
                            ok,
                            running,
                        };
                        if let Err(e) = d2.write(req).await {
                            tracing::warn!("recording an operation result: {}", e.1);
                        }
                    });
                }
            }
            None => {
                // The leader is alive on its own links, like any member.
                for i in 0..d.node.addrs.len() {
                    c.handle_heartbeat(&d.node.name, &super::heartbeat::link_name(i), now);
                }
                c.handle_timeout(now);
            }
        }
        for line in c.take_log() {
            tracing::info!("coordinator: {line}");
        }
        publish_placement(&d, &c.view(), &placement_in_flight);
        super::fence::sync_local_marks(&d, Some((&*c, &l.rejoining)));
        super::fence::publish_marks(&d, c, &l.rejoining, &l.marks_in_flight);
        while let Some(cmd) = c.poll_command() {
            if let CoordinatorCommand::Fence { victim, .. } = &cmd {
                let reason = c
                    .fence_marks()
                    .remove(victim)
                    .map(|(_, r)| r)
                    .unwrap_or_default();
                dispatch(&d, cmd, reason);
            } else {
                dispatch(&d, cmd, String::new());
            }
        }
        super::fence::record_confirmations(&d, &l.coordinator, &mut l.fence_seen);
        if restart {
            leading = None;
        }
    }
}

/// crm-fence-peer's constraint: a volume replica the cluster holds outdated gets
/// -INFINITY for the Promoted role (its promotion score), until its record is cleared.
fn outdated_replicas_unpromotable(d: &Daemon, l: &mut Leading, now: haven_ha::Time) {
    let mut overrides: BTreeMap<String, haven_ha::NodeOverride> = BTreeMap::new();
    let state = d.view.state();
    // What each replica published of itself first; the cluster's outdated record wins.
    for (volume, per_node) in &state.volume_scores {
        for (node, score) in per_node {
            overrides
                .entry(node.clone())
                .or_default()
                .attributes
                .insert(format!("promotion-{volume}"), score.clone());
        }
    }
    for (volume, per_node) in &state.volumes_outdated {
        for node in per_node.keys() {
            overrides
                .entry(node.clone())
                .or_default()
                .attributes
                .insert(format!("promotion-{volume}"), "-INFINITY".into());
        }
    }
    let changed = l
        .planner
        .0
        .lock()
        .map(|mut p| p.set_overrides(overrides))
        .unwrap_or(false);
    if changed {
        l.coordinator.handle_planner_changed(now);
    }
}

/// How long a volume's start waits to publish its promotion score; without quorum the
/// start is reported anyway (nothing is promoted without quorum either).
const VOLUME_SCORE_AT_START: std::time::Duration = std::time::Duration::from_secs(3);

/// DRBD's agent sets `master-RSC` from its disk state; a replica here publishes
/// `promotion-RSC` the same way, committed through Raft when it changes, and the
/// leader feeds it to the scheduler.
async fn publish_volume_score(d: &Daemon, resource: &str, state_dir: &std::path::Path) {
    if let Ok(s) = haven_exec::volume::replica_status(state_dir, resource).await {
        set_volume_score(d, resource, Some(haven_exec::volume::promotion_score(&s))).await;
    }
}

async fn set_volume_score(d: &Daemon, resource: &str, score: Option<String>) {
    let me = d.node.name.clone();
    let committed = d
        .view
        .state()
        .volume_scores
        .get(resource)
        .and_then(|m| m.get(&me))
        .cloned();
    if committed == score {
        return;
    }
    let req = Request::SetVolumeScore {
        volume: resource.to_string(),
        node: me,
        score: score.clone(),
    };
    match d.write(req).await {
        Ok(_) => tracing::info!(
            "volume {resource}: promotion score {}",
            score.as_deref().unwrap_or("cleared")
        ),
        Err(e) => tracing::warn!("volume {resource}: publishing the promotion score: {}", e.1),
    }
}

/// Volumes whose fence-peer step is under way on this node (one at a time each).
static VOLUME_FENCING: Mutex<std::collections::BTreeSet<String>> =
    Mutex::new(std::collections::BTreeSet::new());

/// DRBD's fence-peer and unfence, driven by the monitor of a volume replica here: a
/// frozen primary's lost peers are committed outdated through Raft and only then is
/// the replica told to resume; this node's own record is cleared once its replica has
/// the primary's current data. Off the monitor's path: a slow commit (no quorum) must
/// not time the monitor out, and the replica stays frozen meanwhile, which is safe.
fn volume_fence_step(d: &Arc<Daemon>, resource: &str, state_dir: std::path::PathBuf) {
    let claimed = VOLUME_FENCING
        .lock()
        .map(|mut s| s.insert(resource.to_string()))
        .unwrap_or(false);
    if !claimed {
        return;
    }
    let d = d.clone();
    let resource = resource.to_string();
    tokio::spawn(async move {
        fence_step(&d, &resource, &state_dir).await;
        if let Ok(mut s) = VOLUME_FENCING.lock() {
            s.remove(&resource);
        }
    });
}

async fn fence_step(d: &Daemon, resource: &str, state_dir: &std::path::Path) {
    use haven_volume::meta::{DiskState, Role};
    let Ok(s) = haven_exec::volume::replica_status(state_dir, resource).await else {
        return;
    };
    let me = d.node.name.clone();
    for f in &s.frozen {
        let recorded = d
            .view
            .state()
            .volumes_outdated
            .get(resource)
            .and_then(|m| m.get(&f.peer))
            .is_some_and(|r| r.generation == f.generation);
        if !recorded {
            let req = Request::OutdateVolumeReplica {
                volume: resource.to_string(),
                node: f.peer.clone(),
                record: haven_store::VolumeOutdated {
                    generation: f.generation.clone(),
                    by: me.clone(),
                    at_ms: super::wall_ms(),
                },
            };
            if let Err(e) = d.write(req).await {
                tracing::warn!(
                    "volume {resource}: recording the replica on {} as outdated: {} (I/O stays frozen)",
                    f.peer,
                    e.1
                );
                continue;
            }
            tracing::info!(
                "volume {resource}: the replica on {} is recorded outdated since generation {}",
                f.peer,
                f.generation
            );
        }
        if let Err(e) = haven_exec::volume::peer_outdated(state_dir, resource, &f.peer).await {
            tracing::warn!("volume {resource}: resuming I/O: {e}");
        }
    }
    set_volume_score(d, resource, Some(haven_exec::volume::promotion_score(&s))).await;
    let mine = d
        .view
        .state()
        .volumes_outdated
        .get(resource)
        .and_then(|m| m.get(&me))
        .cloned();
    let current = s.role == Role::Secondary
        && s.disk == DiskState::UpToDate
        && s.peers.iter().any(|p| {
            p.role == Some(Role::Primary)
                && p.replication == Some(haven_volume::volume::Replication::Established)
        });
    if let Some(r) = mine
        && current
    {
        let mut generations = vec![s.generation.clone()];
        generations.extend(s.history.iter().cloned());
        if !generations.contains(&r.generation) {
            return;
        }
        let req = Request::ClearVolumeOutdated {
            volume: resource.to_string(),
            node: me,
            generations,
        };
        match d.write(req).await {
            Ok(_) => tracing::info!("volume {resource}: resynced; no longer recorded outdated"),
            Err(e) => tracing::warn!("volume {resource}: clearing the outdated record: {}", e.1),
        }
    }
}

/// Commits where resources run whenever the coordinator's picture differs from the
/// committed one (one write at a time; a failed write is redone on a later tick).
fn publish_placement(
    d: &Arc<Daemon>,
    view: &ClusterView,
    in_flight: &Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let placement: std::collections::BTreeMap<String, Vec<String>> = view
        .resources
        .iter()
        .map(|(r, per_node)| {
            let on = per_node
                .iter()
                .filter(|(_, o)| matches!(o, Observed::Started | Observed::Promoted))
                .map(|(n, _)| n.clone())
                .collect();
            (r.clone(), on)
        })
        .collect();
    let node_states: std::collections::BTreeMap<String, String> = view
        .nodes
        .iter()
        .map(|(n, s)| {
            let s = match s {
                haven_ha::NodeState::Pending => "pending",
                haven_ha::NodeState::Online => "online",
                haven_ha::NodeState::Unclean => "unclean",
                haven_ha::NodeState::Offline => "offline",
            };
            (n.clone(), s.to_string())
        })
        .collect();
    let committed = d.view.state();
    if (committed.placement == placement && committed.node_states == node_states)
        || in_flight.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let d = d.clone();
    let in_flight = in_flight.clone();
    tokio::spawn(async move {
        let req = Request::SetPlacement {
            placement,
            node_states,
        };
        if let Err(e) = d.write(req).await {
            tracing::warn!("publishing placement: {}", e.1);
        }
        in_flight.store(false, Ordering::Release);
    });
}

fn record_op(node: &str, report: &OpReport) -> Option<Request> {
    let (rc, ok) = match &report.outcome {
        OpOutcome::Ok => (0, true),
        OpOutcome::NotRunning => (7, true),
        OpOutcome::RunningPromoted => (8, true),
        OpOutcome::Failed { rc, .. } => (*rc, false),
        OpOutcome::TimedOut => (-1, false),
    };
    Some(Request::RecordOp {
        resource: report.resource.clone(),
        node: node.to_string(),
        op: op_name(report.op).to_string(),
        rc,
        at_ms: super::wall_ms(),
        ok,
        running: false,
    })
}

fn op_name(op: OpKind) -> &'static str {
    match op {
        OpKind::Start => "start",
        OpKind::Stop => "stop",
        OpKind::Monitor => "monitor",
        OpKind::Promote => "promote",
        OpKind::Demote => "demote",
        OpKind::MigrateTo => "migrate_to",
        OpKind::MigrateFrom => "migrate_from",
    }
}

/// `reason`: why a fence command's victim is fenced, for its mark.
fn dispatch(d: &Arc<Daemon>, cmd: CoordinatorCommand, reason: String) {
    match cmd {
        CoordinatorCommand::Op { node, request } => {
            if node == d.node.name {
                let _ = d.ha.agent.send(AgentInput::Request(request));
                return;
            }
            let Some(addr) = d
                .members()
                .into_iter()
                .find(|(n, _)| *n == node)
                .and_then(|(_, info)| d.peer_addr(&info))
            else {
                tracing::warn!(
                    "no address for node {node}: {} {:?} not sent",
                    request.resource,
                    request.op
                );
                return;
            };
            if d.lab.rpc_cut() {
                return;
            }
            let d = d.clone();
            tokio::spawn(async move {
                let r: Result<super::protocol::Empty, _> =
                    d.rpc.call_node(None, &addr, &node, OP_PATH, &request).await;
                if let Err(e) = r {
                    // The coordinator times the operation out and decides what it means.
                    tracing::warn!(
                        "sending {} {:?} to {node}: {e}",
                        request.resource,
                        request.op
                    );
                }
            });
        }
        CoordinatorCommand::Fence {
            token,
            victim,
            device,
            executor,
            timeout,
        } => {
            let run = super::fence::FenceRun {
                token,
                victim,
                device,
                timeout_ms: timeout.as_millis() as u64,
            };
            super::fence::dispatch_marked(d, run, executor, reason);
        }
        CoordinatorCommand::Alert { message } => tracing::warn!("alert: {message}"),
    }
}

fn policy(config: &haven_model::Config) -> NoQuorumPolicy {
    use haven_model::config::NoQuorumPolicy as P;
    match config.options.no_quorum_policy {
        P::Stop => NoQuorumPolicy::Stop,
        P::Freeze => NoQuorumPolicy::Freeze,
        P::Ignore => NoQuorumPolicy::Ignore,
        P::Suicide => NoQuorumPolicy::Suicide,
        // Demoting needs promotable resources to act on; stopping is the safe superset.
        P::Demote => NoQuorumPolicy::Stop,
    }
}

/// Stops every configured resource on this node, whatever the agent believed: stop is
/// idempotent, and an operation in flight may have started something the agent has
/// not heard of yet. In [`stop_waves`] order: a guest stops before the volume under it.
fn stop_everything(d: &Arc<Daemon>, why: &'static str) -> Vec<tokio::task::JoinHandle<()>> {
    let Some((_, config)) = parse_config(d) else {
        return Vec::new();
    };
    let ops = coordinator_config(&config).resources;
    let waves = stop_waves(&config);
    let d = d.clone();
    vec![tokio::spawn(async move {
        for wave in waves {
            let mut tasks = Vec::new();
            for id in wave {
                let d = d.clone();
                let timeout = ops
                    .get(&id)
                    .map(|o| o.stop_timeout)
                    .unwrap_or(Duration::from_secs(20));
                tasks.push(tokio::spawn(async move {
                    let o = execute(&d, &id, OpKind::Stop, timeout, None, Vec::new(), None).await;
                    if o != OpOutcome::Ok {
                        tracing::error!("{why}: stopping {id} failed: {o:?}");
                    }
                }));
            }
            // A failed stop does not hold the rest back: each is bounded by its own
            // timeout, and what it was ordered before is better stopped than left.
            for t in tasks {
                let _ = t.await;
            }
        }
    })]
}

/// The order a node stops its resources in when it stops them itself (shutdown, lost
/// quorum): waves, each stopped in parallel after the one before. It is the reverse of
/// the start order the configuration implies, as Pacemaker stops a node: for an order
/// constraint `first` then `then` (unless `symmetrical = false`; serialize ones are
/// not), `then` stops before `first`; a group's members stop last to first; a group or
/// clone in a constraint stands for the primitives in it. Whatever no order ties stops
/// in the first wave. A cycle (only optional orders can make one) stops together last.
fn stop_waves(config: &haven_model::Config) -> Vec<Vec<String>> {
    use haven_model::config::{IdKind, OrderKind};
    use std::collections::BTreeSet;
    let index = config.id_index();
    fn expand(
        config: &haven_model::Config,
        index: &std::collections::HashMap<&str, IdKind>,
        id: &str,
        depth: usize,
    ) -> Vec<String> {
        match index.get(id) {
            Some(IdKind::Primitive(_)) => vec![id.to_string()],
            Some(IdKind::Group(i)) => config.groups[*i].members.clone(),
            Some(IdKind::Clone(i)) if depth < 2 => {
                expand(config, index, &config.clones[*i].child, depth + 1)
            }
            _ => Vec::new(),
        }
    }
    let prims = |id: &str| expand(config, &index, id, 0);
    // stops_first[x]: what must be stopped before x is.
    let mut stops_first: BTreeMap<String, BTreeSet<String>> = config
        .resources
        .iter()
        .map(|p| (p.id.clone(), BTreeSet::new()))
        .collect();
    let mut started_before = |first: &[String], then: &[String]| {
        for f in first {
            for t in then {
                if f != t
                    && let Some(s) = stops_first.get_mut(f)
                {
                    s.insert(t.clone());
                }
            }
        }
    };
    for g in &config.groups {
        for pair in g.members.windows(2) {
            started_before(&pair[..1], &pair[1..]);
        }
    }
    for o in &config.constraints.order {
        let symmetrical = o.symmetrical.unwrap_or(o.kind != OrderKind::Serialize);
        if !symmetrical {
            continue;
        }
        if let (Some(first), Some(then)) = (&o.first, &o.then) {
            started_before(&prims(first), &prims(then));
        }
        let sets: Vec<Vec<Vec<String>>> = o
            .sets
            .iter()
            .map(|set| {
                let members: Vec<Vec<String>> = set.resources.iter().map(|r| prims(r)).collect();
                if set.sequential {
                    for pair in members.windows(2) {
                        started_before(&pair[0], &pair[1]);
                    }
                }
                members
            })
            .collect();
        for pair in sets.windows(2) {
            let all = |s: &Vec<Vec<String>>| s.iter().flatten().cloned().collect::<Vec<_>>();
            started_before(&all(&pair[0]), &all(&pair[1]));
        }
    }
    let mut stopped: BTreeSet<String> = BTreeSet::new();
    let mut waves = Vec::new();
    while stopped.len() < stops_first.len() {
        let wave: Vec<String> = stops_first
            .iter()
            .filter(|(r, before)| {
                !stopped.contains(*r) && before.iter().all(|b| stopped.contains(b))
            })
            .map(|(r, _)| r.clone())
            .collect();
        let wave = if wave.is_empty() {
            stops_first
                .keys()
                .filter(|r| !stopped.contains(*r))
                .cloned()
                .collect()
        } else {
            wave
        };
        stopped.extend(wave.iter().cloned());
        waves.push(wave);
    }
    waves
}

async fn agent_loop(d: Arc<Daemon>, mut rx: mpsc::UnboundedReceiver<AgentInput>) {
    let mut agent = NodeAgent::new();
    // A node cut off from the majority acts on no-quorum-policy once its lease (twice
    // the failure-detection time, counted from when it last saw quorum) is over. A node
    // that starts has no lease: until it is quorate it starts nothing, feeds no
    // watchdog, and applies its policy at once (it cannot know how long it was cut off).
    let lease = haven_ha::quorum::lease(Timeouts {
        heartbeat_interval: Duration::from_millis(d.node.timers.heartbeat_ms),
        dead_after: Duration::from_millis(d.node.timers.dead_after_ms),
    });
    let mut current_policy = parse_config(&d)
        .map(|(_, c)| policy(&c))
        .unwrap_or_default();
    let mut quorum = QuorumWatch::new(current_policy, lease);
    // Stops ordered for lack of quorum: starts wait until they are over.
    let mut stopping: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut deferred: Vec<OpRequest> = Vec::new();
    let mut watchdog = super::fence::WatchdogFeeder::default();
    let mut shutdown: Option<tokio::sync::oneshot::Sender<()>> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let input = tokio::select! {
            i = rx.recv() => match i { Some(i) => Some(i), None => return },
            _ = tick.tick() => None,
        };
        let now = d.now();
        match input {
            Some(AgentInput::Request(req)) => {
                // Only a coordinator with quorum sends operations (it stops when it
                // loses quorum): hearing one is hearing from a quorate leader, which
                // gives this node its lease — a node that just started or joined gets
                // it before its own detector has heard a majority.
                if shutdown.is_none() {
                    quorum.handle_quorum(true, now);
                }
                let starts = matches!(
                    req.op,
                    OpKind::Start | OpKind::Promote | OpKind::MigrateFrom | OpKind::MigrateTo
                );
                stopping.retain(|t| !t.is_finished());
                if starts && (shutdown.is_some() || !quorum.has_lease(now)) {
                    tracing::warn!("no quorum: refusing {} {:?}", req.resource, req.op);
                } else if starts && !stopping.is_empty() {
                    deferred.push(req);
                } else {
                    agent.handle_request(req, now);
                }
            }
            Some(AgentInput::Done { token, outcome }) => agent.handle_op_done(token, outcome, now),
            Some(AgentInput::Shutdown(done)) => {
                // Nothing starts any more; everything here stops before the node leaves,
                // so the survivors never run a resource this node still runs. The
                // watchdog is fed until then, and disarmed last.
                agent.reset();
                deferred.clear();
                stopping.extend(stop_everything(&d, "shutting down"));
                shutdown = Some(done);
            }
            None => {
                agent.handle_timeout(now);
                let config = parse_config(&d);
                if let Some(p) = config.as_ref().map(|(_, c)| policy(c))
                    && p != current_policy
                {
                    current_policy = p;
                    quorum = QuorumWatch::with_policy(&quorum, p);
                }
                if let Some((_, c)) = &config {
                    watchdog.set_path(super::fence::watchdog_path(&d, c));
                }
                quorum.handle_quorum(super::fence::quorum_now(&d).quorate, now);
                stopping.retain(|t| !t.is_finished());
                if let Some(done) = shutdown.take_if(|_| stopping.is_empty()) {
                    watchdog.disarm();
                    let _ = done.send(());
                    return;
                }
                watchdog.tick(quorum.may_feed_watchdog(now));
                while let Some(action) = quorum.poll_action() {
                    match action {
                        QuorumAction::StopAll | QuorumAction::SelfFence => {
                            tracing::warn!(
                                "no quorum lease (lost for longer than the lease, or not quorate since this daemon started): stopping every resource here ({action:?})"
                            );
                            agent.reset();
                            deferred.clear();
                            stopping.extend(stop_everything(&d, "no quorum"));
                        }
                        QuorumAction::Freeze => {
                            tracing::warn!("quorum lost: freezing (nothing new starts here)");
                        }
                        QuorumAction::Resume => tracing::info!("quorum regained"),
                    }
                }
                stopping.retain(|t| !t.is_finished());
                if stopping.is_empty() {
                    for req in std::mem::take(&mut deferred) {
                        if shutdown.is_none() && quorum.has_lease(now) {
                            agent.handle_request(req, now);
                        } else {
                            tracing::warn!("no quorum: refusing {} {:?}", req.resource, req.op);
                        }
                    }
                }
            }
        }
        while let Some(cmd) = agent.poll_command() {
            match cmd {
                AgentCommand::Run {
                    token,
                    resource,
                    op,
                    timeout,
                    peer,
                    fenced,
                    interval,
                } => {
                    let d = d.clone();
                    tokio::spawn(async move {
                        let outcome =
                            execute(&d, &resource, op, timeout, peer, fenced, interval).await;
                        let _ = d.ha.agent.send(AgentInput::Done { token, outcome });
                    });
                }
                AgentCommand::Report(report) => {
                    let d = d.clone();
                    tokio::spawn(async move { send_report(&d, report).await });
                }
            }
        }
    }
}

async fn send_report(d: &Daemon, report: OpReport) {
    let msg = ReportMsg {
        node: d.node.name.clone(),
        report,
    };
    // A few tries across a leader change; after that the coordinator's own timeout
    // takes over (an unanswered operation counts as timed out).
    for _ in 0..10 {
        // A two-node survivor coordinates without leading Raft.
        let here = super::fence::coordinating(d);
        match d.leader() {
            _ if here => {
                let _ = d.ha.coord.send(CoordInput::Report {
                    node: msg.node.clone(),
                    report: msg.report.clone(),
                });
                return;
            }
            Some((id, _)) if id == d.node.id => {
                let _ = d.ha.coord.send(CoordInput::Report {
                    node: msg.node.clone(),
                    report: msg.report.clone(),
                });
                return;
            }
            Some((_, info)) if !d.lab.rpc_cut() => {
                if let Some(addr) = d.peer_addr(&info) {
                    let r: Result<super::protocol::Empty, _> = d
                        .rpc
                        .call_node(None, &addr, &info.name, REPORT_PATH, &msg)
                        .await;
                    match r {
                        Ok(_) => return,
                        Err(e) => tracing::debug!("report to the leader: {e}"),
                    }
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        "could not deliver the result of {} {:?} to a leader",
        msg.report.resource,
        msg.report.op
    );
}

/// The agent spec for `resource` from the committed configuration.
pub(super) fn spec_for(d: &Daemon, resource: &str) -> Result<AgentSpec, String> {
    let state = d.view.state();
    let config = haven_model::Config::from_toml("cluster configuration", &state.config.text)
        .map_err(|e| e.to_string())?;
    let p = config
        .resources
        .iter()
        .find(|p| p.id == resource)
        .ok_or_else(|| format!("resource {resource} is not in the configuration"))?;
    let class_text = match (p.class.as_str(), &p.provider) {
        ("ocf", Some(provider)) => format!("ocf:{provider}:{}", p.agent),
        ("lsb" | "systemd", _) => format!("{}:{}", p.class, p.agent),
        (other, _) => other.to_string(),
    };
    let class: AgentClass = class_text
        .parse()
        .map_err(|e: haven_exec::AgentClassError| format!("resources.{resource}.class: {e}"))?;
    let mut spec = AgentSpec::new(resource, class, d.state_dir.join("resources"));
    spec.params = p.params.clone();
    // As Pacemaker tells OCF agents; a volume replica needs it to know which it is.
    spec.meta.insert("on_node".into(), d.node.name.clone());
    Ok(spec)
}

/// Where `dest` receives a live migration of `spec`'s resource: its first link's IP,
/// and the resource's `migration_port` param or a port derived from its id (the same
/// on every node, in 49152..=65151).
/// No address is an error: an empty host would make QEMU listen on every interface.
fn migration_address(d: &Daemon, spec: &AgentSpec, dest: &str) -> Result<String, String> {
    let ip = d
        .members()
        .into_iter()
        .find(|(n, _)| n == dest)
        .and_then(|(_, info)| info.addrs.first().cloned())
        .and_then(|a| a.rsplit_once(':').map(|(ip, _)| ip.to_string()))
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| format!("no address is known for node {dest} to migrate to"))?;
    let port = spec
        .params
        .get("migration_port")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| derived_port(&spec.instance));
    Ok(format!("{ip}:{port}"))
}

/// FNV-1a of the resource id, folded into the dynamic port range.
fn derived_port(id: &str) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    49152 + (h % 16000) as u16
}

/// The spec each resource last ran with on this node.
static LAST_SPECS: Mutex<std::collections::BTreeMap<String, AgentSpec>> =
    Mutex::new(std::collections::BTreeMap::new());

async fn execute(
    d: &Arc<Daemon>,
    resource: &str,
    op: OpKind,
    timeout: Duration,
    peer: Option<String>,
    fenced: Vec<String>,
    interval: Option<Duration>,
) -> OpOutcome {
    // The coordinator asks from a committed configuration this node may not have
    // applied yet: give replication a moment before calling the resource unknown.
    let mut found = spec_for(d, resource);
    for _ in 0..20 {
        if found.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        found = spec_for(d, resource);
    }
    let spec = match found {
        Ok(s) => {
            if let Ok(mut cache) = LAST_SPECS.lock() {
                cache.insert(resource.to_string(), s.clone());
            }
            s
        }
        // A resource removed from the configuration must still be stoppable (a failed
        // stop would get this node fenced): the spec it last ran with is kept.
        Err(reason) => match LAST_SPECS
            .lock()
            .ok()
            .and_then(|c| c.get(resource).cloned())
        {
            Some(s) if matches!(op, OpKind::Stop | OpKind::Monitor) => s,
            _ => return OpOutcome::Failed { rc: 6, reason },
        },
    };
    let peer = peer.unwrap_or_default();
    // The stream goes to the destination: the peer for migrate_to, this node for
    // migrate_from; both sides derive the same HOST:PORT.
    let migration = |dest: &str| {
        migration_address(d, &spec, dest).map(|address| Migration {
            peer: peer.clone(),
            address,
        })
    };
    let exec_op = match op {
        OpKind::Start => Op::Start,
        OpKind::Stop => Op::Stop,
        OpKind::Monitor => Op::Monitor {
            interval: interval.unwrap_or(Duration::ZERO),
        },
        // A promote's peer is a migration window's source.
        OpKind::Promote => Op::Promote {
            fenced,
            migration_source: (!peer.is_empty()).then(|| peer.clone()),
        },
        OpKind::Demote => Op::Demote,
        OpKind::MigrateTo | OpKind::MigrateFrom => {
            let dest = if op == OpKind::MigrateTo {
                peer.clone()
            } else {
                d.node.name.clone()
            };
            match migration(&dest) {
                Ok(m) if op == OpKind::MigrateTo => Op::MigrateTo(m),
                Ok(m) => Op::MigrateFrom(m),
                Err(reason) => return OpOutcome::Failed { rc: 6, reason },
            }
        }
    };
    let volume = spec.class == AgentClass::Volume;
    if volume && op == OpKind::Promote {
        let outdated = d
            .view
            .state()
            .volumes_outdated
            .get(resource)
            .and_then(|m| m.get(&d.node.name))
            .cloned();
        if let Some(r) = outdated {
            // The planner never asks this (-INFINITY); if a stale plan does, the
            // replica itself is told, so it refuses any promote until resynced.
            if let Err(e) = haven_exec::volume::outdate(&spec.state_dir, resource).await {
                tracing::warn!("volume {resource}: marking the replica outdated: {e}");
            }
            return OpOutcome::Failed {
                rc: 1,
                reason: format!(
                    "volume {resource}: the replica on {} is recorded outdated since generation {} (by {}); it is not promoted until resynced",
                    d.node.name, r.generation, r.by
                ),
            };
        }
    }
    let result = haven_exec::run_op(&spec, exec_op, timeout).await;
    if volume && op == OpKind::Monitor {
        volume_fence_step(d, resource, spec.state_dir.clone());
    }
    if volume && op == OpKind::Start && result.code == OpCode::Success {
        // Published before the start is reported, so the promotion planned next
        // already weighs this replica's disk: a full sync's target is not picked.
        let publish = publish_volume_score(d, resource, &spec.state_dir);
        let _ = tokio::time::timeout(VOLUME_SCORE_AT_START, publish).await;
    }
    if volume && op == OpKind::Stop && result.code == OpCode::Success {
        let d = d.clone();
        let resource = resource.to_string();
        tokio::spawn(async move { set_volume_score(&d, &resource, None).await });
    }
    if result.code != OpCode::Success && result.code != OpCode::NotRunning {
        tracing::info!(
            "{resource} {}: {:?} {}",
            op_name(op),
            result.code,
            result.notes.join(" ")
        );
    }
    outcome(op, &result)
}

/// An agent's result as the cluster decides on it.
fn outcome(op: OpKind, r: &OpResult) -> OpOutcome {
    let failed = |r: &OpResult| OpOutcome::Failed {
        rc: r.code.exit_code().unwrap_or(1),
        reason: if r.notes.is_empty() {
            format!("{:?}", r.code)
        } else {
            r.notes.join(" ")
        },
    };
    match (op, r.code) {
        (_, OpCode::Timeout) => OpOutcome::TimedOut,
        (_, OpCode::Success) => OpOutcome::Ok,
        (OpKind::Monitor, OpCode::NotRunning) => OpOutcome::NotRunning,
        (OpKind::Monitor, OpCode::RunningPromoted) => OpOutcome::RunningPromoted,
        _ => failed(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(code: OpCode) -> OpResult {
        OpResult {
            code,
            duration: Duration::ZERO,
            stdout: String::new(),
            stderr: String::new(),
            notes: vec![],
        }
    }

    fn config(text: &str) -> haven_model::Config {
        let mut t = String::from("[[nodes]]\nname = \"n1\"\n");
        for id in ["vol", "guest", "ip", "web", "lone", "c1", "c2"] {
            t.push_str(&format!(
                "[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\n"
            ));
        }
        t.push_str(text);
        haven_model::Config::from_toml("c.toml", &t).expect("valid")
    }

    fn wave_of(waves: &[Vec<String>], id: &str) -> usize {
        waves
            .iter()
            .position(|w| w.iter().any(|r| r == id))
            .expect("stopped")
    }

    #[test]
    fn what_starts_after_something_stops_before_it_and_the_rest_at_once() {
        let waves = stop_waves(&config(
            "[[groups]]\nid = \"g\"\nmembers = [\"ip\", \"web\"]\n\
             [[clones]]\nid = \"cl\"\nchild = \"c1\"\n\
             [[constraints.order]]\nid = \"o1\"\nfirst = \"vol\"\nthen = \"guest\"\n\
             [[constraints.order]]\nid = \"o2\"\nfirst = \"cl\"\nthen = \"g\"\n\
             [[constraints.order]]\nid = \"o3\"\nfirst = \"lone\"\nthen = \"c2\"\nsymmetrical = false\n",
        ));
        assert!(
            wave_of(&waves, "guest") < wave_of(&waves, "vol"),
            "{waves:?}"
        );
        assert!(wave_of(&waves, "web") < wave_of(&waves, "ip"), "{waves:?}");
        assert!(wave_of(&waves, "ip") < wave_of(&waves, "c1"), "{waves:?}");
        // Unordered (or ordered only one way) resources stop together, first.
        for r in ["guest", "web", "lone", "c2"] {
            assert_eq!(wave_of(&waves, r), 0, "{r}: {waves:?}");
        }
        assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), 7);
    }

    #[test]
    fn an_optional_order_cycle_still_stops_everything() {
        let waves = stop_waves(&config(
            "[[constraints.order]]\nid = \"o1\"\nfirst = \"vol\"\nthen = \"guest\"\nkind = \"Optional\"\n\
             [[constraints.order]]\nid = \"o2\"\nfirst = \"guest\"\nthen = \"vol\"\nkind = \"Optional\"\n",
        ));
        assert_eq!(waves.iter().map(Vec::len).sum::<usize>(), 7, "{waves:?}");
        assert_eq!(wave_of(&waves, "vol"), wave_of(&waves, "guest"));
    }

    #[test]
    fn migration_ports_are_stable_and_in_the_dynamic_range() {
        let p = derived_port("vm1");
        assert_eq!(p, derived_port("vm1"), "both sides must agree");
        assert_ne!(p, derived_port("vm2"));
        for id in ["a", "vm1", "a-much-longer-resource-name"] {
            assert!((49152..=65151).contains(&derived_port(id)));
        }
    }

    #[test]
    fn agent_results_map_to_outcomes_by_operation() {
        assert_eq!(
            outcome(OpKind::Monitor, &result(OpCode::NotRunning)),
            OpOutcome::NotRunning
        );
        assert!(matches!(
            outcome(OpKind::Start, &result(OpCode::NotRunning)),
            OpOutcome::Failed { rc: 7, .. }
        ));
        assert_eq!(
            outcome(OpKind::Stop, &result(OpCode::Timeout)),
            OpOutcome::TimedOut
        );
        assert_eq!(
            outcome(OpKind::Start, &result(OpCode::Success)),
            OpOutcome::Ok
        );
        assert!(matches!(
            outcome(OpKind::Start, &result(OpCode::SpawnFailed)),
            OpOutcome::Failed { rc: 1, .. }
        ));
    }
}
