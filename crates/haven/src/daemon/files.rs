//! A node's directory and the CLI's client.toml.
//!
//! DIR/node.toml       name, id, cluster, link addresses, role, seeds, timers
//! DIR/ca.pem          the cluster CA certificate
//! DIR/ca-key.pem      the CA key (0600): lets this node admit joiners
//! DIR/node.pem        this node's certificate; DIR/node-key.pem its key (0600)
//! DIR/state.redb      the Raft log and state machine

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

fn default_heartbeat_ms() -> u64 {
    200
}
fn default_dead_after_ms() -> u64 {
    1000
}
fn default_snapshot_after_logs() -> u64 {
    5000
}
fn default_logs_kept_after_snapshot() -> u64 {
    1000
}

/// Failure-detection timers. The defaults detect a dead node in about a second.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timers {
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
    /// Raft takes a snapshot after this many log entries since the last one.
    #[serde(default = "default_snapshot_after_logs")]
    pub snapshot_after_logs: u64,
    /// Log entries kept after a snapshot (a peer further behind gets the snapshot).
    #[serde(default = "default_logs_kept_after_snapshot")]
    pub logs_kept_after_snapshot: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            heartbeat_ms: default_heartbeat_ms(),
            dead_after_ms: default_dead_after_ms(),
            snapshot_after_logs: default_snapshot_after_logs(),
            logs_kept_after_snapshot: default_logs_kept_after_snapshot(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeToml {
    pub name: String,
    pub id: u64,
    pub cluster: String,
    /// One address (IP:PORT) per link; Raft and clients use the first.
    pub addrs: Vec<String>,
    #[serde(default)]
    pub witness: bool,
    #[serde(default)]
    pub learner: bool,
    /// Set by `cluster init`: this node founds the Raft group on its first start.
    #[serde(default)]
    pub bootstrap: bool,
    /// Where to find the cluster before this node has replicated its membership.
    #[serde(default)]
    pub seeds: Vec<String>,
    #[serde(default)]
    pub timers: Timers,
}

pub struct NodeDir {
    pub dir: PathBuf,
}

impl NodeDir {
    pub fn new(dir: &Path) -> Self {
        NodeDir {
            dir: dir.to_path_buf(),
        }
    }
    pub fn node_toml(&self) -> PathBuf {
        self.dir.join("node.toml")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("node-key.pem")
    }
    pub fn db(&self) -> PathBuf {
        self.dir.join("state.redb")
    }

    pub fn load(&self) -> anyhow::Result<NodeToml> {
        let path = self.node_toml();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{}: cannot read (is {} a node directory made by `haven cluster init` or `join`?)",
                path.display(),
                self.dir.display()
            )
        })?;
        let node: NodeToml =
            toml::from_str(&text).with_context(|| format!("{}: invalid", path.display()))?;
        if node.addrs.is_empty() {
            anyhow::bail!(
                "{}: field addrs: at least one link address is required",
                path.display()
            );
        }
        for (i, a) in node.addrs.iter().enumerate() {
            a.parse::<std::net::SocketAddr>().map_err(|_| {
                anyhow::anyhow!("{}: field addrs[{i}]: {a:?} is not IP:PORT", path.display())
            })?;
        }
        if node.timers.snapshot_after_logs == 0 {
            anyhow::bail!(
                "{}: field timers.snapshot_after_logs must be positive",
                path.display()
            );
        }
        if node.timers.heartbeat_ms == 0 || node.timers.dead_after_ms <= node.timers.heartbeat_ms {
            anyhow::bail!(
                "{}: field timers: dead_after_ms must be greater than heartbeat_ms, which must be positive",
                path.display()
            );
        }
        Ok(node)
    }

    pub fn save(&self, node: &NodeToml) -> anyhow::Result<()> {
        let text = toml::to_string(node)?;
        write_file(&self.node_toml(), text.as_bytes(), false)
    }

    /// Refuses to overwrite an existing node.
    pub fn create(&self) -> anyhow::Result<()> {
        if self.node_toml().exists() {
            anyhow::bail!(
                "{} already holds a node ({} exists); use a fresh directory",
                self.dir.display(),
                self.node_toml().display()
            );
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }

    pub fn read_pem(&self, path: &Path) -> anyhow::Result<String> {
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))
    }
}

/// Writes a file; private ones (keys) are created 0600 so they are never readable by
/// others, not even briefly.
pub fn write_file(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The CLI's way into the cluster: server addresses and a client certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToml {
    pub cluster: String,
    pub servers: Vec<String>,
    /// Paths relative to the client.toml's directory.
    pub ca: String,
    pub cert: String,
    pub key: String,
}

/// The name in the client certificate `cluster init` and `lab up` write: the operator.
pub const OPERATOR: &str = "operator";

/// Writes client.toml and its client certificate into `dir`.
pub fn write_client(
    dir: &Path,
    ca: &haven_net::ClusterCa,
    servers: Vec<String>,
) -> anyhow::Result<PathBuf> {
    let issued = ca.issue(OPERATOR, haven_net::CertRole::Client)?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    write_file(&dir.join("client-ca.pem"), ca.cert_pem().as_bytes(), false)?;
    write_file(&dir.join("client.pem"), issued.cert_pem.as_bytes(), false)?;
    write_file(&dir.join("client-key.pem"), issued.key_pem.as_bytes(), true)?;
    let client = ClientToml {
        cluster: ca.cluster().to_string(),
        servers,
        ca: "client-ca.pem".into(),
        cert: "client.pem".into(),
        key: "client-key.pem".into(),
    };
    let path = dir.join("client.toml");
    write_file(&path, toml::to_string(&client)?.as_bytes(), false)?;
    Ok(path)
}
