//! Many seeds of the whole cluster under faults; zero invariant violations allowed.
//! The real coordinator, agents, fencer and scheduler (haven-sched) run in every seed.
//! A failure prints the seed that replays it.

use std::collections::BTreeSet;

use haven_sim::{SimOptions, run_scheduler};

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
    let mut leader_changes = 0;
    for seed in 0..seeds() {
        let opts = SimOptions {
            seed,
            ..SimOptions::default()
        };
        let report = run_scheduler(opts);
        faults += report.crashes + report.partitions;
        leader_changes += report.leader_changes;
        if !report.violations.is_empty() {
            failed.push((seed, report));
        }
    }
    assert!(faults > 0, "the runs must actually inject faults");
    assert!(
        leader_changes > 0,
        "the runs must change leaders without failures too"
    );
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
        let report = run_scheduler(opts);
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
    let a = run_scheduler(opts.clone());
    let b = run_scheduler(opts);
    for line in &a.log {
        println!("{line}");
    }
    assert_eq!(a.log, b.log, "a seed must replay exactly");
    assert!(a.violations.is_empty(), "{:?}", a.violations);
}
