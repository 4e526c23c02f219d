//! Deterministic simulation of a Haven cluster.
//!
//! The real coordinator, node agents and fencing sequencer (haven-ha) run under virtual
//! time against a simulated world: nodes that crash and come back, a network that
//! partitions, delays and drops messages, resources that die by themselves. The ground
//! truth — which resource really runs on which node — is kept by the world, and the
//! invariant checkers look at it on every tick, not at what the cluster believes.
//!
//! Everything random is drawn from one seed (ChaCha8), and every collection iterates
//! in a fixed order, so a seed replays exactly: a failure prints the seed and
//! `haven simulate --chaos --seed N` (or [`run`] with that seed) shows it again.
//!
//! A run has two phases, as in openraft's and TigerBeetle's fuzzers: a safety phase
//! under faults, where only safety invariants are checked (never running twice), then
//! a liveness phase with every fault healed, at the end of which every resource must
//! run exactly once.

mod invariants;
mod world;

pub use invariants::Violation;
pub use world::{FaultOptions, SimOptions, SimReport, cluster_config, run, run_scheduler};
