//! The `volume` class: this node's replica of a Haven replicated volume, run as a
//! supervised `haven volume serve` process; use it inside a promotable clone.
//!
//! A child process rather than a task in the daemon: the replica keeps serving the
//! guest's disk while the daemon restarts (as the guest's QEMU keeps running), a
//! fault in the data path cannot take the daemon down, and the lab's power switch
//! kills it with the node's other resources, by its pidfile.
//!
//! Parameters:
//!
//! | name | meaning | default |
//! |---|---|---|
//! | `replicas` | every replica as `NODE=HOST:PORT` (its replication address), separated by spaces or commas | required |
//! | `size` | bytes, or with K/M/G/T; used when this node's replica is created | required |
//! | `initial` | the node whose replica starts UpToDate when created (the others get a full sync from it) | the first in `replicas` |
//! | `volume` | the volume id, the same on every replica | the resource id |
//! | `dir` | this node's replica directory; `{node}` is replaced by the node name | `STATE_DIR/INSTANCE.volume` |
//! | `region_size` | resync granularity (power of two) | 64K |
//! | `after_sb` | split-brain policy (`haven volume serve --after-sb`) | `disconnect` |
//! | `peer_timeout` | seconds before a silent peer is dropped | 5 |
//! | `fencing` | `resource-and-stonith`: a primary that loses an up-to-date peer freezes I/O until the cluster has recorded that peer outdated; `none` writes on alone (unsafe: the lost peer may later be promoted without those writes) | `resource-and-stonith` |
//! | `freeze_timeout` | seconds a request may wait on such a freeze before it fails (EIO) | 60 |
//! | `window_timeout` | how long a live migration's dual-primary window may stay open (a duration: `120`, `90s`, `2min`; 1 s to 1 h); past it the target holds its writes until the source is secondary, and the source keeps its side twice as long | 120s |
//! | `resync_rate` | resync rate limit, bytes per second (K/M/G suffixes) | unlimited |
//! | `tls_dir` | directory with `ca.pem`, `node.pem`, `node-key.pem` | the daemon's directory (the state dir's parent) |
//! | `plaintext` | `true` replicates without TLS (never across hosts) | false |
//! | `allow_non_loopback` | `true` lets the replica listen on a non-loopback address | false |
//! | `haven` | the `haven` binary | this program |
//!
//! The node this runs on comes from the meta attribute `on_node`, which the daemon
//! sets. Files in the state dir: `INSTANCE.pid`, `INSTANCE.log`, `INSTANCE.nbd` (the
//! NBD socket the `qemu` class attaches to with `volume = INSTANCE`), `INSTANCE.ctl`.
//!
//! Monitor: not running → `NotRunning`; primary → `RunningPromoted`; secondary →
//! `Success`. Promote asks the replica with the peers the cluster confirmed fenced
//! ([`Op::Promote`]); the replica refuses while another peer is unreachable or itself
//! is not UpToDate, and promote retries until its timeout (a peer may still be
//! connecting, a resync finishing). A promote naming a migration source (a live
//! migration's window) asks the replica to become primary beside that peer, which must
//! agree; the source's demote closes the window. Demote and stop are the replica's own
//! (stop is SIGTERM: the replica flushes and leaves itself secondary).
//!
//! Resource-level fencing (DRBD's `fence-peer`) is driven by the daemon around the
//! monitor: [`replica_status`] shows a frozen primary's lost peers, the daemon commits
//! "this replica is outdated" to the replicated state and then calls [`peer_outdated`];
//! a replica the cluster holds outdated is told so with [`outdate`] before any promote.

use std::path::{Path, PathBuf};
use std::time::Duration;

use haven_volume::control::{self, ControlError, ControlRequest};
use haven_volume::meta::{self, Role};
use haven_volume::volume::Status;
use tokio::time::Instant;

use crate::agent::{AgentSpec, Op, OpCode, OpResult};
use crate::pidfile::{self, Tracked};
use crate::process::{reap_in_background, spawn_detached, terminate};
use crate::run::signal_group;

const POLL: Duration = Duration::from_millis(100);
/// Bounds one control-socket call made while a longer deadline governs.
const CONTROL_CALL: Duration = Duration::from_secs(5);

/// The promotion score a replica publishes for itself (`promotion-RSC`): how much it
/// wants to be primary, or -INFINITY where a promote would be refused (an Outdated or
/// Inconsistent disk), so a location preference cannot pick it.
pub fn promotion_score(s: &Status) -> String {
    s.promotion
        .map_or_else(|| "-INFINITY".to_string(), |v| v.to_string())
}

/// The NBD socket of volume resource `volume` on this node.
pub fn nbd_socket(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join(format!("{volume}.nbd"))
}

/// The control socket of volume resource `volume` on this node.
pub fn control_socket(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join(format!("{volume}.ctl"))
}

struct Paths {
    pid: PathBuf,
    log: PathBuf,
    nbd: PathBuf,
    ctl: PathBuf,
}

fn paths(spec: &AgentSpec) -> Paths {
    Paths {
        pid: spec.state_dir.join(format!("{}.pid", spec.instance)),
        log: spec.state_dir.join(format!("{}.log", spec.instance)),
        nbd: nbd_socket(&spec.state_dir, &spec.instance),
        ctl: control_socket(&spec.state_dir, &spec.instance),
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Config {
    node: String,
    volume: String,
    /// (node, replication address), in the order given.
    replicas: Vec<(String, String)>,
    size: Option<u64>,
    region_size: u64,
    initial: String,
    dir: PathBuf,
    after_sb: Option<String>,
    peer_timeout: Option<String>,
    fence_peers: bool,
    freeze_timeout: Option<String>,
    window_timeout: Option<String>,
    resync_rate: Option<String>,
    /// (CA, certificate, key); `None` with `plaintext = true`.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
    allow_non_loopback: bool,
    haven: PathBuf,
}

impl Config {
    fn my_addr(&self) -> &str {
        self.replicas
            .iter()
            .find(|(n, _)| *n == self.node)
            .map_or("", |(_, a)| a.as_str())
    }

    fn peers(&self) -> impl Iterator<Item = &(String, String)> {
        self.replicas.iter().filter(|(n, _)| *n != self.node)
    }
}

fn not_configured(spec: &AgentSpec, why: String) -> OpResult {
    OpResult::new(OpCode::NotConfigured, Duration::ZERO)
        .note(format!("resource {}: {why}", spec.instance))
}

fn flag(spec: &AgentSpec, k: &str) -> Result<bool, OpResult> {
    match spec.params.get(k).map(|v| v.trim()) {
        None | Some("" | "false" | "no" | "0") => Ok(false),
        Some("true" | "yes" | "1") => Ok(true),
        Some(v) => Err(not_configured(
            spec,
            format!("parameter `{k}` = {v:?}: expected true or false"),
        )),
    }
}

fn config(spec: &AgentSpec) -> Result<Config, OpResult> {
    let p = |k: &str| {
        spec.params
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let Some(node) = spec.meta.get("on_node").filter(|n| !n.is_empty()).cloned() else {
        return Err(not_configured(
            spec,
            "the volume class needs the node's name (meta attribute `on_node`, set by the daemon)"
                .into(),
        ));
    };
    let Some(list) = p("replicas") else {
        return Err(not_configured(
            spec,
            "parameter `replicas` is required: NODE=HOST:PORT for every replica".into(),
        ));
    };
    let mut replicas: Vec<(String, String)> = Vec::new();
    for item in list.split([' ', ',', '\n', '\t']).filter(|s| !s.is_empty()) {
        let bad = |why: &str| {
            not_configured(
                spec,
                format!("parameter `replicas`: `{item}`: {why} (expected NODE=HOST:PORT)"),
            )
        };
        let Some((n, a)) = item.split_once('=') else {
            return Err(bad("no `=`"));
        };
        if n.is_empty() {
            return Err(bad("empty node name"));
        }
        if a.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad("not an IP address and port"));
        }
        if replicas.iter().any(|(m, _)| m == n) {
            return Err(bad("node listed twice"));
        }
        replicas.push((n.to_string(), a.to_string()));
    }
    if !replicas.iter().any(|(n, _)| *n == node) {
        let names: Vec<&str> = replicas.iter().map(|(n, _)| n.as_str()).collect();
        return Err(not_configured(
            spec,
            format!(
                "node {node} holds no replica of this volume (parameter `replicas` names {}); \
                 keep the clone off it with a location constraint",
                names.join(", ")
            ),
        ));
    }
    let size = match p("size") {
        None => None,
        Some(s) => Some(
            meta::parse_size(&s)
                .map_err(|e| not_configured(spec, format!("parameter `size`: {e}")))?,
        ),
    };
    let region_size = match p("region_size") {
        None => 64 << 10,
        Some(s) => meta::parse_size(&s)
            .map_err(|e| not_configured(spec, format!("parameter `region_size`: {e}")))?,
    };
    let initial = p("initial").unwrap_or_else(|| replicas[0].0.clone());
    if !replicas.iter().any(|(n, _)| *n == initial) {
        return Err(not_configured(
            spec,
            format!("parameter `initial` = {initial:?} is not one of `replicas`"),
        ));
    }
    let dir = match p("dir") {
        Some(d) => PathBuf::from(d.replace("{node}", &node)),
        None => spec.state_dir.join(format!("{}.volume", spec.instance)),
    };
    let tls = if flag(spec, "plaintext")? {
        None
    } else {
        let tls_dir = match p("tls_dir") {
            Some(d) => PathBuf::from(d),
            None => spec
                .state_dir
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        };
        let files = (
            tls_dir.join("ca.pem"),
            tls_dir.join("node.pem"),
            tls_dir.join("node-key.pem"),
        );
        for f in [&files.0, &files.1, &files.2] {
            if !f.is_file() {
                return Err(not_configured(
                    spec,
                    format!(
                        "replication TLS: {} does not exist (parameter `tls_dir`, or \
                         `plaintext = true`)",
                        f.display()
                    ),
                ));
            }
        }
        Some(files)
    };
    let fence_peers = match p("fencing").as_deref() {
        None | Some("resource-and-stonith") => true,
        Some("none") => false,
        Some(v) => {
            return Err(not_configured(
                spec,
                format!("parameter `fencing` = {v:?}: expected resource-and-stonith or none"),
            ));
        }
    };
    let haven = match p("haven") {
        Some(h) => PathBuf::from(h),
        None => std::env::current_exe().map_err(|e| {
            not_configured(
                spec,
                format!("cannot find this program to run `haven volume serve` ({e}); set parameter `haven`"),
            )
        })?,
    };
    Ok(Config {
        node,
        volume: p("volume").unwrap_or_else(|| spec.instance.clone()),
        replicas,
        size,
        region_size,
        initial,
        dir,
        after_sb: p("after_sb"),
        peer_timeout: p("peer_timeout"),
        fence_peers,
        freeze_timeout: p("freeze_timeout"),
        window_timeout: p("window_timeout"),
        resync_rate: p("resync_rate"),
        tls,
        allow_non_loopback: flag(spec, "allow_non_loopback")?,
        haven,
    })
}

fn serve_args(c: &Config, p: &Paths) -> Vec<String> {
    let s = |p: &Path| p.display().to_string();
    let mut a = vec![
        "volume".to_string(),
        "serve".into(),
        "--dir".into(),
        s(&c.dir),
        "--nbd".into(),
        s(&p.nbd),
        "--control".into(),
        s(&p.ctl),
        "--listen".into(),
        c.my_addr().to_string(),
    ];
    for (n, addr) in c.peers() {
        a.extend(["--peer".into(), format!("{n}={addr}")]);
    }
    if let Some(v) = &c.after_sb {
        a.extend(["--after-sb".into(), v.clone()]);
    }
    if let Some(v) = &c.peer_timeout {
        a.extend(["--peer-timeout".into(), v.clone()]);
    }
    if c.fence_peers {
        a.push("--fence-peers".into());
    }
    if let Some(v) = &c.freeze_timeout {
        a.extend(["--freeze-timeout".into(), v.clone()]);
    }
    if let Some(v) = &c.window_timeout {
        a.extend(["--window-timeout".into(), v.clone()]);
    }
    if let Some(v) = &c.resync_rate {
        a.extend(["--resync-rate".into(), v.clone()]);
    }
    match &c.tls {
        Some((ca, cert, key)) => a.extend([
            "--tls-ca".into(),
            s(ca),
            "--tls-cert".into(),
            s(cert),
            "--tls-key".into(),
            s(key),
        ]),
        None => a.push("--plaintext".into()),
    }
    if c.allow_non_loopback {
        a.push("--allow-non-loopback".into());
    }
    a
}

pub(crate) async fn run(spec: &AgentSpec, op: &Op, timeout: Duration) -> OpResult {
    let deadline = Instant::now() + timeout;
    let p = paths(spec);
    match op {
        Op::Monitor { .. } => monitor(&p, deadline).await,
        Op::Stop => stop(&p, timeout).await,
        Op::Start => match config(spec) {
            Ok(c) => start(spec, &c, &p, deadline).await,
            Err(r) => r,
        },
        Op::Promote {
            fenced,
            migration_source,
        } => match config(spec) {
            Ok(c) => promote(&c, &p, fenced, migration_source.as_deref(), deadline).await,
            Err(r) => r,
        },
        Op::Demote => demote(&p, deadline).await,
        Op::ValidateAll => match config(spec) {
            Ok(_) => OpResult::new(OpCode::Success, Duration::ZERO),
            Err(r) => r,
        },
        other => OpResult::new(OpCode::Unimplemented, Duration::ZERO)
            .note(format!("the volume class has no {} action", other.action())),
    }
}

fn running(p: &Paths) -> Result<Option<Tracked>, OpResult> {
    pidfile::read(&p.pid)
        .map(|t| t.filter(Tracked::alive))
        .map_err(|e| OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string()))
}

/// One control request, bounded by `deadline` and [`CONTROL_CALL`].
async fn ask(ctl: &Path, req: &ControlRequest, deadline: Instant) -> Result<Status, String> {
    let d = deadline.min(Instant::now() + CONTROL_CALL);
    match tokio::time::timeout_at(d, control::request(ctl, req)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(ControlError::Refused(why))) => Err(format!("the replica refused: {why}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "control socket {}: no answer in time",
            ctl.display()
        )),
    }
}

fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        format!("no output in {}", log.display())
    } else {
        tail
    }
}

async fn monitor(p: &Paths, deadline: Instant) -> OpResult {
    match running(p) {
        Ok(Some(_)) => {}
        Ok(None) => return OpResult::new(OpCode::NotRunning, Duration::ZERO),
        Err(r) => return r,
    }
    match ask(&p.ctl, &ControlRequest::Status, deadline).await {
        Ok(s) if s.role == Role::Primary => OpResult::new(OpCode::RunningPromoted, Duration::ZERO),
        Ok(_) => OpResult::new(OpCode::Success, Duration::ZERO),
        Err(e) => OpResult::new(OpCode::Error, Duration::ZERO)
            .note(format!("the replica runs but does not answer: {e}")),
    }
}

async fn start(spec: &AgentSpec, c: &Config, p: &Paths, deadline: Instant) -> OpResult {
    match running(p) {
        Ok(Some(_)) => return OpResult::new(OpCode::Success, Duration::ZERO),
        Ok(None) => {}
        Err(r) => return r,
    }
    if !meta::Meta::path(&c.dir).exists() {
        let Some(size) = c.size else {
            return not_configured(
                spec,
                format!(
                    "no replica in {} yet and no parameter `size` to create one",
                    c.dir.display()
                ),
            );
        };
        if let Err(e) = meta::create(
            &c.dir,
            &c.volume,
            &c.node,
            size,
            c.region_size,
            c.node == c.initial,
        ) {
            return OpResult::new(OpCode::Error, Duration::ZERO)
                .note(format!("creating the replica: {e}"));
        }
    }
    // Left by a replica that was killed; `serve` refuses to reuse a path.
    let _ = std::fs::remove_file(&p.nbd);
    let _ = std::fs::remove_file(&p.ctl);
    let mut cmd = tokio::process::Command::new(&c.haven);
    cmd.args(serve_args(c, p));
    let mut child = match spawn_detached(cmd, &spec.state_dir, &p.log) {
        Ok(ch) => ch,
        Err(why) => return OpResult::new(OpCode::SpawnFailed, Duration::ZERO).note(why),
    };
    let Some(t) = child.id().and_then(|pid| Tracked::of(pid as i32)) else {
        let _ = child.wait().await;
        return OpResult::new(OpCode::Error, Duration::ZERO)
            .note(format!("the replica exited at once: {}", log_tail(&p.log)));
    };
    if let Err(e) = pidfile::write(&p.pid, t) {
        signal_group(t.pid as u32, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait().await;
        return OpResult::new(OpCode::Error, Duration::ZERO).note(e.to_string());
    }
    reap_in_background(child);
    loop {
        if !t.alive() {
            pidfile::remove(&p.pid);
            return OpResult::new(OpCode::Error, Duration::ZERO)
                .note(format!("the replica exited: {}", log_tail(&p.log)));
        }
        if p.ctl.exists() && ask(&p.ctl, &ControlRequest::Status, deadline).await.is_ok() {
            return OpResult::new(OpCode::Success, Duration::ZERO);
        }
        if Instant::now() >= deadline {
            signal_group(t.pid as u32, nix::sys::signal::Signal::SIGKILL);
            pidfile::remove(&p.pid);
            return OpResult::new(OpCode::Timeout, Duration::ZERO)
                .note("the replica's control socket did not answer before the timeout");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn promote(
    c: &Config,
    p: &Paths,
    fenced: &[String],
    migration_source: Option<&str>,
    deadline: Instant,
) -> OpResult {
    match running(p) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return OpResult::new(OpCode::NotRunning, Duration::ZERO)
                .note("the replica is not running here");
        }
        Err(r) => return r,
    }
    let peer_fenced: Vec<String> = c
        .peers()
        .map(|(n, _)| n.clone())
        .filter(|n| fenced.contains(n))
        .collect();
    let req = match migration_source {
        Some(s) => ControlRequest::PromoteWindow {
            peer_fenced,
            migration_source: s.to_string(),
        },
        None => ControlRequest::Promote { peer_fenced },
    };
    // Leave room to report before the caller's deadline.
    let give_up = deadline - (deadline - Instant::now()) / 10;
    loop {
        let why = match ask(&p.ctl, &req, deadline).await {
            Ok(s) if s.role == Role::Primary => {
                return OpResult::new(OpCode::Success, Duration::ZERO);
            }
            Ok(s) => format!("the replica is still {:?}", s.role),
            Err(e) => e,
        };
        if Instant::now() + POLL >= give_up {
            return OpResult::new(OpCode::Error, Duration::ZERO)
                .note(format!("promotion of {} on {}: {why}", c.volume, c.node));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn demote(p: &Paths, deadline: Instant) -> OpResult {
    match running(p) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return OpResult::new(OpCode::NotRunning, Duration::ZERO)
                .note("the replica is not running here");
        }
        Err(r) => return r,
    }
    match ask(&p.ctl, &ControlRequest::Demote, deadline).await {
        Ok(_) => OpResult::new(OpCode::Success, Duration::ZERO),
        Err(e) => OpResult::new(OpCode::Error, Duration::ZERO).note(format!("demote: {e}")),
    }
}

async fn stop(p: &Paths, timeout: Duration) -> OpResult {
    let t = match running(p) {
        Ok(Some(t)) => t,
        Ok(None) => {
            pidfile::remove(&p.pid);
            return OpResult::new(OpCode::Success, Duration::ZERO);
        }
        Err(r) => return r,
    };
    let now = std::time::Instant::now();
    let r = match terminate(t, now + timeout.mul_f64(0.8), now + timeout).await {
        crate::process::Stopped::Terminated => OpResult::new(OpCode::Success, Duration::ZERO),
        crate::process::Stopped::Killed => OpResult::new(OpCode::Success, Duration::ZERO)
            .note("the replica ignored SIGTERM and was killed (it restarts as a crashed primary if it was one)"),
        crate::process::Stopped::Survived => {
            return OpResult::new(OpCode::Timeout, Duration::ZERO)
                .note(format!("the replica {} survived SIGKILL", t.pid));
        }
    };
    pidfile::remove(&p.pid);
    let _ = std::fs::remove_file(&p.nbd);
    let _ = std::fs::remove_file(&p.ctl);
    r
}

/// The status of volume resource `volume`'s replica on this node.
pub async fn replica_status(state_dir: &Path, volume: &str) -> Result<Status, String> {
    let ctl = control_socket(state_dir, volume);
    ask(&ctl, &ControlRequest::Status, Instant::now() + CONTROL_CALL).await
}

/// Tells this node's (primary) replica that the cluster has recorded `peer` outdated,
/// so I/O frozen for it resumes.
pub async fn peer_outdated(state_dir: &Path, volume: &str, peer: &str) -> Result<(), String> {
    let ctl = control_socket(state_dir, volume);
    let req = ControlRequest::PeerOutdated {
        peer: peer.to_string(),
    };
    ask(&ctl, &req, Instant::now() + CONTROL_CALL)
        .await
        .map(|_| ())
}

/// Tells this node's replica that the cluster holds it outdated: it refuses promotion
/// until a resync brings it up to date.
pub async fn outdate(state_dir: &Path, volume: &str) -> Result<(), String> {
    let ctl = control_socket(state_dir, volume);
    ask(
        &ctl,
        &ControlRequest::Outdate,
        Instant::now() + CONTROL_CALL,
    )
    .await
    .map(|_| ())
}

/// For the `qemu` class: the NBD socket of volume resource `volume` on this node, once
/// its replica here is primary (a secondary refuses I/O, and a guest booted on it would
/// only see errors).
pub(crate) async fn primary_socket(
    state_dir: &Path,
    volume: &str,
    deadline: Instant,
) -> Result<PathBuf, String> {
    let ctl = control_socket(state_dir, volume);
    match ask(&ctl, &ControlRequest::Status, deadline).await {
        Ok(s) if s.role == Role::Primary => Ok(nbd_socket(state_dir, volume)),
        Ok(s) => Err(format!(
            "volume {volume} is {:?} on this node, not primary; order the guest after the \
             volume's promote and colocate it with the Promoted role",
            s.role
        )),
        Err(e) => Err(format!("volume {volume} is not running on this node: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::AgentClass;

    fn spec() -> AgentSpec {
        let mut s = AgentSpec::new("vol1", AgentClass::Volume, "/srv/n2/resources")
            .param("replicas", "n1=127.0.0.11:7790, n2=127.0.0.12:7790")
            .param("size", "64M")
            .param("plaintext", "true")
            .param("haven", "/usr/bin/haven");
        s.meta.insert("on_node".into(), "n2".into());
        s
    }

    #[test]
    fn serve_arguments_come_from_the_parameters() {
        let c = config(&spec()).unwrap();
        assert_eq!(c.size, Some(64 << 20));
        assert_eq!(c.initial, "n1", "the first replica is the initial one");
        assert_eq!(c.dir, PathBuf::from("/srv/n2/resources/vol1.volume"));
        let a = serve_args(&c, &paths(&spec())).join(" ");
        assert!(
            a.starts_with(
                "volume serve --dir /srv/n2/resources/vol1.volume \
                 --nbd /srv/n2/resources/vol1.nbd --control /srv/n2/resources/vol1.ctl \
                 --listen 127.0.0.12:7790 --peer n1=127.0.0.11:7790"
            ),
            "{a}"
        );
        assert!(a.ends_with("--fence-peers --plaintext"), "{a}");
        let c = config(&spec().param("fencing", "none")).unwrap();
        assert!(!serve_args(&c, &paths(&spec())).contains(&"--fence-peers".to_string()));
        let r = config(&spec().param("fencing", "maybe")).unwrap_err();
        assert!(r.notes[0].contains("`fencing`"), "{:?}", r.notes);
        let c = config(
            &spec()
                .param("window_timeout", "90s")
                .param("resync_rate", "1M"),
        )
        .unwrap();
        let a = serve_args(&c, &paths(&spec())).join(" ");
        assert!(a.contains("--window-timeout 90s --resync-rate 1M"), "{a}");
        let c = config(&spec().param("dir", "/data/{node}/v")).unwrap();
        assert_eq!(c.dir, PathBuf::from("/data/n2/v"));
    }

    #[test]
    fn tls_files_default_to_the_daemon_directory_and_must_exist() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.params.remove("plaintext");
        s.state_dir = tmp.path().join("resources");
        let r = config(&s).unwrap_err();
        assert_eq!(r.code, OpCode::NotConfigured);
        assert!(
            r.notes[0].contains(&tmp.path().join("ca.pem").display().to_string()),
            "{:?}",
            r.notes
        );
        for f in ["ca.pem", "node.pem", "node-key.pem"] {
            std::fs::write(tmp.path().join(f), "x").unwrap();
        }
        let c = config(&s).unwrap();
        let a = serve_args(&c, &paths(&s)).join(" ");
        assert!(
            a.contains(&format!(
                "--tls-key {}",
                tmp.path().join("node-key.pem").display()
            )),
            "{a}"
        );
    }

    #[test]
    fn bad_parameters_name_the_field() {
        let r = config(&spec().param("replicas", "n1=127.0.0.11:7790")).unwrap_err();
        assert!(
            r.notes[0].contains("node n2 holds no replica") && r.notes[0].contains("n1"),
            "{:?}",
            r.notes
        );
        let r = config(&spec().param("replicas", "n1=localhost:1 n2=127.0.0.1:2")).unwrap_err();
        assert!(r.notes[0].contains("`n1=localhost:1`"), "{:?}", r.notes);
        let r = config(&spec().param("size", "lots")).unwrap_err();
        assert!(r.notes[0].contains("`size`"), "{:?}", r.notes);
        let r = config(&spec().param("initial", "n9")).unwrap_err();
        assert!(r.notes[0].contains("`initial`"), "{:?}", r.notes);
        let mut s = spec();
        s.meta.clear();
        assert!(config(&s).unwrap_err().notes[0].contains("on_node"));
    }

    #[tokio::test]
    async fn a_replica_that_is_not_running_is_reported_so() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.state_dir = tmp.path().to_path_buf();
        let t = Duration::from_secs(2);
        assert_eq!(
            crate::run_op(&s, Op::Monitor { interval: t }, t).await.code,
            OpCode::NotRunning
        );
        assert_eq!(crate::run_op(&s, Op::Stop, t).await.code, OpCode::Success);
        let r = crate::run_op(
            &s,
            Op::Promote {
                fenced: vec![],
                migration_source: None,
            },
            t,
        )
        .await;
        assert_eq!(r.code, OpCode::NotRunning);
        let e = primary_socket(tmp.path(), "vol1", Instant::now() + t)
            .await
            .unwrap_err();
        assert!(e.contains("not running on this node"), "{e}");
    }
}
