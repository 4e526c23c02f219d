//! Haven's cluster configuration: what should run where, and under which rules.
//!
//! The TOML file has these top-level tables (keys are kebab-case, as in Pacemaker):
//! `[options]`, `[[nodes]]`, `[[resources]]` (primitives), `[[groups]]`, `[[clones]]`,
//! `[[constraints.location]]`, `[[constraints.colocation]]`, `[[constraints.order]]`,
//! `[[fencing.devices]]` and `[[fencing.levels]]`. Parse with [`Config::from_toml`], which
//! also validates; [`Config::validate`] checks a configuration built in code.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::score::Score;

/// Why a configuration was refused. Every variant names the source (file) and, for
/// semantic problems, the field path (e.g. `constraints.order[3].first`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{source_name}: not a valid Haven configuration: {message}")]
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
    #[error("cannot render the configuration as TOML: {0}")]
    Render(String),
}

/// A resource's role, as Pacemaker names them (Stopped < Started < Unpromoted < Promoted
/// by how "far up" a resource is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    Stopped,
    Started,
    Unpromoted,
    Promoted,
}

impl Role {
    /// Parse a role, accepting Pacemaker's legacy names Slave and Master.
    pub fn parse(s: &str) -> Option<Role> {
        match s.to_ascii_lowercase().as_str() {
            "stopped" => Some(Role::Stopped),
            "started" => Some(Role::Started),
            "unpromoted" | "slave" => Some(Role::Unpromoted),
            "promoted" | "master" => Some(Role::Promoted),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Stopped => "Stopped",
            Role::Started => "Started",
            Role::Unpromoted => "Unpromoted",
            Role::Promoted => "Promoted",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoQuorumPolicy {
    #[default]
    Stop,
    Freeze,
    Ignore,
    Suicide,
    Demote,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlacementStrategy {
    #[default]
    Default,
    Utilization,
    Minimal,
    Balanced,
}

fn yes() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_default_health(h: &HealthStrategy) -> bool {
    *h == HealthStrategy::None
}

/// Cluster-wide options (`[options]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Options {
    /// Bumped on every accepted change; a change based on an older version is refused.
    #[serde(default)]
    pub version: u64,
    #[serde(default = "yes")]
    pub stonith_enabled: bool,
    #[serde(default = "yes")]
    pub symmetric_cluster: bool,
    #[serde(default)]
    pub no_quorum_policy: NoQuorumPolicy,
    /// Two nodes and no witness (corosync's two_node with wait_for_all): a node that
    /// loses its peer keeps quorum, fences the peer (the fence delay decides who
    /// shoots first) and, once that is confirmed, runs everything alone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub two_node: bool,
    /// Pacemaker's `startup-fencing`. True (the default): a configured node whose
    /// daemon has not been heard within the detection time is in doubt and fenced
    /// before anything is planned, since it may be running anything. False: a node
    /// that has never joined the cluster, and is not heard, counts as down and clean
    /// (nothing could run there). Unsafe, as Pacemaker warns: a machine listed here
    /// that runs the resources outside the cluster's knowledge would run them twice.
    /// A node that was ever a member is fenced as before.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub startup_fencing: bool,
    #[serde(default)]
    pub resource_stickiness: Score,
    #[serde(default)]
    pub placement_strategy: PlacementStrategy,
    #[serde(default, skip_serializing_if = "is_false")]
    pub maintenance_mode: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stop_all_resources: bool,
    /// Resources found running but no longer configured are stopped.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub stop_orphan_resources: bool,
    /// A failed start bans the resource from that node (Pacemaker's default).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub start_failure_is_fatal: bool,
    #[serde(default, skip_serializing_if = "is_default_health")]
    pub node_health_strategy: HealthStrategy,
    /// Scores of the health colours (progressive and custom strategies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_health_red: Option<Score>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_health_yellow: Option<Score>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_health_green: Option<Score>,
    /// Defaults for every resource's meta attributes (`rsc_defaults`).
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub resource_defaults: Meta,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            version: 0,
            stonith_enabled: true,
            symmetric_cluster: true,
            no_quorum_policy: NoQuorumPolicy::Stop,
            two_node: false,
            startup_fencing: true,
            resource_stickiness: Score::ZERO,
            placement_strategy: PlacementStrategy::Default,
            maintenance_mode: false,
            stop_all_resources: false,
            stop_orphan_resources: true,
            start_failure_is_fatal: true,
            node_health_strategy: HealthStrategy::None,
            node_health_red: None,
            node_health_yellow: None,
            node_health_green: None,
            resource_defaults: Meta::default(),
        }
    }
}

/// A cluster node (`[[nodes]]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Node {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub utilization: BTreeMap<String, i64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub standby: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub maintenance: bool,
    /// Addresses of this node's cluster links, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<String>,
}

/// Meta attributes of a resource, group or clone. Unset fields inherit from the
/// enclosing group or clone, then from `options.resource-defaults`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Meta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_managed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_stickiness: Option<Score>,
    /// Failures on a node before the resource is banned from it (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_threshold: Option<u32>,
    /// Seconds after which a failure is forgotten (0 = never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_migrate: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<bool>,
    /// What to do when found active on several nodes (default: stop all, start one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiple_active: Option<MultipleActive>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MultipleActive {
    StopStart,
    StopOnly,
    Block,
    StopUnexpected,
}

/// How node health attributes (`#health-*`: red, yellow, green or a number) count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthStrategy {
    #[default]
    None,
    MigrateOnRed,
    OnlyGreen,
    Progressive,
    Custom,
}

impl Meta {
    pub fn is_empty(&self) -> bool {
        *self == Meta::default()
    }

    /// `self` with unset fields taken from `parent`.
    pub fn inherit(&self, parent: &Meta) -> Meta {
        Meta {
            target_role: self.target_role.or(parent.target_role),
            is_managed: self.is_managed.or(parent.is_managed),
            resource_stickiness: self.resource_stickiness.or(parent.resource_stickiness),
            migration_threshold: self.migration_threshold.or(parent.migration_threshold),
            failure_timeout: self.failure_timeout.or(parent.failure_timeout),
            allow_migrate: self.allow_migrate.or(parent.allow_migrate),
            priority: self.priority.or(parent.priority),
            critical: self.critical.or(parent.critical),
            multiple_active: self.multiple_active.or(parent.multiple_active),
        }
    }
}

/// What the cluster does when an operation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFail {
    Ignore,
    Block,
    Stop,
    Restart,
    Standby,
    Fence,
    Demote,
}

/// An operation definition (`[[resources.ops]]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Op {
    pub name: String,
    /// Seconds between recurring runs; 0 for one-shot operations.
    #[serde(default)]
    pub interval: u64,
    /// Seconds before the operation counts as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_fail: Option<OnFail>,
}

/// A primitive resource (`[[resources]]`): one agent instance.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Primitive {
    pub id: String,
    /// Agent standard: ocf, lsb, systemd, service, process, qemu, stonith …
    pub class: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(rename = "type")]
    pub agent: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<Op>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub utilization: BTreeMap<String, i64>,
    /// The node this resource prefers (the seeds' `domain_home`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// Move back to `home` when it returns, even against stickiness; an operator's move
    /// (`haven resource move`, INFINITY) outranks it while it stands.
    #[serde(default, skip_serializing_if = "is_false")]
    pub failback: bool,
}

/// An ordered, colocated list of primitives (`[[groups]]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Group {
    pub id: String,
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
}

/// Copies of a primitive or group on several nodes (`[[clones]]`); with `promotable`,
/// some copies are promoted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Clone {
    pub id: String,
    /// The id of the primitive or group that is cloned.
    pub child: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_node_max: Option<u32>,
    /// Instances that must run before what is ordered after the clone may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_min: Option<u32>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub interleave: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub notify: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub globally_unique: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ordered: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub promotable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_node_max: Option<u32>,
    #[serde(default, skip_serializing_if = "Meta::is_empty")]
    pub meta: Meta,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoolOp {
    #[default]
    And,
    Or,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExprOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Lte,
    Gte,
    Defined,
    NotDefined,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueType {
    #[default]
    String,
    Integer,
    Number,
    Version,
}

/// A test of one node attribute (`#uname`, `#id` and `#kind` are built in).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Expr {
    pub attribute: String,
    pub operation: ExprOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<ValueType>,
}

/// A rule: when its expressions hold on a node, the node gets `score` (or the value of
/// the node attribute `score-attribute`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Score>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_attribute: Option<String>,
    #[serde(default)]
    pub boolean_op: BoolOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default)]
    pub expressions: Vec<Expr>,
    /// Nested rules, combined with the expressions by `boolean-op`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// `[[constraints.location]]`: a score for a resource on a node, or rules.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Location {
    pub id: String,
    pub rsc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<Score>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    Start,
    Stop,
    Promote,
    Demote,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "start" => Some(Action::Start),
            "stop" => Some(Action::Stop),
            "promote" => Some(Action::Promote),
            "demote" => Some(Action::Demote),
            _ => None,
        }
    }

    /// The action that undoes this one (used by symmetrical orders).
    pub fn inverse(self) -> Action {
        match self {
            Action::Start => Action::Stop,
            Action::Stop => Action::Start,
            Action::Promote => Action::Demote,
            Action::Demote => Action::Promote,
        }
    }
}

/// A resource set inside a colocation or order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ResourceSet {
    pub resources: Vec<String>,
    #[serde(default = "yes")]
    pub sequential: bool,
    #[serde(default = "yes")]
    pub require_all: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
}

/// `[[constraints.colocation]]`: place `rsc` relative to `with` (or along `sets`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Colocation {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rsc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with: Option<String>,
    pub score: Score,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rsc_role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub with_role: Option<Role>,
    /// Colocate on nodes with the same value of this node attribute, rather than on
    /// the same node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_attribute: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<ResourceSet>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderKind {
    #[default]
    Mandatory,
    Optional,
    Serialize,
}

/// `[[constraints.order]]`: `then` may do `then-action` only after `first` did
/// `first-action`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Order {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_action: Option<Action>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then_action: Option<Action>,
    #[serde(default)]
    pub kind: OrderKind,
    /// Defaults to true for Mandatory and Optional, false for Serialize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symmetrical: Option<bool>,
    /// With `false`, one running instance of a `first` clone is enough for `then`
    /// (unset: all of them, per node when interleaved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_all: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<ResourceSet>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub location: Vec<Location>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub colocation: Vec<Colocation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<Order>,
}

/// A fence device (`[[fencing.devices]]`): an agent from fence-agents and the nodes it
/// can kill. The password is referenced, never stored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FenceDevice {
    pub id: String,
    pub agent: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_script: Option<String>,
    /// Nodes this device can fence; empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

/// `[[fencing.levels]]`: devices tried together for `node`, levels in `index` order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FenceLevel {
    pub node: String,
    pub index: u32,
    pub devices: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fencing {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<FenceDevice>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub levels: Vec<FenceLevel>,
}

/// A whole cluster configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub options: Options,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<Node>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<Primitive>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<Clone>,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub fencing: Fencing,
}

/// What an id names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Primitive(usize),
    Group(usize),
    Clone(usize),
}

impl Config {
    /// Parse and validate a TOML configuration; `source` (a file name) is used in errors.
    pub fn from_toml(source: &str, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            source_name: source.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(source)?;
        Ok(config)
    }

    /// Render as TOML (the inverse of [`Config::from_toml`]).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Render(e.to_string()))
    }

    /// Map from resource id (primitive, group or clone) to what it is.
    pub fn id_index(&self) -> HashMap<&str, IdKind> {
        let mut m = HashMap::new();
        for (i, p) in self.resources.iter().enumerate() {
            m.insert(p.id.as_str(), IdKind::Primitive(i));
        }
        for (i, g) in self.groups.iter().enumerate() {
            m.insert(g.id.as_str(), IdKind::Group(i));
        }
        for (i, c) in self.clones.iter().enumerate() {
            m.insert(c.id.as_str(), IdKind::Clone(i));
        }
        m
    }

    /// Check every rule a configuration must satisfy; the first violation is returned.
    pub fn validate(&self, source: &str) -> Result<(), ConfigError> {
        let bad = |field: String, reason: String| ConfigError::Invalid {
            source_name: source.to_string(),
            field,
            reason,
        };

        let mut node_names = HashSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if n.name.trim().is_empty() {
                return Err(bad(format!("nodes[{i}].name"), "must not be empty".into()));
            }
            if !node_names.insert(n.name.as_str()) {
                return Err(bad(
                    format!("nodes[{i}].name"),
                    format!(
                        "node `{}` is defined twice; node names must be unique",
                        n.name
                    ),
                ));
            }
        }

        let mut ids: HashMap<String, String> = HashMap::new();
        let mut claim = |id: &'_ str, field: String| -> Result<(), ConfigError> {
            if id.trim().is_empty() {
                return Err(bad(field, "must not be empty".into()));
            }
            if let Some(prev) = ids.get(id) {
                return Err(bad(
                    field,
                    format!("id `{id}` is already used by {prev}; ids must be unique"),
                ));
            }
            ids.insert(id.to_string(), field);
            Ok(())
        };
        for (i, p) in self.resources.iter().enumerate() {
            claim(&p.id, format!("resources[{i}].id"))?;
        }
        for (i, g) in self.groups.iter().enumerate() {
            claim(&g.id, format!("groups[{i}].id"))?;
        }
        for (i, c) in self.clones.iter().enumerate() {
            claim(&c.id, format!("clones[{i}].id"))?;
        }
        for (i, d) in self.fencing.devices.iter().enumerate() {
            claim(&d.id, format!("fencing.devices[{i}].id"))?;
        }
        let index = self.id_index();
        let node_known = |n: &str| node_names.contains(n);
        if self.options.two_node && (!self.options.stonith_enabled || self.nodes.len() != 2) {
            return Err(bad(
                "options.two-node".into(),
                "two-node needs exactly two [[nodes]] and stonith-enabled = true: without a third vote, only fencing keeps both halves of a split from running the same resources".into(),
            ));
        }

        for (i, p) in self.resources.iter().enumerate() {
            if p.class.trim().is_empty() {
                return Err(bad(
                    format!("resources[{i}].class"),
                    "must not be empty".into(),
                ));
            }
            if p.class == "ocf" && p.provider.is_none() {
                return Err(bad(
                    format!("resources[{i}].provider"),
                    "an ocf resource needs a provider (e.g. `heartbeat`)".into(),
                ));
            }
            if let Some(h) = &p.home
                && !node_known(h)
            {
                return Err(bad(
                    format!("resources[{i}].home"),
                    format!("unknown node `{h}`"),
                ));
            }
            if p.failback && p.home.is_none() {
                return Err(bad(
                    format!("resources[{i}].failback"),
                    "failback needs a `home` node".into(),
                ));
            }
            if p.class == "volume"
                && let Some(v) = p.params.get("window_timeout")
            {
                parse_window_timeout(v).map_err(|reason| {
                    bad(format!("resources[{}].params.window_timeout", p.id), reason)
                })?;
            }
        }

        // Each primitive or group has at most one parent.
        let mut parent: HashMap<&str, String> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            if g.members.is_empty() {
                return Err(bad(
                    format!("groups[{i}].members"),
                    "a group needs at least one member".into(),
                ));
            }
            for (j, m) in g.members.iter().enumerate() {
                let field = format!("groups[{i}].members[{j}]");
                match index.get(m.as_str()) {
                    Some(IdKind::Primitive(_)) => {}
                    Some(_) => {
                        return Err(bad(
                            field,
                            format!("`{m}` is not a primitive; groups hold primitives only"),
                        ));
                    }
                    None => return Err(bad(field, format!("unknown resource `{m}`"))),
                }
                if let Some(prev) = parent.insert(m, format!("group `{}`", g.id)) {
                    return Err(bad(field, format!("`{m}` already belongs to {prev}")));
                }
            }
        }
        for (i, c) in self.clones.iter().enumerate() {
            let field = format!("clones[{i}].child");
            match index.get(c.child.as_str()) {
                Some(IdKind::Primitive(_)) | Some(IdKind::Group(_)) => {}
                Some(IdKind::Clone(_)) => {
                    return Err(bad(
                        field,
                        format!("`{}` is a clone; clones cannot be nested", c.child),
                    ));
                }
                None => return Err(bad(field, format!("unknown resource `{}`", c.child))),
            }
            if let Some(prev) = parent.insert(&c.child, format!("clone `{}`", c.id)) {
                return Err(bad(
                    field,
                    format!("`{}` already belongs to {prev}", c.child),
                ));
            }
            if c.clone_node_max == Some(0) {
                return Err(bad(
                    format!("clones[{i}].clone-node-max"),
                    "must be at least 1".into(),
                ));
            }
            if let (Some(pm), Some(cm)) = (c.promoted_max, c.clone_max)
                && pm > cm
            {
                return Err(bad(
                    format!("clones[{i}].promoted-max"),
                    format!("{pm} promoted instances cannot exceed clone-max {cm}"),
                ));
            }
            if let (Some(min), Some(cm)) = (c.clone_min, c.clone_max)
                && min > cm
            {
                return Err(bad(
                    format!("clones[{i}].clone-min"),
                    format!("{min} instances can never run when clone-max is {cm}"),
                ));
            }
            if !c.promotable && (c.promoted_max.is_some() || c.promoted_node_max.is_some()) {
                return Err(bad(
                    format!("clones[{i}].promoted-max"),
                    "only a promotable clone has promoted instances; set `promotable = true`"
                        .into(),
                ));
            }
        }

        let rsc_known = |r: &str| index.contains_key(r);
        for (i, l) in self.constraints.location.iter().enumerate() {
            let f = format!("constraints.location[{i}]");
            if !rsc_known(&l.rsc) {
                return Err(bad(
                    format!("{f}.rsc"),
                    format!("unknown resource `{}`", l.rsc),
                ));
            }
            match (&l.node, &l.score, l.rules.is_empty()) {
                (Some(n), Some(_), true) => {
                    if !node_known(n) {
                        return Err(bad(format!("{f}.node"), format!("unknown node `{n}`")));
                    }
                }
                (None, None, false) => {
                    for (j, r) in l.rules.iter().enumerate() {
                        check_rule(r, &format!("{f}.rules[{j}]"), &bad)?;
                    }
                }
                _ => {
                    return Err(bad(
                        f,
                        "give either `node` and `score`, or `rules` (not both)".into(),
                    ));
                }
            }
        }
        for (i, c) in self.constraints.colocation.iter().enumerate() {
            let f = format!("constraints.colocation[{i}]");
            check_pair_or_sets(
                &c.rsc, &c.with, &c.sets, &f, "rsc", "with", &rsc_known, &bad,
            )?;
        }
        for (i, o) in self.constraints.order.iter().enumerate() {
            let f = format!("constraints.order[{i}]");
            check_pair_or_sets(
                &o.first, &o.then, &o.sets, &f, "first", "then", &rsc_known, &bad,
            )?;
        }
        self.check_order_cycles(source)?;

        for (i, lv) in self.fencing.levels.iter().enumerate() {
            let f = format!("fencing.levels[{i}]");
            if !node_known(&lv.node) {
                return Err(bad(
                    format!("{f}.node"),
                    format!("unknown node `{}`", lv.node),
                ));
            }
            if lv.index == 0 {
                return Err(bad(
                    format!("{f}.index"),
                    "levels are numbered from 1".into(),
                ));
            }
            if lv.devices.is_empty() {
                return Err(bad(
                    format!("{f}.devices"),
                    "a fencing level needs at least one device".into(),
                ));
            }
            for (j, d) in lv.devices.iter().enumerate() {
                let known = self.fencing.devices.iter().any(|x| &x.id == d)
                    || self
                        .resources
                        .iter()
                        .any(|p| &p.id == d && p.class == "stonith");
                if !known {
                    return Err(bad(
                        format!("{f}.devices[{j}]"),
                        format!("unknown fence device `{d}`"),
                    ));
                }
            }
        }
        for (i, d) in self.fencing.devices.iter().enumerate() {
            // Any secret-bearing agent parameter (passwd, snmp_priv_passwd, community…)
            // would be replicated and shown by `config show`.
            let secret = |k: &str| {
                let k = k.to_ascii_lowercase();
                k.contains("passw") || k.contains("community") || k.contains("secret")
            };
            if let Some(k) = d.params.keys().find(|k| secret(k)) {
                return Err(bad(
                    format!("fencing.devices[{i}].params.{k}"),
                    "secrets are never stored in the configuration; use password-file or password-script".into(),
                ));
            }
            // A device that powers one machine (an IPMI board) must say which: used
            // against another victim it would kill its own host instead.
            if d.params
                .get("pcmk_host_argument")
                .is_some_and(|v| v == "none")
                && d.hosts.len() != 1
            {
                return Err(bad(
                    format!("fencing.devices[{i}].hosts"),
                    "a device with pcmk_host_argument = \"none\" controls one machine: name exactly that node in hosts".into(),
                ));
            }
            // A watchdog only fences if the cut-off node stops by itself, which
            // no-quorum-policy freeze or ignore never does.
            if d.agent == "watchdog"
                && matches!(
                    self.options.no_quorum_policy,
                    NoQuorumPolicy::Freeze | NoQuorumPolicy::Ignore
                )
            {
                return Err(bad(
                    format!("fencing.devices[{i}].agent"),
                    "a watchdog device needs options.no-quorum-policy = \"stop\" or \"suicide\": with freeze or ignore a cut-off node keeps running what the others recover".into(),
                ));
            }
            check_fence_durations(d, &node_known).map_err(|(k, reason)| {
                bad(format!("fencing.devices[{}].params.{k}", d.id), reason)
            })?;
            for (j, h) in d.hosts.iter().enumerate() {
                if !node_known(h) {
                    return Err(bad(
                        format!("fencing.devices[{i}].hosts[{j}]"),
                        format!("unknown node `{h}`"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A cycle of mandatory orders can never be satisfied: refuse it.
    fn check_order_cycles(&self, source: &str) -> Result<(), ConfigError> {
        // Edges between (resource, action) pairs, labelled with the constraint's index.
        let mut edges: HashMap<Step<'_>, Vec<(Step<'_>, usize)>> = HashMap::new();
        for (i, o) in self.constraints.order.iter().enumerate() {
            if o.kind != OrderKind::Mandatory {
                continue;
            }
            let fa = o.first_action.unwrap_or(Action::Start);
            let ta = o.then_action.unwrap_or(fa);
            if let (Some(f), Some(t)) = (&o.first, &o.then) {
                edges.entry((f, fa)).or_default().push(((t, ta), i));
            }
            for w in o.sets.windows(2) {
                let fa = w[0].action.unwrap_or(fa);
                let ta = w[1].action.unwrap_or(fa);
                for f in &w[0].resources {
                    for t in &w[1].resources {
                        edges.entry((f, fa)).or_default().push(((t, ta), i));
                    }
                }
            }
            for s in &o.sets {
                if s.sequential {
                    let a = s.action.unwrap_or(fa);
                    for w in s.resources.windows(2) {
                        edges.entry((&w[0], a)).or_default().push(((&w[1], a), i));
                    }
                }
            }
        }
        // Iterative DFS with colours; deterministic by sorting the start nodes.
        let mut starts: Vec<_> = edges.keys().copied().collect();
        starts.sort();
        let mut colour: HashMap<(&str, Action), u8> = HashMap::new();
        for s in starts {
            if colour.get(&s).copied().unwrap_or(0) != 0 {
                continue;
            }
            let mut stack = vec![(s, 0usize)];
            colour.insert(s, 1);
            while let Some((n, k)) = stack.pop() {
                let next = edges.get(&n).and_then(|v| v.get(k));
                match next {
                    Some(&(m, ci)) => {
                        stack.push((n, k + 1));
                        match colour.get(&m).copied().unwrap_or(0) {
                            0 => {
                                colour.insert(m, 1);
                                stack.push((m, 0));
                            }
                            1 => {
                                return Err(ConfigError::Invalid {
                                    source_name: source.to_string(),
                                    field: format!("constraints.order[{ci}].then"),
                                    reason: format!(
                                        "mandatory orders form a cycle through `{}`; it could never start",
                                        m.0
                                    ),
                                });
                            }
                            _ => {}
                        }
                    }
                    None => {
                        colour.insert(n, 2);
                    }
                }
            }
        }
        Ok(())
    }
}

/// A (resource, action) pair in the graph of mandatory orders.
type Step<'a> = (&'a str, Action);

fn check_rule(
    r: &Rule,
    f: &str,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if r.score.is_some() && r.score_attribute.is_some() {
        return Err(bad(
            format!("{f}.score"),
            "give `score` or `score-attribute`, not both".into(),
        ));
    }
    if r.expressions.is_empty() && r.rules.is_empty() {
        return Err(bad(
            format!("{f}.expressions"),
            "a rule needs at least one expression".into(),
        ));
    }
    for (k, e) in r.expressions.iter().enumerate() {
        let needs_value = !matches!(e.operation, ExprOp::Defined | ExprOp::NotDefined);
        if needs_value && e.value.is_none() {
            return Err(bad(
                format!("{f}.expressions[{k}].value"),
                "comparisons need a value".into(),
            ));
        }
    }
    for (k, sub) in r.rules.iter().enumerate() {
        check_rule(sub, &format!("{f}.rules[{k}]"), bad)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn check_pair_or_sets(
    a: &Option<String>,
    b: &Option<String>,
    sets: &[ResourceSet],
    f: &str,
    an: &str,
    bn: &str,
    known: &dyn Fn(&str) -> bool,
    bad: &dyn Fn(String, String) -> ConfigError,
) -> Result<(), ConfigError> {
    match (a, b, sets.is_empty()) {
        (Some(x), Some(y), true) => {
            if !known(x) {
                return Err(bad(format!("{f}.{an}"), format!("unknown resource `{x}`")));
            }
            if !known(y) {
                return Err(bad(format!("{f}.{bn}"), format!("unknown resource `{y}`")));
            }
            if x == y {
                return Err(bad(
                    format!("{f}.{bn}"),
                    format!("`{x}` cannot be constrained against itself"),
                ));
            }
            Ok(())
        }
        (None, None, false) => {
            for (i, s) in sets.iter().enumerate() {
                if s.resources.is_empty() {
                    return Err(bad(
                        format!("{f}.sets[{i}].resources"),
                        "a set needs resources".into(),
                    ));
                }
                for (j, r) in s.resources.iter().enumerate() {
                    if !known(r) {
                        return Err(bad(
                            format!("{f}.sets[{i}].resources[{j}]"),
                            format!("unknown resource `{r}`"),
                        ));
                    }
                }
            }
            Ok(())
        }
        _ => Err(bad(
            f.to_string(),
            format!("give either `{an}` and `{bn}`, or `sets` (not both)"),
        )),
    }
}

/// The longest dual-primary migration window a volume may be given.
const MAX_WINDOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A `volume` resource's `window_timeout`: how long a live migration may keep two
/// primaries. At least a second (a migration takes that much), at most an hour (two
/// primaries are a risk to be bounded, not a mode).
pub fn parse_window_timeout(v: &str) -> Result<std::time::Duration, String> {
    let d =
        parse_duration(v).ok_or_else(|| format!("'{v}' is not a duration ({DURATION_FORMS})"))?;
    if d < std::time::Duration::from_secs(1) || d > MAX_WINDOW_TIMEOUT {
        return Err(format!(
            "'{v}' is out of range: a migration window lasts between 1s and 1h"
        ));
    }
    Ok(d)
}

/// The forms a duration may take, for error messages.
const DURATION_FORMS: &str = "seconds, or with s/ms/min/h, e.g. 5, 5s, 500ms, 1min";

/// A duration as Pacemaker writes one: whole seconds (`5`), or a whole number with a
/// unit: `s`/`sec`, `ms`/`msec`, `m`/`min`, `h`/`hr` (`5s`, `500ms`, `1min`).
pub fn parse_duration(v: &str) -> Option<std::time::Duration> {
    let t = v.trim().to_ascii_lowercase();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "s" | "sec" => n.checked_mul(1000)?,
        "ms" | "msec" => n,
        "m" | "min" => n.checked_mul(60_000)?,
        "h" | "hr" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(ms))
}

/// The durations Haven reads from a fence device's params (delays, timeouts, a
/// watchdog's wait), and the agent's own `delay` (whole seconds, as fence-agents take
/// it). A malformed one is an error, never "no delay": a silently lost delay lets both
/// nodes of a split shoot at once. Err: (param, reason).
fn check_fence_durations(
    d: &FenceDevice,
    node_known: &dyn Fn(&str) -> bool,
) -> Result<(), (String, String)> {
    let not_a_duration = |k: &str, v: &str| {
        (
            k.to_string(),
            format!("'{v}' is not a duration ({DURATION_FORMS})"),
        )
    };
    let mut durations = vec!["pcmk_delay_max", "pcmk_reboot_timeout", "pcmk_off_timeout"];
    if d.agent == "watchdog" {
        durations.extend(["wait", "timeout"]);
    }
    for k in durations {
        if let Some(v) = d.params.get(k)
            && parse_duration(v).is_none()
        {
            return Err(not_a_duration(k, v));
        }
    }
    if let Some(v) = d.params.get("pcmk_delay_base") {
        let k = "pcmk_delay_base";
        if !v.contains(':') {
            if parse_duration(v).is_none() {
                return Err(not_a_duration(k, v));
            }
        } else {
            for pair in v.split([';', ',', ' ']).filter(|p| !p.trim().is_empty()) {
                let Some((node, delay)) = pair.split_once(':') else {
                    return Err((
                        k.to_string(),
                        format!("'{pair}' in '{v}' is not NODE:DELAY (e.g. n1:5s;n2:0)"),
                    ));
                };
                if !node_known(node.trim()) {
                    return Err((
                        k.to_string(),
                        format!(
                            "'{pair}' names `{}`, which is not in [[nodes]]",
                            node.trim()
                        ),
                    ));
                }
                if parse_duration(delay).is_none() {
                    return Err((
                        k.to_string(),
                        format!(
                            "'{delay}' (for node {}) is not a duration ({DURATION_FORMS})",
                            node.trim()
                        ),
                    ));
                }
            }
        }
    }
    if let Some(v) = d.params.get("delay")
        && (v.trim().is_empty() || !v.trim().chars().all(|c| c.is_ascii_digit()))
    {
        return Err((
            "delay".to_string(),
            format!(
                "'{v}' is not a whole number of seconds (the fence agent's own delay; pcmk_delay_base takes units)"
            ),
        ));
    }
    Ok(())
}
