//! Haven's replicated cluster state: a Raft log and state machine persisted in redb.
