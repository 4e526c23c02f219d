//! The real `fence_ipmilan` fences a lab node through Debian openipmi's BMC simulator
//! (`ipmi_sim` on 127.0.0.1, powering a stand-in host process), with the password in a
//! file that the configuration only names. The node's daemon is powered off by the
//! lab first; the BMC's power-off is what the cluster waits for.

mod common;

use std::path::Path;
use std::process::{Child, Command};

use common::*;

const PASSWORD: &str = "Kp4-bmc-secret";

/// A BMC simulator in its own process group (the host process it starts joins it).
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
    fn start(dir: &Path) -> Bmc {
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
        let free_udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp port");
        let port = free_udp.local_addr().expect("addr").port();
        let free_tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp port");
        let serial = free_tcp.local_addr().expect("addr").port();
        drop((free_udp, free_tcp));
        // Power commands are refused without a system-interface serial channel.
        let conf = format!(
            "name \"havenlab\"\n\
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
             user 2 true \"admin\" \"{PASSWORD}\" admin 10 none md2 md5 straight\n"
        );
        std::fs::write(dir.join("lan.conf"), conf).expect("lan.conf");
        std::fs::write(
            dir.join("cmds"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02\nmc_enable 0x20\n",
        )
        .expect("cmds");
        std::fs::create_dir_all(dir.join("state")).expect("state dir");
        use std::os::unix::process::CommandExt;
        let child = Command::new("/usr/bin/ipmi_sim")
            .arg("-c")
            .arg(dir.join("lan.conf"))
            .arg("-f")
            .arg(dir.join("cmds"))
            .arg("-s")
            .arg(dir.join("state"))
            .arg("-n")
            .stdout(std::fs::File::create(dir.join("sim.log")).expect("sim.log"))
            .stderr(std::fs::File::create(dir.join("sim.err")).expect("sim.err"))
            .process_group(0)
            .spawn()
            .expect("start ipmi_sim");
        Bmc { child, port }
    }

    /// Whether the simulated host (`sleep`, in the simulator's group) is powered.
    fn host_running(&self) -> bool {
        let pgid = self.child.id().to_string();
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
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

#[test]
fn fence_ipmilan_against_ipmi_sim_fences_a_lab_node_with_a_referenced_password() {
    let _one = lock();
    let lab = Lab::up();
    let bmc = Bmc::start(&lab.dir);
    wait_for("the simulated host to be powered", || {
        bmc.host_running().then_some(())
    });
    let pw = lab.dir.join("bmc-password");
    std::fs::write(&pw, format!("{PASSWORD}\n")).expect("password file");
    // The simulated BMC powers one machine: the node that runs svc. Place svc first,
    // then name that node as the device's one host.
    lab.configure("");
    let home = svc_home(&lab);
    lab.configure(&format!(
        "\n[[fencing.devices]]\nid = \"ipmi\"\nagent = \"fence_ipmilan\"\nhosts = [\"{home}\"]\npassword-file = \"{}\"\nparams = {{ ip = \"127.0.0.1\", ipport = \"{}\", username = \"admin\", lanplus = \"1\", cipher = \"3\", pcmk_host_argument = \"none\", pcmk_action = \"off\" }}\n",
        pw.display(),
        bmc.port
    ));
    assert_eq!(svc_home(&lab), home, "svc stays where it runs (stickiness)");
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    let survivor = wait_for("svc to run on a survivor", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    assert!(!bmc.host_running(), "the BMC did not power the host off");
    let h = wait_for("the fence to be committed", || {
        let h = lab.fence_history(&lab.client_of(&survivor));
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(
        (&h[0]["victim"], &h[0]["device"], &h[0]["ok"]),
        (
            &serde_json::json!(home),
            &serde_json::json!("ipmi"),
            &serde_json::json!(true)
        ),
        "{h:?}"
    );
    // The password is referenced, never stored, logged or reported.
    let config = ok(lab.run(&["config", "show"]));
    assert!(!config.contains(PASSWORD));
    assert!(!format!("{h:?}").contains(PASSWORD));
    for n in NODES {
        let log = std::fs::read_to_string(lab.dir.join(n).join("daemon.log")).unwrap_or_default();
        assert!(!log.contains(PASSWORD), "{n}'s log holds the password");
    }
}
