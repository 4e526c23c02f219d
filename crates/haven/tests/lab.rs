//! `haven lab up` then `haven status --json`, as a user would run them.

use std::path::Path;
use std::process::{Command, Output};

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");

fn haven(args: &[&str], client: Option<&Path>) -> Output {
    let mut cmd = Command::new(HAVEN);
    cmd.args(args).env_remove("HAVEN_CONFIG");
    if let Some(c) = client {
        cmd.env("HAVEN_CONFIG", c);
    }
    cmd.output().expect("run haven")
}

/// Runs `lab down` when the test ends, pass or fail, and checks that it worked.
struct Lab<'a>(&'a Path);

impl Drop for Lab<'_> {
    fn drop(&mut self) {
        let _ = haven(
            &["lab", "down", "--dir", self.0.to_str().unwrap_or("")],
            None,
        );
    }
}

fn pids(dir: &Path) -> Vec<i32> {
    ["n1", "n2", "n3"]
        .iter()
        .filter_map(|n| std::fs::read_to_string(dir.join(n).join("daemon.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

fn alive(pid: i32) -> bool {
    // A zombie has an empty command line: it is no longer running.
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn lab_up_gives_three_online_nodes_with_quorum_and_lab_down_stops_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let guard = Lab(&dir);
    let out = haven(
        &["lab", "up", "--nodes", "3", "--dir", dir.to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "lab up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("HAVEN_CONFIG="));

    let status = || -> serde_json::Value {
        let out = haven(&["status", "--json"], Some(&dir.join("client.toml")));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = status();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 3, "{s}");
    let ids: Vec<&str> = s["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["db", "web", "worker"], "{s}");
    // The coordinator places every demo resource, each exactly once (bounded wait).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    let s = loop {
        let s = status();
        let once = s["resources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["running_on"].as_array().is_some_and(|n| n.len() == 1));
        // Read together, so a heartbeat delayed by a loaded machine cannot make a
        // passing moment look like a failure: all online, quorum, each resource once.
        let online = s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "online");
        if once && online && s["quorate"] == true {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not 3 online nodes with quorum and each demo resource once: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // The group's members run together.
    assert_eq!(
        s["resources"][0]["running_on"], s["resources"][1]["running_on"],
        "{s}"
    );
    let resource_pids: Vec<i32> = ["n1", "n2", "n3"]
        .iter()
        .flat_map(|n| {
            std::fs::read_dir(dir.join(n).join("resources"))
                .into_iter()
                .flatten()
        })
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(resource_pids.len(), 3, "one process per demo resource");
    assert!(resource_pids.iter().all(|p| alive(*p)));

    let started = pids(&dir);
    assert_eq!(started.len(), 3);
    assert!(started.iter().all(|p| alive(*p)));
    let out = haven(&["lab", "down", "--dir", dir.to_str().unwrap()], None);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stopped 3"),
        "{out:?}"
    );
    assert!(
        started.iter().all(|p| !alive(*p)),
        "a lab daemon survived lab down"
    );
    assert!(
        resource_pids.iter().all(|p| !alive(*p)),
        "a demo resource survived lab down"
    );
    drop(guard);
}

fn status_of(dir: &Path) -> Option<serde_json::Value> {
    let out = haven(&["status", "--json"], Some(&dir.join("client.toml")));
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn placement(s: &serde_json::Value, id: &str) -> Vec<String> {
    s["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == id))
        .and_then(|r| r["running_on"].as_array())
        .map(|v| {
            v.iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn wait_for(dir: &Path, what: &str, mut f: impl FnMut(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(40);
    loop {
        if let Some(s) = status_of(dir)
            && f(&s)
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

#[test]
fn standby_move_and_stop_commands_change_where_resources_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Lab(&dir);
    let out = haven(
        &["lab", "up", "--nodes", "2", "--dir", dir.to_str().unwrap()],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = dir.join("client.toml");
    let cli = |args: &[&str]| {
        let out = haven(args, Some(&client));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    wait_for(&dir, "db placed", |s| placement(s, "db").len() == 1);

    cli(&["node", "standby", "n1"]);
    wait_for(&dir, "everything off n1", |s| {
        ["db", "web", "worker"]
            .iter()
            .all(|r| placement(s, r) == ["n2"])
            && s["nodes"][0]["state"] == "standby"
    });
    cli(&["node", "online", "n1"]);
    cli(&["resource", "move", "worker", "n1"]);
    wait_for(&dir, "worker moved to n1", |s| {
        placement(s, "worker") == ["n1"]
    });
    cli(&["resource", "stop", "app"]);
    wait_for(&dir, "the group stopped", |s| {
        placement(s, "db").is_empty()
            && placement(s, "web").is_empty()
            && placement(s, "worker") == ["n1"]
    });
    let out = haven(&["resource", "stop", "nope"], Some(&client));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no resource, group or clone named"));
}

fn guest_dir() -> std::path::PathBuf {
    let dir = std::env::var_os("HAVEN_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file(),
        "no test guest in {}: run scripts/build-guest (or set HAVEN_GUEST_DIR)",
        dir.display()
    );
    dir
}

#[test]
fn lab_up_with_vms_runs_one_qemu_guest_and_lab_down_stops_it() {
    let guest = guest_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let _guard = Lab(&dir);
    let out = haven(
        &[
            "lab",
            "up",
            "--nodes",
            "2",
            "--vms",
            "--dir",
            dir.to_str().unwrap(),
            "--guest-dir",
            guest.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut host = String::new();
    wait_for(&dir, "vm1 running on one node", |s| {
        let on = placement(s, "vm1");
        if on.len() == 1 {
            host = on[0].clone();
            true
        } else {
            false
        }
    });
    let pid: i32 = std::fs::read_to_string(dir.join(&host).join("resources/vm1.pid"))
        .expect("vm1's pidfile")
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid in vm1's pidfile");
    assert!(alive(pid), "QEMU is not running");
    let serial =
        std::fs::read_to_string(dir.join(&host).join("resources/vm1.serial")).unwrap_or_default();
    assert!(
        serial.contains("HAVEN-GUEST-UP"),
        "the guest did not come up: {serial}"
    );
    let out = haven(&["lab", "down", "--dir", dir.to_str().unwrap()], None);
    assert!(out.status.success());
    assert!(!alive(pid), "QEMU survived lab down");
}

mod common;

/// The inode of the network namespace process `pid` is in.
fn netns_of(pid: i32) -> Option<u64> {
    common::netns::netns_of(pid)
}

#[test]
fn netns_lab_runs_each_node_in_its_own_namespace_and_down_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let guard = Lab(&dir);
    let guest = guest_dir();
    let out = haven(
        &[
            "lab",
            "up",
            "--netns",
            "--vms",
            "--guest-dir",
            guest.to_str().unwrap(),
            "--nodes",
            "3",
            "--dir",
            dir.to_str().unwrap(),
        ],
        None,
    );
    let rec = common::netns::Record::load(&dir).expect("netns.toml");
    assert!(
        out.status.success(),
        "lab up --netns failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let uplink = rec.uplink.clone().expect("an uplink for the CLI");
    assert!(common::netns::root_link_exists(&uplink));
    let existing = common::netns::namespaces();
    for ns in rec.namespaces() {
        assert!(existing.contains(&ns), "{ns} missing: {existing:?}");
    }

    // Each daemon runs in its own node's namespace and listens on its addresses there.
    let daemons = pids(&dir);
    assert_eq!(daemons.len(), 3);
    for (node, pid) in rec.nodes.iter().zip(&daemons) {
        assert_eq!(
            netns_of(*pid),
            common::netns::ns_inode(&node.netns),
            "{}'s daemon is not in {}",
            node.name,
            node.netns
        );
        assert!(node.addrs.iter().all(|a| a.starts_with("10.")), "{node:?}");
    }
    // The CLI in the root namespace reaches them over the uplink; the demo resources
    // run, each in the namespace of the node the cluster says it runs on.
    let inodes = rec.inodes();
    wait_for(&dir, "3 online nodes and each demo resource placed", |s| {
        let online = s["nodes"]
            .as_array()
            .is_some_and(|ns| ns.len() == 3 && ns.iter().all(|n| n["state"] == "online"));
        online
            && ["db", "web", "worker", "vm1"]
                .iter()
                .all(|r| placement(s, r).len() == 1)
    });
    let s = status_of(&dir).expect("status");
    let mut resource_pids = Vec::new();
    // The QEMU guest too: its process lives in its node's namespace.
    for r in ["db", "web", "worker", "vm1"] {
        let node = placement(&s, r).remove(0);
        let pid: i32 = std::fs::read_to_string(dir.join(&node).join(format!("resources/{r}.pid")))
            .expect("pidfile")
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a pid");
        let ns = netns_of(pid).expect("a running process");
        assert_eq!(
            inodes.get(&ns),
            Some(&node),
            "{r} runs outside {node}'s namespace"
        );
        resource_pids.push(pid);
    }

    // A cut shows in lab status as the switch port's state, and heal restores it.
    let lab = |args: &[&str]| {
        let mut a = vec!["lab"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--dir", dir.to_str().unwrap()]);
        let out = haven(&a, None);
        assert!(
            out.status.success(),
            "{a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    lab(&["partition", "n2", "--link", "link1"]);
    let st = lab(&["status"]);
    let n2 = st
        .lines()
        .find(|l| l.starts_with("n2:"))
        .expect("n2's line");
    assert!(n2.contains("link0 up, link1 CUT"), "{st}");
    assert!(n2.contains(&rec.node("n2").netns), "{st}");
    assert!(lab(&["heal"]).contains("n2: healed"));
    assert!(lab(&["status"]).lines().all(|l| !l.contains("CUT")));

    let out = lab(&["down"]);
    assert!(out.contains("stopped 3"), "{out}");
    assert!(
        daemons.iter().all(|p| !alive(*p)),
        "a daemon survived lab down"
    );
    assert!(
        resource_pids.iter().all(|p| !alive(*p)),
        "a resource survived lab down"
    );
    let left = common::netns::namespaces();
    for ns in rec.namespaces() {
        assert!(!left.contains(&ns), "{ns} survived lab down");
    }
    assert!(
        !common::netns::root_link_exists(&uplink),
        "{uplink} survived lab down"
    );
    assert!(!dir.join("netns.toml").exists());
    drop(guard);
}
