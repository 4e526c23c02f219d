//! What the failover tests share: a loopback lab of real daemons, the resource
//! checker that polls every node's processes, and bounded waits.
#![allow(dead_code)] // each test binary uses a part

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub const WAIT: Duration = Duration::from_secs(60);

pub static ONE_LAB_AT_A_TIME: Mutex<()> = Mutex::new(());

pub fn haven(args: &[&str], client: Option<&Path>) -> Output {
    let mut cmd = Command::new(HAVEN);
    cmd.args(args).env_remove("HAVEN_CONFIG");
    if let Some(c) = client {
        cmd.env("HAVEN_CONFIG", c);
    }
    cmd.output().expect("run haven")
}

pub fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "haven failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The command line of `svc`'s process, as /proc shows it: the checker finds it by this.
pub const SVC_COMMAND: &str = "sleep 1000001";

/// A 3-node lab, stopped (and healed) when the test ends, pass or fail.
pub struct Lab {
    _tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub client: PathBuf,
    /// What `lab up --netns` recorded, for a lab in network namespaces.
    pub netns: Option<netns::Record>,
}

impl Lab {
    pub fn up() -> Lab {
        Self::start(false)
    }

    /// A lab with each node in its own network namespace (root).
    pub fn up_netns() -> Lab {
        Self::start(true)
    }

    /// A lab started with `lab up` and `extra` arguments (e.g. `--libvirt`).
    pub fn up_with(extra: &[&str]) -> Lab {
        Self::start_with(false, extra)
    }

    fn start(in_netns: bool) -> Lab {
        Self::start_with(in_netns, &[])
    }

    fn start_with(in_netns: bool, extra: &[&str]) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("lab");
        let mut lab = Lab {
            client: dir.join("client.toml"),
            dir,
            _tmp: tmp,
            netns: None,
        };
        let mut args = vec!["lab", "up", "--nodes", "3", "--dir", lab.dir_str()];
        if in_netns {
            args.push("--netns");
        }
        args.extend_from_slice(extra);
        let out = haven(&args, None);
        // Recorded before anything is created: the guard removes a half-built lab too.
        lab.netns = netns::Record::load(&lab.dir);
        ok(out);
        if in_netns {
            assert!(lab.netns.is_some(), "lab up --netns recorded no namespaces");
        }
        lab
    }

    /// Each node's link addresses (IPs), in NODES order.
    pub fn node_ips(&self) -> Vec<Vec<String>> {
        match &self.netns {
            Some(r) => r
                .nodes
                .iter()
                .map(|n| {
                    n.addrs
                        .iter()
                        .map(|a| a.rsplit_once(':').expect("IP:PORT").0.to_string())
                        .collect()
                })
                .collect(),
            None => (0..NODES.len())
                .map(|i| {
                    let host = 11 + i;
                    vec![format!("127.0.0.{host}"), format!("127.0.1.{host}")]
                })
                .collect(),
        }
    }

    /// Runs `haven ARGS` inside `node`'s namespace, talking to that node only: how
    /// to ask a node cut off from the root namespace's uplink.
    pub fn run_in(&self, node: &str, args: &[&str]) -> Output {
        let rec = self.netns.as_ref().expect("a netns lab");
        let ns = &rec.node(node).netns;
        Command::new("ip")
            .args(["netns", "exec", ns, HAVEN])
            .args(args)
            .env("HAVEN_CONFIG", self.client_of(node))
            .output()
            .expect("run ip netns exec haven")
    }

    pub fn dir_str(&self) -> &str {
        self.dir.to_str().expect("utf-8 path")
    }

    pub fn run(&self, args: &[&str]) -> Output {
        haven(args, Some(&self.client))
    }

    /// A client.toml that talks to `node` only (a partitioned node answers stale).
    pub fn client_of(&self, node: &str) -> PathBuf {
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
    pub fn configure(&self, fencing: &str) {
        self.configure_with("", fencing);
    }

    /// As [`Self::configure`], with `resources` (TOML) added.
    pub fn configure_with(&self, resources: &str, fencing: &str) {
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
        for (n, ips) in NODES.iter().zip(self.node_ips()) {
            let ips: Vec<String> = ips.iter().map(|ip| format!("\"{ip}\"")).collect();
            text.push_str(&format!(
                "\n[[nodes]]\nname = \"{n}\"\naddrs = [{}]\n",
                ips.join(", ")
            ));
        }
        // The demo's resources stay, so nothing is removed under the agents' feet.
        for id in ["db", "web", "worker", "svc"] {
            let command = if id == "svc" {
                SVC_COMMAND
            } else {
                "sleep 1000000"
            };
            text.push_str(&format!(
                "\n[[resources]]\nid = \"{id}\"\nclass = \"process\"\ntype = \"{id}\"\nparams = {{ command = \"{command}\" }}\nops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n"
            ));
        }
        text.push_str("\n[[groups]]\nid = \"app\"\nmembers = [\"db\", \"web\"]\n");
        text.push_str(resources);
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
    pub fn running(&self, resource: &str) -> Vec<String> {
        running(&self.dir, resource)
    }

    pub fn fence_history(&self, client: &Path) -> Vec<serde_json::Value> {
        let out = ok(haven(&["fence", "history", "--json"], Some(client)));
        serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("history JSON")
    }

    /// Waits until `survivor` has committed a fence confirmation, and checks it was
    /// `victim`'s, by `device`, and succeeded.
    pub fn wait_fence_confirmed(&self, survivor: &str, victim: &str, device: &str) {
        let h = wait_for("the fence confirmation to be committed", || {
            let h = self.fence_history(&self.client_of(survivor));
            (!h.is_empty()).then_some(h)
        });
        assert_eq!(
            (&h[0]["victim"], &h[0]["device"], &h[0]["ok"]),
            (
                &serde_json::json!(victim),
                &serde_json::json!(device),
                &serde_json::json!(true)
            ),
            "{h:?}"
        );
    }

    pub fn fence_ls(&self, client: &Path) -> Option<serde_json::Value> {
        let out = haven(&["fence", "ls", "--json"], Some(client));
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_daemon_logs(&self.dir, &NODES, 60);
        }
        let _ = haven(&["lab", "heal", "--dir", self.dir_str()], None);
        let _ = haven(&["lab", "down", "--dir", self.dir_str()], None);
    }
}

/// `PID STARTTIME` pidfiles are haven-exec's; a process counts if it is that very
/// process (same start time) and not a zombie.
pub fn running(dir: &Path, resource: &str) -> Vec<String> {
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
pub struct Checker {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checker {
    pub fn start(dir: &Path, resource: &str) -> Checker {
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

    pub fn most_seen(mut self) -> usize {
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

pub fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
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
pub fn svc_home(lab: &Lab) -> String {
    wait_for("svc to run on one node", || {
        let r = lab.running("svc");
        (r.len() == 1).then(|| r[0].clone())
    })
}

pub fn lab_device() -> impl Fn(&Lab) -> String {
    |lab: &Lab| {
        format!(
            "\n[[fencing.devices]]\nid = \"power\"\nagent = \"lab\"\nparams = {{ lab-dir = \"{}\" }}\n",
            lab.dir_str()
        )
    }
}

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The test guest (scripts/build-guest): HAVEN_GUEST_DIR or the repository's
/// target/guest.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("HAVEN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"));
    assert!(
        dir.join("vmlinux").is_file() && dir.join("initramfs.cpio").is_file(),
        "no test guest in {}: run scripts/build-guest (or set HAVEN_GUEST_DIR)",
        dir.display()
    );
    dir
}

/// A node's state and whether its link0 and link1 are up, as `status --json` from
/// `client` reports them.
pub fn node_links(client: &Path, name: &str) -> Option<(String, bool, bool)> {
    let out = haven(&["status", "--json"], Some(client));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let n = s["nodes"].as_array()?.iter().find(|n| n["name"] == name)?;
    let up = |l: &str| {
        n["links"]
            .as_array()
            .and_then(|ls| ls.iter().find(|x| x["name"] == l))
            .is_some_and(|x| x["up"] == true)
    };
    Some((n["state"].as_str()?.to_string(), up("link0"), up("link1")))
}

/// The daemons' own account of what went wrong, shown with a failing test: the last
/// `last` lines of each node's daemon.log under a lab directory.
pub fn print_daemon_logs(dir: &Path, nodes: &[&str], last: usize) {
    for n in nodes {
        let log = std::fs::read_to_string(dir.join(n).join("daemon.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- {n}/daemon.log (last {last} lines)");
        for l in &lines[lines.len().saturating_sub(last)..] {
            eprintln!("{l}");
        }
    }
}

/// The pid in `node`'s daemon.pid under a lab directory.
pub fn daemon_pid(dir: &Path, node: &str) -> i32 {
    std::fs::read_to_string(dir.join(node).join("daemon.pid"))
        .expect("daemon.pid")
        .trim()
        .parse()
        .expect("pid")
}

/// Every `HAVEN-<what> N` the test guest printed on its console (`vm1.serial`) on `node`.
pub fn console_numbers(dir: &Path, node: &str, what: &str) -> Vec<u64> {
    let serial = dir.join(node).join("resources").join("vm1.serial");
    let text = std::fs::read(serial).unwrap_or_default();
    let prefix = format!("HAVEN-{what} ");
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&prefix)?.trim().parse().ok())
        .collect()
}

/// `haven volume status --json` of vol1's replica on `node`, through its control socket.
pub fn volume_status(dir: &Path, node: &str) -> Option<serde_json::Value> {
    let ctl = dir.join(node).join("resources").join("vol1.ctl");
    let out = haven(
        &["volume", "status", "--json", "--control", ctl.to_str()?],
        None,
    );
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}
