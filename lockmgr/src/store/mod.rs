//! Durable Raft storage of the metadata service, on redb (openraft 0.9 `storage-v2`).
//!
//! A store lives in one directory with two redb files, so that a large snapshot write never
//! holds redb's single writer lock while RaftCore waits for a log append:
//!
//! - `raft-log.redb`: table `log` (index -> postcard [`openraft::Entry`]) and table `meta`
//!   (`vote`, `committed`, `purged`, `format`). Owned by [`LogStore`].
//! - `raft-sm.redb`: table `snapshot` (`meta`, `data`, `seq`, `format`): the newest snapshot.
//!   Owned by [`StateMachineStore`].
//!
//! The state machine data `S` ([`StateMachineData`]) lives in memory only, behind an
//! `Arc<RwLock<S>>` that readers share; it reaches the disk only through snapshots.
//!
//! # What is durable when
//!
//! - `append`, `save_vote`, `truncate` and `purge` commit with `Durability::Immediate` (fsync)
//!   before they return; `append` reports `log_io_completed` only after its commit returned.
//! - `save_committed` commits with `Durability::None`: it is a hint for faster recovery, made
//!   durable by the next fsync'd commit or by a clean close. After a crash it may be older than
//!   the real commit index, which is safe: the log entries themselves are durable, and Raft
//!   re-commits them.
//! - A snapshot (`build_snapshot`, `install_snapshot`) is fsync'd before the call returns, so
//!   openraft may purge the log it covers right afterwards. `build_snapshot` never replaces a
//!   stored snapshot with an older one (it runs concurrently with `install_snapshot`).
//! - `apply` writes nothing: applied state is rebuilt from snapshot + log after a restart.
//!
//! # Startup recovery sequence
//!
//! 1. [`open`] creates or opens both files and checks their format version.
//! 2. It loads the newest snapshot into `S` and sets `last_applied` and the last membership
//!    from it (or `S::default()` and nothing when there is no snapshot).
//! 3. It refuses to start when the log is purged beyond the snapshot (state would be lost).
//! 4. `Raft::new` then reads vote, committed and the log state, and re-applies the log
//!    entries `(last_applied, committed]` through [`StateMachineStore`]'s `apply`, which brings
//!    `S` to the last committed state this node knew; the leader replicates the rest.

mod log;
mod sm;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{ErrorSubject, ErrorVerb, LogId, StorageError, StorageIOError};
use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::{Command, Response};

pub use self::log::LogStore;
pub use self::sm::{SnapshotBuilder, StateMachineStore};

/// The node id type of the metadata Raft.
type Nid = csv_core::meta::NodeId;

/// Version of the on-disk layout (tables, keys, encodings). Bump on any incompatible change.
const FORMAT_VERSION: u8 = 1;
/// Key of the format version in each file's key/value table.
const FORMAT_KEY: &str = "format";

const LOG_FILE: &str = "raft-log.redb";
const SM_FILE: &str = "raft-sm.redb";

/// The deterministic metadata state that the Raft log drives.
///
/// `apply` must be a pure function of the current state and the command (no clock, no I/O),
/// so that every replica, and every restart that re-applies the log, computes the same state.
pub trait StateMachineData:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// Applies one committed command and returns its answer.
    fn apply(&mut self, cmd: &Command) -> Response;
}

/// Failures of the Raft store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the store directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the store file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("a transaction on the raft store failed")]
    Db(#[source] redb::Error),
    #[error("cannot encode {what} for the raft store")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot decode {what} from the raft store")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error(
        "the store file {file} has format version {found}, this build reads version {FORMAT_VERSION}"
    )]
    FormatVersion { file: &'static str, found: u8 },
    #[error(
        "the raft log is purged up to {purged} but the newest snapshot covers only {snapshot:?}: the state between them is lost"
    )]
    PurgedPastSnapshot {
        purged: LogId<Nid>,
        snapshot: Option<LogId<Nid>>,
    },
    #[error(
        "the snapshot data does not match its metadata (data covers {data:?}, metadata says {meta:?})"
    )]
    SnapshotMismatch {
        data: Option<LogId<Nid>>,
        meta: Option<LogId<Nid>>,
    },
    #[error("invalid snapshot data: {0}")]
    BadSnapshot(&'static str),
    #[error("the state machine lock is poisoned: an earlier apply panicked")]
    Poisoned,
    #[error("a blocking store task did not complete")]
    Join(#[source] tokio::task::JoinError),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl StoreError {
    /// Wraps this error as openraft's (fatal) storage error about `subject`.
    fn into_raft(self, subject: ErrorSubject<Nid>, verb: ErrorVerb) -> StorageError<Nid> {
        StorageIOError::new(subject, verb, &self).into()
    }
}

/// Opens (or creates) the Raft store in directory `path` and loads the newest snapshot into
/// the state machine. See the module docs for the recovery sequence.
pub fn open<S: StateMachineData>(
    path: &Path,
) -> Result<(LogStore, StateMachineStore<S>), StoreError> {
    std::fs::create_dir_all(path).map_err(|source| StoreError::CreateDir {
        path: path.to_owned(),
        source,
    })?;
    let log_db = open_db(&path.join(LOG_FILE))?;
    let sm_db = open_db(&path.join(SM_FILE))?;
    let log_store = LogStore::open(log_db)?;
    let sm_store = StateMachineStore::<S>::open(sm_db)?;
    let purged = log_store.read_purged_blocking()?;
    let snapshot = sm_store.last_applied();
    if let Some(purged) = purged
        && Some(purged) > snapshot
    {
        return Err(StoreError::PurgedPastSnapshot { purged, snapshot });
    }
    Ok((log_store, sm_store))
}

fn open_db(path: &Path) -> Result<Arc<Database>, StoreError> {
    Database::create(path)
        .map(Arc::new)
        .map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Records the format version in a fresh file, or checks it in an existing one; creates `table`.
fn init_format(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    file: &'static str,
) -> Result<(), StoreError> {
    let tx = db.begin_write()?;
    {
        let mut t = tx.open_table(table)?;
        let found = t.get(FORMAT_KEY)?.map(|v| v.value().first().copied());
        match found {
            None => {
                t.insert(FORMAT_KEY, [FORMAT_VERSION].as_slice())?;
            }
            Some(Some(FORMAT_VERSION)) => {}
            Some(v) => {
                return Err(StoreError::FormatVersion {
                    file,
                    found: v.unwrap_or(0),
                });
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Runs a blocking redb operation on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(StoreError::Join)?
}

fn encode<T: Serialize + ?Sized>(what: &'static str, v: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(v).map_err(|source| StoreError::Encode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}
