//! The real `fence_ipmilan` against Debian openipmi's BMC simulator `ipmi_sim` on
//! 127.0.0.1, powering a stand-in node process (`startcmd`).

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use haven_exec::{FenceAction, FenceAgentSpec, FenceOutcome, PowerState, Secret, run_fence};

const T: Duration = Duration::from_secs(30);

/// A BMC simulator in its own process group (the node process it starts joins it).
struct Bmc {
    child: Child,
    port: u16,
}

impl Drop for Bmc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.wait();
    }
}

impl Bmc {
    fn start(dir: &Path, password: &str) -> Bmc {
        for (bin, pkg) in [
            ("/usr/bin/ipmi_sim", "openipmi"),
            ("/usr/sbin/fence_ipmilan", "fence-agents"),
            ("/usr/bin/ipmitool", "ipmitool"),
        ] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install -y --no-install-recommends {pkg}"
            );
        }
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let serial = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Power commands are refused without a system-interface serial channel.
        let conf = format!(
            "name \"haventest\"\n\
             set_working_mc 0x20\n\
             startlan 1\n\
             addr 127.0.0.1 {port}\n\
             priv_limit admin\n\
             allowed_auths_callback none md2 md5 straight\n\
             allowed_auths_user none md2 md5 straight\n\
             allowed_auths_operator none md2 md5 straight\n\
             allowed_auths_admin none md2 md5 straight\n\
             guid a123456789abcdefa123456789abcdef\n\
             endlan\n\
             serial 15 127.0.0.1 {serial} codec VM\n\
             startcmd \"/bin/sleep 3600\"\n\
             startnow true\n\
             poweroff_wait 2\n\
             kill_wait 2\n\
             user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n"
        );
        std::fs::write(dir.join("lan.conf"), conf).unwrap();
        std::fs::write(
            dir.join("cmds"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        use std::os::unix::process::CommandExt;
        let child = Command::new("ipmi_sim")
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("cmds"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdout(std::fs::File::create(dir.join("sim.log")).unwrap())
            .stderr(std::fs::File::create(dir.join("sim.err")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        Bmc { child, port }
    }

    /// Whether the simulated node's process (`sleep`, in the simulator's group) runs.
    fn node_running(&self) -> bool {
        let pgid = self.child.id().to_string();
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            let Some(close) = stat.rfind(')') else {
                return false;
            };
            let comm = stat.split_once('(').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            comm.starts_with("sleep)")
                && f.first() != Some(&"Z")
                && f.get(2) == Some(&pgid.as_str())
        })
    }
}

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
    assert!(bmc.node_running());

    let r = run_fence(&a, FenceAction::Off, "node1", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    let r = run_fence(&a, FenceAction::Status, "node1", T).await;
    assert_eq!(r.power, Some(PowerState::Off), "{r:?}");
    assert!(!bmc.node_running(), "the node process survived power off");

    let r = run_fence(&a, FenceAction::On, "node1", T).await;
    assert_eq!(r.outcome, FenceOutcome::Success, "{r:?}");
    assert!(bmc.node_running(), "power on did not start the node");

    // A wrong password fails, and is not echoed back either.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "Wr0ng-secret").unwrap();
    let r = run_fence(&agent(&bmc, &wrong), FenceAction::Status, "node1", T).await;
    assert!(matches!(r.outcome, FenceOutcome::Failed { .. }), "{r:?}");
    assert!(!format!("{r:?}").contains("Wr0ng-secret"));
}
