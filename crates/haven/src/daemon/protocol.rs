//! The JSON messages of Haven's RPC, shared by the daemon and its clients.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A heartbeat sent over one link.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub from: String,
    pub link: String,
    /// The sender daemon's incarnation: random at each start, so a peer can tell that
    /// it restarted (and forgot its monitors) even when no heartbeat went missing.
    #[serde(default)]
    pub incarnation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatAck {
    pub name: String,
    /// The answering daemon's incarnation (see [`Heartbeat::incarnation`]).
    #[serde(default)]
    pub incarnation: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplyConfig {
    /// The version the new text was based on (compare-and-set).
    pub based_on: u64,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConfigReply {
    pub version: u64,
    pub text: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinTokenRequest {
    pub ttl_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinTokenReply {
    pub token: String,
    pub expires_at_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub token: String,
    pub name: String,
    pub addrs: Vec<String>,
    pub witness: bool,
    pub learner: bool,
}

/// What a joining host receives: its id, its certificate, and the cluster CA (with the
/// CA key, so that every member can admit later joiners even when the founder is gone).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinReply {
    pub id: u64,
    pub cluster: String,
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// Addresses of current members, to find the cluster again after a restart.
    pub seeds: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddLearner {
    pub id: u64,
    pub name: String,
    pub addrs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Promote {
    pub id: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cleanup {
    pub resource: String,
}

/// `haven status`: the cluster as the answering node sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    pub cluster: String,
    /// The node that answered; liveness and links are from its point of view.
    pub reported_by: String,
    pub quorate: bool,
    pub leader: Option<String>,
    pub term: u64,
    pub config_version: u64,
    pub nodes: Vec<NodeStatus>,
    pub resources: Vec<ResourceStatus>,
    pub failed_actions: Vec<FailedAction>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub id: u64,
    /// online, standby, maintenance, pending, unclean (in doubt: lost or being fenced,
    /// and not yet confirmed down), fenced (confirmed down; kept out until `haven node
    /// online`), or offline.
    pub state: String,
    /// voter, learner or witness.
    pub role: String,
    pub links: Vec<LinkStatus>,
    /// Why the node is in that state, for every state but a plain one (online,
    /// standby, maintenance, pending, offline): what it waits for, and who can end it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    pub name: String,
    pub addr: String,
    pub up: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub id: String,
    pub agent: String,
    /// Nodes where it is known to run (nodes in doubt are in `in_doubt_on` instead).
    pub running_on: Vec<String>,
    /// Nodes in doubt (lost or being fenced, not yet confirmed down) where it was
    /// running: it may run there still, so nothing recovers it until fencing confirms.
    #[serde(default)]
    pub in_doubt_on: Vec<String>,
    /// Why it is frozen (nothing is done for it) while `in_doubt_on` is not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<String>,
    pub failcounts: BTreeMap<String, u32>,
    /// Why the resource may not be promoted on some nodes (a volume replica recorded
    /// outdated): node → reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unpromotable: BTreeMap<String, String>,
    /// Of `running_on`, the nodes where it runs in the Promoted role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promoted_on: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FailedAction {
    pub resource: String,
    pub node: String,
    pub detail: String,
}
