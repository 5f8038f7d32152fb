//! The messages nodes and `csvctl` exchange, and their versioned encoding.
//!
//! A payload is one version byte ([`MESSAGE_VERSION`]) followed by a postcard-encoded
//! [`Envelope`]. postcard is not self-describing: variants are only ever appended.

use csv_core::meta::{LockInfo, NodeId, NodeRecord, SessionInfo, SpaceInfo, VolumeInfo};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::RpcError;
use crate::types::{Op, Origin, Response, TypeConfig};

pub const MESSAGE_VERSION: u8 = 1;

#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Matches a response to its request on a multiplexed connection.
    pub id: u64,
    pub body: T,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A metadata change; only the leader accepts it (it stamps the time).
    Write {
        op: Op,
        origin: Option<Origin>,
    },
    /// ReadIndex: the leader confirms it is still leader and answers the index a
    /// linearizable read must wait for.
    ReadIndex,
    /// A node asks to join the cluster (the leader adds it as a learner).
    Join {
        node: NodeId,
        rpc_addr: String,
    },
    /// A node leaving for good or for a while: the leader hands its voter seat to a
    /// healthy learner if there is one.
    Leave {
        node: NodeId,
    },
    /// This node's view of the cluster.
    Status,
    /// Ask this node to release every lock and reservation and shut down.
    Shutdown,
    /// A linearizable read of the metadata, served by this node.
    Query(Query),
    /// Acquire a lock for this node's own session (operator and test tool).
    LockAcquire {
        key: String,
        exclusive: bool,
    },
    /// Release a lock held by this node's session.
    LockRelease {
        key: String,
    },
    /// Is `token` still this node's valid grant of `key`? (A linearizable check.)
    LockValidate {
        key: String,
        token: u64,
    },
    /// A metadata change submitted to any node, which forwards it to the leader.
    Submit(Op),
    /// A request for a service the daemon registered on this node (e.g. the redirector's
    /// peer I/O), as opaque bytes: the RPC layer authenticates and frames it.
    Ext {
        service: u8,
        payload: Vec<u8>,
    },
    /// This node's applied log index and a digest of its local replica (not linearizable:
    /// it describes this replica, to compare replicas with each other).
    StateDigest,
}

/// Reads of the metadata (what `csvctl` shows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    Volume,
    Nodes,
    Locks,
    Sessions,
    Space,
    /// The allocation and namespace fsck of the state machine.
    Fsck,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryReply {
    Volume(Option<VolumeInfo>),
    Nodes(Vec<NodeRecord>),
    Locks(Vec<LockInfo>),
    Sessions(Vec<SessionInfo>),
    Space(SpaceInfo),
    /// `Ok` or the list of violations, with the log index the check ran at.
    Fsck {
        applied: u64,
        violations: Vec<String>,
    },
}

/// Why a request that needs the leader was not served here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum LeaderError {
    #[error("not the leader (leader: {leader:?} at {leader_addr:?})")]
    NotLeader {
        leader: Option<NodeId>,
        leader_addr: Option<String>,
    },
    #[error("metadata service unavailable: {0}")]
    Unavailable(String),
}

/// One node's summary of the cluster, as `csvctl status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    /// Nodes that vote in every configuration in effect. During a voter change (joint
    /// consensus) the nodes being added or removed are not among them: until the change
    /// completes, an election still needs a majority of the old configuration.
    pub voters: Vec<NodeId>,
    /// Every other member.
    pub learners: Vec<NodeId>,
    /// Members and their RPC addresses.
    pub members: Vec<(NodeId, String)>,
    /// Whether this node currently holds a live metadata session.
    pub session: Option<u64>,
    pub fenced: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(Result<Response, LeaderError>),
    ReadIndex(Result<u64, LeaderError>),
    Join(Result<(), LeaderError>),
    Leave(Result<(), LeaderError>),
    Status(NodeStatus),
    Shutdown,
    Query(Result<QueryReply, LeaderError>),
    /// The token granted, or why not.
    Lock(Result<u64, String>),
    /// The answer of a registered service.
    Ext(Result<Vec<u8>, String>),
    /// The request could not be served at all (decoding or an internal error).
    Refused(String),
    StateDigest(Result<StateDigest, String>),
}

/// A replica's state at one applied log index: blake3 of the postcard-encoded state
/// machine. Replicas that applied the same log prefix have the same digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDigest {
    pub node: NodeId,
    pub applied: u64,
    pub digest: [u8; 32],
}

pub fn encode<T: Serialize>(env: &Envelope<T>) -> Result<Vec<u8>, RpcError> {
    let mut out = vec![MESSAGE_VERSION];
    postcard::to_io(env, &mut out)
        .map_err(|e| RpcError::Malformed(format!("cannot encode message: {e}")))?;
    Ok(out)
}

pub fn decode<T: for<'de> Deserialize<'de>>(buf: &[u8]) -> Result<Envelope<T>, RpcError> {
    match buf.split_first() {
        Some((&MESSAGE_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|e| RpcError::Malformed(format!("undecodable message: {e}"))),
        Some((v, _)) => Err(RpcError::Malformed(format!(
            "message version {v} not supported (this node speaks {MESSAGE_VERSION})"
        ))),
        None => Err(RpcError::Malformed("empty message".into())),
    }
}
