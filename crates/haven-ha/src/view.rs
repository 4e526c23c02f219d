//! What the coordinator hands the scheduler, and what it gets back.
//!
//! The coordinator does not know how placement is decided: it builds a [`ClusterView`]
//! from what it has observed and asks a [`Planner`] for a [`Plan`]. The daemon and the
//! simulator plug in Haven's scheduler (haven-sched) through an adapter; tests plug in
//! tiny planners, so the coordinator's sequencing is tested on its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node as the coordinator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Not heard yet since this coordinator started.
    Pending,
    /// Heard, a member, may run resources.
    Online,
    /// Lost without a clean exit and not yet fenced: whatever it ran may still run.
    Unclean,
    /// Known down: fenced, or never ran anything, or left cleanly.
    Offline,
}

/// What is known of one resource on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Observed {
    /// Not probed yet: it may be running there.
    Unknown,
    Stopped,
    Started,
    Promoted,
    /// Its last operation or monitor failed: active, and in need of recovery.
    Failed,
}

impl Observed {
    /// True when the resource is, or may be, active there.
    pub fn maybe_active(self) -> bool {
        !matches!(self, Observed::Stopped)
    }
}

/// The coordinator's picture of the cluster, input of the scheduler.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub nodes: BTreeMap<String, NodeState>,
    /// resource → node → what was observed there (absent = stopped).
    pub resources: BTreeMap<String, BTreeMap<String, Observed>>,
    /// (resource, node) → failures counted since the last cleanup.
    pub failcounts: BTreeMap<String, BTreeMap<String, u32>>,
}

impl ClusterView {
    /// Nodes where `resource` is, or may be, active.
    pub fn active_on(&self, resource: &str) -> impl Iterator<Item = &str> {
        self.resources
            .get(resource)
            .into_iter()
            .flatten()
            .filter(|(_, o)| o.maybe_active())
            .map(|(n, _)| n.as_str())
    }
}

/// One action of a plan.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum Step {
    Fence {
        node: String,
    },
    Stop {
        resource: String,
        node: String,
    },
    Demote {
        resource: String,
        node: String,
    },
    MigrateTo {
        resource: String,
        from: String,
        to: String,
    },
    MigrateFrom {
        resource: String,
        from: String,
        to: String,
    },
    Start {
        resource: String,
        node: String,
    },
    Promote {
        resource: String,
        node: String,
        /// A dual-primary migration window's promote: the node whose primary stays up
        /// until the guests on the volume have migrated here (then it is demoted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        migration_source: Option<String>,
    },
}

impl Step {
    /// The node that executes it.
    pub fn node(&self) -> &str {
        match self {
            Step::Fence { node }
            | Step::Stop { node, .. }
            | Step::Demote { node, .. }
            | Step::Start { node, .. }
            | Step::Promote { node, .. } => node,
            Step::MigrateTo { from, .. } => from,
            Step::MigrateFrom { to, .. } => to,
        }
    }

    pub fn resource(&self) -> Option<&str> {
        match self {
            Step::Fence { .. } => None,
            Step::Stop { resource, .. }
            | Step::Demote { resource, .. }
            | Step::Start { resource, .. }
            | Step::Promote { resource, .. }
            | Step::MigrateTo { resource, .. }
            | Step::MigrateFrom { resource, .. } => Some(resource),
        }
    }
}

/// A plan: steps, and `before → after` edges between their indices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub edges: Vec<(usize, usize)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Decides placement. Must be deterministic for a given view (and its own config).
pub trait Planner {
    fn plan(&mut self, view: &ClusterView) -> Plan;
}
