//! Wires the I/O redirector into the node: the node's LUN becomes a
//! [`RedirectingLun`] over its SAN path, with peers reached over the cluster RPC.
//!
//! Owns:
//! - [`MetaTransport`]: redirected requests as `Ext` calls ([`SERVICE_PEER_IO`]) on the
//!   authenticated, multiplexed cluster RPC;
//! - [`LockTable`]: the fencing check of redirected writes against the local replica's locks
//!   (a linearizable read when the replica has not seen the token yet);
//! - the status publisher (path state -> `Op::SetPathStatus`, newest first) and the peer view
//!   (node records -> peer health, every [`PEER_REFRESH`]);
//! - the diagnostic service ([`SERVICE_DIAG`]): block I/O through this node's LUN and the
//!   operator's redirect request, for `csvctl`, tests and benchmarks until the FUSE and NBD
//!   frontends carry the workload.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use csv_core::lun::{IoFence, Lun};
use csv_core::meta::{FencingToken, NodeId, PathState, SessionId};
use lockmgr::node::{MetaNode, NodeError};
use lockmgr::rpc::RpcError;
use lockmgr::state::VolumeState;
use lockmgr::types::Op;
use redirector::peer::BoxFuture;
use redirector::{
    FenceCheck, FenceVerdict, PeerTransport, RedirectStats, RedirectingLun, SanPath, TransportError,
};
use serde::{Deserialize, Serialize};

use crate::config::NodeConfig;

/// `Ext` service id of redirected block I/O between nodes.
pub const SERVICE_PEER_IO: u8 = 1;
/// `Ext` service id of the diagnostic block I/O service.
pub const SERVICE_DIAG: u8 = 2;
/// How often the peer view is refreshed from the node records.
pub const PEER_REFRESH: Duration = Duration::from_millis(300);
/// A redirected call is never abandoned by the transport before this (the redirector applies its
/// own timeout and keeps waiting to learn when a timed-out request resolved).
const CALL_LIMIT: Duration = Duration::from_secs(3600);

/// Redirected requests over the cluster RPC.
pub struct MetaTransport {
    pub node: Arc<MetaNode>,
}

impl PeerTransport for MetaTransport {
    fn call(&self, peer: NodeId, request: Bytes) -> BoxFuture<'_, Result<Bytes, TransportError>> {
        Box::pin(async move {
            match self
                .node
                .call_service(peer, SERVICE_PEER_IO, request.to_vec(), CALL_LIMIT)
                .await
            {
                Ok(b) => Ok(Bytes::from(b)),
                Err(e) => {
                    let reason = format!("{e:#}");
                    let sent = matches!(
                        e,
                        NodeError::Rpc(
                            RpcError::Io(_)
                                | RpcError::Timeout { .. }
                                | RpcError::Disconnected(_)
                                | RpcError::Malformed(_)
                        )
                    );
                    Err(if sent {
                        TransportError::Lost { peer, reason }
                    } else {
                        TransportError::NotSent { peer, reason }
                    })
                }
            }
        })
    }

    fn incarnation(&self, node: NodeId) -> Option<SessionId> {
        if node == self.node.id() {
            return self.node.session_id();
        }
        self.node
            .read_local(|s| s.node(node).and_then(|n| n.session))
    }
}

/// Fencing tokens checked against the lock table.
pub struct LockTable {
    pub node: Arc<MetaNode>,
}

enum Seen {
    Decided(FenceVerdict),
    /// The replica has not applied the grant of this token yet.
    Behind,
}

fn judge(s: &VolumeState, key: &str, token: FencingToken) -> Seen {
    let holders = s.lock(key).map(|l| l.holders).unwrap_or_default();
    if holders.iter().any(|h| h.token == token) {
        return Seen::Decided(FenceVerdict::Valid);
    }
    if s.last_token() < token {
        return Seen::Behind;
    }
    let current = holders.iter().map(|h| h.token).max().unwrap_or(0);
    Seen::Decided(FenceVerdict::Stale { current })
}

impl FenceCheck for LockTable {
    fn may_write(&self) -> bool {
        self.node.may_write()
    }

    fn check(&self, key: &str, token: FencingToken) -> BoxFuture<'_, FenceVerdict> {
        let key = key.to_string();
        Box::pin(async move {
            if let Seen::Decided(v) = self.node.read_local(|s| judge(s, &key, token)) {
                return v;
            }
            match self.node.read(|s| judge(s, &key, token)).await {
                Ok(Seen::Decided(v)) => v,
                // Still unknown after a linearizable read: no such grant was ever made.
                Ok(Seen::Behind) => FenceVerdict::Stale { current: 0 },
                // Cannot tell: refuse (the writer retries elsewhere or learns it is fenced).
                Err(_) => FenceVerdict::Stale { current: 0 },
            }
        })
    }
}

/// Builds the node's redirecting LUN and starts its services and tasks.
pub fn attach(
    cfg: &NodeConfig,
    node: &Arc<MetaNode>,
    direct: Arc<dyn SanPath>,
) -> anyhow::Result<RedirectingLun> {
    let lun = RedirectingLun::new(
        node.id(),
        direct,
        Arc::new(MetaTransport { node: node.clone() }),
        cfg.redirector.to_redirector(cfg.session.ttl_ms),
    )
    .context("cannot start the I/O redirector")?;
    let svc = lun.peer_service(Arc::new(LockTable { node: node.clone() }));
    node.register_service(
        SERVICE_PEER_IO,
        Arc::new(move |from, payload| {
            let svc = svc.clone();
            Box::pin(async move { svc.handle(from, &payload).await.map(|b| b.to_vec()) })
        }),
    );
    let diag = lun.clone();
    node.register_service(
        SERVICE_DIAG,
        Arc::new(move |_from, payload| {
            let lun = diag.clone();
            Box::pin(async move { serve_diag(&lun, &payload).await })
        }),
    );
    tokio::spawn(publish_status(node.clone(), lun.clone()));
    tokio::spawn(refresh_peers(Arc::downgrade(node), lun.clone()));
    Ok(lun)
}

/// Publishes every path state change, newest first (a stale one is never written after a newer).
async fn publish_status(node: Arc<MetaNode>, lun: RedirectingLun) {
    let mut rx = lun.status();
    loop {
        let status = rx.borrow_and_update().clone();
        let me = node.id();
        loop {
            match node
                .write(Op::SetPathStatus {
                    node: me,
                    status: status.clone(),
                })
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot publish the path state yet");
                    if rx.has_changed().unwrap_or(true) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Feeds the peers' path health from the node records into the redirector.
async fn refresh_peers(node: std::sync::Weak<MetaNode>, lun: RedirectingLun) {
    loop {
        let Some(n) = node.upgrade() else { return };
        let peers: Vec<(NodeId, bool)> = n.read_local(|s| {
            s.nodes()
                .into_iter()
                .map(|r| {
                    let healthy = r.path.state == PathState::Direct && r.session.is_some();
                    (r.id, healthy)
                })
                .collect()
        });
        drop(n);
        lun.update_peers(&peers);
        tokio::time::sleep(PEER_REFRESH).await;
    }
}

/// A diagnostic request (postcard-encoded in an `Ext` call to [`SERVICE_DIAG`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DiagRequest {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
        /// `(lock key, fencing token)` the write is made under.
        fence: Option<(String, u64)>,
    },
    Flush,
    /// The operator's maintenance redirect (`true`) or its withdrawal.
    UserRedirect(bool),
    Stats,
}

/// The answer to a [`DiagRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DiagReply {
    Data(Vec<u8>),
    Done,
    Stats {
        mode: String,
        stats: RedirectStats,
        ghosts: u64,
        rewrites_in_flight: u64,
    },
    /// The LUN refused: the error text.
    Failed(String),
}

async fn serve_diag(lun: &RedirectingLun, payload: &[u8]) -> Result<Vec<u8>, String> {
    let req: DiagRequest =
        postcard::from_bytes(payload).map_err(|e| format!("bad diagnostic request: {e}"))?;
    let reply = match req {
        DiagRequest::Read { offset, len } => match lun.read_at(offset, len as usize).await {
            Ok(b) => DiagReply::Data(b.to_vec()),
            Err(e) => DiagReply::Failed(format!("{e:#}")),
        },
        DiagRequest::Write {
            offset,
            data,
            fua,
            fence,
        } => {
            let fence = fence.map(|(key, token)| IoFence { key, token });
            match lun
                .write_fenced(offset, Bytes::from(data), fua, fence)
                .await
            {
                Ok(()) => DiagReply::Done,
                Err(e) => DiagReply::Failed(format!("{e:#}")),
            }
        }
        DiagRequest::Flush => match lun.flush().await {
            Ok(()) => DiagReply::Done,
            Err(e) => DiagReply::Failed(format!("{e:#}")),
        },
        DiagRequest::UserRedirect(on) => {
            lun.set_user_redirect(on);
            DiagReply::Done
        }
        DiagRequest::Stats => {
            let (g, r) = lun.ghosts();
            DiagReply::Stats {
                mode: format!("{:?}", lun.mode()),
                stats: lun.stats(),
                ghosts: g as u64,
                rewrites_in_flight: r as u64,
            }
        }
    };
    postcard::to_stdvec(&reply).map_err(|e| format!("cannot encode the answer: {e}"))
}

/// Sends one diagnostic request to `node` through the operator client.
pub async fn diag(
    client: &crate::client::CtlClient,
    node: NodeId,
    req: &DiagRequest,
    timeout: Duration,
) -> anyhow::Result<DiagReply> {
    use lockmgr::rpc::message::{Reply, Request};
    let payload = postcard::to_stdvec(req)?;
    match client
        .call(
            node,
            Request::Ext {
                service: SERVICE_DIAG,
                payload,
            },
            timeout,
        )
        .await?
    {
        Reply::Ext(Ok(b)) => Ok(postcard::from_bytes(&b)?),
        Reply::Ext(Err(e)) => anyhow::bail!("node {node} refused the diagnostic request: {e}"),
        other => anyhow::bail!("unexpected answer from node {node}: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn random_bytes_never_panic_the_diag_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = postcard::from_bytes::<DiagRequest>(&bytes);
        }

        #[test]
        fn diag_requests_round_trip(offset: u64, data in proptest::collection::vec(any::<u8>(), 0..64), token: u64, fua: bool) {
            let req = DiagRequest::Write { offset, data: data.clone(), fua, fence: Some(("data:1".into(), token)) };
            let back: DiagRequest = postcard::from_bytes(&postcard::to_stdvec(&req).unwrap()).unwrap();
            let DiagRequest::Write { offset: o, data: d, fua: f, fence } = back else { panic!("{back:?}") };
            prop_assert_eq!((o, d, f, fence), (offset, data, fua, Some(("data:1".to_string(), token))));
        }
    }
}
