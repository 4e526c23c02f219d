//! Failure handling with real daemons on a loopback lab: a node is powered off or cut
//! off, it is fenced (lab power switch, real `fence_dummy`, manual ack, watchdog), and
//! its `process` resource comes back on a survivor. A checker polls every node's actual
//! processes (pidfiles + /proc) throughout and must never see the resource twice.
//!
//! The labs run one at a time: fifteen daemons at once on a small CI machine could
//! miss heartbeats and turn a test of failover into a test of the machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const WAIT: Duration = Duration::from_secs(60);

static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

fn haven(args: &[&str], client: Option<&Path>) -> Output {
    let mut cmd = Command::new(HAVEN);
    cmd.args(args).env_remove("HAVEN_CONFIG");
    if let Some(c) = client {
        cmd.env("HAVEN_CONFIG", c);
    }
    cmd.output().expect("run haven")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "haven failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 3-node lab, stopped (and healed) when the test ends, pass or fail.
struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    client: PathBuf,
}

impl Lab {
    fn up() -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("lab");
        let lab = Lab {
            client: dir.join("client.toml"),
            dir,
            _tmp: tmp,
        };
        ok(haven(
            &["lab", "up", "--nodes", "3", "--dir", lab.dir_str()],
            None,
        ));
        lab
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    fn run(&self, args: &[&str]) -> Output {
        haven(args, Some(&self.client))
    }

    /// A client.toml that talks to `node` only (a partitioned node answers stale).
    fn client_of(&self, node: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.client).expect("client.toml");
        let mut v: toml::Table = toml::from_str(&text).expect("client.toml parses");
        let servers = v["servers"].as_array().expect("servers").clone();
        let i = NODES.iter().position(|n| *n == node).expect("lab node");
        v.insert(
            "servers".into(),
            toml::Value::Array(vec![servers[i].clone()]),
        );
        let path = self.dir.join(format!("client-{node}.toml"));
        std::fs::write(&path, toml::to_string(&v).expect("toml")).expect("write client");
        path
    }

    /// Replaces the demo configuration with three nodes, one `process` resource `svc`
    /// and `fencing` (TOML for the fencing section), with stonith on.
    fn configure(&self, fencing: &str) {
        let show = ok(self.run(&["config", "show"]));
        let version = show
            .lines()
            .find_map(|l| l.strip_prefix("# haven-config-version: "))
            .expect("version line")
            .trim()
            .to_string();
        let mut text = String::from(
            "[options]\nstonith-enabled = true\nno-quorum-policy = \"stop\"\nresource-stickiness = 100\n",
        );
        for (i, n) in NODES.iter().enumerate() {
            let host = 11 + i;
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"{n}\"\naddrs = [\"127.0.0.{host}\", \"127.0.1.{host}\"]\n"
            ));
        }
        // The demo's resources stay, so nothing is removed under the agents' feet.
        for id in ["db", "web", "worker", "svc"] {
            text.push_str(&format!(
                "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\nparams = {{ command = \"sleep 1000000\" }}\nops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n"
            ));
        }
        text.push_str("\n[[groups]]\nid = \"app\"\nmembers = [\"db\", \"web\"]\n");
        text.push_str(fencing);
        let path = self.dir.join("cluster.toml");
        std::fs::write(&path, text).expect("write config");
        ok(self.run(&[
            "config",
            "apply",
            path.to_str().expect("utf-8"),
            "--based-on",
            &version,
        ]));
    }

    /// The nodes where `resource`'s process really runs now.
    fn running(&self, resource: &str) -> Vec<String> {
        running(&self.dir, resource)
    }

    fn fence_history(&self, client: &Path) -> Vec<serde_json::Value> {
        let out = ok(haven(&["fence", "history", "--json"], Some(client)));
        serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("history JSON")
    }

    fn fence_ls(&self, client: &Path) -> Option<serde_json::Value> {
        let out = haven(&["fence", "ls", "--json"], Some(client));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = haven(&["lab", "heal", "--dir", self.dir_str()], None);
        let _ = haven(&["lab", "down", "--dir", self.dir_str()], None);
    }
}

/// `PID STARTTIME` pidfiles are haven-exec's; a process counts if it is that very
/// process (same start time) and not a zombie.
fn running(dir: &Path, resource: &str) -> Vec<String> {
    NODES
        .iter()
        .filter(|n| {
            let pf = dir
                .join(n)
                .join("resources")
                .join(format!("{resource}.pid"));
            let Ok(text) = std::fs::read_to_string(pf) else {
                return false;
            };
            let mut it = text.split_whitespace();
            let (Some(pid), Some(start)) = (it.next(), it.next()) else {
                return false;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rsplit(')').next() else {
                return false;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first().is_some_and(|s| *s != "Z") && f.get(19) == Some(&start)
        })
        .map(|n| n.to_string())
        .collect()
}

/// Polls every node's processes until dropped; remembers the most nodes it ever saw
/// running the resource at once.
struct Checker {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    fn start(dir: &Path, resource: &str) -> Checker {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m, d, r) = (
            stop.clone(),
            max.clone(),
            dir.to_path_buf(),
            resource.to_string(),
        );
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(running(&d, &r).len(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Checker {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn most_seen(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.max.load(Ordering::Relaxed)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `svc` runs on exactly one node, and returns it.
fn svc_home(lab: &Lab) -> String {
    wait_for("svc to run on one node", || {
        let r = lab.running("svc");
        (r.len() == 1).then(|| r[0].clone())
    })
}

fn lab_device() -> impl Fn(&Lab) -> String {
    |lab: &Lab| {
        format!(
            "\n[[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\nparams = {{ lab-dir = \"{}\" }}\n",
            lab.dir_str()
        )
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    // Acknowledging a node nobody is fencing is refused.
    let again = haven(&["fence", "ack", other], Some(&client));
    assert!(!again.status.success());
}

#[test]
fn fence_node_escalates_from_a_failing_fence_dummy_to_the_lab_switch_which_kills_the_node() {
    let _one = lock();
    let lab = Lab::up();
    let mut fencing = format!(
        "{}\n[[fencing.devices]]\nid = \"broken\"\nagent = \"fence_dummy\"\nparams = {{ type = \"fail\", power_timeout = \"1\", pcmk_host_argument = \"none\" }}\n",
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
        "\n[[fencing.devices]]\nid = \"dummy\"\nagent = \"fence_dummy\"\nparams = {{ type = \"file\", status_file = \"{}\", pcmk_host_argument = \"none\" }}\n",
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
    // The cut-off node stops svc by itself (no-quorum-policy = stop) ...
    wait_for("the minority to stop svc", || {
        lab.running("svc").is_empty().then_some(())
    });
    // ... and the majority starts it once the watchdog wait is over.
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
