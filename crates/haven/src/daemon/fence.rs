//! Fencing, quorum loss and the lab's fault switches: the I/O around haven-ha's
//! `Fencer` and `QuorumWatch`.
//!
//! Fence execution: the coordinator (on the leader) picks a device and an executor node
//! other than the victim. The leader hands the run to the executor over `/ha/fence`
//! (or runs it itself); the executor runs the device and posts the outcome back over
//! `/ha/fence-done`, and the leader feeds it to the coordinator and commits it to Raft
//! (`haven fence history`). Device kinds, by the configured `agent`:
//! - `fence_*` (or an absolute path): a fence agent with the fence-agents stdin protocol.
//!   Every param is the agent's except `pcmk_*` ones, which are Haven's:
//!   `pcmk_host_argument` (stdin key naming the target, `none` for a one-host device),
//!   `pcmk_host_map` (`node:plug;node:plug`), `pcmk_action` (`reboot`, the default, or
//!   `off`), `pcmk_reboot_timeout`. The password comes from `password-file` or
//!   `password-script` at run time and is never logged.
//! - `lab`: the lab's power switch. It kills the victim's daemon and every resource
//!   process it started, found through the pidfiles in `lab-dir`/VICTIM. Only a daemon
//!   started with `--lab` runs it.
//! - `manual` and `watchdog` never reach here: the Fencer waits for an ack or a lease.
//!
//! Quorum loss: the node agent (ha.rs) applies no-quorum-policy once quorum has been
//! gone for its lease (twice the failure-detection time): it stops every resource here
//! without the coordinator. A node that (re)starts holds no lease until it is quorate.
//! With a `watchdog` device whose `device` param names a path (`{node}` is replaced by
//! the node's name), the agent opens it once quorate, writes a keepalive every tick
//! while it holds its lease, stops on quorum loss (so the kernel resets the node) and
//! writes the magic `V` on a clean shutdown. A quorate side using a `watchdog` device
//! waits its `wait` (default 10 s), and never less than the lease plus the device's
//! `timeout` param plus a margin (haven-ha enforces it), before it recovers the node's
//! resources. The coordinator itself runs only while its node sees quorum, so a
//! cut-off leader never fences the majority.
//!
//! Two nodes without a witness (`options.two-node`): a node that has seen its peer
//! since it started keeps quorum when the peer is lost, runs a coordinator even if it
//! is not the Raft leader, and fences the peer; a device's `pcmk_delay_base` /
//! `pcmk_delay_max` decide who shoots first when both lose each other. The node that
//! wins continues alone; Raft cannot commit with one of two voters, so configuration
//! changes are refused until the peer is back.
//!
//! Fence marks: before a fence command leaves, the victim's mark (in doubt) is
//! committed, and its confirmation is committed after, so a new leader resumes the
//! fence or keeps the fenced node out (haven-ha's `handle_fence_marks`). A mark is
//! removed before a fenced node is let back in, never after.
//!
//! The lab's partition switch: a daemon started with `--lab` drops heartbeats on the
//! links named in NODE_DIR/lab-cut (one per line, or `all`), and when link0 is cut also
//! Raft and node RPC, both ways. `haven lab partition|heal` write and remove the file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use haven_exec::{FenceAction, FenceAgentSpec, FenceOutcome, Secret};
use haven_ha::time::Time;
use haven_ha::{Confirmation, Coordinator, Planner, VictimState};
use haven_model::FenceDevice;
use haven_store::{FenceRecord, Request};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::protocol::Empty;
use super::{ApiFailure, Daemon, ha, wall_ms};

pub const FENCE_RUN: &str = "/ha/fence";
pub const FENCE_DONE: &str = "/ha/fence-done";
pub const FENCE_LS: &str = "/api/fence/ls";
pub const FENCE_NODE: &str = "/api/fence/node";
pub const FENCE_ACK: &str = "/api/fence/ack";
pub const FENCE_HISTORY: &str = "/api/fence/history";
pub const NODE_REJOIN: &str = "/api/node/rejoin";
const FENCE_LS_LOCAL: &str = "/local/fence/ls";
const FENCE_NODE_LOCAL: &str = "/local/fence/node";
const FENCE_ACK_LOCAL: &str = "/local/fence/ack";
const NODE_REJOIN_LOCAL: &str = "/local/node/rejoin";

/// The lab's partition flag file, in the node's directory.
pub const LAB_CUT_FILE: &str = "lab-cut";
/// How long the lab switch waits for killed processes to be gone.
const POWER_OFF_WAIT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(100);

/// Leader → executor: run this device against this victim.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FenceRun {
    pub token: u64,
    pub victim: String,
    pub device: String,
    pub timeout_ms: u64,
}

/// Executor → leader: how it went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FenceDone {
    pub token: u64,
    pub victim: String,
    pub device: String,
    pub executor: String,
    pub ok: bool,
    pub detail: String,
    /// Wall-clock milliseconds when the device started.
    #[serde(default)]
    pub started_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeName {
    pub node: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Acked {
    /// False when the node was not being fenced (nothing to acknowledge).
    pub acked: bool,
}

/// `haven fence ls`, after `fence_tool ls`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FenceLs {
    pub leader: String,
    /// Every configured node and its state as the coordinator sees it: pending,
    /// online, unclean (in doubt, being fenced), offline, or fenced (kept out until
    /// `haven node online`).
    pub members: Vec<(String, String)>,
    /// Nodes the coordinator hears on at least one link.
    #[serde(default)]
    pub heard: Vec<String>,
    pub victims: Vec<VictimInfo>,
    /// The victim being fenced now, if any.
    pub victim_now: Option<String>,
    /// `none` or `fencing`.
    pub wait_state: String,
    /// (resource, node): resources that may still run on a node in doubt, so nothing
    /// recovers them until it is fenced. The coordinator's own safety judgement: a
    /// start in flight when the node was lost counts too.
    #[serde(default)]
    pub frozen: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VictimInfo {
    pub name: String,
    pub reason: String,
    /// fencing, waiting-ack, waiting-watchdog, exhausted, confirmed.
    pub state: String,
    pub detail: String,
}

/// What the fence API and the executors send into the coordinator loop.
pub enum FenceInput {
    Done(FenceDone),
    Request(String),
    Ack(String, oneshot::Sender<bool>),
    AllowRejoin(String),
    /// The removal of the mark of a node allowed back was committed (`ok`), or failed:
    /// only then may it rejoin.
    RejoinCommitted {
        node: String,
        ok: bool,
    },
    Ls(oneshot::Sender<FenceLs>),
}

/// The lab's partition switch; inert unless the daemon runs with `--lab`.
#[derive(Debug, Default)]
pub struct LabSwitch {
    pub enabled: bool,
    links: Mutex<BTreeSet<String>>,
    all: AtomicBool,
}

impl LabSwitch {
    pub fn new(enabled: bool) -> Self {
        LabSwitch {
            enabled,
            ..LabSwitch::default()
        }
    }

    /// Whether heartbeats on `link` are dropped.
    pub fn link_cut(&self, link: &str) -> bool {
        self.enabled
            && (self.all.load(Ordering::Relaxed)
                || self.links.lock().is_ok_and(|l| l.contains(link)))
    }

    /// Whether Raft and node RPC (which travel link0) are dropped.
    pub fn rpc_cut(&self) -> bool {
        self.link_cut("link0")
    }

    /// Takes the cut in force in the node's directory now (a lab daemon only).
    pub fn load(&self, node_dir: &Path) {
        if self.enabled {
            let text = std::fs::read_to_string(node_dir.join(LAB_CUT_FILE)).ok();
            self.set(text.as_deref());
        }
    }

    fn set(&self, text: Option<&str>) {
        let mut all = false;
        let mut links = BTreeSet::new();
        for word in text.unwrap_or("").split_whitespace() {
            if word == "all" {
                all = true;
            } else {
                links.insert(word.to_string());
            }
        }
        self.all.store(all, Ordering::Relaxed);
        if let Ok(mut l) = self.links.lock() {
            *l = links;
        }
    }
}

/// Starts the fenced-peer notifier, and the lab switch's file watcher when the daemon
/// runs in a lab.
pub fn spawn(d: Arc<Daemon>) {
    tokio::spawn(tell_fenced_peers(d.clone()));
    if d.lab.enabled {
        let d2 = d.clone();
        // The daemon read the cut before Raft started (`LabSwitch::load`): a node
        // restarted inside a partition must not hear (or be heard by) anyone meanwhile.
        let path = d.state_dir.join(LAB_CUT_FILE);
        let first = std::fs::read_to_string(&path).ok();
        if let Some(t) = &first {
            tracing::warn!("lab: links cut: {}", t.trim());
        }
        tokio::spawn(async move {
            let mut last: Option<String> = first;
            loop {
                let now = std::fs::read_to_string(&path).ok();
                if now != last {
                    match &now {
                        Some(t) => tracing::warn!("lab: links cut: {}", t.trim()),
                        None => tracing::warn!("lab: links healed"),
                    }
                    d2.lab.set(now.as_deref());
                    last = now;
                }
                tokio::time::sleep(TICK).await;
            }
        });
    }
}

/// Quorum as this node sees it right now: the detector is advanced to `now` first, so
/// a silence is never judged later here than by the coordinator.
pub fn quorate_now(d: &Daemon) -> bool {
    let now = d.now();
    if let Ok(mut m) = d.membership.lock() {
        m.handle_timeout(now);
    }
    d.quorate()
}

/// Whether this node has seen a quorate partition since it started (corosync's
/// wait_for_all): one daemon per process.
static SEEN_QUORATE: AtomicBool = AtomicBool::new(false);

/// Quorum, with the two-node rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quorum {
    pub quorate: bool,
    /// Two-node cluster, peer lost: this node holds quorum alone.
    pub alone: bool,
}

pub fn quorum_now(d: &Daemon) -> Quorum {
    if quorate_now(d) {
        // wait_for_all counts a whole cluster only: one with a leader, in which this
        // node is not held fenced. Otherwise a fenced node that comes back, hears its
        // peer once and is cut off again before the mark is committed could play the
        // lone survivor and shoot the node that fenced it. Its own leadership counts
        // only once acknowledged: openraft restores a restarted leader's, so a fenced
        // ex-leader names itself leader before anyone has answered it.
        let me = &d.node.name;
        let held = d.local_marks.get(me).is_some() || d.view.state().fencing.contains_key(me);
        let leader = match d.leader() {
            Some((id, _)) if id == d.node.id => d.is_confirmed_leader(),
            Some(_) => true,
            None => false,
        };
        if leader && !held {
            SEEN_QUORATE.store(true, Ordering::Relaxed);
        }
        return Quorum {
            quorate: true,
            alone: false,
        };
    }
    let lost = Quorum {
        quorate: false,
        alone: false,
    };
    let two_node = committed_config(d).is_some_and(|c| c.options.two_node);
    let voters = d.voters();
    if !two_node || voters.len() != 2 || !voters.contains(&d.node.id) {
        return lost;
    }
    // Only a node that has seen both nodes together may go on alone: one booting by
    // itself cannot tell a dead peer from a cut-off one that runs everything.
    Quorum {
        quorate: SEEN_QUORATE.load(Ordering::Relaxed),
        alone: true,
    }
}

/// Whether the coordinator runs here: on the Raft leader with quorum whose leadership a
/// majority has confirmed, or on a two-node cluster's node that has lost its peer (it
/// races to fence it).
pub fn coordinating(d: &Daemon) -> bool {
    let q = quorum_now(d);
    q.quorate && (q.alone || d.is_confirmed_leader())
}

// ---- the node's own watchdog ----

/// The watchdog this node feeds, from a `watchdog` device's `device` param.
pub fn watchdog_path(d: &Daemon, config: &haven_model::Config) -> Option<PathBuf> {
    config
        .fencing
        .devices
        .iter()
        .filter(|x| x.agent == "watchdog")
        .filter(|x| x.hosts.is_empty() || x.hosts.contains(&d.node.name))
        .find_map(|x| x.params.get("device"))
        .map(|p| PathBuf::from(p.replace("{node}", &d.node.name)))
}

/// Feeds a watchdog device (`/dev/watchdog`, or a file standing in for it): any write
/// is a keepalive, `V` before closing disarms it. Opening arms it, so it is opened only
/// once this node may feed it.
#[derive(Default)]
pub struct WatchdogFeeder {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    complained: bool,
}

impl WatchdogFeeder {
    /// Follows the configuration: a different device is disarmed and the new one opened
    /// at the next feed.
    pub fn set_path(&mut self, path: Option<PathBuf>) {
        if path != self.path {
            self.disarm();
            self.path = path;
            self.complained = false;
        }
    }

    /// Called every tick: `feed` while this node holds its lease.
    pub fn tick(&mut self, feed: bool) {
        use std::io::Write;
        let Some(path) = self.path.clone() else {
            return;
        };
        if !feed {
            // Not a word: the device resets the node when its timeout runs out.
            return;
        }
        if self.file.is_none() {
            match std::fs::OpenOptions::new().write(true).open(&path) {
                Ok(f) => {
                    tracing::info!("watchdog {} armed", path.display());
                    self.file = Some(f);
                }
                Err(e) => {
                    if !self.complained {
                        tracing::error!("watchdog {}: cannot open: {e}", path.display());
                        self.complained = true;
                    }
                    return;
                }
            }
        }
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_all(b"1")
            && !self.complained
        {
            tracing::error!("watchdog {}: keepalive failed: {e}", path.display());
            self.complained = true;
        }
    }

    /// A clean stop: the magic close, so the device does not reset the node.
    pub fn disarm(&mut self) {
        use std::io::Write;
        if let Some(mut f) = self.file.take() {
            match f.write_all(b"V") {
                Ok(()) => {
                    if let Some(p) = &self.path {
                        tracing::info!("watchdog {} disarmed", p.display());
                    }
                }
                Err(e) => tracing::error!("watchdog: magic close failed: {e}"),
            }
        }
    }
}

// ---- fence marks this node keeps itself ----

/// Where a node keeps the peers it fenced whose marks are not committed yet.
pub const LOCAL_MARKS_FILE: &str = "fence-marks.json";

/// Peers this node has fenced (confirmed) while the replicated state could not take
/// the mark: a two-node survivor alone cannot commit. Without this, the mark would
/// die with the survivor's coordinator the moment the peer is heard again (the
/// survivor is then quorate but not the leader), and the peer would rejoin unasked.
/// While a peer is here this node refuses it its Raft vote until the peer has
/// acknowledged being fenced, so it cannot lead and let itself in; a coordinator this
/// node runs starts from these marks and commits them. A node told it was fenced keeps
/// its own name here. On disk (NODE_DIR/fence-marks.json, node → reason) so a restart
/// keeps them; a mark goes once the replicated state holds it, or when an operator lets
/// the node back.
#[derive(Debug)]
pub struct LocalMarks {
    path: PathBuf,
    marks: Mutex<BTreeMap<String, String>>,
    /// Peers that have acknowledged being fenced (`/ha/fenced`): they keep themselves
    /// out, so they may have this node's vote again.
    told: Mutex<BTreeSet<String>>,
}

impl LocalMarks {
    pub fn load(dir: &Path) -> anyhow::Result<LocalMarks> {
        use anyhow::Context;
        let path = dir.join(LOCAL_MARKS_FILE);
        let marks = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{}: not a JSON object of fenced node to reason; it lists peers this node fenced, so it is not ignored: repair it, or remove it to let them rejoin",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
        };
        Ok(LocalMarks {
            path,
            marks: Mutex::new(marks),
            told: Mutex::new(BTreeSet::new()),
        })
    }

    /// Why `node` was fenced, if this node holds its mark.
    pub fn get(&self, node: &str) -> Option<String> {
        self.marks.lock().ok()?.get(node).cloned()
    }

    pub fn all(&self) -> BTreeMap<String, String> {
        self.marks.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn keep(&self, node: &str, reason: &str) {
        self.change(|m| m.insert(node.to_string(), reason.to_string()).as_deref() != Some(reason));
    }

    pub fn forget(&self, node: &str) {
        self.change(|m| m.remove(node).is_some());
        if let Ok(mut t) = self.told.lock() {
            t.remove(node);
        }
    }

    fn told(&self, node: &str) -> bool {
        self.told.lock().is_ok_and(|t| t.contains(node))
    }

    fn mark_told(&self, node: &str) {
        if let Ok(mut t) = self.told.lock() {
            t.insert(node.to_string());
        }
    }

    /// Applies `edit`, and writes the file if it changed something (a new file, then a
    /// rename: a crash leaves the old marks or the new, never half of them).
    fn change(&self, edit: impl FnOnce(&mut BTreeMap<String, String>) -> bool) {
        let Ok(mut marks) = self.marks.lock() else {
            return;
        };
        if !edit(&mut marks) {
            return;
        }
        let text = serde_json::to_string_pretty(&*marks).unwrap_or_default();
        let tmp = self.path.with_extension("json.new");
        let written = std::fs::write(&tmp, text)
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::error!(
                "{}: cannot write this node's fence marks: {e} (a restart would forget them)",
                self.path.display()
            );
        }
    }
}

/// Keeps the local marks in step: a peer this node's coordinator holds fenced goes in
/// while the replicated state lacks its confirmed mark; a mark the replicated state
/// holds confirmed comes out (the committed one keeps the peer out from then on).
/// `coordinator` is None when this node does not coordinate.
pub fn sync_local_marks<P: Planner>(
    d: &Daemon,
    coordinator: Option<(&Coordinator<P>, &BTreeSet<String>)>,
) {
    let committed = d.view.state().fencing;
    let committed_confirmed = |n: &str| committed.get(n).is_some_and(|m| m.confirmed);
    if let Some((c, rejoining)) = coordinator {
        for (node, (confirmed, reason)) in c.fence_marks() {
            if confirmed && !rejoining.contains(&node) && !committed_confirmed(&node) {
                d.local_marks.keep(&node, &reason);
            }
        }
    }
    for node in d.local_marks.all().keys() {
        if committed_confirmed(node) {
            d.local_marks.forget(node);
        }
    }
}

/// In every refusal of a vote to a node this node fenced; the candidate recognises it.
pub const FENCED_NO_VOTE: &str = "no vote for a node this node fenced";

/// How long a node refused a vote as fenced stays out of elections.
const ELECTION_PAUSE: Duration = Duration::from_secs(5);

/// A node its peer refuses as fenced stops campaigning for a while: each of its
/// elections would raise the term past the peer's, and the peer, which must win to
/// commit the mark, would keep losing to the higher term (a livelock seen in tests).
/// It campaigns again afterwards, in case it is the only one left.
pub async fn pause_elections(d: Arc<Daemon>, refused: Arc<AtomicBool>) {
    loop {
        tokio::time::sleep(TICK).await;
        if !refused.swap(false, Ordering::Relaxed) {
            continue;
        }
        tracing::warn!(
            "a peer refuses this node its vote because it fenced it: not campaigning for {ELECTION_PAUSE:?} (it lets this node in once its mark is committed and `haven node online {}` is run)",
            d.node.name
        );
        d.raft.runtime_config().elect(false);
        tokio::time::sleep(ELECTION_PAUSE).await;
        d.raft.runtime_config().elect(true);
        refused.store(false, Ordering::Relaxed);
    }
}

/// Why this node refuses `candidate` its vote: it fenced it, the mark is only here,
/// and the candidate has not acknowledged it (see [`tell_fenced_peers`]).
pub fn vote_refusal(d: &Daemon, candidate: &str) -> Option<String> {
    let reason = d.local_marks.get(candidate)?;
    if d.local_marks.told(candidate) {
        return None;
    }
    if d.view
        .state()
        .fencing
        .get(candidate)
        .is_some_and(|m| m.confirmed)
    {
        return None;
    }
    Some(format!(
        "{FENCED_NO_VOTE}: {} fenced {candidate} ({reason}) and the mark is not committed yet; no vote for it until this node has committed it as leader, or an operator runs `haven node online {candidate}`",
        d.node.name
    ))
}

/// A node fenced by its peer while the mark could not be committed learns it here.
pub const FENCED_NOTICE: &str = "/ha/fenced";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FencedNotice {
    /// Who fenced it.
    pub by: String,
    pub victim: String,
    pub reason: String,
}

/// Tells each peer this node holds fenced (uncommitted) and hears again that it is
/// fenced, until it acknowledges. Refusing it the vote alone is not enough: a peer
/// whose Raft log is ahead (it led, and appended what this node never got) refuses this
/// node's vote too, and neither could lead. A peer that acknowledged keeps the mark on
/// itself — the coordinator it runs if it leads starts with its own node fenced — and
/// may have this node's vote again, so one of them leads and commits the mark.
pub async fn tell_fenced_peers(d: Arc<Daemon>) {
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let committed = d.view.state().fencing;
        for (peer, reason) in d.local_marks.all() {
            let done = peer == d.node.name
                || d.local_marks.told(&peer)
                || committed.get(&peer).is_some_and(|m| m.confirmed)
                || d.liveness(&peer) != Some(haven_ha::Liveness::Alive)
                || d.lab.rpc_cut();
            if done {
                continue;
            }
            let Some(addr) = d
                .members()
                .into_iter()
                .find(|(n, _)| *n == peer)
                .and_then(|(_, info)| d.peer_addr(&info))
            else {
                continue;
            };
            let notice = FencedNotice {
                by: d.node.name.clone(),
                victim: peer.clone(),
                reason,
            };
            let r: Result<Empty, _> = d
                .rpc
                .call_node(None, &addr, &peer, FENCED_NOTICE, &notice)
                .await;
            match r {
                Ok(_) => {
                    tracing::info!(
                        "{peer} acknowledged that it was fenced: it may have this node's vote again"
                    );
                    d.local_marks.mark_told(&peer);
                }
                Err(e) => tracing::debug!("telling {peer} it was fenced: {e}"),
            }
        }
    }
}

async fn fenced_notice(
    State(d): D,
    axum::Extension(caller): axum::Extension<super::api::Caller>,
    Json(n): Json<FencedNotice>,
) -> ApiResult<Empty> {
    caller.must_be(FENCED_NOTICE, "by", &n.by)?;
    if n.victim != d.node.name {
        return Err(ApiFailure::bad_request(format!(
            "{FENCED_NOTICE}: the notice is for {}, and this is {}",
            n.victim, d.node.name
        )));
    }
    if d.local_marks.get(&d.node.name).is_none() {
        tracing::warn!(
            "{} fenced this node ({}): it stays out until `haven node online {}`",
            n.by,
            n.reason,
            d.node.name
        );
    }
    d.local_marks
        .keep(&d.node.name, &format!("fenced by {}: {}", n.by, n.reason));
    Ok(Json(Empty {}))
}

/// Fence marks a new coordinator starts from: this node's own (confirmed) first, then
/// what earlier leaders committed. In a two-node cluster a confirmed fence supersedes
/// the doubt held about the other node (`haven_ha::fencing::after_two_node_race`): the
/// winner of a race does not hold itself in doubt, and a loser told it was fenced does
/// not shoot the winner on a mark it made before.
pub fn starting_marks(d: &Daemon) -> Vec<(String, bool, String)> {
    let mut marks: Vec<(String, bool, String)> = d
        .local_marks
        .all()
        .into_iter()
        .map(|(n, r)| (n, true, r))
        .collect();
    for m in committed_marks(d) {
        if !marks.iter().any(|(n, ..)| *n == m.0) {
            marks.push(m);
        }
    }
    if two_node(d) {
        marks = haven_ha::fencing::after_two_node_race(marks);
    }
    marks
}

fn two_node(d: &Daemon) -> bool {
    committed_config(d).is_some_and(|c| c.options.two_node)
}

/// Two-node: this node's own fence of its peer succeeded, but no coordinator here was
/// waiting for the answer (a heal made the peer leader for a moment and stopped this
/// node's coordinator, or it restarted). The switch has spoken: keep the peer fenced
/// on disk, as for any fence confirmed alone, so the coordinator this node runs next
/// starts from it and the peer stays out. Dropped, it left the winner of a race in
/// doubt of itself, and the loser came back and shot it. Returns whether it kept it;
/// the caller then starts its coordinator again from the marks.
pub fn keep_orphaned_result(d: &Daemon, done: &FenceDone) -> bool {
    if !done.ok || done.executor != d.node.name || done.victim == d.node.name || !two_node(d) {
        return false;
    }
    if d.local_marks.get(&done.victim).is_none() {
        tracing::warn!(
            "fencing {} with {} succeeded after the coordinator that ordered it stopped: this node keeps {} fenced",
            done.victim,
            done.device,
            done.victim
        );
    }
    d.local_marks.keep(
        &done.victim,
        &format!(
            "fenced by {} with {} (the answer came after a coordinator change)",
            d.node.name, done.device
        ),
    );
    true
}

// ---- fence marks in the replicated state ----

/// Serialises writes of fence marks, so one that removes a mark (a rejoin) is never
/// overtaken by an earlier one that sets it.
static MARK_WRITES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn write_mark(d: &Daemon, node: &str, mark: Option<haven_store::FenceMark>) -> bool {
    let _one = MARK_WRITES.lock().await;
    let req = Request::SetFenceMark {
        node: node.to_string(),
        mark,
    };
    match d.write(req).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!("recording the fence mark of {node}: {}", e.1);
            false
        }
    }
}

/// `haven node online` for a fenced node: its mark goes first, then the coordinator
/// lets it in — a new leader never forgets the resources of a node let back in.
pub fn remove_mark_then_rejoin(d: &Arc<Daemon>, node: String) {
    let d = d.clone();
    tokio::spawn(async move {
        let marked = d.view.state().fencing.contains_key(&node);
        let ok = !marked || write_mark(&d, &node, None).await;
        let _ =
            d.ha.coord
                .send(ha::CoordInput::Fence(FenceInput::RejoinCommitted {
                    node,
                    ok,
                }));
    });
}

/// The marks earlier leaders committed, for a new coordinator.
pub fn committed_marks(d: &Daemon) -> Vec<(String, bool, String)> {
    d.view
        .state()
        .fencing
        .iter()
        .map(|(n, m)| (n.clone(), m.confirmed, m.reason.clone()))
        .collect()
}

/// Commits marks the coordinator has and the replicated state lacks (new victims,
/// confirmations), one write at a time, and drops marks of nodes no longer configured.
/// Marks of nodes being let back in are left to the rejoin.
pub fn publish_marks<P: Planner>(
    d: &Arc<Daemon>,
    c: &Coordinator<P>,
    rejoining: &BTreeSet<String>,
    in_flight: &Arc<AtomicBool>,
) {
    let committed = d.view.state().fencing;
    let configured: BTreeSet<String> = c.view().nodes.keys().cloned().collect();
    let mut todo: Vec<(String, Option<haven_store::FenceMark>)> = Vec::new();
    let held = c.fence_marks();
    // A doubt the coordinator dropped because a confirmed fence of the two-node peer
    // superseded it goes from the replicated state too, or a later leader would resume
    // it once the peer's mark is gone. Only then: elsewhere a mark committed after this
    // coordinator started (an earlier one's write landing late) must stay.
    let superseded = two_node(d) && held.values().any(|(confirmed, _)| *confirmed);
    for (node, mark) in &committed {
        if superseded
            && !mark.confirmed
            && configured.contains(node)
            && !held.contains_key(node)
            && !rejoining.contains(node)
        {
            todo.push((node.clone(), None));
        }
    }
    for (node, (confirmed, reason)) in held {
        if rejoining.contains(&node) {
            continue;
        }
        let stale = committed
            .get(&node)
            .is_none_or(|m| !m.confirmed && confirmed);
        if stale {
            let mark = haven_store::FenceMark { confirmed, reason };
            todo.push((node, Some(mark)));
        }
    }
    for node in committed.keys() {
        if !configured.contains(node) {
            todo.push((node.clone(), None));
        }
    }
    if todo.is_empty() || in_flight.swap(true, Ordering::AcqRel) {
        return;
    }
    let d = d.clone();
    let in_flight = in_flight.clone();
    tokio::spawn(async move {
        for (node, mark) in todo {
            if !write_mark(&d, &node, mark).await {
                break;
            }
        }
        in_flight.store(false, Ordering::Release);
    });
}

/// A fence command leaves only once its victim's mark is committed, so a leader that
/// dies right after leaves the fence to its successor instead of a clean-looking node.
/// A two-node survivor alone cannot commit, and fences at once.
pub fn dispatch_marked(d: &Arc<Daemon>, run: FenceRun, executor: String, reason: String) {
    let committed = d.view.state().fencing.contains_key(&run.victim);
    if committed || quorum_now(d).alone {
        dispatch(d, run, executor);
        return;
    }
    let d = d.clone();
    tokio::spawn(async move {
        let mark = haven_store::FenceMark {
            confirmed: false,
            reason,
        };
        // Fencing is never unsafe: if the mark cannot be committed, fence anyway.
        write_mark(&d, &run.victim, Some(mark)).await;
        dispatch(&d, run, executor);
    });
}

/// `haven config apply` must not remove a node that still runs resources (or is in
/// doubt): the cluster would lose track of them.
pub fn refuse_node_removal(d: &Daemon, next: &haven_model::Config) -> Result<(), ApiFailure> {
    let state = d.view.state();
    let Some(current) = committed_config(d) else {
        return Ok(());
    };
    let kept: BTreeSet<&str> = next.nodes.iter().map(|n| n.name.as_str()).collect();
    for node in current.nodes.iter().map(|n| n.name.as_str()) {
        if kept.contains(node) {
            continue;
        }
        let running: Vec<&str> = state
            .placement
            .iter()
            .filter(|(_, on)| on.iter().any(|n| n == node))
            .map(|(r, _)| r.as_str())
            .collect();
        if !running.is_empty() {
            return Err(ApiFailure::refused(format!(
                "configuration change refused: it removes node {node}, which still runs {}; \
                 move them off first (`haven node standby {node}`), then apply again",
                running.join(", ")
            )));
        }
        if state.node_states.get(node).map(String::as_str) == Some("unclean") {
            return Err(ApiFailure::refused(format!(
                "configuration change refused: it removes node {node}, which is in doubt \
                 (lost and not yet fenced); fence it or `haven fence ack {node}` first"
            )));
        }
    }
    Ok(())
}

fn committed_config(d: &Daemon) -> Option<haven_model::Config> {
    let state = d.view.state();
    haven_model::Config::from_toml("cluster configuration", &state.config.text).ok()
}

// ---- fence execution ----

/// The coordinator's `Fence` command: run it here or hand it to the executor.
pub fn dispatch(d: &Arc<Daemon>, run: FenceRun, executor: String) {
    if executor == d.node.name {
        let d = d.clone();
        tokio::spawn(async move {
            let done = execute(&d, &run).await;
            let _ =
                d.ha.coord
                    .send(ha::CoordInput::Fence(FenceInput::Done(done)));
        });
        return;
    }
    let addr = d
        .members()
        .into_iter()
        .find(|(n, _)| *n == executor)
        .and_then(|(_, info)| d.peer_addr(&info));
    let d = d.clone();
    tokio::spawn(async move {
        let failed = |detail: String| FenceDone {
            token: run.token,
            victim: run.victim.clone(),
            device: run.device.clone(),
            executor: executor.clone(),
            ok: false,
            detail,
            started_ms: wall_ms(),
        };
        let r: Result<Empty, String> = match (&addr, d.lab.rpc_cut()) {
            (_, true) => Err("this node is cut off (lab partition)".into()),
            (None, _) => Err(format!("no address for executor {executor}")),
            (Some(addr), _) => d
                .rpc
                .call_node(None, addr, &executor, FENCE_RUN, &run)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = r {
            // Handing it over failed: that is a failed attempt, and the Fencer moves on.
            tracing::warn!("fencing {} with {}: {e}", run.victim, run.device);
            let _ =
                d.ha.coord
                    .send(ha::CoordInput::Fence(FenceInput::Done(failed(e))));
        }
    });
}

/// Runs one device against one victim on this node.
pub async fn execute(d: &Daemon, run: &FenceRun) -> FenceDone {
    let started_ms = wall_ms();
    let timeout = Duration::from_millis(run.timeout_ms);
    let (ok, detail) = match device(d, &run.device) {
        Err(e) => (false, e),
        Ok(dev) if dev.agent == "lab" => {
            if !d.lab.enabled {
                (
                    false,
                    format!(
                        "fence device {}: agent lab runs only in a lab (daemon --lab)",
                        dev.id
                    ),
                )
            } else {
                match dev.params.get("lab-dir") {
                    None => (
                        false,
                        format!("fence device {}: params.lab-dir is required", dev.id),
                    ),
                    Some(dir) => {
                        let node_dir = Path::new(dir).join(&run.victim);
                        match tokio::task::spawn_blocking(move || power_off(&node_dir)).await {
                            Ok(Ok(n)) => (true, format!("lab switch: {n} process(es) killed")),
                            Ok(Err(e)) => (false, format!("lab switch: {e}")),
                            Err(e) => (false, format!("lab switch: {e}")),
                        }
                    }
                }
            }
        }
        Ok(dev) => match agent_spec(&dev) {
            Err(e) => (false, e),
            Ok((spec, action)) => {
                let r = haven_exec::run_fence(&spec, action, &run.victim, timeout).await;
                let ok = r.outcome == FenceOutcome::Success;
                // Output is redacted by haven-exec; keep only a line of it.
                let mut detail = format!("{} {}: {:?}", dev.agent, action.as_str(), r.outcome);
                for note in &r.notes {
                    detail.push_str(&format!("; {note}"));
                }
                if let Some(l) = r.stderr.lines().rev().find(|l| !l.trim().is_empty()) {
                    detail.push_str(&format!("; {}", l.trim()));
                }
                (ok, detail)
            }
        },
    };
    if ok {
        tracing::warn!("fenced {} with {}: {detail}", run.victim, run.device);
    } else {
        tracing::error!(
            "fencing {} with {} failed: {detail}",
            run.victim,
            run.device
        );
    }
    FenceDone {
        token: run.token,
        victim: run.victim.clone(),
        device: run.device.clone(),
        executor: d.node.name.clone(),
        ok,
        detail,
        started_ms,
    }
}

fn device(d: &Daemon, id: &str) -> Result<FenceDevice, String> {
    let config = committed_config(d).ok_or("the committed configuration is unusable")?;
    config
        .fencing
        .devices
        .iter()
        .find(|x| x.id == id)
        .cloned()
        .ok_or_else(|| format!("fence device {id} is not in the configuration"))
}

/// A configured device as haven-exec runs it, and the action that fences.
pub fn agent_spec(dev: &FenceDevice) -> Result<(FenceAgentSpec, FenceAction), String> {
    let field = |k: &str| format!("fencing.devices.{}.params.{k}", dev.id);
    let mut spec = FenceAgentSpec::new(dev.agent.clone());
    let mut action = FenceAction::Reboot;
    for (k, v) in &dev.params {
        match k.as_str() {
            "pcmk_host_argument" => {
                spec.host_argument = match v.as_str() {
                    "" | "none" => None,
                    _ => Some(v.clone()),
                }
            }
            "pcmk_host_map" => {
                for pair in v.split([';', ',', ' ']).filter(|p| !p.is_empty()) {
                    let Some((node, plug)) = pair.split_once(':') else {
                        return Err(format!(
                            "{}: {pair:?} is not NODE:PLUG",
                            field("pcmk_host_map")
                        ));
                    };
                    spec.host_map.insert(node.to_string(), plug.to_string());
                }
            }
            "pcmk_action" => {
                action = match v.as_str() {
                    "reboot" => FenceAction::Reboot,
                    "off" => FenceAction::Off,
                    other => {
                        return Err(format!(
                            "{}: {other:?} must be reboot or off",
                            field("pcmk_action")
                        ));
                    }
                }
            }
            // Haven's own settings (timeouts, delays), not the agent's.
            k if k.starts_with("pcmk_") => {}
            _ => {
                spec.params.insert(k.clone(), v.clone());
            }
        }
    }
    spec.secret = match (&dev.password_file, &dev.password_script) {
        (Some(_), Some(_)) => {
            return Err(format!(
                "fencing.devices.{}: give password-file or password-script, not both",
                dev.id
            ));
        }
        (Some(f), None) => Some(Secret::File(PathBuf::from(f))),
        (None, Some(s)) => Some(Secret::Script(PathBuf::from(s))),
        (None, None) => None,
    };
    spec.validate()
        .map_err(|e| format!("fencing.devices.{}: {e}", dev.id))?;
    Ok((spec, action))
}

/// The lab's power switch: kills the daemon of the node in `node_dir` and every
/// resource process it started (each one's process group), by the pidfiles, and in a
/// lab of network namespaces every process left in the node's namespace; waits until
/// they are gone. Returns how many processes it killed. `haven lab kill` is this too.
pub fn power_off(node_dir: &Path) -> Result<usize, String> {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    // Finding nothing to kill is success only for a node that is really there: a wrong
    // lab-dir must fail, not confirm a fence that never happened.
    if !node_dir.join("node.toml").is_file() {
        return Err(format!(
            "{}: not a lab node directory (no node.toml); check params.lab-dir",
            node_dir.display()
        ));
    }
    // The daemon is recognised by the directory on its command line, which the lab
    // gives in canonical form.
    let node_dir = &node_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", node_dir.display()))?;
    let mut victims: Vec<haven_exec::pidfile::Tracked> = Vec::new();
    // The daemon first, so it cannot start anything more while its children die.
    if let Some(pid) = lab_daemon_pid(node_dir)
        && let Some(t) = haven_exec::pidfile::Tracked::of(pid)
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        victims.push(t);
    }
    for pf in resource_pidfiles(node_dir) {
        let Ok(Some(t)) = haven_exec::pidfile::read(&pf) else {
            continue;
        };
        if t.alive() {
            // Resources run in their own process group: kill the whole tree.
            let _ = killpg(Pid::from_raw(t.pid), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(t.pid), Signal::SIGKILL);
            victims.push(t);
        }
    }
    let deadline = Instant::now() + POWER_OFF_WAIT;
    while victims.iter().any(|t| t.alive()) {
        if Instant::now() > deadline {
            let left: Vec<i32> = victims
                .iter()
                .filter(|t| t.alive())
                .map(|t| t.pid)
                .collect();
            return Err(format!(
                "{}: processes {left:?} survived SIGKILL for {POWER_OFF_WAIT:?}",
                node_dir.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(victims.len() + power_off_namespace(node_dir)?)
}

/// A node in a network namespace is powered off whole: what it started outside its
/// pidfiles (an agent's double-forked helper, a guest's sidecar) dies with it.
fn power_off_namespace(node_dir: &Path) -> Result<usize, String> {
    use crate::cmd::lab::netns;
    let (Some(lab_dir), Some(node)) = (node_dir.parent(), node_dir.file_name()) else {
        return Ok(0);
    };
    let record = netns::load(lab_dir).map_err(|e| format!("{e:#}"))?;
    let Some(record) = record else {
        return Ok(0);
    };
    let ns = &record
        .node(&node.to_string_lossy())
        .map_err(|e| format!("{e:#}"))?
        .netns;
    let killed = netns::kill_all(ns);
    let left = netns::pids(ns);
    if !left.is_empty() {
        return Err(format!(
            "namespace {ns}: processes {left:?} survived SIGKILL for {POWER_OFF_WAIT:?}"
        ));
    }
    Ok(killed)
}

/// The pid in NODE_DIR/daemon.pid, if it is that node's `haven daemon` (a recycled pid
/// belonging to something else is never signalled).
pub fn lab_daemon_pid(node_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(node_dir.join("daemon.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let dir = node_dir.to_string_lossy();
    let alive = haven_exec::pidfile::is_alive(pid);
    (alive && args.iter().any(|a| a == "daemon") && args.iter().any(|a| *a == dir)).then_some(pid)
}

/// The pidfiles of the resources a node's agents started.
pub fn resource_pidfiles(node_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(node_dir.join("resources"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pid"))
        .collect();
    out.sort();
    out
}

// ---- the coordinator side ----

/// Feeds one fence input to the coordinator (on the leader).
pub fn handle_input<P: Planner>(
    d: &Arc<Daemon>,
    c: &mut Coordinator<P>,
    input: FenceInput,
    now: Time,
) {
    match input {
        FenceInput::Done(done) => {
            // Only the answer to the run in progress counts: a token from an earlier
            // leader's coordinator may collide with ours.
            let current = c.fencer().victims().any(|(v, _, s)| {
                v == done.victim
                    && matches!(s, VictimState::Running { token, executor, .. }
                        if *token == done.token && *executor == done.executor)
            });
            if !current {
                tracing::info!(
                    "late fence result for {} from {} ignored",
                    done.victim,
                    done.executor
                );
                return;
            }
            c.handle_fence_result(done.token, done.ok, now);
            let confirmed = done.ok && c.fencer().is_confirmed(&done.victim);
            commit(
                d,
                FenceRecord {
                    victim: done.victim,
                    device: done.device,
                    executor: done.executor,
                    ok: done.ok,
                    at_ms: wall_ms(),
                    started_ms: done.started_ms,
                    detail: done.detail,
                },
                confirmed,
            );
        }
        FenceInput::Request(node) => c.handle_fence_request(&node, now),
        FenceInput::Ack(node, reply) => {
            let acked = c.handle_fence_ack(&node, now);
            let _ = reply.send(acked);
        }
        // The coordinator loop removes the mark first, then sends RejoinCommitted.
        FenceInput::AllowRejoin(_) => {}
        FenceInput::RejoinCommitted { node, ok } => {
            if ok {
                c.handle_allow_rejoin(&node, now);
            }
        }
        FenceInput::Ls(reply) => {
            let _ = reply.send(fence_ls(d, c));
        }
    }
}

/// Tells a new coordinator which links this node's detector hears now.
pub fn seed_heartbeats<P: Planner>(d: &Daemon, c: &mut Coordinator<P>, now: Time) {
    let heard: Vec<(String, String)> = match d.membership.lock() {
        Ok(m) => d
            .members()
            .into_iter()
            .flat_map(|(name, _)| {
                m.links(&name)
                    .into_iter()
                    .filter(|(_, up)| *up)
                    .map(move |(link, _)| (name.clone(), link))
                    .collect::<Vec<_>>()
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    for (node, link) in heard {
        c.handle_heartbeat(&node, &link, now);
    }
}

/// Commits confirmations that no device run reported (an operator's ack, a watchdog
/// wait) once each. `seen` remembers what was committed.
pub fn record_confirmations<P: Planner>(
    d: &Arc<Daemon>,
    c: &Coordinator<P>,
    seen: &mut BTreeMap<String, Time>,
) {
    let mut current = BTreeSet::new();
    for (victim, reason, state) in c.fencer().victims() {
        let VictimState::Confirmed { at, by } = state else {
            continue;
        };
        current.insert(victim.to_string());
        if seen.get(victim) == Some(at) {
            continue;
        }
        seen.insert(victim.to_string(), *at);
        let (device, detail) = match by {
            // Committed with the run's result, or by the leader that confirmed it.
            Confirmation::Device { .. } | Confirmation::Earlier => continue,
            Confirmation::Manual => (
                "manual".to_string(),
                format!("acknowledged by an operator ({reason})"),
            ),
            Confirmation::Watchdog { device } => (
                device.clone(),
                format!("watchdog: the node's lease has run out ({reason})"),
            ),
        };
        commit(
            d,
            FenceRecord {
                victim: victim.to_string(),
                device,
                executor: d.node.name.clone(),
                ok: true,
                at_ms: wall_ms(),
                started_ms: 0,
                detail,
            },
            true,
        );
    }
    seen.retain(|v, _| current.contains(v));
}

fn commit(d: &Arc<Daemon>, record: FenceRecord, confirmed: bool) {
    let d = d.clone();
    tokio::spawn(async move {
        if let Err(e) = d.write(Request::RecordFence { record, confirmed }).await {
            tracing::warn!("recording a fence result: {}", e.1);
        }
    });
}

fn fence_ls<P: Planner>(d: &Daemon, c: &Coordinator<P>) -> FenceLs {
    let view = c.view();
    let fenced: BTreeSet<&str> = c
        .fencer()
        .victims()
        .filter(|(_, _, s)| matches!(s, VictimState::Confirmed { .. }))
        .map(|(n, ..)| n)
        .collect();
    // A node the coordinator keeps offline because it was fenced is "fenced": it stays
    // out, heard or not, until `haven node online`.
    let members = view
        .nodes
        .iter()
        .map(|(n, s)| {
            let state = match s {
                haven_ha::NodeState::Offline if fenced.contains(n.as_str()) => "fenced".into(),
                s => format!("{s:?}").to_lowercase(),
            };
            (n.clone(), state)
        })
        .collect();
    let mut victims = Vec::new();
    let mut victim_now = None;
    for (name, reason, state) in c.fencer().victims() {
        let (short, detail) = match state {
            VictimState::Running {
                level,
                step,
                executor,
                ..
            } => (
                "fencing",
                format!("level {} device {} run by {executor}", level + 1, step + 1),
            ),
            VictimState::WaitingManual { level, .. } => (
                "waiting-ack",
                format!("level {}: waiting for `haven fence ack {name}`", level + 1),
            ),
            VictimState::WaitingWatchdog { level, until, .. } => (
                "waiting-watchdog",
                format!(
                    "level {}: the node's watchdog lease ends in {} ms",
                    level + 1,
                    until.0.saturating_sub(d.now().0)
                ),
            ),
            VictimState::Delaying { level, until, .. } => (
                "delaying",
                format!(
                    "level {}: the device's delay ends in {} ms",
                    level + 1,
                    until.0.saturating_sub(d.now().0)
                ),
            ),
            VictimState::Exhausted { retry_at } => (
                "exhausted",
                format!(
                    "every level failed; retrying in {} ms",
                    retry_at.0.saturating_sub(d.now().0)
                ),
            ),
            VictimState::Confirmed { by, .. } => ("confirmed", by.to_string()),
        };
        if short != "confirmed" && victim_now.is_none() {
            victim_now = Some(name.to_string());
        }
        victims.push(VictimInfo {
            name: name.to_string(),
            reason: reason.to_string(),
            state: short.to_string(),
            detail,
        });
    }
    let frozen = view
        .resources
        .iter()
        .flat_map(|(r, per_node)| {
            per_node
                .iter()
                .filter(|(n, o)| {
                    o.maybe_active() && view.nodes.get(*n) == Some(&haven_ha::NodeState::Unclean)
                })
                .map(move |(n, _)| (r.clone(), n.clone()))
        })
        .collect();
    let heard = c
        .status()
        .links
        .into_iter()
        .filter(|(_, links)| links.iter().any(|(_, up)| *up))
        .map(|(n, _)| n)
        .collect();
    FenceLs {
        leader: d.node.name.clone(),
        members,
        heard,
        victims,
        wait_state: if victim_now.is_some() {
            "fencing"
        } else {
            "none"
        }
        .to_string(),
        victim_now,
        frozen,
    }
}

// ---- API ----

type D = State<Arc<Daemon>>;
type ApiResult<T> = Result<Json<T>, ApiFailure>;

pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route(FENCE_RUN, post(fence_run))
        .route(FENCE_DONE, post(fence_done))
        .route(FENCE_LS, post(ls))
        .route(FENCE_LS_LOCAL, post(ls_local))
        .route(FENCE_NODE, post(node))
        .route(FENCE_NODE_LOCAL, post(node_local))
        .route(FENCE_ACK, post(ack))
        .route(FENCE_ACK_LOCAL, post(ack_local))
        .route(NODE_REJOIN, post(rejoin))
        .route(NODE_REJOIN_LOCAL, post(rejoin_local))
        .route(FENCE_HISTORY, post(history))
        .route(FENCED_NOTICE, post(fenced_notice))
}

/// Paths only peers use; the lab's partition switch drops them.
pub fn peer_path(path: &str) -> bool {
    ["/raft/", "/ha/", "/local/", "/hb"]
        .iter()
        .any(|p| path.starts_with(p))
        || path == super::api::PROMOTE
}

/// Middleware: with link0 cut (lab partition), peer traffic is refused.
pub async fn lab_cut(
    State(d): D,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if d.lab.rpc_cut() && peer_path(req.uri().path()) && req.uri().path() != super::heartbeat::PATH
    {
        return axum::response::IntoResponse::into_response(ApiFailure::unavailable(
            "lab partition: this node is cut off",
        ));
    }
    next.run(req).await
}

async fn fence_run(State(d): D, Json(run): Json<FenceRun>) -> ApiResult<Empty> {
    if d.node.witness {
        return Err(ApiFailure::refused(format!(
            "{} is a witness and runs no fence devices",
            d.node.name
        )));
    }
    if run.victim == d.node.name {
        return Err(ApiFailure::refused("a node never fences itself"));
    }
    // The victim's name becomes a path under the lab's directory: only a member's.
    known_node(&d, &run.victim)?;
    tokio::spawn(async move {
        let done = execute(&d, &run).await;
        send_done(&d, done).await;
    });
    Ok(Json(Empty {}))
}

/// Delivers a result to whoever leads, with a few tries across a leader change; after
/// that the Fencer's own deadline counts the run as failed.
async fn send_done(d: &Daemon, done: FenceDone) {
    for _ in 0..10 {
        if d.lab.rpc_cut() {
            break;
        }
        match d.leader() {
            Some((id, _)) if id == d.node.id => {
                let _ =
                    d.ha.coord
                        .send(ha::CoordInput::Fence(FenceInput::Done(done)));
                return;
            }
            Some((_, info)) => {
                if let Some(addr) = d.peer_addr(&info) {
                    let r: Result<Empty, _> = d
                        .rpc
                        .call_node(None, &addr, &info.name, FENCE_DONE, &done)
                        .await;
                    match r {
                        Ok(_) => return,
                        Err(e) => tracing::debug!("fence result to the leader: {e}"),
                    }
                }
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tracing::warn!(
        "could not deliver the result of fencing {} to a leader",
        done.victim
    );
}

async fn fence_done(
    State(d): D,
    axum::Extension(caller): axum::Extension<super::api::Caller>,
    Json(done): Json<FenceDone>,
) -> ApiResult<Empty> {
    caller.must_be(FENCE_DONE, "executor", &done.executor)?;
    super::api::require_leader(&d)?;
    let _ =
        d.ha.coord
            .send(ha::CoordInput::Fence(FenceInput::Done(done)));
    Ok(Json(Empty {}))
}

fn known_node(d: &Daemon, node: &str) -> Result<(), ApiFailure> {
    let config = committed_config(d)
        .ok_or_else(|| ApiFailure::unavailable("the committed configuration is unusable"))?;
    if config.nodes.iter().any(|n| n.name == node) {
        Ok(())
    } else {
        Err(ApiFailure(
            axum::http::StatusCode::NOT_FOUND,
            format!("no node named {node:?} is in the configuration"),
        ))
    }
}

/// A two-node survivor coordinates without leading Raft (the leader it last knew may
/// be its dead peer): the operator's fence commands are answered here.
fn alone_here(d: &Daemon) -> bool {
    quorum_now(d).alone && coordinating(d)
}

fn require_coordinator(d: &Daemon) -> Result<(), ApiFailure> {
    if coordinating(d) {
        Ok(())
    } else {
        super::api::require_leader(d)
    }
}

fn coordinator_gone() -> ApiFailure {
    ApiFailure::unavailable("the coordinator is not running here (no leader with quorum yet)")
}

async fn ls(State(d): D, Json(_): Json<Empty>) -> ApiResult<FenceLs> {
    if alone_here(&d) {
        return ls_local(State(d), Json(Empty {})).await;
    }
    super::api::leader_call(&d, FENCE_LS_LOCAL, &Empty {})
        .await
        .map(Json)
}

async fn ls_local(State(d): D, Json(_): Json<Empty>) -> ApiResult<FenceLs> {
    require_coordinator(&d)?;
    ask_coordinator(&d, Duration::from_secs(5))
        .await
        .map(Json)
        .ok_or_else(coordinator_gone)
}

async fn ask_coordinator(d: &Daemon, within: Duration) -> Option<FenceLs> {
    let (tx, rx) = oneshot::channel();
    let _ = d.ha.coord.send(ha::CoordInput::Fence(FenceInput::Ls(tx)));
    tokio::time::timeout(within, rx)
        .await
        .ok()
        .and_then(Result::ok)
}

/// How long `haven status` waits for the coordinator's picture of fencing: short, so a
/// status answers promptly when the leader is slow or gone (it then shows what was
/// committed).
const STATUS_FENCE_WAIT: Duration = Duration::from_secs(1);

/// The coordinator's live picture of fencing, for `haven status`: from this node's own
/// coordinator (the leader, or a two-node survivor), else from the leader while this
/// node is quorate. None when there is none to ask (a node cut off has no coordinator
/// worth asking: its committed state is all it knows).
pub async fn live_ls(d: &Daemon) -> Option<FenceLs> {
    if coordinating(d) {
        return ask_coordinator(d, STATUS_FENCE_WAIT).await;
    }
    if !quorum_now(d).quorate {
        return None;
    }
    let ask = super::api::leader_call::<_, FenceLs>(d, FENCE_LS_LOCAL, &Empty {});
    tokio::time::timeout(STATUS_FENCE_WAIT, ask)
        .await
        .ok()?
        .ok()
}

async fn node(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Empty> {
    known_node(&d, &req.node)?;
    if alone_here(&d) {
        return node_local(State(d), Json(req)).await;
    }
    super::api::leader_call(&d, FENCE_NODE_LOCAL, &req)
        .await
        .map(Json)
}

async fn node_local(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Empty> {
    require_coordinator(&d)?;
    // Fencing the leader works like any other: another node runs the device (never the
    // victim), the mark committed first lets the next leader confirm it.
    let _ =
        d.ha.coord
            .send(ha::CoordInput::Fence(FenceInput::Request(req.node)));
    Ok(Json(Empty {}))
}

async fn ack(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Acked> {
    known_node(&d, &req.node)?;
    if alone_here(&d) {
        return ack_local(State(d), Json(req)).await;
    }
    super::api::leader_call(&d, FENCE_ACK_LOCAL, &req)
        .await
        .map(Json)
}

async fn ack_local(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Acked> {
    require_coordinator(&d)?;
    if req.node == d.node.name {
        return Err(ApiFailure::refused(format!(
            "{} is answering this request, so it is not down: power it off, then \
             acknowledge from another node",
            req.node
        )));
    }
    let (tx, rx) = oneshot::channel();
    let _ =
        d.ha.coord
            .send(ha::CoordInput::Fence(FenceInput::Ack(req.node, tx)));
    let acked = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(coordinator_gone)?;
    Ok(Json(Acked { acked }))
}

async fn rejoin(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Empty> {
    known_node(&d, &req.node)?;
    if alone_here(&d) {
        return rejoin_local(State(d), Json(req)).await;
    }
    super::api::leader_call(&d, NODE_REJOIN_LOCAL, &req)
        .await
        .map(Json)
}

async fn rejoin_local(State(d): D, Json(req): Json<NodeName>) -> ApiResult<Empty> {
    require_coordinator(&d)?;
    let _ =
        d.ha.coord
            .send(ha::CoordInput::Fence(FenceInput::AllowRejoin(req.node)));
    Ok(Json(Empty {}))
}

async fn history(State(d): D, Json(_): Json<Empty>) -> Json<Vec<FenceRecord>> {
    Json(d.view.state().fence_history)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(agent: &str, params: &[(&str, &str)]) -> FenceDevice {
        FenceDevice {
            id: "d1".into(),
            agent: agent.into(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..FenceDevice::default()
        }
    }

    #[test]
    fn pcmk_params_are_havens_and_the_rest_go_to_the_agent() {
        let (spec, action) = agent_spec(&FenceDevice {
            password_script: Some("/etc/haven/ipmi-pass".into()),
            ..dev(
                "fence_ipmilan",
                &[
                    ("ip", "127.0.0.1"),
                    ("pcmk_host_argument", "none"),
                    ("pcmk_host_map", "n1:1;n2:2"),
                    ("pcmk_action", "off"),
                    ("pcmk_reboot_timeout", "20"),
                ],
            )
        })
        .expect("valid device");
        assert_eq!(action, FenceAction::Off);
        assert_eq!(spec.host_argument, None);
        assert_eq!(spec.host_map["n2"], "2");
        assert_eq!(spec.params.keys().collect::<Vec<_>>(), vec!["ip"]);
        assert_eq!(
            spec.secret,
            Some(Secret::Script("/etc/haven/ipmi-pass".into()))
        );
    }

    #[test]
    fn bad_devices_are_named() {
        let e = agent_spec(&dev("fence_dummy", &[("pcmk_action", "explode")])).unwrap_err();
        assert!(e.contains("fencing.devices.d1.params.pcmk_action"), "{e}");
        let e = agent_spec(&dev("rm -rf", &[])).unwrap_err();
        assert!(e.contains("fencing.devices.d1"), "{e}");
        let e = agent_spec(&FenceDevice {
            password_file: Some("a".into()),
            password_script: Some("b".into()),
            ..dev("fence_dummy", &[])
        })
        .unwrap_err();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn the_lab_switch_cuts_named_links_and_link0_cuts_rpc() {
        let s = LabSwitch::new(true);
        assert!(!s.link_cut("link0"));
        s.set(Some("link1\n"));
        assert!(s.link_cut("link1") && !s.rpc_cut());
        s.set(Some("all"));
        assert!(s.link_cut("link1") && s.rpc_cut());
        s.set(None);
        assert!(!s.link_cut("link1"));
        let off = LabSwitch::new(false);
        off.set(Some("all"));
        assert!(!off.rpc_cut(), "only a lab daemon has the switch");
    }

    #[test]
    fn power_off_kills_the_resource_process_group_by_pidfile() {
        use std::os::unix::process::CommandExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = power_off(tmp.path()).expect_err("not a node directory");
        assert!(e.contains("lab-dir"), "{e}");
        std::fs::write(tmp.path().join("node.toml"), "").expect("node.toml");
        let res = tmp.path().join("resources");
        std::fs::create_dir_all(&res).expect("mkdir");
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 1000 & sleep 1000"])
            .process_group(0)
            .spawn()
            .expect("spawn sh");
        let pid = child.id() as i32;
        let t = haven_exec::pidfile::Tracked::of(pid).expect("running");
        haven_exec::pidfile::write(&res.join("r1.pid"), t).expect("pidfile");
        // Reap in the background so the killed shell does not linger as a zombie.
        let waiter = std::thread::spawn(move || child.wait());
        let n = power_off(tmp.path()).expect("power off");
        assert_eq!(n, 1);
        let _ = waiter.join();
        assert!(!t.alive());
        // The grandchild in the same group is gone too.
        let group_left = std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                    s.rsplit(')').next().is_some_and(|rest| {
                        let f: Vec<&str> = rest.split_whitespace().collect();
                        f.first() != Some(&"Z") && f.get(2) == Some(&pid.to_string().as_str())
                    })
                })
            })
            .count();
        assert_eq!(group_left, 0, "a process of the resource's group survived");
    }
}
