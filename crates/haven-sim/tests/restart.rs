//! A daemon-only restart in a healthy three-node cluster, scripted with no random
//! faults: the node is not lost, so only the new incarnation in its heartbeats tells
//! the coordinator that the new daemon (no lease yet: policy stop) stopped what ran there.

use std::time::Duration;

use haven_sim::{Fault, FaultOptions, SimOptions, run_scheduler};

#[test]
fn a_daemon_restarted_alone_is_reprobed_and_its_resources_run_again() {
    let mut stopped_somewhere = false;
    for node in ["n2", "n3"] {
        let opts = SimOptions {
            seed: 11,
            faults: FaultOptions::none(),
            safety_phase: Duration::from_secs(20),
            liveness_phase: Duration::from_secs(20),
            script: vec![(
                Duration::from_secs(5),
                Fault::RestartDaemon(node.into(), Duration::from_millis(300)),
            )],
            ..SimOptions::default()
        };
        let report = run_scheduler(opts);
        let log = report.log.join("\n");
        assert!(
            report.violations.is_empty(),
            "{:?}\n{log}",
            report.violations
        );
        assert_eq!(report.daemon_restarts, 1);
        assert_eq!(
            report.fences, 0,
            "a daemon restart is not a node failure:\n{log}"
        );
        // Whatever it stopped is started again within the safety phase, without an
        // operator's cleanup: the coordinator looked again because of the incarnation.
        let stopped = log.contains(&format!("{node} has no quorum lease: stops"));
        stopped_somewhere |= stopped;
        if stopped {
            assert!(
                log.contains(&format!("{node}'s daemon restarted")),
                "the coordinator never noticed:\n{log}"
            );
            let after = log
                .split(&format!("{node} has no quorum lease: stops"))
                .nth(1)
                .unwrap_or_default();
            let before_liveness = after.split("liveness phase").next().unwrap_or_default();
            assert!(
                before_liveness.contains(&format!("Start on {node} -> Ok")),
                "nothing was started on {node} again before the liveness phase:\n{log}"
            );
        }
    }
    assert!(
        stopped_somewhere,
        "neither restart stopped anything: the scenario tests nothing"
    );
}
