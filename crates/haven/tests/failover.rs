//! Failure handling with real daemons on a loopback lab: a node is powered off or cut
//! off, it is fenced (lab power switch, real `fence_dummy`, manual ack, watchdog), and
//! its `process` resource comes back on a survivor. A checker polls every node's actual
//! processes (pidfiles + /proc) throughout and must never see the resource twice.
//!
//! The labs run one at a time: fifteen daemons at once on a small CI machine could
//! miss heartbeats and turn a test of failover into a test of the machine.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

fn status(client: &Path) -> Option<serde_json::Value> {
    let out = haven(&["status", "--json"], Some(client));
    serde_json::from_slice(&out.stdout).ok()
}

/// Where the cluster's status (asked through `client`) says `resource` runs.
fn status_running_on(client: &Path, resource: &str) -> Option<serde_json::Value> {
    let s = status(client)?;
    let r = s["resources"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == resource)?;
    Some(r["running_on"].clone())
}

/// `node`'s entry in a status report.
fn node_of<'a>(s: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    s["nodes"].as_array()?.iter().find(|n| n["name"] == node)
}

/// `id`'s entry in a status report.
fn resource<'a>(s: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    s["resources"].as_array()?.iter().find(|r| r["id"] == id)
}

/// The Raft leader as `node` sees it.
fn leader_seen_by(lab: &Lab, node: &str) -> Option<String> {
    status(&lab.client_of(node))?["leader"]
        .as_str()
        .map(str::to_string)
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// The state of `node` in the coordinator's `fence ls`, and whether it is heard.
fn member_state(ls: &serde_json::Value, node: &str) -> Option<(String, bool)> {
    let state = ls["members"].as_array()?.iter().find(|m| m[0] == node)?[1]
        .as_str()?
        .to_string();
    let heard = ls["heard"].as_array()?.iter().any(|n| *n == node);
    Some((state, heard))
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

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
    // Status tells the truth: the node is unclean, svc is in doubt there (not
    // "Stopped"), frozen, and says what ends it.
    let s = wait_for("status to show the node unclean and svc in doubt", || {
        let s = status(&client)?;
        let svc = resource(&s, "svc")?;
        (node_of(&s, &home)?["state"] == "unclean"
            && svc["in_doubt_on"] == serde_json::json!([home]))
        .then_some(s)
    });
    let node = node_of(&s, &home).expect("the node");
    let svc = resource(&s, "svc").expect("svc");
    assert!(
        node["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("haven fence ack {home}"))),
        "{s}"
    );
    assert_eq!(svc["running_on"], serde_json::json!([]), "{s}");
    assert!(
        svc["frozen"].as_str().is_some_and(|f| f.contains("frozen")
            && f.contains(&format!("haven fence ack {home}"))),
        "{s}"
    );
    let text = ok(haven(&["status"], Some(&client)));
    assert!(
        text.contains(&format!("IN DOUBT on {home}")) && text.contains("frozen until"),
        "{text}"
    );
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
    // Confirmed: fenced, and svc is no longer in doubt anywhere.
    wait_for(
        "status to show the node fenced and svc on the survivor",
        || {
            let s = status(&client)?;
            let svc = resource(&s, "svc")?;
            (node_of(&s, &home)?["state"] == "fenced"
                && svc["in_doubt_on"] == serde_json::json!([])
                && svc["running_on"] == serde_json::json!([survivor])
                && svc.get("frozen").is_none())
            .then_some(())
        },
    );
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
    // Keep svc off n1 (which founded the lab and leads it), so the run below fences a
    // follower; fencing the leader has its own test.
    ok(lab.run(&["node", "standby", "n1"]));
    let home = wait_for("svc to leave n1", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != "n1").then(|| r[0].clone())
    });
    let daemon_pid = common::daemon_pid(&lab.dir, &home);
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
    lab.wait_fence_confirmed(&survivor, &home, "wd");
    // The minority's node still runs (it was cut off, not killed) but holds nothing.
    let pid = daemon_pid(&lab.dir, &home);
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
    assert_eq!(member(&ls).as_deref(), Some("fenced"), "{ls}");
    // Status agrees, whichever node answers: fenced and kept out, not "online".
    for n in NODES {
        let s = wait_for("status to show the restarted node kept out", || {
            let s = status(&lab.client_of(n))?;
            (node_of(&s, &home)?["state"] == "fenced").then_some(s)
        });
        let detail = node_of(&s, &home).expect("the node")["detail"].clone();
        assert!(
            detail
                .as_str()
                .is_some_and(|d| d.contains(&format!("haven node online {home}"))),
            "{s}"
        );
    }
    let text = ok(haven(&["status"], Some(&client)));
    assert!(
        text.contains("stays out until `haven node online"),
        "{text}"
    );
    ok(haven(&["node", "online", &home], Some(&client)));
    wait_for("the node to be allowed back", || {
        let ls = lab.fence_ls(&client)?;
        (member(&ls).as_deref() == Some("online")).then_some(())
    });
    wait_for("status to show the node online", || {
        let s = status(&client)?;
        let n = node_of(&s, &home)?;
        (n["state"] == "online" && n.get("detail").is_none()).then_some(())
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
        let on = status_running_on(&lab.client_of(&survivor), "vm1")?;
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
    let link_state = |name: &str| node_links(&client, name);
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

#[test]
fn a_fenced_node_stays_out_across_a_leader_change() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    svc_home(&lab);
    let leader = wait_for("a leader", || leader_seen_by(&lab, "n2"));
    let victim = NODES
        .iter()
        .find(|n| **n != leader)
        .expect("a follower")
        .to_string();
    let third = NODES
        .iter()
        .find(|n| **n != leader && **n != victim)
        .expect("a third node")
        .to_string();
    let client = lab.client_of(&third);
    ok(lab.run(&["lab", "kill", &victim, "--dir", lab.dir_str()]));
    wait_for("the follower to be fenced", || {
        let h = lab.fence_history(&client);
        h.iter()
            .any(|r| r["victim"] == victim.as_str() && r["ok"] == true)
            .then_some(())
    });
    ok(lab.run(&["lab", "start", &victim, "--dir", lab.dir_str()]));
    wait_for("the leader to hear the fenced node and keep it out", || {
        let ls = lab.fence_ls(&client)?;
        (member_state(&ls, &victim)? == ("fenced".to_string(), true)).then_some(())
    });
    let checker = Checker::start(&lab.dir, "svc");
    // The leader dies: the new one must still keep the fenced node out, although it
    // hears it, and fence the old leader before its resources move.
    ok(lab.run(&["lab", "kill", &leader, "--dir", lab.dir_str()]));
    let ls = wait_for("a new leader to fence the old one", || {
        let ls = lab.fence_ls(&client)?;
        (ls["leader"] != leader.as_str()
            && member_state(&ls, &leader)?.0 == "fenced"
            && member_state(&ls, &third)?.0 == "online")
            .then_some(ls)
    });
    assert_eq!(
        member_state(&ls, &victim),
        Some(("fenced".to_string(), true)),
        "the new leader let the fenced node back in by itself: {ls}"
    );
    let survivor = wait_for("svc to run on the third node", || {
        let r = lab.running("svc");
        (r == [third.clone()]).then(|| r[0].clone())
    });
    assert_eq!(survivor, third);
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    // The operator lets it back; the mark goes first, the node follows.
    ok(haven(&["node", "online", &victim], Some(&client)));
    wait_for("the fenced node to be allowed back", || {
        let ls = lab.fence_ls(&client)?;
        (member_state(&ls, &victim)?.0 == "online").then_some(())
    });
}

#[test]
fn a_node_in_doubt_stays_in_doubt_across_a_leader_change_though_it_heartbeats() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure("\n[[fencing.devices]]\nid = \"operator\"\nagent = \"manual\"\n");
    svc_home(&lab);
    let leader = wait_for("a leader", || leader_seen_by(&lab, "n2"));
    let mut followers = NODES
        .iter()
        .filter(|n| **n != leader)
        .map(|n| n.to_string());
    let (victim, third) = (
        followers.next().expect("a follower"),
        followers.next().expect("another follower"),
    );
    let client = lab.client_of(&third);
    let waiting = |ls: &serde_json::Value, node: &str| {
        ls["victims"].as_array().is_some_and(|v| {
            v.iter()
                .any(|x| x["name"] == node && x["state"] == "waiting-ack")
        })
    };
    // The operator asks for a fence that only they can carry out; the node still runs.
    ok(haven(&["fence", "node", &victim], Some(&client)));
    wait_for("the fence to wait for an ack", || {
        let ls = lab.fence_ls(&client)?;
        waiting(&ls, &victim).then_some(())
    });
    // The replicated mark is written on the coordinator's next turn.
    std::thread::sleep(Duration::from_secs(1));
    ok(lab.run(&["lab", "kill", &leader, "--dir", lab.dir_str()]));
    let ls = wait_for("a new leader", || {
        let ls = lab.fence_ls(&client)?;
        (ls["leader"] != leader.as_str() && member_state(&ls, &victim)?.1).then_some(ls)
    });
    assert_eq!(
        member_state(&ls, &victim).map(|m| m.0).as_deref(),
        Some("unclean"),
        "the new leader took a node in doubt for clean because it heartbeats: {ls}"
    );
    assert!(waiting(&ls, &victim), "the fence is not resumed: {ls}");
}

#[test]
fn fence_node_on_the_leader_has_another_node_fence_it_and_a_new_leader_confirms() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    svc_home(&lab);
    let leader = wait_for("a leader", || leader_seen_by(&lab, "n2"));
    let other = NODES
        .iter()
        .find(|n| **n != leader)
        .expect("a follower")
        .to_string();
    let client = lab.client_of(&other);
    let pid = daemon_pid(&lab.dir, &leader);
    let checker = Checker::start(&lab.dir, "svc");
    ok(haven(&["fence", "node", &leader], Some(&client)));
    wait_for("the leader's daemon to be powered off", || {
        (!alive(pid)).then_some(())
    });
    let h = wait_for("a new leader to confirm the fence", || {
        let h = lab.fence_history(&client);
        h.iter()
            .any(|r| r["victim"] == leader.as_str() && r["ok"] == true)
            .then_some(h)
    });
    assert!(
        h.iter()
            .filter(|r| r["victim"] == leader.as_str())
            .all(|r| r["executor"] != leader.as_str()),
        "a node never fences itself: {h:?}"
    );
    let new_leader = wait_for("a new leader", || {
        leader_seen_by(&lab, &other).filter(|l| *l != leader)
    });
    assert_ne!(new_leader, leader);
    wait_for("svc to run once on a survivor", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != leader).then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
}

#[test]
fn config_apply_that_removes_a_node_running_resources_is_refused_naming_them() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    wait_for("status to show svc on its node", || {
        let on = status_running_on(&lab.client, "svc")?;
        (on == serde_json::json!([home])).then_some(())
    });
    let show = ok(lab.run(&["config", "show"]));
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("# haven-config-version: "))
        .expect("version line")
        .trim()
        .to_string();
    // The configuration without `home`'s [[nodes]] entry.
    let text = std::fs::read_to_string(lab.dir.join("cluster.toml")).expect("cluster.toml");
    let block = text
        .split("\n[[nodes]]\n")
        .find(|b| b.starts_with(&format!("name = \"{home}\"")))
        .expect("the node's block")
        .to_string();
    let without = text.replacen(&format!("\n[[nodes]]\n{block}"), "\n", 1);
    assert_ne!(without, text);
    let path = lab.dir.join("without.toml");
    std::fs::write(&path, without).expect("write");
    let out = lab.run(&[
        "config",
        "apply",
        path.to_str().expect("utf-8"),
        "--based-on",
        &version,
    ]);
    assert!(!out.status.success(), "the removal was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("node {home}")) && err.contains("svc"),
        "the refusal must name the node and its resources: {err}"
    );
    assert_eq!(lab.running("svc"), vec![home]);
}

#[test]
fn watchdog_is_fed_while_quorate_not_after_quorum_loss_nor_after_a_restart_cut_off() {
    let _one = lock();
    let lab = Lab::up();
    // Regular files stand in for /dev/watchdog: every keepalive is a byte.
    for n in NODES {
        std::fs::write(lab.dir.join(n).join("watchdog"), "").expect("watchdog file");
    }
    lab.configure(&format!(
        "\n[[fencing.devices]]\nid = \"wd\"\nagent = \"watchdog\"\n\
         params = {{ wait = \"1\", timeout = \"1\", device = \"{}/{{node}}/watchdog\" }}\n",
        lab.dir_str()
    ));
    let wd = |n: &str| lab.dir.join(n).join("watchdog");
    let fed = |n: &str| {
        let before = file_len(&wd(n));
        wait_for("keepalives", || (file_len(&wd(n)) > before).then_some(()));
    };
    for n in NODES {
        fed(n);
    }
    let home = svc_home(&lab);
    let checker = Checker::start(&lab.dir, "svc");
    ok(lab.run(&["lab", "partition", &home, "--dir", lab.dir_str()]));
    // The majority recovers svc only after lease + timeout + margin, however short the
    // configured wait; by then the cut-off node has stopped feeding.
    wait_for("svc to run in the majority", || {
        let r = lab.running("svc");
        (r.len() == 1 && r[0] != home).then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    let stopped_at = file_len(&wd(&home));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        file_len(&wd(&home)),
        stopped_at,
        "a node without quorum fed its watchdog"
    );
    let bytes = std::fs::read(wd(&home)).expect("read");
    assert!(
        !bytes.is_empty() && !bytes.contains(&b'V'),
        "no magic close on quorum loss"
    );
    // Power-cycled inside the partition: a restarted node gets no lease, so it must not
    // feed its watchdog (nor start anything) until it hears a quorate cluster.
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    ok(lab.run(&["lab", "start", &home, "--dir", lab.dir_str()]));
    let before = file_len(&wd(&home));
    let s = wait_for("the restarted node to answer", || {
        status(&lab.client_of(&home))
    });
    assert_eq!(s["quorate"], false, "{s}");
    // Longer than a whole lease after it answered.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        file_len(&wd(&home)),
        before,
        "the restarted node gave itself a lease"
    );
    assert!(!lab.running("svc").contains(&home));
    ok(lab.run(&["lab", "heal", "--dir", lab.dir_str()]));
    fed(&home);
    // A clean stop disarms the device: the magic close comes last.
    let pid = daemon_pid(&lab.dir, &home);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    wait_for("the daemon to stop", || (!alive(pid)).then_some(()));
    let bytes = std::fs::read(wd(&home)).expect("read");
    assert_eq!(bytes.last(), Some(&b'V'), "no magic close on a clean stop");
}

/// A two-node lab (no witness): `options.two-node`, the lab's power switch with a
/// delay on fencing n1, so n1 shoots first when both lose each other.
struct TwoNodes {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl TwoNodes {
    fn up() -> TwoNodes {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("lab");
        ok(haven(
            &[
                "lab",
                "up",
                "--nodes",
                "2",
                "--dir",
                dir.to_str().expect("utf-8"),
            ],
            None,
        ));
        let lab = TwoNodes { _tmp: tmp, dir };
        lab.apply(&lab.config_text());
        lab
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8")
    }

    fn client_of(&self, node: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.dir.join("client.toml")).expect("client.toml");
        let mut v: toml::Table = toml::from_str(&text).expect("client.toml parses");
        let servers = v["servers"].as_array().expect("servers").clone();
        let i = ["n1", "n2"].iter().position(|n| *n == node).expect("node");
        v.insert(
            "servers".into(),
            toml::Value::Array(vec![servers[i].clone()]),
        );
        let path = self.dir.join(format!("client-{node}.toml"));
        std::fs::write(&path, toml::to_string(&v).expect("toml")).expect("write client");
        path
    }

    fn config_text(&self) -> String {
        let mut text = String::from(
            "[options]\nstonith-enabled = true\ntwo-node = true\nresource-stickiness = 100\n",
        );
        for (i, n) in ["n1", "n2"].iter().enumerate() {
            let host = 11 + i;
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"{n}\"\naddrs = [\"127.0.0.{host}\", \"127.0.1.{host}\"]\n"
            ));
        }
        for id in ["db", "web", "worker", "svc"] {
            text.push_str(&format!(
                "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\nparams = {{ command = \"sleep 1000000\" }}\nops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n"
            ));
        }
        text.push_str("\n[[groups]]\nid = \"app\"\nmembers = [\"db\", \"web\"]\n");
        text.push_str(&format!(
            "\n[[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\n\
             params = {{ lab-dir = \"{}\", pcmk_delay_base = \"n1:4\" }}\n",
            self.dir_str()
        ));
        text
    }

    /// `haven config apply` through `node`, on the current version.
    fn try_apply_via(&self, node: &str, text: &str) -> std::process::Output {
        let client = self.client_of(node);
        let show = ok(haven(&["config", "show"], Some(&client)));
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("# haven-config-version: "))
            .expect("version line")
            .trim()
            .to_string();
        let path = self.dir.join("cluster.toml");
        std::fs::write(&path, text).expect("write config");
        haven(
            &[
                "config",
                "apply",
                path.to_str().expect("utf-8"),
                "--based-on",
                &version,
            ],
            Some(&client),
        )
    }

    fn apply(&self, text: &str) {
        ok(self.try_apply_via("n1", text));
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_daemon_logs(&self.dir, &["n1", "n2"], 80);
        }
        let _ = haven(&["lab", "heal", "--dir", self.dir_str()], None);
        let _ = haven(&["lab", "down", "--dir", self.dir_str()], None);
    }
}

#[test]
fn two_nodes_without_a_witness_the_survivor_fences_its_dead_peer_and_runs_everything() {
    let _one = lock();
    let lab = TwoNodes::up();
    let home = wait_for("svc to run on one node", || {
        let r = running(&lab.dir, "svc");
        (r.len() == 1).then(|| r[0].clone())
    });
    let other = if home == "n1" { "n2" } else { "n1" }.to_string();
    let checker = Checker::start(&lab.dir, "svc");
    ok(haven(&["lab", "kill", &home, "--dir", lab.dir_str()], None));
    wait_for("svc to run on the survivor", || {
        (running(&lab.dir, "svc") == [other.clone()]).then_some(())
    });
    for r in ["db", "web", "worker"] {
        wait_for("every resource to run on the survivor", || {
            (running(&lab.dir, r) == [other.clone()]).then_some(())
        });
    }
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    // The survivor answers for the fence domain even if the dead peer led Raft.
    let ls = wait_for("the survivor's fence ls to show its peer fenced", || {
        let out = haven(&["fence", "ls", "--json"], Some(&lab.client_of(&other)));
        let ls: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (member_state(&ls, &home)?.0 == "fenced").then_some(ls)
    });
    assert_eq!(ls["leader"], other.as_str(), "{ls}");
    assert!(
        ls["victims"].as_array().is_some_and(|v| v
            .iter()
            .any(|x| x["name"] == home.as_str() && x["state"] == "confirmed")),
        "{ls}"
    );
    // One of two voters cannot commit: configuration changes wait for the peer.
    let refused = lab.try_apply_via(&other, &lab.config_text());
    assert!(
        !refused.status.success(),
        "a configuration change was accepted by one of two nodes"
    );
    ok(haven(
        &["lab", "start", &home, "--dir", lab.dir_str()],
        None,
    ));
    wait_for(
        "configuration changes to work again with the peer back",
        || {
            lab.try_apply_via(&other, &lab.config_text())
                .status
                .success()
                .then_some(())
        },
    );
    assert_eq!(running(&lab.dir, "svc"), vec![other]);
}

#[test]
fn two_nodes_cut_off_from_each_other_both_ways_exactly_one_survives() {
    let _one = lock();
    let lab = TwoNodes::up();
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run", || {
            (running(&lab.dir, r).len() == 1).then_some(())
        });
    }
    let pids = [daemon_pid(&lab.dir, "n1"), daemon_pid(&lab.dir, "n2")];
    let checker = Checker::start(&lab.dir, "svc");
    // Every link of n2, both ways: each node sees the other die.
    ok(haven(
        &["lab", "partition", "n2", "--dir", lab.dir_str()],
        None,
    ));
    wait_for("one daemon to be powered off", || {
        (!alive(pids[0]) || !alive(pids[1])).then_some(())
    });
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run on the survivor", || {
            (running(&lab.dir, r) == ["n1"]).then_some(())
        });
    }
    assert!(alive(pids[0]), "n1 (whose fencing is delayed) must survive");
    assert!(!alive(pids[1]), "n2 must have been fenced");
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
}

/// A process started in a node's network namespace behind its daemon's back (no
/// pidfile names it); killed by pid when the test ends, if the switch did not.
struct Stray(std::process::Child);

impl Stray {
    fn spawn(ns: &str) -> Stray {
        // `ip netns exec` execs in place: the child's pid is the sleep's.
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", ns, "sleep", "1000004"])
            .spawn()
            .expect("spawn a process in the namespace");
        Stray(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    fn gone(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Stray {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_lab_switch_powers_off_everything_in_a_netns_nodes_namespace() {
    let _one = lock();
    let lab = Lab::up_netns();
    let rec = lab.netns.clone().expect("netns record");
    lab.configure(&lab_device()(&lab));
    let leader = wait_for("a leader", || leader_seen_by(&lab, "n1"));
    let victim = NODES
        .iter()
        .find(|n| **n != leader)
        .expect("a follower")
        .to_string();
    let ns = rec.node(&victim).netns.clone();
    let mut stray = Stray::spawn(&ns);
    let inode = common::netns::ns_inode(&ns);
    wait_for("the stray process to be in the namespace", || {
        (common::netns::netns_of(stray.pid()) == inode).then_some(())
    });
    ok(lab.run(&["fence", "node", &victim]));
    let h = wait_for("the fence to be committed", || {
        let h = lab.fence_history(&lab.client_of(&leader));
        h.iter()
            .any(|r| r["victim"] == victim.as_str() && r["ok"] == true)
            .then_some(h)
    });
    assert!(
        h.iter().any(|r| r["device"] == "power"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("process(es) killed"))),
        "{h:?}"
    );
    wait_for("the stray process to be powered off", || {
        stray.gone().then_some(())
    });
    assert_eq!(
        common::netns::pids(&ns),
        Vec::<i32>::new(),
        "processes survived in {ns}"
    );
}

#[test]
fn two_nodes_a_fenced_peer_that_comes_back_stays_out_until_node_online() {
    let _one = lock();
    let lab = TwoNodes::up();
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run", || {
            (running(&lab.dir, r).len() == 1).then_some(())
        });
    }
    // The victim is the Raft leader: the survivor then fences it as a follower, so
    // its fence mark lives only on the survivor, and the victim may win the next
    // election when it comes back.
    let victim = wait_for("a leader", || {
        let out = haven(&["status", "--json"], Some(&lab.client_of("n1")));
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        s["leader"].as_str().map(str::to_string)
    });
    let survivor = if victim == "n1" { "n2" } else { "n1" }.to_string();
    let checker = Checker::start(&lab.dir, "svc");
    ok(haven(
        &["lab", "kill", &victim, "--dir", lab.dir_str()],
        None,
    ));
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run on the survivor", || {
            (running(&lab.dir, r) == [survivor.clone()]).then_some(())
        });
    }
    let marks = lab.dir.join(&survivor).join("fence-marks.json");
    wait_for("the survivor to keep its fence mark on disk", || {
        std::fs::read_to_string(&marks)
            .ok()?
            .contains(&format!("\"{victim}\""))
            .then_some(())
    });
    ok(haven(
        &["lab", "start", &victim, "--dir", lab.dir_str()],
        None,
    ));
    // Both nodes agree on a leader again: the survivor, or the returned node once it
    // has acknowledged that it was fenced.
    wait_for("both nodes to agree on a leader", || {
        let leader = |n: &str| {
            let out = haven(&["status", "--json"], Some(&lab.client_of(n)));
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            s["leader"].as_str().map(str::to_string)
        };
        let l = leader(&survivor)?;
        (leader(&victim)? == l).then_some(())
    });
    // Kept out, whichever node answers, and the mark is now committed (the survivor's
    // file has served its purpose).
    for n in [&survivor, &victim] {
        let s = wait_for("status to show the returned node fenced", || {
            let out = haven(&["status", "--json"], Some(&lab.client_of(n)));
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (node_of(&s, &victim)?["state"] == "fenced").then_some(s)
        });
        let detail = node_of(&s, &victim).expect("the node")["detail"].clone();
        assert!(
            detail
                .as_str()
                .is_some_and(|d| d.contains(&format!("haven node online {victim}"))),
            "{s}"
        );
    }
    wait_for("the survivor to drop its local mark once committed", || {
        (!std::fs::read_to_string(&marks)
            .unwrap_or_default()
            .contains(&format!("\"{victim}\"")))
        .then_some(())
    });
    wait_for(
        "the leader to hear the returned node and keep it fenced",
        || {
            let ls = lab_fence_ls(&lab, &survivor);
            (member_state(&ls, &victim)? == ("fenced".to_string(), true)).then_some(())
        },
    );
    for r in ["svc", "db", "web", "worker"] {
        assert_eq!(running(&lab.dir, r), vec![survivor.clone()], "{r}");
    }
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
    // Allowed back, it takes resources again: with the survivor in standby, all of
    // them.
    ok(haven(
        &["node", "online", &victim],
        Some(&lab.client_of(&survivor)),
    ));
    wait_for("the returned node to be online", || {
        let ls = lab_fence_ls(&lab, &survivor);
        (member_state(&ls, &victim)?.0 == "online").then_some(())
    });
    ok(haven(
        &["node", "standby", &survivor],
        Some(&lab.client_of(&survivor)),
    ));
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to move to the returned node", || {
            (running(&lab.dir, r) == [victim.clone()]).then_some(())
        });
    }
}

/// `fence ls --json` through `node`.
fn lab_fence_ls(lab: &TwoNodes, node: &str) -> serde_json::Value {
    wait_for("fence ls to answer", || {
        let out = haven(&["fence", "ls", "--json"], Some(&lab.client_of(node)));
        serde_json::from_slice(&out.stdout).ok()
    })
}

#[test]
fn a_stopping_daemon_stops_what_starts_later_first() {
    let _one = lock();
    let lab = Lab::up();
    let stops = lab.dir.join("stops");
    // `guest` is ordered after `vol`, as a guest after the volume it runs on. Each
    // writes its name when told to stop; the guest takes a second over it, so stopping
    // both at once would show vol first.
    let resource = |id: &str, pause: &str| {
        format!(
            "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\n\
             params = {{ command = \"sh -c 'trap \\\"{pause}echo {id} >> {} ; exit 0\\\" TERM; while true; do sleep 1 & wait; done'\" }}\n\
             [[constraints.location]]\nid = \"{id}-on-n1\"\nrsc = \"{id}\"\nnode = \"n1\"\nscore = \"INFINITY\"\n",
            stops.display()
        )
    };
    let resources = format!(
        "{}{}\n[[constraints.order]]\nid = \"vol-then-guest\"\nfirst = \"vol\"\nthen = \"guest\"\n",
        resource("vol", ""),
        resource("guest", "sleep 1; ")
    );
    lab.configure_with(&resources, &lab_device()(&lab));
    for r in ["vol", "guest"] {
        wait_for("both resources to run on n1", || {
            (lab.running(r) == ["n1"]).then_some(())
        });
    }
    let pid = daemon_pid(&lab.dir, "n1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    wait_for("the daemon to stop", || (!alive(pid)).then_some(()));
    assert_eq!(
        std::fs::read_to_string(&stops).unwrap_or_default(),
        "guest\nvol\n",
        "the guest must stop before the volume it runs on"
    );
}

/// The committed configuration as `config show` prints it, and its version.
fn shown_config(lab: &Lab) -> (String, String) {
    let show = ok(lab.run(&["config", "show"]));
    let version = show
        .lines()
        .find_map(|l| l.strip_prefix("# haven-config-version: "))
        .expect("version line")
        .trim()
        .to_string();
    (show, version)
}

fn apply_text(lab: &Lab, text: &str, version: &str) {
    let path = lab.dir.join("cluster-edit.toml");
    std::fs::write(&path, text).expect("write config");
    ok(lab.run(&[
        "config",
        "apply",
        path.to_str().expect("utf-8"),
        "--based-on",
        version,
    ]));
}

#[test]
fn startup_fencing_off_takes_a_never_seen_node_as_down_and_on_fences_it_first() {
    let _one = lock();
    let lab = Lab::up();
    let status_file = lab.dir.join("dummy.status");
    std::fs::write(&status_file, "on").expect("status file");
    // The lab's switch for the real nodes; fence_dummy for configured machines whose
    // daemons never run here.
    lab.configure(&format!(
        "\n[[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\nhosts = [\"n1\", \"n2\", \"n3\"]\n\
         params = {{ lab-dir = \"{}\" }}\n",
        lab.dir_str(),
    ));
    let dummy = format!(
        "\n[[fencing.devices]]\nid = \"dummy\"\nagent = \"fence_dummy\"\nhosts = [\"n4\"]\n\
         params = {{ type = \"file\", status_file = \"{}\" }}\n",
        status_file.display()
    );
    svc_home(&lab);
    let late = |id: &str| {
        format!(
            "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\nparams = {{ command = \"sleep 1000003\" }}\n"
        )
    };
    // Off: n4 is listed but never joined. Once the detection time has passed without
    // a word from it, it counts as down and clean: the new resource runs, nothing is
    // fenced.
    let (text, version) = shown_config(&lab);
    let off = text.replacen("[options]\n", "[options]\nstartup-fencing = false\n", 1)
        + "\n[[nodes]]\nname = \"n4\"\n"
        + &late("late4")
        + &dummy;
    apply_text(&lab, &off, &version);
    wait_for("late4 to run", || {
        (lab.running("late4").len() == 1).then_some(())
    });
    let client = lab.client_of("n1");
    let ls = wait_for("fence ls to show n4", || {
        let ls = lab.fence_ls(&client)?;
        member_state(&ls, "n4").map(|_| ls)
    });
    assert_eq!(
        member_state(&ls, "n4"),
        Some(("offline".into(), false)),
        "{ls}"
    );
    assert!(
        lab.fence_history(&client).is_empty(),
        "something was fenced: {:?}",
        lab.fence_history(&client)
    );
    // On (the default): n5, also never seen, is in doubt and fenced before anything
    // new is planned.
    let (text, version) = shown_config(&lab);
    assert!(text.contains("hosts = [\"n4\"]"), "{text}");
    let on = text.replacen("startup-fencing = false\n", "", 1).replacen(
        "hosts = [\"n4\"]",
        "hosts = [\"n4\", \"n5\"]",
        1,
    ) + "\n[[nodes]]\nname = \"n5\"\n"
        + &late("late5");
    apply_text(&lab, &on, &version);
    wait_for("late5 to run", || {
        (lab.running("late5").len() == 1).then_some(())
    });
    let h = wait_for("the fence of n5 to be committed", || {
        let h = lab.fence_history(&client);
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(
        h.iter()
            .map(|r| (
                r["victim"].as_str(),
                r["device"].as_str(),
                r["ok"].as_bool()
            ))
            .collect::<Vec<_>>(),
        vec![(Some("n5"), Some("dummy"), Some(true))],
        "{h:?}"
    );
}

/// A daemon that restarts alone (its node stays up; it is killed and started again
/// before anyone counts it lost) has no lease, so it stops what it ran and watches
/// nothing. The coordinator sees the new incarnation in its heartbeats and probes it
/// again: svc runs again, in a new process, and status says where. (Without that, svc
/// stayed stopped while status said "Started". If a loaded machine makes the restart
/// slower than detection, the node is fenced instead and svc is recovered that way.)
#[test]
fn a_daemon_restarted_alone_gets_its_resources_back_and_status_tells_the_truth() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    // Settled first: an operation still in flight to the restarting daemon would time
    // out and bring recovery by another path than the one under test.
    wait_for("every resource to be started in status", || {
        let s = status(&lab.client)?;
        let all = s["resources"].as_array()?;
        all.iter()
            .all(|r| r["running_on"].as_array().is_some_and(|on| on.len() == 1))
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let pidfile = lab.dir.join(&home).join("resources").join("svc.pid");
    let before = std::fs::read_to_string(&pidfile).expect("svc.pid");
    let checker = Checker::start(&lab.dir, "svc");
    let pid = daemon_pid(&lab.dir, &home);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    ok(lab.run(&["lab", "start", &home, "--dir", lab.dir_str()]));
    let now_on = wait_for("svc to run again in a new process", || {
        let on = lab.running("svc");
        let again = on.len() == 1
            && std::fs::read_to_string(lab.dir.join(&on[0]).join("resources").join("svc.pid"))
                .is_ok_and(|p| p != before);
        again.then(|| on[0].clone())
    });
    wait_for("status to show svc where it runs", || {
        let on = status_running_on(&lab.client, "svc")?;
        (on == serde_json::json!([now_on])).then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
}

/// openraft restores the vote of a daemon that restarts, so the leader's daemon, killed
/// and started again before the others elect anyone, names itself leader at once. Here
/// its Raft traffic (link0) stays cut while its heartbeats (link1) flow, so the window
/// stays open: it hears a majority and names itself leader, no majority acknowledges
/// it, and the others elect a new leader. Its coordinator must not run meanwhile
/// (before `Daemon::is_confirmed_leader`, it started at once: it probed, planned and
/// would have fenced on a leadership nobody confirmed, and its own agent takes its
/// orders). Healed, it follows the leader the others elected, and svc ran once
/// throughout.
#[test]
fn a_restarted_leader_does_not_coordinate_before_a_majority_acknowledges_it() {
    let _one = lock();
    let lab = Lab::up();
    lab.configure(&lab_device()(&lab));
    svc_home(&lab);
    let old = wait_for("a leader", || leader_seen_by(&lab, "n1"));
    let other = NODES
        .iter()
        .find(|n| **n != old)
        .expect("another node")
        .to_string();
    let checker = Checker::start(&lab.dir, "svc");
    let pid = daemon_pid(&lab.dir, &old);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success());
    // Cut before the start: the new daemon reads the cut as it starts.
    ok(lab.run(&[
        "lab",
        "partition",
        &old,
        "--link",
        "link0",
        "--dir",
        lab.dir_str(),
    ]));
    ok(lab.run(&["lab", "start", &old, "--dir", lab.dir_str()]));
    let mine = lab.client_of(&old);
    let in_window = || {
        let s = status(&mine)?;
        let claims = s["leader"] == old.as_str() && s["quorate"] == true;
        let elected = leader_seen_by(&lab, &other).filter(|l| *l != old)?;
        claims.then_some(elected)
    };
    let elected = wait_for(
        "the restarted daemon to name itself leader and hear a majority while the others elect another",
        in_window,
    );
    // The coordinator loop runs every 100 ms; give it many turns inside the window.
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            in_window().is_some(),
            "the window closed early: the test no longer reproduces it"
        );
    }
    let log = std::fs::read_to_string(lab.dir.join(&old).join("daemon.log")).expect("daemon.log");
    let acted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("coordinator started") || l.contains("coordinator: "))
        .collect();
    assert!(
        acted.is_empty(),
        "{old}'s restarted daemon coordinated on a leadership no majority acknowledged:\n{}",
        acted.join("\n")
    );
    ok(lab.run(&["lab", "heal", "--dir", lab.dir_str()]));
    wait_for("the restarted daemon to follow the elected leader", || {
        let l = leader_seen_by(&lab, &old)?;
        (l != old && l == elected).then_some(())
    });
    wait_for("svc to run on one node", || {
        (lab.running("svc").len() == 1).then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
}

/// wait_for_all's window: a fenced node that comes back and hears its peer (here only
/// its heartbeats: its Raft link stays cut, so no leader forms and the survivor cannot
/// commit the mark, nor tell it that it was fenced) and is then cut off altogether
/// must not count as having seen the whole cluster: it would play the lone survivor
/// and fence the node that fenced it. The victim led Raft, so it even comes back
/// naming itself leader (openraft restores its vote); that leadership, acknowledged by
/// no one, does not count either. The survivor stays up and runs everything.
#[test]
fn two_nodes_a_fenced_peer_cut_off_again_before_its_mark_is_committed_stays_quiet() {
    let _one = lock();
    let lab = TwoNodes::up();
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run", || {
            (running(&lab.dir, r).len() == 1).then_some(())
        });
    }
    let status_of = |n: &str| {
        let out = haven(&["status", "--json"], Some(&lab.client_of(n)));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()
    };
    let victim = wait_for("a leader", || {
        status_of("n1")?["leader"].as_str().map(str::to_string)
    });
    let survivor = if victim == "n1" { "n2" } else { "n1" }.to_string();
    ok(haven(
        &["lab", "kill", &victim, "--dir", lab.dir_str()],
        None,
    ));
    for r in ["svc", "db", "web", "worker"] {
        wait_for("every resource to run on the survivor", || {
            (running(&lab.dir, r) == [survivor.clone()]).then_some(())
        });
    }
    let survivor_pid = daemon_pid(&lab.dir, &survivor);
    let checker = Checker::start(&lab.dir, "svc");
    ok(haven(
        &[
            "lab",
            "partition",
            &victim,
            "--link",
            "link0",
            "--dir",
            lab.dir_str(),
        ],
        None,
    ));
    ok(haven(
        &["lab", "start", &victim, "--dir", lab.dir_str()],
        None,
    ));
    wait_for("the returned node to hear its peer (quorate)", || {
        (status_of(&victim)?["quorate"] == true).then_some(())
    });
    // Quorate for many turns of its coordinator loop (100 ms), then cut off entirely.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            status_of(&victim).map(|s| s["quorate"].clone()),
            Some(serde_json::json!(true)),
            "the returned node stopped hearing its peer: the window was not reproduced"
        );
    }
    ok(haven(
        &["lab", "partition", &victim, "--dir", lab.dir_str()],
        None,
    ));
    // Long enough for a lone survivor's detection (1 s), the delay of a fence of n1
    // (4 s) and the lab switch, several times over on a loaded machine.
    for _ in 0..150 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            alive(survivor_pid),
            "the returned fenced node shot the survivor"
        );
    }
    let log =
        std::fs::read_to_string(lab.dir.join(&victim).join("daemon.log")).expect("daemon.log");
    let acted: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("coordinator started") || l.contains("coordinator: "))
        .collect();
    assert!(
        acted.is_empty(),
        "the returned fenced node coordinated:\n{}",
        acted.join("\n")
    );
    for r in ["svc", "db", "web", "worker"] {
        assert_eq!(running(&lab.dir, r), vec![survivor.clone()], "{r}");
    }
    assert_eq!(checker.most_seen(), 1, "svc ran on two nodes at once");
}
