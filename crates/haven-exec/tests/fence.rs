//! The real `fence_dummy` from Debian's fence-agents, over the stdin protocol.

use std::time::Duration;

use haven_exec::{FenceAction, FenceAgentSpec, FenceOutcome, PowerState, Secret, run_fence};

const T: Duration = Duration::from_secs(30);

fn dummy(dir: &std::path::Path) -> FenceAgentSpec {
    assert!(
        std::path::Path::new("/usr/sbin/fence_dummy").exists(),
        "/usr/sbin/fence_dummy is missing: apt-get install -y --no-install-recommends fence-agents"
    );
    let mut s = FenceAgentSpec::new("fence_dummy")
        .param("type", "file")
        .param("status_file", dir.join("status").display().to_string());
    // fence_dummy controls one thing; it takes no plug.
    s.host_argument = None;
    s
}

#[tokio::test]
async fn fence_dummy_off_on_status() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status"), "on").unwrap();
    let a = dummy(dir.path());
    let r = run_fence(&a, FenceAction::Status, "node2", T).await;
    assert_eq!(
        (r.outcome.clone(), r.power),
        (FenceOutcome::Success, Some(PowerState::On)),
        "{r:?}"
    );
    let r = run_fence(&a, FenceAction::Off, "node2", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    let r = run_fence(&a, FenceAction::Status, "node2", T).await;
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    let r = run_fence(&a, FenceAction::On, "node2", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    let r = run_fence(&a, FenceAction::Status, "node2", T).await;
    assert_eq!(r.power, Some(PowerState::On), "{r:?}");
    let r = run_fence(&a, FenceAction::Monitor, "node2", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
}

#[tokio::test]
async fn password_from_a_file_never_shows_in_output() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status"), "on").unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "Zq7-not-for-logs\n").unwrap();
    let mut a = dummy(dir.path());
    a.secret = Some(Secret::File(pw));
    // fence_dummy takes no password: fence-agents echo the unknown line on stderr,
    // which is exactly what must be redacted.
    let r = run_fence(&a, FenceAction::Status, "node2", T).await;
    assert_eq!(r.power, Some(PowerState::On), "{r:?}");
    let all = format!("{r:?}");
    assert!(!all.contains("Zq7-not-for-logs"), "secret leaked: {all}");
    assert!(
        r.stderr.contains(haven_exec::fence::REDACTED),
        "expected the agent to echo the (redacted) line: {}",
        r.stderr
    );
}

#[tokio::test]
async fn password_from_a_script() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status"), "off").unwrap();
    let script = dir.path().join("pw.sh");
    std::fs::write(&script, "#!/bin/sh\necho Yx8-script-secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut a = dummy(dir.path());
    a.secret = Some(Secret::Script(script));
    let r = run_fence(&a, FenceAction::Status, "node2", T).await;
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    assert!(!format!("{r:?}").contains("Yx8-script-secret"));
}

#[tokio::test]
async fn a_failing_agent_is_a_failure_and_a_slow_one_times_out() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status"), "on").unwrap();
    let a = dummy(dir.path()).param("type", "fail");
    // With type=fail, `off` keeps polling for a state change that never comes: it
    // runs until our timeout kills it.
    let r = run_fence(&a, FenceAction::Off, "node2", Duration::from_secs(2)).await;
    assert_eq!(r.outcome, FenceOutcome::Timeout, "{r:?}");
    let bad = FenceAgentSpec::new("fence_dummy").param("password", "inline");
    let r = run_fence(&bad, FenceAction::Off, "node2", T).await;
    assert_eq!(r.outcome, FenceOutcome::CannotRun);
    assert!(r.notes[0].contains("must not be written in the configuration"));
    assert!(!format!("{r:?}").contains("inline\""), "{r:?}");
    let missing = FenceAgentSpec::new("fence_nosuchagent");
    let r = run_fence(&missing, FenceAction::Status, "node2", T).await;
    assert_eq!(r.outcome, FenceOutcome::CannotRun, "{r:?}");
}
