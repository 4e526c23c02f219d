//! Partitions with real links: a 3-node lab with each node in its own network namespace
//! (`haven lab up --netns`, root), links cut by setting the node's switch ports down.
//! A checker finds the resource's process in /proc every 50 ms, places it by its
//! network namespace, and must never see it on two nodes at once.

mod common;

use common::netns::ProcChecker;
use common::*;

fn status_via(client: &std::path::Path) -> Option<serde_json::Value> {
    let out = haven(&["status", "--json"], Some(client));
    serde_json::from_slice(&out.stdout).ok()
}

/// The stdout of a command that must have succeeded.
fn ok_out(out: std::process::Output) -> Vec<u8> {
    assert!(
        out.status.success(),
        "failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn on_two_nodes(seen: &[Vec<String>]) -> Option<&Vec<String>> {
    seen.iter().find(|p| p.len() > 1)
}

#[test]
fn a_node_cut_off_on_every_link_is_fenced_its_resource_runs_once_in_the_majority_and_it_rejoins() {
    let _one = lock();
    let lab = Lab::up_netns();
    let rec = lab.netns.clone().expect("netns record");
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    let checker = ProcChecker::start(&rec, SVC_COMMAND);
    wait_for("the checker to find svc in its node's namespace", || {
        (checker.now() == [home.clone()]).then_some(())
    });
    ok(lab.run(&["lab", "partition", &home, "--dir", lab.dir_str()]));

    let survivor = wait_for("svc to run in the majority", || {
        let now = checker.now();
        (now.len() == 1 && now[0] != home).then(|| now[0].clone())
    });
    let client = lab.client_of(&survivor);
    let h = wait_for("the fence to be committed", || {
        let h = lab.fence_history(&client);
        (!h.is_empty()).then_some(h)
    });
    assert_eq!(
        (&h[0]["victim"], &h[0]["device"], &h[0]["ok"]),
        (
            &serde_json::json!(home),
            &serde_json::json!("power"),
            &serde_json::json!(true)
        ),
        "{h:?}"
    );
    // The minority holds nothing: the switch powered its namespace's processes off.
    let home_ns = rec.node(&home).netns.clone();
    wait_for("the cut-off node to run nothing", || {
        common::netns::pids(&home_ns).is_empty().then_some(())
    });

    ok(lab.run(&["lab", "heal", "--dir", lab.dir_str()]));
    ok(lab.run(&["lab", "start", &home, "--dir", lab.dir_str()]));
    wait_for("the coordinator to hear the restarted node", || {
        let ls = lab.fence_ls(&client)?;
        ls["heard"]
            .as_array()?
            .iter()
            .any(|n| *n == home.as_str())
            .then_some(())
    });
    ok(haven(&["node", "online", &home], Some(&client)));
    let s = wait_for("all three nodes online with quorum", || {
        let s = status_via(&lab.client)?;
        let all = s["nodes"]
            .as_array()?
            .iter()
            .all(|n| n["state"] == "online");
        (all && s["quorate"] == true).then_some(s)
    });
    // Stickiness keeps svc where it was recovered.
    let svc = s["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == "svc"))
        .map(|r| r["running_on"].clone());
    assert_eq!(svc, Some(serde_json::json!([survivor])), "{s}");
    assert_eq!(checker.now(), vec![survivor]);
    let seen = checker.finish();
    assert_eq!(on_two_nodes(&seen), None, "svc ran on two nodes: {seen:?}");
}

#[test]
fn cutting_only_link0_leaves_the_node_in_the_cluster_managed_over_link1() {
    let _one = lock();
    let lab = Lab::up_netns();
    let rec = lab.netns.clone().expect("netns record");
    lab.configure(&lab_device()(&lab));
    let home = svc_home(&lab);
    let other = NODES
        .iter()
        .find(|n| **n != home)
        .expect("another node")
        .to_string();
    let client = lab.client_of(&other);
    let checker = ProcChecker::start(&rec, SVC_COMMAND);
    ok(lab.run(&[
        "lab",
        "partition",
        &home,
        "--link",
        "link0",
        "--dir",
        lab.dir_str(),
    ]));
    let node_view = |name: &str| node_links(&client, name);
    let seen = wait_for("link0 of the cut node to be down", || {
        node_view(&home).filter(|(_, link0, _)| !link0)
    });
    assert_eq!(seen, ("online".to_string(), false, true));
    // Still managed: RPC follows the heartbeats onto link1, so svc can be moved off
    // the node and back.
    ok(lab.run(&["resource", "move", "svc", &other]));
    wait_for("svc to move off the cut node", || {
        (checker.now() == [other.clone()]).then_some(())
    });
    ok(lab.run(&["resource", "move", "svc", &home]));
    wait_for("svc to move back onto the cut node", || {
        (checker.now() == [home.clone()]).then_some(())
    });
    // Nobody was fenced, and the node still counts itself in the quorate cluster.
    assert!(lab.fence_history(&client).is_empty());
    assert_eq!(node_view(&home).map(|v| v.0), Some("online".to_string()));
    let own: serde_json::Value =
        serde_json::from_slice(&ok_out(lab.run_in(&home, &["status", "--json"]))).expect("JSON");
    assert_eq!(own["quorate"], true, "{own}");

    ok(lab.run(&["lab", "heal", "--dir", lab.dir_str()]));
    wait_for("link0 to come back", || {
        node_view(&home).filter(|(_, link0, _)| *link0)
    });
    let seen = checker.finish();
    assert_eq!(on_two_nodes(&seen), None, "svc ran on two nodes: {seen:?}");
}

#[test]
fn with_watchdog_fencing_the_cut_off_node_stops_its_resource_before_the_majority_starts_it() {
    let _one = lock();
    let lab = Lab::up_netns();
    let rec = lab.netns.clone().expect("netns record");
    lab.configure(
        "\n[[fencing.devices]]\nid = \"wd\"\nagent = \"watchdog\"\nparams = { wait = \"5\" }\n",
    );
    let home = svc_home(&lab);
    let checker = ProcChecker::start(&rec, SVC_COMMAND);
    wait_for("the checker to find svc in its node's namespace", || {
        (checker.now() == [home.clone()]).then_some(())
    });
    ok(lab.run(&["lab", "partition", &home, "--dir", lab.dir_str()]));
    let survivor = wait_for("svc to run in the majority", || {
        let now = checker.now();
        (now.len() == 1 && now[0] != home).then(|| now[0].clone())
    });
    lab.wait_fence_confirmed(&survivor, &home, "wd");
    // The cut-off node was not powered off: its daemon runs on, in its namespace,
    // without quorum, and holds nothing.
    let pid = daemon_pid(&lab.dir, &home);
    assert!(
        common::netns::pids(&rec.node(&home).netns).contains(&pid),
        "the cut-off node's daemon is gone from its namespace"
    );
    let own: serde_json::Value =
        serde_json::from_slice(&ok_out(lab.run_in(&home, &["status", "--json"]))).expect("JSON");
    assert_eq!(own["quorate"], false, "{own}");
    let seen = checker.finish();
    assert_eq!(on_two_nodes(&seen), None, "svc ran on two nodes: {seen:?}");
    // In order: on the cut-off node, then nowhere (it stopped svc by itself), and only
    // then in the majority.
    let first_survivor = seen
        .iter()
        .position(|p| *p == [survivor.clone()])
        .expect("seen in the majority");
    let last_home = seen
        .iter()
        .rposition(|p| *p == [home.clone()])
        .expect("seen on the cut-off node");
    assert!(
        last_home < first_survivor && seen[last_home + 1].is_empty(),
        "{seen:?}"
    );
}
