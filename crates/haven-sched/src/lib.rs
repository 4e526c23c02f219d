//! Haven's scheduler: a pure, deterministic function from (configuration, observed
//! state) to a plan — a graph of actions with their ordering — with Pacemaker's
//! placement semantics.
//!
//! Entry point (stable; the coordinator and `haven simulate` call it):
//! [`schedule`]`(&Config, &State) -> Plan`. [`Plan::transition_summary`] renders the
//! plan as Pacemaker's "Transition Summary" lines; [`Plan::score_lines`] gives the
//! allocation scores; [`Plan::actions`] and [`Plan::edges`] are the graph.
//!
//! How placement is decided, in Pacemaker's terms:
//! - every resource gets a score per node: location constraints (or rules), stickiness
//!   on its current node, bans from failcounts past `migration-threshold`, and the
//!   preferences of resources colocated with it (scaled by the colocation score);
//! - resources are placed one at a time (higher `priority` first); a resource is placed
//!   after the resources it is colocated with, on its best node with a non-negative
//!   score; ties keep the current node, then prefer the least loaded node;
//! - groups are placed as one unit (members follow the first, in order); clones place
//!   instances (current ones stay where allowed, new ones spread), promotable clones
//!   promote the instances with the best promotion scores;
//! - mandatory orders stop what depends on something that cannot run and restart what
//!   depends on something that restarts; unclean nodes are fenced first.

pub mod conformance;
mod plan;
mod sched;

pub use plan::Action as PlanAction;
pub use plan::{AllocationScore, Change, ChangeKind, Fence, Placement, Plan};
pub use sched::schedule;
