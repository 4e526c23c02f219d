//! Placement, promotion, ordering and the action graph.

use std::collections::{BTreeMap, HashMap};

use haven_model::{
    Action as OrderAction, BoolOp, Config, DefinitionChange, ExprOp, Location, Meta,
    MultipleActive, NoQuorumPolicy, NodeState, OrderKind, PlacementStrategy, Primitive,
    ResourceStatus, Role, Rule, Score, State, ValueType,
};

use crate::plan::{Action, Change, ChangeKind, Fence, Placement, Plan};

const NEG: Score = Score::NEG_INFINITY;

/// What a `home` with `failback` adds on its home node. Large enough to outweigh
/// stickiness and the preferences administrators write (Pacemaker's own guidance keeps
/// those in the hundreds or thousands), yet finite with room to spare below INFINITY:
/// an operator's move (cli-prefer, INFINITY) or any mandatory constraint still
/// outranks it, and stickiness or a colocation added on the home node cannot
/// saturate it into a tie with the move.
pub const HOME_FAILBACK: Score = Score::new(100_000);

/// (dependent, primary, score, dependent role, primary role, node attribute)
type ColocPair<'a> = (
    &'a str,
    &'a str,
    Score,
    Option<Role>,
    Option<Role>,
    Option<&'a str>,
);
/// Where a member is now: node, role, failed.
type Had = Option<(usize, Role, bool)>;
/// Where a member will be: node, role.
type Will = Option<(usize, Role)>;

struct NodeInfo<'a> {
    name: &'a str,
    /// May host resources after this transition.
    can_run: bool,
    /// Its resource history counts (it is up, or may still be running things).
    counts: bool,
    fence: Option<String>,
    /// Lost without a clean exit: what it ran may still run there.
    unclean: bool,
    attrs: HashMap<String, String>,
    capacity: Option<BTreeMap<String, i64>>,
    /// Node health as a score every resource gets there.
    health: Score,
}

#[derive(Clone)]
struct Cur<'a> {
    key: &'a str,
    node: usize,
    role: Role,
    failed: bool,
    status: &'a ResourceStatus,
}

struct Prim<'a> {
    cfg: &'a Primitive,
    meta: Meta,
    cur: Vec<Cur<'a>>,
    /// node → (failcount, last failure)
    fails: HashMap<usize, (u32, Option<i64>)>,
    /// The node it is locked to while that node is shut down.
    locked_to: Option<usize>,
    /// The source's copy after a live migration that completed on the target: it only
    /// needs its stop.
    dangling: Vec<Cur<'a>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Prim,
    Group,
    Clone,
}

struct CloneSpec {
    max: usize,
    node_max: usize,
    min: usize,
    promotable: bool,
    interleave: bool,
    promoted_max: usize,
    promoted_node_max: usize,
    unique: bool,
}

struct Unit<'a> {
    id: &'a str,
    kind: Kind,
    prims: Vec<usize>,
    /// Ids whose location constraints apply to this unit.
    ids: Vec<&'a str>,
    meta: Meta,
    clone: Option<CloneSpec>,
    doc_order: usize,
}

/// One placed copy of a unit (the unit itself, or a clone instance).
#[derive(Clone, Debug)]
struct Inst {
    number: Option<u32>,
    /// Where the instance is now (for clones: the node its members are on).
    cur_node: Option<usize>,
    node: Option<usize>,
    promoted: bool,
    /// Per member: may it run (members after a banned one cannot).
    member_ok: Vec<bool>,
    restart: bool,
    /// It would start, but something it must follow cannot run.
    blocked: bool,
}

struct Coloc<'a> {
    dep: usize,
    primary: usize,
    score: Score,
    dep_role: Option<Role>,
    primary_role: Option<Role>,
    /// Same value of this node attribute instead of the same node.
    attr: Option<&'a str>,
}

struct Ord {
    first: usize,
    then: usize,
    first_action: OrderAction,
    then_action: OrderAction,
    mandatory: bool,
    symmetrical: bool,
    /// Every instance of a first clone counts (else one is enough).
    require_all: bool,
}

struct Sched<'a> {
    cfg: &'a Config,
    st: &'a State,
    nodes: Vec<NodeInfo<'a>>,
    node_ix: HashMap<&'a str, usize>,
    prims: Vec<Prim<'a>>,
    units: Vec<Unit<'a>>,
    unit_of: HashMap<&'a str, usize>,
    locs: HashMap<&'a str, Vec<&'a Location>>,
    colocs: Vec<Coloc<'a>>,
    /// unit → colocation indices where it is the dependent / the primary
    dep_of: Vec<Vec<usize>>,
    prim_of: Vec<Vec<usize>>,
    orders: Vec<Ord>,
    placed: Vec<Option<Vec<Inst>>>,
    load: Vec<u32>,
    used: Vec<BTreeMap<String, i64>>,
    scores: Vec<(String, Vec<Score>)>,
    /// Location, home and failcount scores per unit, computed once.
    base: Vec<Option<Vec<Score>>>,
    orphans: Vec<Cur<'a>>,
    /// Units whose placement is under way (placing what they go with first).
    busy: Vec<bool>,
}

/// Decide what the cluster should do: a pure, deterministic function of its inputs.
pub fn schedule(cfg: &Config, st: &State) -> Plan {
    let mut s = Sched::new(cfg, st);
    s.place_all();
    s.apply_quorum();
    s.apply_orders();
    let mut plan = s.into_plan();
    crate::window::open_windows(cfg, &mut plan);
    plan
}

/// The score node health attributes (`#health-*`) give every resource on a node.
fn node_health(opts: &haven_model::Options, attrs: &HashMap<String, String>) -> Score {
    use haven_model::HealthStrategy as H;
    let (red, yellow, green) = match opts.node_health_strategy {
        H::None => return Score::ZERO,
        H::MigrateOnRed => (NEG, Score::ZERO, Score::ZERO),
        H::OnlyGreen => (NEG, NEG, Score::ZERO),
        H::Progressive | H::Custom => (
            opts.node_health_red.unwrap_or(NEG),
            opts.node_health_yellow.unwrap_or_default(),
            opts.node_health_green.unwrap_or_default(),
        ),
    };
    let mut keys: Vec<&String> = attrs.keys().filter(|k| k.starts_with("#health")).collect();
    keys.sort();
    keys.into_iter()
        .map(|k| match attrs[k].as_str() {
            "red" => red,
            "yellow" => yellow,
            "green" => green,
            v => v.parse::<Score>().unwrap_or_default(),
        })
        .fold(Score::ZERO, |a, b| a + b)
}

fn parse_num(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok()
}

fn cmp_version(a: &str, b: &str) -> std::cmp::Ordering {
    let pa: Vec<u64> = a.split('.').map(|x| x.parse().unwrap_or(0)).collect();
    let pb: Vec<u64> = b.split('.').map(|x| x.parse().unwrap_or(0)).collect();
    pa.cmp(&pb)
}

fn eval_rule(r: &Rule, attrs: &HashMap<String, String>) -> bool {
    let mut results = r.expressions.iter().map(|e| {
        let v = attrs.get(&e.attribute);
        match e.operation {
            ExprOp::Defined => return v.is_some(),
            ExprOp::NotDefined => return v.is_none(),
            _ => {}
        }
        let (Some(v), Some(want)) = (v, e.value.as_ref()) else {
            return e.operation == ExprOp::Ne && v.is_none();
        };
        let ord = match e.value_type {
            Some(ValueType::Version) => cmp_version(v, want),
            Some(ValueType::Integer) | Some(ValueType::Number) => {
                match (parse_num(v), parse_num(want)) {
                    (Some(a), Some(b)) => a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal),
                    _ => return false,
                }
            }
            Some(ValueType::String) => v.as_str().cmp(want.as_str()),
            None => match (parse_num(v), parse_num(want)) {
                (Some(a), Some(b)) if e.operation != ExprOp::Eq && e.operation != ExprOp::Ne => {
                    a.partial_cmp(&b).unwrap_or(std::cmp::Ordering::Equal)
                }
                _ => v.as_str().cmp(want.as_str()),
            },
        };
        use std::cmp::Ordering::*;
        match e.operation {
            ExprOp::Eq => ord == Equal,
            ExprOp::Ne => ord != Equal,
            ExprOp::Lt => ord == Less,
            ExprOp::Gt => ord == Greater,
            ExprOp::Lte => ord != Greater,
            ExprOp::Gte => ord != Less,
            ExprOp::Defined | ExprOp::NotDefined => false,
        }
    });
    let subs = r.rules.iter().map(|sub| eval_rule(sub, attrs));
    match r.boolean_op {
        BoolOp::And => results.all(|x| x) && subs.clone().all(|x| x),
        BoolOp::Or => results.any(|x| x) || subs.clone().any(|x| x),
    }
}

impl<'a> Sched<'a> {
    fn new(cfg: &'a Config, st: &'a State) -> Sched<'a> {
        let opts = &cfg.options;
        let quorum_ok = st.have_quorum || opts.no_quorum_policy == NoQuorumPolicy::Ignore;
        let mut nodes = Vec::new();
        let mut node_ix = HashMap::new();
        for n in &cfg.nodes {
            let ns = st.nodes.get(&n.name);
            let state = ns.map(|x| x.state).unwrap_or(NodeState::Offline);
            let standby = ns.and_then(|x| x.standby).unwrap_or(n.standby);
            let maint = ns.and_then(|x| x.maintenance).unwrap_or(n.maintenance);
            let shutdown = ns.is_some_and(|x| x.shutdown);
            let mut attrs: HashMap<String, String> = n.attributes.clone().into_iter().collect();
            if let Some(ns) = ns {
                for (k, v) in &ns.attributes {
                    attrs.insert(k.clone(), v.clone());
                }
            }
            attrs.insert("#uname".into(), n.name.clone());
            attrs.insert("#id".into(), n.id.clone().unwrap_or_else(|| n.name.clone()));
            attrs.insert("#kind".into(), "cluster".into());
            let unclean = state == NodeState::Unclean;
            let fence = (unclean && opts.stonith_enabled && quorum_ok).then(|| {
                ns.and_then(|x| x.unclean_reason.clone())
                    .unwrap_or_else(|| "node is unclean".to_string())
            });
            let health = node_health(opts, &attrs);
            node_ix.insert(n.name.as_str(), nodes.len());
            nodes.push(NodeInfo {
                name: &n.name,
                can_run: state == NodeState::Online
                    && !standby
                    && !maint
                    && !shutdown
                    && !opts.stop_all_resources,
                counts: matches!(
                    state,
                    NodeState::Online | NodeState::Unclean | NodeState::Pending
                ),
                fence,
                unclean,
                attrs,
                capacity: (opts.placement_strategy != PlacementStrategy::Default).then(|| {
                    let mut c = n.utilization.clone();
                    if let Some(ns) = ns {
                        c.extend(ns.utilization.iter().map(|(k, v)| (k.clone(), *v)));
                    }
                    c
                }),
                health,
            });
        }
        // Quorum lost under `suicide`: every node of this partition fences itself.
        if !st.have_quorum
            && st.quorum_lost
            && opts.no_quorum_policy == NoQuorumPolicy::Suicide
            && opts.stonith_enabled
        {
            for n in nodes.iter_mut().filter(|n| n.counts) {
                n.can_run = false;
                n.fence = Some("cluster does not have quorum".into());
            }
        }
        let n_nodes = nodes.len();
        let mut s = Sched {
            cfg,
            st,
            nodes,
            node_ix,
            prims: Vec::new(),
            units: Vec::new(),
            unit_of: HashMap::new(),
            locs: HashMap::new(),
            colocs: Vec::new(),
            dep_of: Vec::new(),
            prim_of: Vec::new(),
            orders: Vec::new(),
            placed: Vec::new(),
            load: vec![0; n_nodes],
            used: vec![BTreeMap::new(); n_nodes],
            scores: Vec::new(),
            base: Vec::new(),
            orphans: Vec::new(),
            busy: Vec::new(),
        };
        s.build_units();
        s.gather_current();
        s.fence_failed_stops();
        s.build_constraints();
        s
    }

    fn build_units(&mut self) {
        let cfg = self.cfg;
        let defaults = &cfg.options.resource_defaults;
        let prim_ix: HashMap<&str, usize> = cfg
            .resources
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i))
            .collect();
        let group_ix: HashMap<&str, usize> = cfg
            .groups
            .iter()
            .enumerate()
            .map(|(i, g)| (g.id.as_str(), i))
            .collect();
        let mut in_group: HashMap<&str, usize> = HashMap::new();
        for (gi, g) in cfg.groups.iter().enumerate() {
            for m in &g.members {
                in_group.insert(m, gi);
            }
        }
        let mut cloned: HashMap<&str, usize> = HashMap::new();
        for (ci, c) in cfg.clones.iter().enumerate() {
            cloned.insert(&c.child, ci);
        }
        let n_nodes = self.nodes.len();
        // Prims in document order; each unit is created when its first primitive is met.
        let mut prim_slot: Vec<Option<usize>> = vec![None; cfg.resources.len()];
        for (pi, p) in cfg.resources.iter().enumerate() {
            if prim_slot[pi].is_some() {
                continue;
            }
            let group = in_group.get(p.id.as_str()).copied();
            let top_id: &str = match group {
                Some(gi) => &cfg.groups[gi].id,
                None => &p.id,
            };
            let clone = cloned.get(top_id).copied();
            let unit_ix = self.units.len();
            let (kind, member_ids): (Kind, Vec<&str>) = match group {
                Some(gi) => (
                    Kind::Group,
                    cfg.groups[gi].members.iter().map(|m| m.as_str()).collect(),
                ),
                None => (Kind::Prim, vec![p.id.as_str()]),
            };
            let clone_cfg = clone.map(|ci| &cfg.clones[ci]);
            let mut unit_meta = Meta::default();
            if let Some(c) = clone_cfg {
                unit_meta = c.meta.inherit(defaults);
            }
            let group_meta = group
                .map(|gi| cfg.groups[gi].meta.inherit(&unit_meta))
                .unwrap_or(unit_meta.clone());
            let mut ids: Vec<&str> = Vec::new();
            if let Some(c) = clone_cfg {
                ids.push(&c.id);
            }
            if let Some(gi) = group {
                ids.push(&cfg.groups[gi].id);
            }
            let mut prims = Vec::new();
            for mid in &member_ids {
                let Some(&mpi) = prim_ix.get(mid) else {
                    continue;
                };
                let mp = &cfg.resources[mpi];
                let parent = if group.is_some() {
                    &group_meta
                } else if clone.is_some() {
                    &unit_meta
                } else {
                    defaults
                };
                let meta = mp.meta.inherit(parent).inherit(defaults);
                let slot = self.prims.len();
                prim_slot[mpi] = Some(slot);
                self.prims.push(Prim {
                    cfg: mp,
                    meta,

                    cur: Vec::new(),
                    fails: HashMap::new(),
                    locked_to: None,
                    dangling: Vec::new(),
                });
                prims.push(slot);
                ids.push(mid);
            }
            let kind = if clone.is_some() { Kind::Clone } else { kind };
            let top_meta = match (clone_cfg, group) {
                (Some(_), _) => unit_meta.clone(),
                (None, Some(_)) => group_meta.clone(),
                (None, None) => self.prims[prims[0]].meta.clone(),
            };
            let spec = clone_cfg.map(|c| CloneSpec {
                max: c.clone_max.map(|x| x as usize).unwrap_or(n_nodes),
                node_max: c.clone_node_max.unwrap_or(1).max(1) as usize,
                min: c.clone_min.unwrap_or(1).max(1) as usize,
                promotable: c.promotable,
                interleave: c.interleave,
                promoted_max: c.promoted_max.unwrap_or(1) as usize,
                promoted_node_max: c.promoted_node_max.unwrap_or(1) as usize,
                unique: c.globally_unique,
            });
            let uid: &str = clone_cfg.map(|c| c.id.as_str()).unwrap_or(top_id);
            self.unit_of.insert(uid, unit_ix);
            for id in &ids {
                self.unit_of.insert(id, unit_ix);
            }
            let _ = group_ix.get(top_id);
            self.units.push(Unit {
                id: uid,
                kind,
                prims,
                ids,
                meta: top_meta,
                clone: spec,
                doc_order: unit_ix,
            });
        }
        self.placed = vec![None; self.units.len()];
        self.dep_of = vec![Vec::new(); self.units.len()];
        self.prim_of = vec![Vec::new(); self.units.len()];
    }

    fn gather_current(&mut self) {
        let prim_by_id: HashMap<&str, usize> = self
            .prims
            .iter()
            .enumerate()
            .map(|(i, p)| (p.cfg.id.as_str(), i))
            .collect();
        for (key, per_node) in &self.st.resources {
            let base = match prim_by_id.get(key.as_str()) {
                Some(&i) => Some(i),
                None => key
                    .rsplit_once(':')
                    .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
                    .and_then(|(b, _)| prim_by_id.get(b).copied()),
            };
            for (node, status) in per_node {
                let Some(&ni) = self.node_ix.get(node.as_str()) else {
                    continue;
                };
                if let Some(pi) = base
                    && (status.failcount > 0
                        || status.last_failure.is_some()
                        || status.start_failed
                        || status.hard_error)
                {
                    // A failed start is fatal on that node unless configured otherwise;
                    // an agent that is not installed there always is.
                    let fatal = status.start_failed && self.cfg.options.start_failure_is_fatal
                        || status.hard_error;
                    let count = if fatal {
                        haven_model::INFINITY as u32
                    } else {
                        status.failcount
                    };
                    let e = self.prims[pi].fails.entry(ni).or_default();
                    e.0 = e.0.saturating_add(count);
                    e.1 = e.1.max(status.last_failure);
                }
                if let Some(pi) = base
                    && status.shutdown_locked
                {
                    self.prims[pi].locked_to = Some(ni);
                }
                if !self.nodes[ni].counts || status.role == Role::Stopped {
                    continue;
                }
                let c = Cur {
                    key,
                    node: ni,
                    role: status.role,
                    failed: status.failed,
                    status,
                };
                match base {
                    Some(pi) => self.prims[pi].cur.push(c),
                    None => self.orphans.push(c),
                }
            }
        }
        // A failed migration may have left the resource running on its target as well.
        let node_ix = &self.node_ix;
        let nodes = &self.nodes;
        for p in &mut self.prims {
            let mut extra = Vec::new();
            for c in &p.cur {
                if let Some(m) = c
                    .status
                    .migration
                    .as_ref()
                    .filter(|m| c.failed && !m.completed)
                    && let Some(&t) = node_ix.get(m.target.as_str())
                    && nodes[t].counts
                    && !p.cur.iter().any(|x| x.node == t)
                {
                    extra.push(Cur {
                        node: t,
                        ..c.clone()
                    });
                }
            }
            p.cur.extend(extra);
            // A migration that completed on its target leaves the source's copy to stop.
            let sources: Vec<usize> = p
                .cur
                .iter()
                .filter_map(|c| {
                    let m = c.status.migration.as_ref().filter(|m| m.completed)?;
                    (nodes[c.node].name == m.target)
                        .then(|| node_ix.get(m.source.as_str()).copied())
                        .flatten()
                })
                .collect();
            let (gone, kept): (Vec<Cur<'a>>, Vec<Cur<'a>>) = std::mem::take(&mut p.cur)
                .into_iter()
                .partition(|c| sources.contains(&c.node) && !c.failed);
            p.cur = kept;
            p.dangling = gone;
        }
        let now = self.st.now;
        for p in &mut self.prims {
            p.cur.sort_by_key(|c| c.node);
            // Failures of operations with `on-fail = ignore` do not count; a start or
            // stop that failed that way leaves the resource taken as stopped.
            // A hard error (not installed) is never ignored.
            let ignored = |c: &Cur<'_>| {
                c.failed
                    && !c.status.hard_error
                    && c.status
                        .failed_op
                        .as_deref()
                        .and_then(|f| f.split_once(':'))
                        .is_some_and(|(name, interval)| {
                            p.cfg.ops.iter().any(|o| {
                                o.name == name
                                    && o.interval.to_string() == interval
                                    && o.on_fail == Some(haven_model::OnFail::Ignore)
                            })
                        })
            };
            // A demote that failed with `on-fail = block` leaves it promoted, and there
            // it stays (the import reads any other failed demote as unpromoted).
            let demote_blocks = p.cfg.ops.iter().any(|o| {
                o.name == "demote"
                    && o.interval == 0
                    && o.on_fail == Some(haven_model::OnFail::Block)
            });
            let mut kept = Vec::new();
            for mut c in std::mem::take(&mut p.cur) {
                if demote_blocks && c.failed && c.status.failed_op.as_deref() == Some("demote:0") {
                    c.role = Role::Promoted;
                }
                if ignored(&c) {
                    if c.status.start_failed
                        || matches!(c.status.failed_op.as_deref(), Some("start:0" | "stop:0"))
                    {
                        continue;
                    }
                    c.failed = false;
                }
                kept.push(c);
            }
            p.cur = kept;
            // An expired failure is forgotten (without a clock, every failure is old).
            if let Some(t) = p.meta.failure_timeout.filter(|t| *t > 0) {
                for c in &mut p.cur {
                    let expired = match (now, c.status.last_failure) {
                        (Some(now), Some(last)) => last + t as i64 <= now,
                        _ => true,
                    };
                    if c.failed && expired {
                        c.failed = false;
                    }
                }
            }
        }
    }

    /// A node where a stop failed must be fenced before the resource can run anywhere
    /// else (when fencing is possible); until then it runs nothing.
    fn fence_failed_stops(&mut self) {
        let opts = &self.cfg.options;
        // Unlike lost nodes, a failed stop is fenced even without quorum (but a lost
        // node still is not).
        if !opts.stonith_enabled {
            return;
        }
        let quorum_ok = self.st.have_quorum || opts.no_quorum_policy == NoQuorumPolicy::Ignore;
        let mut marks: Vec<(usize, String)> = Vec::new();
        for (pi, p) in self.prims.iter().enumerate() {
            for c in &p.cur {
                if c.failed
                    && c.status.stop_failed
                    && !self.blocked_failure(pi, c)
                    && (quorum_ok || !self.nodes[c.node].unclean)
                {
                    marks.push((c.node, c.key.to_string()));
                }
            }
        }
        for (n, key) in marks {
            let node = &mut self.nodes[n];
            if node.fence.is_none() {
                node.fence = Some(format!("{key} failed there"));
            }
            node.can_run = false;
        }
    }

    fn build_constraints(&mut self) {
        let cfg = self.cfg;
        for l in &cfg.constraints.location {
            self.locs.entry(l.rsc.as_str()).or_default().push(l);
        }
        let mut pairs: Vec<ColocPair<'_>> = Vec::new();
        for c in &cfg.constraints.colocation {
            let attr = c.node_attribute.as_deref();
            if let (Some(a), Some(b)) = (&c.rsc, &c.with) {
                pairs.push((a, b, c.score, c.rsc_role, c.with_role, attr));
            }
            // Within a set each member goes with the one before it; every member of a
            // set goes with the set after it: with its first member (which the rest of
            // that set follows), or with each member when that set is not sequential.
            for set in &c.sets {
                if set.sequential {
                    for w in set.resources.windows(2) {
                        pairs.push((&w[1], &w[0], c.score, set.role, set.role, attr));
                    }
                }
            }
            for w in c.sets.windows(2) {
                let (this, next) = (&w[0], &w[1]);
                let primaries: Vec<&String> = if next.sequential {
                    next.resources.first().into_iter().collect()
                } else {
                    next.resources.iter().collect()
                };
                for r in &this.resources {
                    for p in &primaries {
                        pairs.push((r, p, c.score, this.role, next.role, attr));
                    }
                }
            }
        }
        for (a, b, score, ar, br, attr) in pairs {
            let (Some(&du), Some(&pu)) = (self.unit_of.get(a), self.unit_of.get(b)) else {
                continue;
            };
            if du == pu {
                continue;
            }
            // A Promoted or Unpromoted role of the primary is weighed when roles are
            // assigned; something without roles (not a promotable clone) never gets
            // there, so such a constraint places nothing (Pacemaker's recorded cases;
            // 2.1.5 read it as a plain colocation).
            if br.is_some_and(|r| r != Role::Started) && !self.promotable(pu) {
                continue;
            }
            let ix = self.colocs.len();
            self.colocs.push(Coloc {
                dep: du,
                primary: pu,
                score,
                dep_role: ar,
                primary_role: br,
                attr,
            });
            self.dep_of[du].push(ix);
            self.prim_of[pu].push(ix);
        }
        for o in &cfg.constraints.order {
            let mandatory = o.kind == OrderKind::Mandatory;
            let symmetrical = o.symmetrical.unwrap_or(o.kind != OrderKind::Serialize);
            let fa = o.first_action.unwrap_or(OrderAction::Start);
            let ta = o.then_action.unwrap_or(fa);
            let mut pairs: Vec<(&str, OrderAction, &str, OrderAction)> = Vec::new();
            if let (Some(f), Some(t)) = (&o.first, &o.then) {
                pairs.push((f, fa, t, ta));
            }
            for set in &o.sets {
                if set.sequential {
                    let a = set.action.unwrap_or(fa);
                    for w in set.resources.windows(2) {
                        pairs.push((&w[0], a, &w[1], a));
                    }
                }
            }
            for w in o.sets.windows(2) {
                let a0 = w[0].action.unwrap_or(fa);
                let a1 = w[1].action.unwrap_or(fa);
                let firsts: Vec<&String> = if w[0].sequential {
                    w[0].resources.last().into_iter().collect()
                } else {
                    w[0].resources.iter().collect()
                };
                let thens: Vec<&String> = if w[1].sequential {
                    w[1].resources.first().into_iter().collect()
                } else {
                    w[1].resources.iter().collect()
                };
                for f in &firsts {
                    for t in &thens {
                        pairs.push((f, a0, t, a1));
                    }
                }
            }
            for (f, fa, t, ta) in pairs {
                let (Some(&fu), Some(&tu)) = (self.unit_of.get(f), self.unit_of.get(t)) else {
                    continue;
                };
                if fu == tu {
                    continue;
                }
                self.orders.push(Ord {
                    first: fu,
                    then: tu,
                    first_action: fa,
                    then_action: ta,
                    mandatory,
                    symmetrical,
                    require_all: o.require_all.unwrap_or(true),
                });
            }
        }
    }

    fn stickiness(&self, pi: usize) -> Score {
        self.prims[pi]
            .meta
            .resource_stickiness
            .unwrap_or(self.cfg.options.resource_stickiness)
    }

    /// How a resource that may run once, found active on several nodes, is handled.
    fn multi(&self, pi: usize) -> Option<MultipleActive> {
        let p = &self.prims[pi];
        // A copy on a node being fenced dies with it.
        let copies = p
            .cur
            .iter()
            .filter(|c| self.nodes[c.node].fence.is_none())
            .count();
        (copies > 1 && self.units[self.unit_of_prim(pi)].kind != Kind::Clone)
            .then(|| p.meta.multiple_active.unwrap_or(MultipleActive::StopStart))
    }

    fn unit_of_prim(&self, pi: usize) -> usize {
        self.unit_of
            .get(self.prims[pi].cfg.id.as_str())
            .copied()
            .unwrap_or_default()
    }

    fn managed(&self, pi: usize) -> bool {
        self.multi(pi) != Some(MultipleActive::Block)
            && !self.cfg.options.maintenance_mode
            && self.prims[pi].meta.is_managed.unwrap_or(true)
            && !self.prims[pi]
                .cur
                .iter()
                .any(|c| self.blocked_failure(pi, c))
    }

    /// A failure the cluster must leave alone: the failed operation says `on-fail =
    /// block`, or a stop failed and there is no fencing to make the node safe.
    fn blocked_failure(&self, pi: usize, c: &Cur<'_>) -> bool {
        if !c.failed || self.nodes[c.node].fence.is_some() {
            return false;
        }
        // A stop that failed, with no fencing to make the node safe, can only wait.
        if c.status.stop_failed && !self.cfg.options.stonith_enabled {
            return true;
        }
        let Some((name, interval)) = c
            .status
            .failed_op
            .as_deref()
            .and_then(|f| f.split_once(':'))
        else {
            return false;
        };
        let block = self.prims[pi].cfg.ops.iter().any(|o| {
            o.name == name
                && o.interval.to_string() == interval
                && o.on_fail == Some(haven_model::OnFail::Block)
        });
        // A demote that failed that way leaves nothing to do; after another failure a
        // ban from the failcount still stops it.
        block && (name == "demote" || !self.failed_out(pi, c.node))
    }

    fn target_stopped(meta: &Meta) -> bool {
        meta.target_role == Some(Role::Stopped)
    }

    /// Is prim `pi` banned from node `n` by its failures?
    fn failed_out(&self, pi: usize, n: usize) -> bool {
        let p = &self.prims[pi];
        let Some(&(count, last)) = p.fails.get(&n) else {
            return false;
        };
        if count == 0 {
            return false;
        }
        let threshold = p
            .meta
            .migration_threshold
            .unwrap_or(haven_model::INFINITY as u32);
        if threshold == 0 || count < threshold {
            return false;
        }
        if let Some(t) = p.meta.failure_timeout.filter(|t| *t > 0) {
            // Without a clock the failure is as old as can be: expired.
            match (self.st.now, last) {
                (Some(now), Some(last)) if last + t as i64 > now => {}
                _ => return false,
            }
        }
        true
    }

    /// Location constraint scores of `ids` on node `n` for placement (`promoted` false)
    /// or promotion (`promoted` true). None when no constraint speaks of the node.
    fn location(&self, ids: &[&str], n: usize, promoted: bool) -> Option<Score> {
        let mut total: Option<Score> = None;
        let node = &self.nodes[n];
        for id in ids {
            let Some(ls) = self.locs.get(id) else {
                continue;
            };
            for l in ls {
                let l_promoted = l.role == Some(Role::Promoted);
                if let Some(ln) = &l.node {
                    if l_promoted != promoted || ln != node.name {
                        continue;
                    }
                    total = Some(total.unwrap_or_default() + l.score.unwrap_or_default());
                    continue;
                }
                for r in &l.rules {
                    let r_promoted = r.role.or(l.role) == Some(Role::Promoted);
                    if r_promoted != promoted || !eval_rule(r, &node.attrs) {
                        continue;
                    }
                    let sc = match &r.score_attribute {
                        Some(a) => match node.attrs.get(a).and_then(|v| v.parse::<Score>().ok()) {
                            Some(s) => s,
                            None => continue,
                        },
                        None => r.score.unwrap_or_default(),
                    };
                    total = Some(total.unwrap_or_default() + sc);
                }
            }
        }
        total
    }

    fn base_weights(&self, u: usize) -> Vec<Score> {
        match self.base.get(u) {
            Some(Some(w)) => w.clone(),
            _ => self.compute_base_weights(u),
        }
    }

    fn compute_base_weights(&self, u: usize) -> Vec<Score> {
        self.compute_base_weights_upto(u, usize::MAX)
    }

    /// Base weights counting the failure bans of the first `banned` members only.
    fn compute_base_weights_upto(&self, u: usize, banned: usize) -> Vec<Score> {
        let unit = &self.units[u];
        let symmetric = self.cfg.options.symmetric_cluster;
        (0..self.nodes.len())
            .map(|n| {
                let loc = self.location(&unit.ids, n, false);
                let mut w = match (symmetric, loc) {
                    (true, l) => l.unwrap_or_default(),
                    (false, Some(l)) => l,
                    (false, None) => NEG,
                };
                w += self.nodes[n].health;
                for (m, &pi) in unit.prims.iter().enumerate() {
                    let p = self.prims[pi].cfg;
                    if let Some(h) = &p.home
                        && h == self.nodes[n].name
                    {
                        w += if p.failback {
                            HOME_FAILBACK
                        } else {
                            Score::new(1)
                        };
                    }
                    if m < banned && self.failed_out(pi, n) {
                        w = NEG;
                    }
                    if self.prims[pi].locked_to.is_some_and(|l| l != n) {
                        w = NEG;
                    }
                }
                w
            })
            .collect()
    }

    /// Nodes where unit `p` is placed in `role` (None: any role).
    fn nodes_of(&self, p: usize, role: Option<Role>) -> Option<Vec<usize>> {
        let insts = self.placed[p].as_ref()?;
        Some(
            insts
                .iter()
                .filter_map(|i| {
                    let n = i.node?;
                    if self.units[p].prims.iter().any(|&pi| {
                        self.prims[pi]
                            .cur
                            .iter()
                            .any(|c| c.node == n && self.blocked_failure(pi, c))
                    }) {
                        return None;
                    }
                    match role {
                        Some(Role::Promoted) if !i.promoted => None,
                        Some(Role::Unpromoted) if i.promoted => None,
                        _ => Some(n),
                    }
                })
                .collect(),
        )
    }

    fn apply_colocations(&self, u: usize, w: &mut [Score]) {
        for &ci in &self.dep_of[u] {
            let c = &self.colocs[ci];
            if matches!(c.dep_role, Some(Role::Promoted) | Some(Role::Unpromoted))
                && self.units[u].clone.as_ref().is_some_and(|s| s.promotable)
            {
                continue; // a role-specific constraint: applied at promotion
            }
            let Some(on) = self.nodes_of(c.primary, c.primary_role) else {
                continue;
            };
            let on = self.same_attr_nodes(on, c.attr);
            if c.score.is_pos_inf() {
                for (n, x) in w.iter_mut().enumerate() {
                    if !on.contains(&n) {
                        *x = NEG;
                    }
                }
            } else {
                for &n in &on {
                    w[n] += c.score;
                }
            }
        }
    }

    /// Preferences of unit `d` by itself (location and stickiness), for the units it
    /// is colocated with.
    fn own_prefs(&self, d: usize) -> Vec<Score> {
        let mut w = self.base_weights(d);
        for &pi in &self.units[d].prims {
            for c in &self.prims[pi].cur {
                if self.units[d].kind != Kind::Clone {
                    w[c.node] += self.stickiness(pi);
                }
            }
        }
        w
    }

    /// [`Self::own_prefs`] with the nodes ruled out for what must run with `d`
    /// (INFINITY colocations, transitively): a group whose member failed on a node
    /// cannot run there, and neither can what it must run with. A dependent that could
    /// then run nowhere is given up rather than ruling out every node.
    fn own_prefs_with_dependents(&self, d: usize, depth: u32) -> Vec<Score> {
        let mut w = self.own_prefs(d);
        if depth > 4 {
            return w;
        }
        for &ci in &self.prim_of[d] {
            let c = &self.colocs[ci];
            if self.placed[c.dep].is_some()
                || !c.score.is_pos_inf()
                || c.attr.is_some()
                || c.primary_role.is_some_and(|r| r != Role::Started)
                || self.units[c.dep].kind == Kind::Clone
            {
                continue;
            }
            let sub = self.own_prefs_with_dependents(c.dep, depth + 1);
            let runnable = |v: &[Score], x: usize| !v[x].is_neg_inf() && self.nodes[x].can_run;
            if !(0..sub.len()).any(|x| runnable(&sub, x)) {
                continue;
            }
            let ruled: Vec<Score> = w
                .iter()
                .zip(&sub)
                .map(|(a, b)| if b.is_neg_inf() { NEG } else { *a })
                .collect();
            if (0..ruled.len()).any(|x| runnable(&ruled, x)) {
                w = ruled;
            }
        }
        w
    }

    /// A clone's score per node for its instances: its locations and colocations, and
    /// the pull of what must run with it (and what must run with that) toward the
    /// nodes those prefer.
    fn clone_weights(&self, u: usize) -> Vec<Score> {
        self.clone_weights_from(u, self.base_weights(u))
    }

    /// [`Self::clone_weights`] from given base weights.
    fn clone_weights_from(&self, u: usize, mut w: Vec<Score>) -> Vec<Score> {
        self.apply_colocations(u, &mut w);
        for &ci in &self.prim_of[u] {
            let c = &self.colocs[ci];
            if self.placed[c.dep].is_some()
                || c.score <= Score::ZERO
                || matches!(c.primary_role, Some(Role::Promoted | Role::Unpromoted))
                || self.units[c.dep].kind == Kind::Clone
            {
                continue;
            }
            let prefs = self.chain_prefs(c.dep, 0);
            for (n, p) in prefs.iter().enumerate() {
                if *p > Score::ZERO && !p.is_pos_inf() && !w[n].is_neg_inf() {
                    w[n] += p.scale(c.score);
                }
            }
        }
        w
    }

    /// Unit `d`'s own preferences plus the positive ones of the unplaced resources that
    /// must run with it, transitively (a few levels deep).
    fn chain_prefs(&self, d: usize, depth: u32) -> Vec<Score> {
        let mut w = self.own_prefs(d);
        if depth > 4 {
            return w;
        }
        for &ci in &self.prim_of[d] {
            let c = &self.colocs[ci];
            if self.placed[c.dep].is_some()
                || c.score <= Score::ZERO
                || matches!(c.primary_role, Some(Role::Promoted | Role::Unpromoted))
                || self.units[c.dep].kind == Kind::Clone
            {
                continue;
            }
            for (n, p) in self.chain_prefs(c.dep, depth + 1).iter().enumerate() {
                if *p > Score::ZERO && !p.is_pos_inf() && !w[n].is_neg_inf() {
                    w[n] += p.scale(c.score);
                }
            }
        }
        w
    }

    fn apply_dependents(&self, u: usize, w: &mut [Score]) {
        for &ci in &self.prim_of[u] {
            let c = &self.colocs[ci];
            if self.placed[c.dep].is_some()
                || c.score.is_neg_inf()
                || self.units[c.dep].kind == Kind::Clone
            {
                continue;
            }
            if c.primary_role == Some(Role::Promoted) {
                continue;
            }
            let prefs = self.own_prefs_with_dependents(c.dep, 0);
            // A dependent that can run nowhere adds nothing.
            if !prefs
                .iter()
                .enumerate()
                .any(|(n, s)| !s.is_neg_inf() && self.nodes[n].can_run)
            {
                continue;
            }
            for (n, s) in prefs.iter().enumerate() {
                if *s > Score::ZERO && !s.is_neg_inf() {
                    w[n] += s.scale(c.score);
                }
            }
            // What must run with it rules out the nodes it can never run on, unless
            // that would leave no node at all (then that dependent is given up).
            if c.score.is_pos_inf() {
                let before = w.to_vec();
                let usable: Vec<usize> = (0..prefs.len())
                    .filter(|&m| !prefs[m].is_neg_inf() && self.nodes[m].can_run)
                    .collect();
                let usable = self.same_attr_nodes(usable, c.attr);
                for (n, s) in prefs.iter().enumerate() {
                    let ruled_out = match c.attr {
                        None => s.is_neg_inf(),
                        Some(_) => !usable.contains(&n),
                    };
                    if ruled_out {
                        w[n] = NEG;
                    }
                }
                let any = (0..w.len()).any(|n| self.nodes[n].can_run && !w[n].is_neg_inf());
                if !any {
                    w.copy_from_slice(&before);
                }
            }
        }
    }

    /// With a node attribute, every node sharing a value of it with one of `on`
    /// (nodes without the attribute match nothing); without, `on` itself.
    fn same_attr_nodes(&self, on: Vec<usize>, attr: Option<&str>) -> Vec<usize> {
        let Some(a) = attr else {
            return on;
        };
        let values: Vec<&String> = on
            .iter()
            .filter_map(|&n| self.nodes[n].attrs.get(a))
            .collect();
        (0..self.nodes.len())
            .filter(|&m| {
                self.nodes[m]
                    .attrs
                    .get(a)
                    .is_some_and(|v| values.contains(&v))
            })
            .collect()
    }

    fn fits(&self, n: usize, need: &BTreeMap<String, i64>) -> bool {
        let Some(cap) = self.nodes[n].capacity.as_ref() else {
            return true;
        };
        need.iter().all(|(k, v)| {
            let have = cap.get(k).copied().unwrap_or(0);
            let used = self.used[n].get(k).copied().unwrap_or(0);
            used + v <= have
        })
    }

    fn unit_util(&self, u: usize) -> BTreeMap<String, i64> {
        let mut m = BTreeMap::new();
        for &pi in &self.units[u].prims {
            for (k, v) in &self.prims[pi].cfg.utilization {
                *m.entry(k.clone()).or_insert(0) += v;
            }
        }
        m
    }

    /// Add the utilization of everything that must run with `u` (transitively).
    fn add_dependent_util(
        &self,
        u: usize,
        need: &mut BTreeMap<String, i64>,
        seen: &mut Vec<usize>,
    ) {
        for &ci in &self.prim_of[u] {
            let c = &self.colocs[ci];
            if !c.score.is_pos_inf()
                || self.placed[c.dep].is_some()
                // One being placed checks its own room once this one has its node.
                || self.busy.get(c.dep).copied().unwrap_or(false)
                || self.units[c.dep].kind == Kind::Clone
                || seen.contains(&c.dep)
            {
                continue;
            }
            seen.push(c.dep);
            for (k, v) in self.unit_util(c.dep) {
                *need.entry(k).or_insert(0) += v;
            }
            self.add_dependent_util(c.dep, need, seen);
        }
    }

    fn take(&mut self, n: usize, u: usize) {
        self.load[n] += self.units[u].prims.len() as u32;
        if self.nodes[n].capacity.is_some() {
            for (k, v) in self.unit_util(u) {
                *self.used[n].entry(k).or_insert(0) += v;
            }
        }
    }

    fn free_capacity(&self, n: usize) -> i64 {
        let Some(cap) = self.nodes[n].capacity.as_ref() else {
            return 0;
        };
        cap.iter()
            .map(|(k, v)| v - self.used[n].get(k).copied().unwrap_or(0))
            .sum()
    }

    /// The best node: highest score; then the current node; then the least loaded.
    fn choose(
        &self,
        w: &[Score],
        cur: Option<usize>,
        need: &BTreeMap<String, i64>,
        extra_load: &[u32],
    ) -> Option<usize> {
        let balanced = self.cfg.options.placement_strategy == PlacementStrategy::Balanced;
        // `minimal` packs resources onto as few nodes as possible: no spreading by load.
        let minimal = self.cfg.options.placement_strategy == PlacementStrategy::Minimal;
        let mut best: Option<usize> = None;
        for n in 0..self.nodes.len() {
            if !self.nodes[n].can_run || w[n].is_neg_inf() || !self.fits(n, need) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => {
                    if w[n] != w[b] {
                        w[n] > w[b]
                    } else if extra_load.get(n) != extra_load.get(b) {
                        extra_load.get(n) < extra_load.get(b)
                    } else if balanced && self.free_capacity(n) != self.free_capacity(b) {
                        self.free_capacity(n) > self.free_capacity(b)
                    } else if !minimal && self.load[n] != self.load[b] {
                        self.load[n] < self.load[b]
                    } else if cur == Some(n) || cur == Some(b) {
                        cur == Some(n)
                    } else {
                        self.nodes[n].name < self.nodes[b].name
                    }
                }
            };
            if better {
                best = Some(n);
            }
        }
        best
    }

    fn place_all(&mut self) {
        self.base = (0..self.units.len())
            .map(|u| Some(self.compute_base_weights(u)))
            .collect();
        // Higher priority first; then, under a utilization placement strategy, resources
        // that are well placed where they run (they keep their nodes) before ones that
        // must find a new home; then definition order.
        let keys: Vec<(i64, Score)> = (0..self.units.len())
            .map(|u| {
                let w = self.base_weights(u);
                let here = match self.unit_current(u) {
                    Some(n) if self.units[u].kind != Kind::Clone => {
                        let stick: Score = self.units[u]
                            .prims
                            .iter()
                            .filter(|&&pi| self.prims[pi].cur.iter().any(|c| c.node == n))
                            .map(|&pi| self.stickiness(pi))
                            .fold(Score::ZERO, |a, b| a + b);
                        if self.nodes[n].can_run && self.fits(n, &self.unit_util(u)) {
                            w[n] + stick
                        } else {
                            NEG
                        }
                    }
                    _ => w
                        .iter()
                        .enumerate()
                        .filter(|(n, _)| self.nodes[*n].can_run)
                        .map(|(_, s)| *s)
                        .max()
                        .unwrap_or(NEG),
                };
                let here = if self.cfg.options.placement_strategy == PlacementStrategy::Default {
                    Score::ZERO
                } else {
                    here
                };
                (self.units[u].meta.priority.unwrap_or(0), here)
            })
            .collect();
        let mut order: Vec<usize> = (0..self.units.len()).collect();
        order.sort_by_key(|&u| {
            (
                std::cmp::Reverse(keys[u].0),
                std::cmp::Reverse(keys[u].1),
                self.units[u].doc_order,
            )
        });
        self.busy = vec![false; self.units.len()];
        for u in order {
            self.place(u);
        }
    }

    fn place(&mut self, u: usize) {
        if self.placed[u].is_some() || self.busy[u] {
            return;
        }
        self.busy[u] = true;
        // What it is colocated with goes first, higher priority first.
        let mut primaries: Vec<usize> = self.dep_of[u]
            .iter()
            .map(|&c| self.colocs[c].primary)
            .collect();
        primaries.sort_by_key(|&p| std::cmp::Reverse(self.units[p].meta.priority.unwrap_or(0)));
        for p in primaries {
            self.place(p);
        }
        let insts = if self.units[u].kind == Kind::Clone {
            self.place_clone(u)
        } else {
            self.place_single(u)
        };
        self.placed[u] = Some(insts);
        self.busy[u] = false;
    }

    fn record_scores(&mut self, u: usize, w: &[Score]) {
        self.scores.push((self.units[u].id.to_string(), w.to_vec()));
    }

    fn unit_current(&self, u: usize) -> Option<usize> {
        self.units[u]
            .prims
            .iter()
            .find_map(|&pi| self.prims[pi].cur.first().map(|c| c.node))
    }

    fn members_ok(&self, u: usize, n: usize, w_own: bool) -> Vec<bool> {
        let mut ok = true;
        self.units[u]
            .prims
            .iter()
            .map(|&pi| {
                let p = &self.prims[pi];
                if Self::target_stopped(&p.meta) || self.failed_out(pi, n) {
                    ok = false;
                }
                if w_own {
                    let own = self.location(&[p.cfg.id.as_str()], n, false);
                    if own.is_some_and(|s| s.is_neg_inf()) {
                        ok = false;
                    }
                }
                ok
            })
            .collect()
    }

    fn place_single(&mut self, u: usize) -> Vec<Inst> {
        let cur = self.unit_current(u);
        let first = self.units[u].prims[0];
        let n_members = self.units[u].prims.len();
        let unmanaged = self.units[u].prims.iter().any(|&pi| !self.managed(pi));
        // On a node in maintenance its resources are left exactly as they are.
        let frozen = cur.is_some_and(|n| {
            !self.nodes[n].can_run
                && self.nodes[n].fence.is_none()
                && self.nodes[n].counts
                && self.node_maintenance(n)
        });
        if unmanaged || frozen {
            if let Some(n) = cur {
                self.take(n, u);
            }
            // Members after a blocked failure cannot stay: they depend on it. Nor can
            // managed members start where the group's colocations forbid it.
            let mut w = self.base_weights(u);
            self.apply_colocations(u, &mut w);
            let disabled = Self::target_stopped(&self.units[u].meta) && !frozen;
            let mut ok = !disabled
                && (cur.is_some_and(|n| !w[n].is_neg_inf() && self.nodes[n].can_run) || frozen);
            let mut any_blocked = false;
            let member_ok = self.units[u]
                .prims
                .iter()
                .map(|&pi| {
                    let here = ok || !self.managed(pi);
                    let blocked = self.prims[pi]
                        .cur
                        .iter()
                        .any(|c| self.blocked_failure(pi, c));
                    any_blocked |= blocked;
                    // An unmanaged member that is not running will not start either.
                    if blocked || !self.managed(pi) && self.prims[pi].cur.is_empty() {
                        ok = false;
                    }
                    here
                })
                .collect();
            return vec![Inst {
                number: None,
                cur_node: cur,
                node: cur,
                promoted: false,
                member_ok,
                restart: false,
                // A disabled group with a blocked member cannot stop the others either:
                // they stop only after it (shown, not carried out).
                blocked: disabled && any_blocked,
            }];
        }
        let mut w = self.base_weights(u);
        for &pi in &self.units[u].prims.clone() {
            for c in self.prims[pi].cur.clone() {
                w[c.node] += self.stickiness(pi);
            }
        }
        // A node its own preferences (location, health, stickiness) score below zero
        // is not one it may be placed on; colocations only rank the others.
        let own = w.clone();
        self.apply_dependents(u, &mut w);
        self.apply_colocations(u, &mut w);
        for (x, o) in w.iter_mut().zip(&own) {
            if *o < Score::ZERO {
                *x = NEG;
            }
        }
        self.record_scores(u, &w);
        let stopped = Self::target_stopped(&self.units[u].meta)
            || Self::target_stopped(&self.prims[first].meta)
            || self.units[u]
                .prims
                .iter()
                .any(|&pi| self.multi(pi) == Some(MultipleActive::StopOnly));
        // Whatever must run with it has to fit on the same node (if that fits anywhere).
        let own_need = self.unit_util(u);
        let mut need = own_need.clone();
        let mut seen = vec![u];
        self.add_dependent_util(u, &mut need, &mut seen);
        let stuck = cur.is_some_and(|n| self.stuck_node(n)) && self.cfg.options.stonith_enabled;
        let node = if stopped || stuck {
            None
        } else {
            self.choose(&w, cur, &need, &[])
                .or_else(|| self.choose(&w, cur, &own_need, &[]))
        };
        // A group that can run nowhere with all its members keeps its first members
        // running where they can: the later, failed ones stop.
        let mut node = node;
        if node.is_none() && !stopped && self.units[u].kind == Kind::Group {
            for k in (1..n_members).rev() {
                let mut w = self.compute_base_weights_upto(u, k);
                for &pi in &self.units[u].prims {
                    for c in &self.prims[pi].cur {
                        w[c.node] += self.stickiness(pi);
                    }
                }
                self.apply_colocations(u, &mut w);
                node = self.choose(&w, cur, &own_need, &[]);
                if node.is_some() {
                    break;
                }
            }
        }
        let member_ok = match node {
            Some(n) => self.members_ok(u, n, true),
            None => vec![false; n_members],
        };
        if let Some(n) = node {
            // Members that cannot run there take no share of it.
            let idle = member_ok.iter().filter(|&&ok| !ok).count() as u32;
            self.take(n, u);
            self.load[n] -= idle;
        }
        vec![Inst {
            number: None,
            cur_node: cur,
            node,
            promoted: false,
            member_ok,
            restart: false,
            blocked: false,
        }]
    }

    /// A node that is lost and cannot be fenced now (no quorum, or fencing is off):
    /// what runs there can neither be stopped nor safely started elsewhere.
    fn stuck_node(&self, n: usize) -> bool {
        self.nodes[n].unclean && self.nodes[n].fence.is_none()
    }

    fn node_maintenance(&self, n: usize) -> bool {
        let name = self.nodes[n].name;
        let cfgm = self
            .cfg
            .nodes
            .iter()
            .find(|x| x.name == name)
            .is_some_and(|x| x.maintenance);
        self.st
            .nodes
            .get(name)
            .and_then(|x| x.maintenance)
            .unwrap_or(cfgm)
    }

    fn place_clone(&mut self, u: usize) -> Vec<Inst> {
        let n_nodes = self.nodes.len();
        let n_members = self.units[u].prims.len();
        let Some(spec) = self.units[u].clone.as_ref() else {
            return Vec::new();
        };
        let (max, node_max, unique) = (spec.max, spec.node_max, spec.unique);
        // Current instances: one per node holding any member (anonymous), or per
        // instance number (globally unique).
        let mut current: BTreeMap<(u32, usize), ()> = BTreeMap::new();
        let mut next_free = 0u32;
        let mut per_node_seen: HashMap<usize, Vec<u32>> = HashMap::new();
        for &pi in &self.units[u].prims {
            for c in &self.prims[pi].cur {
                let num = c
                    .key
                    .rsplit_once(':')
                    .and_then(|(_, n)| n.parse::<u32>().ok());
                let seen = per_node_seen.entry(c.node).or_default();
                if !unique && !seen.is_empty() && pi != self.units[u].prims[0] {
                    continue;
                }
                let num = match num {
                    Some(x) if !current.keys().any(|(k, _)| *k == x) => x,
                    _ => {
                        if !unique && !seen.is_empty() {
                            continue;
                        }
                        while current.keys().any(|(k, _)| *k == next_free) {
                            next_free += 1;
                        }
                        next_free
                    }
                };
                seen.push(num);
                current.insert((num, c.node), ());
            }
        }
        let unmanaged = self.units[u].prims.iter().any(|&pi| !self.managed(pi));
        // The child's own target role, if set, overrides the clone's (which it inherits).
        let stopped = self.units[u]
            .prims
            .first()
            .is_some_and(|&p| Self::target_stopped(&self.prims[p].meta));
        let w = self.clone_weights(u);
        self.record_scores(u, &w);
        // A clone of a group whose later members failed on a node keeps an instance
        // there with the members before the failed one, as a lone group does, but only
        // once no node could take it whole.
        let mut levels = vec![w];
        if !unmanaged && self.units[u].kind == Kind::Clone && n_members > 1 {
            for k in (1..n_members).rev() {
                let base = self.compute_base_weights_upto(u, k);
                levels.push(self.clone_weights_from(u, base));
            }
        }
        let mut per_node = vec![0usize; n_nodes];
        let mut insts: Vec<Inst> = Vec::new();
        let mut leftovers: Vec<(u32, usize)> = current.keys().copied().collect();
        for w in &levels {
            let allowed = |s: &Sched<'_>, n: usize| s.nodes[n].can_run && !w[n].is_neg_inf();
            let mut cur_list = std::mem::take(&mut leftovers);
            cur_list.sort_by_key(|&(num, n)| (std::cmp::Reverse(w[n]), num));
            // Clones are a little sticky by default, so instances do not shuffle.
            let stick = self.units[u]
                .prims
                .first()
                .and_then(|&p| self.prims[p].meta.resource_stickiness)
                .unwrap_or(Score::new(1).max(self.cfg.options.resource_stickiness));
            // At first each node keeps only its fair share of current instances; the rest
            // are placed with the new ones (their own node still favoured by stickiness), so
            // instances spread out instead of piling up.
            let avail_nodes = (0..n_nodes).filter(|&x| allowed(self, x)).count();
            let fair = max.checked_div(avail_nodes).unwrap_or(0);
            for (num, n) in cur_list {
                let keep = if unmanaged {
                    true
                } else {
                    !stopped
                        && allowed(self, n)
                        && per_node[n] < node_max
                        && insts.len() < max
                        && self.fits(n, &self.unit_util(u))
                        && per_node[n] < fair
                };
                if keep {
                    per_node[n] += 1;
                    self.take(n, u);
                    let member_ok = if unmanaged {
                        vec![true; n_members]
                    } else {
                        self.members_ok(u, n, true)
                    };
                    insts.push(Inst {
                        number: Some(num),
                        cur_node: Some(n),
                        node: Some(n),
                        promoted: false,
                        member_ok,
                        restart: false,
                        blocked: false,
                    });
                } else {
                    leftovers.push((num, n));
                }
            }
            if !unmanaged && !stopped {
                let need = self.unit_util(u);
                // An instance needs room for an instance of what must run with it too (when
                // some node has that much).
                let mut need_all = need.clone();
                for &ci in &self.prim_of[u] {
                    let c = &self.colocs[ci];
                    if c.score.is_pos_inf()
                        && self.placed[c.dep].is_none()
                        && !self.busy.get(c.dep).copied().unwrap_or(false)
                    {
                        for (k, v) in self.unit_util(c.dep) {
                            *need_all.entry(k).or_insert(0) += v;
                        }
                    }
                }
                while insts.len() < max {
                    // An anonymous instance on a node being fenced dies with it; it does not
                    // move. A globally unique one keeps its identity and moves on.
                    let mover_ix = leftovers
                        .iter()
                        .position(|&(_, cn)| unique || self.nodes[cn].fence.is_none());
                    let mover = mover_ix.map(|i| leftovers[i].1);
                    let avail: Vec<Score> = (0..n_nodes)
                        .map(|n| {
                            if per_node[n] >= node_max {
                                NEG
                            } else if Some(n) == mover {
                                w[n] + stick
                            } else {
                                w[n]
                            }
                        })
                        .collect();
                    let spread: Vec<u32> = per_node.iter().map(|&c| c as u32).collect();
                    let Some(n) = self
                        .choose(&avail, mover, &need_all, &spread)
                        .or_else(|| self.choose(&avail, mover, &need, &spread))
                    else {
                        break;
                    };
                    if !allowed(self, n) {
                        break;
                    }
                    per_node[n] += 1;
                    self.take(n, u);
                    let member_ok = self.members_ok(u, n, true);
                    // A displaced instance moves; otherwise a new instance starts.
                    let (num, cur_node) = if let Some(i) = mover_ix {
                        let (num, cn) = leftovers.remove(i);
                        (num, Some(cn))
                    } else {
                        let mut k = 0u32;
                        while insts.iter().any(|i| i.number == Some(k))
                            || current.keys().any(|(x, _)| *x == k)
                        {
                            k += 1;
                        }
                        (k, None)
                    };
                    insts.push(Inst {
                        number: Some(num),
                        cur_node,
                        node: Some(n),
                        promoted: false,
                        member_ok,
                        restart: false,
                        blocked: false,
                    });
                }
            }
        }
        for (num, n) in leftovers {
            insts.push(Inst {
                number: Some(num),
                cur_node: Some(n),
                node: None,
                promoted: false,
                member_ok: vec![false; n_members],
                restart: false,
                blocked: false,
            });
        }
        insts.sort_by_key(|i| i.number);
        if self.units[u].clone.as_ref().is_some_and(|s| s.promotable) {
            self.promote(u, &mut insts);
        }
        insts
    }

    fn promotion_attr(&self, u: usize, n: usize, num: Option<u32>) -> Option<Score> {
        let attrs = &self.nodes[n].attrs;
        let mut found: Option<Score> = None;
        for &pi in &self.units[u].prims {
            let id = &self.prims[pi].cfg.id;
            let mut names = vec![format!("master-{id}"), format!("promotion-{id}")];
            // An anonymous copy's score may be kept under the number it had when it
            // was recorded here, which need not be the instance number it gets now.
            let unique = self.units[u].clone.as_ref().is_some_and(|c| c.unique);
            if !unique {
                for c in self.prims[pi].cur.iter().filter(|c| c.node == n) {
                    if let Some((_, k)) = c.key.rsplit_once(':') {
                        names.insert(0, format!("master-{id}:{k}"));
                        names.insert(1, format!("promotion-{id}:{k}"));
                    }
                }
            }
            if let Some(k) = num {
                names.insert(0, format!("master-{id}:{k}"));
                names.insert(1, format!("promotion-{id}:{k}"));
            }
            for nm in names {
                if let Some(v) = attrs.get(&nm).and_then(|v| v.parse::<Score>().ok()) {
                    found = Some(found.unwrap_or_default() + v);
                    break;
                }
            }
        }
        found
    }

    fn currently_promoted(&self, u: usize, n: usize) -> bool {
        self.units[u].prims.iter().any(|&pi| {
            self.prims[pi]
                .cur
                .iter()
                .any(|c| c.node == n && c.role == Role::Promoted)
        })
    }

    fn promote(&mut self, u: usize, insts: &mut [Inst]) {
        let Some(spec) = self.units[u].clone.as_ref() else {
            return;
        };
        let (pmax, pnode_max) = (spec.promoted_max, spec.promoted_node_max);
        let target = self.units[u].meta.target_role;
        if matches!(target, Some(Role::Unpromoted) | Some(Role::Started))
            && target == Some(Role::Unpromoted)
        {
            return;
        }
        if !self.cfg.nodes.is_empty()
            && !self.st.have_quorum
            && self.cfg.options.no_quorum_policy == NoQuorumPolicy::Demote
        {
            return;
        }
        let mut cands: Vec<(Score, bool, bool, usize, usize)> = Vec::new();
        for (i, inst) in insts.iter().enumerate() {
            let Some(n) = inst.node else { continue };
            if inst.member_ok.iter().any(|ok| !ok) {
                continue;
            }
            let attr = self.promotion_attr(u, n, inst.number);
            let mut s = attr.unwrap_or_default();
            let loc = self.location(&self.units[u].ids, n, true);
            if let Some(l) = loc {
                s += l;
            }
            // A promoted role that must be with something running here makes this
            // instance a candidate.
            let mut drawn = false;
            for &ci in &self.dep_of[u] {
                let c = &self.colocs[ci];
                if c.dep_role != Some(Role::Promoted) {
                    continue;
                }
                let Some(on) = self.nodes_of(c.primary, c.primary_role) else {
                    continue;
                };
                let on = self.same_attr_nodes(on, c.attr);
                if c.score.is_pos_inf() {
                    if !on.contains(&n) {
                        s = NEG;
                    } else {
                        drawn = true;
                    }
                } else if on.contains(&n) {
                    s += c.score;
                }
            }
            // What must run with the promoted instance pulls the promotion toward where
            // it can run (and away from where it cannot).
            for &ci in &self.prim_of[u] {
                let c = &self.colocs[ci];
                if c.primary_role != Some(Role::Promoted)
                    || c.score.is_neg_inf()
                    || self.units[c.dep].kind == Kind::Clone
                {
                    continue;
                }
                // As Pacemaker rolls back a dependent's scores that would leave the
                // primary nowhere to go: judged where this clone has copies, so a
                // guest banned from every replica (failures) does not take the
                // volume's promotion with it just because it could run elsewhere.
                let prefs = self.own_prefs_with_dependents(c.dep, 0);
                if !insts
                    .iter()
                    .filter_map(|i| i.node)
                    .any(|x| !prefs[x].is_neg_inf() && self.nodes[x].can_run)
                {
                    continue;
                }
                s += prefs[n].scale(c.score);
            }
            let was = self.currently_promoted(u, n);
            // Of equal candidates, one being recovered here comes last.
            let failed_here = (0..self.units[u].prims.len()).any(|m| {
                self.inst_member_cur(u, inst, m)
                    .is_some_and(|c| c.failed && c.node == n)
            });
            // Only a promotion score or a promoted-role location makes an instance a
            // candidate; colocations merely rank the candidates.
            let has_pref = attr.is_some() || loc.is_some_and(|l| l > Score::ZERO) || drawn;
            if s < Score::ZERO || !has_pref {
                continue;
            }
            cands.push((s, was, failed_here, n, i));
        }
        // Then the node the clone itself (with what must run with it) prefers.
        let pull = self.clone_weights(u);
        cands.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then(b.1.cmp(&a.1))
                .then(a.2.cmp(&b.2))
                .then(pull[b.3].cmp(&pull[a.3]))
                .then(a.3.cmp(&b.3))
        });
        let mut per_node: HashMap<usize, usize> = HashMap::new();
        // A copy promoted on a lost node that cannot be fenced may still be promoted
        // there: it holds its promotion slot.
        let mut count = if self.cfg.options.stonith_enabled {
            self.units[u].prims.first().map_or(0, |&pi| {
                self.prims[pi]
                    .cur
                    .iter()
                    .filter(|c| c.role == Role::Promoted && self.stuck_node(c.node))
                    .count()
            })
        } else {
            0
        };
        for (_, _, _, n, i) in cands {
            if count >= pmax {
                break;
            }
            let c = per_node.entry(n).or_default();
            if *c >= pnode_max {
                continue;
            }
            *c += 1;
            count += 1;
            insts[i].promoted = true;
        }
    }

    fn promotable(&self, u: usize) -> bool {
        self.units[u].clone.as_ref().is_some_and(|s| s.promotable)
    }

    /// Of several active copies of a resource that may run once, the one that counts as
    /// "the" current copy: the one where it will run, if any.
    fn primary_cur(&self, pi: usize, node: Option<usize>) -> Option<&Cur<'a>> {
        let cur = &self.prims[pi].cur;
        // Found active where it should run once, it is taken to run where it was
        // reported first: the others are the unexpected copies. The target of an
        // unfinished migration is reported with its source, ahead of it. Reported
        // together, the copy where it is to run is the one kept.
        if self.multi(pi).is_some() {
            let rank = |c: &Cur<'_>| {
                cur.iter()
                    .filter(|d| {
                        d.status.migration.as_ref().is_some_and(|m| {
                            !m.completed && m.target == self.nodes[c.node].name && d.node != c.node
                        })
                    })
                    .map(|d| (d.status.seen, 0))
                    .min()
                    .unwrap_or((c.status.seen, 1))
            };
            return cur
                .iter()
                .filter(|c| self.nodes[c.node].fence.is_none())
                .min_by_key(|c| (rank(c), Some(c.node) != node));
        }
        cur.iter()
            .find(|c| Some(c.node) == node)
            .or_else(|| cur.first())
    }

    /// The current status of member `pi` of an instance on `node`.
    fn member_cur(
        &self,
        pi: usize,
        node: Option<usize>,
        number: Option<u32>,
        unique: bool,
    ) -> Option<&Cur<'a>> {
        let n = node?;
        let p = &self.prims[pi];
        if unique {
            let k = number?;
            p.cur.iter().find(|c| {
                c.node == n
                    && c.key
                        .rsplit_once(':')
                        .and_then(|(_, x)| x.parse::<u32>().ok())
                        == Some(k)
            })
        } else {
            // Several anonymous copies on one node: the one recorded under this
            // instance's number, if any.
            let number_of = |c: &Cur<'_>| {
                c.key
                    .rsplit_once(':')
                    .and_then(|(_, x)| x.parse::<u32>().ok())
            };
            let here = || p.cur.iter().filter(|c| c.node == n);
            if here().count() > 1
                && let Some(c) = here().find(|c| number.is_some() && number_of(c) == number)
            {
                return Some(c);
            }
            here().next()
        }
    }

    /// The current copy of member `m` of an instance.
    fn inst_member_cur(&self, u: usize, inst: &Inst, m: usize) -> Option<&Cur<'a>> {
        let pi = self.units[u].prims[m];
        let unique = self.units[u].clone.as_ref().is_some_and(|s| s.unique);
        if self.units[u].kind == Kind::Clone {
            self.member_cur(pi, inst.cur_node, inst.number, unique)
        } else if inst.cur_node.is_none() {
            // Nothing of it runs anywhere (or this is its blocked start beside the copy
            // that stops).
            None
        } else {
            self.primary_cur(pi, inst.node)
        }
    }

    /// A change of definition that applies to member `m` staying on its node.
    fn definition_change(&self, u: usize, inst: &Inst, m: usize) -> Option<DefinitionChange> {
        let c = self.inst_member_cur(u, inst, m)?;
        if inst.node != Some(c.node) || !self.nodes[c.node].can_run {
            return None;
        }
        c.status.definition_changed
    }

    /// Must member `m` restart where it is because its definition changed?
    fn must_restart(&self, u: usize, inst: &Inst, m: usize) -> bool {
        self.definition_change(u, inst, m) == Some(DefinitionChange::Restart)
    }

    /// Per instance member: (had, will) — where it is and will be, with roles.
    fn member_transition(&self, u: usize, inst: &Inst, m: usize) -> (Had, Will) {
        let pi = self.units[u].prims[m];
        let promotable = self.promotable(u);
        let cur = self.inst_member_cur(u, inst, m);
        let had = cur.map(|c| {
            let role = match c.role {
                Role::Started if promotable => Role::Unpromoted,
                Role::Unpromoted if !promotable => Role::Started,
                r => r,
            };
            // Of several copies, any failed one makes the survivor a recovery.
            let failed = c.failed
                || self.units[u].kind != Kind::Clone && self.prims[pi].cur.iter().any(|x| x.failed);
            (c.node, role, failed)
        });
        let will = match inst.node {
            Some(n) if inst.member_ok.get(m).copied().unwrap_or(false) => {
                let role = if !promotable {
                    Role::Started
                } else if inst.promoted {
                    Role::Promoted
                } else {
                    Role::Unpromoted
                };
                Some((n, role))
            }
            _ => None,
        };
        (had, will)
    }

    /// Without quorum (and unless told to ignore that), nothing new starts; what runs
    /// stops (`stop`), or keeps being managed within this partition (`freeze`).
    fn apply_quorum(&mut self) {
        let policy = self.cfg.options.no_quorum_policy;
        if self.st.have_quorum || policy == NoQuorumPolicy::Ignore {
            return;
        }
        for u in 0..self.units.len() {
            let unmanaged = self.units[u].prims.iter().any(|&pi| !self.managed(pi));
            let Some(insts) = self.placed[u].as_mut() else {
                continue;
            };
            if unmanaged {
                continue;
            }
            let is_clone = self.units[u].kind == Kind::Clone;
            let mut extra = Vec::new();
            let mut next_number = insts
                .iter()
                .filter_map(|i| i.number)
                .max()
                .map_or(0, |k| k + 1);
            for i in insts.iter_mut() {
                match i.cur_node {
                    // A clone instance that would move stops, and the start of another
                    // instance in its place is what is blocked.
                    Some(c)
                        if is_clone
                            && policy != NoQuorumPolicy::Freeze
                            && i.node.is_some_and(|n| n != c) =>
                    {
                        let mut started = i.clone();
                        started.cur_node = None;
                        started.number = Some(next_number);
                        started.blocked = true;
                        next_number += 1;
                        extra.push(started);
                        i.node = None;
                    }
                    Some(c) => match policy {
                        // What runs in this partition is still managed; it only may
                        // not start anything new.
                        NoQuorumPolicy::Freeze => {}
                        NoQuorumPolicy::Demote
                            if self.units[u].clone.as_ref().is_some_and(|c| c.promotable) =>
                        {
                            i.node = Some(c);
                            i.promoted = false;
                        }
                        _ => {
                            // Its members that do not run yet would start where it is
                            // placed: blocked, shown beside the stop of the others.
                            if !is_clone && let Some(n) = i.node {
                                let member_ok: Vec<bool> = self.units[u]
                                    .prims
                                    .iter()
                                    .zip(&i.member_ok)
                                    .map(|(&pi, &ok)| ok && self.prims[pi].cur.is_empty())
                                    .collect();
                                if member_ok.iter().any(|&ok| ok) {
                                    extra.push(Inst {
                                        number: None,
                                        cur_node: None,
                                        node: Some(n),
                                        promoted: false,
                                        member_ok,
                                        restart: false,
                                        blocked: true,
                                    });
                                }
                            }
                            i.node = None
                        }
                    },
                    None => {
                        if i.node.is_some() {
                            i.blocked = true;
                        }
                    }
                }
            }
            insts.extend(extra);
        }
    }

    fn apply_orders(&mut self) {
        // Group members: a member that cannot run stops the ones after it, and one that
        // restarts restarts the ones after it (handled when rendering changes).
        for _round in 0..8 {
            let mut changed = false;
            for oi in 0..self.orders.len() {
                let (first, then, fa, ta, mandatory) = {
                    let o = &self.orders[oi];
                    (o.first, o.then, o.first_action, o.then_action, o.mandatory)
                };
                if !mandatory {
                    continue;
                }
                let runnable = self.unit_runnable(first, fa, self.orders[oi].require_all);
                // An interleaved clone's instance is placed only beside an instance of
                // the clone it follows; with none anywhere, a new one is not placed at
                // all (rather than shown blocked).
                let unplaced_if_new = self.units[then].kind == Kind::Clone
                    && self.units[first].kind == Kind::Clone
                    && self.orders[oi].require_all
                    && self.units[first].clone.as_ref().is_some_and(|c| c.min <= 1)
                    && self.units[then]
                        .clone
                        .as_ref()
                        .is_some_and(|c| c.interleave)
                    && fa == OrderAction::Start
                    && ta == OrderAction::Start;
                if !runnable && matches!(ta, OrderAction::Start | OrderAction::Promote) {
                    let symmetrical = self.orders[oi].symmetrical;
                    let mut failed_here = vec![false; self.nodes.len()];
                    for &pi in &self.units[then].prims {
                        for c in &self.prims[pi].cur {
                            if c.failed {
                                failed_here[c.node] = true;
                            }
                        }
                    }
                    let unmanaged = self.units[then].prims.iter().any(|&pi| !self.managed(pi));
                    if let Some(insts) = self.placed[then].as_mut() {
                        for i in insts.iter_mut() {
                            if ta == OrderAction::Promote {
                                if i.promoted {
                                    i.promoted = false;
                                    changed = true;
                                }
                            } else if i.node.is_some() && !i.blocked && !unmanaged {
                                // What already runs may keep running unless the first
                                // stops now; what would start is blocked.
                                match i.cur_node {
                                    Some(c)
                                        if c == i.node.unwrap_or(c)
                                            && !symmetrical
                                            && !failed_here[c] => {}
                                    Some(_) => {
                                        i.node = None;
                                        changed = true;
                                    }
                                    None if unplaced_if_new => {
                                        i.node = None;
                                        changed = true;
                                    }
                                    None => {
                                        i.blocked = true;
                                        changed = true;
                                    }
                                }
                            }
                        }
                    }
                    continue;
                }
                let symmetrical = self.orders[oi].symmetrical;
                let then_clone = self.units[then].kind == Kind::Clone;
                let first_clone = self.units[first].kind == Kind::Clone;
                // With require-all=false the clone that follows depends on the first as
                // a whole, never per node.
                let interleaved = then_clone
                    && self.units[first].kind == Kind::Clone
                    && self.orders[oi].require_all
                    && self.units[then]
                        .clone
                        .as_ref()
                        .is_some_and(|c| c.interleave);
                // An interleaved instance needs the first's instance on its own node:
                // without one there, it does not run.
                // (With clone-min, the first's instances count together instead.)
                if interleaved
                    && self.units[first].clone.as_ref().is_some_and(|c| c.min <= 1)
                    && fa == OrderAction::Start
                    && ta == OrderAction::Start
                {
                    let partners: Vec<usize> = self.placed[first]
                        .as_ref()
                        .map(|v| {
                            v.iter()
                                .filter(|i| !i.blocked && i.member_ok.iter().all(|x| *x))
                                .filter_map(|i| i.node)
                                .collect()
                        })
                        .unwrap_or_default();
                    let unmanaged = self.units[then].prims.iter().any(|&pi| !self.managed(pi));
                    if let Some(insts) = self.placed[then].as_mut()
                        && !unmanaged
                    {
                        for i in insts.iter_mut() {
                            if i.node.is_some_and(|n| !partners.contains(&n)) {
                                i.node = None;
                                changed = true;
                            }
                        }
                    }
                }
                // A clone that follows another as a whole (not interleaved) restarts
                // everywhere when the first starts or stops an instance anywhere; it
                // only waits when it needs no more than a count of the first's
                // instances (require-all=false, clone-min). Interleaved clones follow
                // per node.
                let first_min = self.units[first].clone.as_ref().map_or(0, |c| c.min);
                let collective = then_clone && !interleaved && first_clone;
                if collective && (!self.orders[oi].require_all || first_min > 1) {
                    continue;
                }
                let triggered = |s: &Sched<'_>, node: Option<usize>| match fa {
                    OrderAction::Start => {
                        let (starts, stops) = s.unit_activity(first, node);
                        starts || symmetrical && stops
                    }
                    OrderAction::Promote => {
                        let (promotes, demotes) = s.unit_role_activity(first, node);
                        promotes || symmetrical && demotes
                    }
                    // What must stop after the first stops stops too (and starts again).
                    OrderAction::Stop if ta == OrderAction::Stop => s.unit_activity(first, node).1,
                    _ => false,
                };
                if matches!(ta, OrderAction::Start | OrderAction::Stop) {
                    let any = triggered(self, None);
                    let staying: Vec<usize> =
                        (0..self.placed[then].as_ref().map(|v| v.len()).unwrap_or(0))
                            .filter(|&i| self.inst_stays(then, i))
                            .filter(|&i| {
                                // What follows a clone otherwise waits only on its instance
                                // where it runs.
                                if interleaved || first_clone && !collective {
                                    let node = self.placed[then].as_ref().and_then(|v| v[i].node);
                                    node.is_some() && triggered(self, node)
                                } else {
                                    any
                                }
                            })
                            .collect();
                    if let Some(insts) = self.placed[then].as_mut() {
                        for i in staying {
                            if !insts[i].restart {
                                insts[i].restart = true;
                                changed = true;
                            }
                        }
                    }
                }
            }
            // What must run with something that can no longer run stops too.
            for ci in 0..self.colocs.len() {
                let (dep, primary, score, role) = {
                    let c = &self.colocs[ci];
                    (c.dep, c.primary, c.score, c.primary_role)
                };
                if !score.is_pos_inf() || self.units[dep].kind == Kind::Clone {
                    continue;
                }
                if !self.nodes_of(primary, role).is_some_and(|v| v.is_empty()) {
                    continue;
                }
                let unmanaged = self.units[dep].prims.iter().any(|&pi| !self.managed(pi));
                if let Some(insts) = self.placed[dep].as_mut() {
                    for i in insts.iter_mut() {
                        if i.node.is_some() && !unmanaged {
                            i.node = None;
                            changed = true;
                        }
                    }
                }
            }
            if !changed {
                break;
            }
        }
    }

    /// Will `u` have an instance able to do `action` after the transition?
    fn unit_runnable(&self, u: usize, action: OrderAction, require_all: bool) -> bool {
        let Some(insts) = self.placed[u].as_ref() else {
            return true;
        };
        match action {
            OrderAction::Promote => insts.iter().any(|i| i.promoted),
            OrderAction::Start => {
                let running = insts
                    .iter()
                    .filter(|i| i.node.is_some() && !i.blocked && i.member_ok.iter().all(|x| *x))
                    .count();
                let min = if require_all {
                    self.units[u].clone.as_ref().map_or(1, |c| c.min)
                } else {
                    1
                };
                running >= min
            }
            _ => true,
        }
    }

    /// Does any part of `u` (on `node`, if given) start, and does any part stop, in this
    /// transition?
    fn unit_activity(&self, u: usize, node: Option<usize>) -> (bool, bool) {
        let Some(insts) = self.placed[u].as_ref() else {
            return (false, false);
        };
        let mut starts = false;
        let mut stops = false;
        for inst in insts {
            if node.is_some() && inst.node != node && inst.cur_node != node {
                continue;
            }
            for m in 0..self.units[u].prims.len() {
                let (had, will) = self.member_transition(u, inst, m);
                match (had, will) {
                    (None, Some(_)) => starts = true,
                    (Some(_), None) => stops = true,
                    (Some((a, _, failed)), Some((b, _))) => {
                        let migrates = a != b && self.migratable(u, inst, m, a, failed, 0);
                        let redo = inst.restart || self.must_restart(u, inst, m);
                        if (a != b || failed || redo) && !migrates {
                            starts = true;
                            stops = true;
                        }
                    }
                    (None, None) => {}
                }
            }
        }
        (starts, stops)
    }

    /// Does any instance of `u` (on `node`, if given) get promoted, and does any get
    /// demoted (or stop, or restart, from the promoted role), in this transition?
    fn unit_role_activity(&self, u: usize, node: Option<usize>) -> (bool, bool) {
        let Some(insts) = self.placed[u].as_ref() else {
            return (false, false);
        };
        let mut promotes = false;
        let mut demotes = false;
        for inst in insts {
            if node.is_some() && inst.node != node && inst.cur_node != node {
                continue;
            }
            for m in 0..self.units[u].prims.len() {
                let (had, will) = self.member_transition(u, inst, m);
                let redone = match (had, will) {
                    (Some((a, _, failed)), Some((b, _))) => {
                        a != b || failed || inst.restart || self.must_restart(u, inst, m)
                    }
                    _ => false,
                };
                let was = had.is_some_and(|h| h.1 == Role::Promoted);
                let will_be = will.is_some_and(|w| w.1 == Role::Promoted);
                if will_be && (!was || redone) {
                    promotes = true;
                }
                if was && (!will_be || redone) {
                    demotes = true;
                }
            }
        }
        (promotes, demotes)
    }

    fn inst_stays(&self, u: usize, i: usize) -> bool {
        let Some(insts) = self.placed[u].as_ref() else {
            return false;
        };
        let inst = &insts[i];
        (0..self.units[u].prims.len()).any(|m| {
            let (had, will) = self.member_transition(u, inst, m);
            matches!((had, will), (Some((a, _, false)), Some((b, _))) if a == b)
        })
    }

    fn display_name(&self, u: usize, pi: usize, inst: &Inst) -> String {
        let id = &self.prims[pi].cfg.id;
        match (self.units[u].kind, inst.number) {
            (Kind::Clone, Some(k)) => format!("{id}:{k}"),
            _ => id.clone(),
        }
    }

    /// May member `m` of `inst` live-migrate from `a` instead of stopping and starting?
    /// Only when it allows it, is healthy, its node is reachable, and nothing it is
    /// ordered after stops the ordinary way (that would force it to stop first).
    fn migratable(
        &self,
        u: usize,
        inst: &Inst,
        m: usize,
        a: usize,
        failed: bool,
        depth: u32,
    ) -> bool {
        let pi = self.units[u].prims[m];
        if self.units[u].kind == Kind::Clone
            || !self.prims[pi].meta.allow_migrate.unwrap_or(false)
            || failed
            || inst.restart
            || self.nodes[a].fence.is_some()
            || !self.nodes[a].counts
            || self.prims[pi].cur.iter().any(|c| c.status.stop_failed)
            || depth > 8
        {
            return false;
        }
        for prev in 0..m {
            let (had, will) = self.member_transition(u, inst, prev);
            match (had, will) {
                (Some((x, _, f)), Some((y, _)))
                    if x != y && !self.migratable(u, inst, prev, x, f, depth + 1) =>
                {
                    return false;
                }
                (Some((x, _, f)), Some((y, _))) if x != y && !f => {}
                (Some((_, _, true)), _) | (Some(_), None) => return false,
                _ => {}
            }
        }
        // What it is ordered after must not stop the ordinary way; a clone it follows
        // only must not be starting on the node it migrates to.
        let target = inst.node;
        for o in &self.orders {
            if o.then != u || !o.mandatory || o.first == u {
                continue;
            }
            let blocks = if self.units[o.first].kind == Kind::Clone {
                target.is_some() && self.unit_activity(o.first, target).0
            } else {
                // A group's constraints order its start and stop as a whole, which a
                // member's migration stands in for; only a primitive's own order
                // waits on the first's ordinary stop.
                self.units[u].kind == Kind::Prim && self.unit_hard_stops(o.first, depth + 1)
            };
            if blocks {
                return false;
            }
        }
        true
    }

    /// Does `u` stop anything other than by live migration?
    fn unit_hard_stops(&self, u: usize, depth: u32) -> bool {
        let Some(insts) = self.placed[u].as_ref() else {
            return false;
        };
        for inst in insts {
            for m in 0..self.units[u].prims.len() {
                match self.member_transition(u, inst, m) {
                    (Some(_), None) => return true,
                    (Some((a, _, failed)), Some((b, _))) => {
                        if failed || inst.restart || self.must_restart(u, inst, m) {
                            return true;
                        }
                        if a != b && !self.migratable(u, inst, m, a, failed, depth + 1) {
                            return true;
                        }
                    }
                    _ => {}
                }
            }
        }
        false
    }

    fn into_plan(self) -> Plan {
        let mut plan = Plan::default();
        for n in &self.nodes {
            if let Some(r) = &n.fence {
                plan.fences.push(Fence {
                    node: n.name.to_string(),
                    reason: r.clone(),
                });
            }
        }
        let fenced: Vec<bool> = self
            .nodes
            .iter()
            .map(|n| plan.fences.iter().any(|f| f.node == n.name))
            .collect();
        for u in 0..self.units.len() {
            let Some(insts) = self.placed[u].as_ref() else {
                continue;
            };
            let promotable = self.promotable(u);
            for inst in insts {
                let mut restart_rest = inst.restart;
                for m in 0..self.units[u].prims.len() {
                    let pi = self.units[u].prims[m];
                    if !self.managed(pi) {
                        // A failure left alone still has to go with its lost node: the
                        // stop is due, and blocked until the node can be fenced.
                        if self.units[u].kind != Kind::Clone
                            && self.cfg.options.stonith_enabled
                            && !self.cfg.options.maintenance_mode
                            && self.prims[pi].meta.is_managed != Some(false)
                        {
                            for c in self.prims[pi]
                                .cur
                                .iter()
                                .filter(|c| self.stuck_node(c.node) && self.blocked_failure(pi, c))
                            {
                                plan.changes.push(Change {
                                    kind: ChangeKind::Stop,
                                    resource: c.key.to_string(),
                                    from: Some(Placement {
                                        node: self.nodes[c.node].name.to_string(),
                                        role: c.role,
                                    }),
                                    to: None,
                                    show_roles: promotable,
                                    reason: None,
                                    blocked: true,
                                    quiet: false,
                                });
                            }
                        }
                        continue;
                    }
                    let (had, will) = self.member_transition(u, inst, m);
                    let name = self.display_name(u, pi, inst);
                    let place = |n: usize, r: Role| Placement {
                        node: self.nodes[n].name.to_string(),
                        role: r,
                    };
                    let change = match (had, will) {
                        (None, None) => None,
                        (None, Some((n, r))) => {
                            // Later group members must start after it: they restart.
                            restart_rest = true;
                            Some((
                                if r == Role::Promoted {
                                    ChangeKind::Promote
                                } else {
                                    ChangeKind::Start
                                },
                                None,
                                Some(place(n, r)),
                            ))
                        }
                        (Some((n, r, _)), None) => {
                            Some((ChangeKind::Stop, Some(place(n, r)), None))
                        }
                        (Some((a, ra, failed)), Some((b, rb))) => {
                            let from = Some(place(a, ra));
                            let to = Some(place(b, rb));
                            // Copies of an anonymous promotable clone are interchangeable:
                            // one leaving a node stops there and another starts elsewhere.
                            let anonymous_promotable = promotable
                                && self.units[u].clone.as_ref().is_some_and(|c| !c.unique);
                            if a != b && anonymous_promotable {
                                restart_rest = true;
                                plan.changes.push(Change {
                                    kind: ChangeKind::Stop,
                                    resource: name.clone(),
                                    from,
                                    to: None,
                                    show_roles: true,
                                    reason: None,
                                    blocked: false,
                                    quiet: false,
                                });
                                Some((
                                    if rb == Role::Promoted {
                                        ChangeKind::Promote
                                    } else {
                                        ChangeKind::Start
                                    },
                                    None,
                                    to,
                                ))
                            } else if a != b {
                                restart_rest = true;
                                // After fencing, a failed resource is simply gone.
                                // (Unless the node is fenced for this very failure.)
                                let own_key = self
                                    .inst_member_cur(u, inst, m)
                                    .map(|c| c.key)
                                    .unwrap_or_default();
                                let fenced_for_failure = self.nodes[a]
                                    .fence
                                    .as_deref()
                                    .is_some_and(|r| r == format!("{own_key} failed there"));
                                let kind = if failed && (!fenced[a] || fenced_for_failure) {
                                    ChangeKind::Recover
                                } else if !fenced[a] && self.migratable(u, inst, m, a, failed, 0) {
                                    ChangeKind::Migrate
                                } else {
                                    ChangeKind::Move
                                };
                                Some((kind, from, to))
                            } else if failed {
                                restart_rest = true;
                                Some((ChangeKind::Recover, from, to))
                            } else if restart_rest
                                // Stopping the unexpected copies leaves the kept one
                                // restarted, in name at least.
                                || matches!(
                                    self.multi(pi),
                                    Some(MultipleActive::StopStart | MultipleActive::StopUnexpected)
                                )
                                || self.must_restart(u, inst, m)
                            {
                                restart_rest = true;
                                Some((ChangeKind::Restart, from, to))
                            } else if ra < rb {
                                Some((ChangeKind::Promote, from, to))
                            } else if ra > rb {
                                Some((ChangeKind::Demote, from, to))
                            } else if self.definition_change(u, inst, m)
                                == Some(DefinitionChange::Reload)
                            {
                                Some((ChangeKind::Reload, from, to))
                            } else {
                                None
                            }
                        }
                    };
                    // A stop that already failed on a lost node that cannot be fenced
                    // is not tried again: it waits there, blocked.
                    let stop_failed_stuck = self.units[u].kind == Kind::Clone
                        && had.is_some_and(|h| self.stuck_node(h.0))
                        && self
                            .inst_member_cur(u, inst, m)
                            .is_some_and(|c| c.failed && c.status.stop_failed);
                    if stop_failed_stuck {
                        continue;
                    }
                    if let Some((mut kind, from, mut to)) = change {
                        // A member must stop before the ones after it may restart; one of
                        // those stuck after a failure it cannot recover from leaves this one
                        // stopping, and that waits on it too.
                        let stuck_after = kind == ChangeKind::Restart
                            && self.units[u].prims[m + 1..].iter().any(|&later| {
                                self.prims[later]
                                    .cur
                                    .iter()
                                    .any(|c| self.blocked_failure(later, c))
                            });
                        if stuck_after {
                            kind = ChangeKind::Stop;
                            to = None;
                        }
                        // Nothing can be done on a lost node that cannot be fenced.
                        let on_stuck = kind == ChangeKind::Stop
                            && self.units[u].kind != Kind::Clone
                            && self.cfg.options.stonith_enabled
                            && had.is_some_and(|h| self.stuck_node(h.0));
                        let blocked = inst.blocked || stuck_after || on_stuck;
                        plan.changes.push(Change {
                            kind,
                            resource: name,
                            from,
                            to,
                            show_roles: promotable,
                            reason: if on_stuck {
                                // Stuck there, and with nowhere else to go either.
                                let w = self.base_weights(u);
                                let nowhere = !(0..self.nodes.len())
                                    .any(|n| self.nodes[n].can_run && !w[n].is_neg_inf());
                                nowhere.then(|| "node availability".to_string())
                            } else {
                                blocked.then(|| "unrunnable start".to_string())
                            },
                            blocked,
                            quiet: false,
                        });
                    }
                }
            }
            // Copies of a clone's members that no instance accounts for (a second
            // anonymous copy on one node, say) are stopped.
            if self.units[u].kind == Kind::Clone {
                let unique = self.units[u].clone.as_ref().is_some_and(|c| c.unique);
                for &pi in &self.units[u].prims {
                    if !self.managed(pi) {
                        continue;
                    }
                    let used: Vec<&Cur<'_>> = insts
                        .iter()
                        .filter_map(|i| self.member_cur(pi, i.cur_node, i.number, unique))
                        .collect();
                    for c in &self.prims[pi].cur {
                        if used.iter().any(|x| std::ptr::eq(*x, c)) {
                            continue;
                        }
                        plan.changes.push(Change {
                            kind: ChangeKind::Stop,
                            resource: c.key.to_string(),
                            from: Some(Placement {
                                node: self.nodes[c.node].name.to_string(),
                                role: c.role,
                            }),
                            to: None,
                            show_roles: promotable,
                            reason: Some("node availability".into()),
                            blocked: false,
                            quiet: false,
                        });
                    }
                }
            }
            // Extra copies of a resource that may run once: stop them.
            if self.units[u].kind != Kind::Clone {
                for &pi in &self.units[u].prims {
                    let node = insts.first().and_then(|i| i.node);
                    let primary = self.primary_cur(pi, node).map(|c| c.node);
                    for c in self.prims[pi]
                        .cur
                        .iter()
                        .filter(|c| Some(c.node) != primary)
                    {
                        if self.managed(pi) {
                            plan.changes.push(Change {
                                kind: ChangeKind::Stop,
                                resource: self.prims[pi].cfg.id.clone(),
                                from: Some(Placement {
                                    node: self.nodes[c.node].name.to_string(),
                                    role: c.role,
                                }),
                                to: None,
                                show_roles: false,
                                reason: Some("multiple active".into()),
                                blocked: false,
                                // Stopping every copy and starting one shows as one line.
                                quiet: node.is_some()
                                    && self.multi(pi) != Some(MultipleActive::StopOnly),
                            });
                        }
                    }
                }
            }
        }
        for p in &self.prims {
            for c in &p.dangling {
                plan.changes.push(Change {
                    kind: ChangeKind::Stop,
                    resource: c.key.to_string(),
                    from: Some(Placement {
                        node: self.nodes[c.node].name.to_string(),
                        role: c.role,
                    }),
                    to: None,
                    show_roles: false,
                    blocked: false,
                    reason: Some("migration completed".into()),
                    // Part of the migration Pacemaker already reported.
                    quiet: true,
                });
            }
        }
        let orphans: &[Cur<'_>] = if self.cfg.options.stop_orphan_resources {
            &self.orphans
        } else {
            &[]
        };
        for c in orphans {
            plan.changes.push(Change {
                kind: ChangeKind::Stop,
                resource: c.key.to_string(),
                from: Some(Placement {
                    node: self.nodes[c.node].name.to_string(),
                    role: c.role,
                }),
                to: None,
                show_roles: false,
                blocked: false,
                reason: Some("node availability".into()),
                quiet: false,
            });
        }
        self.build_actions(&mut plan);
        plan.score_nodes = self.nodes.iter().map(|n| n.name.to_string()).collect();
        plan.score_rows = self.scores;
        plan
    }

    fn build_actions(&self, plan: &mut Plan) {
        let mut fence_ix = Vec::new();
        for f in &plan.fences {
            fence_ix.push(plan.actions.len());
            plan.actions.push(Action::Fence {
                node: f.node.clone(),
            });
        }
        // Per resource: its stop-side and start-side actions, for ordering.
        let mut stops: HashMap<String, Vec<usize>> = HashMap::new();
        let mut starts: HashMap<String, Vec<usize>> = HashMap::new();
        let mut edges = Vec::new();
        for ch in plan.changes.iter().filter(|c| !c.blocked) {
            let r = ch.resource.clone();
            let base = r
                .rsplit_once(':')
                .map(|(b, _)| b.to_string())
                .unwrap_or(r.clone());
            let push = |a: Action, actions: &mut Vec<Action>| {
                actions.push(a);
                actions.len() - 1
            };
            let mut chain: Vec<usize> = Vec::new();
            let from = ch.from.as_ref();
            let to = ch.to.as_ref();
            if ch.kind == ChangeKind::Migrate
                && let (Some(f), Some(t)) = (from, to)
            {
                let a = push(
                    Action::MigrateTo {
                        resource: r.clone(),
                        source: f.node.clone(),
                        target: t.node.clone(),
                    },
                    &mut plan.actions,
                );
                let b = push(
                    Action::MigrateFrom {
                        resource: r.clone(),
                        source: f.node.clone(),
                        target: t.node.clone(),
                    },
                    &mut plan.actions,
                );
                let c = push(
                    Action::Stop {
                        resource: r.clone(),
                        node: f.node.clone(),
                    },
                    &mut plan.actions,
                );
                edges.push((a, b));
                edges.push((b, c));
                starts.entry(base.clone()).or_default().push(b);
                stops.entry(base.clone()).or_default().push(c);
                continue;
            }
            let moving = matches!(
                ch.kind,
                ChangeKind::Stop
                    | ChangeKind::Move
                    | ChangeKind::Recover
                    | ChangeKind::Restart
                    | ChangeKind::Reload
            );
            if let Some(f) = from {
                if f.role == Role::Promoted && (moving || ch.kind == ChangeKind::Demote) {
                    let a = push(
                        Action::Demote {
                            resource: r.clone(),
                            node: f.node.clone(),
                        },
                        &mut plan.actions,
                    );
                    chain.push(a);
                    stops.entry(base.clone()).or_default().push(a);
                }
                if moving {
                    let a = push(
                        Action::Stop {
                            resource: r.clone(),
                            node: f.node.clone(),
                        },
                        &mut plan.actions,
                    );
                    chain.push(a);
                    stops.entry(base.clone()).or_default().push(a);
                }
            }
            if let Some(t) = to {
                let needs_start = from.is_none()
                    || matches!(
                        ch.kind,
                        ChangeKind::Move
                            | ChangeKind::Recover
                            | ChangeKind::Restart
                            | ChangeKind::Reload
                    );
                if needs_start {
                    let a = push(
                        Action::Start {
                            resource: r.clone(),
                            node: t.node.clone(),
                        },
                        &mut plan.actions,
                    );
                    chain.push(a);
                    starts.entry(base.clone()).or_default().push(a);
                }
                if t.role == Role::Promoted && (needs_start || ch.kind == ChangeKind::Promote) {
                    let a = push(
                        Action::Promote {
                            resource: r.clone(),
                            node: t.node.clone(),
                        },
                        &mut plan.actions,
                    );
                    chain.push(a);
                    starts.entry(base.clone()).or_default().push(a);
                }
            }
            for w in chain.windows(2) {
                edges.push((w[0], w[1]));
            }
        }
        // Fencing comes before anything starts: the node's resources must be known dead.
        for (i, a) in plan.actions.iter().enumerate() {
            if matches!(
                a,
                Action::Start { .. }
                    | Action::Promote { .. }
                    | Action::MigrateTo { .. }
                    | Action::MigrateFrom { .. }
            ) {
                for &f in &fence_ix {
                    edges.push((f, i));
                }
            }
        }
        // Orders between resources: starts after the first's starts, stops (symmetrical)
        // before the first's stops.
        let prim_ids = |u: usize| -> Vec<String> {
            self.units[u]
                .prims
                .iter()
                .map(|&pi| self.prims[pi].cfg.id.clone())
                .collect()
        };
        for o in &self.orders {
            if !o.mandatory {
                continue;
            }
            for f in prim_ids(o.first) {
                for t in prim_ids(o.then) {
                    for &a in starts.get(&f).into_iter().flatten() {
                        for &b in starts.get(&t).into_iter().flatten() {
                            edges.push((a, b));
                        }
                    }
                    if o.symmetrical {
                        for &a in stops.get(&t).into_iter().flatten() {
                            for &b in stops.get(&f).into_iter().flatten() {
                                edges.push((a, b));
                            }
                        }
                    }
                }
            }
        }
        for u in &self.units {
            for w in u.prims.windows(2) {
                let (a, b) = (&self.prims[w[0]].cfg.id, &self.prims[w[1]].cfg.id);
                for &x in starts.get(a).into_iter().flatten() {
                    for &y in starts.get(b).into_iter().flatten() {
                        edges.push((x, y));
                    }
                }
                for &x in stops.get(b).into_iter().flatten() {
                    for &y in stops.get(a).into_iter().flatten() {
                        edges.push((x, y));
                    }
                }
            }
        }
        edges.sort_unstable();
        edges.dedup();
        plan.edges = edges;
    }
}
