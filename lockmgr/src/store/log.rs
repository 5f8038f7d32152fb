//! The Raft log, the vote and the commit hint, in `raft-log.redb`.
//!
//! Invariants:
//! - table `log` maps each present index to its postcard-encoded entry; the present indexes
//!   are contiguous (an append that would leave a hole is refused);
//! - `meta["purged"]` only grows, and no entry at or below it is present;
//! - every write except `save_committed` is fsync'd before the call returns.
//!
//! Each operation runs its redb transaction on tokio's blocking pool. Log writes are
//! serialized by openraft (`&mut self`); readers (`LogReader` clones) use MVCC read
//! transactions and never wait for the writer.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    Entry, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, StorageError, Vote,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{LOG_FILE, Nid, StoreError, blocking, decode, encode, init_format};
use crate::types::TypeConfig;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "purged";

/// The durable Raft log and vote. Cheap to clone: clones share the database and serve as
/// openraft's `LogReader`.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

impl LogStore {
    pub(super) fn open(db: Arc<Database>) -> Result<Self, StoreError> {
        init_format(&db, META, LOG_FILE)?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.commit()?;
        Ok(LogStore { db })
    }

    /// The newest purged log id (blocking; for [`super::open`]).
    pub(super) fn read_purged_blocking(&self) -> Result<Option<LogId<Nid>>, StoreError> {
        read_meta(&self.db, PURGED)
    }

    /// Appends `entries` (following the last present entry) and returns once they are fsync'd.
    pub async fn append_durable(&self, entries: Vec<Entry<TypeConfig>>) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut t = tx.open_table(LOG)?;
                for e in &entries {
                    t.insert(e.log_id.index, encode("a log entry", e)?.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn entries(
        &self,
        start: u64,
        end: Option<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_read()?;
            let t = tx.open_table(LOG)?;
            let range = match end {
                Some(e) => t.range(start..e)?,
                None => t.range(start..)?,
            };
            let mut out = Vec::new();
            for item in range {
                let (_, v) = item?;
                out.push(decode("a log entry", v.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn log_state(&self) -> Result<LogState<TypeConfig>, StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let tx = db.begin_read()?;
            let purged: Option<LogId<Nid>> = get_meta(&tx.open_table(META)?, PURGED)?;
            let t = tx.open_table(LOG)?;
            let last = match t.last()? {
                // An entry starts with its log id, so the prefix is enough.
                Some((_, v)) => Some(
                    postcard::take_from_bytes::<LogId<Nid>>(v.value())
                        .map_err(|source| StoreError::Decode {
                            what: "the last log id",
                            source,
                        })?
                        .0,
                ),
                None => purged,
            };
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
    }

    async fn put_meta<T>(
        &self,
        key: &'static str,
        v: &T,
        durability: Durability,
    ) -> Result<(), StoreError>
    where
        T: Serialize + ?Sized,
    {
        let bytes = encode(key, v)?;
        let db = self.db.clone();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            tx.open_table(META)?.insert(key, bytes.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let db = self.db.clone();
        blocking(move || read_meta(&db, key)).await
    }

    /// Deletes `[index, +inf)`.
    async fn truncate_from(&self, index: u64) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            tx.open_table(LOG)?.retain_in(index.., |_, _| false)?;
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Records `upto` as purged and deletes `[0, upto.index]`, in one fsync'd transaction.
    async fn purge_upto(&self, upto: LogId<Nid>) -> Result<(), StoreError> {
        let db = self.db.clone();
        blocking(move || {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut meta = tx.open_table(META)?;
                let purged: Option<LogId<Nid>> = get_meta(&meta, PURGED)?;
                if purged >= Some(upto) {
                    return Ok(());
                }
                meta.insert(PURGED, encode(PURGED, &upto)?.as_slice())?;
                tx.open_table(LOG)?.retain_in(..=upto.index, |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn get_meta<T: DeserializeOwned>(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    match t.get(key)? {
        Some(v) => decode(key, v.value()).map(Some),
        None => Ok(None),
    }
}

fn read_meta<T: DeserializeOwned>(
    db: &Database,
    key: &'static str,
) -> Result<Option<T>, StoreError> {
    let tx = db.begin_read()?;
    get_meta(&tx.open_table(META)?, key)
}

/// Normalizes a range of log indexes into `[start, end)`, `end = None` meaning unbounded.
fn index_range<RB: RangeBounds<u64>>(range: &RB) -> (u64, Option<u64>) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.checked_add(1),
        Bound::Excluded(&e) => Some(e),
        Bound::Unbounded => None,
    };
    (start, end)
}

fn logs_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError<Nid> {
    move |e| e.into_raft(ErrorSubject::Logs, verb)
}

fn vote_err(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError<Nid> {
    move |e| e.into_raft(ErrorSubject::Vote, verb)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<Nid>> {
        let (start, end) = index_range(&range);
        self.entries(start, end)
            .await
            .map_err(logs_err(ErrorVerb::Read))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<Nid>> {
        self.log_state().await.map_err(logs_err(ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<Nid>) -> Result<(), StorageError<Nid>> {
        self.put_meta(VOTE, vote, Durability::Immediate)
            .await
            .map_err(vote_err(ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<Nid>>, StorageError<Nid>> {
        self.get_meta(VOTE).await.map_err(vote_err(ErrorVerb::Read))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<Nid>>,
    ) -> Result<(), StorageError<Nid>> {
        // A hint only (see the module docs): made durable by the next fsync'd commit.
        self.put_meta(COMMITTED, &committed, Durability::None)
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<Nid>>, StorageError<Nid>> {
        self.get_meta::<Option<LogId<Nid>>>(COMMITTED)
            .await
            .map(Option::flatten)
            .map_err(|e| e.into_raft(ErrorSubject::Store, ErrorVerb::Read))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<Nid>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_durable(entries.into_iter().collect()).await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(e.into_raft(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<Nid>) -> Result<(), StorageError<Nid>> {
        self.truncate_from(log_id.index)
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<Nid>) -> Result<(), StorageError<Nid>> {
        self.purge_upto(log_id)
            .await
            .map_err(|e| e.into_raft(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
