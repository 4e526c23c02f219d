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
    // One QEMU lab at a time: TCG guests on a 2-core machine.
    let _one = common::lock();
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
use common::{console_numbers, volume_status};

/// The inode of the network namespace process `pid` is in.
fn netns_of(pid: i32) -> Option<u64> {
    common::netns::netns_of(pid)
}

#[test]
fn netns_lab_runs_each_node_in_its_own_namespace_and_down_leaves_nothing_behind() {
    let _one = common::lock();
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

/// `node`'s replica is a secondary in sync with a primary on `primary`.
fn in_sync_secondary(dir: &Path, node: &str, primary: &str) -> bool {
    volume_status(dir, node).is_some_and(|s| {
        let peer = s["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["node"] == primary).cloned())
            .unwrap_or_default();
        s["role"] == "Secondary"
            && s["disk"] == "UpToDate"
            && peer["role"] == "Primary"
            && peer["connection"] == "Connected"
            && peer["replication"] == "Established"
    })
}

/// Room for a TCG boot and a live migration on a loaded 2-core machine.
fn wait_long<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every process the lab's agents track now, as (pid, start time) from their
/// `PID STARTTIME` pidfiles, so a recycled pid is not mistaken for a survivor.
fn tracked_processes(dir: &Path) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for n in common::NODES {
        let Ok(entries) = std::fs::read_dir(dir.join(n).join("resources")) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let mut it = text.split_whitespace();
            if let (Some(pid), Some(start)) = (it.next(), it.next())
                && same_process(pid, start)
            {
                out.push((p.display().to_string(), pid.to_string(), start.to_string()));
            }
        }
    }
    out
}

/// Process `pid` still runs and started at `start` (clock ticks after boot).
fn same_process(pid: &str, start: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    f.first().is_some_and(|s| *s != "Z") && f.get(19) == Some(&start)
}

#[test]
fn lab_up_with_vms_boots_the_guest_from_a_replicated_volume_moves_it_live_and_recovers_it_after_a_power_off()
 {
    let _one = common::lock();
    let guest = guest_dir();
    let lab = common::Lab::up_with(&["--vms", "--guest-dir", guest.to_str().unwrap()]);
    let dir = lab.dir.clone();
    let checker = common::Checker::start(&dir, "vm1");

    // The guest runs on the volume's primary, the other replica is in sync with it, and
    // n3 (no replica) runs neither.
    let home = wait_long("vm1 to run on one node", || {
        let r = lab.running("vm1");
        (r.len() == 1).then(|| r[0].clone())
    });
    assert!(home == "n1" || home == "n2", "vm1 runs on {home}");
    let other = if home == "n1" { "n2" } else { "n1" };
    assert_eq!(
        lab.running("vol1"),
        vec!["n1", "n2"],
        "a replica on n1 and n2"
    );
    let primary = volume_status(&dir, &home).expect("the primary's status");
    assert_eq!(primary["role"], "Primary", "{primary:#}");
    wait_long("the other replica to be connected and UpToDate", || {
        in_sync_secondary(&dir, other, &home).then_some(())
    });
    wait_long("the cluster to report vm1 on its node", || {
        status_of(&dir)
            .is_some_and(|s| placement(&s, "vm1") == [home.clone()])
            .then_some(())
    });
    // `haven status` says which replica is the Promoted one, as crm_mon does.
    wait_long("the cluster to report the promoted replica", || {
        status_of(&dir)
            .is_some_and(|s| {
                s["resources"]
                    .as_array()
                    .and_then(|rs| rs.iter().find(|r| r["id"] == "vol1"))
                    .is_some_and(|r| r["promoted_on"] == serde_json::json!([home.clone()]))
            })
            .then_some(())
    });
    wait_long("the guest to count on its disk", || {
        (console_numbers(&dir, &home, "COUNTER").last() >= Some(&3)).then_some(())
    });

    assert_eq!(checker.most_seen(), 1, "the guest ran on two nodes at once");

    // A move is a live migration with the volume's primary (for its length, two QEMUs
    // exist: the target's waits paused for the source's state).
    let out = lab.run(&["resource", "move", "vm1", other]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_long("vm1 to run on the other replica's node only", || {
        (lab.running("vm1") == [other]).then_some(())
    });
    wait_long("the primary to have moved with it", || {
        let o = volume_status(&dir, other)?;
        (o["role"] == "Primary"
            && o.get("window").is_none()
            && in_sync_secondary(&dir, &home, other))
        .then_some(())
    });
    let moved_at = *console_numbers(&dir, &home, "COUNTER")
        .last()
        .expect("counters before the move");
    wait_long("the guest to count on after the move", || {
        (console_numbers(&dir, other, "COUNTER").last() > Some(&moved_at)).then_some(())
    });
    // Live, not a reboot: a boot prints RESUME, and the counter went on from the disk's.
    assert!(
        console_numbers(&dir, other, "RESUME").is_empty(),
        "the guest booted again on {other}"
    );
    let first = console_numbers(&dir, other, "COUNTER")[0];
    assert!(
        first + 2 > moved_at && first <= moved_at + 2,
        "counter {moved_at} on {home}, then {first} on {other}"
    );

    // The move's preference goes (as an operator would once the move is done), so
    // what follows is the drain's doing, not the standing preference's.
    let out = lab.run(&["resource", "clear", "vm1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Draining vm1's node moves it back live too (the window opens although the
    // drained node's replica stops after its demote); `node online` brings the replica
    // back, resynced.
    let drained_at = *console_numbers(&dir, other, "COUNTER")
        .last()
        .expect("counters after the move");
    let out = lab.run(&["node", "standby", other]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_long("vm1 to leave the drained node", || {
        (lab.running("vm1") == [home.as_str()] && lab.running("vol1") == [home.as_str()])
            .then_some(())
    });
    wait_long("the guest to count on after the drain", || {
        (console_numbers(&dir, &home, "COUNTER").last() > Some(&drained_at)).then_some(())
    });
    assert!(
        console_numbers(&dir, &home, "RESUME").is_empty(),
        "the guest booted again on {home} instead of moving live"
    );
    let out = lab.run(&["node", "online", other]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_long("the drained node's replica to be back in sync", || {
        in_sync_secondary(&dir, other, &home).then_some(())
    });
    // The cluster lifts its outdated record with the replica's next monitor after the
    // resync; until then the replica may not be promoted (so a failover would wait).
    wait_long("the cluster to count the replica promotable again", || {
        status_of(&dir)
            .is_some_and(|s| {
                s["resources"]
                    .as_array()
                    .and_then(|rs| rs.iter().find(|r| r["id"] == "vol1"))
                    .is_some_and(|r| r.get("unpromotable").is_none())
            })
            .then_some(())
    });
    assert_eq!(
        lab.running("vm1"),
        [home.as_str()],
        "stickiness keeps the guest"
    );
    let (home, other) = (other.to_string(), home.clone());
    let other = other.as_str();

    // vm1's node loses power: once it is fenced, the other replica is promoted and the
    // guest boots from it, resuming from the last count it had written.
    let checker = common::Checker::start(&dir, "vm1");
    let out = haven(&["lab", "kill", other, "--dir", lab.dir_str()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = *console_numbers(&dir, other, "COUNTER")
        .last()
        .expect("counters");
    wait_long("vm1 to boot again on the surviving replica", || {
        (lab.running("vm1") == [home.as_str()]).then_some(())
    });
    let resumed = wait_long("the guest to resume from its disk", || {
        console_numbers(&dir, &home, "RESUME").first().copied()
    });
    assert!(
        resumed >= seen,
        "printed {seen} on {other}, resumed at {resumed}"
    );
    assert_eq!(checker.most_seen(), 1, "the guest ran on two nodes at once");
    let fenced = lab.fence_history(&lab.client_of(&home));
    assert!(
        fenced
            .iter()
            .any(|r| r["victim"] == other && r["device"] == "lab-power" && r["ok"] == true),
        "{fenced:?}"
    );

    // lab down stops the daemons, the guest and the surviving replica.
    let daemons: Vec<i32> = pids(&dir).into_iter().filter(|p| alive(*p)).collect();
    assert_eq!(daemons.len(), 2, "n1..n3 but the one powered off");
    let tracked = tracked_processes(&dir);
    assert!(
        tracked.iter().any(|(f, ..)| f.ends_with("vm1.pid"))
            && tracked.iter().any(|(f, ..)| f.ends_with("vol1.pid")),
        "{tracked:?}"
    );
    let out = haven(&["lab", "down", "--dir", lab.dir_str()], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        daemons.iter().all(|p| !alive(*p)),
        "a daemon survived lab down"
    );
    let left: Vec<_> = tracked
        .iter()
        .filter(|(_, pid, start)| same_process(pid, start))
        .collect();
    assert!(left.is_empty(), "survived lab down: {left:?}");
}
