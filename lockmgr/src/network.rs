//! openraft's network over csvd RPC: one [`PeerConn`] per replication target.
//!
//! Error mapping follows openraft's contract: a peer we cannot connect to is
//! `Unreachable` (openraft backs off), a call that failed after connecting is a
//! `NetworkError` (retried), a Raft error from the peer is a `RemoteError`. Replies
//! that arrive after their timeout are discarded by the multiplexed client (they carry
//! the id of a request nobody waits for any more), so a late answer is never taken
//! for the answer to the next request.

use std::time::Duration;

use csv_core::meta::NodeId;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::rpc::auth::ClusterKey;
use crate::rpc::message::{Reply, Request};
use crate::rpc::{RpcClient, RpcError};
use crate::types::{RaftNode, TypeConfig};

/// Creates connections to Raft peers.
#[derive(Clone)]
pub struct Network {
    key: ClusterKey,
    me: NodeId,
}

impl Network {
    pub fn new(key: ClusterKey, me: NodeId) -> Self {
        Network { key, me }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> PeerConn {
        PeerConn {
            target,
            client: RpcClient::new(node.rpc_addr.clone(), self.key.clone(), self.me),
        }
    }
}

/// A connection to one Raft peer (connected lazily, reconnected after failures).
pub struct PeerConn {
    target: NodeId,
    client: RpcClient,
}

#[derive(Debug, thiserror::Error)]
#[error("unexpected reply from node {0}")]
struct UnexpectedReply(NodeId);

type RpcResult<T, E> = Result<T, RPCError<NodeId, RaftNode, RaftError<NodeId, E>>>;

impl PeerConn {
    async fn call<T, E: std::error::Error>(
        &mut self,
        req: Request,
        ttl: Duration,
        pick: impl FnOnce(Reply) -> Option<Result<T, RaftError<NodeId, E>>>,
    ) -> RpcResult<T, E> {
        match self.client.call(req, ttl).await {
            Ok(reply) => match pick(reply) {
                Some(Ok(v)) => Ok(v),
                Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
                None => Err(RPCError::Network(NetworkError::new(&UnexpectedReply(
                    self.target,
                )))),
            },
            Err(e @ (RpcError::Connect { .. } | RpcError::Unauthenticated(_))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, openraft::error::Infallible> {
        self.call(
            Request::AppendEntries(rpc),
            option.hard_ttl(),
            |r| match r {
                Reply::AppendEntries(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        self.call(
            Request::InstallSnapshot(rpc),
            option.hard_ttl(),
            |r| match r {
                Reply::InstallSnapshot(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, openraft::error::Infallible> {
        self.call(Request::Vote(rpc), option.hard_ttl(), |r| match r {
            Reply::Vote(r) => Some(r),
            _ => None,
        })
        .await
    }
}
