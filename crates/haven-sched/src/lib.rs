//! Haven's scheduler: a pure, deterministic function from (configuration, observed
//! state) to a plan — a graph of actions with their ordering — with Pacemaker's
//! placement semantics.
