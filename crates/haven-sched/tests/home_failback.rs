//! Home nodes (the seeds' `domain_home`): a guest prefers its home; with failback it
//! returns there even against stickiness, without it it stays where it runs.

use haven_model::{Config, State};
use haven_sched::schedule;

const CONFIG: &str = r#"
[options]
resource-stickiness = 100
stonith-enabled = false

[[nodes]]
name = "m1"
[[nodes]]
name = "m2"

[[resources]]
id = "vm1"
class = "qemu"
type = "vm"
home = "m1"
failback = FAILBACK
meta = { allow-migrate = true }
"#;

fn summary(failback: bool, state: &str) -> Vec<String> {
    let cfg = Config::from_toml("c.toml", &CONFIG.replace("FAILBACK", &failback.to_string()))
        .expect("valid");
    let st = State::from_json("s.json", state).expect("valid");
    schedule(&cfg, &st)
        .transition_summary()
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

const RUNNING_AWAY: &str = r#"{"nodes": {"m1": {"state": "online"}, "m2": {"state": "online"}},
  "resources": {"vm1": {"m2": {"role": "Started"}}}}"#;

#[test]
fn failback_brings_the_guest_home_by_live_migration() {
    assert_eq!(
        summary(true, RUNNING_AWAY),
        vec!["* Migrate vm1 ( m2 -> m1 )"]
    );
}

#[test]
fn without_failback_stickiness_keeps_it_where_it_runs() {
    assert!(summary(false, RUNNING_AWAY).is_empty());
}

#[test]
fn a_stopped_guest_starts_at_home() {
    let st = r#"{"nodes": {"m1": {"state": "online"}, "m2": {"state": "online"}}}"#;
    assert_eq!(summary(false, st), vec!["* Start vm1 ( m1 )"]);
}

#[test]
fn with_home_down_it_runs_elsewhere() {
    let st = r#"{"nodes": {"m1": {"state": "offline"}, "m2": {"state": "online"}}}"#;
    assert_eq!(summary(true, st), vec!["* Start vm1 ( m2 )"]);
}

const AT_HOME: &str = r#"{"nodes": {"m1": {"state": "online"}, "m2": {"state": "online"}},
  "resources": {"vm1": {"m1": {"role": "Started"}}}}"#;

/// `haven resource move vm1 m2` adds this constraint; `resource clear` removes it.
const MOVED_TO_M2: &str = r#"
[[constraints.location]]
id = "cli-prefer-vm1"
rsc = "vm1"
node = "m2"
score = "INFINITY"
"#;

fn summary_with(extra: &str, stickiness: &str, state: &str) -> Vec<String> {
    let text = CONFIG.replace("FAILBACK", "true").replace(
        "resource-stickiness = 100",
        &format!("resource-stickiness = {stickiness}"),
    ) + extra;
    let cfg = Config::from_toml("c.toml", &text).expect("valid");
    let st = State::from_json("s.json", state).expect("valid");
    schedule(&cfg, &st)
        .transition_summary()
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn an_operators_move_outranks_the_failback_home_while_it_stands() {
    // Stickiness on the home node must not lift it into a tie with the move.
    for stickiness in ["0", "100", "10000"] {
        assert_eq!(
            summary_with(MOVED_TO_M2, stickiness, AT_HOME),
            vec!["* Migrate vm1 ( m1 -> m2 )"],
            "stickiness {stickiness}"
        );
        assert!(
            summary_with(MOVED_TO_M2, stickiness, RUNNING_AWAY).is_empty(),
            "stickiness {stickiness}: the moved guest stays moved"
        );
    }
}

#[test]
fn once_the_move_is_cleared_failback_takes_it_home() {
    assert_eq!(
        summary_with("", "10000", RUNNING_AWAY),
        vec!["* Migrate vm1 ( m2 -> m1 )"]
    );
}
