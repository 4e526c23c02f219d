//! The real `fence_ipmilan` fences a lab node through Debian openipmi's BMC simulator
//! (`ipmi_sim` on 127.0.0.1, powering a stand-in host process), with the password in a
//! file that the configuration only names. The node's daemon is powered off by the
//! lab first; the BMC's power-off is what the cluster waits for.

mod common;

use common::*;
use haven_testkit::bmc::Bmc;

const PASSWORD: &str = "Kp4-bmc-secret";

#[test]
fn fence_ipmilan_against_ipmi_sim_fences_a_lab_node_with_a_referenced_password() {
    let _one = lock();
    let lab = Lab::up();
    let bmc = Bmc::start(&lab.dir, PASSWORD);
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
