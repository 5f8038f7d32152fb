//! [`MetaClient`]: how the volume layer talks to the metadata service.
//!
//! The volume layer knows nothing of Raft: it submits [`Op`]s (applied once, in log
//! order, through the leader), reads the metadata with a chosen [`Consistency`], asks for
//! this node's session, and listens to the feed of applied commands ([`Applied`]) to
//! learn of lock breaks and of changes other nodes made.
//!
//! Contract every implementation keeps:
//! - `submit` returns only after the command is applied (committed) by the service; a
//!   refusal comes back as `Err(MetaClientError::Meta(_))`, and then nothing changed;
//! - a `Linearizable` query sees every command acknowledged before it started;
//! - a `Local` query may be stale, but never older than this client's own acknowledged
//!   submits (read-your-writes); a `Replica` query may be older than those too;
//! - `session()` is `Some` only while the lease is valid (minus the self-fence margin),
//!   and `may_write()` is false as soon as it is not;
//! - the feed publishes every command this node's replica applies, in log order; a
//!   receiver that lags gets `RecvError::Lagged` and must assume it missed anything.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::broadcast;

use crate::meta::{
    Attr, DirEntry, Extent, FencingToken, Ino, LockInfo, LockMode, MetaError, NodeId, SessionId,
    SpaceInfo, VolumeInfo,
};
use crate::op::{Op, Response};

/// A boxed future of a [`MetaClient`] call (the trait stays dyn-compatible).
pub type MetaFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, MetaClientError>> + Send + 'a>>;

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// This node's replica as it is: may miss even this node's latest writes for a
    /// moment (for polling loops that only need to converge).
    Replica,
    /// This node's replica, including every write this client had acknowledged:
    /// fast, possibly slightly behind other nodes' writes.
    Local,
    /// Sees every write acknowledged anywhere before the read started.
    Linearizable,
}

/// A metadata read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaQuery {
    Lookup {
        parent: Ino,
        name: String,
    },
    GetAttr(Ino),
    /// Up to `limit` entries sorted by name, after `after` (exclusive).
    ReadDir {
        dir: Ino,
        after: Option<String>,
        limit: usize,
    },
    ReadLink(Ino),
    /// Extents overlapping file blocks `[first_block, first_block + nblocks)`, whole.
    Extents {
        ino: Ino,
        first_block: u64,
        nblocks: u64,
    },
    GetXattr {
        ino: Ino,
        name: String,
    },
    ListXattr(Ino),
    Space,
    Volume,
    Lock(String),
}

/// The answer to a [`MetaQuery`] (one variant per query kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaAnswer {
    Attr(Attr),
    Entries(Vec<DirEntry>),
    Target(String),
    Extents(Vec<Extent>),
    Value(Vec<u8>),
    Names(Vec<String>),
    Space(SpaceInfo),
    Volume(Option<VolumeInfo>),
    Lock(Option<LockInfo>),
}

/// One command as this node's replica applied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub op: Op,
    pub response: Response,
}

/// What a metadata client failed to do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MetaClientError {
    /// The service applied nothing: it refused the command or query.
    #[error("the metadata service refused the request")]
    Meta(#[source] MetaError),
    #[error("this node has no live metadata session")]
    NoSession,
    /// Certainly not applied (no leader reachable, not sent).
    #[error("the metadata service is unavailable: {0}")]
    Unavailable(String),
    /// May or may not have been applied (a timeout after sending).
    #[error("the outcome of the metadata write is unknown: {0}")]
    Indeterminate(String),
    /// The service answered something this client did not expect.
    #[error("unexpected metadata answer: {0}")]
    Protocol(String),
}

impl From<MetaError> for MetaClientError {
    fn from(e: MetaError) -> Self {
        MetaClientError::Meta(e)
    }
}

/// The metadata service as one node sees it. See the module docs for the contract.
pub trait MetaClient: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;
    /// Applies `op` through the leader; `Response::Err` is returned as `Err(Meta(_))`.
    fn submit(&self, op: Op) -> MetaFuture<'_, Response>;
    /// Reads the metadata.
    fn query(&self, q: MetaQuery, c: Consistency) -> MetaFuture<'_, MetaAnswer>;
    /// This node's live session, while the lease is valid.
    fn session(&self) -> Option<SessionId>;
    /// True while this node may issue LUN writes (the lease is valid).
    fn may_write(&self) -> bool {
        self.session().is_some()
    }
    /// The feed of applied commands.
    fn subscribe(&self) -> broadcast::Receiver<Applied>;
}

/// Lock helpers over [`MetaClient::submit`], for this node's session.
impl dyn MetaClient {
    /// Acquires `key` for this node's session; `Err(Meta(LockBusy))` if it is held.
    pub async fn acquire(
        &self,
        key: &str,
        mode: LockMode,
    ) -> Result<(FencingToken, SessionId), MetaClientError> {
        let session = self.session().ok_or(MetaClientError::NoSession)?;
        match self
            .submit(Op::Acquire {
                session,
                key: key.to_string(),
                mode,
            })
            .await?
        {
            Response::Lock(t) => Ok((t, session)),
            other => Err(MetaClientError::Protocol(format!(
                "Acquire answered {other:?}"
            ))),
        }
    }

    /// Releases `key` held by `session` (a no-op if it is not held).
    pub async fn release(&self, session: SessionId, key: &str) -> Result<(), MetaClientError> {
        self.submit(Op::Release {
            session,
            key: key.to_string(),
        })
        .await
        .map(|_| ())
    }

    /// Asks the holders of `key` to flush and release it. A lock nobody holds is fine.
    pub async fn request_break(&self, key: &str) -> Result<(), MetaClientError> {
        match self
            .submit(Op::RequestBreak {
                key: key.to_string(),
                requester: self.node_id(),
            })
            .await
        {
            Ok(_) | Err(MetaClientError::Meta(MetaError::NotFound)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The holders of `key`.
    pub async fn lock_info(
        &self,
        key: &str,
        c: Consistency,
    ) -> Result<Option<LockInfo>, MetaClientError> {
        match self.query(MetaQuery::Lock(key.to_string()), c).await? {
            MetaAnswer::Lock(l) => Ok(l),
            other => Err(MetaClientError::Protocol(format!(
                "Lock query answered {other:?}"
            ))),
        }
    }
}
