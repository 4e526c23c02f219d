//! Many seeds of the whole cluster under faults; zero invariant violations allowed.
//! A failure prints the seed that replays it.

use std::collections::BTreeSet;

use haven_ha::{ClusterView, NodeState, Observed, Plan, Planner, Step};
use haven_sim::{SimOptions, run};

/// Places each resource on the least-loaded eligible node, keeping it where it runs
/// (stickiness), fencing a node in doubt before recovering what it held. A stand-in
/// until the simulator drives haven-sched's scheduler.
struct Spread;

impl Planner for Spread {
    fn plan(&mut self, view: &ClusterView) -> Plan {
        let mut plan = Plan::default();
        let mut load: std::collections::BTreeMap<&str, usize> = view
            .nodes
            .iter()
            .filter(|(_, s)| **s == NodeState::Online)
            .map(|(n, _)| (n.as_str(), 0))
            .collect();
        for per_node in view.resources.values() {
            for (n, o) in per_node {
                if *o == Observed::Started
                    && let Some(l) = load.get_mut(n.as_str())
                {
                    *l += 1;
                }
            }
        }
        for (r, per_node) in &view.resources {
            let failed_on = |n: &str| {
                view.failcounts
                    .get(r)
                    .and_then(|f| f.get(n))
                    .is_some_and(|c| *c > 0)
            };
            let healthy: Vec<&str> = per_node
                .iter()
                .filter(|(n, o)| {
                    **o == Observed::Started && view.nodes.get(*n) == Some(&NodeState::Online)
                })
                .map(|(n, _)| n.as_str())
                .collect();
            let target = healthy.first().copied().or_else(|| {
                load.iter()
                    .filter(|(n, _)| !failed_on(n))
                    .min_by_key(|(n, l)| (**l, **n))
                    .map(|(n, _)| *n)
            });
            let mut before = Vec::new();
            for (n, o) in per_node {
                if !o.maybe_active() || Some(n.as_str()) == target && *o == Observed::Started {
                    continue;
                }
                let step = if view.nodes.get(n) == Some(&NodeState::Unclean) {
                    Step::Fence { node: n.clone() }
                } else {
                    Step::Stop {
                        resource: r.clone(),
                        node: n.clone(),
                    }
                };
                let idx = match plan.steps.iter().position(|s| *s == step) {
                    Some(i) => i,
                    None => {
                        plan.steps.push(step);
                        plan.steps.len() - 1
                    }
                };
                before.push(idx);
            }
            if let Some(t) = target
                && per_node.get(t) != Some(&Observed::Started)
            {
                if let Some(l) = load.get_mut(t) {
                    *l += 1;
                }
                plan.steps.push(Step::Start {
                    resource: r.clone(),
                    node: t.to_string(),
                });
                let start = plan.steps.len() - 1;
                plan.edges.extend(before.into_iter().map(|b| (b, start)));
            }
        }
        plan
    }
}

fn seeds() -> u64 {
    std::env::var("HAVEN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn many_seeds_never_run_twice_and_always_recover() {
    let mut failed = Vec::new();
    let mut faults = 0;
    for seed in 0..seeds() {
        let opts = SimOptions {
            seed,
            ..SimOptions::default()
        };
        let report = run(opts, || Spread);
        faults += report.crashes + report.partitions;
        if !report.violations.is_empty() {
            failed.push((seed, report));
        }
    }
    assert!(faults > 0, "the runs must actually inject faults");
    if let Some((seed, report)) = failed.first() {
        let tail: Vec<_> = report.log.iter().rev().take(40).rev().cloned().collect();
        panic!(
            "{} of {} seeds broke an invariant; first: seed {seed}: {}\n\
             replay: HAVEN_SIM_SEED={seed} cargo test -p haven-sim replay -- --nocapture\n{}",
            failed.len(),
            seeds(),
            report
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            tail.join("\n")
        );
    }
}

/// The classic mistake — recovering a lost node's resources without fencing it — must
/// be caught: the cut-off node keeps running them until its lease runs out.
#[test]
fn recovery_without_fencing_is_caught() {
    let mut caught = BTreeSet::new();
    for seed in 0..200 {
        let opts = SimOptions {
            seed,
            stonith_enabled: false,
            ..SimOptions::default()
        };
        let report = run(opts, || Spread);
        if report
            .violations
            .iter()
            .any(|v| matches!(v, haven_sim::Violation::RunningTwice { .. }))
        {
            caught.insert(seed);
        }
    }
    assert!(
        !caught.is_empty(),
        "no seed caught recovery without fencing: the checker is blind"
    );
}

/// Replays one seed with its whole log: `HAVEN_SIM_SEED=N`.
#[test]
fn replay() {
    let seed = std::env::var("HAVEN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let opts = SimOptions {
        seed,
        ..SimOptions::default()
    };
    let a = run(opts.clone(), || Spread);
    let b = run(opts, || Spread);
    for line in &a.log {
        println!("{line}");
    }
    assert_eq!(a.log, b.log, "a seed must replay exactly");
    assert!(a.violations.is_empty(), "{:?}", a.violations);
}
