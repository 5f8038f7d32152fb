//! `csvctl fsck`: the allocation and namespace check of a volume's metadata, on a live
//! cluster or offline on a stopped node's Raft store.
//!
//! - Live: every node runs the check on its own replica after a ReadIndex
//!   (`Query::Fsck`), so every replica is checked, not just one.
//! - Offline: the store is recovered the way a starting node recovers it (newest
//!   snapshot, then the committed log entries after it) and checked. The store itself is
//!   never opened for writing: both redb files are copied to a private temporary
//!   directory and the copy is opened. A store that a running node holds open is
//!   refused (its files may be mid-write).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lockmgr::rpc::message::{Query, QueryReply, Reply, Request};
use lockmgr::state::VolumeState;
use lockmgr::store::{self, StoreError};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftStateMachine};

use crate::chaos::history::NodeFsck;
use crate::client::CtlClient;

/// The two files of a Raft store.
const STORE_FILES: [&str; 2] = ["raft-log.redb", "raft-sm.redb"];

/// What the offline fsck failed to do.
#[derive(Debug, thiserror::Error)]
pub enum FsckError {
    #[error("no Raft store at {0} (looked for raft-log.redb in it, in raft/ and in data/raft/)")]
    NoStore(PathBuf),
    #[error("the Raft store {0} is open in a running node; stop the node or use the live fsck")]
    InUse(PathBuf),
    #[error("cannot copy the Raft store {path} for checking")]
    Copy {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the copy of the Raft store")]
    Open(#[source] StoreError),
    #[error("cannot replay the committed log of the Raft store")]
    Replay(#[source] Box<openraft::StorageError<u64>>),
}

/// The result of one offline check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoreFsck {
    pub store: PathBuf,
    /// The last log index the recovered state includes.
    pub applied: u64,
    pub violations: Vec<String>,
}

/// Runs the fsck on every node of a live cluster (`nodes`: their ids).
pub async fn live(client: &CtlClient, nodes: &[u64]) -> Vec<NodeFsck> {
    let calls = nodes.iter().map(|&node| async move {
        let answer = client
            .call(node, Request::Query(Query::Fsck), Duration::from_secs(20))
            .await;
        let (applied, violations, error) = match answer {
            Ok(Reply::Query(Ok(QueryReply::Fsck {
                applied,
                violations,
            }))) => (applied, Some(violations), String::new()),
            Ok(Reply::Query(Err(e))) => (0, None, e.to_string()),
            Ok(other) => (0, None, format!("unexpected reply {other:?}")),
            Err(e) => (0, None, format!("{e:#}")),
        };
        NodeFsck {
            node,
            applied,
            violations,
            error,
        }
    });
    futures::future::join_all(calls).await
}

/// The store directory under `path`: `path` itself, `path/raft` (a node's data
/// directory) or `path/data/raft` (a node's directory in a local cluster).
pub fn find_store(path: &Path) -> Result<PathBuf, FsckError> {
    [path.to_owned(), path.join("raft"), path.join("data/raft")]
        .into_iter()
        .find(|p| p.join(STORE_FILES[0]).is_file() && p.join(STORE_FILES[1]).is_file())
        .ok_or_else(|| FsckError::NoStore(path.to_owned()))
}

/// Checks the state a stopped node's store recovers to, without writing to the store.
pub async fn offline(path: &Path) -> Result<StoreFsck, FsckError> {
    let store_dir = find_store(path)?;
    // Holding read-only handles refuses a running node and keeps one from starting while
    // we copy. A file redb cannot open read-only (e.g. one that needs recovery after a
    // crash) is still copied: the copy is recovered, never the original.
    let mut guards = Vec::new();
    for f in STORE_FILES {
        match redb::ReadOnlyDatabase::open(store_dir.join(f)) {
            Ok(g) => guards.push(g),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(FsckError::InUse(store_dir));
            }
            Err(e) => {
                tracing::debug!(file = f, error = %e, "read-only open failed; copying anyway")
            }
        }
    }
    let tmp = std::env::temp_dir().join(format!(
        "csvd-fsck-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let copy = |src: &Path| -> Result<(), FsckError> {
        std::fs::create_dir_all(&tmp).map_err(|source| FsckError::Copy {
            path: tmp.clone(),
            source,
        })?;
        for f in STORE_FILES {
            std::fs::copy(src.join(f), tmp.join(f)).map_err(|source| FsckError::Copy {
                path: src.join(f),
                source,
            })?;
        }
        Ok(())
    };
    let res = match copy(&store_dir) {
        Ok(()) => {
            drop(guards);
            check_copy(&tmp).await
        }
        Err(e) => Err(e),
    };
    let _ = std::fs::remove_dir_all(&tmp);
    let (applied, violations) = res?;
    Ok(StoreFsck {
        store: store_dir,
        applied,
        violations,
    })
}

/// Recovers the store in `dir` (a private copy) as a starting node would, and checks it.
async fn check_copy(dir: &Path) -> Result<(u64, Vec<String>), FsckError> {
    let (mut log, mut sm) = store::open::<VolumeState>(dir).map_err(FsckError::Open)?;
    let committed = log
        .read_committed()
        .await
        .map_err(|e| FsckError::Replay(Box::new(e)))?;
    let (applied, _) = sm
        .applied_state()
        .await
        .map_err(|e| FsckError::Replay(Box::new(e)))?;
    let mut last = applied.map(|l| l.index).unwrap_or(0);
    if let Some(c) = committed {
        let from = applied.map(|l| l.index + 1).unwrap_or(0);
        if c.index >= from {
            let entries = log
                .try_get_log_entries(from..=c.index)
                .await
                .map_err(|e| FsckError::Replay(Box::new(e)))?;
            if let Some(e) = entries.last() {
                last = e.log_id.index;
            }
            sm.apply(entries)
                .await
                .map_err(|e| FsckError::Replay(Box::new(e)))?;
        }
    }
    let state = sm.state();
    let violations = {
        let s = state.read().unwrap_or_else(|p| p.into_inner());
        s.check_invariants().err().unwrap_or_default()
    };
    Ok((last, violations))
}
