//! The real `fence_ipmilan` against Debian openipmi's BMC simulator `ipmi_sim` on
//! 127.0.0.1, powering a stand-in node process (`startcmd`).

use std::path::Path;
use std::time::Duration;

use haven_exec::{FenceAction, FenceAgentSpec, FenceOutcome, PowerState, Secret, run_fence};
use haven_testkit::bmc::Bmc;

const T: Duration = Duration::from_secs(30);

fn agent(bmc: &Bmc, password_file: &Path) -> FenceAgentSpec {
    let mut a = FenceAgentSpec::new("fence_ipmilan")
        .param("ip", "127.0.0.1")
        .param("ipport", bmc.port.to_string())
        .param("username", "admin")
        .param("lanplus", "1")
        .param("cipher", "3");
    a.secret = Some(Secret::File(password_file.to_path_buf()));
    // One BMC controls one node: no plug.
    a.host_argument = None;
    a
}

async fn status_until(a: &FenceAgentSpec, want: PowerState) -> bool {
    for _ in 0..50 {
        let r = run_fence(a, FenceAction::Status, "node1", T).await;
        if r.power == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn fence_ipmilan_powers_a_simulated_node() {
    let dir = tempfile::tempdir().unwrap();
    let bmc = Bmc::start(dir.path(), "Kp4-bmc-secret");
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "Kp4-bmc-secret\n").unwrap();
    let a = agent(&bmc, &pw);

    // The simulator needs a moment to listen; status answers once it does.
    assert!(
        status_until(&a, PowerState::On).await,
        "the BMC never reported power on"
    );
    assert!(bmc.host_running());

    let r = run_fence(&a, FenceAction::Off, "node1", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    let r = run_fence(&a, FenceAction::Status, "node1", T).await;
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    assert!(!bmc.host_running(), "the node process survived power off");

    let r = run_fence(&a, FenceAction::On, "node1", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    assert!(bmc.host_running(), "power on did not start the node");

    // A wrong password fails, and is not echoed back either.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "Wr0ng-secret").unwrap();
    let r = run_fence(&agent(&bmc, &wrong), FenceAction::Status, "node1", T).await;
    assert!(matches!(r.outcome, FenceOutcome::Failed { .. }), "{r:?}");
    assert!(!format!("{r:?}").contains("Wr0ng-secret"));
}
