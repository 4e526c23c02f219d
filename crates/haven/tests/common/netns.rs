//! The netns lab as the tests see it: its record, which namespace a process is in, and
//! a checker that finds a resource's process in /proc and says on which node it runs.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// DIR/netns.toml, as `lab up --netns` writes it.
#[derive(Clone, Debug)]
pub struct Record {
    pub switch: String,
    pub uplink: Option<String>,
    pub nodes: Vec<NodeNs>,
}

#[derive(Clone, Debug)]
pub struct NodeNs {
    pub name: String,
    pub netns: String,
    pub addrs: Vec<String>,
}

impl Record {
    pub fn load(dir: &Path) -> Option<Record> {
        let text = std::fs::read_to_string(dir.join("netns.toml")).ok()?;
        let v: toml::Table = toml::from_str(&text).expect("netns.toml parses");
        let nodes = v["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| NodeNs {
                name: n["name"].as_str().expect("name").to_string(),
                netns: n["netns"].as_str().expect("netns").to_string(),
                addrs: n["addrs"]
                    .as_array()
                    .expect("addrs")
                    .iter()
                    .map(|a| a.as_str().expect("addr").to_string())
                    .collect(),
            })
            .collect();
        Some(Record {
            switch: v["switch"].as_str().expect("switch").to_string(),
            uplink: v.get("uplink").and_then(|u| u.as_str()).map(str::to_string),
            nodes,
        })
    }

    pub fn node(&self, name: &str) -> &NodeNs {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .expect("a node of the lab")
    }

    /// Every namespace the lab made.
    pub fn namespaces(&self) -> Vec<String> {
        let mut v: Vec<String> = self.nodes.iter().map(|n| n.netns.clone()).collect();
        v.push(self.switch.clone());
        v
    }

    /// Namespace inode → node name, for telling where a process runs.
    pub fn inodes(&self) -> BTreeMap<u64, String> {
        self.nodes
            .iter()
            .filter_map(|n| Some((ns_inode(&n.netns)?, n.name.clone())))
            .collect()
    }
}

/// The inode of named network namespace `ns` (as /proc/PID/ns/net shows it).
pub fn ns_inode(ns: &str) -> Option<u64> {
    std::fs::metadata(format!("/run/netns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

/// The inode of the network namespace process `pid` is in.
pub fn netns_of(pid: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let s = link.to_string_lossy();
    s.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The named network namespaces that exist now.
pub fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Whether the root namespace has an interface `name`.
pub fn root_link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The live (non-zombie) processes whose command line contains `command`.
pub fn processes(command: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let line: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if !line.join(" ").contains(command) {
                return false;
            }
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()
                        .map(|r| !r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The nodes where a process with `command` runs now, found in /proc and placed by
/// its network namespace. Processes in other namespaces are not this lab's (every
/// daemon runs in its node's namespace, and what it starts inherits it), so other
/// labs on the machine cannot disturb the count.
pub fn running_where(inodes: &BTreeMap<u64, String>, command: &str) -> Vec<String> {
    let mut nodes: Vec<String> = processes(command)
        .into_iter()
        .filter_map(netns_of)
        .filter_map(|ino| inodes.get(&ino).cloned())
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// Polls /proc every 50 ms until dropped, and keeps every distinct placement it saw,
/// in order.
pub struct ProcChecker {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ProcChecker {
    pub fn start(rec: &Record, command: &str) -> ProcChecker {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let inodes = rec.inodes();
        assert_eq!(inodes.len(), rec.nodes.len(), "a node namespace is missing");
        let (s, v, c) = (stop.clone(), seen.clone(), command.to_string());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let now = running_where(&inodes, &c);
                if let Ok(mut v) = v.lock()
                    && v.last() != Some(&now)
                {
                    v.push(now);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        ProcChecker {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Where the process runs, as last seen.
    pub fn now(&self) -> Vec<String> {
        self.seen
            .lock()
            .ok()
            .and_then(|v| v.last().cloned())
            .unwrap_or_default()
    }

    /// Stops polling; returns every placement seen, in order.
    pub fn finish(mut self) -> Vec<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for ProcChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The processes in namespace `ns`, as `ip netns pids` lists them.
pub fn pids(ns: &str) -> Vec<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("run ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
