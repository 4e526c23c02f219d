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
//!   after the resources it is colocated with, on its best node (a node its own
//!   preferences — locations, health, stickiness — score below zero is out; a negative
//!   colocation only discourages); ties go to the less loaded node, then the current
//!   node, then the node name; the nodes ruled out for what must run with a resource
//!   (INFINITY colocations, transitively) are ruled out for it and for its promotion,
//!   so a group whose member failed on a node pulls what it runs with off that node;
//! - a `home` adds 1 on its node; with `failback` it adds 100,000, which outweighs
//!   stickiness but not an INFINITY constraint such as an operator's move;
//! - groups are placed as one unit (members follow the first, in order; if no node
//!   takes every member, the first ones stay where they can, also per clone
//!   instance); clones place instances (current ones stay where allowed, new ones
//!   spread), promotable clones promote the instances with the best promotion scores;
//! - a colocation with the Promoted or Unpromoted role of something without roles
//!   (not a promotable clone) places nothing;
//! - mandatory orders block starts behind something that cannot run (an interleaved
//!   clone's new instances are not placed at all without the first's instance beside
//!   them), stop what runs
//!   behind it (symmetrical orders), and restart what depends on something that
//!   restarts (per node for interleaved clones; a clone ordered after a clone without
//!   interleave restarts everywhere when the first starts or stops an instance, unless
//!   only a count of the first's instances is required); live migration replaces
//!   stop/start when allowed (a primitive's, not a group member's, only when what it
//!   is ordered after does not stop the ordinary way);
//! - what runs with a changed definition restarts (or reloads) in place; the CIB import
//!   finds such changes from Pacemaker's parameter digests;
//! - unclean nodes are fenced before anything starts (fencing needs quorum); what runs
//!   on one that cannot be fenced stays put (its stop is blocked); without
//!   quorum, `no-quorum-policy` stops, freezes or demotes; `on-fail = block` and
//!   unmanaged resources are left alone.
//!
//! The semantics were learnt from Pacemaker's documentation and its scheduler
//! regression cases (`haven conformance pacemaker`); no Pacemaker code is used.

pub mod conformance;
mod plan;
mod sched;
pub mod window;

pub use plan::Action as PlanAction;
pub use plan::{AllocationScore, Change, ChangeKind, Fence, Placement, Plan};
pub use sched::schedule;
