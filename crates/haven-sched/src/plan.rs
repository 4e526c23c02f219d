//! The scheduler's output: what changes (for people: Pacemaker's "Transition Summary"),
//! and the graph of actions that carries it out (for the coordinator).

use serde::Serialize;

use haven_model::{Role, Score};

/// What happens to one resource (or clone instance).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum ChangeKind {
    Start,
    Stop,
    Move,
    Migrate,
    Recover,
    Restart,
    Promote,
    Demote,
    /// The agent applies changed parameters in place (carried out as a restart by a
    /// coordinator whose agents cannot reload).
    Reload,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Start => "Start",
            ChangeKind::Stop => "Stop",
            ChangeKind::Move => "Move",
            ChangeKind::Migrate => "Migrate",
            ChangeKind::Recover => "Recover",
            ChangeKind::Restart => "Restart",
            ChangeKind::Promote => "Promote",
            ChangeKind::Demote => "Demote",
            ChangeKind::Reload => "Reload",
        }
    }
}

/// Where a resource is (or will be), in which role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    pub node: String,
    pub role: Role,
}

/// One line of the transition summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: ChangeKind,
    pub resource: String,
    pub from: Option<Placement>,
    pub to: Option<Placement>,
    /// Whether roles are worth showing (promotable clones).
    pub show_roles: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Shown, but not carried out: something it depends on cannot run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
    /// Carried out, but implied by another line of the summary (Pacemaker shows the
    /// stop of every copy of a multiply-active resource as one Restart or Move).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub quiet: bool,
}

/// A node to be fenced, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fence {
    pub node: String,
    pub reason: String,
}

/// One executable action.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
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
        source: String,
        target: String,
    },
    MigrateFrom {
        resource: String,
        source: String,
        target: String,
    },
    Start {
        resource: String,
        node: String,
    },
    Promote {
        resource: String,
        node: String,
    },
}

/// A node's score for a resource, as computed during placement (`--scores`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AllocationScore {
    pub resource: String,
    pub node: String,
    pub score: Score,
}

/// The plan: changes for people, actions and their order for the coordinator.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub fences: Vec<Fence>,
    pub changes: Vec<Change>,
    pub actions: Vec<Action>,
    /// `(a, b)`: action `a` must complete before action `b` begins (indices into
    /// `actions`).
    pub edges: Vec<(usize, usize)>,
    /// Allocation scores: node names, then one row per placed resource (compact; see
    /// [`Plan::scores`]).
    #[serde(skip)]
    pub score_nodes: Vec<String>,
    #[serde(skip)]
    pub score_rows: Vec<(String, Vec<Score>)>,
}

impl Change {
    fn details(&self) -> String {
        let role = |r: Role| r.name();
        match (&self.from, &self.to) {
            (None, Some(t)) => {
                if t.role == Role::Promoted {
                    format!("Stopped -> Promoted {}", t.node)
                } else {
                    t.node.clone()
                }
            }
            (Some(f), None) => {
                if self.show_roles && f.role > Role::Started {
                    format!("{} {}", role(f.role), f.node)
                } else {
                    f.node.clone()
                }
            }
            (Some(f), Some(t)) if f.node == t.node => {
                if f.role != t.role {
                    format!("{} -> {} {}", role(f.role), role(t.role), t.node)
                } else if self.show_roles && f.role > Role::Started {
                    format!("{} {}", role(f.role), f.node)
                } else {
                    f.node.clone()
                }
            }
            (Some(f), Some(t)) => {
                if f.role != t.role {
                    format!("{} {} -> {} {}", role(f.role), f.node, role(t.role), t.node)
                } else if self.show_roles && f.role > Role::Started {
                    format!("{} {} -> {}", role(f.role), f.node, t.node)
                } else {
                    format!("{} -> {}", f.node, t.node)
                }
            }
            (None, None) => String::new(),
        }
    }

    /// The line as Pacemaker prints it (spacing aside).
    pub fn summary_line(&self) -> String {
        let mut s = format!(
            "  * {:<10} {:<20} ( {} )",
            self.kind.name(),
            self.resource,
            self.details()
        );
        if let Some(r) = &self.reason {
            s.push_str("  due to ");
            s.push_str(r);
            if self.blocked {
                s.push_str(" (blocked)");
            }
        } else if self.blocked {
            s.push_str("  blocked");
        }
        s
    }
}

impl Plan {
    /// Pacemaker's "Transition Summary" block: fences first, then one line per change.
    pub fn transition_summary(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .fences
            .iter()
            .map(|f| format!("  * Fence (reboot) {} '{}'", f.node, f.reason))
            .collect();
        out.extend(
            self.changes
                .iter()
                .filter(|c| !c.quiet)
                .map(Change::summary_line),
        );
        out
    }

    /// Every node's score for every placed resource.
    pub fn scores(&self) -> Vec<AllocationScore> {
        self.score_rows
            .iter()
            .flat_map(|(r, row)| {
                self.score_nodes
                    .iter()
                    .zip(row)
                    .map(move |(n, s)| AllocationScore {
                        resource: r.clone(),
                        node: n.clone(),
                        score: *s,
                    })
            })
            .collect()
    }

    /// Allocation scores, one line each.
    pub fn score_lines(&self) -> Vec<String> {
        self.scores()
            .iter()
            .map(|s| format!("{} allocation score on {}: {}", s.resource, s.node, s.score))
            .collect()
    }

    /// The action graph as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}
