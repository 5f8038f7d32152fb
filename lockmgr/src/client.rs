//! [`MetaClient`] implementations: [`NodeMeta`] over a running [`MetaNode`] (what csvd
//! uses), and [`InProcessMeta`] over a [`VolumeState`] in memory (one or more "nodes"
//! sharing one state without Raft: for tests of the volume layer and for tools).
//!
//! Both answer queries with [`answer`], the one mapping from [`MetaQuery`] to the state
//! machine's read methods.
//!
//! `NodeMeta` keeps read-your-writes for `Local` reads: after one of its own writes is
//! acknowledged, the next local read first waits for a linearizable barrier (a follower
//! applies the leader's commit a moment later). Linearizable reads that overlap share one
//! barrier: a caller waits for a barrier that started after it arrived.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use csv_core::meta::{MetaError, NodeId, SessionId};
use csv_core::volume::{
    Applied, Consistency, MetaAnswer, MetaClient, MetaClientError, MetaFuture, MetaQuery,
};
use tokio::sync::broadcast;

use crate::node::{MetaNode, NodeError};
use crate::state::VolumeState;
use crate::types::{Command, Op, Response};

/// Answers `q` from `state`.
pub fn answer(state: &VolumeState, q: &MetaQuery) -> Result<MetaAnswer, MetaError> {
    Ok(match q {
        MetaQuery::Lookup { parent, name } => MetaAnswer::Attr(state.lookup(*parent, name)?),
        MetaQuery::GetAttr(ino) => MetaAnswer::Attr(state.getattr(*ino)?),
        MetaQuery::ReadDir { dir, after, limit } => {
            MetaAnswer::Entries(state.readdir(*dir, after.as_deref(), *limit)?)
        }
        MetaQuery::ReadLink(ino) => MetaAnswer::Target(state.readlink(*ino)?),
        MetaQuery::Extents {
            ino,
            first_block,
            nblocks,
        } => MetaAnswer::Extents(state.extents(*ino, *first_block, *nblocks)?),
        MetaQuery::GetXattr { ino, name } => MetaAnswer::Value(state.getxattr(*ino, name)?),
        MetaQuery::ListXattr(ino) => MetaAnswer::Names(state.listxattr(*ino)?),
        MetaQuery::Space => MetaAnswer::Space(state.space()),
        MetaQuery::Volume => MetaAnswer::Volume(state.volume().cloned()),
        MetaQuery::Lock(key) => MetaAnswer::Lock(state.lock(key)),
    })
}

fn node_err(e: NodeError) -> MetaClientError {
    match e {
        NodeError::Meta(m) => MetaClientError::Meta(m),
        NodeError::NoSession => MetaClientError::NoSession,
        NodeError::Indeterminate(s) => MetaClientError::Indeterminate(s),
        other => MetaClientError::Unavailable(other.to_string()),
    }
}

/// The metadata service through this node's [`MetaNode`].
pub struct NodeMeta {
    node: Arc<MetaNode>,
    /// Count of acknowledged writes of this client.
    writes: AtomicU64,
    /// `writes` as of the start of the last completed barrier.
    synced: AtomicU64,
    /// Barrier generations: (started, completed).
    barrier: tokio::sync::Mutex<u64>,
    barrier_gen: AtomicU64,
}

impl std::fmt::Debug for NodeMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMeta")
            .field("node", &self.node.id())
            .finish_non_exhaustive()
    }
}

impl NodeMeta {
    pub fn new(node: Arc<MetaNode>) -> Self {
        NodeMeta {
            node,
            writes: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            barrier: tokio::sync::Mutex::new(0),
            barrier_gen: AtomicU64::new(0),
        }
    }

    /// A linearizable barrier shared by concurrent callers: returns once a barrier that
    /// started after this call was made has completed.
    async fn barrier(&self) -> Result<(), MetaClientError> {
        let arrived = self.barrier_gen.load(Ordering::SeqCst);
        let mut done = self.barrier.lock().await;
        // `*done` is the generation of the last completed barrier; generations are
        // numbered when they start, so one numbered after `arrived` started after us.
        if *done > arrived {
            return Ok(());
        }
        let generation = self.barrier_gen.fetch_add(1, Ordering::SeqCst) + 1;
        let writes = self.writes.load(Ordering::SeqCst);
        self.node.barrier().await.map_err(node_err)?;
        *done = generation;
        self.synced.fetch_max(writes, Ordering::SeqCst);
        Ok(())
    }
}

impl MetaClient for NodeMeta {
    fn node_id(&self) -> NodeId {
        self.node.id()
    }

    fn submit(&self, op: Op) -> MetaFuture<'_, Response> {
        Box::pin(async move {
            let r = self.node.write(op).await.map_err(node_err)?;
            self.writes.fetch_add(1, Ordering::SeqCst);
            r.into_result().map_err(MetaClientError::Meta)
        })
    }

    fn query(&self, q: MetaQuery, c: Consistency) -> MetaFuture<'_, MetaAnswer> {
        Box::pin(async move {
            let behind = self.synced.load(Ordering::SeqCst) < self.writes.load(Ordering::SeqCst);
            if c == Consistency::Linearizable || behind {
                self.barrier().await?;
            }
            self.node
                .read_local(|s| answer(s, &q))
                .map_err(MetaClientError::Meta)
        })
    }

    fn session(&self) -> Option<SessionId> {
        self.node.live_session()
    }

    fn may_write(&self) -> bool {
        self.node.may_write()
    }

    fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.node.subscribe_applied()
    }
}

/// A metadata "cluster" in memory: one [`VolumeState`] shared by any number of
/// [`InProcessMeta`] nodes, with a change feed and a logical clock.
#[derive(Clone)]
pub struct InProcessCluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    state: Mutex<VolumeState>,
    feed: broadcast::Sender<Applied>,
    clock: AtomicU64,
}

impl std::fmt::Debug for InProcessCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessCluster").finish_non_exhaustive()
    }
}

impl InProcessCluster {
    /// A cluster whose state is `state` (already holding a volume, or not).
    pub fn new(state: VolumeState) -> Self {
        InProcessCluster {
            inner: Arc::new(ClusterInner {
                clock: AtomicU64::new(state.now_ms() + 1),
                state: Mutex::new(state),
                feed: broadcast::channel(4096).0,
            }),
        }
    }

    /// Applies `op` as the leader would (stamped with the logical clock).
    pub fn apply(&self, op: Op) -> Response {
        let now_ms = self.inner.clock.fetch_add(1, Ordering::SeqCst);
        let r = {
            let mut s = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            s.apply(&Command {
                now_ms,
                op: op.clone(),
                origin: None,
            })
        };
        let _ = self.inner.feed.send(Applied {
            op,
            response: r.clone(),
        });
        r
    }

    /// Reads the state.
    pub fn read<R>(&self, f: impl FnOnce(&VolumeState) -> R) -> R {
        f(&self.inner.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Moves the logical clock forward (to expire sessions with `Op::Tick`).
    pub fn advance(&self, ms: u64) {
        self.inner.clock.fetch_add(ms, Ordering::SeqCst);
    }

    /// Opens a session for `node` and returns a client for it.
    pub fn node(&self, node: NodeId, ttl_ms: u64) -> Result<InProcessMeta, MetaError> {
        match self.apply(Op::OpenSession { node, ttl_ms }).into_result()? {
            Response::Session(id) => Ok(InProcessMeta {
                cluster: self.clone(),
                node,
                session: Mutex::new(Some(id)),
            }),
            other => Err(MetaError::Invalid(format!(
                "OpenSession answered {other:?}"
            ))),
        }
    }
}

/// One node of an [`InProcessCluster`].
pub struct InProcessMeta {
    cluster: InProcessCluster,
    node: NodeId,
    session: Mutex<Option<SessionId>>,
}

impl std::fmt::Debug for InProcessMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessMeta")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl InProcessMeta {
    /// Marks the lease as lost (as a node that cannot renew it would): `session()`
    /// becomes `None` and writes are fenced. The session itself lives on in the state
    /// until it is closed or expires.
    pub fn lose_lease(&self) -> Option<SessionId> {
        self.session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Gives the lease back under `session` (a keep-alive that got through in time).
    pub fn regain_lease(&self, session: SessionId) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
    }

    /// Opens a new session (as a node whose old one expired does) and uses it.
    pub fn reopen_session(&self, ttl_ms: u64) -> Result<SessionId, MetaError> {
        let op = Op::OpenSession {
            node: self.node,
            ttl_ms,
        };
        match self.cluster.apply(op).into_result()? {
            Response::Session(id) => {
                *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
                Ok(id)
            }
            other => Err(MetaError::Invalid(format!(
                "OpenSession answered {other:?}"
            ))),
        }
    }

    /// The session this client opened (even after `lose_lease`).
    pub fn cluster(&self) -> &InProcessCluster {
        &self.cluster
    }
}

impl MetaClient for InProcessMeta {
    fn node_id(&self) -> NodeId {
        self.node
    }

    fn submit(&self, op: Op) -> MetaFuture<'_, Response> {
        let r = self.cluster.apply(op);
        Box::pin(async move { r.into_result().map_err(MetaClientError::Meta) })
    }

    fn query(&self, q: MetaQuery, _c: Consistency) -> MetaFuture<'_, MetaAnswer> {
        let r = self.cluster.read(|s| answer(s, &q));
        Box::pin(async move { r.map_err(MetaClientError::Meta) })
    }

    fn session(&self) -> Option<SessionId> {
        let id = (*self.session.lock().unwrap_or_else(|p| p.into_inner()))?;
        self.cluster.read(|s| s.session(id).is_some()).then_some(id)
    }

    fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.cluster.inner.feed.subscribe()
    }
}
