//! Many seeds of the whole cluster under faults; zero invariant violations allowed.
//! The real coordinator, agents, fencer and scheduler (haven-sim) run in every seed;
//! each seed draws its world (three nodes, or two without a witness). A failure prints
//! the seed that replays it.

use haven_sim::{Broken, SimOptions, SimReport, Violation, run_scheduler};

fn seeds() -> u64 {
    std::env::var("HAVEN_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

fn tail(report: &SimReport) -> String {
    let lines: Vec<_> = report.log.iter().rev().take(40).rev().cloned().collect();
    lines.join("\n")
}

#[test]
fn many_seeds_never_run_twice_and_always_recover() {
    let mut failed = Vec::new();
    let mut faults = 0;
    let mut leader_changes = 0;
    let mut two_node_worlds = 0;
    let mut lone_fences = 0;
    let mut restarts = 0;
    let mut allows = 0;
    let mut races = 0;
    for seed in 0..seeds() {
        let opts = SimOptions::for_seed(seed);
        two_node_worlds += u32::from(opts.two_node);
        let world = opts.describe();
        let report = run_scheduler(opts);
        faults += report.crashes + report.partitions;
        leader_changes += report.leader_changes;
        lone_fences += report.lone_fences;
        restarts += report.daemon_restarts;
        allows += report.operator_allows;
        races += report.fencing_races;
        if !report.violations.is_empty() {
            failed.push((seed, world, report));
        }
    }
    assert!(faults > 0, "the runs must actually inject faults");
    assert!(
        leader_changes > 0,
        "the runs must change leaders without failures too"
    );
    assert!(two_node_worlds > 0, "some seeds must draw two-node worlds");
    assert!(
        lone_fences > 0,
        "two-node survivors must have fenced their peers alone"
    );
    assert!(
        races > 0,
        "two-node worlds must be cut both ways, both nodes racing to fence"
    );
    assert!(restarts > 0, "the runs must restart daemons");
    assert!(allows > 0, "operators must have let fenced nodes back in");
    if let Some((seed, world, report)) = failed.first() {
        panic!(
            "{} of {} seeds broke an invariant; first: seed {seed} ({world}): {}\n\
             replay: HAVEN_SIM_SEED={seed} cargo test -p haven-sim --test seeds replay -- --nocapture\n{}",
            failed.len(),
            seeds(),
            report
                .violations
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
            tail(report)
        );
    }
}

/// The first seed (of the CI count) on which `broken` breaks an invariant that
/// `caught` accepts, among the worlds `fits` accepts.
fn first_catch(
    fits: impl Fn(&SimOptions) -> bool,
    change: impl Fn(&mut SimOptions),
    caught: impl Fn(&Violation) -> bool,
) -> Option<(u64, SimReport)> {
    (0..1000).find_map(|seed| {
        let mut opts = SimOptions::for_seed(seed);
        if !fits(&opts) {
            return None;
        }
        change(&mut opts);
        let world = opts.describe();
        let report = run_scheduler(opts);
        let hit = report.violations.iter().any(&caught);
        if hit {
            println!("caught on seed {seed} ({world}): {:?}", report.violations);
        }
        hit.then_some((seed, report))
    })
}

/// The classic mistake — recovering a lost node's resources without fencing it — must
/// be caught: the cut-off node keeps running them until its lease runs out.
#[test]
fn recovery_without_fencing_is_caught() {
    let found = first_catch(
        |o| !o.two_node,
        |o| o.stonith_enabled = false,
        |v| matches!(v, Violation::NotFencedFirst { .. }),
    );
    assert!(
        found.is_some(),
        "no seed caught recovery without fencing: the checker is blind"
    );
}

/// A two-node survivor that recovers its peer's resources without waiting for the
/// fence runs them twice when the link is cut both ways.
#[test]
fn a_two_node_survivor_that_does_not_wait_for_its_fence_is_caught() {
    let found = first_catch(
        |o| o.two_node,
        |o| o.broken = Some(Broken::SurvivorSkipsFenceWait),
        |v| matches!(v, Violation::RunningTwice { .. }),
    );
    let Some((_, report)) = found else {
        panic!("no seed caught a survivor that does not wait for its fence");
    };
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::NotFencedFirst { .. })),
        "{:?}",
        report.violations
    );
}

/// A restarted daemon that takes its empty memory for the truth lets a new leader
/// start its still-running resources elsewhere.
#[test]
fn a_restarted_daemon_that_assumes_its_resources_stopped_is_caught() {
    let found = first_catch(
        |_| true,
        |o| o.broken = Some(Broken::RestartAssumesStopped),
        |v| matches!(v, Violation::RunningTwice { .. }),
    );
    let Some((_, report)) = found else {
        panic!("no seed caught a restarted daemon that does not probe");
    };
    assert!(
        report
            .violations
            .iter()
            .any(|v| matches!(v, Violation::StoppedUnprobed { .. })),
        "{:?}",
        report.violations
    );
}

/// Without the two-node rejoin rule (the survivor refuses its vote to the peer it
/// fenced until the mark is committed), the returning peer can lead and let itself in.
#[test]
fn a_fenced_peer_winning_the_election_is_caught() {
    let found = first_catch(
        |o| o.two_node,
        |o| o.broken = Some(Broken::VoteForFencedPeer),
        |v| matches!(v, Violation::FencedNodeBack { .. }),
    );
    assert!(
        found.is_some(),
        "no seed caught a fenced peer let back in without the operator"
    );
}

/// Without the race rules (a fence's answer reaching no coordinator is kept; a
/// confirmed fence of the peer supersedes the doubt it held about the survivor), the
/// winner of a two-node race can be shot by the loser afterwards.
#[test]
fn a_winner_shot_after_its_race_is_caught() {
    for broken in [
        Broken::DropOrphanedFenceResult,
        Broken::DoubtOutlivesPeerFence,
    ] {
        let found = first_catch(
            |o| o.two_node,
            |o| o.broken = Some(broken),
            |v| matches!(v, Violation::WinnerFenced { .. }),
        );
        assert!(found.is_some(), "no seed caught {broken:?}");
    }
}

/// Replays one seed with its whole log: `HAVEN_SIM_SEED=N`.
#[test]
fn replay() {
    let seed = std::env::var("HAVEN_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let opts = SimOptions::for_seed(seed);
    let a = run_scheduler(opts.clone());
    let b = run_scheduler(opts);
    for line in &a.log {
        println!("{line}");
    }
    assert_eq!(a.log, b.log, "a seed must replay exactly");
    assert!(a.violations.is_empty(), "{:?}", a.violations);
}
