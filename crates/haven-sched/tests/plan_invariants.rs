//! Properties every plan has, on random clusters: a resource that may run once ends on
//! at most one node; nothing starts on an unclean node or before the fencing that
//! precedes it; mandatory orders hold in the action graph.

use std::collections::{BTreeMap, BTreeSet};

use haven_model::{
    Clone, Colocation, Config, Group, Location, Meta, Node, NodeState, NodeStatus, Order,
    OrderKind, Primitive, ResourceStatus, Role, Score, State,
};
use haven_sched::{ChangeKind, PlanAction, schedule};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    config: Config,
    state: State,
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

fn rsc_name(i: usize) -> String {
    format!("r{i}")
}

prop_compose! {
    fn cluster()(
        n_nodes in 2usize..5,
        n_rsc in 1usize..8,
        node_states in prop::collection::vec(0u8..6, 5),
        locs in prop::collection::vec((0usize..8, 0usize..5, -3i64..4), 0..6),
        colocs in prop::collection::vec((0usize..8, 0usize..8, -2i64..3), 0..4),
        orders in prop::collection::vec((0usize..8, 0usize..8), 0..4),
        active in prop::collection::vec((0usize..8, 0usize..5, any::<bool>(), 0u32..3), 0..10),
        stickiness in 0i64..200,
        grouped in any::<bool>(),
        cloned in any::<bool>(),
        stonith in any::<bool>(),
    ) -> Case {
        let score = |k: i64| match k {
            -3 => Score::NEG_INFINITY,
            3 => Score::INFINITY,
            k => Score::new(k * 50),
        };
        let mut config = Config::default();
        config.options.stonith_enabled = stonith;
        config.options.resource_stickiness = Score::new(stickiness);
        for i in 0..n_nodes {
            config.nodes.push(Node { name: node_name(i), ..Default::default() });
        }
        for i in 0..n_rsc {
            config.resources.push(Primitive {
                id: rsc_name(i),
                class: "lsb".into(),
                agent: "dummy".into(),
                meta: Meta { migration_threshold: Some(2), allow_migrate: Some(i % 2 == 0), ..Default::default() },
                ..Default::default()
            });
        }
        // r0 and r1 may form a group; the last resource may be a clone.
        let mut top: Vec<String> = (0..n_rsc).map(rsc_name).collect();
        let clone_ix = n_rsc - 1;
        let has_clone = cloned && n_rsc >= 2;
        if has_clone {
            config.clones.push(Clone { id: "c".into(), child: rsc_name(clone_ix), ..Default::default() });
            top[clone_ix] = "c".into();
        }
        if grouped && n_rsc >= 3 {
            config.groups.push(Group { id: "g".into(), members: vec![rsc_name(0), rsc_name(1)], meta: Meta::default() });
            top[0] = "g".into();
            top[1] = "g".into();
        }
        for (k, (r, n, s)) in locs.into_iter().enumerate() {
            if r < n_rsc && n < n_nodes {
                config.constraints.location.push(Location {
                    id: format!("l{k}"),
                    rsc: top[r].clone(),
                    node: Some(node_name(n)),
                    score: Some(score(s)),
                    ..Default::default()
                });
            }
        }
        for (k, (a, b, s)) in colocs.into_iter().enumerate() {
            if a < n_rsc && b < n_rsc && top[a] != top[b] {
                config.constraints.colocation.push(Colocation {
                    id: format!("c{k}"),
                    rsc: Some(top[a].clone()),
                    with: Some(top[b].clone()),
                    score: score(s),
                    ..Default::default()
                });
            }
        }
        for (k, (a, b)) in orders.into_iter().enumerate() {
            // Only forward orders: mandatory cycles are refused by validation.
            if a < b && b < n_rsc && top[a] != top[b] {
                config.constraints.order.push(Order {
                    id: format!("o{k}"),
                    first: Some(top[a].clone()),
                    then: Some(top[b].clone()),
                    kind: OrderKind::Mandatory,
                    ..Default::default()
                });
            }
        }
        let mut state = State::default();
        for (i, &k) in node_states.iter().enumerate().take(n_nodes) {
            let st = match k {
                3 => NodeState::Offline,
                4 => NodeState::Unclean,
                _ => NodeState::Online,
            };
            state.nodes.insert(node_name(i), NodeStatus {
                state: st,
                standby: Some(k == 5),
                ..Default::default()
            });
        }
        for (r, n, failed, failcount) in active {
            if r < n_rsc && n < n_nodes {
                state.resources.entry(rsc_name(r)).or_default().insert(node_name(n), ResourceStatus {
                    role: Role::Started,
                    failed,
                    failcount,
                    ..Default::default()
                });
            }
        }
        Case { config, state }
    }
}

fn unclean(case: &Case, node: &str) -> bool {
    case.state
        .nodes
        .get(node)
        .is_some_and(|n| n.state == NodeState::Unclean)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn plans_keep_the_safety_invariants(case in cluster()) {
        prop_assert!(case.config.validate("generated").is_ok(), "{:?}", case.config.validate("generated"));
        let plan = schedule(&case.config, &case.state);
        // On failure, the inputs in Haven's own formats, to replay with `haven simulate`.
        let replay = format!(
            "\n--- config\n{}\n--- state\n{}\n--- summary\n{}",
            case.config.to_toml().unwrap_or_default(),
            case.state.to_json(),
            plan.transition_summary().join("\n")
        );
        prop_assert_eq!(&plan, &schedule(&case.config, &case.state), "deterministic");

        // Where every resource ends: start from what runs (on nodes that count), apply
        // the changes.
        let mut at: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (r, per_node) in &case.state.resources {
            for (n, s) in per_node {
                let counts = case.state.nodes.get(n).is_some_and(|x| x.state != NodeState::Offline);
                if s.role != Role::Stopped && counts {
                    at.entry(r.clone()).or_default().insert(n.clone());
                }
            }
        }
        for c in plan.changes.iter().filter(|c| !c.blocked) {
            let base = c.resource.split(':').next().unwrap_or_default().to_string();
            let set = at.entry(base).or_default();
            if matches!(c.kind, ChangeKind::Stop | ChangeKind::Move | ChangeKind::Migrate | ChangeKind::Recover)
                && let Some(f) = &c.from
            {
                set.remove(&f.node);
            }
            if let Some(t) = &c.to {
                set.insert(t.node.clone());
            }
        }
        let cloned: BTreeSet<&str> = case.config.clones.iter().map(|c| c.child.as_str()).collect();
        for (r, nodes) in &at {
            if !cloned.contains(r.as_str()) {
                prop_assert!(nodes.len() <= 1, "{r} ends on {nodes:?}");
            }
        }

        // Nothing starts on an unclean node, and every start waits for every fence.
        let fences: Vec<usize> = plan.actions.iter().enumerate()
            .filter(|(_, a)| matches!(a, PlanAction::Fence { .. })).map(|(i, _)| i).collect();
        for (i, a) in plan.actions.iter().enumerate() {
            let node = match a {
                PlanAction::Start { node, .. } | PlanAction::Promote { node, .. } => node,
                PlanAction::MigrateFrom { target, .. } => target,
                _ => continue,
            };
            prop_assert!(!unclean(&case, node), "{a:?} on an unclean node");
            for &f in &fences {
                prop_assert!(plan.edges.contains(&(f, i)), "{a:?} does not wait for {:?}", plan.actions[f]);
            }
        }

        // Mandatory orders: every start of `then` after every start of `first`, and
        // nothing of `then` starts when `first` will run nowhere.
        let members = |id: &str| -> Vec<String> {
            if let Some(g) = case.config.groups.iter().find(|g| g.id == id) {
                return g.members.clone();
            }
            if let Some(c) = case.config.clones.iter().find(|c| c.id == id) {
                return vec![c.child.clone()];
            }
            vec![id.to_string()]
        };
        let starts_of = |r: &str| -> Vec<usize> {
            plan.actions.iter().enumerate().filter(|(_, a)| match a {
                PlanAction::Start { resource, .. } => resource.split(':').next() == Some(r),
                _ => false,
            }).map(|(i, _)| i).collect()
        };
        for o in &case.config.constraints.order {
            let (Some(f), Some(t)) = (&o.first, &o.then) else { continue };
            let first_runs = members(f).iter().any(|m| at.get(m).is_some_and(|s| !s.is_empty()));
            for tm in members(t) {
                for b in starts_of(&tm) {
                    prop_assert!(first_runs, "{:?} starts though {f} runs nowhere{replay}", plan.actions[b]);
                    for fm in members(f) {
                        for a in starts_of(&fm) {
                            prop_assert!(plan.edges.contains(&(a, b)), "{:?} before {:?}", plan.actions[a], plan.actions[b]);
                        }
                    }
                }
            }
        }
    }
}
