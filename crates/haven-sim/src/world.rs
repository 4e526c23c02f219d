//! The simulated world: nodes, their processes, the network, the power switches.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::time::Duration;

use haven_ha::adapter::coordinator_config;
use haven_ha::{
    AgentCommand, Coordinator, CoordinatorCommand, CoordinatorConfig, NoQuorumPolicy, NodeAgent,
    OpKind, OpOutcome, OpReport, OpRequest, Planner, QuorumAction, QuorumWatch, SchedPlanner, Time,
    Timeouts,
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
        }
    }
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
    /// A node without quorum stops its resources after this long (its lease).
    pub quorum_lease: Duration,
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
        }
    }
}

/// What a run found.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    pub violations: Vec<Violation>,
    /// One line per notable event (faults, and the coordinator's own log).
    pub log: Vec<String>,
    pub crashes: u32,
    pub partitions: u32,
    pub fences: u32,
    pub leader_changes: u32,
}

const TICK: Duration = Duration::from_millis(50);
const LINKS: [&str; 2] = ["link0", "link1"];
const ELECTION_DELAY: Duration = Duration::from_millis(600);
/// How long after healing the operator's second cleanup comes: longer than an
/// operation's timeout plus the coordinator's answer margin.
const SETTLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
enum Payload {
    Heartbeat { link: &'static str },
    Op(OpRequest),
    Report(OpReport),
    FenceRun { token: u64, victim: String },
    FenceDone { token: u64, ok: bool },
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
    agent: NodeAgent,
    /// Partition group: nodes talk only within their group.
    group: u32,
    quorum: QuorumWatch,
    /// Operations started by the agent and their completion time.
    pending_ops: Vec<(Time, u64, String, OpKind)>,
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
    leader: Option<(String, Coordinator<P>)>,
    leader_gone_at: Option<Time>,
    /// A leader that stepped down, passed over at the next election.
    deposed: Option<String>,
    /// The fence marks committed to the replicated state: what a new leader reads.
    committed_marks: BTreeMap<String, (bool, String)>,
    resources: Vec<String>,
    config: CoordinatorConfig,
    report: SimReport,
    seen_twice: BTreeSet<String>,
    faults_on: bool,
}

/// The cluster every run simulates: `nodes` hosts with two heartbeat links each and a
/// power switch, `resources` supervised processes, stickiness 100, with a group and an
/// ordered colocation among them.
pub fn cluster_config(opts: &SimOptions) -> Config {
    let mut text = format!(
        "[options]\nstonith-enabled = {}\nresource-stickiness = 100\n\n\
         [[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\n\
         params = {{ pcmk_reboot_timeout = \"5\" }}\n",
        opts.stonith_enabled
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
    // Booted nodes come back by themselves, so the liveness phase can converge.
    config.auto_rejoin = true;
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
                        agent: NodeAgent::new(),
                        group: 0,
                        quorum: QuorumWatch::new(NoQuorumPolicy::Stop, opts.quorum_lease),
                        pending_ops: Vec::new(),
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
        committed_marks: BTreeMap::new(),
        resources,
        config,
        seen_twice: BTreeSet::new(),
        faults_on: true,
        opts,
    };
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
            w.inject_faults();
        }
        w.boot_nodes();
        w.elect(&mut planner);
        if w.now >= heartbeat_due {
            w.send_heartbeats();
            heartbeat_due = w.now + Timeouts::default().heartbeat_interval;
        }
        w.deliver();
        w.run_agents();
        w.run_coordinator();
        w.quorum_watch();
        let v = check_at_most_once(&w.truth, w.now, &mut w.seen_twice);
        w.report.violations.extend(v);
        w.now = w.now + TICK;
    }
    let v = check_exactly_once(&w.truth, &w.resources, w.now);
    w.report.violations.extend(v);
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
            && let Some((l, _)) = self.leader.take()
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
        if let Some((_, c)) = self.leader.as_mut() {
            for r in &self.resources {
                c.handle_cleanup(r, now);
            }
        }
    }

    fn power_off(&mut self, n: &str) {
        for nodes in self.truth.values_mut() {
            nodes.remove(n);
        }
        if let Some(node) = self.nodes.get_mut(n) {
            node.powered = false;
            node.agent = NodeAgent::new();
            node.pending_ops.clear();
        }
        if self.leader.as_ref().is_some_and(|(l, _)| l == n) {
            self.leader = None;
            self.leader_gone_at = Some(self.now);
        }
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
            let lease = self.opts.quorum_lease;
            if let Some(node) = self.nodes.get_mut(&n) {
                node.powered = true;
                node.boot_at = None;
                // A node that boots has no lease until it is part of a quorate partition.
                node.quorum = QuorumWatch::new(NoQuorumPolicy::Stop, lease);
            }
        }
    }

    /// The lowest-named powered node of a group holding a majority leads (Raft's
    /// outcome, without its messages). A new leader starts a fresh coordinator after
    /// an election delay, knowing nothing, as a real new leader would.
    fn elect(&mut self, planner: &mut impl FnMut() -> P) {
        let total = self.nodes.len();
        let mut groups: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (n, node) in &self.nodes {
            if node.powered {
                groups.entry(node.group).or_default().push(n.clone());
            }
        }
        let deposed = self.deposed.clone();
        let majority = groups
            .values()
            .find(|members| members.len() * 2 > total)
            .and_then(|m| {
                m.iter()
                    .find(|n| Some(*n) != deposed.as_ref())
                    .or(m.first())
                    .cloned()
            });
        let current = self.leader.as_ref().map(|(l, _)| l.clone());
        let still_valid = current
            .as_ref()
            .is_some_and(|l| majority.as_ref().is_some_and(|_| self.in_majority(l)));
        if current.is_some() && !still_valid {
            self.log(format!("{} loses leadership", current.unwrap_or_default()));
            self.leader = None;
            self.leader_gone_at = Some(self.now);
        }
        if self.leader.is_none()
            && let Some(l) = majority
            && self
                .leader_gone_at
                .is_some_and(|t| self.now.saturating_since(t) >= ELECTION_DELAY)
        {
            self.log(format!("{l} becomes leader"));
            let mut c = Coordinator::new(
                planner(),
                self.config.clone(),
                Timeouts::default(),
                self.now,
            );
            c.seed_fencing(self.rng.random());
            // What the earlier leaders committed: fences in doubt are resumed, fenced
            // nodes stay fenced.
            let marks: Vec<(String, bool, String)> = self
                .committed_marks
                .iter()
                .map(|(n, (c, r))| (n.clone(), *c, r.clone()))
                .collect();
            c.handle_fence_marks(marks, self.now);
            self.leader = Some((l, c));
            self.leader_gone_at = None;
            self.deposed = None;
        }
    }

    fn in_majority(&self, n: &str) -> bool {
        let Some(node) = self.nodes.get(n) else {
            return false;
        };
        if !node.powered {
            return false;
        }
        let peers = self
            .nodes
            .values()
            .filter(|o| o.powered && o.group == node.group)
            .count();
        peers * 2 > self.nodes.len()
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

    fn can_talk(&self, a: &str, b: &str) -> bool {
        match (self.nodes.get(a), self.nodes.get(b)) {
            (Some(x), Some(y)) => x.powered && y.powered && x.group == y.group,
            _ => false,
        }
    }

    fn send_heartbeats(&mut self) {
        let Some(leader) = self.leader.as_ref().map(|(l, _)| l.clone()) else {
            return;
        };
        let senders: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.powered)
            .map(|(n, _)| n.clone())
            .collect();
        for n in senders {
            for link in LINKS {
                self.send(&n, &leader, Payload::Heartbeat { link });
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
                self.nodes.get(&msg.from).is_some_and(|n| n.powered)
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
            Payload::Heartbeat { link } => {
                if let Some((l, c)) = self.leader.as_mut()
                    && *l == msg.to
                {
                    c.handle_heartbeat(&msg.from, link, now);
                }
            }
            Payload::Op(req) => {
                if let Some(node) = self.nodes.get_mut(&msg.to)
                    && node.powered
                {
                    node.agent.handle_request(req, now);
                }
            }
            Payload::Report(report) => {
                if let Some((l, c)) = self.leader.as_mut()
                    && *l == msg.to
                {
                    c.handle_report(&msg.from, report, now);
                }
            }
            Payload::FenceRun { token, victim } => {
                self.report.fences += 1;
                self.log(format!("{} powers off {victim}", msg.to));
                self.power_off(&victim);
                let back = self.rng.random_range(3_000..8_000);
                if let Some(node) = self.nodes.get_mut(&victim) {
                    node.boot_at = Some(Time(now.0 + back));
                }
                self.send(&msg.to, &msg.from, Payload::FenceDone { token, ok: true });
            }
            Payload::FenceDone { token, ok } => {
                if let Some((l, c)) = self.leader.as_mut()
                    && *l == msg.to
                {
                    c.handle_fence_result(token, ok, now);
                }
            }
        }
    }

    fn run_agents(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let Some(node) = self.nodes.get_mut(&n) else {
                continue;
            };
            if !node.powered {
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
            let leader = self.leader.as_ref().map(|(l, _)| l.clone());
            for r in outgoing {
                if let Some(l) = leader.as_ref() {
                    self.send(&n, l, Payload::Report(r));
                }
            }
        }
    }

    /// Applies an operation to the ground truth.
    fn execute(&mut self, n: &str, r: &str, op: OpKind) -> OpOutcome {
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

    fn run_coordinator(&mut self) {
        let now = self.now;
        let Some((leader, c)) = self.leader.as_mut() else {
            return;
        };
        let leader = leader.clone();
        c.handle_timeout(now);
        let mut cmds = Vec::new();
        while let Some(cmd) = c.poll_command() {
            cmds.push(cmd);
        }
        // Marks are committed before any fence command leaves, as the daemon does.
        let marks = c.fence_marks();
        let lines = c.take_log();
        for line in lines {
            self.report.log.push(format!("[{leader}] {line}"));
        }
        self.committed_marks = marks;
        for cmd in cmds {
            match cmd {
                CoordinatorCommand::Op { node, request } => {
                    self.send(&leader, &node, Payload::Op(request));
                }
                CoordinatorCommand::Fence {
                    token,
                    victim,
                    executor,
                    ..
                } => {
                    self.send(&leader, &executor, Payload::FenceRun { token, victim });
                }
                CoordinatorCommand::Alert { message } => self.log(format!("alert: {message}")),
            }
        }
    }

    /// no-quorum-policy=stop, decided by the real `QuorumWatch`: a node cut off from
    /// the majority stops its resources once its lease is over, before the majority can
    /// have declared it dead and fenced it. Quorum itself is read off the partition
    /// groups (what Raft would tell each node, without its messages).
    fn quorum_watch(&mut self) {
        let now = self.now;
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in names {
            let quorate = self.in_majority(&n);
            let Some(node) = self.nodes.get_mut(&n) else {
                continue;
            };
            if !node.powered {
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
            let had: Vec<String> = self
                .truth
                .iter()
                .filter(|(_, s)| s.contains(&n))
                .map(|(r, _)| r.clone())
                .collect();
            if !had.is_empty() {
                self.log(format!("{n} lost quorum: stops {}", had.join(", ")));
            }
            for r in had {
                self.stop_process(&r, &n);
            }
        }
    }
}
