//! libvirt guests as `ocf:heartbeat:VirtualDomain` resources (root): a lab whose nodes
//! each run a libvirt daemon of their own (`lab up --libvirt`), the real agent from
//! resource-agents, real libvirtd and QEMU (TCG). Where the guest really runs is read
//! from /proc: a QEMU of that domain inside the node's hypervisor PID namespace.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Lab, NODES, guest_dir, lock, ok, wait_for};

/// `lab up --libvirt --vms`: the demo's vm1 is a VirtualDomain with allow-migrate.
fn libvirt_lab() -> Lab {
    libvirt_lab_with(&[])
}

fn libvirt_lab_with(extra: &[&str]) -> Lab {
    let guest = guest_dir();
    let mut args = vec![
        "--libvirt",
        "--vms",
        "--guest-dir",
        guest.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Lab::up_with(&args)
}

/// The PID namespace of `node`'s libvirtd, through the lab's pidfile of it (checked to
/// be that very process).
fn hypervisor_ns(dir: &Path, node: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join(node).join("resources/lab.libvirtd.pid")).ok()?;
    let mut it = text.split_whitespace();
    let (pid, start) = (it.next()?, it.next()?);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    if f.first() == Some(&"Z") || f.get(19) != Some(&start) {
        return None;
    }
    std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()
}

/// The nodes where a QEMU process of domain `name` is alive now.
fn qemu_on(dir: &Path, name: &str) -> Vec<String> {
    let needle = format!("guest={name},");
    let mut namespaces = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let p = e.path();
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(cmdline) = std::fs::read(p.join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_guest = args.first().is_some_and(|a| a.contains("qemu-system"))
            && args.iter().any(|a| a.starts_with(&needle));
        let alive = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .map(|r| !r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if is_guest
            && alive
            && let Ok(ns) = std::fs::read_link(p.join("ns/pid"))
        {
            namespaces.push(ns);
        }
    }
    NODES
        .iter()
        .filter(|n| hypervisor_ns(dir, n).is_some_and(|ns| namespaces.contains(&ns)))
        .map(|n| n.to_string())
        .collect()
}

/// Polls /proc until dropped; remembers the most nodes it saw running `vm1` at once.
struct QemuChecker {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
}

impl QemuChecker {
    fn start(dir: &Path) -> QemuChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m, d) = (stop.clone(), max.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(qemu_on(&d, "vm1").len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        QemuChecker { stop, max }
    }

    fn most_seen(self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for QemuChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What vm1 printed on its serial console on `node` (the node's own libvirt log dir).
fn console(dir: &Path, node: &str) -> String {
    std::fs::read_to_string(dir.join(node).join("libvirt/log/qemu/vm1-console.log"))
        .unwrap_or_default()
}

fn counters(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("HAVEN-COUNTER "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Where status says `resource` is started.
fn status_on(client: &Path, resource: &str) -> Option<serde_json::Value> {
    let out = common::haven(&["status", "--json"], Some(client));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    s["resources"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == resource)
        .map(|r| r["running_on"].clone())
}

/// vm1 runs on exactly one node, the cluster says so, and the guest has booted there.
fn wait_booted_once(lab: &Lab) -> String {
    let home = wait_for("vm1's QEMU on one node", || {
        let r = qemu_on(&lab.dir, "vm1");
        (r.len() == 1).then(|| r[0].clone())
    });
    wait_for("status to show vm1 where its QEMU runs", || {
        (status_on(&lab.client, "vm1")? == serde_json::json!([home])).then_some(())
    });
    wait_for("the guest's ready line", || {
        console(&lab.dir, &home)
            .contains("HAVEN-GUEST-UP")
            .then_some(())
    });
    home
}

#[test]
fn a_powered_off_node_running_a_libvirt_guest_is_fenced_and_the_guest_runs_once_on_a_survivor() {
    let _one = lock();
    let lab = libvirt_lab();
    let home = wait_booted_once(&lab);
    let home_socket = lab.dir.join(&home).join("libvirt/sock/libvirt-sock");
    assert!(
        std::os::unix::net::UnixStream::connect(&home_socket).is_ok(),
        "{home}'s libvirtd does not answer"
    );

    let checker = QemuChecker::start(&lab.dir);
    ok(lab.run(&["lab", "kill", &home, "--dir", lab.dir_str()]));
    // Powering the node off took its hypervisor and guest with it.
    assert!(
        !qemu_on(&lab.dir, "vm1").contains(&home),
        "vm1's QEMU outlived the power-off of {home}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&home_socket).is_err(),
        "{home}'s libvirtd outlived its power-off"
    );
    let survivor = wait_for("vm1 to run on a survivor", || {
        let r = qemu_on(&lab.dir, "vm1");
        (r.len() == 1 && r[0] != home).then(|| r[0].clone())
    });
    let client = lab.client_of(&survivor);
    wait_for("status to show vm1 on the survivor", || {
        (status_on(&client, "vm1")? == serde_json::json!([survivor])).then_some(())
    });
    wait_for("the guest to boot on the survivor", || {
        console(&lab.dir, &survivor)
            .contains("HAVEN-GUEST-UP")
            .then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "vm1 ran on two nodes at once");
    let h = lab.fence_history(&client);
    assert!(
        h.iter()
            .any(|r| r["victim"] == home.as_str() && r["device"] == "lab-power" && r["ok"] == true),
        "{h:?}"
    );
}

#[test]
fn a_libvirt_guest_moves_live_between_two_nodes_libvirt_daemons_and_stops() {
    let _one = lock();
    let lab = libvirt_lab();
    let home = wait_booted_once(&lab);
    let target = NODES
        .iter()
        .find(|n| **n != home)
        .expect("another node")
        .to_string();
    migrate_live(&lab, &home, &target);

    // stop: VirtualDomain shuts the guest down through its node's libvirt.
    ok(lab.run(&["resource", "stop", "vm1"]));
    wait_for("vm1's QEMU to be gone everywhere", || {
        qemu_on(&lab.dir, "vm1").is_empty().then_some(())
    });
    wait_for("status to show vm1 stopped", || {
        let on = status_on(&lab.client, "vm1")?;
        (on.is_null() || on == serde_json::json!([])).then_some(())
    });
}

/// Moves vm1 from `home` to `target` and checks it went live.
fn migrate_live(lab: &Lab, home: &str, target: &str) {
    wait_for("the guest to count on its disk", || {
        (!counters(&console(&lab.dir, home)).is_empty()).then_some(())
    });
    // allow-migrate: the scheduler plans migrate_to on home, migrate_from on target,
    // which VirtualDomain carries out with `virsh migrate --live` between the two
    // nodes' libvirt daemons (remoteuri).
    ok(lab.run(&["resource", "move", "vm1", target]));
    wait_for("vm1's QEMU on the target only", || {
        (qemu_on(&lab.dir, "vm1") == vec![target.to_string()]).then_some(())
    });
    wait_for("status to show vm1 on the target", || {
        (status_on(&lab.client, "vm1")? == serde_json::json!([target])).then_some(())
    });
    // Live: the guest did not boot again on the target, and its counter (in guest
    // memory, written to the shared disk) carried on from where the source left it.
    wait_for("the guest to count on the target", || {
        (!counters(&console(&lab.dir, target)).is_empty()).then_some(())
    });
    let on_target = console(&lab.dir, target);
    assert!(
        !on_target.contains("HAVEN-GUEST-UP"),
        "the guest booted again on {target}: {on_target}"
    );
    let last_on_home = counters(&console(&lab.dir, home))
        .last()
        .copied()
        .expect("counters on the source");
    let first_on_target = counters(&on_target)[0];
    assert!(
        first_on_target >= last_on_home,
        "the migrated guest does not count on: {home} reached {last_on_home}, {target} began at {first_on_target}"
    );
}

#[test]
fn in_network_namespaces_a_libvirt_guest_migrates_over_the_link_and_outlives_its_nodes_power_off() {
    let _one = lock();
    // Each node's libvirtd runs in the node's network namespace: the migration stream
    // goes to the target's link0 address, and powering a node off kills its namespace.
    let lab = libvirt_lab_with(&["--netns"]);
    let home = wait_booted_once(&lab);
    let target = NODES
        .iter()
        .find(|n| **n != home)
        .expect("another node")
        .to_string();
    migrate_live(&lab, &home, &target);

    let checker = QemuChecker::start(&lab.dir);
    ok(lab.run(&["lab", "kill", &target, "--dir", lab.dir_str()]));
    let survivor = wait_for("vm1 to run on a survivor", || {
        let r = qemu_on(&lab.dir, "vm1");
        (r.len() == 1 && r[0] != target).then(|| r[0].clone())
    });
    wait_for("status to show vm1 on the survivor", || {
        (status_on(&lab.client_of(&survivor), "vm1")? == serde_json::json!([survivor]))
            .then_some(())
    });
    assert_eq!(checker.most_seen(), 1, "vm1 ran on two nodes at once");
}
