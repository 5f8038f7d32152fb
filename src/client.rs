//! The operator's view of a cluster: `csvctl` talks to nodes over the authenticated RPC,
//! as node id 0 (no Raft member has it).

use std::time::Duration;

use anyhow::{Context, bail};
use lockmgr::rpc::RpcClient;
use lockmgr::rpc::auth::ClusterKey;
use lockmgr::rpc::message::{NodeStatus, Query, QueryReply, Reply, Request};
use serde::Serialize;

/// The node id `csvctl` presents in the RPC handshake.
pub const OPERATOR_ID: u64 = 0;

/// Talks to a set of nodes (by RPC address).
pub struct CtlClient {
    nodes: Vec<(u64, RpcClient)>,
}

/// One line of `csvctl status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusNode {
    pub id: u64,
    pub role: String,
    pub alive: bool,
    pub path: String,
    pub reason: Option<String>,
    pub since_ms: Option<u64>,
    pub peer: Option<u64>,
    pub rpc: String,
}

/// `csvctl status --json`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterStatus {
    pub leader: Option<u64>,
    pub term: u64,
    pub nodes: Vec<StatusNode>,
}

impl CtlClient {
    /// `nodes`: (node id, RPC address) of every node to ask.
    pub fn new(nodes: Vec<(u64, String)>, key: ClusterKey) -> Self {
        CtlClient {
            nodes: nodes
                .into_iter()
                .map(|(id, addr)| (id, RpcClient::new(addr, key.clone(), OPERATOR_ID)))
                .collect(),
        }
    }

    /// The ids of the nodes this client talks to.
    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.iter().map(|(id, _)| *id).collect()
    }

    /// Asks every node for its status, concurrently; `None` for nodes that did not answer.
    pub async fn statuses(&self, timeout: Duration) -> Vec<(u64, Option<NodeStatus>)> {
        let calls = self.nodes.iter().map(|(id, c)| async move {
            let s = match c.call(Request::Status, timeout).await {
                Ok(Reply::Status(s)) => Some(s),
                _ => None,
            };
            (*id, s)
        });
        futures::future::join_all(calls).await
    }

    /// Runs a linearizable query on the first node that answers.
    pub async fn query(&self, q: Query) -> anyhow::Result<QueryReply> {
        let mut last = None;
        for (id, c) in &self.nodes {
            match c
                .call(Request::Query(q.clone()), Duration::from_secs(5))
                .await
            {
                Ok(Reply::Query(Ok(r))) => return Ok(r),
                Ok(Reply::Query(Err(e))) => last = Some(format!("node {id}: {e}")),
                Ok(other) => last = Some(format!("node {id}: unexpected reply {other:?}")),
                Err(e) => last = Some(format!("node {id}: {e}")),
            }
        }
        bail!(
            "no node answered the query ({})",
            last.unwrap_or_else(|| "no nodes".into())
        )
    }

    /// Sends one request to one node.
    pub async fn call(&self, node: u64, req: Request, timeout: Duration) -> anyhow::Result<Reply> {
        let (_, c) = self
            .nodes
            .iter()
            .find(|(id, _)| *id == node)
            .with_context(|| format!("no node {node} in this cluster"))?;
        Ok(c.call(req, timeout).await?)
    }

    /// The whole-cluster status: Raft roles from the nodes, path states from the metadata.
    pub async fn status(&self) -> anyhow::Result<ClusterStatus> {
        let statuses = self.statuses(Duration::from_secs(2)).await;
        let view = statuses
            .iter()
            .filter_map(|(_, s)| s.clone())
            .max_by_key(|s| (s.leader.is_some(), s.term));
        let records = match self.query(Query::Nodes).await {
            Ok(QueryReply::Nodes(n)) => n,
            _ => Vec::new(),
        };
        let mut nodes = Vec::new();
        for (id, s) in &statuses {
            let role = match &view {
                Some(v) if v.leader == Some(*id) => "leader",
                Some(v) if v.voters.contains(id) => "voter",
                Some(v) if v.learners.contains(id) => "learner",
                _ => "unknown",
            };
            let rec = records.iter().find(|r| r.id == *id);
            let path = rec.map(|r| r.path.clone()).unwrap_or_default();
            nodes.push(StatusNode {
                id: *id,
                role: role.into(),
                alive: s.is_some(),
                path: path.state.as_str().into(),
                reason: path.reason.clone(),
                since_ms: rec.map(|_| path.since_ms),
                peer: path.peer,
                rpc: rec.map(|r| r.rpc_addr.clone()).unwrap_or_default(),
            });
        }
        Ok(ClusterStatus {
            leader: view.as_ref().and_then(|v| v.leader),
            term: view.as_ref().map(|v| v.term).unwrap_or(0),
            nodes,
        })
    }
}
