//! The observed state of the cluster: which nodes are up, and what each resource is doing
//! on each node. It is JSON (`State::from_json`) because it is produced by programs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::Role;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{source_name}: not a valid Haven state: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    #[error("{source_name}: {field}: {reason}")]
    Invalid {
        source_name: String,
        field: String,
        reason: String,
    },
}

/// How a node is seen by the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// A member that may run resources.
    Online,
    /// Known down: left cleanly, was fenced, or never joined.
    #[default]
    Offline,
    /// Lost without a clean exit: whatever it ran may still run until it is fenced.
    Unclean,
    /// Seen but not yet a full member.
    Pending,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

/// One node's observed state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    pub state: NodeState,
    /// Why it is unclean, as the fence reason shown to operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclean_reason: Option<String>,
    /// The node is shutting down cleanly: move its resources away.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shutdown: bool,
    /// Overrides the configured standby flag when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<bool>,
    /// Overrides the configured maintenance flag when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<bool>,
    /// Capacity reported at run time; overrides the configured utilization per key.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub utilization: BTreeMap<String, i64>,
    /// Transient attributes (e.g. promotion scores `master-RSC`, `pingd`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// A live migration that was begun but not finished.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    pub source: String,
    pub target: String,
    /// True once `migrate_from` succeeded on the target (only the source's stop remains).
    #[serde(default)]
    pub completed: bool,
}

/// The resource's definition changed since it was started on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DefinitionChange {
    /// Only parameters the agent can apply in place changed.
    Reload,
    /// The running instance must be stopped and started again to pick the change up.
    Restart,
}

/// One resource (or clone instance) on one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceStatus {
    pub role: Role,
    /// The last operation failed: the resource needs recovery here.
    #[serde(default, skip_serializing_if = "is_false")]
    pub failed: bool,
    /// A stop failed: only fencing the node makes it safe.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop_failed: bool,
    /// The operation that failed last, as `name:interval-seconds` (e.g. `monitor:10`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_op: Option<String>,
    /// A start failed: with `start-failure-is-fatal` the node is out for this resource.
    #[serde(default, skip_serializing_if = "is_false")]
    pub start_failed: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failcount: u32,
    /// Seconds since the epoch of the last failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// The agent's operations here are known (a probe ran). False: it may be running.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub probed: bool,
    /// The agent reported a hard error here (not installed, insufficient privileges,
    /// invalid parameters): the resource is banned from this node.
    #[serde(default, skip_serializing_if = "is_false")]
    pub hard_error: bool,
    /// Held for this node, which is shutting down or shut down cleanly (Pacemaker's
    /// `shutdown-lock`): it may run nowhere else until the node is back.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shutdown_locked: bool,
    /// Its parameters changed since it started here (it stays where it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub definition_changed: Option<DefinitionChange>,
    /// The order in which the nodes reported it: of several copies where one is
    /// expected, the first reported is the one taken as current.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seen: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Default for ResourceStatus {
    fn default() -> ResourceStatus {
        ResourceStatus {
            role: Role::Stopped,
            failed: false,
            stop_failed: false,
            start_failed: false,
            failed_op: None,
            failcount: 0,
            last_failure: None,
            migration: None,
            probed: true,
            hard_error: false,
            shutdown_locked: false,
            definition_changed: None,
            seen: 0,
        }
    }
}

impl ResourceStatus {
    /// Active (or possibly active) here.
    pub fn is_active(&self) -> bool {
        self.role != Role::Stopped || self.failed && self.stop_failed
    }
}

/// What the cluster observes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    #[serde(default = "yes")]
    pub have_quorum: bool,
    /// Quorum was held and has been lost (rather than never reached): what
    /// `no-quorum-policy = suicide` reacts to.
    #[serde(default, skip_serializing_if = "is_false")]
    pub quorum_lost: bool,
    /// "Now" in seconds since the epoch, for failure-timeout; time is an input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub now: Option<i64>,
    #[serde(default)]
    pub nodes: BTreeMap<String, NodeStatus>,
    /// Resource (or clone instance `id:N`) → node → status there. Absent = stopped.
    #[serde(default)]
    pub resources: BTreeMap<String, BTreeMap<String, ResourceStatus>>,
}

impl Default for State {
    fn default() -> State {
        State {
            have_quorum: true,
            quorum_lost: false,
            now: None,
            nodes: BTreeMap::new(),
            resources: BTreeMap::new(),
        }
    }
}

impl State {
    /// Parse observed state from JSON; `source` names the file in errors.
    pub fn from_json(source: &str, text: &str) -> Result<State, StateError> {
        let s: State = serde_json::from_str(text).map_err(|e| StateError::Syntax {
            source_name: source.to_string(),
            message: e.to_string(),
        })?;
        for (r, per_node) in &s.resources {
            for (n, st) in per_node {
                if let Some(m) = &st.migration
                    && m.source == m.target
                {
                    return Err(StateError::Invalid {
                        source_name: source.to_string(),
                        field: format!("resources.{r}.{n}.migration"),
                        reason: "a migration needs different source and target nodes".into(),
                    });
                }
            }
        }
        Ok(s)
    }

    pub fn to_json(&self) -> String {
        // Plain maps and strings always serialise.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
