//! The replicated cluster state and the commands that change it.
//!
//! Pure: `ClusterState::apply` is the whole state machine, a function of the state and one
//! committed command. Time enters only as a value inside a command (the proposer's
//! clock), so every replica computes the same result.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The cluster configuration (Haven's TOML text) and its version. Version 0 means none
/// yet; each accepted change increments it by one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub version: u64,
    pub text: String,
}

/// A member node, as registered at init or join.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: u64,
    /// One address per link, in link order; the first is used for Raft.
    pub addrs: Vec<String>,
    /// A voter that runs nothing.
    pub witness: bool,
    /// Joined as a non-voting member.
    pub learner: bool,
    /// The operator asked that nothing run here.
    pub standby: bool,
    /// The operator asked Haven to leave this node's resources alone.
    pub maintenance: bool,
}

/// A join token as the cluster keeps it: a hash of the secret, never the secret.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub secret_hash: String,
    pub expires_at_ms: u64,
    pub used: bool,
}

/// What is known of one resource on one node: the last operation and the failures.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceRecord {
    pub last_op: String,
    pub rc: i32,
    pub at_ms: u64,
    /// Whether the resource is active here after that operation.
    pub running: bool,
    pub failcount: u32,
    /// The last failed operation, for `haven status`'s failed actions.
    pub last_failure: Option<String>,
}

/// One fencing attempt or confirmation, for `haven fence history`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub victim: String,
    /// The device id, or `manual` for an operator's acknowledgement.
    pub device: String,
    /// The node that ran the device (the operator's node for an acknowledgement).
    pub executor: String,
    pub ok: bool,
    pub at_ms: u64,
    /// When the device started running (0 for confirmations without a device run).
    #[serde(default)]
    pub started_ms: u64,
    /// Why: the device's outcome or the confirmation.
    pub detail: String,
}

/// A node the coordinator has begun to fence, or has fenced and keeps out until an
/// operator allows it back. Replicated so that a new leader resumes what the old one
/// began instead of trusting the node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceMark {
    /// False: fencing was requested and is not confirmed (the node is in doubt).
    /// True: confirmed; the node stays out until allowed back.
    pub confirmed: bool,
    pub reason: String,
}

/// A volume replica the cluster holds outdated: its primary lost it and wrote on, so it
/// lacks everything from `generation` on and must not be promoted until resynced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeOutdated {
    /// The generation (hex) the primary started when it lost this replica.
    pub generation: String,
    /// The node whose primary replica asked for the record.
    pub by: String,
    pub at_ms: u64,
}

/// How many fence records are kept; older ones are dropped first.
pub const FENCE_HISTORY_LIMIT: usize = 200;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub config: ConfigRecord,
    pub nodes: BTreeMap<String, NodeRecord>,
    pub next_node_id: u64,
    pub tokens: BTreeMap<String, TokenRecord>,
    /// resource id → node name → record.
    pub resources: BTreeMap<String, BTreeMap<String, ResourceRecord>>,
    /// Fencing attempts and confirmations, oldest first.
    #[serde(default)]
    pub fence_history: Vec<FenceRecord>,
    /// Where the coordinator last saw each resource active: resource id → nodes.
    #[serde(default)]
    pub placement: BTreeMap<String, Vec<String>>,
    /// The coordinator's judgement of each node (online, pending, unclean, offline).
    #[serde(default)]
    pub node_states: BTreeMap<String, String>,
    /// Nodes being fenced or fenced and kept out: node name → mark.
    #[serde(default)]
    pub fencing: BTreeMap<String, FenceMark>,
    /// Volume resource id → node → why that node's replica is outdated.
    #[serde(default)]
    pub volumes_outdated: BTreeMap<String, BTreeMap<String, VolumeOutdated>>,
    /// Volume resource id → node → the promotion score its replica last published
    /// (`promotion-RSC`, as DRBD's agent sets `master-RSC` from its disk state).
    #[serde(default)]
    pub volume_scores: BTreeMap<String, BTreeMap<String, String>>,
}

/// A command proposed to Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Replace the configuration if it is still at `based_on` (compare-and-set).
    ApplyConfig { based_on: u64, text: String },
    /// Register a node with a fixed id (the founding node at `cluster init`).
    RegisterNode {
        name: String,
        id: u64,
        addrs: Vec<String>,
        witness: bool,
    },
    AddToken {
        id: String,
        secret_hash: String,
        expires_at_ms: u64,
    },
    /// Consume a join token and register the new node under a fresh id, in one commit,
    /// so a token can never admit two nodes.
    Join {
        token_id: String,
        secret_hash: String,
        now_ms: u64,
        name: String,
        addrs: Vec<String>,
        witness: bool,
        learner: bool,
    },
    SetNodeAttrs {
        name: String,
        standby: Option<bool>,
        maintenance: Option<bool>,
    },
    RecordOp {
        resource: String,
        node: String,
        op: String,
        rc: i32,
        at_ms: u64,
        ok: bool,
        running: bool,
    },
    ClearFailures {
        resource: String,
        node: Option<String>,
    },
    /// A fence attempt's result. `confirmed`: the victim is now known down, so nothing
    /// it ran runs any more.
    RecordFence {
        record: FenceRecord,
        confirmed: bool,
    },
    /// The coordinator's picture of where resources are active, replacing the last one.
    SetPlacement {
        placement: BTreeMap<String, Vec<String>>,
        #[serde(default)]
        node_states: BTreeMap<String, String>,
    },
    /// Sets (or, with `None`, clears) the fence mark of `node`.
    SetFenceMark {
        node: String,
        mark: Option<FenceMark>,
    },
    /// Records `node`'s replica of volume `volume` as outdated (DRBD's fence-peer).
    OutdateVolumeReplica {
        volume: String,
        node: String,
        record: VolumeOutdated,
    },
    /// Sets (or, with `None`, clears) the promotion score `node`'s replica of `volume`
    /// publishes.
    SetVolumeScore {
        volume: String,
        node: String,
        score: Option<String>,
    },
    /// Clears that record, but only if it is about one of `generations` (the replica's
    /// current one and its history): a replica that has the data written since the
    /// record's generation is no longer outdated; a newer record stays.
    ClearVolumeOutdated {
        volume: String,
        node: String,
        generations: Vec<String>,
    },
}

/// The result of applying a command. A refusal is a normal, committed outcome (every
/// replica refuses the same way), not a storage error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    #[default]
    Done,
    ConfigVersion(u64),
    NodeId(u64),
    Refused(String),
}

fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ClusterState {
    /// Applies one committed command.
    pub fn apply(&mut self, req: &Request) -> Response {
        match req {
            Request::ApplyConfig { based_on, text } => {
                let current = self.config.version;
                if *based_on != current {
                    return Response::Refused(format!(
                        "configuration change refused: it was based on version {based_on}, but the cluster is at version {current}; \
                         fetch version {current} (`haven config show`), redo the change on it and apply again"
                    ));
                }
                self.config = ConfigRecord {
                    version: current + 1,
                    text: text.clone(),
                };
                Response::ConfigVersion(current + 1)
            }
            Request::RegisterNode {
                name,
                id,
                addrs,
                witness,
            } => {
                if let Some(r) = self.refuse_new_node(name, addrs) {
                    return r;
                }
                if self.nodes.values().any(|n| n.id == *id) {
                    return Response::Refused(format!("node id {id} is already taken"));
                }
                self.nodes.insert(
                    name.clone(),
                    NodeRecord {
                        id: *id,
                        addrs: addrs.clone(),
                        witness: *witness,
                        ..NodeRecord::default()
                    },
                );
                self.next_node_id = self.next_node_id.max(id + 1);
                Response::NodeId(*id)
            }
            Request::AddToken {
                id,
                secret_hash,
                expires_at_ms,
            } => {
                self.tokens.insert(
                    id.clone(),
                    TokenRecord {
                        secret_hash: secret_hash.clone(),
                        expires_at_ms: *expires_at_ms,
                        used: false,
                    },
                );
                Response::Done
            }
            Request::Join {
                token_id,
                secret_hash,
                now_ms,
                name,
                addrs,
                witness,
                learner,
            } => {
                match self.tokens.get(token_id) {
                    None => {
                        return Response::Refused(format!(
                            "join refused: token {token_id} was never issued by this cluster"
                        ));
                    }
                    Some(t) if t.secret_hash != *secret_hash => {
                        return Response::Refused(format!(
                            "join refused: the secret of token {token_id} does not match"
                        ));
                    }
                    Some(t) if t.used => {
                        return Response::Refused(format!(
                            "join refused: token {token_id} has already been used (tokens are single-use; issue a new one with `haven cluster join-token`)"
                        ));
                    }
                    Some(t) if t.expires_at_ms <= *now_ms => {
                        return Response::Refused(format!(
                            "join refused: token {token_id} expired (issue a new one with `haven cluster join-token`)"
                        ));
                    }
                    Some(_) => {}
                }
                if let Some(r) = self.refuse_new_node(name, addrs) {
                    return r;
                }
                if let Some(t) = self.tokens.get_mut(token_id) {
                    t.used = true;
                }
                let id = self.next_node_id.max(1);
                self.next_node_id = id + 1;
                self.nodes.insert(
                    name.clone(),
                    NodeRecord {
                        id,
                        addrs: addrs.clone(),
                        witness: *witness,
                        learner: *learner,
                        ..NodeRecord::default()
                    },
                );
                Response::NodeId(id)
            }
            Request::SetNodeAttrs {
                name,
                standby,
                maintenance,
            } => {
                let Some(node) = self.nodes.get_mut(name) else {
                    return Response::Refused(format!(
                        "no node named {name:?} is a member of this cluster"
                    ));
                };
                if let Some(s) = standby {
                    node.standby = *s;
                }
                if let Some(m) = maintenance {
                    node.maintenance = *m;
                }
                Response::Done
            }
            Request::RecordOp {
                resource,
                node,
                op,
                rc,
                at_ms,
                ok,
                running,
            } => {
                let rec = self
                    .resources
                    .entry(resource.clone())
                    .or_default()
                    .entry(node.clone())
                    .or_default();
                rec.last_op = op.clone();
                rec.rc = *rc;
                rec.at_ms = *at_ms;
                rec.running = *running;
                if !ok {
                    rec.failcount = rec.failcount.saturating_add(1);
                    rec.last_failure = Some(format!("{op} returned {rc}"));
                }
                Response::Done
            }
            Request::SetPlacement {
                placement,
                node_states,
            } => {
                self.placement = placement.clone();
                self.node_states = node_states.clone();
                Response::Done
            }
            Request::SetFenceMark { node, mark } => {
                match mark {
                    Some(m) => {
                        self.fencing.insert(node.clone(), m.clone());
                    }
                    None => {
                        self.fencing.remove(node);
                    }
                }
                Response::Done
            }
            Request::OutdateVolumeReplica {
                volume,
                node,
                record,
            } => {
                self.volumes_outdated
                    .entry(volume.clone())
                    .or_default()
                    .insert(node.clone(), record.clone());
                Response::Done
            }
            Request::SetVolumeScore {
                volume,
                node,
                score,
            } => {
                if !self.nodes.contains_key(node) {
                    return Response::Refused(format!(
                        "no node named {node:?} is a member of this cluster"
                    ));
                }
                match score {
                    Some(v) => {
                        self.volume_scores
                            .entry(volume.clone())
                            .or_default()
                            .insert(node.clone(), v.clone());
                    }
                    None => {
                        if let Some(per_node) = self.volume_scores.get_mut(volume) {
                            per_node.remove(node);
                            if per_node.is_empty() {
                                self.volume_scores.remove(volume);
                            }
                        }
                    }
                }
                Response::Done
            }
            Request::ClearVolumeOutdated {
                volume,
                node,
                generations,
            } => {
                let Some(per_node) = self.volumes_outdated.get_mut(volume) else {
                    return Response::Done;
                };
                match per_node.get(node) {
                    Some(r) if generations.contains(&r.generation) => {
                        per_node.remove(node);
                        if per_node.is_empty() {
                            self.volumes_outdated.remove(volume);
                        }
                        Response::Done
                    }
                    Some(r) => Response::Refused(format!(
                        "volume {volume}: the replica on {node} does not have generation {} yet",
                        r.generation
                    )),
                    None => Response::Done,
                }
            }
            Request::ClearFailures { resource, node } => {
                if let Some(per_node) = self.resources.get_mut(resource) {
                    for (n, rec) in per_node.iter_mut() {
                        if node.as_ref().is_none_or(|want| want == n) {
                            rec.failcount = 0;
                            rec.last_failure = None;
                        }
                    }
                }
                Response::Done
            }
            Request::RecordFence { record, confirmed } => {
                if *confirmed {
                    for per_node in self.resources.values_mut() {
                        if let Some(rec) = per_node.get_mut(&record.victim) {
                            rec.running = false;
                        }
                    }
                }
                if self.fence_history.len() >= FENCE_HISTORY_LIMIT {
                    self.fence_history.remove(0);
                }
                self.fence_history.push(record.clone());
                Response::Done
            }
        }
    }

    fn refuse_new_node(&self, name: &str, addrs: &[String]) -> Option<Response> {
        if !valid_node_name(name) {
            return Some(Response::Refused(format!(
                "node name {name:?} is not valid: use 1–63 characters of [A-Za-z0-9._-]"
            )));
        }
        if self.nodes.contains_key(name) {
            return Some(Response::Refused(format!(
                "a node named {name:?} is already a member of this cluster"
            )));
        }
        if addrs.is_empty() {
            return Some(Response::Refused(format!(
                "node {name:?} has no address; give at least one --addr"
            )));
        }
        for (other, rec) in &self.nodes {
            if let Some(a) = addrs.iter().find(|a| rec.addrs.contains(a)) {
                return Some(Response::Refused(format!(
                    "address {a} is already used by node {other:?}"
                )));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(state: &mut ClusterState, id: &str, expires_at_ms: u64) {
        state.apply(&Request::AddToken {
            id: id.into(),
            secret_hash: "h".into(),
            expires_at_ms,
        });
    }

    fn join(state: &mut ClusterState, id: &str, hash: &str, now_ms: u64, name: &str) -> Response {
        state.apply(&Request::Join {
            token_id: id.into(),
            secret_hash: hash.into(),
            now_ms,
            name: name.into(),
            addrs: vec![format!("127.0.0.1:{}", name.len() + 7000 + now_ms as usize)],
            witness: false,
            learner: false,
        })
    }

    #[test]
    fn config_apply_is_compare_and_set_on_the_version() {
        let mut s = ClusterState::default();
        let first = Request::ApplyConfig {
            based_on: 0,
            text: "a".into(),
        };
        assert_eq!(s.apply(&first), Response::ConfigVersion(1));
        assert_eq!(
            s.apply(&Request::ApplyConfig {
                based_on: 1,
                text: "b".into()
            }),
            Response::ConfigVersion(2)
        );
        let Response::Refused(why) = s.apply(&Request::ApplyConfig {
            based_on: 1,
            text: "c".into(),
        }) else {
            panic!("a stale apply was accepted");
        };
        assert!(
            why.contains("version 1") && why.contains("version 2"),
            "{why}"
        );
        assert_eq!(s.config.text, "b");
        assert_eq!(s.config.version, 2);
    }

    #[test]
    fn a_join_token_admits_exactly_one_node_before_it_expires() {
        let mut s = ClusterState::default();
        s.apply(&Request::RegisterNode {
            name: "n1".into(),
            id: 1,
            addrs: vec!["127.0.0.1:1".into()],
            witness: false,
        });
        token(&mut s, "t1", 1000);
        assert!(matches!(
            join(&mut s, "t1", "wrong", 1, "n2"),
            Response::Refused(_)
        ));
        assert_eq!(join(&mut s, "t1", "h", 1, "n2"), Response::NodeId(2));
        let Response::Refused(why) = join(&mut s, "t1", "h", 2, "n3") else {
            panic!("a used token admitted a second node");
        };
        assert!(why.contains("already been used"), "{why}");
        token(&mut s, "t2", 1000);
        let Response::Refused(why) = join(&mut s, "t2", "h", 1000, "n3") else {
            panic!("an expired token admitted a node");
        };
        assert!(why.contains("expired"), "{why}");
        assert!(matches!(
            join(&mut s, "nope", "h", 1, "n4"),
            Response::Refused(_)
        ));
        assert_eq!(s.nodes.len(), 2);
    }

    #[test]
    fn a_refused_join_does_not_burn_the_token() {
        let mut s = ClusterState::default();
        s.apply(&Request::RegisterNode {
            name: "n1".into(),
            id: 1,
            addrs: vec!["127.0.0.1:1".into()],
            witness: false,
        });
        token(&mut s, "t", 1000);
        assert!(matches!(
            join(&mut s, "t", "h", 1, "n1"),
            Response::Refused(_)
        ));
        assert_eq!(join(&mut s, "t", "h", 1, "n2"), Response::NodeId(2));
    }

    #[test]
    fn failures_count_and_clear() {
        let mut s = ClusterState::default();
        let op = |ok| Request::RecordOp {
            resource: "web".into(),
            node: "n1".into(),
            op: "monitor".into(),
            rc: if ok { 0 } else { 7 },
            at_ms: 5,
            ok,
            running: ok,
        };
        s.apply(&op(false));
        s.apply(&op(false));
        assert_eq!(s.resources["web"]["n1"].failcount, 2);
        s.apply(&Request::ClearFailures {
            resource: "web".into(),
            node: None,
        });
        assert_eq!(s.resources["web"]["n1"].failcount, 0);
        assert!(s.resources["web"]["n1"].last_failure.is_none());
    }

    #[test]
    fn attributes_of_an_unknown_node_are_refused() {
        let mut s = ClusterState::default();
        assert!(matches!(
            s.apply(&Request::SetNodeAttrs {
                name: "ghost".into(),
                standby: Some(true),
                maintenance: None
            }),
            Response::Refused(_)
        ));
    }

    #[test]
    fn a_confirmed_fence_clears_what_the_victim_ran_and_history_is_bounded() {
        let mut s = ClusterState::default();
        s.apply(&Request::RecordOp {
            resource: "web".into(),
            node: "n1".into(),
            op: "start".into(),
            rc: 0,
            at_ms: 1,
            ok: true,
            running: true,
        });
        let rec = |ok| FenceRecord {
            victim: "n1".into(),
            device: "pdu".into(),
            executor: "n2".into(),
            ok,
            at_ms: 2,
            started_ms: 1,
            detail: String::new(),
        };
        s.apply(&Request::RecordFence {
            record: rec(false),
            confirmed: false,
        });
        assert!(
            s.resources["web"]["n1"].running,
            "a failed attempt proves nothing"
        );
        s.apply(&Request::RecordFence {
            record: rec(true),
            confirmed: true,
        });
        assert!(!s.resources["web"]["n1"].running);
        assert_eq!(s.fence_history.len(), 2);
        for _ in 0..FENCE_HISTORY_LIMIT {
            s.apply(&Request::RecordFence {
                record: rec(true),
                confirmed: false,
            });
        }
        assert_eq!(s.fence_history.len(), FENCE_HISTORY_LIMIT);
        assert!(
            s.fence_history.iter().all(|r| r.ok),
            "the oldest went first"
        );
    }

    #[test]
    fn fence_marks_are_set_upgraded_and_cleared() {
        let mut s = ClusterState::default();
        let mark = |confirmed| FenceMark {
            confirmed,
            reason: "it stopped heartbeating".into(),
        };
        s.apply(&Request::SetFenceMark {
            node: "n1".into(),
            mark: Some(mark(false)),
        });
        assert_eq!(s.fencing["n1"], mark(false));
        s.apply(&Request::SetFenceMark {
            node: "n1".into(),
            mark: Some(mark(true)),
        });
        assert!(s.fencing["n1"].confirmed);
        s.apply(&Request::SetFenceMark {
            node: "n1".into(),
            mark: None,
        });
        assert!(s.fencing.is_empty());
    }

    #[test]
    fn an_outdated_replica_is_cleared_only_once_it_has_the_generation() {
        let mut s = ClusterState::default();
        let rec = |g: &str| VolumeOutdated {
            generation: g.into(),
            by: "n1".into(),
            at_ms: 1,
        };
        s.apply(&Request::OutdateVolumeReplica {
            volume: "vol1".into(),
            node: "n2".into(),
            record: rec("00B"),
        });
        assert_eq!(s.volumes_outdated["vol1"]["n2"], rec("00B"));
        // Its data is from before the record: it stays outdated.
        let r = s.apply(&Request::ClearVolumeOutdated {
            volume: "vol1".into(),
            node: "n2".into(),
            generations: vec!["00A".into()],
        });
        assert!(matches!(r, Response::Refused(_)), "{r:?}");
        assert!(s.volumes_outdated["vol1"].contains_key("n2"));
        s.apply(&Request::ClearVolumeOutdated {
            volume: "vol1".into(),
            node: "n2".into(),
            generations: vec!["00C".into(), "00B".into()],
        });
        assert!(s.volumes_outdated.is_empty());
    }

    #[test]
    fn a_replicas_promotion_score_is_set_replaced_and_cleared_for_members_only() {
        let mut s = ClusterState::default();
        s.apply(&Request::RegisterNode {
            name: "n2".into(),
            id: 2,
            addrs: vec!["127.0.0.12:7000".into()],
            witness: false,
        });
        let set = |s: &mut ClusterState, node: &str, score: Option<&str>| {
            s.apply(&Request::SetVolumeScore {
                volume: "vol1".into(),
                node: node.into(),
                score: score.map(String::from),
            })
        };
        assert!(matches!(
            set(&mut s, "ghost", Some("10000")),
            Response::Refused(_)
        ));
        assert!(s.volume_scores.is_empty());
        set(&mut s, "n2", Some("-INFINITY"));
        assert_eq!(s.volume_scores["vol1"]["n2"], "-INFINITY");
        set(&mut s, "n2", Some("10000"));
        assert_eq!(s.volume_scores["vol1"]["n2"], "10000");
        set(&mut s, "n2", None);
        assert!(s.volume_scores.is_empty());
    }
}
