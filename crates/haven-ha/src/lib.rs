//! Haven's high-availability state machines: the coordinator (failure detection,
//! fencing sequence, plan dispatch) and the node agent. Pure: time is an input.
//!
//! Every machine here follows one shape (quinn-proto's): `handle_*` methods feed it
//! events together with the current [`Time`], `poll_*` methods drain what it wants done
//! and when it next wants to be woken. No clock, socket, file or process is touched, so
//! the daemon and the simulator drive the very same code.

pub mod adapter;
pub mod agent;
pub mod coordinator;
pub mod fencing;
pub mod membership;
pub mod planner;
pub mod quorum;
pub mod time;
pub mod view;

pub use agent::{AgentCommand, NodeAgent, OpKind, OpOutcome, OpReport, OpRequest};
pub use coordinator::{
    Coordinator, CoordinatorCommand, CoordinatorConfig, CoordinatorStatus, NodeSpec, ResourceOps,
    StepStatus,
};
pub use fencing::{Confirmation, FenceCommand, FenceStep, Fencer, StepKind, VictimState};
pub use membership::{Liveness, Membership, MembershipEvent, Timeouts};
pub use planner::{NodeOverride, SchedPlanner};
pub use quorum::{NoQuorumPolicy, QuorumAction, QuorumWatch};
pub use time::Time;
pub use view::{ClusterView, NodeState, Observed, Plan, Planner, Step};
