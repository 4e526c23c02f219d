//! Real `haven daemon` processes on loopback: forming, configuration, joins, TLS,
//! quorum with a witness. Every daemon is killed by PID when its test ends, pass or fail.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const HAVEN: &str = env!("CARGO_BIN_EXE_haven");
/// A bound on every wait, so that a broken cluster fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(40);

fn free_addr(ip: &str) -> String {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind a loopback port");
    format!("{ip}:{}", l.local_addr().unwrap().port())
}

fn run(args: &[&str]) -> Output {
    Command::new(HAVEN)
        .args(args)
        .env_remove("HAVEN_CONFIG")
        .output()
        .expect("run haven")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "haven failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(
            Instant::now() < deadline,
            "gave up after {WAIT:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster of daemon processes in a temporary directory.
struct Cluster {
    dir: tempfile::TempDir,
    /// The node made by `cluster init`: its directory holds client.toml.
    founder: String,
    daemons: BTreeMap<String, Child>,
    addrs: BTreeMap<String, Vec<String>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.daemons) {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Supervised processes outlive their daemon by design; the test started them,
        // so it stops them, by the pids their agents recorded.
        for name in self.addrs.keys() {
            let Ok(entries) = std::fs::read_dir(self.node_dir(name).join("resources")) else {
                continue;
            };
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid")
                    && let Some(pid) = pid_in(&e.path())
                    && alive(pid)
                {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Cluster {
    /// A founded (not yet started) one-node cluster.
    fn init(first: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addrs = vec![free_addr("127.0.0.1"), free_addr("127.0.1.1")];
        let node_dir = dir.path().join(first);
        ok(run(&[
            "cluster",
            "init",
            "--cluster",
            "t",
            "--dir",
            node_dir.to_str().unwrap(),
            "--name",
            first,
            "--addr",
            &addrs[0],
            "--addr",
            &addrs[1],
        ]));
        let mut c = Cluster {
            dir,
            founder: first.to_string(),
            daemons: BTreeMap::new(),
            addrs: BTreeMap::new(),
        };
        c.addrs.insert(first.to_string(), addrs);
        c
    }

    fn node_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn start(&mut self, name: &str, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap();
        let child = Command::new(HAVEN)
            .arg("daemon")
            .arg("--dir")
            .arg(self.node_dir(name))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start a daemon");
        self.daemons.insert(name.to_string(), child);
    }

    /// A clean stop: SIGTERM, and wait (bounded) for the daemon to exit.
    fn terminate(&mut self, name: &str) {
        if let Some(mut child) = self.daemons.remove(name) {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + WAIT;
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{name} did not exit within {WAIT:?} of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn stop(&mut self, name: &str) {
        if let Some(mut child) = self.daemons.remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A client.toml that talks to `node` only (to see the cluster from its side).
    fn client_for(&self, node: &str) -> PathBuf {
        let base = self.node_dir(&self.founder);
        let text = std::fs::read_to_string(base.join("client.toml")).unwrap();
        let mut t: toml::Table = toml::from_str(&text).unwrap();
        t.insert(
            "servers".into(),
            toml::Value::Array(vec![toml::Value::String(self.addrs[node][0].clone())]),
        );
        let path = base.join(format!("client-{node}.toml"));
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
        path
    }

    fn client(&self) -> PathBuf {
        self.client_for(&self.founder)
    }

    fn haven(&self, client: &Path, args: &[&str]) -> Output {
        let mut all = vec![];
        all.extend_from_slice(args);
        Command::new(HAVEN)
            .args(&all)
            .env("HAVEN_CONFIG", client)
            .output()
            .expect("run haven")
    }

    fn token(&self) -> String {
        ok(self.haven(&self.client(), &["cluster", "join-token"]))
            .trim()
            .to_string()
    }

    fn seed(&self) -> String {
        self.addrs[&self.founder][0].clone()
    }

    fn join(&mut self, name: &str, token: &str, extra: &[&str]) -> Output {
        let seed = self.seed();
        self.join_via(&seed, name, token, extra)
    }

    fn join_via(&mut self, seed: &str, name: &str, token: &str, extra: &[&str]) -> Output {
        let addrs = vec![free_addr("127.0.0.1"), free_addr("127.0.1.1")];
        let dir = self.node_dir(name);
        let mut args = vec![
            "cluster",
            "join",
            "--dir",
            dir.to_str().unwrap(),
            "--name",
            name,
            "--addr",
            &addrs[0],
            "--addr",
            &addrs[1],
        ];
        args.extend_from_slice(extra);
        args.push(seed);
        args.push(token);
        let out = run(&args);
        if out.status.success() {
            self.addrs.insert(name.to_string(), addrs);
        }
        out
    }

    fn status(&self, client: &Path) -> Option<Value> {
        let out = self.haven(client, &["status", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    fn config_version(&self, client: &Path) -> Option<(u64, String)> {
        let out = self.haven(client, &["config", "show"]);
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (first, rest) = text.split_once('\n')?;
        let v = first
            .strip_prefix("# haven-config-version: ")?
            .trim()
            .parse()
            .ok()?;
        Some((v, rest.to_string()))
    }

    /// Waits until `client`'s node reports `names` all online voters and quorum.
    fn wait_formed(&self, client: &Path, names: &[&str]) {
        wait_until(
            &format!("{names:?} online with quorum via {}", client.display()),
            || {
                let Some(s) = self.status(client) else {
                    return false;
                };
                let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
                s["quorate"] == true
                    && nodes.len() == names.len()
                    && names.iter().all(|n| {
                        nodes
                            .iter()
                            .any(|x| x["name"] == *n && x["state"] == "online")
                    })
            },
        );
    }

    fn started_one(name: &str) -> Cluster {
        let mut c = Cluster::init(name);
        c.start(name, &[]);
        let client = c.client();
        wait_until("the founder to commit configuration version 1", || {
            c.config_version(&client).is_some_and(|(v, _)| v >= 1)
        });
        c
    }
}

const CONFIG_V2: &str = "[options]\nstonith-enabled = false\n\n# the web tier: ask ops first\n[[resources]]\nid = \"web\"\nclass = \"process\"\ntype = \"web\"\nparams = { command = \"sleep 1000\" }\n";

#[test]
fn three_nodes_form_a_cluster_and_every_node_sees_a_config_change() {
    let mut c = Cluster::started_one("n1");
    let token = c.token();
    ok(c.join("n2", &token, &[]));
    c.start("n2", &[]);
    c.wait_formed(&c.client(), &["n1", "n2"]);
    // n3 joins through n2, a follower: the admission is forwarded to the leader.
    let token = c.token();
    let via = c.addrs["n2"][0].clone();
    ok(c.join_via(&via, "n3", &token, &[]));
    c.start("n3", &[]);
    for n in ["n1", "n2", "n3"] {
        c.wait_formed(&c.client_for(n), &["n1", "n2", "n3"]);
    }
    let s = c.status(&c.client()).unwrap();
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["role"] == "voter"),
        "{s}"
    );
    // Two links per node, each seen up.
    wait_until("both links of every node up", || {
        c.status(&c.client()).is_some_and(|s| {
            s["nodes"].as_array().unwrap().iter().all(|n| {
                let links = n["links"].as_array().unwrap();
                links.len() == 2 && links.iter().all(|l| l["up"] == true)
            })
        })
    });

    // Apply through n2; it must appear on every node.
    let file = c.dir.path().join("v2.toml");
    std::fs::write(&file, CONFIG_V2).unwrap();
    let out = ok(c.haven(
        &c.client_for("n2"),
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    ));
    assert!(out.contains("version 2"), "{out}");
    for n in ["n1", "n2", "n3"] {
        let client = c.client_for(n);
        wait_until(&format!("version 2 on {n}"), || {
            c.config_version(&client) == Some((2, CONFIG_V2.to_string()))
        });
    }
    let s = c.status(&c.client_for("n3")).unwrap();
    assert_eq!(s["resources"][0]["id"], "web", "{s}");

    // A restarted node comes back with its state from disk and rejoins.
    c.stop("n3");
    c.start("n3", &[]);
    c.wait_formed(&c.client_for("n3"), &["n1", "n2", "n3"]);
    assert_eq!(
        c.config_version(&c.client_for("n3")).map(|(v, _)| v),
        Some(2)
    );

    // The leader dies: the others elect a new one and keep accepting changes.
    c.stop("n1");
    let n2 = c.client_for("n2");
    wait_until("a new leader", || {
        c.status(&n2).is_some_and(|s| {
            s["quorate"] == true && s["leader"].as_str().is_some_and(|l| l != "n1")
        })
    });
    let out = ok(c.haven(
        &n2,
        &["config", "apply", "--based-on", "2", file.to_str().unwrap()],
    ));
    assert!(out.contains("version 3"), "{out}");

    // A CLI edit rewrites only what it changes: the operator's comment stays.
    ok(c.haven(&n2, &["resource", "stop", "web"]));
    let (version, text) = c.config_version(&n2).unwrap();
    assert_eq!(version, 4);
    assert!(text.contains("# the web tier: ask ops first"), "{text}");
    assert!(text.contains("target-role = \"Stopped\""), "{text}");
}

#[test]
fn a_stale_config_apply_is_refused_naming_both_versions() {
    let c = Cluster::started_one("n1");
    let client = c.client();
    let file = c.dir.path().join("v.toml");
    std::fs::write(&file, CONFIG_V2).unwrap();
    ok(c.haven(
        &client,
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    ));
    // A second operator, still working from version 1.
    let out = c.haven(
        &client,
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("based on version 1") && err.contains("at version 2"),
        "{err}"
    );
    assert_eq!(c.config_version(&client).map(|(v, _)| v), Some(2));

    // An invalid configuration is refused before it reaches the cluster.
    std::fs::write(&file, "[[resources]]\nid = \"\"\n").unwrap();
    let out = c.haven(
        &client,
        &["config", "apply", "--based-on", "2", file.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert_eq!(c.config_version(&client).map(|(v, _)| v), Some(2));
}

#[test]
fn a_join_without_a_valid_token_is_refused() {
    let mut c = Cluster::started_one("n1");
    let good = c.token();
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();

    // Right cluster, wrong secret.
    parts[2] = "00".repeat(16);
    let forged = parts.join(".");
    let out = c.join("x1", &forged, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not match"),
        "{out:?}"
    );

    // A token for another cluster: the joiner refuses to talk to this one.
    let other = Cluster::init("o1");
    let fp = other.dir.path().join("o1/ca.pem");
    assert!(fp.exists());
    parts = good.split('.').map(str::to_string).collect();
    parts[3] = "ab".repeat(32);
    let out = c.join("x2", &parts.join("."), &[]);
    assert!(!out.status.success(), "{out:?}");

    // Malformed.
    let out = c.join("x3", "let-me-in", &[]);
    assert!(!out.status.success());

    // The good token works once, and only once.
    ok(c.join("x4", &good, &[]));
    let out = c.join("x5", &good, &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already been used"),
        "{out:?}"
    );

    let s = c.status(&c.client()).unwrap();
    let names: Vec<&str> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, vec!["n1", "x4"], "{s}");
}

#[test]
fn plaintext_and_foreign_certificates_are_refused_by_the_daemon() {
    use std::io::{Read, Write};
    let c = Cluster::started_one("n1");
    let addr = c.seed();
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"POST /api/status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "plaintext was answered"
    );

    // A client certificate from another cluster's CA, pointed at this daemon.
    let other = Cluster::init("o1");
    let foreign = other.node_dir("o1").join("client.toml");
    let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&foreign).unwrap()).unwrap();
    t.insert(
        "servers".into(),
        toml::Value::Array(vec![toml::Value::String(addr)]),
    );
    std::fs::write(&foreign, toml::to_string(&t).unwrap()).unwrap();
    let out = other.haven(&foreign, &["status"]);
    assert!(
        !out.status.success(),
        "a foreign client certificate was served"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TLS"),
        "{out:?}"
    );
}

#[test]
fn two_nodes_and_a_witness_keep_quorum_when_one_node_stops() {
    let mut c = Cluster::started_one("n1");
    let t = c.token();
    ok(c.join("n2", &t, &[]));
    c.start("n2", &[]);
    let t = c.token();
    ok(c.join("w", &t, &["--witness"]));
    c.start("w", &["--witness"]);
    let n1 = c.client_for("n1");
    c.wait_formed(&n1, &["n1", "n2", "w"]);
    wait_until("three voters", || {
        c.status(&n1).is_some_and(|s| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["role"] != "learner")
                .count()
                == 3
        })
    });
    let s = c.status(&n1).unwrap();
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["name"] == "w" && n["role"] == "witness"),
        "{s}"
    );

    c.stop("n2");
    wait_until("n2 to be seen offline", || {
        c.status(&n1).is_some_and(|s| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == "n2" && n["state"] == "offline")
        })
    });
    let s = c.status(&n1).unwrap();
    assert_eq!(s["quorate"], true, "{s}");
    // Quorum is real: a change still commits with n2 gone.
    let file = c.dir.path().join("v2.toml");
    std::fs::write(&file, CONFIG_V2).unwrap();
    let base = c.config_version(&n1).unwrap().0.to_string();
    ok(c.haven(
        &n1,
        &[
            "config",
            "apply",
            "--based-on",
            &base,
            file.to_str().unwrap(),
        ],
    ));

    // Without the witness as well, n1 alone is a minority.
    c.stop("w");
    wait_until("n1 to lose quorum", || {
        c.status(&n1).is_some_and(|s| s["quorate"] == false)
    });
}

fn running_on(s: &Value, id: &str) -> Vec<String> {
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

fn pid_in(pidfile: &Path) -> Option<i32> {
    std::fs::read_to_string(pidfile)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

#[test]
fn an_ocf_dummy_and_a_process_are_started_monitored_recovered_and_stopped_as_placed() {
    let mut c = Cluster::started_one("n1");
    let t = c.token();
    ok(c.join("n2", &t, &[]));
    c.start("n2", &[]);
    let client = c.client();
    c.wait_formed(&client, &["n1", "n2"]);

    let state = c.dir.path().join("dummy.state");
    let ip = |n: &str| c.addrs[n][0].rsplit_once(':').unwrap().0.to_string();
    let config = |role: &str| {
        format!(
            "[options]\nstonith-enabled = false\n\n\
             [[nodes]]\nname = \"n1\"\naddrs = [\"{}\"]\n\n[[nodes]]\nname = \"n2\"\naddrs = [\"{}\"]\n\n\
             [[resources]]\nid = \"dummy\"\nclass = \"ocf\"\nprovider = \"heartbeat\"\ntype = \"Dummy\"\n\
             params = {{ state = \"{}\" }}\nmeta = {{ target-role = \"{role}\" }}\n\
             ops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n\n\
             [[resources]]\nid = \"loop\"\nclass = \"process\"\ntype = \"loop\"\n\
             params = {{ command = \"sleep 100000\" }}\nmeta = {{ target-role = \"{role}\" }}\n\
             ops = [{{ name = \"monitor\", interval = 1, timeout = 10 }}]\n",
            ip("n1"),
            ip("n2"),
            state.display()
        )
    };
    let file = c.dir.path().join("rsc.toml");
    std::fs::write(&file, config("Started")).unwrap();
    ok(c.haven(
        &client,
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    ));

    let mut placed = BTreeMap::new();
    wait_until("both resources running exactly once", || {
        let Some(s) = c.status(&client) else {
            return false;
        };
        let (d, l) = (running_on(&s, "dummy"), running_on(&s, "loop"));
        if d.len() == 1 && l.len() == 1 {
            placed.insert("dummy", d[0].clone());
            placed.insert("loop", l[0].clone());
            true
        } else {
            false
        }
    });
    assert!(
        state.exists(),
        "the Dummy agent's state file is missing after its start"
    );
    let pidfile = c.node_dir(&placed["loop"]).join("resources/loop.pid");
    let first = pid_in(&pidfile).expect("the process resource's pidfile");
    assert!(alive(first));

    // The process dies behind the cluster's back: the monitor notices, it is recovered.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the killed process to be recovered", || {
        let Some(s) = c.status(&client) else {
            return false;
        };
        let again = running_on(&s, "loop");
        let pid = again
            .first()
            .and_then(|n| pid_in(&c.node_dir(n).join("resources/loop.pid")));
        again.len() == 1 && pid.is_some_and(|p| p != first && alive(p))
    });

    // Stopped by configuration: both stop, the agents' traces are gone.
    let base = c.config_version(&client).unwrap().0.to_string();
    std::fs::write(&file, config("Stopped")).unwrap();
    ok(c.haven(
        &client,
        &[
            "config",
            "apply",
            "--based-on",
            &base,
            file.to_str().unwrap(),
        ],
    ));
    wait_until("both resources stopped", || {
        c.status(&client).is_some_and(|s| {
            running_on(&s, "dummy").is_empty() && running_on(&s, "loop").is_empty()
        })
    });
    assert!(!state.exists(), "Dummy's state file survived its stop");
    let gone = ["n1", "n2"]
        .iter()
        .all(|n| pid_in(&c.node_dir(n).join("resources/loop.pid")).is_none_or(|p| !alive(p)));
    assert!(gone, "the process resource survived its stop");
}

/// Three running nodes and one process resource `svc`; returns the node it runs on and
/// its pid.
fn three_nodes_running_svc(c: &mut Cluster) -> (String, i32) {
    for name in ["n2", "n3"] {
        let t = c.token();
        ok(c.join(name, &t, &[]));
        c.start(name, &[]);
    }
    let client = c.client();
    c.wait_formed(&client, &["n1", "n2", "n3"]);
    let ip = |n: &str| c.addrs[n][0].rsplit_once(':').unwrap().0.to_string();
    let mut text =
        String::from("[options]\nstonith-enabled = false\nno-quorum-policy = \"stop\"\n");
    for n in ["n1", "n2", "n3"] {
        text.push_str(&format!(
            "\n[[nodes]]\nname = \"{n}\"\naddrs = [\"{}\"]\n",
            ip(n)
        ));
    }
    text.push_str(
        "\n[[resources]]\nid = \"svc\"\nclass = \"process\"\ntype = \"svc\"\nparams = { command = \"sleep 100000\" }\n",
    );
    let file = c.dir.path().join("q.toml");
    std::fs::write(&file, text).unwrap();
    ok(c.haven(
        &client,
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    ));
    let mut host = String::new();
    wait_until("svc running", || {
        c.status(&client).is_some_and(|s| {
            let on = running_on(&s, "svc");
            if on.len() == 1 {
                host = on[0].clone();
                true
            } else {
                false
            }
        })
    });
    let pid = pid_in(&c.node_dir(&host).join("resources/svc.pid")).expect("svc pidfile");
    assert!(alive(pid));
    (host, pid)
}

#[test]
fn a_node_that_loses_quorum_stops_its_resources() {
    let mut c = Cluster::started_one("n1");
    let (host, pid) = three_nodes_running_svc(&mut c);
    // Cut the host off: the two other daemons go away, so it is a minority of one.
    for other in ["n1", "n2", "n3"].into_iter().filter(|n| *n != host) {
        c.stop(other);
    }
    wait_until("the minority node to stop svc", || !alive(pid));
}

#[test]
fn without_fencing_a_lost_nodes_resource_is_started_on_a_survivor() {
    let mut c = Cluster::started_one("n1");
    let (host, pid) = three_nodes_running_svc(&mut c);
    // Power the host off: its daemon and what it ran die together.
    c.stop(&host);
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let survivor = ["n1", "n2", "n3"].into_iter().find(|n| *n != host).unwrap();
    let client = c.client_for(survivor);
    let mut new_host = String::new();
    wait_until("svc to run on a survivor", || {
        c.status(&client).is_some_and(|s| {
            let on = running_on(&s, "svc");
            if on.len() == 1 && on[0] != host {
                new_host = on[0].clone();
                true
            } else {
                false
            }
        })
    });
    let new_pid = pid_in(&c.node_dir(&new_host).join("resources/svc.pid"));
    assert!(
        new_pid.is_some_and(alive),
        "svc is not running on {new_host}"
    );
}

#[test]
fn a_node_shut_down_cleanly_stops_its_resources_and_they_move() {
    let mut c = Cluster::started_one("n1");
    let (host, pid) = three_nodes_running_svc(&mut c);
    c.terminate(&host);
    assert!(
        !alive(pid),
        "svc still runs on {host} after its daemon exited"
    );
    let survivor = ["n1", "n2", "n3"].into_iter().find(|n| *n != host).unwrap();
    let client = c.client_for(survivor);
    wait_until("svc to run on a survivor", || {
        c.status(&client).is_some_and(|s| {
            let on = running_on(&s, "svc");
            on.len() == 1 && on[0] != host
        })
    });
}

#[test]
fn a_learner_receives_the_state_but_does_not_vote() {
    let mut c = Cluster::started_one("n1");
    let t = c.token();
    ok(c.join("l1", &t, &["--learner"]));
    c.start("l1", &[]);
    let n1 = c.client_for("n1");
    c.wait_formed(&n1, &["n1", "l1"]);
    let file = c.dir.path().join("v2.toml");
    std::fs::write(&file, CONFIG_V2).unwrap();
    ok(c.haven(
        &n1,
        &["config", "apply", "--based-on", "1", file.to_str().unwrap()],
    ));
    let l1 = c.client_for("l1");
    wait_until("version 2 on the learner", || {
        c.config_version(&l1).is_some_and(|(v, _)| v == 2)
    });
    let s = c.status(&n1).unwrap();
    let role = |n: &str| {
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == n)
            .map(|x| x["role"].clone())
    };
    assert_eq!(role("l1"), Some(Value::from("learner")), "{s}");
    assert_eq!(role("n1"), Some(Value::from("voter")), "{s}");
    // Its absence changes nothing for quorum: n1 is still the whole voting set.
    c.stop("l1");
    wait_until("l1 offline", || {
        c.status(&n1).is_some_and(|s| {
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["name"] == "l1" && x["state"] == "offline")
        })
    });
    assert_eq!(c.status(&n1).unwrap()["quorate"], true);
    let base = "2";
    ok(c.haven(
        &n1,
        &[
            "config",
            "apply",
            "--based-on",
            base,
            file.to_str().unwrap(),
        ],
    ));
}

#[test]
fn a_node_joining_after_the_log_was_compacted_gets_a_snapshot() {
    let mut c = Cluster::init("n1");
    // Snapshot every 5 entries and keep none behind it, so the log a joiner would
    // need is gone and only the snapshot can bring it up to date.
    let toml = c.node_dir("n1").join("node.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("snapshot_after_logs = 5000", "snapshot_after_logs = 5")
        .replace(
            "logs_kept_after_snapshot = 1000",
            "logs_kept_after_snapshot = 0",
        );
    assert!(text.contains("snapshot_after_logs = 5\n"), "{text}");
    std::fs::write(&toml, text).unwrap();
    c.start("n1", &[]);
    let n1 = c.client();
    wait_until("version 1", || {
        c.config_version(&n1).is_some_and(|(v, _)| v >= 1)
    });
    let file = c.dir.path().join("v.toml");
    for v in 1..=12u64 {
        std::fs::write(&file, format!("{CONFIG_V2}# change {v}\n")).unwrap();
        ok(c.haven(
            &n1,
            &[
                "config",
                "apply",
                "--based-on",
                &v.to_string(),
                file.to_str().unwrap(),
            ],
        ));
    }
    let t = c.token();
    ok(c.join("n2", &t, &[]));
    c.start("n2", &[]);
    let n2 = c.client_for("n2");
    wait_until("the joiner to hold version 13", || {
        c.config_version(&n2) == Some((13, format!("{CONFIG_V2}# change 12\n")))
    });
    c.wait_formed(&n1, &["n1", "n2"]);
    // And it goes on replicating normally after the snapshot.
    std::fs::write(&file, CONFIG_V2).unwrap();
    ok(c.haven(
        &n1,
        &[
            "config",
            "apply",
            "--based-on",
            "13",
            file.to_str().unwrap(),
        ],
    ));
    wait_until("version 14 on the joiner", || {
        c.config_version(&n2).is_some_and(|(v, _)| v == 14)
    });
}

#[test]
fn bad_input_is_refused_naming_the_file_field_and_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let stderr = |out: Output| {
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let d = tmp.path().join("n1");
    let e = stderr(run(&["daemon", "--dir", d.to_str().unwrap()]));
    assert!(e.contains("node.toml") && e.contains("cannot read"), "{e}");

    let e = stderr(run(&[
        "cluster",
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--name",
        "n1",
        "--addr",
        "nowhere",
    ]));
    assert!(e.contains("--addr #1") && e.contains("IP:PORT"), "{e}");

    let addr = free_addr("127.0.0.1");
    ok(run(&[
        "cluster",
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--name",
        "n1",
        "--addr",
        &addr,
    ]));
    let e = stderr(run(&[
        "cluster",
        "init",
        "--dir",
        d.to_str().unwrap(),
        "--name",
        "n1",
        "--addr",
        &addr,
    ]));
    assert!(e.contains("already holds a node"), "{e}");

    let toml = d.join("node.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace(&addr, "127.0.0.1");
    std::fs::write(&toml, text).unwrap();
    let e = stderr(run(&["daemon", "--dir", d.to_str().unwrap()]));
    assert!(e.contains("node.toml") && e.contains("addrs[0]"), "{e}");

    let e = stderr(run(&["status"]));
    assert!(e.contains("HAVEN_CONFIG"), "{e}");
    let e = stderr(run(&[
        "status",
        "--config",
        tmp.path().join("none.toml").to_str().unwrap(),
    ]));
    assert!(e.contains("none.toml"), "{e}");
    let e = stderr(run(&[
        "cluster",
        "join",
        "--dir",
        tmp.path().join("x").to_str().unwrap(),
        "--name",
        "x",
        "--addr",
        &addr,
        &addr,
        "not-a-token",
    ]));
    assert!(e.contains("haven-join.<id>.<secret>.<ca-sha256>"), "{e}");
}

#[test]
fn a_client_certificate_cannot_use_node_endpoints() {
    let c = Cluster::started_one("n1");
    let dir = c.node_dir("n1");
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let id = haven_net::TlsIdentity::from_pem(
        &read("client-ca.pem"),
        &read("client.pem"),
        &read("client-key.pem"),
        "client",
    )
    .unwrap();
    let rpc = haven_net::RpcClient::new(id.client_config().unwrap(), Duration::from_secs(10));
    let addr = c.seed();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let status: Result<Value, _> = rpc.call(&addr, "/api/status", &serde_json::json!({})).await;
        assert!(status.is_ok(), "{status:?}");
        for path in [
            "/local/write",
            "/raft/vote",
            "/hb",
            "/ha/op",
            "/api/promote",
        ] {
            let r: Result<Value, haven_net::RpcError> =
                rpc.call(&addr, path, &serde_json::json!({})).await;
            match r {
                Err(haven_net::RpcError::Remote {
                    status, message, ..
                }) => {
                    assert_eq!(status, 403, "{path}: {message}");
                    assert!(message.contains("for cluster nodes"), "{path}: {message}");
                }
                other => panic!("{path} answered a client certificate: {other:?}"),
            }
        }
    });
}
