//! The coordinator: runs on the Raft leader and turns what it observes into operations.
//!
//! It follows Pacemaker's controller loop. Whenever something changes (a node is lost or
//! joins, an operation ends, the configuration changes, a fence is confirmed) the
//! coordinator builds a [`ClusterView`] and asks its [`Planner`] for a plan, then
//! dispatches the plan's steps as their predecessors complete. An unexpected result
//! aborts the transition: nothing new is dispatched, and once the operations in flight
//! have answered, it plans again from the new picture.
//!
//! Safety does not rest on the planner alone. A node that is lost without a clean exit
//! is `Unclean` and is fenced (with stonith enabled); whatever it ran is assumed to run
//! still until the fence is confirmed, and the dispatcher refuses to start, promote or
//! migrate a resource to a node while any node in doubt may still hold it. A node that
//! joins is probed for every resource before anything is planned, so nothing is started
//! twice because it was already running somewhere unnoticed.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::{OpKind, OpOutcome, OpReport, OpRequest};
use crate::fencing::{FenceCommand, FenceStep, Fencer};
use crate::membership::{Membership, MembershipEvent, Timeouts};
use crate::time::Time;
use crate::view::{ClusterView, NodeState, Observed, Plan, Planner, Step};

/// Failures at which a resource is banned from a node: Pacemaker's INFINITY, as for a
/// failed start (start-failure-is-fatal).
pub const FAILCOUNT_INFINITY: u32 = 1_000_000;

/// The operation timings of one resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceOps {
    pub start_timeout: Duration,
    pub stop_timeout: Duration,
    pub monitor_interval: Option<Duration>,
    pub monitor_timeout: Duration,
    pub promote_timeout: Duration,
    pub demote_timeout: Duration,
    pub migrate_timeout: Duration,
    /// A copy of a clone: copies may run on several nodes at once, so only promotion
    /// is exclusive.
    pub clone: bool,
}

impl Default for ResourceOps {
    fn default() -> Self {
        ResourceOps {
            start_timeout: Duration::from_secs(20),
            stop_timeout: Duration::from_secs(20),
            monitor_interval: Some(Duration::from_secs(10)),
            monitor_timeout: Duration::from_secs(20),
            promote_timeout: Duration::from_secs(20),
            demote_timeout: Duration::from_secs(20),
            migrate_timeout: Duration::from_secs(60),
            clone: false,
        }
    }
}

/// A node as the coordinator needs to know it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    /// Names of the links its heartbeats travel on.
    pub links: Vec<String>,
    /// Fencing levels for this node as victim, tried in order.
    pub fence_levels: Vec<Vec<FenceStep>>,
}

/// The part of the configuration the coordinator acts on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorConfig {
    pub nodes: Vec<NodeSpec>,
    pub resources: BTreeMap<String, ResourceOps>,
    pub stonith_enabled: bool,
    /// May a node that was fenced rejoin by itself once heard again? (RHCS practice is
    /// no: an operator allows it with `haven node online`.)
    pub auto_rejoin: bool,
    /// Nodes that, lost before this coordinator ever heard them, count as down and
    /// clean rather than in doubt (`startup-fencing = false`, for nodes never seen).
    #[serde(default)]
    pub unseen_clean: std::collections::BTreeSet<String>,
}

/// What the coordinator wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoordinatorCommand {
    /// Send this request to `node`'s agent.
    Op { node: String, request: OpRequest },
    /// Run a fence device on `executor`; answer with `handle_fence_result`.
    Fence {
        token: u64,
        victim: String,
        device: String,
        executor: String,
        timeout: Duration,
    },
    /// A line for the operator (log and event stream).
    Alert { message: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    Pending,
    InFlight,
    Done,
    Failed,
}

#[derive(Clone, Debug)]
struct Transition {
    plan: Plan,
    status: Vec<StepStatus>,
    aborted: bool,
}

impl Transition {
    fn finished(&self) -> bool {
        !self.status.contains(&StepStatus::InFlight)
            && (self.aborted || self.status.iter().all(|s| *s != StepStatus::Pending))
    }
}

#[derive(Clone, Debug)]
struct InFlight {
    node: String,
    resource: String,
    op: OpKind,
    /// The plan step it executes; `None` for a probe.
    step: Option<usize>,
    /// When silence counts as a timeout: the operation's own timeout (which the agent
    /// enforces) plus a margin for the round trip.
    deadline: Time,
}

/// Grace beyond an operation's timeout before the coordinator gives up on its answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(5);

/// A snapshot for `haven status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoordinatorStatus {
    pub view: ClusterView,
    pub links: BTreeMap<String, Vec<(String, bool)>>,
    pub in_doubt: Vec<String>,
    pub transition: Vec<(Step, StepStatus)>,
}

/// Sans-IO coordinator.
pub struct Coordinator<P> {
    planner: P,
    config: CoordinatorConfig,
    membership: Membership,
    fencer: Fencer,
    nodes: BTreeMap<String, NodeState>,
    observed: BTreeMap<String, BTreeMap<String, Observed>>,
    failcounts: BTreeMap<String, BTreeMap<String, u32>>,
    transition: Option<Transition>,
    /// Fences an earlier leader began, to issue again once a node that can run a device
    /// is heard (a coordinator that has just taken over hears nobody yet).
    resumed: BTreeMap<String, String>,
    /// Each node's daemon incarnation as last announced (see `handle_incarnation`).
    incarnations: BTreeMap<String, u64>,
    in_flight: BTreeMap<u64, InFlight>,
    next_seq: u64,
    dirty: bool,
    commands: VecDeque<CoordinatorCommand>,
    log: Vec<String>,
    /// Demotes that close migration windows whose migration failed, run before the
    /// next plan so the volume is back to one primary (the source's) first.
    closing: Vec<Step>,
}

impl<P: Planner> Coordinator<P> {
    /// A coordinator taking over at `now` (e.g. just elected). It knows nothing of the
    /// cluster yet: every node is pending, every resource unknown.
    pub fn new(planner: P, config: CoordinatorConfig, timeouts: Timeouts, now: Time) -> Self {
        let mut c = Coordinator {
            planner,
            config: CoordinatorConfig::default(),
            membership: Membership::new(timeouts, now),
            fencer: {
                let mut f = Fencer::new(Duration::from_secs(10));
                f.set_watchdog_floor(
                    crate::quorum::lease(timeouts) + crate::quorum::WATCHDOG_MARGIN,
                );
                f
            },
            nodes: BTreeMap::new(),
            observed: BTreeMap::new(),
            failcounts: BTreeMap::new(),
            transition: None,
            resumed: BTreeMap::new(),
            incarnations: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 1,
            dirty: true,
            commands: VecDeque::new(),
            log: Vec::new(),
            closing: Vec::new(),
        };
        c.handle_config(config, now);
        c
    }

    /// The configuration changed (committed through Raft).
    pub fn handle_config(&mut self, config: CoordinatorConfig, now: Time) {
        self.membership.set_members(
            config
                .nodes
                .iter()
                .map(|n| (n.name.as_str(), n.links.clone())),
        );
        let names: BTreeSet<&str> = config.nodes.iter().map(|n| n.name.as_str()).collect();
        // Operations in flight on a node that is no longer configured will never be
        // settled by a report: count them failed so the transition can finish.
        let removed: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect();
        for node in &removed {
            self.in_flight.retain(|_, f| f.node != *node);
            if let Some(t) = self.transition.as_mut() {
                for (i, s) in t.status.iter_mut().enumerate() {
                    if *s == StepStatus::InFlight && t.plan.steps[i].node() == node {
                        *s = StepStatus::Failed;
                        t.aborted = true;
                    }
                }
            }
        }
        self.nodes.retain(|n, _| names.contains(n.as_str()));
        for n in &names {
            self.nodes
                .entry(n.to_string())
                .or_insert(NodeState::Pending);
        }
        self.observed
            .retain(|r, _| config.resources.contains_key(r));
        for per_node in self.observed.values_mut() {
            per_node.retain(|n, _| names.contains(n.as_str()));
        }
        // A resource new to the configuration is unknown on every node not known down:
        // online nodes are probed, pending ones may hold it until heard or fenced.
        for r in config.resources.keys() {
            let per_node = self.observed.entry(r.clone()).or_default();
            for (n, s) in &self.nodes {
                if *s != NodeState::Offline {
                    per_node.entry(n.clone()).or_insert(Observed::Unknown);
                }
            }
        }
        self.config = config;
        self.dirty = true;
        self.progress(now);
    }

    /// A heartbeat from `node` over `link`.
    pub fn handle_heartbeat(&mut self, node: &str, link: &str, now: Time) {
        self.membership.handle_heartbeat(node, link, now);
        self.process_membership(now);
    }

    /// The incarnation a node's daemon announced (random at each daemon start; 0 =
    /// not told). A new one from an online node means its daemon restarted without the
    /// node being lost: the new daemon stopped what it found (it had no lease) and runs
    /// no monitors, so what this coordinator believed runs there is probed again.
    /// Operations in flight there are left to their deadlines.
    pub fn handle_incarnation(&mut self, node: &str, incarnation: u64, now: Time) {
        if incarnation == 0 {
            return;
        }
        let before = self.incarnations.insert(node.to_string(), incarnation);
        if before.is_none_or(|b| b == incarnation)
            || self.nodes.get(node) != Some(&NodeState::Online)
        {
            return;
        }
        self.log(format!(
            "{now}: {node}'s daemon restarted: re-probing what runs there"
        ));
        let busy: BTreeSet<String> = self
            .in_flight
            .values()
            .filter(|f| f.node == node)
            .map(|f| f.resource.clone())
            .collect();
        for (r, per_node) in self.observed.iter_mut() {
            if busy.contains(r) {
                continue;
            }
            if let Some(o) = per_node.get_mut(node) {
                *o = Observed::Unknown;
            }
        }
        self.dirty = true;
        if let Some(t) = self.transition.as_mut() {
            t.aborted = true;
        }
        self.progress(now);
    }

    /// A node agent's report.
    pub fn handle_report(&mut self, node: &str, report: OpReport, now: Time) {
        let expected = match report.seq {
            Some(seq) => match self.in_flight.remove(&seq) {
                Some(f) if f.node == node && f.resource == report.resource => Some(f),
                Some(f) => {
                    // Not ours after all: put it back and ignore the report.
                    self.in_flight.insert(seq, f);
                    return;
                }
                None => return, // an answer for an operation we no longer track
            },
            None => None,
        };
        if self.nodes.get(node) != Some(&NodeState::Online) {
            return; // a node in doubt or fenced: its word counts for nothing now
        }
        let mut observed = observed_after(report.op, &report.outcome);
        // A recurring monitor that finds its resource gone is a failure (Pacemaker counts
        // it), not a clean stop: the resource died under us.
        let was_active = self
            .observed
            .get(&report.resource)
            .and_then(|p| p.get(node))
            .is_some_and(|o| matches!(o, Observed::Started | Observed::Promoted));
        if report.seq.is_none() && observed == Observed::Stopped && was_active {
            observed = Observed::Failed;
        }
        let failed = observed == Observed::Failed;
        let step = expected.as_ref().and_then(|f| f.step);
        let window = if failed {
            step.and_then(|i| self.failed_window(i))
        } else {
            None
        };
        // The driver cancels a failed migration and the guest keeps running on its
        // source, as far as it knows: look (probe) rather than assume it failed there.
        if window.is_some() && report.op == OpKind::MigrateTo {
            observed = Observed::Unknown;
        }
        let prev = self
            .observed
            .entry(report.resource.clone())
            .or_default()
            .insert(node.to_string(), observed);
        self.log(format!(
            "{}: {} {:?} on {node} -> {:?}",
            now, report.resource, report.op, report.outcome
        ));
        if failed {
            let count = self
                .failcounts
                .entry(report.resource.clone())
                .or_default()
                .entry(node.to_string())
                .or_insert(0);
            *count = if report.op == OpKind::Start {
                FAILCOUNT_INFINITY
            } else {
                count.saturating_add(1).min(FAILCOUNT_INFINITY)
            };
            // A stop that fails leaves the resource in an unknown state on a live node:
            // only fencing makes that node safe again.
            if report.op == OpKind::Stop {
                self.declare_unclean(node, "a stop operation failed", now);
            }
        }
        if let Some(demote) = window
            && !self.closing.contains(&demote)
        {
            self.log(format!(
                "{now}: the migration failed; closing its window: {demote:?}"
            ));
            self.closing.push(demote);
        }
        match step {
            Some(step) => {
                if let Some(t) = self.transition.as_mut() {
                    t.status[step] = if failed {
                        StepStatus::Failed
                    } else {
                        StepStatus::Done
                    };
                    if failed {
                        t.aborted = true;
                    }
                }
            }
            None => {
                // A probe's answer, or a recurring monitor that changed: news either way.
                if report.seq.is_none()
                    && Some(observed) != prev
                    && let Some(t) = self.transition.as_mut()
                {
                    t.aborted = true;
                }
                self.dirty = true;
            }
        }
        if failed {
            self.dirty = true;
        }
        self.progress(now);
    }

    /// A fence device run finished.
    pub fn handle_fence_result(&mut self, token: u64, success: bool, now: Time) {
        let alive = self.alive();
        self.fencer.handle_result(token, success, &alive, now);
        self.progress(now);
    }

    /// An operator confirms `node` is down.
    pub fn handle_fence_ack(&mut self, node: &str, now: Time) -> bool {
        if let Some(reason) = self.resumed.remove(node) {
            let levels = self.levels_of(node);
            let alive = self.alive();
            self.fencer
                .restore(node, &reason, false, levels, &alive, now);
        }
        let acked = self.fencer.handle_ack(node, now);
        self.progress(now);
        acked
    }

    /// An operator requests fencing of `node` (`haven fence node`).
    pub fn handle_fence_request(&mut self, node: &str, now: Time) {
        self.declare_unclean(node, "requested by an operator", now);
        self.progress(now);
    }

    /// An operator allows a fenced node back (`haven node online` after a fence).
    pub fn handle_allow_rejoin(&mut self, node: &str, now: Time) {
        if self.nodes.get(node) == Some(&NodeState::Offline)
            && self.membership.liveness(node) == Some(crate::Liveness::Alive)
        {
            self.join(node, now);
        }
        self.progress(now);
    }

    /// What earlier leaders' fencers reached, from the replicated state: `(node,
    /// confirmed, reason)`. Feed it before anything else. A node in doubt is in doubt
    /// still — whatever it ran may run, and it is fenced again from the first level,
    /// since the earlier runs' answers are lost with their leader — even if it is heard
    /// meanwhile. A node fenced and not allowed back stays out.
    pub fn handle_fence_marks(
        &mut self,
        marks: impl IntoIterator<Item = (String, bool, String)>,
        now: Time,
    ) {
        for (node, confirmed, reason) in marks {
            if !self.nodes.contains_key(&node) || self.fencer.marks().any(|(v, ..)| v == node) {
                continue;
            }
            if confirmed {
                self.log(format!(
                    "{now}: {node} was fenced under an earlier leader ({reason}); it stays out until allowed"
                ));
                self.nodes.insert(node.clone(), NodeState::Offline);
                self.forget_node_resources(&node);
                let levels = self.levels_of(&node);
                let alive = self.alive();
                self.fencer
                    .restore(&node, &reason, true, levels, &alive, now);
            } else if self.config.stonith_enabled {
                self.log(format!(
                    "{now}: {node} was being fenced under an earlier leader ({reason}); it stays in doubt and is fenced again"
                ));
                self.nodes.insert(node.clone(), NodeState::Unclean);
                self.resumed.insert(node, reason);
            }
        }
        self.dirty = true;
        self.progress(now);
    }

    /// Each victim of this coordinator's fencer: whether its fence is confirmed, and
    /// why it was fenced. The daemon replicates these so a new leader can resume.
    pub fn fence_marks(&self) -> BTreeMap<String, (bool, String)> {
        let mut marks: BTreeMap<String, (bool, String)> = self
            .fencer
            .marks()
            .map(|(n, c, r)| (n.to_string(), (c, r.to_string())))
            .collect();
        for (n, r) in &self.resumed {
            marks.insert(n.clone(), (false, r.clone()));
        }
        marks
    }

    /// Seeds the random part of fence delays.
    pub fn seed_fencing(&mut self, seed: u64) {
        self.fencer.seed(seed);
    }

    /// Failures counted before this coordinator took over (they are kept in the
    /// replicated state): a new leader must not forget why a resource was banned.
    pub fn handle_failcounts(
        &mut self,
        failcounts: BTreeMap<String, BTreeMap<String, u32>>,
        now: Time,
    ) {
        for (r, per_node) in failcounts {
            let mine = self.failcounts.entry(r).or_default();
            for (n, c) in per_node {
                let e = mine.entry(n).or_insert(0);
                *e = (*e).max(c);
            }
        }
        self.dirty = true;
        self.progress(now);
    }

    /// The planner's inputs changed (run-time node attributes such as standby): plan
    /// again.
    pub fn handle_planner_changed(&mut self, now: Time) {
        self.dirty = true;
        if let Some(t) = self.transition.as_mut() {
            t.aborted = true;
        }
        self.progress(now);
    }

    pub fn planner_mut(&mut self) -> &mut P {
        &mut self.planner
    }

    /// Failures are forgotten and the resource is re-probed everywhere, as Pacemaker's
    /// cleanup does (`haven resource cleanup`): the truth is on the nodes.
    pub fn handle_cleanup(&mut self, resource: &str, now: Time) {
        self.failcounts.remove(resource);
        if let Some(per_node) = self.observed.get_mut(resource) {
            for (n, o) in per_node.iter_mut() {
                if self.nodes.get(n) == Some(&NodeState::Online) {
                    *o = Observed::Unknown;
                }
            }
        }
        self.dirty = true;
        self.progress(now);
    }

    /// Timers: heartbeat silence, fence deadlines and retries.
    pub fn handle_timeout(&mut self, now: Time) {
        // An answer that never came is a timed-out operation: its outcome is unknown,
        // which for a stop means the node must be fenced.
        let expired: Vec<(u64, InFlight)> = self
            .in_flight
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(seq, f)| (*seq, f.clone()))
            .collect();
        for (seq, f) in expired {
            let report = OpReport {
                seq: Some(seq),
                resource: f.resource.clone(),
                op: f.op,
                outcome: OpOutcome::TimedOut,
                at: now,
            };
            self.handle_report(&f.node, report, now);
        }
        self.membership.handle_timeout(now);
        self.process_membership(now);
        let alive = self.alive();
        self.fencer.handle_timeout(&alive, now);
        self.progress(now);
    }

    pub fn poll_command(&mut self) -> Option<CoordinatorCommand> {
        self.commands.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Time> {
        let answers = self.in_flight.values().map(|f| f.deadline).min();
        [
            self.membership.poll_timeout(),
            self.fencer.poll_timeout(),
            answers,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// One line per state change, for logs and golden tests.
    pub fn take_log(&mut self) -> Vec<String> {
        std::mem::take(&mut self.log)
    }

    pub fn view(&self) -> ClusterView {
        ClusterView {
            nodes: self.nodes.clone(),
            resources: self.observed.clone(),
            failcounts: self.failcounts.clone(),
        }
    }

    pub fn status(&self) -> CoordinatorStatus {
        CoordinatorStatus {
            view: self.view(),
            links: self
                .config
                .nodes
                .iter()
                .map(|n| (n.name.clone(), self.membership.links(&n.name)))
                .collect(),
            in_doubt: self.fencer.in_doubt().map(str::to_string).collect(),
            transition: self
                .transition
                .as_ref()
                .map(|t| {
                    t.plan
                        .steps
                        .iter()
                        .cloned()
                        .zip(t.status.iter().copied())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    pub fn fencer(&self) -> &Fencer {
        &self.fencer
    }

    fn alive(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, s)| **s == NodeState::Online)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn log(&mut self, line: String) {
        self.log.push(line);
    }

    fn process_membership(&mut self, now: Time) {
        while let Some(ev) = self.membership.poll_event() {
            match ev {
                MembershipEvent::NodeAlive { node } => match self.nodes.get(&node) {
                    Some(NodeState::Pending) => self.join(&node, now),
                    Some(NodeState::Offline) if self.config.auto_rejoin => self.join(&node, now),
                    // Taken as down without a fence when never seen: nothing to allow.
                    Some(NodeState::Offline)
                        if self.config.unseen_clean.contains(&node)
                            && !self.fencer.marks().any(|(v, ..)| v == node) =>
                    {
                        self.join(&node, now)
                    }
                    Some(NodeState::Offline) => self.log(format!(
                        "{now}: {node} is back but was fenced; it stays out until allowed"
                    )),
                    // Unclean stays unclean until the fence is confirmed: a node that
                    // comes back mid-fence may have missed what happened meanwhile.
                    _ => {}
                },
                MembershipEvent::NodeLost { node } => {
                    let was = self.nodes.get(&node).copied();
                    if was == Some(NodeState::Pending) && self.config.unseen_clean.contains(&node) {
                        self.log(format!(
                            "{now}: {node} never seen; down and clean (startup-fencing off)"
                        ));
                        self.nodes.insert(node.clone(), NodeState::Offline);
                        self.forget_node_resources(&node);
                        self.dirty = true;
                    } else if matches!(was, Some(NodeState::Online) | Some(NodeState::Pending)) {
                        self.declare_unclean(&node, "it stopped heartbeating", now);
                    }
                }
                MembershipEvent::LinkUp { node, link } => {
                    self.log(format!("{now}: link {link} of {node} up"))
                }
                MembershipEvent::LinkDown { node, link } => {
                    self.log(format!("{now}: link {link} of {node} down"))
                }
            }
        }
    }

    fn join(&mut self, node: &str, now: Time) {
        self.nodes.insert(node.to_string(), NodeState::Online);
        // A past fence is history now; the next loss needs a fence of its own.
        self.fencer.clear(node);
        self.resumed.remove(node);
        self.log(format!("{now}: {node} online"));
        for per_node in self.observed.values_mut() {
            per_node.insert(node.to_string(), Observed::Unknown);
        }
        for r in self.config.resources.keys() {
            self.observed
                .entry(r.clone())
                .or_default()
                .entry(node.to_string())
                .or_insert(Observed::Unknown);
        }
        self.dirty = true;
        if let Some(t) = self.transition.as_mut() {
            t.aborted = true;
        }
    }

    fn declare_unclean(&mut self, node: &str, reason: &str, now: Time) {
        // An operation sent there (a start above all) may have taken effect before the
        // node was lost: what it touched may run there until the fence says otherwise.
        let touched: Vec<String> = self
            .in_flight
            .values()
            .filter(|f| f.node == node)
            .map(|f| f.resource.clone())
            .collect();
        for r in touched {
            let o = self
                .observed
                .entry(r)
                .or_default()
                .entry(node.to_string())
                .or_insert(Observed::Stopped);
            if *o == Observed::Stopped {
                *o = Observed::Unknown;
            }
        }
        // Its in-flight operations will never answer, or their answers can't be trusted.
        self.in_flight.retain(|_, f| f.node != node);
        if let Some(t) = self.transition.as_mut() {
            t.aborted = true;
            for (i, s) in t.status.iter_mut().enumerate() {
                if *s == StepStatus::InFlight && t.plan.steps[i].node() == node {
                    *s = StepStatus::Failed;
                }
            }
        }
        if self.config.stonith_enabled {
            self.nodes.insert(node.to_string(), NodeState::Unclean);
            self.log(format!("{now}: {node} unclean ({reason}); fencing"));
            let levels = self.levels_of(node);
            let alive = self.alive();
            self.fencer.request(node, reason, levels, &alive, now);
        } else {
            // Pacemaker's semantics with stonith disabled: assume it is down. Unsafe,
            // and said so.
            self.nodes.insert(node.to_string(), NodeState::Offline);
            self.forget_node_resources(node);
            self.commands.push_back(CoordinatorCommand::Alert {
                message: format!(
                    "{node} lost ({reason}); stonith is disabled, so it is assumed down \
                     without fencing"
                ),
            });
        }
        self.dirty = true;
    }

    fn levels_of(&self, node: &str) -> Vec<Vec<FenceStep>> {
        self.config
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.fence_levels.clone())
            .unwrap_or_default()
    }

    fn forget_node_resources(&mut self, node: &str) {
        for per_node in self.observed.values_mut() {
            per_node.remove(node);
        }
    }

    fn drain_fencer(&mut self, now: Time) {
        while let Some(cmd) = self.fencer.poll_command() {
            match cmd {
                FenceCommand::Run {
                    token,
                    victim,
                    device,
                    executor,
                    timeout,
                } => {
                    self.log(format!(
                        "{now}: fencing {victim} with {device} from {executor}"
                    ));
                    self.commands.push_back(CoordinatorCommand::Fence {
                        token,
                        victim,
                        device,
                        executor,
                        timeout,
                    });
                }
                FenceCommand::Alert { message, .. } => {
                    self.log(format!("{now}: {message}"));
                    self.commands
                        .push_back(CoordinatorCommand::Alert { message });
                }
                FenceCommand::Confirmed { victim, by } => {
                    self.log(format!("{now}: {victim} fenced {by}"));
                    self.nodes.insert(victim.clone(), NodeState::Offline);
                    self.forget_node_resources(&victim);
                    if let Some(t) = self.transition.as_mut() {
                        for (i, s) in t.status.iter_mut().enumerate() {
                            if matches!(&t.plan.steps[i], Step::Fence { node } if *node == victim) {
                                *s = StepStatus::Done;
                            }
                        }
                    }
                    self.dirty = true;
                }
            }
        }
    }

    /// Drives the loop: fencing news, probes, planning, dispatch. A finished transition
    /// is news in itself (its results may enable more), so it re-plans until the plan
    /// is empty or a step is waiting on the outside world; the bound only guards
    /// against a planner that never converges.
    fn progress(&mut self, now: Time) {
        self.resume_fences(now);
        for _ in 0..8 {
            self.drain_fencer(now);
            self.probe(now);
            if self.transition.as_ref().is_some_and(Transition::finished) {
                self.transition = None;
                self.dirty = true;
            }
            let probing = self.in_flight.values().any(|f| f.step.is_none());
            // Like Pacemaker's dc-deadtime: no plan until every node has been heard from
            // or declared lost, since a node not heard yet may be running anything.
            let waiting = self.nodes.values().any(|s| *s == NodeState::Pending);
            if self.transition.is_none() && !self.closing.is_empty() && !waiting {
                let steps = std::mem::take(&mut self.closing);
                let n = steps.len();
                self.transition = Some(Transition {
                    plan: Plan {
                        steps,
                        edges: Vec::new(),
                    },
                    status: vec![StepStatus::Pending; n],
                    aborted: false,
                });
                self.dirty = true;
            }
            if self.transition.is_none() {
                if !self.dirty || probing || waiting {
                    return;
                }
                self.dirty = false;
                let plan = self.planner.plan(&self.view());
                if plan.is_empty() {
                    return;
                }
                let n = plan.steps.len();
                self.log(format!("{now}: new transition of {n} steps"));
                self.transition = Some(Transition {
                    plan,
                    status: vec![StepStatus::Pending; n],
                    aborted: false,
                });
            }
            self.dispatch(now);
            self.drain_fencer(now);
            if !self.transition.as_ref().is_some_and(Transition::finished) {
                return;
            }
        }
    }

    fn resume_fences(&mut self, now: Time) {
        if self.resumed.is_empty() {
            return;
        }
        let alive = self.alive();
        let ready: Vec<(String, String)> = self
            .resumed
            .iter()
            .filter(|(victim, _)| alive.iter().any(|a| a != *victim))
            .map(|(v, r)| (v.clone(), r.clone()))
            .collect();
        for (victim, reason) in ready {
            self.resumed.remove(&victim);
            if self.nodes.get(&victim) != Some(&NodeState::Unclean) {
                continue;
            }
            let levels = self.levels_of(&victim);
            self.log(format!("{now}: fencing {victim} again ({reason})"));
            self.fencer
                .restore(&victim, &reason, false, levels, &alive, now);
            self.dirty = true;
        }
    }

    /// Sends a probe for every resource whose state on an online node is unknown.
    fn probe(&mut self, now: Time) {
        let probing: BTreeSet<(String, String)> = self
            .in_flight
            .values()
            .map(|f| (f.resource.clone(), f.node.clone()))
            .collect();
        let mut todo = Vec::new();
        for (r, per_node) in &self.observed {
            for (n, o) in per_node {
                if *o == Observed::Unknown
                    && self.nodes.get(n) == Some(&NodeState::Online)
                    && !probing.contains(&(r.clone(), n.clone()))
                {
                    todo.push((r.clone(), n.clone()));
                }
            }
        }
        for (r, n) in todo {
            let ops = self.config.resources.get(&r).cloned().unwrap_or_default();
            self.send(
                &n,
                &r,
                OpKind::Monitor,
                ops.monitor_timeout,
                None,
                None,
                now,
            );
        }
    }

    fn dispatch(&mut self, now: Time) {
        let Some(t) = self.transition.as_ref() else {
            return;
        };
        if t.aborted {
            return;
        }
        let mut ready = Vec::new();
        for (i, s) in t.status.iter().enumerate() {
            if *s != StepStatus::Pending {
                continue;
            }
            if migration_ready(t, i) {
                ready.push(i);
            }
        }
        let sends_migration = ready
            .iter()
            .any(|&i| matches!(t.plan.steps[i], Step::MigrateTo { .. }));
        for i in ready {
            let Some(step) = self.transition.as_ref().map(|t| t.plan.steps[i].clone()) else {
                return;
            };
            if let Err(why) = self.check_safe(&step) {
                self.log(format!("{now}: holding {step:?}: {why}"));
                continue;
            }
            match &step {
                Step::Fence { node } => {
                    if self.nodes.get(node) == Some(&NodeState::Offline) {
                        self.set_status(i, StepStatus::Done);
                    } else {
                        self.set_status(i, StepStatus::InFlight);
                        if self.nodes.get(node) != Some(&NodeState::Unclean) {
                            self.declare_unclean(node, "the scheduler asked for it", now);
                        }
                    }
                }
                _ => {
                    let node = step.node().to_string();
                    if self.nodes.get(&node) != Some(&NodeState::Online) {
                        self.set_status(i, StepStatus::Failed);
                        if let Some(t) = self.transition.as_mut() {
                            t.aborted = true;
                        }
                        continue;
                    }
                    let resource = self.base_resource(step.resource().unwrap_or_default());
                    let ops = self
                        .config
                        .resources
                        .get(&resource)
                        .cloned()
                        .unwrap_or_default();
                    let (op, timeout, peer) = match &step {
                        Step::Start { .. } => (OpKind::Start, ops.start_timeout, None),
                        Step::Stop { .. } => (OpKind::Stop, ops.stop_timeout, None),
                        Step::Promote {
                            migration_source, ..
                        } => (
                            OpKind::Promote,
                            ops.promote_timeout,
                            migration_source.clone(),
                        ),
                        Step::Demote { .. } => (OpKind::Demote, ops.demote_timeout, None),
                        Step::MigrateTo { to, .. } => {
                            (OpKind::MigrateTo, ops.migrate_timeout, Some(to.clone()))
                        }
                        Step::MigrateFrom { from, .. } => {
                            (OpKind::MigrateFrom, ops.migrate_timeout, Some(from.clone()))
                        }
                        Step::Fence { .. } => continue,
                    };
                    self.set_status(i, StepStatus::InFlight);
                    self.send(&node, &resource, op, timeout, peer, Some(i), now);
                }
            }
        }
        // Its migrate_from may start now that the migrate_to is under way.
        if sends_migration {
            self.dispatch(now);
        }
    }

    /// For a migration step `i` that failed inside a migration window whose promote has
    /// run: the demote that closes the window on the target.
    fn failed_window(&self, i: usize) -> Option<Step> {
        let t = self.transition.as_ref()?;
        let (from, to) = match t.plan.steps.get(i)? {
            Step::MigrateTo { from, to, .. } | Step::MigrateFrom { from, to, .. } => (from, to),
            _ => return None,
        };
        let promoted = t.plan.steps.iter().enumerate().find_map(|(j, s)| match s {
            Step::Promote {
                resource,
                node,
                migration_source: Some(src),
            } if src == from && node == to && t.status[j] == StepStatus::Done => {
                Some(Step::Demote {
                    resource: resource.clone(),
                    node: node.clone(),
                })
            }
            _ => None,
        });
        // A transition planned after the window's promote (its report aborts the one that
        // held it) no longer carries that promote, only the source's demote that closes
        // the window; the target seen promoted beside the source is the open window.
        promoted.or_else(|| {
            t.plan.steps.iter().find_map(|s| match s {
                Step::Demote { resource, node }
                    if node == from
                        && self
                            .observed
                            .get(&self.base_resource(resource))
                            .and_then(|per_node| per_node.get(to))
                            == Some(&Observed::Promoted) =>
                {
                    Some(Step::Demote {
                        resource: resource.clone(),
                        node: to.clone(),
                    })
                }
                _ => None,
            })
        })
    }

    /// The dispatcher's own check of the safety invariant, independent of the planner.
    fn check_safe(&self, step: &Step) -> Result<(), String> {
        let (resource, target, migrating_from) = match step {
            Step::Start { resource, node } => (resource, node, None),
            // A window promote leaves the source's primary up; that node must be live
            // (and is checked like any other below, only its promoted copy is allowed).
            Step::Promote {
                resource,
                node,
                migration_source,
            } => (resource, node, migration_source.as_ref()),
            Step::MigrateFrom { resource, from, to } => (resource, to, Some(from)),
            _ => return Ok(()),
        };
        let resource = self.base_resource(resource);
        let Some(per_node) = self.observed.get(&resource) else {
            return Ok(());
        };
        let clone = self
            .config
            .resources
            .get(&resource)
            .is_some_and(|o| o.clone);
        let promoting = matches!(step, Step::Promote { .. });
        for (n, o) in per_node {
            if n == target || !o.maybe_active() {
                continue;
            }
            if Some(n) == migrating_from {
                if promoting && self.nodes.get(n) != Some(&NodeState::Online) {
                    return Err(format!(
                        "{resource}'s migration window needs its source {n} online"
                    ));
                }
                continue;
            }
            // Copies of a clone may run anywhere at once; only a promoted copy (a
            // volume's primary) is exclusive.
            if clone && !(promoting && matches!(o, Observed::Promoted | Observed::Unknown)) {
                continue;
            }
            match self.nodes.get(n) {
                Some(NodeState::Unclean | NodeState::Pending) => {
                    return Err(format!(
                        "{resource} may still run on {n}, which is in doubt"
                    ));
                }
                Some(NodeState::Online) if *o == Observed::Unknown => {
                    return Err(format!("{resource} is not yet probed on {n}"));
                }
                // Still active on a live node: its stop must come first, whatever the
                // planner thought.
                Some(NodeState::Online) => {
                    return Err(format!("{resource} is still active on {n}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The configured resource a plan step names. The scheduler names clone copies
    /// `ID:N`; an anonymous clone's copies are one per node, so the coordinator, its
    /// agents and their reports all speak of the primitive `ID` on that node.
    fn base_resource(&self, id: &str) -> String {
        if self.config.resources.contains_key(id) {
            return id.to_string();
        }
        match id.rsplit_once(':') {
            Some((base, n))
                if n.parse::<u32>().is_ok() && self.config.resources.contains_key(base) =>
            {
                base.to_string()
            }
            _ => id.to_string(),
        }
    }

    fn set_status(&mut self, i: usize, s: StepStatus) {
        if let Some(t) = self.transition.as_mut() {
            t.status[i] = s;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &mut self,
        node: &str,
        resource: &str,
        op: OpKind,
        timeout: Duration,
        peer: Option<String>,
        step: Option<usize>,
        now: Time,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let ops = self
            .config
            .resources
            .get(resource)
            .cloned()
            .unwrap_or_default();
        self.in_flight.insert(
            seq,
            InFlight {
                node: node.to_string(),
                resource: resource.to_string(),
                op,
                step,
                deadline: now + timeout + ANSWER_MARGIN,
            },
        );
        if step.is_some() {
            self.log(format!("{now}: {op:?} {resource} on {node}"));
        }
        let fenced = if op == OpKind::Promote {
            self.nodes
                .iter()
                .filter(|(_, s)| **s == NodeState::Offline)
                .map(|(n, _)| n.clone())
                .collect()
        } else {
            Vec::new()
        };
        self.commands.push_back(CoordinatorCommand::Op {
            node: node.to_string(),
            request: OpRequest {
                seq,
                resource: resource.to_string(),
                op,
                timeout,
                monitor_interval: ops.monitor_interval,
                monitor_timeout: ops.monitor_timeout,
                peer,
                fenced,
            },
        });
    }
}

/// May step `i` start now? When its dependencies are done; except that the two halves
/// of a live migration run together (the destination listens while the source sends),
/// so `migrate_from` needs its `migrate_to` only under way, and `migrate_to` waits for
/// whatever `migrate_from` waits for besides it (e.g. the volume's promote there).
fn migration_ready(t: &Transition, i: usize) -> bool {
    let pair = pair_of(&t.plan, i);
    let finished = |b: usize| t.status.get(b) == Some(&StepStatus::Done);
    // A migrate_from may finish before its migrate_to (they run together): what waits
    // for the migration waits for both halves, or the source would be stopped while it
    // still sends, and migrate_to's late answer would show the guest active there again.
    let done = |b: usize| {
        finished(b)
            && (!matches!(t.plan.steps[b], Step::MigrateFrom { .. })
                || pair_of(&t.plan, b).is_none_or(finished))
    };
    let deps_of = |x: usize| {
        t.plan
            .edges
            .iter()
            .filter(move |(_, a)| *a == x)
            .map(|e| e.0)
    };
    match (&t.plan.steps[i], pair) {
        (Step::MigrateFrom { .. }, Some(to)) => deps_of(i)
            .all(|b| done(b) || (b == to && t.status.get(to) == Some(&StepStatus::InFlight))),
        (Step::MigrateTo { .. }, Some(from)) => {
            deps_of(i).all(done) && deps_of(from).filter(|b| *b != i).all(done)
        }
        _ => deps_of(i).all(done),
    }
}

/// The other half of a live migration step.
fn pair_of(plan: &Plan, i: usize) -> Option<usize> {
    let (r, f, t, to_half) = match plan.steps.get(i)? {
        Step::MigrateTo { resource, from, to } => (resource, from, to, false),
        Step::MigrateFrom { resource, from, to } => (resource, from, to, true),
        _ => return None,
    };
    plan.steps.iter().position(|s| match s {
        Step::MigrateTo { resource, from, to } if to_half => (resource, from, to) == (r, f, t),
        Step::MigrateFrom { resource, from, to } if !to_half => (resource, from, to) == (r, f, t),
        _ => false,
    })
}

/// What an operation's outcome tells about the resource on that node.
fn observed_after(op: OpKind, outcome: &OpOutcome) -> Observed {
    match (op, outcome) {
        (_, OpOutcome::Failed { .. }) | (_, OpOutcome::TimedOut) => Observed::Failed,
        (OpKind::Monitor, OpOutcome::Ok) => Observed::Started,
        (OpKind::Monitor, OpOutcome::RunningPromoted) => Observed::Promoted,
        (OpKind::Monitor, OpOutcome::NotRunning) => Observed::Stopped,
        (OpKind::Start | OpKind::Demote | OpKind::MigrateFrom, _) => Observed::Started,
        (OpKind::Promote, _) => Observed::Promoted,
        // After migrate_to the source is paused, not gone: it is stopped by the plan's
        // next step, and until then it counts as active.
        (OpKind::MigrateTo, _) => Observed::Started,
        (OpKind::Stop, _) => Observed::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fencing::StepKind;

    /// A deliberately simple planner for testing the coordinator's sequencing: each
    /// resource on the first online node where it has not failed; a node in doubt that
    /// may hold it is fenced first.
    struct FirstNode;

    impl Planner for FirstNode {
        fn plan(&mut self, view: &ClusterView) -> Plan {
            let mut plan = Plan::default();
            for (r, per_node) in &view.resources {
                let banned = |n: &str| {
                    view.failcounts
                        .get(r)
                        .and_then(|f| f.get(n))
                        .is_some_and(|c| *c > 0)
                };
                let target = view
                    .nodes
                    .iter()
                    .find(|(n, s)| **s == NodeState::Online && !banned(n))
                    .map(|(n, _)| n.clone());
                let mut before = Vec::new();
                for (n, o) in per_node {
                    let healthy_here = Some(n) == target.as_ref() && *o == Observed::Started;
                    if !o.maybe_active() || healthy_here {
                        continue;
                    }
                    let step = match view.nodes.get(n) {
                        Some(NodeState::Unclean) => Step::Fence { node: n.clone() },
                        _ => Step::Stop {
                            resource: r.clone(),
                            node: n.clone(),
                        },
                    };
                    let idx = plan
                        .steps
                        .iter()
                        .position(|s| *s == step)
                        .unwrap_or_else(|| {
                            plan.steps.push(step);
                            plan.steps.len() - 1
                        });
                    before.push(idx);
                }
                if let Some(t) = target
                    && per_node.get(&t) != Some(&Observed::Started)
                {
                    plan.steps.push(Step::Start {
                        resource: r.clone(),
                        node: t,
                    });
                    let start = plan.steps.len() - 1;
                    plan.edges.extend(before.into_iter().map(|b| (b, start)));
                }
            }
            plan
        }
    }

    fn lab_fence(node: &str) -> NodeSpec {
        NodeSpec {
            name: node.into(),
            links: vec!["ring0".into()],
            fence_levels: vec![vec![FenceStep {
                device: "lab".into(),
                kind: StepKind::Run {
                    timeout: Duration::from_secs(5),
                },
                delay: Default::default(),
            }]],
        }
    }

    /// n1, n2, n3, each fenced by the lab switch, running vm1.
    fn three_nodes() -> CoordinatorConfig {
        config(vec![lab_fence("n1"), lab_fence("n2"), lab_fence("n3")])
    }

    fn config(nodes: Vec<NodeSpec>) -> CoordinatorConfig {
        CoordinatorConfig {
            nodes,
            resources: [("vm1".to_string(), ResourceOps::default())].into(),
            stonith_enabled: true,
            auto_rejoin: false,
            unseen_clean: Default::default(),
        }
    }

    /// A tiny in-test cluster: executes ops instantly with the given fate.
    struct Harness {
        c: Coordinator<FirstNode>,
        now: Time,
        /// What really runs where (the ground truth the agents would report).
        running: BTreeMap<(String, String), bool>,
        dead: BTreeSet<String>,
        hung: BTreeSet<String>,
        /// Nodes that die right after a start took effect, before answering it.
        die_on_start: BTreeSet<String>,
        fences: Vec<(u64, String)>,
        alerts: Vec<String>,
    }

    impl Harness {
        fn new(cfg: CoordinatorConfig) -> Self {
            Harness {
                c: Coordinator::new(FirstNode, cfg, Timeouts::default(), Time(0)),
                now: Time(0),
                running: BTreeMap::new(),
                dead: BTreeSet::new(),
                hung: BTreeSet::new(),
                die_on_start: BTreeSet::new(),
                fences: Vec::new(),
                alerts: Vec::new(),
            }
        }

        /// Advances time in heartbeat steps, executing every command.
        fn run_for(&mut self, ms: u64) {
            let end = self.now.0 + ms;
            while self.now.0 <= end {
                for n in ["n1", "n2", "n3"] {
                    if !self.dead.contains(n) {
                        self.c.handle_heartbeat(n, "ring0", self.now);
                    }
                }
                self.c.handle_timeout(self.now);
                self.execute();
                self.now = Time(self.now.0 + 100);
            }
        }

        fn execute(&mut self) {
            while let Some(cmd) = self.c.poll_command() {
                match cmd {
                    CoordinatorCommand::Op { node, request } => {
                        if self.dead.contains(&node) || self.hung.contains(&node) {
                            continue; // lost in the void
                        }
                        let key = (request.resource.clone(), node.clone());
                        if request.op == OpKind::Start && self.die_on_start.contains(&node) {
                            self.running.insert(key, true);
                            self.dead.insert(node);
                            continue;
                        }
                        let outcome = match request.op {
                            OpKind::Monitor => {
                                if self.running.get(&key).copied().unwrap_or(false) {
                                    OpOutcome::Ok
                                } else {
                                    OpOutcome::NotRunning
                                }
                            }
                            OpKind::Start | OpKind::MigrateFrom => {
                                self.running.insert(key, true);
                                OpOutcome::Ok
                            }
                            OpKind::Stop | OpKind::MigrateTo => {
                                self.running.insert(key, false);
                                OpOutcome::Ok
                            }
                            OpKind::Promote | OpKind::Demote => OpOutcome::Ok,
                        };
                        let report = OpReport {
                            seq: Some(request.seq),
                            resource: request.resource,
                            op: request.op,
                            outcome,
                            at: self.now,
                        };
                        self.c.handle_report(&node, report, self.now);
                    }
                    CoordinatorCommand::Fence { token, victim, .. } => {
                        self.fences.push((token, victim));
                    }
                    CoordinatorCommand::Alert { message } => self.alerts.push(message),
                }
            }
        }

        fn running_on(&self, r: &str) -> Vec<String> {
            self.running
                .iter()
                .filter(|((res, _), up)| res == r && **up)
                .map(|((_, n), _)| n.clone())
                .collect()
        }

        fn power_off(&mut self, node: &str) {
            self.dead.insert(node.to_string());
            // Its processes keep running until fenced: that is the danger.
        }

        fn complete_fence(&mut self, ok: bool) {
            let (token, victim) = self.fences.remove(0);
            if ok {
                self.running.retain(|(_, n), _| *n != victim);
            }
            self.c.handle_fence_result(token, ok, self.now);
            self.execute();
        }
    }

    /// Hands out one fixed plan, then nothing.
    struct Fixed(Option<Plan>);

    impl Planner for Fixed {
        fn plan(&mut self, _: &ClusterView) -> Plan {
            self.0.take().unwrap_or_default()
        }
    }

    fn drain_ops(c: &mut Coordinator<Fixed>) -> Vec<(String, OpRequest)> {
        std::iter::from_fn(|| c.poll_command())
            .filter_map(|cmd| match cmd {
                CoordinatorCommand::Op { node, request } => Some((node, request)),
                _ => None,
            })
            .collect()
    }

    fn answer(c: &mut Coordinator<Fixed>, node: &str, r: &OpRequest, outcome: OpOutcome) {
        let report = OpReport {
            seq: Some(r.seq),
            resource: r.resource.clone(),
            op: r.op,
            outcome,
            at: Time(0),
        };
        c.handle_report(node, report, Time(0));
    }

    /// What a window migration runs after the window's promote on n2: vm1 n1 -> n2,
    /// its source stopped, then n1 demoted.
    fn window_steps() -> Vec<Step> {
        vec![
            Step::MigrateTo {
                resource: "vm1".into(),
                from: "n1".into(),
                to: "n2".into(),
            },
            Step::MigrateFrom {
                resource: "vm1".into(),
                from: "n1".into(),
                to: "n2".into(),
            },
            Step::Stop {
                resource: "vm1".into(),
                node: "n1".into(),
            },
            Step::Demote {
                resource: "vol:0".into(),
                node: "n1".into(),
            },
        ]
    }

    /// A coordinator on n1 and n2 (vol a clone) that will run `plan` once its probes,
    /// answered by `probe(resource, node)`, are in.
    fn window_coordinator(
        plan: Plan,
        probe: impl Fn(&str, &str) -> OpOutcome,
    ) -> Coordinator<Fixed> {
        let mut cfg = config(vec![lab_fence("n1"), lab_fence("n2")]);
        let vol = ResourceOps {
            clone: true,
            ..ResourceOps::default()
        };
        cfg.resources.insert("vol".into(), vol);
        let mut c = Coordinator::new(Fixed(Some(plan)), cfg, Timeouts::default(), Time(0));
        for n in ["n1", "n2"] {
            c.handle_heartbeat(n, "ring0", Time(0));
        }
        c.handle_timeout(Time(0));
        let probes = drain_ops(&mut c);
        assert!(probes.iter().all(|(_, r)| r.op == OpKind::Monitor));
        for (n, r) in &probes {
            answer(&mut c, n, r, probe(r.resource.as_str(), n.as_str()));
        }
        c
    }

    /// A window plan as the scheduler makes it: promote vol on n2 (source n1), migrate
    /// vm1 n1 -> n2, stop its source, demote vol on n1. Returns the coordinator with
    /// the probes answered and the ops it sent next.
    fn window_plan() -> (Coordinator<Fixed>, Vec<(String, OpRequest)>) {
        let promote = Step::Promote {
            resource: "vol:1".into(),
            node: "n2".into(),
            migration_source: Some("n1".into()),
        };
        let steps = std::iter::once(promote).chain(window_steps()).collect();
        let plan = Plan {
            steps,
            edges: vec![(0, 1), (0, 2), (1, 2), (2, 3), (3, 4)],
        };
        let mut c = window_coordinator(plan, |rsc, node| match (rsc, node) {
            ("vol", "n1") => OpOutcome::RunningPromoted,
            ("vol", _) | ("vm1", "n1") => OpOutcome::Ok,
            _ => OpOutcome::NotRunning,
        });
        let next = drain_ops(&mut c);
        (c, next)
    }

    #[test]
    fn a_window_promote_runs_beside_the_source_primary_and_both_halves_of_the_migration_run_together()
     {
        let (mut c, first) = window_plan();
        assert_eq!(first.len(), 1, "{first:?}");
        let (node, promote) = &first[0];
        assert_eq!((node.as_str(), promote.op), ("n2", OpKind::Promote));
        assert_eq!(promote.peer.as_deref(), Some("n1"), "the window's source");
        answer(&mut c, "n2", promote, OpOutcome::Ok);
        let migration = drain_ops(&mut c);
        let ops: Vec<(&str, OpKind)> = migration.iter().map(|(n, r)| (n.as_str(), r.op)).collect();
        assert_eq!(
            ops,
            vec![("n1", OpKind::MigrateTo), ("n2", OpKind::MigrateFrom)],
            "the destination listens while the source sends"
        );
        for (n, r) in &migration {
            answer(&mut c, n, r, OpOutcome::Ok);
        }
        let stop = drain_ops(&mut c);
        assert_eq!(stop.len(), 1);
        assert_eq!((stop[0].0.as_str(), stop[0].1.op), ("n1", OpKind::Stop));
        answer(&mut c, "n1", &stop[0].1, OpOutcome::Ok);
        let demote = drain_ops(&mut c);
        assert_eq!(
            (demote[0].0.as_str(), demote[0].1.op),
            ("n1", OpKind::Demote)
        );
    }

    #[test]
    fn the_source_stops_only_once_both_halves_of_the_migration_have_answered() {
        let (mut c, first) = window_plan();
        answer(&mut c, "n2", &first[0].1, OpOutcome::Ok);
        let migration = drain_ops(&mut c);
        let (to, from): (Vec<_>, Vec<_>) = migration
            .iter()
            .partition(|(_, r)| r.op == OpKind::MigrateTo);
        // The destination reports first, the source is still sending.
        answer(&mut c, &from[0].0, &from[0].1, OpOutcome::Ok);
        let early = drain_ops(&mut c);
        assert!(early.is_empty(), "{early:?}");
        answer(&mut c, &to[0].0, &to[0].1, OpOutcome::Ok);
        let stop = drain_ops(&mut c);
        assert_eq!(stop.len(), 1, "{stop:?}");
        assert_eq!((stop[0].0.as_str(), stop[0].1.op), ("n1", OpKind::Stop));
    }

    #[test]
    fn a_failed_window_migration_closes_the_window_and_looks_at_the_source_again() {
        let (mut c, first) = window_plan();
        answer(&mut c, "n2", &first[0].1, OpOutcome::Ok);
        let migration = drain_ops(&mut c);
        for (n, r) in &migration {
            let failed = OpOutcome::Failed {
                rc: 1,
                reason: "cancelled".into(),
            };
            answer(&mut c, n, r, failed);
        }
        let next = drain_ops(&mut c);
        let ops: Vec<(&str, &str, OpKind)> = next
            .iter()
            .map(|(n, r)| (n.as_str(), r.resource.as_str(), r.op))
            .collect();
        assert!(ops.contains(&("n2", "vol", OpKind::Demote)), "{ops:?}");
        assert!(ops.contains(&("n1", "vm1", OpKind::Monitor)), "{ops:?}");
        assert!(
            !ops.iter().any(|o| o.2 == OpKind::Demote && o.0 == "n1"),
            "{ops:?}"
        );
    }

    /// The transition after the window's promote no longer holds that promote (its
    /// report replanned): a failed migration still closes the window on the target.
    #[test]
    fn a_failed_migration_planned_after_the_window_opened_still_closes_it() {
        let plan = Plan {
            steps: window_steps(),
            edges: vec![(0, 1), (1, 2), (2, 3)],
        };
        let mut c = window_coordinator(plan, |rsc, node| match (rsc, node) {
            ("vol", _) => OpOutcome::RunningPromoted,
            ("vm1", "n1") => OpOutcome::Ok,
            _ => OpOutcome::NotRunning,
        });
        let migration = drain_ops(&mut c);
        assert!(
            migration.iter().any(|(_, r)| r.op == OpKind::MigrateTo),
            "{migration:?}"
        );
        for (n, r) in &migration {
            let failed = OpOutcome::Failed {
                rc: 1,
                reason: "cancelled".into(),
            };
            answer(&mut c, n, r, failed);
        }
        let next = drain_ops(&mut c);
        let ops: Vec<(&str, &str, OpKind)> = next
            .iter()
            .map(|(n, r)| (n.as_str(), r.resource.as_str(), r.op))
            .collect();
        assert!(ops.contains(&("n2", "vol", OpKind::Demote)), "{ops:?}");
        assert!(
            !ops.iter().any(|o| o.2 == OpKind::Demote && o.0 == "n1"),
            "{ops:?}"
        );
    }

    #[test]
    fn probes_then_starts_once() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        assert_eq!(h.c.view().resources["vm1"]["n1"], Observed::Started);
    }

    #[test]
    fn a_daemon_restart_seen_in_its_incarnation_reprobes_and_restarts_what_it_stopped() {
        let mut h = Harness::new(three_nodes());
        for n in ["n1", "n2", "n3"] {
            h.c.handle_incarnation(n, 7, h.now);
        }
        h.run_for(2_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        // n1's daemon restarts between two heartbeats: with no lease it stops vm1.
        h.running.insert(("vm1".into(), "n1".into()), false);
        h.c.handle_incarnation("n1", 7, h.now);
        h.run_for(1_000);
        assert!(
            h.running_on("vm1").is_empty(),
            "same incarnation: nothing noticed"
        );
        h.c.handle_incarnation("n1", 8, h.now);
        h.run_for(2_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        assert!(
            h.fences.is_empty(),
            "a daemon restart is not a node failure"
        );
        let log = h.c.take_log().join("\n");
        assert!(log.contains("n1's daemon restarted"), "{log}");
    }

    #[test]
    fn a_resource_already_running_is_found_by_probe_not_started_twice() {
        let mut h = Harness::new(three_nodes());
        h.running.insert(("vm1".into(), "n2".into()), true);
        h.run_for(2_000);
        // The simple planner prefers n1, so it must stop n2's copy first.
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        let log = h.c.take_log().join("\n");
        let stop = log.find("Stop vm1 on n2").unwrap_or(usize::MAX);
        let start = log.find("Start vm1 on n1").unwrap_or(0);
        assert!(stop < start, "stop must precede start:\n{log}");
    }

    #[test]
    fn lost_node_is_fenced_before_recovery() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        h.power_off("n1");
        h.run_for(3_000);
        assert_eq!(h.fences.len(), 1, "n1 must be fenced");
        assert_eq!(h.fences[0].1, "n1");
        // Until the fence is confirmed, vm1 may still run on n1: nothing starts elsewhere.
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        h.complete_fence(true);
        h.run_for(500);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn failed_fence_keeps_resources_frozen_until_ack() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        h.power_off("n1");
        h.run_for(3_000);
        h.complete_fence(false);
        h.run_for(3_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"], "frozen while in doubt");
        assert!(h.alerts.iter().any(|a| a.contains("haven fence ack n1")));
        // The operator pulled the plug by hand and says so.
        h.running.retain(|(_, n), _| n != "n1");
        assert!(h.c.handle_fence_ack("n1", h.now));
        h.execute();
        h.run_for(500);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn without_stonith_a_lost_node_is_assumed_down_and_said_so() {
        let mut cfg = three_nodes();
        cfg.stonith_enabled = false;
        let mut h = Harness::new(cfg);
        h.run_for(2_000);
        h.power_off("n1");
        h.run_for(3_000);
        assert!(h.fences.is_empty());
        assert!(h.alerts.iter().any(|a| a.contains("stonith is disabled")));
        assert!(h.running_on("vm1").contains(&"n2".to_string()));
    }

    #[test]
    fn a_start_in_flight_on_a_node_that_is_lost_leaves_the_resource_in_doubt_there() {
        let mut h = Harness::new(three_nodes());
        h.die_on_start.insert("n1".into());
        h.run_for(5_000);
        assert_eq!(h.c.view().nodes["n1"], NodeState::Unclean);
        assert!(
            h.c.view().resources["vm1"]["n1"].maybe_active(),
            "the start may have taken effect: {:?}",
            h.c.view().resources
        );
        assert_eq!(
            h.running_on("vm1"),
            vec!["n1"],
            "started again before the fence"
        );
        h.complete_fence(true);
        h.run_for(3_000);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn an_answer_that_never_comes_times_out_and_a_lost_stop_fences() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        assert_eq!(h.running_on("vm1"), vec!["n1"]);
        // n1's agent hangs: the node still heartbeats, its operations never answer.
        h.hung.insert("n1".into());
        h.c.handle_cleanup("vm1", h.now);
        h.execute();
        h.run_for(60_000);
        // A timed-out probe is a failure (failcount counted); the stop that recovery
        // sends is lost too, and a stop with unknown outcome can only end in fencing.
        assert!(h.c.view().failcounts["vm1"]["n1"] >= 1);
        assert!(
            h.fences.iter().any(|(_, v)| v == "n1"),
            "n1 must be fenced: {:?}",
            h.c.take_log()
        );
        assert_eq!(h.c.view().nodes["n1"], NodeState::Unclean);
    }

    /// A planner that forgets to stop the old copy: the dispatcher itself must refuse.
    struct StartOnly;

    impl Planner for StartOnly {
        fn plan(&mut self, view: &ClusterView) -> Plan {
            let here = view.resources.get("vm1").and_then(|p| p.get("n2"));
            if here == Some(&Observed::Started) {
                return Plan::default();
            }
            Plan {
                steps: vec![Step::Start {
                    resource: "vm1".into(),
                    node: "n2".into(),
                }],
                edges: vec![],
            }
        }
    }

    #[test]
    fn dispatcher_refuses_a_start_while_the_resource_is_active_on_a_live_node() {
        let cfg = three_nodes();
        let mut c = Coordinator::new(StartOnly, cfg, Timeouts::default(), Time(0));
        let mut sent = Vec::new();
        for t in 0..30u64 {
            let now = Time(t * 100);
            for n in ["n1", "n2", "n3"] {
                c.handle_heartbeat(n, "ring0", now);
            }
            c.handle_timeout(now);
            while let Some(cmd) = c.poll_command() {
                if let CoordinatorCommand::Op { node, request } = cmd {
                    // vm1 runs on n1 (a probe finds it); everything else is stopped.
                    let outcome = match request.op {
                        OpKind::Monitor if node == "n1" => OpOutcome::Ok,
                        OpKind::Monitor => OpOutcome::NotRunning,
                        _ => OpOutcome::Ok,
                    };
                    if request.op != OpKind::Monitor {
                        sent.push((node.clone(), request.op));
                    }
                    let report = OpReport {
                        seq: Some(request.seq),
                        resource: request.resource,
                        op: request.op,
                        outcome,
                        at: now,
                    };
                    c.handle_report(&node, report, now);
                }
            }
        }
        assert!(sent.is_empty(), "no start while vm1 runs on n1: {sent:?}");
        assert!(
            c.take_log()
                .iter()
                .any(|l| l.contains("still active on n1")),
            "the hold is logged"
        );
    }

    #[test]
    fn a_resource_that_dies_by_itself_counts_a_failure() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        h.running.insert(("vm1".into(), "n1".into()), false);
        let report = OpReport {
            seq: None,
            resource: "vm1".into(),
            op: OpKind::Monitor,
            outcome: OpOutcome::NotRunning,
            at: h.now,
        };
        h.c.handle_report("n1", report, h.now);
        h.execute();
        h.run_for(500);
        assert_eq!(h.c.view().failcounts["vm1"]["n1"], 1);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn a_new_coordinator_keeps_the_failcounts_it_is_given() {
        let mut h = Harness::new(three_nodes());
        let banned = [("vm1".to_string(), [("n1".to_string(), 3)].into())].into();
        h.c.handle_failcounts(banned, h.now);
        h.run_for(2_000);
        assert_eq!(
            h.running_on("vm1"),
            vec!["n2"],
            "n1 is banned by its failures"
        );
    }

    #[test]
    fn failed_monitor_counts_a_failure_and_recovers() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        // The guest dies on its own; the recurring monitor notices.
        h.running.insert(("vm1".into(), "n1".into()), false);
        let report = OpReport {
            seq: None,
            resource: "vm1".into(),
            op: OpKind::Monitor,
            outcome: OpOutcome::Failed {
                rc: 1,
                reason: "guest gone".into(),
            },
            at: h.now,
        };
        h.c.handle_report("n1", report, h.now);
        h.execute();
        h.run_for(500);
        assert_eq!(h.c.view().failcounts["vm1"]["n1"], 1);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn a_node_fenced_once_is_fenced_again_when_lost_again() {
        let mut cfg = three_nodes();
        cfg.auto_rejoin = true;
        let mut h = Harness::new(cfg);
        h.run_for(2_000);
        for round in 0..2 {
            h.power_off("n1");
            h.run_for(3_000);
            assert_eq!(h.fences.len(), 1, "round {round}: n1 must be fenced");
            h.complete_fence(true);
            h.dead.remove("n1");
            h.run_for(2_000);
            assert_eq!(h.c.view().nodes["n1"], NodeState::Online, "round {round}");
        }
    }

    #[test]
    fn nothing_is_planned_while_a_node_was_never_heard() {
        let mut h = Harness::new(three_nodes());
        // n1 runs vm1 already, but this coordinator (just elected) has not heard it yet.
        h.running.insert(("vm1".into(), "n1".into()), true);
        h.dead.insert("n1".into());
        h.run_for(900);
        assert_eq!(h.running_on("vm1"), vec!["n1"], "n1 may hold vm1: wait");
        h.run_for(2_000);
        assert_eq!(
            h.fences.len(),
            1,
            "a node never heard is fenced before recovery"
        );
        h.complete_fence(true);
        h.run_for(500);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }

    #[test]
    fn fenced_node_does_not_rejoin_until_allowed() {
        let mut h = Harness::new(three_nodes());
        h.run_for(2_000);
        h.power_off("n1");
        h.run_for(3_000);
        h.complete_fence(true);
        h.dead.remove("n1");
        h.run_for(1_000);
        assert_eq!(h.c.view().nodes["n1"], NodeState::Offline);
        h.c.handle_allow_rejoin("n1", h.now);
        h.execute();
        h.run_for(1_000);
        assert_eq!(h.c.view().nodes["n1"], NodeState::Online);
    }

    #[test]
    fn a_new_leader_keeps_a_fenced_node_out_and_refences_one_in_doubt() {
        // The old leader fenced n3 (confirmed; it has rebooted and heartbeats again) and
        // had begun fencing n1, which still heartbeats and may still run vm1.
        let mut h = Harness::new(three_nodes());
        h.running.insert(("vm1".into(), "n1".into()), true);
        h.c.handle_fence_marks(
            [
                (
                    "n1".to_string(),
                    false,
                    "a stop operation failed".to_string(),
                ),
                (
                    "n3".to_string(),
                    true,
                    "it stopped heartbeating".to_string(),
                ),
            ],
            h.now,
        );
        h.execute();
        h.run_for(3_000);
        assert_eq!(h.c.view().nodes["n3"], NodeState::Offline, "kept out");
        assert_eq!(h.c.view().nodes["n1"], NodeState::Unclean, "still in doubt");
        assert_eq!(
            h.fences.iter().map(|(_, v)| v.as_str()).collect::<Vec<_>>(),
            vec!["n1"],
            "the fence in doubt is issued again, the confirmed one is not"
        );
        assert_eq!(h.running_on("vm1"), vec!["n1"], "frozen until n1 is fenced");
        h.complete_fence(true);
        h.run_for(500);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
        let marks = h.c.fence_marks();
        assert!(marks["n1"].0, "n1 is confirmed now");
        assert!(marks["n3"].0);
        h.c.handle_allow_rejoin("n3", h.now);
        h.run_for(500);
        assert_eq!(h.c.view().nodes["n3"], NodeState::Online);
        assert!(!h.c.fence_marks().contains_key("n3"));
    }

    #[test]
    fn a_watchdog_fence_waits_at_least_the_lease_and_margin() {
        let wd = |node: &str| NodeSpec {
            name: node.into(),
            links: vec!["ring0".into()],
            fence_levels: vec![vec![FenceStep {
                device: "wd".into(),
                kind: StepKind::Watchdog {
                    wait: Duration::from_millis(100),
                    timeout: Duration::from_secs(2),
                },
                delay: Default::default(),
            }]],
        };
        let mut h = Harness::new(config(vec![wd("n1"), wd("n2"), wd("n3")]));
        h.run_for(2_000);
        h.power_off("n1");
        h.running.retain(|(_, n), _| n != "n1"); // its watchdog will have reset it
        // Last heard at 2.0 s: lost at 3.0 s.
        h.run_for(900);
        assert_eq!(h.c.view().nodes["n1"], NodeState::Unclean);
        let lost_at = Time(3_000);
        // lease (2 × 1 s) + margin (1 s) + the device's timeout (2 s) = 5 s.
        h.run_for(4_800);
        assert_eq!(
            h.c.view().nodes["n1"],
            NodeState::Unclean,
            "confirmed before lease + timeout + margin ({:?} after loss)",
            h.now - lost_at
        );
        h.run_for(1_200);
        assert_eq!(h.c.view().nodes["n1"], NodeState::Offline);
        assert_eq!(h.running_on("vm1"), vec!["n2"]);
    }
}
