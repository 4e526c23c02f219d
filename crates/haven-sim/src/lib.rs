//! Deterministic simulation of a Haven cluster.
//!
//! The real coordinator, node agents and fencing sequencer (haven-ha) run under virtual
//! time against a simulated world: nodes that crash and come back, a network that
//! partitions, delays and drops messages, resources that die by themselves. The ground
//! truth — which resource really runs on which node — is kept by the world, and the
//! invariant checkers look at it on every tick, not at what the cluster believes.
//!
//! Everything random is drawn from one seed (ChaCha8), and every collection iterates
//! in a fixed order, so a seed replays exactly: a failure prints the seed, and
//! `HAVEN_SIM_SEED=N cargo test -p haven-sim --test seeds replay -- --nocapture` (or
//! [`run_scheduler`] with [`SimOptions::for_seed`]) shows it again with its whole log.
//!
//! Each seed draws its world: three nodes, or two without a witness (`two-node`, fence
//! delays that favour one node, fenced nodes kept out until an operator allows them);
//! no-quorum-policy stop or freeze. Faults: power loss, partitions (in a two-node world
//! a cut both ways, where both nodes race to fence), leader step-downs, resources
//! dying, and daemon-only restarts, where the daemon's memory is lost and the processes
//! it started keep running.
//!
//! A run has two phases, as in openraft's and TigerBeetle's fuzzers: a safety phase
//! under faults, where only safety invariants are checked, then a liveness phase with
//! every fault healed, at the end of which every resource must run exactly once. The
//! safety invariants: never running twice; nothing started on a node while another
//! node out of touch with it, and not fenced since, ran it meanwhile; a fenced node
//! runs nothing and is counted in by no coordinator until allowed back; a restarted
//! daemon never reports a resource stopped that it has not probed; never both nodes
//! of a two-node cluster fenced at once; the winner of a two-node race never fenced
//! again unless it has been down or out of touch since.

mod invariants;
mod world;

pub use invariants::Violation;
pub use world::{
    Broken, Fault, FaultOptions, FenceDelays, SimOptions, SimReport, cluster_config, run,
    run_scheduler,
};
