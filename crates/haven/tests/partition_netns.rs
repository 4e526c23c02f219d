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
