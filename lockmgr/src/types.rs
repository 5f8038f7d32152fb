//! The Raft type configuration and the commands of the metadata state machine.
//!
//! Every change to cluster metadata is one [`Command`] in the Raft log. A command
//! carries the leader's clock (`now_ms`), stamped when the leader proposes it:
//! replicas never read their own clock while applying, so every replica computes
//! the same state. `apply` returns exactly one [`Response`] per command; refusals
//! are `Response::Err`, never a storage error.

use std::io::Cursor;

use csv_core::meta::NodeId;
pub use csv_core::op::{Op, Response};
use serde::{Deserialize, Serialize};

/// A Raft member as the cluster knows it: where its RPC listener is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    pub rpc_addr: String,
}

impl std::fmt::Display for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.rpc_addr)
    }
}

openraft::declare_raft_types!(
    /// The openraft type configuration of the metadata service.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// One entry of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The leader's wall clock when it proposed this command, in ms since the Unix epoch.
    /// The state machine uses `max(previous now, now_ms)`, so its time never goes back.
    pub now_ms: u64,
    pub op: Op,
    /// Who submitted it, for exactly-once application of retried writes.
    pub origin: Option<Origin>,
}

/// Identifies one logical write of one node process, so a write retried after an
/// indeterminate outcome (leader paused, connection lost) is applied at most once: the
/// state machine answers a repeat with the response of the first application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub node: NodeId,
    /// Random per process start: serials restart with the process.
    pub incarnation: u64,
    pub serial: u64,
    /// Every serial below this one has been answered; the state machine forgets them.
    pub answered_below: u64,
}
