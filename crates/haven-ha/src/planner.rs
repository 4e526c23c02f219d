//! Haven's scheduler (haven-sched) as the coordinator's [`Planner`].

use std::collections::BTreeMap;

use haven_model::{Config, NodeStatus, ResourceStatus, Role, State};
use haven_sched::PlanAction;

use crate::view::{ClusterView, NodeState, Observed, Plan, Planner, Step};

/// Node attributes set at run time (`haven node standby|maintenance`), which override
/// the configuration's, as Pacemaker's transient node attributes do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeOverride {
    pub standby: Option<bool>,
    pub maintenance: Option<bool>,
    /// Transient attributes, e.g. promotion scores (`promotion-RSC`) that a replica
    /// sets when its data is up to date, as agents do with `crm_master`.
    pub attributes: BTreeMap<String, String>,
}

/// Plans with Pacemaker's semantics, from the configuration committed through Raft.
#[derive(Clone, Debug)]
pub struct SchedPlanner {
    config: Config,
    overrides: BTreeMap<String, NodeOverride>,
}

impl SchedPlanner {
    pub fn new(config: Config) -> Self {
        SchedPlanner {
            config,
            overrides: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Replaces the run-time node attributes. Returns whether anything changed, in
    /// which case the caller tells the coordinator (`handle_planner_changed`).
    pub fn set_overrides(&mut self, overrides: BTreeMap<String, NodeOverride>) -> bool {
        let changed = self.overrides != overrides;
        self.overrides = overrides;
        changed
    }
}

impl Planner for SchedPlanner {
    fn plan(&mut self, view: &ClusterView) -> Plan {
        let mut state = observed_state(view);
        for (n, o) in &self.overrides {
            if let Some(status) = state.nodes.get_mut(n) {
                status.standby = o.standby;
                status.maintenance = o.maintenance;
                status.attributes = o.attributes.clone();
            }
        }
        let plan = haven_sched::schedule(&self.config, &state);
        let windows = haven_sched::window::windows(&self.config, &plan);
        let mut steps: Vec<Step> = plan.actions.into_iter().map(step).collect();
        for w in windows {
            if let Some(Step::Promote {
                migration_source, ..
            }) = steps.get_mut(w.promote)
            {
                *migration_source = Some(w.source);
            }
        }
        Plan {
            steps,
            edges: plan.edges,
        }
    }
}

/// The coordinator's picture as the scheduler's input. The coordinator only runs on a
/// quorate leader, so quorum is a given here.
pub fn observed_state(view: &ClusterView) -> State {
    let nodes = view
        .nodes
        .iter()
        .map(|(n, s)| {
            let (state, unclean_reason) = match s {
                NodeState::Online => (haven_model::NodeState::Online, None),
                NodeState::Offline => (haven_model::NodeState::Offline, None),
                NodeState::Pending => (haven_model::NodeState::Pending, None),
                NodeState::Unclean => (
                    haven_model::NodeState::Unclean,
                    Some("peer is no longer part of the cluster".to_string()),
                ),
            };
            let status = NodeStatus {
                state,
                unclean_reason,
                ..NodeStatus::default()
            };
            (n.clone(), status)
        })
        .collect();
    let mut resources: BTreeMap<String, BTreeMap<String, ResourceStatus>> = BTreeMap::new();
    for (r, per_node) in &view.resources {
        for (n, o) in per_node {
            let failcount = view
                .failcounts
                .get(r)
                .and_then(|f| f.get(n))
                .copied()
                .unwrap_or(0);
            let status = match o {
                Observed::Stopped if failcount == 0 => continue,
                Observed::Stopped => ResourceStatus::default(),
                Observed::Unknown => ResourceStatus {
                    probed: false,
                    ..ResourceStatus::default()
                },
                Observed::Started => ResourceStatus {
                    role: Role::Started,
                    ..ResourceStatus::default()
                },
                Observed::Promoted => ResourceStatus {
                    role: Role::Promoted,
                    ..ResourceStatus::default()
                },
                Observed::Failed => ResourceStatus {
                    role: Role::Started,
                    failed: true,
                    ..ResourceStatus::default()
                },
            };
            resources.entry(r.clone()).or_default().insert(
                n.clone(),
                ResourceStatus {
                    failcount,
                    ..status
                },
            );
        }
    }
    // Failures counted where the resource is no longer observed still ban it there.
    for (r, per_node) in &view.failcounts {
        for (n, c) in per_node {
            resources
                .entry(r.clone())
                .or_default()
                .entry(n.clone())
                .or_insert_with(|| ResourceStatus {
                    failcount: *c,
                    ..ResourceStatus::default()
                });
        }
    }
    // Fields the coordinator does not know (e.g. quorum history) keep their defaults.
    State {
        have_quorum: true,
        now: None,
        nodes,
        resources,
        ..State::default()
    }
}

fn step(a: PlanAction) -> Step {
    match a {
        PlanAction::Fence { node } => Step::Fence { node },
        PlanAction::Stop { resource, node } => Step::Stop { resource, node },
        PlanAction::Demote { resource, node } => Step::Demote { resource, node },
        PlanAction::Start { resource, node } => Step::Start { resource, node },
        PlanAction::Promote { resource, node } => Step::Promote {
            resource,
            node,
            migration_source: None,
        },
        PlanAction::MigrateTo {
            resource,
            source,
            target,
        } => Step::MigrateTo {
            resource,
            from: source,
            to: target,
        },
        PlanAction::MigrateFrom {
            resource,
            source,
            target,
        } => Step::MigrateFrom {
            resource,
            from: source,
            to: target,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::adapter::coordinator_config;
    use crate::coordinator::{Coordinator, CoordinatorCommand};
    use crate::{OpOutcome, OpReport, Time, Timeouts};

    const CONFIG: &str = r#"
[options]
stonith-enabled = true
resource-stickiness = 100

[[nodes]]
name = "n1"

[[nodes]]
name = "n2"

[[nodes]]
name = "n3"

[[resources]]
id = "web"
class = "process"
type = "web"

[[resources]]
id = "db"
class = "process"
type = "db"

[[fencing.devices]]
id = "lab"
agent = "lab"
"#;

    /// The coordinator driven by the real scheduler: every resource ends up running
    /// exactly once, and a lost node's resources move only after its fence.
    #[test]
    fn coordinator_with_real_scheduler_places_and_recovers() {
        let config = Config::from_toml("test.toml", CONFIG).expect("valid config");
        let cc = coordinator_config(&config);
        let mut c = Coordinator::new(SchedPlanner::new(config), cc, Timeouts::default(), Time(0));
        let mut running: BTreeMap<String, String> = BTreeMap::new();
        let mut fences = Vec::new();
        let mut dead: Option<String> = None;
        let mut now = Time(0);
        let tick = |c: &mut Coordinator<SchedPlanner>,
                    running: &mut BTreeMap<String, String>,
                    fences: &mut Vec<(u64, String)>,
                    dead: Option<&str>,
                    now: Time| {
            for n in ["n1", "n2", "n3"] {
                if Some(n) != dead {
                    c.handle_heartbeat(n, "link0", now);
                }
            }
            c.handle_timeout(now);
            while let Some(cmd) = c.poll_command() {
                match cmd {
                    CoordinatorCommand::Op { node, request } => {
                        if Some(node.as_str()) == dead {
                            continue;
                        }
                        let here = running.get(&request.resource) == Some(&node);
                        let outcome = match request.op {
                            crate::OpKind::Monitor if here => OpOutcome::Ok,
                            crate::OpKind::Monitor => OpOutcome::NotRunning,
                            crate::OpKind::Start => {
                                running.insert(request.resource.clone(), node.clone());
                                OpOutcome::Ok
                            }
                            crate::OpKind::Stop => {
                                running.remove(&request.resource);
                                OpOutcome::Ok
                            }
                            _ => OpOutcome::Ok,
                        };
                        let report = OpReport {
                            seq: Some(request.seq),
                            resource: request.resource,
                            op: request.op,
                            outcome,
                            at: now,
                        };
                        c.handle_report(&node, report, now);
                    }
                    CoordinatorCommand::Fence { token, victim, .. } => fences.push((token, victim)),
                    CoordinatorCommand::Alert { .. } => {}
                }
            }
        };
        for _ in 0..30 {
            tick(&mut c, &mut running, &mut fences, dead.as_deref(), now);
            now = now + Duration::from_millis(100);
        }
        assert_eq!(running.len(), 2, "both resources run: {running:?}");
        let dead_name = running["web"].clone();
        dead = Some(dead_name.clone());
        for _ in 0..30 {
            tick(&mut c, &mut running, &mut fences, dead.as_deref(), now);
            now = now + Duration::from_millis(100);
        }
        assert_eq!(fences.len(), 1, "the lost node is fenced");
        assert_eq!(running["web"], dead_name, "nothing moves before the fence");
        let (token, _) = fences.remove(0);
        running.retain(|_, n| *n != dead_name);
        c.handle_fence_result(token, true, now);
        for _ in 0..10 {
            tick(&mut c, &mut running, &mut fences, dead.as_deref(), now);
            now = now + Duration::from_millis(100);
        }
        assert_eq!(running.len(), 2, "both resources run again: {running:?}");
        assert!(running.values().all(|n| *n != dead_name));
    }

    #[test]
    fn a_volume_primary_moving_with_its_guest_is_promoted_with_the_migration_source() {
        let text = r#"
[[nodes]]
name = "n1"

[[nodes]]
name = "n2"

[[resources]]
id = "vol"
class = "volume"
type = "volume"

[[clones]]
id = "vol-clone"
child = "vol"
promotable = true
promoted-max = 1

[[constraints.location]]
id = "p1"
rsc = "vol-clone"
role = "Promoted"
node = "n1"
score = "10"

[[constraints.location]]
id = "p2"
rsc = "vol-clone"
role = "Promoted"
node = "n2"
score = "10"

[[resources]]
id = "vm1"
class = "qemu"
type = "vm"
meta = { allow-migrate = true }

[[constraints.location]]
id = "cli-prefer-vm1"
rsc = "vm1"
node = "n2"
score = "INFINITY"

[[constraints.colocation]]
id = "vm1-with-primary"
rsc = "vm1"
with = "vol-clone"
with-role = "Promoted"
score = "INFINITY"
"#;
        let config = Config::from_toml("test.toml", text).expect("valid config");
        let mut p = SchedPlanner::new(config);
        let mut view = ClusterView::default();
        for n in ["n1", "n2"] {
            view.nodes.insert(n.to_string(), NodeState::Online);
        }
        let vol = view.resources.entry("vol".into()).or_default();
        vol.insert("n1".into(), Observed::Promoted);
        vol.insert("n2".into(), Observed::Started);
        view.resources
            .entry("vm1".into())
            .or_default()
            .insert("n1".into(), Observed::Started);
        let plan = p.plan(&view);
        let promotes: Vec<&Step> = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Promote { .. }))
            .collect();
        assert_eq!(promotes.len(), 1, "{plan:?}");
        assert!(
            matches!(promotes[0], Step::Promote { node, migration_source: Some(src), .. }
                if node == "n2" && src == "n1"),
            "{plan:?}"
        );
    }

    #[test]
    fn standby_override_moves_resources_away() {
        let config = Config::from_toml("test.toml", CONFIG).expect("valid config");
        let mut p = SchedPlanner::new(config);
        let mut view = ClusterView::default();
        for n in ["n1", "n2", "n3"] {
            view.nodes.insert(n.to_string(), NodeState::Online);
        }
        for r in ["web", "db"] {
            view.resources
                .entry(r.to_string())
                .or_default()
                .insert("n1".to_string(), Observed::Started);
        }
        assert!(p.plan(&view).is_empty(), "both run, nothing to do");
        let standby = NodeOverride {
            standby: Some(true),
            ..NodeOverride::default()
        };
        assert!(p.set_overrides([("n1".to_string(), standby)].into()));
        let plan = p.plan(&view);
        let stops = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Stop { node, .. } if node == "n1"))
            .count();
        let starts_elsewhere = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Start { node, .. } if node != "n1"))
            .count();
        assert_eq!((stops, starts_elsewhere), (2, 2), "{plan:?}");
    }

    /// crm-fence-peer's constraint as the daemon sets it: a replica recorded outdated
    /// gets -INFINITY promotion and stays unpromoted although it is the only copy left
    /// and preferred by location; cleared, it is promoted.
    #[test]
    fn an_outdated_replica_is_never_promoted() {
        let text = format!(
            "{PROMOTABLE}\n[[constraints.location]]\nid = \"p2\"\nrsc = \"disk-clone\"\nrole = \"Promoted\"\nnode = \"n2\"\nscore = \"10\"\n"
        );
        let config = Config::from_toml("test.toml", &text).expect("valid config");
        let mut p = SchedPlanner::new(config);
        let mut view = ClusterView::default();
        view.nodes.insert("n1".into(), NodeState::Offline);
        view.nodes.insert("n2".into(), NodeState::Online);
        view.resources
            .entry("disk".into())
            .or_default()
            .insert("n2".into(), Observed::Started);
        let promotes = |plan: &Plan| {
            plan.steps
                .iter()
                .any(|s| matches!(s, Step::Promote { node, .. } if node == "n2"))
        };
        assert!(promotes(&p.plan(&view)), "the control: n2 is promoted");
        let outdated = NodeOverride {
            attributes: [("promotion-disk".to_string(), "-INFINITY".to_string())].into(),
            ..NodeOverride::default()
        };
        assert!(p.set_overrides([("n2".to_string(), outdated)].into()));
        let plan = p.plan(&view);
        assert!(
            !promotes(&plan),
            "an outdated replica is promoted: {plan:?}"
        );
        assert!(p.set_overrides(BTreeMap::new()));
        assert!(promotes(&p.plan(&view)));
    }

    const PROMOTABLE: &str = r#"
[options]
stonith-enabled = true
resource-stickiness = 100

[[nodes]]
name = "n1"

[[nodes]]
name = "n2"

[[resources]]
id = "disk"
class = "process"
type = "disk"

[[clones]]
id = "disk-clone"
child = "disk"
promotable = true
promoted-max = 1

[[fencing.devices]]
id = "lab"
agent = "lab"
"#;

    /// A promotable clone through the coordinator: one copy per node, exactly one
    /// promoted; after the primary's node is lost and fenced, the survivor is promoted —
    /// and not before the fence.
    #[test]
    fn promotable_clone_copies_run_everywhere_and_one_is_promoted() {
        let config = Config::from_toml("test.toml", PROMOTABLE).expect("valid config");
        let cc = coordinator_config(&config);
        assert!(cc.resources["disk"].clone);
        // Both replicas are up to date: both may be promoted, n1 a little rather.
        let mut planner = SchedPlanner::new(config);
        let score = |v: &str| NodeOverride {
            attributes: [("promotion-disk".to_string(), v.to_string())].into(),
            ..NodeOverride::default()
        };
        planner.set_overrides([("n1".into(), score("10")), ("n2".into(), score("5"))].into());
        let mut c = Coordinator::new(planner, cc, Timeouts::default(), Time(0));
        // (node) -> role of the one copy there, as the agents would see it.
        let mut roles: BTreeMap<String, Observed> = BTreeMap::new();
        let mut fences: Vec<(u64, String)> = Vec::new();
        let mut now = Time(0);
        let run = |c: &mut Coordinator<SchedPlanner>,
                   roles: &mut BTreeMap<String, Observed>,
                   fences: &mut Vec<(u64, String)>,
                   dead: &[&str],
                   now: &mut Time,
                   ticks: u32| {
            for _ in 0..ticks {
                for n in ["n1", "n2"] {
                    if !dead.contains(&n) {
                        c.handle_heartbeat(n, "link0", *now);
                    }
                }
                c.handle_timeout(*now);
                while let Some(cmd) = c.poll_command() {
                    match cmd {
                        CoordinatorCommand::Op { node, request } => {
                            assert_eq!(request.resource, "disk", "agents see the primitive");
                            if dead.contains(&node.as_str()) {
                                continue;
                            }
                            let role = roles.get(&node).copied().unwrap_or(Observed::Stopped);
                            let outcome = match request.op {
                                crate::OpKind::Monitor => match role {
                                    Observed::Promoted => OpOutcome::RunningPromoted,
                                    Observed::Started => OpOutcome::Ok,
                                    _ => OpOutcome::NotRunning,
                                },
                                crate::OpKind::Start | crate::OpKind::Demote => {
                                    roles.insert(node.clone(), Observed::Started);
                                    OpOutcome::Ok
                                }
                                crate::OpKind::Promote => {
                                    // The replica may skip exactly the fenced peers.
                                    let down: Vec<String> =
                                        dead.iter().map(|d| d.to_string()).collect();
                                    assert_eq!(request.fenced, down, "fenced peers");
                                    roles.insert(node.clone(), Observed::Promoted);
                                    OpOutcome::Ok
                                }
                                _ => {
                                    roles.remove(&node);
                                    OpOutcome::Ok
                                }
                            };
                            let report = OpReport {
                                seq: Some(request.seq),
                                resource: request.resource,
                                op: request.op,
                                outcome,
                                at: *now,
                            };
                            c.handle_report(&node, report, *now);
                        }
                        CoordinatorCommand::Fence { token, victim, .. } => {
                            fences.push((token, victim))
                        }
                        CoordinatorCommand::Alert { .. } => {}
                    }
                }
                *now = *now + Duration::from_millis(100);
            }
        };
        run(&mut c, &mut roles, &mut fences, &[], &mut now, 30);
        let promoted: Vec<_> = roles
            .iter()
            .filter(|(_, r)| **r == Observed::Promoted)
            .map(|(n, _)| n.clone())
            .collect();
        assert_eq!(roles.len(), 2, "a copy on each node: {roles:?}");
        assert_eq!(promoted.len(), 1, "exactly one promoted: {roles:?}");
        let primary = promoted[0].clone();
        let survivor = if primary == "n1" { "n2" } else { "n1" };
        let dead = [primary.as_str()];
        run(&mut c, &mut roles, &mut fences, &dead, &mut now, 20);
        assert_eq!(fences.len(), 1, "the primary's node is fenced");
        assert_ne!(
            roles.get(survivor),
            Some(&Observed::Promoted),
            "no promotion before the fence"
        );
        let (token, _) = fences.remove(0);
        roles.remove(&primary);
        c.handle_fence_result(token, true, now);
        run(&mut c, &mut roles, &mut fences, &dead, &mut now, 10);
        assert_eq!(roles.get(survivor), Some(&Observed::Promoted), "{roles:?}");
    }

    /// Issue #5: a guest banned from both replicas by its failcounts (migration-threshold
    /// 1 after a failed window migration) must not take the volume's promotion with it:
    /// the volume failed nowhere, so one replica is still promoted.
    #[test]
    fn a_guest_banned_from_every_replica_still_leaves_the_volume_promoted_on_one() {
        let text = r#"
[[nodes]]
name = "n1"

[[nodes]]
name = "n2"

[[nodes]]
name = "n3"

[[resources]]
id = "vol"
class = "volume"
type = "volume"

[[clones]]
id = "vol-clone"
child = "vol"
clone-max = 2
promotable = true
promoted-max = 1

[[constraints.location]]
id = "replicas-only"
rsc = "vol-clone"
node = "n3"
score = "-INFINITY"

[[resources]]
id = "vm1"
class = "qemu"
type = "vm"
meta = { allow-migrate = true, migration-threshold = 1 }

[[constraints.location]]
id = "cli-prefer-vm1"
rsc = "vm1"
node = "n2"
score = "INFINITY"

[[constraints.colocation]]
id = "vm1-with-primary"
rsc = "vm1"
with = "vol-clone"
with-role = "Promoted"
score = "INFINITY"
"#;
        let config = Config::from_toml("test.toml", text).expect("valid config");
        let mut p = SchedPlanner::new(config);
        let score = NodeOverride {
            attributes: [("promotion-vol".to_string(), "10000".to_string())].into(),
            ..NodeOverride::default()
        };
        p.set_overrides([("n1".into(), score.clone()), ("n2".into(), score)].into());
        let mut view = ClusterView::default();
        for n in ["n1", "n2", "n3"] {
            view.nodes.insert(n.to_string(), NodeState::Online);
        }
        let vol = view.resources.entry("vol".into()).or_default();
        vol.insert("n1".into(), Observed::Started);
        vol.insert("n2".into(), Observed::Started);
        let fails = view.failcounts.entry("vm1".into()).or_default();
        fails.insert("n1".into(), 1);
        fails.insert("n2".into(), 1);
        let plan = p.plan(&view);
        let promotes = plan
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Promote { .. }))
            .count();
        assert_eq!(promotes, 1, "{plan:?}");
    }
}
