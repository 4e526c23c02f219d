//! `haven lab up --netns`: each node in its own network namespace, on real links.
//!
//! Per lab (names from a hash of the lab's directory, so labs side by side never
//! collide, and recorded in DIR/netns.toml so `down` removes exactly these):
//! - a "switch" namespace PREFIX-sw holding one bridge per link (br0, br1): two
//!   separate L2 segments;
//! - per node a namespace PREFIX-nI whose ethL is a veth to port nIlL of bridge brL, with
//!   10.L.LAB.I/24 (LAB: a third octet no other lab nor root route uses);
//! - one veth from the root namespace (hvlLAB, 10.0.LAB.254/24) to br0, so the CLI
//!   reaches the nodes' APIs on link0. Nothing else in the root namespace is touched.
//!
//! A partition sets the node's switch ports down: the node's own side loses carrier,
//! as when a cable is pulled.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::daemon::files::write_file;

/// The lab's record of what it created, in the lab's directory.
pub const RECORD: &str = "netns.toml";
/// How many links (L2 segments) each node has.
pub const LINKS: u8 = 2;
/// The port every daemon listens on: each node has addresses of its own.
const PORT: u16 = 7400;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Netns {
    /// The namespace holding the links' bridges.
    pub switch: String,
    /// The third octet of every address of this lab (10.LINK.LAB.NODE).
    pub lab: u8,
    /// The root namespace's veth to link0, once created.
    pub uplink: Option<String>,
    /// Node name → its namespace.
    pub nodes: Vec<NodeNs>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeNs {
    pub name: String,
    pub netns: String,
    /// Its addresses, one per link, as IP:PORT.
    pub addrs: Vec<String>,
}

impl Netns {
    pub fn node(&self, name: &str) -> anyhow::Result<&NodeNs> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("{RECORD}: the lab has no node {name:?}"))
    }
}

/// The lab's record, if the lab in `dir` runs in namespaces.
pub fn load(dir: &Path) -> anyhow::Result<Option<Netns>> {
    let path = dir.join(RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let rec = toml::from_str(&text).with_context(|| format!("{}: unreadable", path.display()))?;
    Ok(Some(rec))
}

fn save(dir: &Path, rec: &Netns) -> anyhow::Result<()> {
    write_file(&dir.join(RECORD), toml::to_string(rec)?.as_bytes(), false)
}

/// FNV-1a: stable across builds, so a lab's names can be recomputed from its directory.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs `ip ARGS`; its stderr becomes the error.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn addr(link: u8, lab: u8, node: u8) -> String {
    format!("10.{link}.{lab}.{node}")
}

fn port_name(node: u8, link: u8) -> String {
    format!("n{node}l{link}")
}

/// The IPv4 prefixes the root namespace routes, as (network, length).
fn root_routes() -> anyhow::Result<Vec<(u32, u8)>> {
    let json = ip(&["-j", "-4", "route", "show", "table", "all"])?;
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(&json).context("ip -j route: unreadable JSON")?;
    let mut out = Vec::new();
    for r in routes {
        let Some(dst) = r["dst"].as_str() else {
            continue;
        };
        let (net, len) = dst.split_once('/').unwrap_or((dst, "32"));
        if let (Ok(net), Ok(len)) = (net.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) {
            out.push((u32::from(net), len.min(32)));
        }
    }
    Ok(out)
}

fn overlaps(a: (u32, u8), b: (u32, u8)) -> bool {
    let len = a.1.min(b.1);
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    a.0 & mask == b.0 & mask
}

/// Creates the namespaces, bridges and veths of an `nodes`-node lab in `dir` (canonical),
/// recording each step in DIR/netns.toml first, so `destroy` removes a half-built lab too.
pub fn create(dir: &Path, nodes: u8) -> anyhow::Result<Netns> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "--netns needs root (it creates network namespaces); without --netns the lab runs on loopback"
        );
    }
    if dir.join(RECORD).exists() {
        anyhow::bail!(
            "{} records a netns lab already: `haven lab down --dir {0}` first",
            dir.display()
        );
    }
    let hash = fnv1a(&dir.to_string_lossy());
    let prefix = format!("hv{:06x}", hash & 0xff_ffff);
    let mut rec = Netns {
        switch: format!("{prefix}-sw"),
        lab: 0,
        uplink: None,
        nodes: (1..=nodes)
            .map(|i| NodeNs {
                name: super::node_name(i),
                netns: format!("{prefix}-n{i}"),
                addrs: Vec::new(),
            })
            .collect(),
    };
    let existing = ip(&["netns", "list"])?;
    for ns in std::iter::once(&rec.switch).chain(rec.nodes.iter().map(|n| &n.netns)) {
        if existing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
        {
            anyhow::bail!(
                "network namespace {ns} already exists: a lab in {} was not taken down (`ip netns del {ns}` if none runs)",
                dir.display()
            );
        }
    }
    save(dir, &rec)?;
    let sw = rec.switch.clone();
    ip(&["netns", "add", &sw])?;
    for link in 0..LINKS {
        let br = format!("br{link}");
        ip(&["-n", &sw, "link", "add", &br, "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", &br, "up"])?;
    }

    // The lab's octet: one no root route covers, claimed by creating the uplink named
    // after it (the kernel refuses a second hvlLAB, so parallel labs cannot both win).
    let routes = root_routes()?;
    let start = (hash >> 24) % 254;
    let mut claimed = None;
    for k in 0..254u64 {
        let Ok(lab) = u8::try_from((start + k) % 254 + 1) else {
            continue;
        };
        let net = (u32::from(std::net::Ipv4Addr::new(10, 0, lab, 0)), 24);
        if routes.iter().any(|r| overlaps(*r, net)) {
            continue;
        }
        let name = format!("hvl{lab}");
        if ip(&[
            "link", "add", &name, "type", "veth", "peer", "name", "up0", "netns", &sw,
        ])
        .is_ok()
        {
            claimed = Some((lab, name));
            break;
        }
    }
    let (lab, uplink) =
        claimed.context("no free 10.0.X.0/24 for the lab (every X is routed or in use)")?;
    rec.lab = lab;
    rec.uplink = Some(uplink.clone());
    save(dir, &rec)?;
    ip(&["-n", &sw, "link", "set", "up0", "master", "br0", "up"])?;
    ip(&[
        "addr",
        "add",
        &format!("{}/24", addr(0, lab, 254)),
        "dev",
        &uplink,
    ])?;
    ip(&["link", "set", &uplink, "up"])?;

    for (i, node) in (1..=nodes).zip(rec.nodes.iter_mut()) {
        let ns = node.netns.clone();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        for link in 0..LINKS {
            let port = port_name(i, link);
            let dev = format!("eth{link}");
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", &dev, "netns", &ns,
            ])?;
            ip(&[
                "-n",
                &sw,
                "link",
                "set",
                &port,
                "master",
                &format!("br{link}"),
                "up",
            ])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", addr(link, lab, i)),
                "dev",
                &dev,
            ])?;
            ip(&["-n", &ns, "link", "set", &dev, "up"])?;
            node.addrs.push(format!("{}:{PORT}", addr(link, lab, i)));
        }
    }
    save(dir, &rec)?;
    Ok(rec)
}

/// The switch ports of `node`: (link, port name).
fn ports(rec: &Netns, node: &str) -> anyhow::Result<Vec<(u8, String)>> {
    let i = rec
        .nodes
        .iter()
        .position(|n| n.name == node)
        .with_context(|| format!("{RECORD}: the lab has no node {node:?}"))?;
    let i = u8::try_from(i + 1).context("node index")?;
    Ok((0..LINKS).map(|l| (l, port_name(i, l))).collect())
}

/// Sets `node`'s switch ports for `link` (or all links) up or down.
pub fn set_links(rec: &Netns, node: &str, link: Option<u8>, up: bool) -> anyhow::Result<()> {
    if let Some(l) = link
        && l >= LINKS
    {
        anyhow::bail!("--link: the netns lab has link0..link{}", LINKS - 1);
    }
    for (l, port) in ports(rec, node)? {
        if link.is_none_or(|x| x == l) {
            ip(&[
                "-n",
                &rec.switch,
                "link",
                "set",
                &port,
                if up { "up" } else { "down" },
            ])?;
        }
    }
    Ok(())
}

/// Whether each of `node`'s switch ports is up, by link.
pub fn link_states(rec: &Netns, node: &str) -> anyhow::Result<Vec<(u8, bool)>> {
    let mut out = Vec::new();
    for (l, port) in ports(rec, node)? {
        let json = ip(&["-j", "-n", &rec.switch, "link", "show", &port])?;
        let v: serde_json::Value =
            serde_json::from_str(&json).context("ip -j link: unreadable JSON")?;
        let up = v[0]["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP"));
        out.push((l, up));
    }
    Ok(out)
}

/// The pids of the processes in namespace `ns` (none if it is gone).
pub fn pids(ns: &str) -> Vec<i32> {
    ip(&["netns", "pids", ns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process left in `ns` (the lab's own: nothing else runs there), by pid,
/// and waits for them to be gone. Returns how many it killed.
pub fn kill_all(ns: &str) -> usize {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let victims = pids(ns);
    for p in &victims {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pids(ns).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    victims.len()
}

/// Removes everything the lab in `dir` created: the processes still in its namespaces,
/// the uplink, the namespaces (with their bridges and veths), and the record.
pub fn destroy(dir: &Path) -> anyhow::Result<()> {
    let Some(rec) = load(dir)? else {
        return Ok(());
    };
    let existing = ip(&["netns", "list"]).unwrap_or_default();
    let exists = |ns: &str| {
        existing
            .lines()
            .any(|l| l.split_whitespace().next() == Some(ns))
    };
    let mut errors = Vec::new();
    for n in &rec.nodes {
        if exists(&n.netns) {
            kill_all(&n.netns);
        }
    }
    // Deleted explicitly: a namespace's veths otherwise go asynchronously, after the
    // command returns.
    if let Some(up) = &rec.uplink
        && ip(&["link", "show", up]).is_ok()
        && let Err(e) = ip(&["link", "del", up])
    {
        errors.push(e.to_string());
    }
    for ns in rec
        .nodes
        .iter()
        .map(|n| n.netns.as_str())
        .chain(std::iter::once(rec.switch.as_str()))
    {
        if exists(ns)
            && let Err(e) = ip(&["netns", "del", ns])
        {
            errors.push(e.to_string());
        }
    }
    if !errors.is_empty() {
        anyhow::bail!("taking the lab's network down: {}", errors.join("; "));
    }
    let path = dir.join(RECORD);
    std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_one_contains_the_other() {
        let net = |a: [u8; 4], l| (u32::from(std::net::Ipv4Addr::from(a)), l);
        assert!(overlaps(net([10, 0, 0, 0], 8), net([10, 0, 7, 0], 24)));
        assert!(overlaps(net([10, 0, 7, 5], 32), net([10, 0, 7, 0], 24)));
        assert!(overlaps(net([0, 0, 0, 0], 0), net([10, 0, 7, 0], 24)));
        assert!(!overlaps(net([10, 0, 8, 0], 24), net([10, 0, 7, 0], 24)));
        assert!(!overlaps(net([192, 0, 2, 0], 24), net([10, 0, 7, 0], 24)));
    }

    #[test]
    fn names_are_stable_per_directory() {
        assert_eq!(fnv1a("/tmp/a"), fnv1a("/tmp/a"));
        assert_ne!(fnv1a("/tmp/a"), fnv1a("/tmp/b"));
    }
}
