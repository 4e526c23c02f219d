//! openraft's network over Haven's mTLS RPC.

use haven_net::{RpcClient, RpcError};
use haven_store::{NodeId, NodeInfo, TypeConfig};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub const APPEND: &str = "/raft/append";
pub const VOTE: &str = "/raft/vote";
pub const SNAPSHOT: &str = "/raft/snapshot";

#[derive(Clone)]
pub struct Network {
    pub rpc: RpcClient,
    pub lab: std::sync::Arc<super::fence::LabSwitch>,
    /// The failure detector's view of each peer's links, to route by.
    pub membership: std::sync::Arc<std::sync::Mutex<haven_ha::membership::Membership>>,
    /// Set when a peer refuses this node its vote because it fenced it (see
    /// `fence::pause_elections`).
    pub refused_as_fenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

pub struct Conn {
    rpc: RpcClient,
    lab: std::sync::Arc<super::fence::LabSwitch>,
    membership: std::sync::Arc<std::sync::Mutex<haven_ha::membership::Membership>>,
    refused_as_fenced: std::sync::Arc<std::sync::atomic::AtomicBool>,
    target: NodeId,
    /// The target; only a server whose certificate names `node.name` is talked to.
    node: NodeInfo,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Conn;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> Conn {
        Conn {
            rpc: self.rpc.clone(),
            lab: self.lab.clone(),
            membership: self.membership.clone(),
            refused_as_fenced: self.refused_as_fenced.clone(),
            target,
            node: node.clone(),
        }
    }
}

impl Conn {
    /// The server answers with the whole `Result` of the Raft call, so a Raft-level
    /// refusal comes back as a `RemoteError`, and a transport failure as unreachable.
    async fn send<Q, R, E>(
        &self,
        path: &str,
        req: &Q,
    ) -> Result<R, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Q: Serialize,
        R: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        // Chosen per call: a cut link0 moves Raft onto a link that still carries heartbeats.
        let Some(addr) = &super::peer_addr(&self.membership, &self.node) else {
            let e = std::io::Error::other(format!(
                "node {} has no address in the membership",
                self.target
            ));
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        };
        if self.lab.rpc_cut() {
            let e = std::io::Error::other("lab partition: this node is cut off");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let answer: Result<Result<R, RaftError<NodeId, E>>, RpcError> = self
            .rpc
            .call_node(None, addr, &self.node.name, path, req)
            .await;
        if let Err(RpcError::Remote { message, .. }) = &answer
            && message.contains(super::fence::FENCED_NO_VOTE)
        {
            self.refused_as_fenced
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match answer {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(
                e @ (RpcError::Connect { .. }
                | RpcError::Tls { .. }
                | RpcError::Timeout { .. }
                | RpcError::WrongPeer { .. }),
            ) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(APPEND, &rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.send(SNAPSHOT, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.send(VOTE, &rpc).await
    }
}
