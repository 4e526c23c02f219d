//! The simulated world: nodes, their daemons and processes, the network, the power
//! switches.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use haven_ha::adapter::coordinator_config;
use haven_ha::{
    AgentCommand, Coordinator, CoordinatorCommand, CoordinatorConfig, NoQuorumPolicy, NodeAgent,
    NodeState, OpKind, OpOutcome, OpReport, OpRequest, Planner, QuorumAction, QuorumWatch,
    SchedPlanner, Time, Timeouts,
};
use haven_model::Config;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::invariants::{Truth, Violation, check_at_most_once, check_exactly_once};

/// Fault rates of the safety phase, per second of virtual time.
#[derive(Clone, Debug)]
pub struct FaultOptions {
    /// A node loses power (it and its processes stop; it boots again later).
    pub crash_per_s: f64,
    /// A node is cut off from the others (its processes keep running).
    pub partition_per_s: f64,
    /// All partitions heal.
    pub heal_per_s: f64,
    /// A running resource dies by itself (its monitor will notice).
    pub resource_death_per_s: f64,
    /// Probability that a heartbeat is lost.
    pub message_loss: f64,
    /// Maximum extra delivery delay of a message.
    pub max_delay: Duration,
    /// Probability that a start fails.
    pub start_failure: f64,
    /// The leader steps down (a Raft election without a failure) and another node of
    /// the majority takes over with a fresh coordinator.
    pub leader_change_per_s: f64,
    /// A node's daemon restarts (its agent's and coordinator's memory is lost) while
    /// the resources it started keep running.
    pub daemon_restart_per_s: f64,
    /// With `auto_rejoin` off: an operator lets a fenced node that is back in
    /// (`haven node online`).
    pub operator_allow_per_s: f64,
}

impl Default for FaultOptions {
    fn default() -> Self {
        FaultOptions {
            crash_per_s: 0.05,
            partition_per_s: 0.05,
            heal_per_s: 0.1,
            resource_death_per_s: 0.05,
            message_loss: 0.01,
            max_delay: Duration::from_millis(20),
            start_failure: 0.02,
            leader_change_per_s: 0.03,
            daemon_restart_per_s: 0.04,
            operator_allow_per_s: 0.1,
        }
    }
}

impl FaultOptions {
    /// No random faults (messages still take up to 20 ms): for scripted scenarios.
    pub fn none() -> Self {
        FaultOptions {
            crash_per_s: 0.0,
            partition_per_s: 0.0,
            heal_per_s: 0.0,
            resource_death_per_s: 0.0,
            message_loss: 0.0,
            max_delay: Duration::from_millis(20),
            start_failure: 0.0,
            leader_change_per_s: 0.0,
            daemon_restart_per_s: 0.0,
            operator_allow_per_s: 0.0,
        }
    }
}

/// A deliberately broken variant of the cluster's rules; the checkers must catch each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Broken {
    /// A two-node survivor recovers its peer's resources as soon as it starts fencing,
    /// without waiting for the fence to be confirmed.
    SurvivorSkipsFenceWait,
    /// A restarted daemon answers for its resources from its empty memory ("not
    /// running") instead of probing them.
    RestartAssumesStopped,
    /// A two-node survivor gives its Raft vote to the peer it fenced before it has
    /// committed the fence mark.
    VoteForFencedPeer,
    /// A coordinator starts from a mark holding its node in doubt although its node's
    /// fence of the peer was confirmed since: the winner of a race holds itself in
    /// doubt, and the loser, back, shoots it.
    DoubtOutlivesPeerFence,
    /// The answer of a fence whose ordering coordinator is gone is dropped, as before
    /// the race fix: the winner does not know it won.
    DropOrphanedFenceResult,
}

/// A fault at a fixed time, for scripted scenarios.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The node loses power and stays off until `PowerOn` (or the liveness phase).
    PowerOff(String),
    PowerOn(String),
    /// The node is cut off from the others, both ways.
    Cut(String),
    Heal,
    /// The node's daemon restarts, down this long; its processes keep running.
    RestartDaemon(String, Duration),
}

/// Pacemaker's fence delays on the power switch of a two-node world: fencing
/// `favoured` waits `base` more, so when both shoot, `favoured` shoots first.
#[derive(Clone, Debug)]
pub struct FenceDelays {
    pub favoured: String,
    pub base: Duration,
    /// `pcmk_delay_max`: a random part, up to this, on every fence.
    pub max: Duration,
}

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub nodes: usize,
    pub resources: usize,
    pub safety_phase: Duration,
    pub liveness_phase: Duration,
    pub faults: FaultOptions,
    /// Fencing on: lost nodes are powered off before recovery. Off reproduces the
    /// classic mistake (recovery without fencing), which the checkers must catch.
    pub stonith_enabled: bool,
    /// A node without quorum acts on its no-quorum-policy after this long (its lease).
    pub quorum_lease: Duration,
    pub no_quorum_policy: NoQuorumPolicy,
    /// Two nodes, no witness, `options.two-node`: a lone node keeps quorum if it has
    /// seen its peer since its daemon started, and races to fence the peer.
    pub two_node: bool,
    pub fence_delays: Option<FenceDelays>,
    /// A fenced node comes back in by itself once heard. Off (the daemon's default),
    /// it stays out until an operator allows it.
    pub auto_rejoin: bool,
    pub broken: Option<Broken>,
    /// Faults at fixed times of the safety phase, besides the random ones.
    pub script: Vec<(Duration, Fault)>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            seed: 0,
            nodes: 3,
            resources: 4,
            safety_phase: Duration::from_secs(60),
            liveness_phase: Duration::from_secs(60),
            faults: FaultOptions::default(),
            stonith_enabled: true,
            quorum_lease: Duration::from_secs(2),
            no_quorum_policy: NoQuorumPolicy::Stop,
            two_node: false,
            fence_delays: None,
            auto_rejoin: true,
            broken: None,
            script: Vec::new(),
        }
    }
}

impl SimOptions {
    /// The world a seed draws: one in four is a two-node cluster without a witness
    /// (fence delays favouring one node, fenced nodes kept out until allowed), the rest
    /// three nodes; a third of either freeze instead of stop without quorum, so a
    /// restarted daemon keeps its resources running. Drawn from its own stream, so the
    /// run's own randomness is the same whatever the world.
    pub fn for_seed(seed: u64) -> SimOptions {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_eed0_fa11_d0e5);
        let no_quorum_policy = if rng.random_bool(1.0 / 3.0) {
            NoQuorumPolicy::Freeze
        } else {
            NoQuorumPolicy::Stop
        };
        let mut opts = SimOptions {
            seed,
            no_quorum_policy,
            ..SimOptions::default()
        };
        if rng.random_bool(0.25) {
            let favoured = format!("n{}", rng.random_range(1..=2));
            let base = Duration::from_millis(rng.random_range(1_500..=3_000));
            // The random part stays well under the base, so the favoured node always
            // shoots first, as the operator configured it to.
            let max = if rng.random_bool(0.5) {
                Duration::from_millis(500)
            } else {
                Duration::ZERO
            };
            opts.nodes = 2;
            opts.two_node = true;
            opts.auto_rejoin = false;
            opts.fence_delays = Some(FenceDelays {
                favoured,
                base,
                max,
            });
        }
        opts
    }

    /// One line naming the world, for logs and failure reports.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} nodes{}, {} resources, no-quorum-policy {:?}, stonith {}, auto-rejoin {}",
            self.nodes,
            if self.two_node { " (two-node)" } else { "" },
            self.resources,
            self.no_quorum_policy,
            self.stonith_enabled,
            self.auto_rejoin,
        );
        if let Some(d) = &self.fence_delays {
            s.push_str(&format!(
                ", fencing {} delayed {:?} (+ up to {:?})",
                d.favoured, d.base, d.max
            ));
        }
        if let Some(b) = self.broken {
            s.push_str(&format!(", broken: {b:?}"));
        }
        s
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// One line per notable event (faults, and the coordinators' own logs).
    pub log: Vec<String>,
    pub crashes: u32,
    pub partitions: u32,
    pub fences: u32,
    pub leader_changes: u32,
    pub daemon_restarts: u32,
    /// Two-node worlds: a node running a coordinator alone fenced its peer.
    pub lone_fences: u32,
    pub operator_allows: u32,
    /// Where each resource runs at the end: resource → nodes.
    pub final_placement: BTreeMap<String, Vec<String>>,
    /// Two-node worlds: both nodes ran a coordinator alone at once (a cut both ways:
    /// each races to fence the other).
    pub fencing_races: u32,
}

const TICK: Duration = Duration::from_millis(50);
const LINKS: [&str; 2] = ["link0", "link1"];
const ELECTION_DELAY: Duration = Duration::from_millis(600);
/// How long after healing the operator's second cleanup comes: longer than an
/// operation's timeout plus the coordinator's answer margin.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
enum Payload {
    Heartbeat {
        link: &'static str,
        incarnation: u64,
    },
    Op(OpRequest),
    Report(OpReport),
    FenceRun {
        token: u64,
        victim: String,
    },
    FenceDone {
        token: u64,
        victim: String,
        ok: bool,
    },
}

#[derive(Clone, Debug)]
struct Msg {
    from: String,
    to: String,
    payload: Payload,
}

struct Node {
    powered: bool,
    boot_at: Option<Time>,
    /// The daemon runs (a powered node's daemon may be restarting).
    daemon_up: bool,
    daemon_back_at: Option<Time>,
    /// When the daemon last started: its detector hears the others a heartbeat later.
    daemon_started: Time,
    agent: NodeAgent,
    /// Partition group: nodes talk only within their group.
    group: u32,
    quorum: QuorumWatch,
    /// Operations started by the agent and their completion time.
    pending_ops: Vec<(Time, u64, String, OpKind)>,
    /// Two-node: this daemon has been part of the whole cluster since it started
    /// (corosync's wait_for_all).
    seen_quorate: bool,
    /// Fences this node's lone coordinator confirmed but could not commit: kept on its
    /// disk (so across daemon restarts and power cycles) until committed.
    local_marks: BTreeMap<String, (bool, String)>,
    /// Peers this node fenced that have acknowledged it (`/ha/fenced`): they keep the
    /// mark on themselves, so they may have this node's vote again. In memory only.
    told: BTreeSet<String>,
    /// After a daemon-only restart: the resources the new daemon has run no operation
    /// on yet, so knows nothing of.
    unprobed: BTreeSet<String>,
    /// Counts this node's daemon starts; heartbeats carry it, as the daemon's random
    /// incarnation, so a coordinator re-probes a node whose daemon restarted.
    incarnation: u64,
    /// resource → the node whose coordinator last ordered an operation on it here.
    ordered_by: BTreeMap<String, String>,
}

impl Node {
    fn alive(&self) -> bool {
        self.powered && self.daemon_up
    }
}

/// A fence the power switch has been told to carry out: it happens whatever becomes of
/// the node that ordered it.
struct SwitchAction {
    at: Time,
    token: u64,
    victim: String,
    executor: String,
    coordinator: String,
}

struct World<P> {
    rng: ChaCha8Rng,
    opts: SimOptions,
    now: Time,
    nodes: BTreeMap<String, Node>,
    truth: Truth,
    queue: BinaryHeap<Reverse<(Time, u64)>>,
    in_queue: BTreeMap<u64, Msg>,
    next_msg: u64,
    /// The Raft leader: the only node that can commit.
    leader: Option<String>,
    leader_gone_at: Option<Time>,
    /// A leader that stepped down, passed over at the next election.
    deposed: Option<String>,
    /// Running coordinators by node: the leader's, and in a two-node world a lone
    /// node's.
    coordinators: BTreeMap<String, Coordinator<P>>,
    /// The fence marks committed to the replicated state: what a new leader reads.
    committed_marks: BTreeMap<String, (bool, String)>,
    resources: Vec<String>,
    config: CoordinatorConfig,
    report: SimReport,
    seen_twice: BTreeSet<String>,
    /// Breaches of the other invariants already reported (one line each).
    seen_breach: BTreeSet<String>,
    faults_on: bool,
    switch: Vec<SwitchAction>,
    /// Nodes powered off by a fence and not booted since.
    fenced_down: BTreeSet<String>,
    /// With auto-rejoin off: nodes fenced and not yet allowed back by the operator.
    kept_out: BTreeSet<String>,
    /// (n, m) → resources that ran on n while n was out of touch with m: a
    /// coordinator on m must not start them before n is fenced (or back in touch).
    unseen_runs: BTreeMap<(String, String), BTreeSet<String>>,
    racing: bool,
    /// Two-node: the node whose fence of its peer the switch carried out → whether it
    /// has since been out of touch with a running daemon or down itself (only then may
    /// it be fenced).
    won: BTreeMap<String, bool>,
}

/// The cluster every run simulates: `nodes` hosts with two heartbeat links each and a
/// power switch, `resources` supervised processes, stickiness 100, with a group and an
/// ordered colocation among them.
pub fn cluster_config(opts: &SimOptions) -> Config {
    let policy = match opts.no_quorum_policy {
        NoQuorumPolicy::Stop => "stop",
        NoQuorumPolicy::Freeze => "freeze",
        NoQuorumPolicy::Ignore => "ignore",
        NoQuorumPolicy::Suicide => "suicide",
    };
    let mut params = "pcmk_reboot_timeout = \"5\"".to_string();
    if let Some(d) = &opts.fence_delays {
        params.push_str(&format!(
            ", pcmk_delay_base = \"{}:{}ms\"",
            d.favoured,
            d.base.as_millis()
        ));
        if !d.max.is_zero() {
            params.push_str(&format!(", pcmk_delay_max = \"{}ms\"", d.max.as_millis()));
        }
    }
    let mut text = format!(
        "[options]\nstonith-enabled = {}\nresource-stickiness = 100\n\
         no-quorum-policy = \"{policy}\"\n{}\n\
         [[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\nparams = {{ {params} }}\n",
        opts.stonith_enabled,
        if opts.two_node {
            "two-node = true\n"
        } else {
            ""
        },
    );
    for i in 1..=opts.nodes {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"n{i}\"\naddrs = [\"127.0.0.{i}\", \"127.0.1.{i}\"]\n"
        ));
    }
    for i in 1..=opts.resources {
        text.push_str(&format!(
            "\n[[resources]]\nid = \"r{i}\"\nclass = \"process\"\ntype = \"r{i}\"\n\
             ops = [{{ name = \"monitor\", interval = 2, timeout = 20 }}]\n"
        ));
    }
    // Dependencies the scheduler must order under faults, as in the seeds: an ordered,
    // colocated group (000's volume -> mount -> service), and a service after and with
    // another (001's DNS after its IP).
    if opts.resources >= 2 {
        text.push_str("\n[[groups]]\nid = \"g1\"\nmembers = [\"r1\", \"r2\"]\n");
    }
    if opts.resources >= 4 {
        text.push_str(
            "\n[[constraints.colocation]]\nid = \"r4-with-r3\"\nrsc = \"r4\"\n\
             with = \"r3\"\nscore = \"INFINITY\"\n\
             \n[[constraints.order]]\nid = \"r3-then-r4\"\nfirst = \"r3\"\nthen = \"r4\"\n",
        );
    }
    match Config::from_toml("simulated cluster", &text) {
        Ok(c) => c,
        // The text is generated above from numbers alone; a failure is a bug here.
        Err(e) => unreachable!("generated configuration is invalid: {e}"),
    }
}

/// Runs one simulation with Haven's scheduler planning, as on a real leader.
pub fn run_scheduler(opts: SimOptions) -> SimReport {
    let config = cluster_config(&opts);
    run(opts, || SchedPlanner::new(config.clone()))
}

/// Runs one simulation. `planner` makes the planner of each new coordinator (one per
/// leadership term, as on the real leader).
pub fn run<P: Planner>(opts: SimOptions, mut planner: impl FnMut() -> P) -> SimReport {
    let model = cluster_config(&opts);
    let mut config = coordinator_config(&model);
    config.auto_rejoin = opts.auto_rejoin;
    let names: Vec<String> = model.nodes.iter().map(|n| n.name.clone()).collect();
    let resources: Vec<String> = model.resources.iter().map(|r| r.id.clone()).collect();
    let mut w = World {
        rng: ChaCha8Rng::seed_from_u64(opts.seed),
        report: SimReport {
            seed: opts.seed,
            ..SimReport::default()
        },
        now: Time(0),
        nodes: names
            .iter()
            .map(|n| {
                (
                    n.clone(),
                    Node {
                        powered: true,
                        boot_at: None,
                        daemon_up: true,
                        daemon_back_at: None,
                        daemon_started: Time(0),
                        agent: NodeAgent::new(),
                        group: 0,
                        quorum: QuorumWatch::new(opts.no_quorum_policy, opts.quorum_lease),
                        pending_ops: Vec::new(),
                        seen_quorate: false,
                        local_marks: BTreeMap::new(),
                        told: BTreeSet::new(),
                        unprobed: BTreeSet::new(),
                        incarnation: 1,
                        ordered_by: BTreeMap::new(),
                    },
                )
            })
            .collect(),
        truth: Truth::new(),
        queue: BinaryHeap::new(),
        in_queue: BTreeMap::new(),
        next_msg: 0,
        leader: None,
        leader_gone_at: Some(Time(0)),
        deposed: None,
        coordinators: BTreeMap::new(),
        committed_marks: BTreeMap::new(),
        resources,
        config,
        seen_twice: BTreeSet::new(),
        seen_breach: BTreeSet::new(),
        faults_on: true,
        switch: Vec::new(),
        fenced_down: BTreeSet::new(),
        kept_out: BTreeSet::new(),
        unseen_runs: BTreeMap::new(),
        racing: false,
        won: BTreeMap::new(),
        opts,
    };
    w.log(format!("world: {}", w.opts.describe()));
    let safety_end = Time(0) + w.opts.safety_phase;
    let end = safety_end + w.opts.liveness_phase;
    let mut heartbeat_due = Time(0);
    let mut settled = false;
    while w.now <= end {
        if w.faults_on && w.now >= safety_end {
            w.enter_liveness_phase();
        }
        // Operations lost to a partition just before it healed time out only later; the
        // operator cleans up once more when things have settled, as after any incident.
        if !settled && w.now >= safety_end + SETTLE {
            settled = true;
            w.cleanup_all();
        }
        if w.faults_on {
            w.scripted_faults();
            w.inject_faults();
        }
        w.boot_nodes();
        w.restart_daemons();
        w.elect();
        w.sync_coordinators(&mut planner);
        if w.now >= heartbeat_due {
            w.send_heartbeats();
            heartbeat_due = w.now + Timeouts::default().heartbeat_interval;
        }
        w.deliver();
        w.tell_fenced();
        w.run_switch();
        w.run_agents();
        w.run_coordinators();
        w.operator();
        w.quorum_watch();
        w.check();
        w.now = w.now + TICK;
    }
    let v = check_exactly_once(&w.truth, &w.resources, w.now);
    w.report.violations.extend(v);
    w.report.final_placement = w
        .truth
        .iter()
        .map(|(r, on)| (r.clone(), on.iter().cloned().collect()))
        .collect();
    w.report
}

impl<P: Planner> World<P> {
    fn log(&mut self, line: String) {
        self.report.log.push(format!("{}: {line}", self.now));
    }

    fn chance_per_tick(&mut self, per_s: f64) -> bool {
        let p = per_s * TICK.as_secs_f64();
        self.rng.random_bool(p.clamp(0.0, 1.0))
    }

    fn pick_node(&mut self) -> String {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        let i = self.rng.random_range(0..names.len());
        names[i].clone()
    }

    fn alive(&self, n: &str) -> bool {
        self.nodes.get(n).is_some_and(Node::alive)
    }

    fn scripted_faults(&mut self) {
        let now = self.now;
        let due: Vec<Fault> = self
            .opts
            .script
            .iter()
            .filter(|(at, _)| Time(0) + *at <= now && now < Time(0) + *at + TICK)
            .map(|(_, f)| f.clone())
            .collect();
        for f in due {
            self.log(format!("script: {f:?}"));
            match f {
                Fault::PowerOff(n) => {
                    if self.nodes.get(&n).is_some_and(|x| x.powered) {
                        self.report.crashes += 1;
                        self.power_off(&n);
                    }
                }
                Fault::PowerOn(n) => {
                    if let Some(node) = self.nodes.get_mut(&n)
                        && !node.powered
                    {
                        node.boot_at = Some(now);
                    }
                }
                Fault::Cut(n) => {
                    self.report.partitions += 1;
                    if let Some(node) = self.nodes.get_mut(&n) {
                        node.group = 1;
                    }
                }
                Fault::Heal => self.heal(),
                Fault::RestartDaemon(n, down) => {
                    if self.alive(&n) {
                        self.report.daemon_restarts += 1;
                        self.daemon_down(&n);
                        if let Some(node) = self.nodes.get_mut(&n) {
                            node.daemon_back_at = Some(now + down);
                        }
                    }
                }
            }
        }
    }

    fn inject_faults(&mut self) {
        if self.chance_per_tick(self.opts.faults.crash_per_s) {
            let n = self.pick_node();
            if self.nodes[&n].powered {
                self.report.crashes += 1;
                self.log(format!("fault: {n} loses power"));
                self.power_off(&n);
                let back = self.rng.random_range(2_000..10_000);
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.boot_at = Some(Time(self.now.0 + back));
                }
            }
        }
        if self.chance_per_tick(self.opts.faults.partition_per_s) {
            let n = self.pick_node();
            self.report.partitions += 1;
            self.log(format!("fault: {n} cut off"));
            if let Some(node) = self.nodes.get_mut(&n) {
                node.group = 1;
            }
        }
        if self.chance_per_tick(self.opts.faults.heal_per_s) {
            self.heal();
        }
        if self.chance_per_tick(self.opts.faults.leader_change_per_s)
            && let Some(l) = self.leader.take()
        {
            self.report.leader_changes += 1;
            self.log(format!("fault: {l} steps down"));
            self.leader_gone_at = Some(self.now);
            self.deposed = Some(l);
        }
        if self.chance_per_tick(self.opts.faults.resource_death_per_s) {
            let n = self.pick_node();
            let victim = self
                .truth
                .iter()
                .find(|(_, nodes)| nodes.contains(&n))
                .map(|(r, _)| r.clone());
            if let Some(r) = victim {
                self.log(format!("fault: {r} dies on {n}"));
                self.stop_process(&r, &n);
            }
        }
        if self.chance_per_tick(self.opts.faults.daemon_restart_per_s) {
            let n = self.pick_node();
            if self.alive(&n) {
                // Some restarts are quicker than failure detection, some slower.
                let down = self.rng.random_range(200..3_000);
                self.report.daemon_restarts += 1;
                self.log(format!(
                    "fault: {n}'s daemon restarts ({down} ms down; its resources keep running)"
                ));
                self.daemon_down(&n);
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.daemon_back_at = Some(Time(self.now.0 + down));
                }
            }
        }
    }

    fn heal(&mut self) {
        if self.nodes.values().any(|n| n.group != 0) {
            self.log("fault: partitions heal".to_string());
        }
        for node in self.nodes.values_mut() {
            node.group = 0;
        }
    }

    fn enter_liveness_phase(&mut self) {
        self.faults_on = false;
        self.log("liveness phase: every fault healed".to_string());
        self.heal();
        self.opts.faults.message_loss = 0.0;
        self.opts.faults.start_failure = 0.0;
        let now = self.now;
        for node in self.nodes.values_mut() {
            if !node.powered && node.boot_at.is_none() {
                node.boot_at = Some(now);
            }
        }
        // The operator cleans up the failures of the storm, as after any incident.
        self.cleanup_all();
    }

    fn cleanup_all(&mut self) {
        let now = self.now;
        if let Some(c) = self
            .leader
            .as_ref()
            .and_then(|l| self.coordinators.get_mut(l))
        {
            for r in &self.resources {
                c.handle_cleanup(r, now);
            }
        }
    }

    /// The daemon process ends (a restart, or with the whole node): what it knew is
    /// gone; the processes it started are not.
    fn daemon_down(&mut self, n: &str) {
        if let Some(node) = self.nodes.get_mut(n) {
            node.daemon_up = false;
            node.daemon_back_at = None;
            node.agent = NodeAgent::new();
            node.pending_ops.clear();
            node.ordered_by.clear();
            node.told.clear();
        }
        if self.coordinators.remove(n).is_some() {
            self.log(format!("{n}'s coordinator is gone with its daemon"));
        }
        if self.leader.as_deref() == Some(n) {
            self.leader = None;
            self.leader_gone_at = Some(self.now);
        }
    }

    /// A daemon starts: no lease, no quorum seen, an empty agent.
    fn daemon_up(&mut self, n: &str, restarted: bool) {
        let now = self.now;
        let resources = self.resources.clone();
        let (policy, lease) = (self.opts.no_quorum_policy, self.opts.quorum_lease);
        if let Some(node) = self.nodes.get_mut(n) {
            node.daemon_up = true;
            node.daemon_back_at = None;
            node.daemon_started = now;
            node.agent = NodeAgent::new();
            node.pending_ops.clear();
            node.quorum = QuorumWatch::new(policy, lease);
            node.seen_quorate = false;
            // After a power cycle nothing runs; after a daemon-only restart anything
            // may, and the new daemon knows nothing until it probes.
            node.unprobed = if restarted {
                resources.into_iter().collect()
            } else {
                BTreeSet::new()
            };
            node.incarnation += 1;
        }
    }

    fn power_off(&mut self, n: &str) {
        for nodes in self.truth.values_mut() {
            nodes.remove(n);
        }
        self.daemon_down(n);
        if let Some(node) = self.nodes.get_mut(n) {
            node.powered = false;
            node.unprobed.clear();
        }
        self.unseen_runs.retain(|(a, _), _| a != n);
        self.won.remove(n);
    }

    fn stop_process(&mut self, r: &str, n: &str) {
        if let Some(nodes) = self.truth.get_mut(r) {
            nodes.remove(n);
        }
    }

    fn boot_nodes(&mut self) {
        let now = self.now;
        let booting: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| !node.powered && node.boot_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for n in booting {
            self.log(format!("{n} boots"));
            if let Some(node) = self.nodes.get_mut(&n) {
                node.powered = true;
                node.boot_at = None;
            }
            self.fenced_down.remove(&n);
            self.daemon_up(&n, false);
        }
    }

    fn restart_daemons(&mut self) {
        let now = self.now;
        let back: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, node)| {
                node.powered && !node.daemon_up && node.daemon_back_at.is_some_and(|t| t <= now)
            })
            .map(|(n, _)| n.clone())
            .collect();
        for n in back {
            self.log(format!("{n}'s daemon is back"));
            self.daemon_up(&n, true);
        }
    }

    /// Whether `voter` would vote for `candidate`: not if it holds an uncommitted
    /// confirmed fence of the candidate that the candidate has not acknowledged (the
    /// two-node rejoin rule).
    fn grants_vote(&self, voter: &str, candidate: &str) -> bool {
        if voter == candidate || self.opts.broken == Some(Broken::VoteForFencedPeer) {
            return true;
        }
        let Some(v) = self.nodes.get(voter) else {
            return false;
        };
        v.told.contains(candidate)
            || !v
                .local_marks
                .get(candidate)
                .is_some_and(|(confirmed, _)| *confirmed)
    }

    /// The daemon's `/ha/fenced`: a node that holds a peer fenced on its disk tells the
    /// peer once it hears it; the peer keeps the mark on itself (so it never counts as
    /// having seen the cluster, and a coordinator it runs as leader starts with its own
    /// node fenced) and may have the vote again. Marks the replicated state holds
    /// confirmed leave the local files, as the daemon's `sync_local_marks` does.
    fn tell_fenced(&mut self) {
        let committed: BTreeSet<String> = self
            .committed_marks
            .iter()
            .filter(|(_, (c, _))| *c)
            .map(|(n, _)| n.clone())
            .collect();
        for node in self.nodes.values_mut() {
            node.local_marks.retain(|v, _| !committed.contains(v));
            node.told.retain(|v| !committed.contains(v));
        }
        let mut tell: Vec<(String, String)> = Vec::new();
        for (by, node) in &self.nodes {
            for (v, (confirmed, _)) in &node.local_marks {
                if *confirmed && v != by && !node.told.contains(v) && self.in_touch(by, v) {
                    tell.push((by.clone(), v.clone()));
                }
            }
        }
        for (by, v) in tell {
            self.log(format!(
                "{by} tells {v} it was fenced; {v} keeps the mark on itself"
            ));
            if let Some(node) = self.nodes.get_mut(&v) {
                node.local_marks
                    .insert(v.clone(), (true, format!("fenced by {by}")));
            }
            if let Some(node) = self.nodes.get_mut(&by) {
                node.told.insert(v);
            }
        }
    }

    /// Raft's outcome, without its messages: the lowest-named node of a group holding
    /// a majority of the voters, that a majority of them votes for (and, after a
    /// step-down, not the one that stepped down if another can win) leads.
    fn elect(&mut self) {
        let total = self.nodes.len();
        let mut groups: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (n, node) in &self.nodes {
            if node.alive() {
                groups.entry(node.group).or_default().push(n.clone());
            }
        }
        let majority: Option<Vec<String>> = groups
            .into_values()
            .find(|members| members.len() * 2 > total);
        let current = self.leader.clone();
        let still_valid = current
            .as_ref()
            .is_some_and(|l| majority.as_ref().is_some_and(|m| m.iter().any(|x| x == l)));
        if let Some(l) = current
            && !still_valid
        {
            self.log(format!("{l} loses leadership"));
            self.leader = None;
            self.leader_gone_at = Some(self.now);
        }
        let Some(members) = majority else {
            return;
        };
        let now = self.now;
        if self.leader.is_some()
            || self
                .leader_gone_at
                .is_none_or(|t| now.saturating_since(t) < ELECTION_DELAY)
        {
            return;
        }
        let electable: Vec<String> = members
            .iter()
            .filter(|c| {
                let votes = members.iter().filter(|v| self.grants_vote(v, c)).count();
                votes * 2 > total
            })
            .cloned()
            .collect();
        let deposed = self.deposed.clone();
        let Some(l) = electable
            .iter()
            .find(|n| Some(*n) != deposed.as_ref())
            .or(electable.first())
            .cloned()
        else {
            return;
        };
        self.log(format!("{l} becomes leader"));
        self.leader = Some(l);
        self.leader_gone_at = None;
        self.deposed = None;
    }

    /// Quorum as `n`'s daemon knows it: `(quorate, alone)`. Together: a majority of
    /// the voters, heard once a heartbeat has gone round since the daemon started.
    /// Two-node: a node that lost its peer stays quorate alone if it has seen the
    /// whole cluster since its daemon started.
    fn quorum_of(&self, n: &str) -> (bool, bool) {
        let Some(node) = self.nodes.get(n) else {
            return (false, false);
        };
        if !node.alive() {
            return (false, false);
        }
        if self.together(n) {
            return (true, false);
        }
        if self.opts.two_node {
            return (node.seen_quorate, true);
        }
        (false, false)
    }

    fn together(&self, n: &str) -> bool {
        let Some(node) = self.nodes.get(n) else {
            return false;
        };
        if !node.alive()
            || self.now.saturating_since(node.daemon_started)
                < Timeouts::default().heartbeat_interval
        {
            return false;
        }
        let peers = self
            .nodes
            .values()
            .filter(|o| o.alive() && o.group == node.group)
            .count();
        peers * 2 > self.nodes.len()
    }

    /// A coordinator runs on the Raft leader, and in a two-node world on a node that
    /// lost its peer and is quorate alone (it races to fence the peer). A leader that
    /// is left alone keeps its coordinator; a new one starts knowing nothing but the
    /// committed fence marks and its own node's uncommitted ones.
    fn sync_coordinators(&mut self, planner: &mut impl FnMut() -> P) {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let (quorate, alone) = self.quorum_of(&n);
            let should = self.alive(&n)
                && (self.leader.as_deref() == Some(n.as_str()) || (alone && quorate));
            if !should {
                if self.coordinators.remove(&n).is_some() {
                    self.log(format!("{n}'s coordinator stops"));
                }
                continue;
            }
            if self.coordinators.contains_key(&n) {
                continue;
            }
            self.log(format!(
                "{n} starts a coordinator{}",
                if alone { " alone" } else { "" }
            ));
            let mut c = Coordinator::new(
                planner(),
                self.config.clone(),
                Timeouts::default(),
                self.now,
            );
            c.seed_fencing(self.rng.random());
            // What the earlier leaders committed, and what this node decided alone:
            // fences in doubt are resumed, fenced nodes stay fenced.
            let mut marks = self.committed_marks.clone();
            if let Some(node) = self.nodes.get(&n) {
                for (v, (confirmed, reason)) in &node.local_marks {
                    let e = marks.entry(v.clone()).or_insert((false, reason.clone()));
                    e.0 |= *confirmed;
                }
            }
            let mut marks: Vec<(String, bool, String)> =
                marks.into_iter().map(|(v, (c, r))| (v, c, r)).collect();
            if self.opts.two_node && self.opts.broken != Some(Broken::DoubtOutlivesPeerFence) {
                marks = haven_ha::fencing::after_two_node_race(marks);
            }
            c.handle_fence_marks(marks, self.now);
            self.coordinators.insert(n, c);
        }
        let racing = self.opts.two_node
            && self.coordinators.len() == self.nodes.len()
            && self.leader.is_none();
        if racing && !self.racing {
            self.report.fencing_races += 1;
        }
        self.racing = racing;
    }

    fn send(&mut self, from: &str, to: &str, payload: Payload) {
        // Heartbeats are fire-and-forget and may be lost; operations, reports and fence
        // traffic ride a connection that retransmits, so only a partition loses them.
        let lossy = matches!(payload, Payload::Heartbeat { .. });
        if lossy
            && self
                .rng
                .random_bool(self.opts.faults.message_loss.clamp(0.0, 1.0))
        {
            return;
        }
        let max = u64::try_from(self.opts.faults.max_delay.as_millis()).unwrap_or(0);
        let delay = if max == 0 {
            0
        } else {
            self.rng.random_range(0..=max)
        };
        let id = self.next_msg;
        self.next_msg += 1;
        self.queue.push(Reverse((Time(self.now.0 + delay), id)));
        self.in_queue.insert(
            id,
            Msg {
                from: from.to_string(),
                to: to.to_string(),
                payload,
            },
        );
    }

    /// Whether a message from `a` reaches `b`'s daemon.
    fn can_talk(&self, a: &str, b: &str) -> bool {
        match (self.nodes.get(a), self.nodes.get(b)) {
            (Some(x), Some(y)) => x.powered && y.alive() && x.group == y.group,
            _ => false,
        }
    }

    /// Whether `a` and `b` are in touch: both daemons run and can hear each other.
    fn in_touch(&self, a: &str, b: &str) -> bool {
        self.alive(a) && self.can_talk(a, b)
    }

    fn send_heartbeats(&mut self) {
        let targets: Vec<String> = self.coordinators.keys().cloned().collect();
        let senders: Vec<(String, u64)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.alive())
            .map(|(n, node)| (n.clone(), node.incarnation))
            .collect();
        for to in &targets {
            for (n, incarnation) in &senders {
                for link in LINKS {
                    let incarnation = *incarnation;
                    self.send(n, to, Payload::Heartbeat { link, incarnation });
                }
            }
        }
    }

    fn deliver(&mut self) {
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > self.now {
                break;
            }
            self.queue.pop();
            let Some(msg) = self.in_queue.remove(&id) else {
                continue;
            };
            // The fencing network is separate from the cluster network (the seeds' IPMI
            // LAN): fence runs and their answers are not cut by partitions.
            let fencing = matches!(
                msg.payload,
                Payload::FenceRun { .. } | Payload::FenceDone { .. }
            );
            let reachable = if fencing {
                self.nodes.get(&msg.from).is_some_and(|n| n.powered) && self.alive(&msg.to)
            } else {
                self.can_talk(&msg.from, &msg.to)
            };
            if !reachable {
                continue;
            }
            self.handle_msg(msg);
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        let now = self.now;
        match msg.payload {
            Payload::Heartbeat { link, incarnation } => {
                if let Some(c) = self.coordinators.get_mut(&msg.to) {
                    c.handle_heartbeat(&msg.from, link, now);
                    c.handle_incarnation(&msg.from, incarnation, now);
                }
            }
            Payload::Op(req) => {
                if let Some(node) = self.nodes.get_mut(&msg.to) {
                    // Only a coordinator with quorum sends operations: hearing one is
                    // hearing a quorate leader, which gives the node its lease.
                    node.quorum.handle_quorum(true, now);
                    node.ordered_by
                        .insert(req.resource.clone(), msg.from.clone());
                    node.agent.handle_request(req, now);
                }
            }
            Payload::Report(report) => {
                let unprobed = self
                    .nodes
                    .get(&msg.from)
                    .is_some_and(|n| n.unprobed.contains(&report.resource));
                if unprobed && report.outcome == OpOutcome::NotRunning {
                    let v = Violation::StoppedUnprobed {
                        resource: report.resource.clone(),
                        node: msg.from.clone(),
                        at: now,
                    };
                    self.breach(v);
                }
                if let Some(c) = self.coordinators.get_mut(&msg.to) {
                    c.handle_report(&msg.from, report, now);
                }
            }
            Payload::FenceRun { token, victim } => {
                // The switch takes a moment; once told, it acts whatever becomes of
                // the node that told it, so two nodes shooting at once both die.
                let took = self.rng.random_range(50..300);
                self.switch.push(SwitchAction {
                    at: Time(now.0 + took),
                    token,
                    victim,
                    executor: msg.to.clone(),
                    coordinator: msg.from.clone(),
                });
            }
            Payload::FenceDone { token, victim, ok } => {
                let mut confirmed = false;
                if let Some(c) = self.coordinators.get_mut(&msg.to) {
                    let doubt: Vec<String> = c.fencer().in_doubt().map(str::to_string).collect();
                    c.handle_fence_result(token, ok, now);
                    confirmed = c.fencer().is_confirmed(&victim);
                    // From its confirmation on, the victim is fenced in the cluster's
                    // eyes and stays out until allowed (a fence whose answer is lost
                    // with the node that ordered it is, for the cluster, still in doubt).
                    if !self.opts.auto_rejoin {
                        for v in doubt {
                            if c.fencer().is_confirmed(&v) {
                                self.kept_out.insert(v);
                            }
                        }
                    }
                }
                let drop = self.opts.broken == Some(Broken::DropOrphanedFenceResult);
                if ok && !confirmed && self.opts.two_node && !drop {
                    self.orphaned_fence(&msg.to, &victim);
                }
            }
        }
    }

    /// Two-node: a fence this node ordered succeeded, but the coordinator that ordered
    /// it is gone (a heal made the peer leader for a moment, or this node's coordinator
    /// restarted). The power switch has spoken, so the node keeps the victim fenced on
    /// its disk, as for any fence it confirmed alone, and starts its coordinator again
    /// from its marks: that is what makes the winner of a race the survivor, where
    /// dropping the answer left it in doubt of itself.
    fn orphaned_fence(&mut self, n: &str, victim: &str) {
        self.log(format!(
            "{n} learns its fence of {victim} succeeded after its coordinator moved on; it keeps {victim} fenced"
        ));
        if let Some(node) = self.nodes.get_mut(n) {
            node.local_marks.insert(
                victim.to_string(),
                (true, "fenced (answer after a coordinator change)".into()),
            );
        }
        if !self.opts.auto_rejoin {
            self.kept_out.insert(victim.to_string());
        }
        if self.coordinators.remove(n).is_some() {
            self.log(format!("{n}'s coordinator restarts from its marks"));
        }
    }

    fn run_switch(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.switch)
            .into_iter()
            .partition(|a| a.at <= now);
        self.switch = later;
        for a in due {
            self.report.fences += 1;
            if self.opts.two_node && a.coordinator != self.leader.clone().unwrap_or_default() {
                self.report.lone_fences += 1;
            }
            self.log(format!("{} powers off {}", a.executor, a.victim));
            if self.won.get(&a.victim) == Some(&false) {
                let v = Violation::WinnerFenced {
                    winner: a.victim.clone(),
                    at: now,
                };
                self.breach(v);
            }
            self.power_off(&a.victim);
            if self.opts.two_node && self.alive(&a.executor) {
                self.won.insert(a.executor.clone(), false);
            }
            self.fenced_down.insert(a.victim.clone());
            let back = self.rng.random_range(3_000..8_000);
            if let Some(node) = self.nodes.get_mut(&a.victim) {
                node.boot_at = Some(Time(now.0 + back));
            }
            if self.opts.two_node && self.fenced_down.len() == self.nodes.len() {
                let v = Violation::BothFenced { at: now };
                self.breach(v);
            }
            self.send(
                &a.executor,
                &a.coordinator,
                Payload::FenceDone {
                    token: a.token,
                    victim: a.victim.clone(),
                    ok: true,
                },
            );
        }
    }

    /// Where `n`'s agent reports: its own coordinator if it runs one, else the leader.
    fn report_target(&self, n: &str) -> Option<String> {
        if self.coordinators.contains_key(n) {
            return Some(n.to_string());
        }
        self.leader.clone()
    }

    fn run_agents(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let Some(node) = self.nodes.get_mut(&n) else {
                continue;
            };
            if !node.alive() {
                continue;
            }
            node.agent.handle_timeout(now);
            // Finish operations whose time has come.
            let (done, waiting): (Vec<_>, Vec<_>) =
                node.pending_ops.drain(..).partition(|(t, ..)| *t <= now);
            node.pending_ops = waiting;
            for (_, token, resource, op) in done {
                let outcome = self.execute(&n, &resource, op);
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.agent.handle_op_done(token, outcome, now);
                }
            }
            let mut outgoing = Vec::new();
            if let Some(node) = self.nodes.get_mut(&n) {
                while let Some(cmd) = node.agent.poll_command() {
                    match cmd {
                        AgentCommand::Run {
                            token,
                            resource,
                            op,
                            ..
                        } => {
                            // Operations take a little while, like real ones.
                            let took = Time(now.0 + 100);
                            node.pending_ops.push((took, token, resource, op));
                        }
                        AgentCommand::Report(r) => outgoing.push(r),
                    }
                }
            }
            if let Some(to) = self.report_target(&n) {
                for r in outgoing {
                    self.send(&n, &to, Payload::Report(r));
                }
            }
        }
    }

    /// Applies an operation to the ground truth.
    fn execute(&mut self, n: &str, r: &str, op: OpKind) -> OpOutcome {
        let assumes = self.opts.broken == Some(Broken::RestartAssumesStopped);
        if let Some(node) = self.nodes.get_mut(n) {
            if assumes && op == OpKind::Monitor && node.unprobed.contains(r) {
                // The broken daemon answers from its memory, which is empty.
                return OpOutcome::NotRunning;
            }
            node.unprobed.remove(r);
        }
        let running = self.truth.get(r).is_some_and(|s| s.contains(n));
        match op {
            OpKind::Monitor => {
                if running {
                    OpOutcome::Ok
                } else {
                    OpOutcome::NotRunning
                }
            }
            OpKind::Start | OpKind::MigrateFrom | OpKind::Promote | OpKind::Demote => {
                if op == OpKind::Start
                    && self
                        .rng
                        .random_bool(self.opts.faults.start_failure.clamp(0.0, 1.0))
                {
                    return OpOutcome::Failed {
                        rc: 1,
                        reason: "simulated start failure".into(),
                    };
                }
                if !running {
                    self.check_fenced_first(r, n);
                }
                self.truth
                    .entry(r.to_string())
                    .or_default()
                    .insert(n.to_string());
                OpOutcome::Ok
            }
            OpKind::Stop | OpKind::MigrateTo => {
                self.stop_process(r, n);
                OpOutcome::Ok
            }
        }
    }

    /// Nothing starts on `m` while a node out of touch with the coordinator that
    /// ordered the start, and not fenced since, may still run it: whatever that node
    /// did meanwhile, the coordinator cannot know it.
    fn check_fenced_first(&mut self, r: &str, m: &str) {
        let Some(c) = self.nodes.get(m).and_then(|x| x.ordered_by.get(r)).cloned() else {
            return;
        };
        let holders: Vec<String> = self
            .unseen_runs
            .iter()
            .filter(|((n, to), runs)| *to == c && n != m && runs.contains(r))
            .map(|((n, _), _)| n.clone())
            .collect();
        for n in holders {
            let v = Violation::NotFencedFirst {
                resource: r.to_string(),
                node: m.to_string(),
                peer: n,
                at: self.now,
            };
            self.breach(v);
        }
    }

    fn run_coordinators(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.coordinators.keys().cloned().collect();
        for n in names {
            let leading = self.leader.as_deref() == Some(n.as_str());
            let skip_wait = self.opts.broken == Some(Broken::SurvivorSkipsFenceWait);
            let Some(c) = self.coordinators.get_mut(&n) else {
                continue;
            };
            c.handle_timeout(now);
            if skip_wait && !leading {
                let doubt: Vec<String> = c.fencer().in_doubt().map(str::to_string).collect();
                for v in doubt {
                    c.handle_fence_ack(&v, now);
                }
            }
            let mut cmds = Vec::new();
            while let Some(cmd) = c.poll_command() {
                cmds.push(cmd);
            }
            let marks = c.fence_marks();
            let lines = c.take_log();
            for line in lines {
                self.report.log.push(format!("[{n}] {line}"));
            }
            // Marks are committed before any fence command leaves, as the daemon does.
            // A lone two-node survivor cannot commit: it keeps its confirmed fences on
            // its own disk, for the rejoin rule. (Not the ones in doubt: a node that
            // lost the race would otherwise come back and shoot the winner again.)
            if leading {
                self.committed_marks = marks;
                if let Some(node) = self.nodes.get_mut(&n) {
                    node.local_marks.clear();
                }
            } else if let Some(node) = self.nodes.get_mut(&n) {
                node.local_marks = marks.into_iter().filter(|(_, (c, _))| *c).collect();
            }
            for cmd in cmds {
                match cmd {
                    CoordinatorCommand::Op { node, request } => {
                        self.send(&n, &node, Payload::Op(request));
                    }
                    CoordinatorCommand::Fence {
                        token,
                        victim,
                        executor,
                        ..
                    } => {
                        self.send(&n, &executor, Payload::FenceRun { token, victim });
                    }
                    CoordinatorCommand::Alert { message } => {
                        self.log(format!("alert from {n}: {message}"))
                    }
                }
            }
        }
    }

    /// With auto-rejoin off, an operator lets fenced nodes back in (`haven node
    /// online`) now and then, and always once the faults are over: through the
    /// leader, which drops the fence mark before the node joins.
    fn operator(&mut self) {
        if self.opts.auto_rejoin || self.kept_out.is_empty() {
            return;
        }
        if self.faults_on && !self.chance_per_tick(self.opts.faults.operator_allow_per_s) {
            return;
        }
        let Some(l) = self.leader.clone() else {
            return;
        };
        let now = self.now;
        let waiting: Vec<String> = self.kept_out.iter().cloned().collect();
        for v in waiting {
            let Some(c) = self.coordinators.get_mut(&l) else {
                return;
            };
            c.handle_allow_rejoin(&v, now);
            if c.view().nodes.get(&v) == Some(&NodeState::Online) {
                self.report.operator_allows += 1;
                self.kept_out.remove(&v);
                // The daemon removes the mark before it lets the node in, never after.
                self.committed_marks.remove(&v);
                for node in self.nodes.values_mut() {
                    node.local_marks.remove(&v);
                }
                self.log(format!("operator: {v} allowed back in"));
            }
        }
    }

    /// no-quorum-policy, decided by the real `QuorumWatch`: a node cut off from the
    /// majority stops its resources (or freezes) once its lease is over, before the
    /// majority can have declared it dead and fenced it; a daemon that (re)starts has
    /// no lease until it hears a quorate partition. Quorum itself is read off the
    /// partition groups (what Raft would tell each node, without its messages).
    fn quorum_watch(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            // A node fenced and kept out does not count as having seen the cluster: it
            // must never take the lone survivor's part. It learns it is fenced from the
            // leader, which only the survivor can be (the rejoin rule) and which
            // commits the mark first, so it waits for a leader.
            let told = self
                .nodes
                .get(&n)
                .is_some_and(|x| x.local_marks.contains_key(&n));
            let fenced = told
                || self
                    .committed_marks
                    .get(&n)
                    .is_some_and(|(confirmed, _)| *confirmed);
            if self.together(&n)
                && self.leader.is_some()
                && !fenced
                && let Some(node) = self.nodes.get_mut(&n)
            {
                node.seen_quorate = true;
            }
            let (quorate, _) = self.quorum_of(&n);
            let Some(node) = self.nodes.get_mut(&n) else {
                continue;
            };
            if !node.alive() {
                continue;
            }
            node.quorum.handle_quorum(quorate, now);
            let mut stop_all = false;
            while let Some(action) = node.quorum.poll_action() {
                stop_all |= matches!(action, QuorumAction::StopAll | QuorumAction::SelfFence);
            }
            if !stop_all {
                continue;
            }
            node.agent = NodeAgent::new();
            node.pending_ops.clear();
            // The daemon stops every configured resource, whatever it believed: it
            // knows the outcome of each.
            node.unprobed.clear();
            let had: Vec<String> = self
                .truth
                .iter()
                .filter(|(_, s)| s.contains(&n))
                .map(|(r, _)| r.clone())
                .collect();
            if !had.is_empty() {
                self.log(format!("{n} has no quorum lease: stops {}", had.join(", ")));
            }
            for r in had {
                self.stop_process(&r, &n);
            }
        }
    }

    fn breach(&mut self, v: Violation) {
        if self.seen_breach.insert(v.key()) {
            self.log(format!("VIOLATION: {v}"));
            self.report.violations.push(v);
        }
    }

    /// The invariants checked on every tick against the ground truth.
    fn check(&mut self) {
        let v = check_at_most_once(&self.truth, self.now, &mut self.seen_twice);
        for x in &v {
            self.report
                .log
                .push(format!("{}: VIOLATION: {x}", self.now));
        }
        self.report.violations.extend(v);
        // Who is out of touch with whom, and what ran there meanwhile.
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in &names {
            let powered = self.nodes.get(n).is_some_and(|x| x.powered);
            for m in &names {
                if n == m {
                    continue;
                }
                let key = (n.clone(), m.clone());
                if !powered || self.in_touch(n, m) {
                    self.unseen_runs.remove(&key);
                    continue;
                }
                let runs: Vec<String> = self
                    .truth
                    .iter()
                    .filter(|(_, on)| on.contains(n))
                    .map(|(r, _)| r.clone())
                    .collect();
                if !runs.is_empty() {
                    self.unseen_runs.entry(key).or_default().extend(runs);
                }
            }
        }
        // A race's winner may be fenced again only once it has been out of touch (or
        // down) since.
        let winners: Vec<String> = self
            .won
            .iter()
            .filter(|(_, lost)| !**lost)
            .map(|(w, _)| w.clone())
            .collect();
        for w in winners {
            let lost = !self.alive(&w)
                || names
                    .iter()
                    .any(|m| *m != w && self.alive(m) && !self.in_touch(&w, m));
            if lost {
                self.won.insert(w, true);
            }
        }
        // A fenced node stays out until allowed: no coordinator counts it in, and it
        // runs nothing.
        let kept: Vec<String> = self.kept_out.iter().cloned().collect();
        for n in kept {
            let running: Vec<String> = self
                .truth
                .iter()
                .filter(|(_, on)| on.contains(&n))
                .map(|(r, _)| r.clone())
                .collect();
            let let_in: Vec<String> = self
                .coordinators
                .iter()
                .filter(|(_, c)| c.view().nodes.get(&n) == Some(&NodeState::Online))
                .map(|(by, _)| by.clone())
                .collect();
            if !running.is_empty() || !let_in.is_empty() {
                let v = Violation::FencedNodeBack {
                    node: n.clone(),
                    running,
                    let_in_by: let_in,
                    at: self.now,
                };
                self.breach(v);
            }
        }
    }
}
