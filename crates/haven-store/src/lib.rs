//! Haven's replicated cluster state: a Raft log and state machine persisted in redb.
//!
//! What is stored (and why only this): the Raft vote, log and committed index (Raft's
//! own durability rules), and the [`ClusterState`] — the configuration with its
//! version, node attributes, join tokens, and resource operation history with
//! failcounts. Heartbeat liveness is not stored: it is re-observed after every restart.

pub mod state;
pub mod store;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use state::{
    ClusterState, ConfigRecord, FenceMark, FenceRecord, NodeRecord, Request, Response,
    VolumeOutdated,
};
pub use store::{LogStore, StateMachineStore, StateView, StoreError, open};

/// A Raft member's address book entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    /// One address per link; Raft uses the first.
    pub addrs: Vec<String>,
}

openraft::declare_raft_types!(
    /// Haven's Raft types: commands are [`Request`], results [`Response`].
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type NodeId = u64;
