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
