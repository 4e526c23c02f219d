//! Failure handling with real daemons on a loopback lab: a node is powered off or cut
//! off, it is fenced (lab power switch, real `fence_dummy`, manual ack, watchdog), and
//! its `process` resource comes back on a survivor. A checker polls every node's actual
//! processes (pidfiles + /proc) throughout and must never see the resource twice.
//!
//! The labs run one at a time: fifteen daemons at once on a small CI machine could
//! miss heartbeats and turn a test of failover into a test of the machine.

mod common;

use std::path::Path;

use common::*;

#[test]
fn a_powered_off_node_is_fenced_by_the_lab_switch_and_its_resource_runs_once_on_a_survivor() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    let survivor = wait_for("svc to run on a survivor", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    assert_ne!(survivor, home);
    let other = NODES.iter().find(|n| **n != home).expect("a survivor");
    let history = wait_for("the fence to be committed", || {
        let h = lab.fence_history(&lab.client_of(other));
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(history[0]["victim"], home.as_str(), "{history:?}");
    assert_eq!(history[0]["device"], "power", "{history:?}");
    assert_eq!(history[0]["ok"], true, "{history:?}");
    assert_ne!(history[0]["executor"], home.as_str(), "{history:?}");
    // The cluster's own view agrees: svc runs on the survivor only.
    let status: serde_json::Value = wait_for("status to show svc on the survivor", || {
        let out = haven(&["status", "--json"], Some(&lab.client_of(&survivor)));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let svc = s["resources"]
            .as_array()?
            .iter()
            .find(|r| r["id"] == "svc")?
            .clone();
        (svc["running_on"] == serde_json::json!([survivor])).then_some(s)
    });
    assert_eq!(status["quorate"], true);
}

#[test]
fn with_only_a_manual_device_the_resource_stays_frozen_until_fence_ack() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure("\n[[fencing.devices]]\nid = \"operator\"\nagent = \"manual\"\n");
    let home = svc_home(&lab);
    let other = NODES.iter().find(|n| **n != home).expect("a survivor");
    let client = lab.client_of(other);
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    let ls = wait_for("the fencer to wait for an ack", || {
        let ls = lab.fence_ls(&client)?;
        let waiting = ls["victims"]
            .as_array()?
            .iter()
            .any(|v| v["name"] == home.as_str() && v["state"] == "waiting-ack");
        waiting.then_some(ls)
    });
    assert_eq!(ls["victim_now"], home.as_str(), "{ls}");
    assert_eq!(ls["wait_state"], "fencing", "{ls}");
    // Frozen: nothing recovered while the victim is in doubt.
    assert!(
        lab.running("svc").is_empty(),
        "svc recovered without a fence"
    );
    assert!(lab.fence_history(&client).is_empty());
    let out = ok(haven(&["fence", "ack", &home], Some(&client)));
    assert!(out.contains("acknowledged"), "{out}");
    let survivor = wait_for("svc to run on a survivor after the ack", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_ne!(survivor, home);
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    let h = wait_for("the ack to be committed", || {
        let h = lab.fence_history(&client);
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h[0]["device"], "manual", "{h:?}");
    assert_eq!(h[0]["victim"], home.as_str(), "{h:?}");
    // Acknowledging a node nobody is fencing is refused, and an unknown one is named.
    let again = haven(&["fence", "ack", other], Some(&client));
    assert!(!again.status.success());
    let ghost = haven(&["fence", "ack", "ghost"], Some(&client));
    assert!(
        String::from_utf8_lossy(&ghost.stderr).contains("no node named \"ghost\""),
        "{ghost:?}"
    );
}

#[test]
fn fence_node_escalates_from_a_failing_fence_dummy_to_the_lab_switch_which_kills_the_node() {
    let _one = lock();
    let lab = Lab::up();
    let mut fencing = format!(
        "{}\n[[fencing.devices]]\nid = \"broken\"\nagent = \"fence_dummy\"\nparams = {{ type = \"fail\", power_timeout = \"1\" }}\n",
        lab_device()(&lab)
    );
    for n in NODES {
        fencing.push_str(&format!(
            "\n[[fencing.levels]]\nnode = \"{n}\"\nindex = 1\ndevices = [\"broken\"]\n\n[[fencing.levels]]\nnode = \"{n}\"\nindex = 2\ndevices = [\"power\"]\n"
        ));
    }
    lab.configure(&fencing);
    // Keep svc off the leader (n1 founded the lab): the coordinator cannot fence the
    // node it runs on.
    ok(lab.run(&["node", "standby", "n1"]));
    let home = wait_for("svc to leave n1", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != "n1").then(|| r[0].clone())
    });
    let daemon_pid: i32 = std::fs::read_to_string(lab.dir.join(&home).join("daemon.pid"))
        .expect("daemon.pid")
        .trim()
        .parse()
        .expect("pid");
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["fence", "node", &home]));
    let survivor = wait_for("svc to run on the last node", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_ne!(survivor, "n1", "n1 is in standby");
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    // The lab switch really powered the node off.
    let stat = std::fs::read_to_string(format!("/proc/{daemon_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        "the fenced node's daemon still runs"
    );
    let h = wait_for("both attempts to be committed", || {
        let h = lab.fence_history(&lab.client);
        (h.len() >= 2).then_some(h)
    });
    assert_eq!(
        (&h[0]["device"], &h[0]["ok"]),
        (&serde_json::json!("broken"), &serde_json::json!(false)),
        "{h:?}"
    );
    assert_eq!(
        (&h[1]["device"], &h[1]["ok"]),
        (&serde_json::json!("power"), &serde_json::json!(true)),
        "{h:?}"
    );
    assert_eq!(h[1]["victim"], home.as_str());
}

#[test]
fn a_real_fence_dummy_confirms_a_dead_node() {
    let _one = lock();
    let lab = Lab::up();
    let status_file = lab.dir.join("dummy.status");
    // fence_dummy compares the whole file: no newline.
    std::fs::write(&status_file, "on").expect("status file");
    lab.configure(&format!(
        "\n[[fencing.devices]]\nid = \"dummy\"\nagent = \"fence_dummy\"\nparams = {{ type = \"file\", status_file = \"{}\" }}\n",
        status_file.display()
    ));
    let home = svc_home(&lab);
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    wait_for("svc to run on a survivor", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    let other = NODES.iter().find(|n| **n != home).expect("a survivor");
    let h = wait_for("the fence to be committed", || {
        let h = lab.fence_history(&lab.client_of(other));
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(h[0]["device"], "dummy", "{h:?}");
    assert_eq!(h[0]["ok"], true, "{h:?}");
    assert!(
        h[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("fence_dummy reboot")),
        "{h:?}"
    );
}

#[test]
fn a_partitioned_node_stops_its_resource_and_the_majority_recovers_it_after_the_watchdog_wait() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(
        "\n[[fencing.devices]]\nid = \"wd\"\nagent = \"watchdog\"\nparams = { wait = \"5\" }\n",
    );
    let home = svc_home(&lab);
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "partition", &home, "--dir", lab.dir_str()]));
    // The majority starts svc once the watchdog wait is over; the cut-off node has
    // stopped it by itself before (no-quorum-policy = stop), or the checker, polling
    // every 10 ms, would have seen it on two nodes.
    let survivor = wait_for("svc to run in the majority", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    let h = wait_for("the watchdog confirmation to be committed", || {
        let h = lab.fence_history(&lab.client_of(&survivor));
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(
        (&h[0]["victim"], &h[0]["device"], &h[0]["ok"]),
        (
            &serde_json::json!(home),
            &serde_json::json!("wd"),
            &serde_json::json!(true)
        ),
        "{h:?}"
    );
    // The minority's node still runs (it was cut off, not killed) but holds nothing.
    let pid: i32 = std::fs::read_to_string(lab.dir.join(&home).join("daemon.pid"))
        .expect("daemon.pid")
        .trim()
        .parse()
        .expect("pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let minority = haven(&["status", "--json"], Some(&lab.client_of(&home)));
    let s: serde_json::Value = serde_json::from_slice(&minority.stdout).expect("status JSON");
    assert_eq!(s["quorate"], false, "{s}");
}

#[test]
fn a_fenced_node_that_comes_back_stays_out_until_node_online() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    let survivor = wait_for("svc to run on a survivor", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    let client = lab.client_of(&survivor);
    ok(lab.run(&["lab", "start", &home, "--dir", lab.dir_str()]));
    let member = |ls: &serde_json::Value| -> Option<String> {
        ls["members"]
            .as_array()?
            .iter()
            .find(|m| m[0] == home.as_str())
            .and_then(|m| m[1].as_str().map(str::to_string))
    };
    // The coordinator hears it again, but keeps it out: fenced for a fault, it needs
    // an operator.
    let ls = wait_for("the coordinator to hear the restarted node", || {
        let ls = lab.fence_ls(&client)?;
        ls["heard"]
            .as_array()?
            .iter()
            .any(|n| *n == home.as_str())
            .then_some(ls)
    });
    assert_eq!(member(&ls).as_deref(), Some("offline"), "{ls}");
    ok(haven(&["node", "online", &home], Some(&client)));
    wait_for("the node to be allowed back", || {
        let ls = lab.fence_ls(&client)?;
        (member(&ls).as_deref() == Some("online")).then_some(())
    });
    // Stickiness keeps svc where it is; it still runs exactly once.
    assert_eq!(lab.running("svc"), vec![survivor]);
}

#[test]
fn a_powered_off_node_running_a_qemu_guest_is_fenced_and_the_guest_boots_once_on_a_survivor() {
    let _one = lock();
    let guest = guest_dir();
    let lab = Lab::up();
    // A TCG guest, as `lab up --vms` runs it; start waits for the guest's ready line.
    let vm = format!(
        "\n[[resources]]\nid = \"vm1\"\nclass = \"qemu\"\ntype = \"vm\"\n\
         params = {{ kernel = \"{}\", initrd = \"{}\", append = \"console=ttyS0 panic=-1 quiet\", \
         accel = \"tcg\", memory = \"128\", ready_marker = \"HAVEN-GUEST-UP\" }}\n\
         ops = [{{ name = \"start\", timeout = 120 }}, {{ name = \"stop\", timeout = 30 }}, \
         {{ name = \"monitor\", interval = 2, timeout = 10 }}]\n",
        guest.join("vmlinux").display(),
        guest.join("initramfs.cpio").display()
    );
    lab.configure_with(&vm, &lab_device()(&lab));
    let home = wait_for("vm1 to run on one node", || {
        let r = lab.running("vm1");
        (r.len() == 1).then(|| r[0].clone())
    });
    let checker = Checker::start(&lab.dir, "vm1");
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    let survivor = wait_for("vm1 to run on a survivor", || {
        let r = lab.running("vm1");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    assert_eq!(checker.most_seen(), 1, "the guest ran on two nodes at once");
    // Running as the cluster confirms it: the start (which waits for the guest's ready
    // line) was committed on the survivor.
    wait_for("status to show vm1 on the survivor", || {
        let out = haven(&["status", "--json"], Some(&lab.client_of(&survivor)));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let on = s["resources"]
            .as_array()?
            .iter()
            .find(|r| r["id"] == "vm1")?["running_on"]
            .clone();
        (on == serde_json::json!([survivor])).then_some(())
    });
    let h = lab.fence_history(&lab.client_of(&survivor));
    assert!(
        h.iter()
            .any(|r| r["victim"] == home.as_str() && r["device"] == "power" && r["ok"] == true),
        "{h:?}"
    );
}

#[test]
fn cutting_one_of_two_links_is_reported_but_fences_nothing() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    let other = NODES.iter().find(|n| **n != home).expect("another node");
    let client = lab.client_of(other);
    ok(lab.run(&[
        "lab",
        "partition",
        &home,
        "--link",
        "link1",
        "--dir",
        lab.dir_str(),
    ]));
    let link_state = |name: &str| -> Option<(String, bool, bool)> {
        let out = haven(&["status", "--json"], Some(&client));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let n = s["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == name)?
            .clone();
        let up = |l: &str| {
            n["links"]
                .as_array()
                .and_then(|ls| ls.iter().find(|x| x["name"] == l))
                .is_some_and(|x| x["up"] == true)
        };
        Some((n["state"].as_str()?.to_string(), up("link0"), up("link1")))
    };
    let seen = wait_for("link1 of the node to be down", || {
        link_state(&home).filter(|(_, _, link1)| !link1)
    });
    assert_eq!(seen, ("online".to_string(), true, false));
    // The redundant link carries the heartbeats: no victim, svc stays.
    let ls = lab.fence_ls(&client).expect("fence ls");
    assert_eq!(ls["wait_state"], "none", "{ls}");
    assert!(lab.fence_history(&client).is_empty());
    assert_eq!(lab.running("svc"), vec![home.clone()]);
    ok(lab.run(&["lab", "heal", "--dir", lab.dir_str()]));
    wait_for("link1 to come back", || {
        link_state(&home).filter(|(_, _, link1)| *link1)
    });
}
