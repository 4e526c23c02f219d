//! Dual-primary migration windows: when the Promoted copy of a replicated volume moves
//! from A to B while guests on it live-migrate along, the usual plan (demote A, then
//! promote B, then start the guests) forces the guests to stop, because a guest cannot
//! run anywhere without a primary under it. A window plan instead promotes B while A is
//! still primary, migrates the guests A → B, stops their sources, and only then demotes
//! A. The volume has two primaries exactly between that promote and that demote; the
//! promote names A (its migration source) so the replicas open the window for that pair
//! only.
//!
//! Which clones open windows: Haven's own `volume` class, whose replicas support a
//! runtime window (DRBD would need `allow-two-primaries` for good). Pacemaker's clones
//! (imported CIBs) never have that class, so their plans are exactly Pacemaker's.

use std::collections::BTreeSet;

use haven_model::{Config, Role, Score};

use crate::plan::{Action, Plan};

/// The resource class whose promotable clones may open a migration window.
pub const WINDOW_CLASS: &str = "volume";

/// One migration window in a plan (indices into [`Plan::actions`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    /// The promote on the target, which opens the window.
    pub promote: usize,
    /// The demote on the source, which closes it.
    pub demote: usize,
    /// The node whose primary stays up during the window.
    pub source: String,
    /// The node that becomes primary.
    pub target: String,
    /// The guests' `migrate_to` actions the window carries.
    pub migrations: Vec<usize>,
    /// The promotable clone.
    pub clone: String,
}

/// The windows a plan holds: a window-capable clone demoted on A and promoted on B,
/// both copies staying up, with at least one resource colocated with its Promoted
/// role live-migrating A → B and nothing colocated with it starting on B the ordinary
/// way while it still runs on A (that one would need the volume alone on B first).
pub fn windows(cfg: &Config, plan: &Plan) -> Vec<Window> {
    let mut out = Vec::new();
    for clone in cfg.clones.iter().filter(|c| c.promotable) {
        let Some(child) = cfg.resources.iter().find(|p| p.id == clone.child) else {
            continue;
        };
        if child.class != WINDOW_CLASS {
            continue;
        }
        let deps = dependents(cfg, &clone.id);
        if deps.is_empty() {
            continue;
        }
        let of_child = |r: &str| base(r) == child.id;
        let demotes = plan
            .actions
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a {
                Action::Demote { resource, node } if of_child(resource) => Some((i, node)),
                _ => None,
            });
        for (demote, a) in demotes {
            let stops_on = |n: &str| {
                plan.actions.iter().any(|x| {
                    matches!(x, Action::Stop { resource, node } if of_child(resource) && node == n)
                })
            };
            let promote = plan.actions.iter().enumerate().find_map(|(i, x)| match x {
                Action::Promote { resource, node } if of_child(resource) && node != a => {
                    Some((i, node))
                }
                _ => None,
            });
            let Some((promote, b)) = promote else {
                continue;
            };
            // The source's replica may stop afterwards (its node drains): the guest
            // still leaves live through the window, and the replica stops once demoted.
            // A target whose replica stops has nothing to receive the guest.
            if stops_on(b) {
                continue;
            }
            let migrations: Vec<usize> = plan
                .actions
                .iter()
                .enumerate()
                .filter_map(|(i, x)| match x {
                    Action::MigrateTo {
                        resource,
                        source,
                        target,
                    } if deps.contains(resource.as_str()) && source == a && target == b => Some(i),
                    _ => None,
                })
                .collect();
            if migrations.is_empty() {
                continue;
            }
            out.push(Window {
                promote,
                demote,
                source: a.clone(),
                target: b.clone(),
                migrations,
                clone: clone.id.clone(),
            });
        }
    }
    out
}

/// Reorders the plan's windows: the promote comes before the guests' migrations and
/// no longer waits for the demote (which still waits for the sources' stops).
pub fn open_windows(cfg: &Config, plan: &mut Plan) {
    for w in windows(cfg, plan) {
        let before = plan.edges.clone();
        plan.edges
            .retain(|&(x, y)| !(x == w.demote && y == w.promote));
        for &m in &w.migrations {
            plan.edges.push((w.promote, m));
        }
        // What leaves A the ordinary way still leaves it before the volume is demoted
        // there, and comes up on B only once the volume is primary there.
        let deps = dependents(cfg, &w.clone);
        for (i, a) in plan.actions.iter().enumerate() {
            match a {
                Action::Stop { resource, node }
                    if *node == w.source && deps.contains(resource.as_str()) =>
                {
                    plan.edges.push((i, w.demote));
                }
                Action::Start { resource, node }
                    if *node == w.target && deps.contains(resource.as_str()) =>
                {
                    plan.edges.push((w.promote, i));
                }
                _ => {}
            }
        }
        // Something else still forcing the demote first would now be a cycle: that
        // plan keeps its ordinary order.
        if reaches(plan, w.demote, w.promote) {
            plan.edges = before;
        }
        plan.edges.sort_unstable();
        plan.edges.dedup();
    }
}

/// Is there a path of edges from `from` to `to`?
fn reaches(plan: &Plan, from: usize, to: usize) -> bool {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from];
    while let Some(x) = todo.pop() {
        if x == to {
            return true;
        }
        if seen.insert(x) {
            todo.extend(plan.edges.iter().filter(|e| e.0 == x).map(|e| e.1));
        }
    }
    false
}

/// Primitives colocated (INFINITY) with `clone`'s Promoted role, directly or as members
/// of a group that is.
fn dependents<'a>(cfg: &'a Config, clone: &str) -> BTreeSet<&'a str> {
    let mut out = BTreeSet::new();
    for c in &cfg.constraints.colocation {
        if c.with.as_deref() != Some(clone)
            || c.with_role != Some(Role::Promoted)
            || c.score != Score::INFINITY
        {
            continue;
        }
        let Some(rsc) = c.rsc.as_deref() else {
            continue;
        };
        match cfg.groups.iter().find(|g| g.id == rsc) {
            Some(g) => out.extend(g.members.iter().map(String::as_str)),
            None => {
                out.insert(rsc);
            }
        }
    }
    out
}

/// A clone copy's primitive: `vol1:0` → `vol1`.
fn base(r: &str) -> &str {
    match r.rsplit_once(':') {
        Some((b, n)) if n.parse::<u32>().is_ok() => b,
        _ => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_model::State;

    fn config(class: &str, extra: &str) -> Config {
        let text = format!(
            r#"
[options]
stonith-enabled = false

[[nodes]]
name = "m1"

[[nodes]]
name = "m2"

[[resources]]
id = "disk0"
class = "{class}"
type = "volume"

[[clones]]
id = "disk0-clone"
child = "disk0"
clone-max = 2
promotable = true
promoted-max = 1

[[constraints.location]]
id = "p1"
rsc = "disk0-clone"
role = "Promoted"
node = "m1"
score = "10"

[[constraints.location]]
id = "p2"
rsc = "disk0-clone"
role = "Promoted"
node = "m2"
score = "10"

[[resources]]
id = "vm1"
class = "qemu"
type = "vm"
meta = {{ allow-migrate = true }}

[[constraints.location]]
id = "cli-prefer-vm1"
rsc = "vm1"
node = "m2"
score = "INFINITY"

[[constraints.colocation]]
id = "vm1-with-primary"
rsc = "vm1"
with = "disk0-clone"
with-role = "Promoted"
score = "INFINITY"

[[constraints.order]]
id = "promote-before-vm1"
first = "disk0-clone"
first-action = "promote"
then = "vm1"
then-action = "start"
{extra}
"#
        );
        Config::from_toml("test.toml", &text).expect("a valid test configuration")
    }

    fn state(extra: &str) -> State {
        let text = format!(
            r#"{{ "have_quorum": true,
  "nodes": {{ "m1": {{"state":"online"}}, "m2": {{"state":"online"}} }},
  "resources": {{ "disk0": {{ "m1": {{"role":"Promoted"}}, "m2": {{"role":"Unpromoted"}} }},
                 "vm1": {{"m1": {{"role":"Started"}}}} {extra} }} }}"#
        );
        serde_json::from_str(&text).expect("a valid test state")
    }

    fn index(plan: &Plan, want: &Action) -> usize {
        plan.actions
            .iter()
            .position(|a| a == want)
            .unwrap_or_else(|| panic!("{want:?} not in {:#?}", plan.actions))
    }

    fn act(kind: &str, resource: &str, node: &str) -> Action {
        let (resource, node) = (resource.to_string(), node.to_string());
        match kind {
            "promote" => Action::Promote { resource, node },
            "demote" => Action::Demote { resource, node },
            "stop" => Action::Stop { resource, node },
            _ => Action::Start { resource, node },
        }
    }

    fn migrate(to: bool) -> Action {
        let (resource, source, target) = ("vm1".into(), "m1".into(), "m2".into());
        if to {
            Action::MigrateTo {
                resource,
                source,
                target,
            }
        } else {
            Action::MigrateFrom {
                resource,
                source,
                target,
            }
        }
    }

    #[test]
    fn a_volume_primary_moving_with_its_guest_promotes_first_and_demotes_last() {
        let cfg = config("volume", "");
        let plan = crate::schedule(&cfg, &state(""));
        let promote = index(&plan, &act("promote", "disk0:1", "m2"));
        let demote = index(&plan, &act("demote", "disk0:0", "m1"));
        let to = index(&plan, &migrate(true));
        let from = index(&plan, &migrate(false));
        let stop = index(&plan, &act("stop", "vm1", "m1"));
        for (a, b) in [
            (promote, to),
            (promote, from),
            (to, from),
            (from, stop),
            (stop, demote),
        ] {
            assert!(
                reaches(&plan, a, b),
                "{:?} must precede {:?}: {:?}",
                plan.actions[a],
                plan.actions[b],
                plan.edges
            );
        }
        assert!(!reaches(&plan, demote, promote), "{:?}", plan.edges);
        assert_eq!(
            windows(&cfg, &plan),
            vec![Window {
                promote,
                demote,
                source: "m1".into(),
                target: "m2".into(),
                migrations: vec![to],
                clone: "disk0-clone".into(),
            }]
        );
        assert!(
            plan.transition_summary()
                .iter()
                .any(|l| l.contains("Migrate") && l.contains("vm1")),
            "{:?}",
            plan.transition_summary()
        );
    }

    #[test]
    fn a_clone_of_another_class_keeps_the_plan_it_had() {
        let cfg = config("process", "");
        let plan = crate::schedule(&cfg, &state(""));
        assert!(windows(&cfg, &plan).is_empty());
        let mut unchanged = plan.clone();
        open_windows(&cfg, &mut unchanged);
        assert_eq!(unchanged, plan);
        let promote = index(&plan, &act("promote", "disk0:1", "m2"));
        let to = index(&plan, &migrate(true));
        assert!(!reaches(&plan, promote, to), "{:?}", plan.edges);
    }

    #[test]
    fn no_window_without_a_guest_that_migrates() {
        // vm1 may not migrate: it stops on m1 and starts on m2 after the promote.
        let mut cfg = config("volume", "");
        if let Some(vm) = cfg.resources.iter_mut().find(|r| r.id == "vm1") {
            vm.meta.allow_migrate = Some(false);
        }
        let plan = crate::schedule(&cfg, &state(""));
        assert!(windows(&cfg, &plan).is_empty());
        let stop = index(&plan, &act("stop", "vm1", "m1"));
        let start = index(&plan, &act("start", "vm1", "m2"));
        let promote = index(&plan, &act("promote", "disk0:1", "m2"));
        assert!(reaches(&plan, stop, start) && reaches(&plan, promote, start));
    }

    #[test]
    fn a_group_member_that_cannot_migrate_still_stops_on_the_source_and_starts_on_the_target() {
        let extra = r#"
[[resources]]
id = "vm2"
class = "qemu"
type = "vm"
meta = { allow-migrate = true }

[[resources]]
id = "tag"
class = "process"
type = "sleep"

[[groups]]
id = "g"
members = ["vm2", "tag"]

[[constraints.colocation]]
id = "g-with-primary"
rsc = "g"
with = "disk0-clone"
with-role = "Promoted"
score = "INFINITY"
"#;
        let cfg = config("volume", extra);
        let st = state(r#", "vm2": {"m1": {"role":"Started"}}, "tag": {"m1": {"role":"Started"}}"#);
        let plan = crate::schedule(&cfg, &st);
        let w = windows(&cfg, &plan);
        assert_eq!(w.len(), 1, "{:#?}", plan.actions);
        let stop = index(&plan, &act("stop", "tag", "m1"));
        let start = index(&plan, &act("start", "tag", "m2"));
        let demote = index(&plan, &act("demote", "disk0:0", "m1"));
        assert!(reaches(&plan, stop, start), "{:?}", plan.edges);
        assert!(reaches(&plan, stop, demote), "{:?}", plan.edges);
        assert!(reaches(&plan, w[0].promote, start), "{:?}", plan.edges);
        assert!(!reaches(&plan, demote, w[0].promote), "{:?}", plan.edges);
    }

    #[test]
    fn draining_the_primarys_node_moves_the_guest_live_and_stops_the_replica_after_the_demote() {
        let mut cfg = config("volume", "");
        if let Some(m1) = cfg.nodes.iter_mut().find(|n| n.name == "m1") {
            m1.standby = true;
        }
        let plan = crate::schedule(&cfg, &state(""));
        let w = windows(&cfg, &plan);
        assert_eq!(w.len(), 1, "{:#?}", plan.actions);
        let to = index(&plan, &migrate(true));
        let from = index(&plan, &migrate(false));
        let stop_vm = index(&plan, &act("stop", "vm1", "m1"));
        let demote = index(&plan, &act("demote", "disk0:0", "m1"));
        let stop_replica = index(&plan, &act("stop", "disk0:0", "m1"));
        for (a, b) in [
            (w[0].promote, to),
            (w[0].promote, from),
            (from, stop_vm),
            (stop_vm, demote),
            (demote, stop_replica),
        ] {
            assert!(
                reaches(&plan, a, b),
                "{:?} must precede {:?}: {:?}",
                plan.actions[a],
                plan.actions[b],
                plan.edges
            );
        }
        assert!(!reaches(&plan, demote, w[0].promote), "{:?}", plan.edges);
    }
}
